"""`llamaduo dedup` (`add_dedup_subparser`, `run_dedup_cli`; also ``python -m llamaduo_nb.dataquality``):
clean a JSONL pool against JSONL files. The only part of the package that touches files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..jsonio import DataFileError, iter_jsonl, write_json, write_jsonl
from .cleaning import clean
from .decontam import DecontamParams
from .rows import RowError


def _read_rows(path: str | Path, source: str) -> list[dict[str, Any]]:
    return list(tqdm(iter_jsonl(path), desc=f"read {source}", unit=" rows", leave=False, disable=None))


def run_dedup_cli(
    pool: str | Path,
    against: str | Path | None,
    test: str | Path | None,
    out: str | Path,
    report_path: str | Path | None = None,
    *,
    dedup_threshold: float = 0.7,
    rouge_threshold: float = 0.7,
    use_stemmer: bool = False,
    examples: int = 3,
    stream: Any = None,
) -> dict[str, Any]:
    """`llamaduo dedup`: clean a pool JSONL file, write the kept rows unchanged, print and return a report."""
    stream = stream if stream is not None else sys.stdout
    paths = {"pool": pool, "against": against, "test": test}
    rows = {name: _read_rows(path, name) if path is not None else [] for name, path in paths.items()}
    started = time.perf_counter()
    try:
        result = clean(
            rows["pool"],
            rows["against"],
            rows["test"],
            dedup_threshold=dedup_threshold,
            decontam=DecontamParams(rouge_threshold=rouge_threshold),
            use_stemmer=use_stemmer,
            progress=True,
        )
    except RowError as exc:
        raise DataFileError(paths[exc.source], exc.index + 1, None, exc.problem) from None
    report = {
        "pool": str(pool),
        "against": str(against) if against is not None else None,
        "test": str(test) if test is not None else None,
        "out": str(out),
        "seconds_total": round(time.perf_counter() - started, 3),
    } | result.report(examples=examples, pool=rows["pool"])
    write_jsonl(out, result.kept)
    if report_path is not None:
        write_json(report_path, report)
    print(format_report(report), file=stream)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"kept {report['kept']} of {report['input']} rows -> {report['out']}  ({report['seconds_total']} s)"
    ]
    for reason, count in report["dropped"].items():
        if count:
            lines.append(f"  dropped {count:>7}  {reason}")
    for reason, shown in report["examples"].items():
        lines.append(f"  e.g. {reason}:")
        for example in shown:
            what = {k: v for k, v in example.items() if k not in ("instruction", "response")}
            lines.append(f"    {what}")
            if "instruction" in example:
                lines.append(f"      instruction: {example['instruction'][:100]!r}")
    return "\n".join(lines)


def add_dedup_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dedup`` on an argparse subparsers object; the handler is set as ``func``."""
    parser = subparsers.add_parser(
        "dedup",
        help="drop duplicate and test-contaminated rows from a JSONL pool",
        description="Decontaminate a JSONL pool against a test split, then keep one row per duplicate "
        "cluster (rows near an --against row are dropped). Kept rows are written unchanged.",
    )
    parser.add_argument(
        "--pool", required=True, help="JSONL rows to clean (instruction/response or messages)"
    )
    parser.add_argument("--against", help="JSONL rows already kept (they always win; not written)")
    parser.add_argument("--test", help="JSONL test split that must not leak into the pool")
    parser.add_argument("--out", required=True, help="JSONL file for the kept rows")
    parser.add_argument("--report", help="write the report as JSON here too")
    parser.add_argument(
        "--threshold", type=float, default=0.7, help="ROUGE-L F1 of a near-duplicate (default 0.7)"
    )
    parser.add_argument(
        "--test-threshold",
        type=float,
        default=0.7,
        help="ROUGE-L F1 to a test text that counts as contamination (default 0.7)",
    )
    parser.add_argument(
        "--stem", action="store_true", help="Porter-stem tokens for ROUGE-L (rouge-score use_stemmer)"
    )
    parser.set_defaults(func=_dedup_command)
    return parser


def _dedup_command(args: argparse.Namespace) -> int:
    run_dedup_cli(
        args.pool,
        args.against,
        args.test,
        args.out,
        args.report,
        dedup_threshold=args.threshold,
        rouge_threshold=args.test_threshold,
        use_stemmer=args.stem,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m llamaduo_nb.dataquality``: the ``llamaduo dedup`` command on its own."""
    parser = argparse.ArgumentParser(prog="python -m llamaduo_nb.dataquality")
    subparsers = parser.add_subparsers(dest="command")
    add_dedup_subparser(subparsers)
    args = parser.parse_args(["dedup", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
