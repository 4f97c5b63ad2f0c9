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
        chain = [
            {"cycle": c, "rank": 8 * (c + 1)} for c in range(cycle + 1)
        ]  # as previous_merged stacks them
        write_json(layout.train_summary(cycle), {"rows": 38 * (cycle + 1), "rank_chain": chain})
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
    # the stacked LoRA ranks of each cycle's saved adapter, in the decision table and summary.json
    assert "| cycle | value | passed | adapter rank | reason |" in text and "| 24 (8 + 16) |" in text
    assert [row["adapter rank (effective)"] for row in read_json(layout.summary_json)["cycles"]] == [
        "8",
        "24 (8 + 16)",
    ]
    assert summary.table1_markdown(layout) == layout.table1_md(1).read_text()


def test_fig2_reads_itself_one_line_per_reference_metric_and_no_colliding_text(make_params, tmp_path):
    """Fig. 2: a column per judge, one line for a reference metric (precision = similarity), two for an LLM
    judge; the reference models and epsilon named in one legend below the panels; no two texts overlap."""
    import matplotlib.pyplot as plt

    from llamaduo_nb.evaluate.plots import text_overlaps

    cfg = load_config(make_params({"evaluate": {"bootstrap_samples": 50}}))
    ev: EvaluateConfig = cfg.evaluate
    layout = RunLayout(tmp_path / "run")

    def both(scores: dict[str, float]) -> list[dict]:
        llm = [
            {**j, "similarity": max(j["precision"] - 40, 1)} for j in _judgments(scores, "smollm2-service")
        ]
        return _judgments(scores) + llm

    for cycle, scores in {0: {"a": 30.0, "b": 50.0}, 1: {"a": 60.0, "b": 80.0}}.items():
        write_json(layout.metrics_file(cycle), evaluate.compute_metrics(both(scores), ev, cycle))
    references = {
        "base student": {"rougeL": {m: {"mean": 20.0, "c@50": 0.0} for m in ("precision", "similarity")}},
        "smollm2-service": {
            "rougeL": {m: {"mean": 21.0, "c@50": 1.0} for m in ("precision", "similarity")},
            "smollm2-service": {"precision": {"mean": 22.0}, "similarity": {"mean": 19.0}},
        },
    }
    fig = evaluate.plot_cycles(layout, ev.epsilon, references=references)
    try:
        assert [ax.get_title() for ax in fig.axes[:2]] == [
            "rougeL (reference metric)", "smollm2-service (LLM judge)",
        ]  # fmt: skip
        first_row = fig.axes[:2]
        assert len(first_row[0].get_lines()) < len(first_row[1].get_lines())  # one series against two
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == [
            "precision", "similarity", "base student (reference)", "smollm2-service (reference)", "epsilon 70",
        ]  # fmt: skip
        overlaps = text_overlaps(fig)
        assert overlaps == [], overlaps
    finally:
        plt.close(fig)


def test_parity_plot_is_a_dot_and_interval_plot_with_no_empty_series(tmp_path):
    """06's parity figure: only the (judge, metric, statistic) both sides have (a judge that did not judge the
    served answers is left out), one metric per reference metric, and no colliding text."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from llamaduo_nb.deploy.parity import parity_points, plot_parity
    from llamaduo_nb.evaluate.plots import text_overlaps

    comparison = [
        {"judge": judge, "metric": metric, "statistic": stat, "evaluated": 40.0, "evaluated_ci95": [30.0, 50.0],
         "served": 38.0 if served else None, "served_ci95": [28.0, 49.0] if served else None}
        for judge, served in (("smollm2-service", False), ("rougeL", True))
        for metric in ("precision", "similarity")
        for stat in ("mean", "c@50", "c@70")
    ]  # fmt: skip
    report = {"comparison": comparison, "cycle": 0, "qtype": "f16"}
    assert parity_points(report)["label"].tolist() == ["rougeL · V", "rougeL · C@50", "rougeL · C@70"]
    greedy = pd.DataFrame(
        [{"qtype": "f16", "prompt_id": "p", "exact_match": True, "transformers_chars": 9, "served_chars": 9,
          "prefix_chars": 9, "token_agreement": 1.0}]
    )  # fmt: skip
    fig = plot_parity(report, greedy, tmp_path / "parity.png")
    try:
        left = fig.axes[0]
        assert [t.get_text() for t in left.get_yticklabels()] == [
            "rougeL · V",
            "rougeL · C@50",
            "rougeL · C@70",
        ]
        assert [t.get_text() for t in left.get_legend().get_texts()] == ["cycle 0 (evaluated)", "served f16"]
        assert text_overlaps(fig) == []
    finally:
        plt.close(fig)
