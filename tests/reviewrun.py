"""A finished tiny run for the review tests: 01's real split of the sample data, then fixture answers and
judgments for cycle 0 (the student's K=2 samples and one service baseline answer, one judge with M=3).

Scores are chosen so filters can be checked by hand: the student's precision on test prompt i has the
mean BASES[i] (repeats BASES[i]-5, BASES[i], BASES[i]+5), except prompt 0 whose repeats spread widely.
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


def make_reviewed_run(root: Path) -> RunLayout:
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
    return layout
