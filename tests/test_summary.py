"""summary.md tells the run's story: per-cycle statistics with intervals and the decision's reason, the latest
Table 1 with P-Match, and Fig. 2 over cycles."""

from __future__ import annotations

from llamaduo_nb import evaluate, summary
from llamaduo_nb.config import EvaluateConfig, load_config
from llamaduo_nb.jsonio import read_json, write_json, write_jsonl
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.runner import RunState


def _judgments(scores: dict[str, float], judge: str = "rougeL") -> list[dict]:
    return [
        {"prompt_id": p, "sample_index": 0, "category": "qa", "judge": judge, "repeat": 0,
         "similarity": v, "precision": v, "ok": True, "error": None}
        for p, v in scores.items()
    ]  # fmt: skip


def test_summary_shows_cycles_with_intervals_table1_and_fig2(make_params, tmp_path):
    cfg = load_config(
        make_params({"evaluate": {"judges": [], "metric_judges": ["rougeL"], "bootstrap_samples": 200}})
    )
    ev: EvaluateConfig = cfg.evaluate
    layout = RunLayout(tmp_path / "run")
    cycles = {0: {"a": 30.0, "b": 50.0, "c": 40.0}, 1: {"a": 60.0, "b": 80.0, "c": 70.0}}
    for cycle, scores in cycles.items():
        judgments = _judgments(scores)
        write_jsonl(layout.judgments_file(cycle), judgments)
        write_json(layout.metrics_file(cycle), evaluate.compute_metrics(judgments, ev, cycle))
        write_json(layout.train_summary(cycle), {"rows": 38 * (cycle + 1)})
    models = {
        evaluate.BASE_MODEL: ("base", _judgments({"a": 10.0, "b": 20.0, "c": 30.0})),
        "cycle 0": ("local", _judgments(cycles[0])),
        "cycle 1": ("local", _judgments(cycles[1])),
        "local": ("service", _judgments({"a": 70.0, "b": 70.0, "c": 70.0})),
    }
    evaluate.write_table1(
        evaluate.table1_long(models, ev), ev.zetas, layout.table1_csv(1), layout.table1_md(1)
    )
    state = RunState(stop_reason="max_cycles=2 reached without meeting epsilon", timings={"total": 1.0})

    text = summary.write_summary(cfg, layout, state)

    assert "Decision rule: mean over judges ['rougeL'] of mean(precision) >= epsilon 70." in text
    assert "| 1 | 76 | rougeL | 70.00 / 100% / 67% [" in text  # cycle 1: V 70, C@50 100%, C@70 2 of 3 rows
    assert "| model | rougeL |" in text and "rougeL similarity" not in text  # a reference metric: one column
    assert "not passed: mean over ['rougeL'] of mean(precision) = 40.00" in text
    assert "## Table 1 (cycle 1)" in text and "| base student |" in text
    assert "| P-Match (best local / best service) | 100% / 100% / 67% |" in text
    assert layout.cycles_fig2_plot.stat().st_size > 0 and "fig2_cycles.png" in text
    assert read_json(layout.summary_json)["table1_cycle"] == 1
    assert summary.table1_markdown(layout) == layout.table1_md(1).read_text()
