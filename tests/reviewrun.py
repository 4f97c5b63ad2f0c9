"""A finished tiny run for the review tests: 01's real split of the sample data, then fixture answers and
judgments for cycle 0 (the student's K=2 samples and one service baseline answer, one judge with M=3).

Scores are chosen so filters can be checked by hand: the student's precision on test prompt i has the
mean BASES[i] (repeats BASES[i]-5, BASES[i], BASES[i]+5), except prompt 0 whose repeats spread widely.

`demo_like=True` shapes the run as the demo's (the browser test): no baseline in the cycle's answers; instead
the run-level reference rows 04 stores under `<run>/baselines/` (the base student and the demo's service LLM,
K = 2 samples each), and beside the LLM judge the deciding reference metric (ROUGE-L, M = 1) on every
answer: six candidates per prompt, as in the demo.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from llamaduo_nb.config import load_config
from llamaduo_nb.coverage import run_coverage
from llamaduo_nb.jsonio import read_jsonl, write_jsonl
from llamaduo_nb.notebook import resolve_project_paths
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.runner import PROJECT_ROOT

BASES = [20, 35, 50, 65, 75, 85, 95, 45]
WIDE = [5, 20, 35]  # prompt 0: mean 20, range 30
BASELINE = "gpt4o"
JUDGE = "smollm2-service"


def student_repeats(i: int) -> list[int]:
    return WIDE if i == 0 else [BASES[i] - 5, BASES[i], BASES[i] + 5]


def write_params(root: Path) -> Path:
    """params.yaml of the run: the demo's, with project-relative paths left relative (as a user writes them)."""
    data = yaml.safe_load((PROJECT_ROOT / "params" / "demo.yaml").read_text())
    data["run_name"] = root.name
    data["outputs_dir"] = str(root.parent)
    path = root / "params.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


METRIC = "rougeL"  # the demo's deciding judge (evaluate.decision_judges)
SERVICE = "smollm2-service"  # the demo's service LLM


def _judged(row: dict, llm: list[int], metric: int | None) -> list[dict]:
    """Judgment records of one answer: the LLM judge's repeats and, when given, the reference metric's one."""
    out = [
        {**row, "judge": JUDGE, "repeat": r, "ok": True, "precision": s, "similarity": max(s - 10, 1),
         "rationale": f"repeat {r}: judged against the reference"}
        for r, s in enumerate(llm)
    ]  # fmt: skip
    if metric is not None:
        out.append(
            {**row, "judge": METRIC, "repeat": 0, "ok": True, "precision": metric, "similarity": metric}
        )
    return out


def _reference_rows(layout: RunLayout, test: list[dict]) -> None:
    """04's run-level reference rows: the base student (wordy, low ROUGE-L) and the service LLM (the label)."""
    for folder, answer, llm, metric in (
        ("base_student", lambda r: f"The answer to this is probably {r['response']} but it is hard to say.", 60, 20),
        (SERVICE, lambda r: r["response"], 75, 100),
    ):  # fmt: skip
        responses, judgments = [], []
        for row in test:
            for sample in range(2):
                responses.append({"prompt_id": row["id"], "candidate": answer(row), "sample_index": sample})
                judgments += _judged({"prompt_id": row["id"], "sample_index": sample}, [llm] * 3, metric)
        write_jsonl(layout.baseline_responses_file(folder), responses)
        write_jsonl(layout.baseline_judgments_file(folder), judgments)


def make_reviewed_run(root: Path, demo_like: bool = False) -> RunLayout:
    layout = RunLayout(root)
    cfg = resolve_project_paths(load_config(write_params(root)))
    run_coverage(cfg.coverage, cfg.seed, layout)
    test = read_jsonl(layout.test_file)
    assert len(test) >= len(BASES), "the sample data's test split shrank; update BASES"
    test = test[: len(BASES)]  # the answered prompts (the other test prompts have no answers yet)
    responses, judgments = [], []
    for i, row in enumerate(test):
        common = {
            "prompt_id": row["id"],
            "instruction": row["instruction"],
            "reference": row["response"],
            "category": row["category"],
            "generation": {"engine": "fixture", "k": 2},
            "finish_reason": "stop",
        }
        for sample in range(2):
            responses.append(
                {
                    **common,
                    "candidate": f"student answer {sample} to {row['id']}",
                    "sample_index": sample,
                    "model_id": "embedded:smollm2",
                }  # fmt: skip
            )
            for repeat, score in enumerate(student_repeats(i)):
                ok = not (i == 1 and sample == 1 and repeat == 2)
                judgments.append(
                    {
                        "prompt_id": row["id"],
                        "sample_index": sample,
                        "category": row["category"],
                        "judge": JUDGE,
                        "repeat": repeat,
                        "ok": ok,
                        "error": None if ok else "parse: no JSON",
                        "precision": score if ok else None,
                        "similarity": score if ok else None,
                        "rationale": f"repeat {repeat}: judged against the reference",
                    }  # fmt: skip
                )
            if demo_like:
                judgments += _judged(
                    {"prompt_id": row["id"], "sample_index": sample, "category": row["category"]},
                    [],
                    BASES[i],
                )
        if demo_like:
            continue
        responses.append(
            {
                **common,
                "candidate": f"baseline answer to {row['id']}",
                "sample_index": 0,
                "model": BASELINE,
                "model_id": "gpt-4o",
            }  # fmt: skip
        )
        for repeat in range(3):
            judgments.append(
                {
                    "prompt_id": row["id"],
                    "sample_index": 0,
                    "model": BASELINE,
                    "judge": JUDGE,
                    "repeat": repeat,
                    "ok": True,
                    "precision": 90,
                    "similarity": 88,
                }  # fmt: skip
            )
    write_jsonl(layout.responses_file(0), responses)
    write_jsonl(layout.judgments_file(0), judgments)
    if demo_like:
        _reference_rows(layout, test)
    return layout
