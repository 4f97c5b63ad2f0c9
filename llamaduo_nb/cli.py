"""`llamaduo run | status | prepare | dedup` — the command line (also `python -m llamaduo_nb`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from .config import ConfigError


def _parse_set(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. loop.max_cycles=3), got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    return overrides


def cmd_run(args: argparse.Namespace) -> int:
    from . import runner

    t0 = time.monotonic()
    if args.resume and args.fresh:
        raise ConfigError("--resume and --fresh exclude each other")
    state = runner.run(args.params, resume=args.resume, fresh=args.fresh, overrides=_parse_set(args.set))
    print(f"llamaduo: run finished in {time.monotonic() - t0:.1f} s wall time ({state.stop_reason})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .runlayout import RunLayout
    from .runner import describe_state

    print(describe_state(RunLayout(Path(args.run_dir))))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .embedded import embedded_gguf_path, student_base_dir

    print(f"embedded GGUF: {embedded_gguf_path()}")
    print(f"student (dequantised, cached): {student_base_dir()}")
    from .deploy.gguf import GGUFExportError, ensure_llama_cpp_converter

    try:  # 06 converts non-Llama students (Gemma, Qwen2, Phi-3, ...) with llama.cpp's own converter
        print(f"llama.cpp converter (cached): {ensure_llama_cpp_converter(quiet=True)}")
    except GGUFExportError as exc:
        print(f"warning: {exc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaduo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the LlamaDuo notebooks for a params file")
    run.add_argument("params", help="params YAML, e.g. params/demo.yaml")
    run.add_argument("--resume", action="store_true", help="continue at the first unfinished notebook")
    run.add_argument("--fresh", action="store_true", help="delete this run's folder first and start over")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param (dotted key)"
    )
    run.set_defaults(func=cmd_run)
    prepare = sub.add_parser("prepare", help="dequantise the embedded student once (make install runs this)")
    prepare.set_defaults(func=cmd_prepare)
    status = sub.add_parser("status", help="print a run's state")
    status.add_argument("run_dir")
    status.set_defaults(func=cmd_status)
    try:
        from .dataquality import add_dedup_subparser
    except ImportError:
        pass
    else:
        add_dedup_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"llamaduo: configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the runner's NotebookFailed carries the notebook path and cell error
        from .runner import NotebookFailed

        if isinstance(exc, NotebookFailed):
            print(f"llamaduo: {exc}", file=sys.stderr)
            return 1
        raise
