"""`llamaduo run | forecast | status | compare | prepare | dedup` — the command line (also `python -m llamaduo_nb`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from . import forecast, runner, study
from .callcache import unanswered_failures
from .config import ConfigError, load_config
from .dataquality import add_dedup_subparser
from .deploy.gguf import ensure_llama_cpp_converter
from .embedded import embedded_gguf_path, student_base_dir
from .evaluate.stage import forget_failed_reference_rows
from .forecast import Assumptions
from .llamacpp import ensure_llama_server
from .runlayout import RunLayout
from .runner import NotebookFailed, RunInterrupted, describe_state, status_table
from .schemas import LEDGER_BASELINES, NOTEBOOK_LEDGER_STAGES
from .student import GGUFExportError
from .validation import validate_teachers, validation_markdown


def _parse_set(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. loop.max_cycles=3), got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    return overrides


def retry_failed(
    params: str | Path,
    overrides: dict | None = None,
    notebooks_dir: Path | None = None,
    step: str | None = None,
    log=print,
) -> str:
    """Re-send the recorded failed calls of every finished paid step of the run (04, 05, 06), or of `step`
    ("cycle_00/04_evaluate", "04_evaluate" for every cycle, "06_deploy").

    Each step with failures in the ledger (its stages: 04 = judging + Table 1's reference rows, 05 = teacher
    study + synthesis, 06 = judged parity) has its notebook run again, in run order: every answered call
    replays from the cache for free, so only the calls that failed (errors, unusable replies) go out again,
    through the same pool, cache and ledger. A re-run 04 has its decision read again by the next --resume;
    steps that already ran on a re-run step's earlier outputs are named in the message (they keep them)."""

    cfg = load_config(params, overrides)
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    state = runner.RunState.load(layout.state_file)
    paid = [name for name in state.done if name.rpartition("/")[2] in NOTEBOOK_LEDGER_STAGES]
    if step is not None:
        paid = [name for name in paid if step in (name, name.rpartition("/")[2])]
        if not paid:
            raise ConfigError(
                f"--retry-failed {step}: no such finished paid step in {layout.root}; finished paid steps: "
                f"{[n for n in state.done if n.rpartition('/')[2] in NOTEBOOK_LEDGER_STAGES] or 'none'} (name one like "
                "cycle_00/04_evaluate, or a stage like 04_evaluate for all its cycles)"
            )

    def failures(name: str) -> list[dict]:
        cycle_part, _, stage = name.rpartition("/")
        cycle = int(cycle_part.removeprefix("cycle_")) if cycle_part else None
        found = []
        for ledger_stage in NOTEBOOK_LEDGER_STAGES[stage]:
            found += unanswered_failures(
                layout.calls_db, ledger_stage, None if ledger_stage == LEDGER_BASELINES else cycle
            )
        return found

    lines = []
    with runner.run_lock(layout):
        # in run order, each asked when its turn comes: a re-run 04 also re-sends Table 1's shared failures
        for name in paid:
            failed = failures(name)
            if not failed:
                continue
            cycle_part, _, stage = name.rpartition("/")
            cycle = int(cycle_part.removeprefix("cycle_")) if cycle_part else None
            if stage == "04_evaluate":
                forget_failed_reference_rows(layout)  # Table 1's rows with failures are computed again
            src = runner.notebook_source(stage, notebooks_dir or runner.NOTEBOOKS_DIR)
            log(f"[llamaduo] --retry-failed {name}: {len(failed)} failed call(s); re-running {src.name}")
            runner.execute_notebook(
                src,
                layout.notebook_out(stage, cycle),
                runner.stage_parameters(runner.Step(stage, cycle), layout, src),
            )
            if stage == "04_evaluate":
                state.decisions.pop(f"cycle_{cycle:02d}", None)  # re-read from the new metrics.json
                state.save(layout.state_file)
            left = len(failures(name))
            later = state.done[state.done.index(name) + 1 :]
            line = f"{name}: re-sent {len(failed)} failed call(s); {left} still failing"
            if later:
                line += f" (already ran on its earlier outputs: {', '.join(later)})"
            lines.append(line)
    if not lines:
        return f"{', '.join(paid) or 'no finished paid step'}: no failed calls to retry"
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:

    t0 = time.monotonic()
    if args.resume and args.fresh:
        raise ConfigError("--resume and --fresh exclude each other")
    if args.step and not args.retry_failed:
        raise ConfigError("--step names the step --retry-failed re-sends; pass both")
    if args.retry_failed:
        print(f"llamaduo: {retry_failed(args.params, _parse_set(args.set), step=args.step)}")
        if not args.resume:
            return 0
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


def cmd_forecast(args: argparse.Namespace) -> int:

    cfg = load_config(args.params, _parse_set(args.set))
    assume = forecast.Assumptions(
        n_train=args.train_rows,
        n_test=args.test_rows,
        instruction_chars=args.instruction_chars,
        response_chars=args.response_chars,
        accept_share=args.accept_share,
        pair_tokens=args.pair_tokens,
    )
    table = forecast.forecast_run(cfg, RunLayout.for_run(cfg.outputs_dir, cfg.run_name), assume)
    print(f"Forecast for {args.params} (data: {table.attrs['data']}; prices: {cfg.prices_file})\n")
    print(forecast.markdown(table))
    print("\nPer stage, all cycles:\n")
    print(forecast.markdown(forecast.totals(table)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:

    layout = RunLayout(Path(args.run_dir))
    print(describe_state(layout) if args.json else status_table(layout))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    print(study.compare(args.run_dirs, args.out))
    print(f"llamaduo: written to {args.out}/ (summary.md, table1_study.md/.csv, fig2_volumes.png/.csv)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:

    print(f"embedded GGUF: {embedded_gguf_path()}")
    print(f"student (dequantised, cached): {student_base_dir()}")

    # the server of the offline service LLM, 03's llama.cpp engine and 06 (compiled once per machine)
    print(f"llama-server (cached): {ensure_llama_server()}")

    try:  # 06 converts non-Llama students (Gemma, Qwen2, Phi-3, ...) with llama.cpp's own converter
        print(f"llama.cpp converter (cached): {ensure_llama_cpp_converter(quiet=True)}")
    except GGUFExportError as exc:
        print(f"warning: {exc}")
    return 0


def cmd_validate_teachers(args: argparse.Namespace) -> int:
    report = validate_teachers(args.params, cycle=args.cycle, overrides=_parse_set(args.set))
    print(validation_markdown(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaduo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the LlamaDuo notebooks for a params file")
    run.add_argument("params", help="params YAML, e.g. params/demo.yaml")
    run.add_argument("--resume", action="store_true", help="continue at the first unfinished notebook")
    run.add_argument("--fresh", action="store_true", help="delete this run's folder first and start over")
    run.add_argument(
        "--retry-failed",
        action="store_true",
        help="re-send only the failed calls of every finished paid step (04/05/06); with --resume, then continue",
    )
    run.add_argument(
        "--step",
        default=None,
        metavar="STEP",
        help="with --retry-failed: only this step (cycle_00/04_evaluate, or 04_evaluate for all its cycles)",
    )
    run.add_argument(
        "--accept-changed-params",
        action="store_true",
        help="with --resume: continue although semantic params differ from the run's params.yaml (recorded); "
        "budgets, retries, rate limits and timeouts may change without it (config.NON_SEMANTIC_KEYS)",
    )
    run.add_argument("--no-progress", action="store_true", help="no per-notebook progress bar (cell k/n)")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param (dotted key)"
    )
    run.set_defaults(func=cmd_run)
    prepare = sub.add_parser(
        "prepare",
        help="dequantise the embedded student, build llama-server, fetch the GGUF converter (make install)",
    )
    prepare.set_defaults(func=cmd_prepare)
    fc = sub.add_parser("forecast", help="calls, tokens and USD the paid stages (04, 05) will spend")
    fc.add_argument("params", help="params YAML, e.g. params/paper_gemma7b.yaml")
    fc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")

    defaults = Assumptions()
    for flag, value, what in (
        ("--train-rows", defaults.n_train, "train rows, when the run has no splits and no local source"),
        ("--test-rows", defaults.n_test, "test rows, idem"),
        ("--instruction-chars", defaults.instruction_chars, "characters per instruction, idem"),
        ("--response-chars", defaults.response_chars, "characters per reference response, idem"),
    ):
        fc.add_argument(flag, type=int, default=value, help=f"{what} (default {value})")
    fc.add_argument(
        "--accept-share",
        type=float,
        default=defaults.accept_share,
        help=f"share of synthesized pairs kept by 05's filters (default {defaults.accept_share})",
    )
    fc.add_argument(
        "--pair-tokens",
        type=int,
        default=None,
        help="tokens per synthesized pair (default: as long as the seed rows; the paper's GPT-4o pairs: ~95)",
    )
    fc.set_defaults(func=cmd_forecast)
    status = sub.add_parser("status", help="print a run's state: status, reason, steps done with timings")
    status.add_argument("run_dir", help="the run folder, e.g. outputs/demo")
    status.add_argument("--json", action="store_true", help="print state.json (as the runner sees it)")
    status.set_defaults(func=cmd_status)
    cmp = sub.add_parser(
        "compare",
        help="one Table 1 and one Fig. 2 over synthetic volume across finished runs (e.g. two students); refuses "
        "runs judged on another test split or by other judges",
    )
    cmp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run folders, e.g. outputs/demo")
    cmp.add_argument(
        "--out", default="outputs/compare", help="folder for the tables and figures (default %(default)s)"
    )
    cmp.set_defaults(func=cmd_compare)
    validate = sub.add_parser(
        "validate-teachers",
        help="check the teacher study's ranking by a short LoRA per candidate, judged like 04 (a proxy laid out "
        "like the CAR paper's Table 4): expensive, its own step",
    )
    validate.add_argument("params", help="params YAML with teacher_study.candidates, e.g. params/demo.yaml")
    validate.add_argument("--cycle", type=int, default=0, help="whose study to validate (default 0)")
    validate.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a param (dotted key)"
    )
    validate.set_defaults(func=cmd_validate_teachers)
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
        if isinstance(exc, NotebookFailed):  # carries the notebook path and the cell's error
            if exc.stopped:  # a stage stopped spending (failing provider, budget): resumable, exit code 3
                print(f"llamaduo: stage stopped, nothing was lost: {exc.evalue}", file=sys.stderr)
                return 3
            print(f"llamaduo: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, RunInterrupted | KeyboardInterrupt):  # the runner recorded "interrupted"
            print(f"llamaduo: {exc or 'interrupted'}; continue with --resume", file=sys.stderr)
            return 130
        raise
