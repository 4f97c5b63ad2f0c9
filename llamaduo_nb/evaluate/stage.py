"""04's file work: judge this cycle, build the run's reference rows once, write metrics and Table 1.

Reference rows of Table 1 are computed once per run and reused by later cycles, under
`<run>/baselines/<model>/` (responses.jsonl, judgments.jsonl, meta.json):

* `base_student`: the student before fine-tuning, answering through 03's engine and sampler with no adapter
  (`student.answer_prompts`; on CPU llama.cpp with the base model as GGUF F16, as the cycles' rows);
* each provider of `evaluate.baselines`: a service LLM answering the same test prompts K times through
  the ServicePool (ledger stage `schemas.LEDGER_BASELINES`).

They are judged exactly like the student (same judges, M, prompt). meta.json records what produced the
files; when K, sampling, the test split or the judges change, the rows are recomputed (service answers
and judgments then come from the call cache where they are unchanged). `reference_todo` decides which rows
still need computing, for `reference_rows` and for the forecast (`planned_baseline_calls`).

Planned calls (what the forecast prices, built with the requests 04 sends): `planned_judging_calls` (the
cycle's judging), `planned_pairwise_calls` (the cycle's pairwise comparison, with `evaluate.pairwise`) and
`planned_baseline_calls` (Table 1's rows still to compute).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import pandas as pd

from ..config import RunConfig
from ..jsonio import read_json, read_jsonl, write_json, write_jsonl
from ..notebook import Stage
from ..plan import PlannedCalls
from ..review import ambiguous_prompt_ids
from ..runlayout import RunLayout
from ..schemas import LEDGER_BASELINES, LEDGER_JUDGING, LEDGER_PAIRWISE, load_test_rows
from ..services import ServicePool
from ..student import answer_prompts, resolve_engine
from .agreement import agreement_report
from .judging import (
    answer_with_provider,
    assumed_answers,
    judge_rows,
    load_judgments,
    load_responses,
    planned_answer_calls,
    planned_judge_calls,
)
from .pairwise import judge_pairwise, planned_pair_calls, summarize_pairwise
from .stats import compute_metrics
from .tables import BASE_MODEL, cycle_label, table1_long, write_table1

BASE_DIR = "base_student"


def run_judges(stage: Stage, rows: Sequence[dict]) -> list[dict]:
    """04's judging step: LLM judges via the ServicePool, metric judges offline; writes judgments.jsonl."""
    cfg = stage.cfg.evaluate
    if cfg.judges:
        with ServicePool(stage.cfg, stage.layout, LEDGER_JUDGING, stage.cycle, providers=cfg.judges) as pool:
            judgments = judge_rows(pool, rows, cfg)
    else:
        judgments = judge_rows(None, rows, cfg)
    write_jsonl(stage.layout.judgments_file(stage.cycle), judgments)
    return judgments


def run_pairwise(stage: Stage, rows: Sequence[dict]) -> list[dict]:
    """04's pairwise step (`evaluate.pairwise: true`): every LLM judge compares each answer with its reference
    in both orders through the ServicePool (ledger stage `schemas.LEDGER_PAIRWISE`); writes pairwise.jsonl.
    Returns [] (and writes nothing) when pairwise comparison is off."""
    cfg = stage.cfg.evaluate
    if not cfg.pairwise:
        return []
    with ServicePool(stage.cfg, stage.layout, LEDGER_PAIRWISE, stage.cycle, providers=cfg.judges) as pool:
        records = judge_pairwise(pool, rows, cfg)
    write_jsonl(stage.layout.pairwise_file(stage.cycle), records)
    return records


def write_metrics(stage: Stage, judgments: Sequence[dict], pairwise: Sequence[dict] = ()) -> dict:
    """Compute this cycle's statistics and decision and write `metrics.json` (the runner reads it); with
    `pairwise` records (`run_pairwise`), their per-judge win rates go in its `pairwise` block (reported,
    never part of the decision).

    Test prompts marked ambiguous in the review view (`review.json`) are left out of every statistic and
    the decision; how many, and which, is recorded next to them."""
    ambiguous = ambiguous_prompt_ids(stage.layout)
    kept = [j for j in judgments if j["prompt_id"] not in ambiguous]
    ev = stage.cfg.evaluate
    metrics = compute_metrics(kept, ev, stage.cycle)
    if pairwise:
        metrics["pairwise"] = summarize_pairwise(
            [p for p in pairwise if p["prompt_id"] not in ambiguous],
            n_boot=ev.bootstrap_samples,
            seed=ev.bootstrap_seed,
            m=ev.pairwise_m,
        )
    excluded = sorted({j["prompt_id"] for j in judgments} & ambiguous)
    metrics["ambiguous_excluded"] = {"prompts": len(excluded), "prompt_ids": excluded}
    if excluded:
        metrics["decision"]["reason"] = (
            f"{metrics['decision'].get('reason', '')}; {len(excluded)} prompt(s) marked ambiguous in review "
            "were left out"
        ).lstrip("; ")
    write_json(stage.layout.metrics_file(stage.cycle), metrics)
    return metrics


# --------------------------------------------------------------------------- reference rows (once per run)


def _test_digest(test_rows: Sequence[dict]) -> str:
    text = "\n".join(f"{r['id']}\t{r['instruction']}\t{r['response']}" for r in test_rows)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def answers_meta(cfg: RunConfig, test_rows: Sequence[dict], model: str) -> dict:
    inf = cfg.inference
    return {
        "model": model,
        "student": cfg.student.model_id if model == BASE_DIR else None,
        "k": inf.k,
        "temperature": inf.temperature,
        "top_p": inf.top_p,
        "max_new_tokens": inf.max_new_tokens,
        "seed": inf.seed if model == BASE_DIR else None,
        # the base student answers through 03's engine: another engine samples differently
        **({"engine": resolve_engine(inf.engine)} if model == BASE_DIR else {}),
        "test": _test_digest(test_rows),
    }


def judges_meta(cfg: RunConfig) -> dict:
    ev = cfg.evaluate
    return {
        "judges": ev.judges,
        "metric_judges": ev.metric_judges,
        "label_categories": ev.label_categories,
        "m": ev.m,
        "temperature": ev.temperature,
        "max_tokens": ev.max_tokens,
        "rationale": ev.rationale,
    }


def base_student_responses(
    cfg: RunConfig, layout: RunLayout, test_rows: Sequence[dict], progress: bool = True
) -> list[dict]:
    """K answers per test prompt from the student before fine-tuning, through 03's engine and sampler
    (`student.answer_prompts` with no adapter)."""
    responses, _ = answer_prompts(cfg, layout, list(test_rows), None, progress)
    return responses


def _stored(layout: RunLayout | None, model: str, meta: dict, part: str) -> bool:
    if layout is None:
        return False
    path = layout.baseline_meta_file(model)
    return path.is_file() and read_json(path).get(part) == meta


def reference_todo(
    cfg: RunConfig, layout: RunLayout | None, test_rows: Sequence[dict]
) -> tuple[list[str], list[str], list[str]]:
    """(Table 1's reference models in order, those still to answer, those still to judge): a row is computed
    once per run and reused while `<run>/baselines/<model>/meta.json` matches today's settings (no `layout`:
    nothing is computed yet). The one decision `reference_rows` acts on and `planned_baseline_calls` plans."""
    ev = cfg.evaluate
    models = ([BASE_DIR] if ev.base_student else []) + list(ev.baselines)
    jmeta = judges_meta(cfg)
    todo_answers = [m for m in models if not _stored(layout, m, answers_meta(cfg, test_rows, m), "answers")]
    todo_judging = [m for m in models if m in todo_answers or not _stored(layout, m, jmeta, "judges")]
    return models, todo_answers, todo_judging


def reference_rows(cfg: RunConfig, layout: RunLayout, log: Any = print) -> dict[str, dict]:
    """Answer and judge the base student and every service baseline, unless done already in this run.

    Returns {model: {"judgments": [...], "responses": [...], "seconds": float, "reused": bool}}, the base
    student first (when `evaluate.base_student`), then the baselines in params order.
    """
    ev = cfg.evaluate
    test_rows = load_test_rows(layout.test_file)
    models, todo_answers, todo_judging = reference_todo(cfg, layout, test_rows)
    jmeta = judges_meta(cfg)
    out: dict[str, dict] = {}
    providers = list(dict.fromkeys([*(m for m in todo_answers if m != BASE_DIR), *ev.judges]))
    need_pool = bool(todo_judging and ev.judges) or any(m != BASE_DIR for m in todo_answers)
    pool = ServicePool(cfg, layout, LEDGER_BASELINES, providers=providers) if need_pool else None
    try:
        if pool is not None:
            pool.__enter__()
        for model in models:
            started = time.monotonic()
            if model in todo_answers:
                if model == BASE_DIR:
                    responses = base_student_responses(cfg, layout, test_rows)
                else:
                    responses = _service_answers(pool, model, test_rows, cfg)
                write_jsonl(layout.baseline_responses_file(model), responses)
            else:
                responses = read_jsonl(layout.baseline_responses_file(model))
            if model in todo_judging:
                judgments = judge_rows(pool, responses, ev)
                write_jsonl(layout.baseline_judgments_file(model), judgments)
                write_json(
                    layout.baseline_meta_file(model),
                    {"answers": answers_meta(cfg, test_rows, model), "judges": jmeta},
                )
            else:
                judgments = load_judgments(layout.baseline_judgments_file(model))
            seconds = round(time.monotonic() - started, 1)
            reused = model not in todo_judging
            log(f"[04] reference row {model}: {'reused' if reused else f'computed in {seconds:.1f}s'}")
            out[model] = {
                "judgments": judgments,
                "responses": responses,
                "seconds": seconds,
                "reused": reused,
            }
    finally:
        if pool is not None:
            pool.__exit__(None, None, None)
    return out


def _service_answers(
    pool: ServicePool, provider: str, test_rows: Sequence[dict], cfg: RunConfig
) -> list[dict]:
    return answer_with_provider(pool, provider, test_rows, cfg.inference.k, cfg.inference)


# --------------------------------------------------------------------------- planned calls (the forecast prices them)


def planned_judging_calls(
    cfg: RunConfig,
    cycle: int,
    test_rows: Sequence[dict],
    layout: RunLayout | None = None,
    stage: str = LEDGER_JUDGING,
) -> PlannedCalls:
    """04's judging of cycle `cycle` (`run_judges`): every LLM judge scores the cycle's answers M times. The
    answers are 03's `responses.jsonl` when it is written (the very requests `judge_rows` sends), else K per
    test prompt as long as the reference (`assumed_answers`). `stage`: the ledger stage of a judging step run
    elsewhere (validate-teachers)."""
    rows = _cycle_answers(cfg, cycle, test_rows, layout)
    return PlannedCalls(planned_judge_calls(stage, cycle, rows, cfg.evaluate))


def planned_pairwise_calls(
    cfg: RunConfig, cycle: int, test_rows: Sequence[dict], layout: RunLayout | None = None
) -> PlannedCalls:
    """04's pairwise step of cycle `cycle` (`run_pairwise`, ledger stage "04_pairwise"): with
    `evaluate.pairwise`, every LLM judge compares each answer with its reference in both orders, pairwise_m
    times; the answers as `planned_judging_calls` takes them. Empty when pairwise comparison is off."""
    if not cfg.evaluate.pairwise:
        return PlannedCalls()
    rows = _cycle_answers(cfg, cycle, test_rows, layout)
    return PlannedCalls(planned_pair_calls(LEDGER_PAIRWISE, cycle, rows, cfg.evaluate))


def _cycle_answers(
    cfg: RunConfig, cycle: int, test_rows: Sequence[dict], layout: RunLayout | None
) -> list[dict]:
    """03's answers of the cycle when written, else K per test prompt as long as the reference."""
    path = layout.responses_file(cycle) if layout is not None else None
    if path is not None and path.is_file():
        return load_responses(path)
    return assumed_answers(test_rows, cfg.inference.k, cfg.inference.max_new_tokens)


def planned_baseline_calls(
    cfg: RunConfig, test_rows: Sequence[dict], layout: RunLayout | None = None
) -> PlannedCalls:
    """Table 1's reference rows still to compute (`reference_todo`, ledger stage "baselines", once per run):
    each service baseline answers the test prompts K times (`answer_with_provider`'s requests), and the judges
    score the answers of every row still to judge like the student's: answers already written are judged as
    they are, the others assumed as long as the reference (the base student answers locally, for free)."""
    inf = cfg.inference
    _, todo_answers, todo_judging = reference_todo(cfg, layout, test_rows)
    calls = []
    for model in todo_answers:
        if model != BASE_DIR:
            calls += planned_answer_calls(LEDGER_BASELINES, None, model, test_rows, inf.k, inf)
    for model in todo_judging:
        written = layout.baseline_responses_file(model) if layout is not None else None
        if model not in todo_answers and written is not None and written.is_file():
            rows = read_jsonl(written)
        else:
            rows = assumed_answers(test_rows, inf.k, inf.max_new_tokens)
        calls += planned_judge_calls(LEDGER_BASELINES, None, rows, cfg.evaluate)
    return PlannedCalls(calls)


def forget_failed_reference_rows(layout: RunLayout) -> list[str]:
    """Mark Table 1's reference rows that hold failed answers or judgments as not computed (their meta.json
    goes), so the next 04 computes them again: answered calls replay from the cache, failed ones are re-sent
    (`llamaduo run --retry-failed`). Returns the models marked."""
    marked = []
    if not layout.baselines_dir.is_dir():
        return marked
    for meta in sorted(layout.baselines_dir.glob("*/meta.json")):
        model = meta.parent.name
        answers, judgments = layout.baseline_responses_file(model), layout.baseline_judgments_file(model)
        failed = any(r.get("error") for r in read_jsonl(answers)) if answers.is_file() else False
        failed = failed or (judgments.is_file() and any(not j["ok"] for j in load_judgments(judgments)))
        if failed:
            meta.unlink()
            marked.append(model)
    return marked


def table1_models(layout: RunLayout, cycle: int, references: dict[str, dict]) -> dict[str, tuple[str, list]]:
    """Table-1 rows in order: base student, cycles 0..`cycle` that have judgments, service baselines."""
    models: dict[str, tuple[str, list]] = {}
    if BASE_DIR in references:
        models[BASE_MODEL] = ("base", references[BASE_DIR]["judgments"])
    for c in range(cycle + 1):
        path = layout.judgments_file(c)
        if path.is_file():
            models[cycle_label(c)] = ("local", load_judgments(path))
    for model, ref in references.items():
        if model != BASE_DIR:
            models[model] = ("service", ref["judgments"])
    return models


def write_cycle_table1(stage: Stage, references: dict[str, dict]):
    """Table 1 of this cycle: CSV (long, with intervals) + Markdown (paper form); returns (wide, long)."""
    models = table1_models(stage.layout, stage.cycle, references)
    long = table1_long(models, stage.cfg.evaluate)
    wide = write_table1(
        long,
        stage.cfg.evaluate.zetas,
        stage.layout.table1_csv(stage.cycle),
        stage.layout.table1_md(stage.cycle),
    )
    return wide, long


def reference_status(references: dict[str, dict]) -> pd.DataFrame:
    """What the reference rows cost in this notebook: computed (seconds) or reused from earlier."""
    return pd.DataFrame(
        [
            {
                "model": BASE_MODEL if model == BASE_DIR else model,
                "answers": len(ref["responses"]),
                "failed answers": sum(bool(r.get("error")) for r in ref["responses"]),
                "judgments": len(ref["judgments"]),
                "status": "reused" if ref["reused"] else f"computed in {ref['seconds']:.1f}s",
            }
            for model, ref in references.items()
        ],
        columns=["model", "answers", "failed answers", "judgments", "status"],
    )


def write_agreement(stage: Stage, judgments: Sequence[dict]) -> dict:
    """Repeat spread and between-judge agreement of this cycle's judgments -> agreement.json."""
    report = agreement_report(judgments)
    write_json(stage.layout.agreement_file(stage.cycle), report)
    return report
