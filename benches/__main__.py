"""`python -m benches`: run every bench, print one table and write it to outputs/bench/summary.{md,json}.

Each module `benches/bench_<name>.py` exposes `lines(args) -> list[BenchLine]` (`benches.common`) and may
add its own options through `add_arguments(parser)`. A module that only has `main()` printing a Markdown
table (in `COLUMNS` order) is run as well and its rows are taken over. Modules run in `ORDER`, then any
other `bench_*.py` in the folder. One bench failing is reported in the table and does not stop the others.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import subprocess
import sys
import time
import traceback
from pathlib import Path

from benches.common import COLUMNS, BenchLine, cpu_label, machine, machine_info, write

HERE = Path(__file__).resolve().parent
ORDER = ("inference", "finetune", "dataquality", "scheduler")


def discover() -> list[str]:
    found = sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))
    return [name for name in ORDER if name in found] + [name for name in found if name not in ORDER]


def _rows_from_markdown(text: str, name: str) -> list[BenchLine]:
    """Rows of the first Markdown table in `text` with the common columns (for `main()`-only benches)."""
    lines = []
    for raw in text.splitlines():
        cells = [c.strip() for c in raw.strip().strip("|").split("|")]
        if len(cells) != len(COLUMNS) or cells[0] == COLUMNS[0] or set(raw.strip()) <= set("|-: "):
            continue
        path, ours, alternative, ratio, goal, where = cells
        try:
            value = float(ratio.split("x")[0].split()[0])
        except (ValueError, IndexError):
            value = None
        lines.append(BenchLine(path, ours, alternative, value, goal, machine=where))
    if not lines:
        lines.append(BenchLine(f"{name}: main() printed no table row", "", "", None, ""))
    return lines


def run_bench(name: str, args: argparse.Namespace) -> list[BenchLine]:
    module = importlib.import_module(f"benches.bench_{name}")
    if hasattr(module, "lines"):
        return module.lines(args)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main()
    print(out.getvalue(), flush=True)
    return _rows_from_markdown(out.getvalue(), name)


def main(argv: list[str] | None = None) -> int:
    names = discover()
    parser = argparse.ArgumentParser(prog="python -m benches", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=names, help="run only these benches")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run; ratios are noisier)")
    parser.add_argument(
        "--out", default="outputs/bench", help="folder for the tables (default outputs/bench)"
    )
    for name in names:
        module = importlib.import_module(f"benches.bench_{name}")
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    run = {"machine": machine_info(), "load_start": uptime, "args": sys.argv[1:]}
    print(f"machine at start: {machine()} ({uptime})", flush=True)
    lines: list[BenchLine] = []
    for name in args.only or names:
        print(f"\n== bench {name} ==", flush=True)
        try:
            lines += run_bench(name, args)
        except Exception as exc:  # one broken bench must not hide the others' figures
            traceback.print_exc()
            lines.append(BenchLine(f"{name}: FAILED", f"{type(exc).__name__}: {exc}"[:200], "", None, ""))
        write(lines, Path(args.out) / "summary.partial", run=run)  # a stopped run keeps the figures so far
    uptime_end = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    run.update(load_end=uptime_end, seconds=round(time.monotonic() - started, 1))
    info = run["machine"]
    preamble = (
        f"`make bench` ({' '.join(sys.argv[1:]) or 'all'}) took {time.monotonic() - started:.0f} s.\n"
        f"Machine: {cpu_label()}; CPU flags that matter: {', '.join(info['flags']) or 'none of AVX-512/AMX'}; "
        f"{info['system']} {info['machine']}, Python {info['python']}.\n"
        f"Load at start: {uptime}\nLoad at end: {uptime_end}\n"
        "ratio > 1 means ours is better; each ratio compares two figures taken in the same run."
    )
    table = write(lines, Path(args.out) / "summary", preamble, run=run)
    print("\n" + preamble + "\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
