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
    state = runner.run(
        args.params,
        resume=args.resume,
        fresh=args.fresh,
        accept_changed_params=args.accept_changed_params,
        overrides=_parse_set(args.set),
        progress=not args.no_progress,
    )
    print(f"llamaduo: run finished in {time.monotonic() - t0:.1f} s wall time ({state.stop_reason})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .runlayout import RunLayout
    from .runner import describe_state, status_table

    layout = RunLayout(Path(args.run_dir))
    print(describe_state(layout) if args.json else status_table(layout))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .embedded import embedded_gguf_path, student_base_dir

    print(f"embedded GGUF: {embedded_gguf_path()}")
    print(f"student (dequantised, cached): {student_base_dir()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaduo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the LlamaDuo notebooks for a params file")
    run.add_argument("params", help="params YAML, e.g. params/demo.yaml")
    run.add_argument("--resume", action="store_true", help="continue at the first unfinished notebook")
    run.add_argument("--fresh", action="store_true", help="delete this run's folder first and start over")
    run.add_argument(
        "--accept-changed-params",
        action="store_true",
        help="with --resume: continue although the params differ from the run's params.yaml (recorded)",
    )
    run.add_argument("--no-progress", action="store_true", help="no per-notebook progress bar (cell k/n)")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param (dotted key)"
    )
    run.set_defaults(func=cmd_run)
    prepare = sub.add_parser("prepare", help="dequantise the embedded student once (make install runs this)")
    prepare.set_defaults(func=cmd_prepare)
    status = sub.add_parser("status", help="print a run's state: status, reason, steps done with timings")
    status.add_argument("run_dir", help="the run folder, e.g. outputs/demo")
    status.add_argument("--json", action="store_true", help="print state.json (as the runner sees it)")
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
    except ConfigError as exc:  # also RunLocked: another runner holds the run folder
        print(f"llamaduo: configuration error: {exc}", file=sys.stderr)
        return 2
    except (Exception, KeyboardInterrupt) as exc:
        from .runner import NotebookFailed, RunInterrupted

        if isinstance(exc, NotebookFailed):  # carries the notebook path and the cell's error
            print(f"llamaduo: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, RunInterrupted | KeyboardInterrupt):  # the runner recorded "interrupted"
            print(f"llamaduo: {exc or 'interrupted'}; continue with --resume", file=sys.stderr)
            return 130
        raise
