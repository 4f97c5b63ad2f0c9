"""`llamaduo validate-teachers`: the teacher study checked by short fine-tuning, end to end.

Laid out like the CAR paper's Table 4, but a proxy of it: the paper fine-tunes each base model fully and ranks
generators by AlpacaEval 2 and Arena-Hard; here a short LoRA per candidate is judged by 04's judges.

The teacher study (05, `synthesize.teacher`) ranks candidate teachers without fine-tuning, by CAR and by the
paper's baselines. This workflow measures what those rankings predict: a short LoRA per candidate on that
candidate's study responses (02's settings, `teacher_study.validation_steps`), answered (03) and judged by 04's
judges on the test split; Spearman's rho between that measured ranking and the ranking of every metric.

It orchestrates stages (01's split, 05's study, 02, 03, 04's judging) in a run folder of its own
(`<run_name>-teachers`), so it lives above them: no stage imports it. Its judging is forecast before it pays
(`forecast.record_judging`, ledger stage `schemas.LEDGER_TEACHER_VALIDATION`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .config import RunConfig, dump_config, load_config
from .coverage import run_coverage
from .evaluate import compute_metrics, judge_rows, load_responses
from .finetune import finetune
from .forecast import forecast_stage, record_judging
from .inference import generate_responses
from .jsonio import atomic_write, read_json, read_jsonl, write_json, write_jsonl
from .notebook import Stage
from .runlayout import RunLayout
from .schemas import LEDGER_TEACHER_VALIDATION
from .services import ServicePool
from .synthesize import load_split
from .synthesize.teacher import METRIC_LABELS, METRICS, rank_descending, run_teacher_study, spearman_rho


def validation_rows(responses: Sequence[dict], candidate: str, sample: Sequence[dict]) -> list[dict]:
    """A candidate's training data for validation: the sampled train rows with the candidate's answers."""
    by_id = {row["id"]: row for row in sample}
    rows = []
    for r in responses:
        if r["candidate"] != candidate or r["response"] is None:
            continue
        base = by_id[r["instruction_id"]]
        rows.append(
            {**base, "id": f"{base['id']}@{candidate}", "response": r["response"], "source": candidate}
        )
    return rows


def correlation_table(candidates: dict[str, dict], measured: dict[str, float | None]) -> pd.DataFrame:
    """Paper Table 4 layout: Spearman's rho between the measured ranking and each metric's ranking."""
    names = [n for n in candidates if measured.get(n) is not None]
    truth = [measured[n] for n in names]
    records = []
    for metric in METRICS:
        values = [candidates[n].get(metric) for n in names]
        records.append({"metric": METRIC_LABELS[metric], "spearman_rho": spearman_rho(values, truth)})
    return pd.DataFrame(records)


def measured_score(metrics: dict, metric: str, judges: Sequence[str] | None = None) -> float | None:
    """What validation ranks candidates by: the mean score V of `metric`, averaged over `judges` (the
    judges 04 decides with; all judges when None)."""
    values = []
    for judge, entry in metrics.get("per_judge", {}).items():
        if judges and judge not in judges:
            continue
        names = ("precision", "similarity") if metric == "both" else (metric,)
        for name in names:
            mean = (entry.get(name) or {}).get("mean")
            if mean is not None:
                values.append(mean)
    return float(np.mean(values)) if values else None


def validate(run_cfg: RunConfig, layout: RunLayout, cycle: int = 0) -> dict:
    """Fine-tune a short LoRA on each candidate's study data, answer and judge the test split like 03/04,
    and report Spearman's rho of every metric against that measured ranking (expensive by nature)."""
    study = read_json(layout.teacher_study_file(cycle))
    responses = read_jsonl(layout.teacher_responses_file(cycle))
    train = {row["id"]: row for row in load_split(layout.train_file, "train")}
    sample = [train[i] for i in study["instruction_ids"]]
    test = load_split(layout.test_file, "test")
    steps = run_cfg.teacher_study.validation_steps or run_cfg.finetune.max_steps
    ft = replace(run_cfg.finetune, max_steps=steps) if steps and steps > 0 else run_cfg.finetune
    sub_cfg = replace(run_cfg, finetune=ft)
    root = layout.teacher_validation_dir()
    measured: dict[str, float | None] = {}
    per_candidate: dict[str, dict] = {}
    for name in study["candidates"]:
        sub = RunLayout(root / name)
        rows = validation_rows(responses, name, sample)
        if len(rows) < 2:
            measured[name] = None
            per_candidate[name] = {"note": f"only {len(rows)} usable responses: not trained"}
            continue
        dump_config(replace(sub_cfg, run_name=name), sub.params_file)
        write_jsonl(sub.train_file, rows)
        write_jsonl(sub.test_file, test)
        train_summary = finetune(sub_cfg, sub, 0)
        generate_responses(sub_cfg, sub, 0, progress=True)
        answers = load_responses(sub.responses_file(0))
        if sub_cfg.evaluate.judges:
            record_judging(
                sub_cfg, sub, LEDGER_TEACHER_VALIDATION, 0, test
            )  # no paid call without a forecast
            with ServicePool(
                sub_cfg, sub, LEDGER_TEACHER_VALIDATION, 0, providers=sub_cfg.evaluate.judges
            ) as pool:
                judgments = judge_rows(pool, answers, sub_cfg.evaluate)
        else:  # reference-metric judges only: offline, no pool
            judgments = judge_rows(None, answers, sub_cfg.evaluate)
        write_jsonl(sub.judgments_file(0), judgments)
        metrics = compute_metrics(judgments, sub_cfg.evaluate, 0)
        write_json(sub.metrics_file(0), metrics)
        measured[name] = measured_score(metrics, sub_cfg.evaluate.decision_metric, decision_judges(sub_cfg))
        per_candidate[name] = {
            "train_rows": len(rows),
            "final_loss": train_summary.get("final_loss"),
            "measured": measured[name],
        }
    table = correlation_table(study["candidates"], measured)
    report = {
        "cycle": cycle,
        "steps": steps,
        "measured_by": f"mean {run_cfg.evaluate.decision_metric} over judges {decision_judges(run_cfg)}",
        "candidates": per_candidate,
        "measured_rank": dict(zip(measured, rank_descending(list(measured.values())), strict=True)),
        "spearman": table.to_dict(orient="records"),
    }
    write_json(root / "validation.json", report)
    with atomic_write(root / "validation.md") as fh:
        fh.write(validation_markdown(report))
    return report


def decision_judges(cfg: RunConfig) -> list[str]:
    """The judges 04's decision rests on (`evaluate.decision_judges`, else every judge)."""
    return list(cfg.evaluate.deciding_judges)


def validation_markdown(report: dict) -> str:
    lines = [
        "# Teacher validation (paper Table 4 layout)",
        "",
        f"Each candidate's study responses fine-tuned a LoRA for {report['steps']} steps; measured by "
        f"{report['measured_by']} on the test split.",
        "",
        "| candidate | training rows | measured | measured rank |",
        "|---|---|---|---|",
    ]
    for name, entry in report["candidates"].items():
        measured = entry.get("measured")
        lines.append(
            f"| {name} | {entry.get('train_rows', '-')} | "
            f"{'n/a' if measured is None else f'{measured:.2f}'} | {report['measured_rank'].get(name)} |"
        )
    lines += ["", "| metric | Spearman's rho vs measured ranking |", "|---|---|"]
    for row in report["spearman"]:
        rho = row["spearman_rho"]
        lines.append(f"| {row['metric']} | {'undefined' if rho is None else f'{rho:+.2f}'} |")
    return "\n".join(lines) + "\n"


def validate_teachers(params_file: str | Path, cycle: int = 0, overrides: dict | None = None) -> dict:
    """`llamaduo validate-teachers params/X.yaml`: a run folder `<run_name>-teachers` with 01's splits, the
    teacher study (replayed from the cache when it exists) and `validate` — everything offline for the demo."""
    cfg = load_config(params_file, overrides)
    if not cfg.teacher_study.enabled:
        raise ValueError(f"{params_file}: teacher_study.candidates is empty, there is nothing to validate")
    cfg = replace(cfg, run_name=f"{cfg.run_name}-teachers")
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    dump_config(cfg, layout.params_file)
    if not layout.test_file.is_file():
        run_coverage(cfg.coverage, cfg.seed, layout)
    if not layout.teacher_study_file(cycle).is_file():
        forecast_stage(cfg, "05_synthesize", cycle, layout)  # the study's calls are forecast before it pays
        run_teacher_study(Stage("05_synthesize", cfg, layout, cycle))
    return validate(cfg, layout, cycle)
