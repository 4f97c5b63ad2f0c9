"""04's statistics on hand-made judgments: cluster-bootstrap intervals, the eq. 9 decision, Table 1 with
P-Match, agreement against scipy / krippendorff, and the reference-metric judges against sacrebleu and
rouge-score."""

from __future__ import annotations

import dataclasses

import krippendorff
import numpy as np
import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF
from scipy import stats as scipy_stats

from llamaduo_nb import evaluate
from llamaduo_nb.config import ConfigError, EvaluateConfig, load_config


def _j(prompt_id, judge, repeat, precision=None, similarity=None, *, ok=True, sample=0, category="qa"):
    similarity = precision if similarity is None else similarity
    return {
        "prompt_id": prompt_id,
        "sample_index": sample,
        "category": category,
        "judge": judge,
        "repeat": repeat,
        "similarity": similarity if ok else None,
        "precision": precision if ok else None,
        "ok": ok,
        "error": None if ok else "parse: no JSON object in the reply",
        "cached": False,
    }


# --------------------------------------------------------------------------- the cluster bootstrap


def test_cluster_bootstrap_moves_a_prompts_samples_together():
    # prompt A has two samples (60, 80), prompt B one (40). Drawing 2 prompts with replacement gives
    # AA (p=1/4): mean 70, C@70 50%;  AB or BA (p=1/2): mean (60+80+40)/3 = 60, C@70 1/3;  BB (p=1/4): 40, 0%.
    # The 2.5% and 97.5% quantiles of that distribution are its extremes.
    values, prompts = [60.0, 80.0, 40.0], ["A", "A", "B"]
    assert evaluate.cluster_bootstrap(values, prompts, n_boot=4000, seed=3) == (40.0, 70.0)
    assert evaluate.cluster_bootstrap(values, prompts, 70, n_boot=4000, seed=3) == (0.0, 50.0)
    # rows treated as independent: three draws of 80 (p = 1/27 > 2.5%) make a mean of 80, impossible
    # when A's samples move together
    assert evaluate.bootstrap_ci(values, n_boot=4000, seed=3) == (40.0, 80.0)
    # the interval is reproducible from its seed
    assert evaluate.cluster_bootstrap(values, prompts, n_boot=300, seed=9) == evaluate.cluster_bootstrap(
        values, prompts, n_boot=300, seed=9
    )
    assert evaluate.cluster_bootstrap([], [], n_boot=100) is None
    assert evaluate.cluster_bootstrap(values, prompts, n_boot=0) is None


def test_summaries_carry_an_interval_for_every_statistic_and_record_the_seed():
    judgments = [_j("A", "g", 0, 60, sample=0), _j("A", "g", 0, 80, sample=1), _j("B", "g", 0, 40)]
    cfg = EvaluateConfig(judges=["g"], m=1, bootstrap_samples=4000, bootstrap_seed=3)
    metrics = evaluate.compute_metrics(judgments, cfg, cycle=0)
    precision = metrics["per_judge"]["g"]["precision"]
    assert precision["mean"] == pytest.approx(60.0)
    assert precision["mean_ci95"] == [40.0, 70.0]
    assert precision["c@70_ci95"] == [0.0, 50.0]
    assert precision["c@50_ci95"] is not None
    assert precision["n_prompts_scored"] == 2
    assert metrics["bootstrap"]["seed"] == 3 and metrics["bootstrap"]["samples"] == 4000


# --------------------------------------------------------------------------- the decision (eq. 9)


def _fixture() -> list[dict]:
    """Judge g (precision): a -> 70 (repeats 80, 60), b -> 90 (one failure), c -> unscored (2 failures).
    Judge h (precision): a -> 60, b -> 30, c -> 75. So g: V 80, C@50 100%, C@70 100%, 2/3 rows scored;
    h: V 55, C@50 66.7%, C@70 33.3%, 3/3 rows scored."""
    return [
        _j("a", "g", 0, 80),
        _j("a", "g", 1, 60),
        _j("b", "g", 0, ok=False),
        _j("b", "g", 1, 90),
        _j("c", "g", 0, ok=False),
        _j("c", "g", 1, ok=False),
        _j("a", "h", 0, 50),
        _j("a", "h", 1, 70),
        _j("b", "h", 0, 30),
        _j("b", "h", 1, 30),
        _j("c", "h", 0, 75),
        _j("c", "h", 1, 75),
    ]


def _decide(**settings) -> dict:
    cfg = EvaluateConfig(**{"judges": ["g", "h"], "m": 2, "bootstrap_samples": 500, **settings})
    return evaluate.compute_metrics(_fixture(), cfg, cycle=0)["decision"]


def test_eq9_passes_only_when_v_and_coverage_both_reach_epsilon():
    both = {"decision_judges": ["h"], "decision_statistic": ["mean", "coverage@50"]}
    assert _decide(epsilon=55, **both)["passed"] is True  # V 55, C@50 66.7
    missed_v = _decide(epsilon=60, **both)
    assert missed_v["passed"] is False and missed_v["value"] == pytest.approx(55)
    assert [c["passed"] for c in missed_v["checks"]] == [False, True]
    c70 = {"decision_judges": ["h"], "decision_statistic": ["mean", "coverage@70"]}
    assert _decide(epsilon=30, **c70)["passed"] is True  # V 55, C@70 33.3
    missed_c = _decide(epsilon=40, **c70)
    assert missed_c["passed"] is False and "coverage@70(precision) = 33.33" in missed_c["reason"]
    # the single-statistic rule still reads as before: V 55 >= 50 passes although C@70 is 33%
    assert _decide(epsilon=50, decision_judges=["h"], decision_statistic="mean")["passed"] is True


def test_judge_aggregation_mean_strictest_each_and_old_names():
    eq9 = {"decision_statistic": ["mean", "coverage@50"], "min_scored_share": 0.6}
    # mean over g and h: V (80+55)/2 = 67.5, C@50 (100+66.7)/2 = 83.3
    assert _decide(epsilon=67, judge_aggregation="mean", **eq9)["passed"] is True
    strictest = _decide(epsilon=60, judge_aggregation="strictest", **eq9)
    assert strictest["passed"] is False and strictest["value"] == pytest.approx(55)
    assert _decide(epsilon=55, judge_aggregation="each", **eq9)["passed"] is True
    assert _decide(epsilon=56, judge_aggregation="each", **eq9)["passed"] is False
    assert _decide(epsilon=60, judge_aggregation="min", **eq9)["aggregation"] == "strictest"
    assert _decide(epsilon=56, judge_aggregation="all", **eq9)["passed"] is False


def test_requiring_the_lower_bound_is_stricter_than_the_point_estimate():
    point = _decide(epsilon=52, decision_judges=["h"])
    bound = _decide(epsilon=52, decision_judges=["h"], require_lower_bound=True)
    assert point["passed"] is True and point["value"] == pytest.approx(55)
    assert bound["passed"] is False and bound["value"] < 52 and "lower bounds" in bound["reason"]


def test_decision_on_a_minority_of_scored_rows_is_refused_with_the_reason():
    refused = _decide(epsilon=50, decision_judges=["g"], min_scored_share=0.7)
    assert refused["passed"] is False and refused["refused"] is True
    assert "refused" in refused["reason"] and "g scored 2/3 rows" in refused["reason"]
    assert _decide(epsilon=50, decision_judges=["g"], min_scored_share=0.6)["passed"] is True
    nothing = evaluate.compute_metrics(
        [_j("a", "g", 0, ok=False)], EvaluateConfig(judges=["g"], m=1, epsilon=1), cycle=0
    )["decision"]
    assert nothing["passed"] is False and "no successful judgments" in nothing["reason"]


def test_decision_params_read_naturally_and_reject_bad_values(make_params):
    cfg = load_config(
        make_params(
            {"evaluate": {"decision_statistic": ["mean", "coverage@50"], "judge_aggregation": "each"}}
        )
    ).evaluate
    assert cfg.decision_statistics == ["mean", "coverage@50"] and cfg.aggregation == "each"
    bad = [
        ({"decision_statistic": ["mean", "coverage@60"]}, "zeta 60 must be listed in zetas"),
        ({"decision_statistic": "median"}, "coverage@70"),
        ({"metric_judges": ["bleu"]}, "not a reference metric"),
        ({"decision_judges": ["gpt4o"]}, "neither in judges"),
        ({"baselines": ["gpt4o"]}, "evaluate.baselines"),
        ({"judge_aggregation": "median"}, "strictest"),
    ]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=message) as info:
            load_config(make_params({"evaluate": extra}))
        assert "A valid example" in str(info.value)
    with pytest.raises(ConfigError, match="reserved for a reference-metric judge"):
        load_config(make_params({"providers": [{"name": "rougeL", "kind": "embedded", "model": "x"}]}))


# --------------------------------------------------------------------------- Table 1 and P-Match


def test_table1_layout_and_p_match_from_judgments():
    def model(scores: list[tuple[str, int, float]]) -> list[dict]:
        return [_j(p, "g", 0, v, sample=s) for p, s, v in scores]

    models = {
        evaluate.BASE_MODEL: ("base", model([("p1", 0, 20), ("p1", 1, 40), ("p2", 0, 60), ("p2", 1, 40)])),
        "cycle 0": ("local", model([("p1", 0, 50), ("p1", 1, 70), ("p2", 0, 60), ("p2", 1, 60)])),
        "gpt": ("service", model([("p1", 0, 80), ("p1", 1, 80), ("p2", 0, 80), ("p2", 1, 40)])),
    }
    cfg = EvaluateConfig(judges=["g"], m=1, bootstrap_samples=200)
    long = evaluate.table1_long(models, cfg)
    assert len(long) == 3 * 2 * 3  # models x metrics x (mean, C@50, C@70)
    wide = evaluate.table1(long, cfg.zetas)
    assert list(wide.index) == [evaluate.BASE_MODEL, "cycle 0", "gpt", "P-Match (best local / best service)"]
    assert list(wide.columns) == ["g precision (mean / C@50 / C@70)", "g similarity (mean / C@50 / C@70)"]
    base = wide.loc[evaluate.BASE_MODEL, "g precision (mean / C@50 / C@70)"]
    assert base.startswith("40.00 / 25% / 0% (n=4/4) [")
    # best local mean is cycle 0's 60 against gpt's 70; C@50: 100% vs 75%; C@70: 25% vs 75%
    assert wide.iloc[-1, 0] == "86% / 133% / 33%"
    match = evaluate.p_match(long).set_index(["metric", "statistic"])
    assert match.loc[("precision", "mean"), "best_local_model"] == "cycle 0"
    assert match.loc[("precision", "mean"), "p_match"] == pytest.approx(100 * 60 / 70)
    md = evaluate.markdown_table(wide)
    assert md.splitlines()[0].startswith("| model | g precision") and "P-Match" in md


# --------------------------------------------------------------------------- agreement


def _three_judges() -> list[dict]:
    scores = {
        "g": [10, 40, 35, 80, 90, 55],
        "h": [20, 30, 50, 70, 95, 60],
        "rougeL": [5, 50, 20, 60, 70, None],  # could not score the last row
    }
    out = []
    for judge, values in scores.items():
        for row, value in enumerate(values):
            out.append(_j(f"p{row}", judge, 0, value, ok=value is not None))
    return out


def test_between_judge_agreement_matches_scipy_and_krippendorff():
    judgments = _three_judges()
    pairs = evaluate.judge_pairs(judgments).set_index(["metric", "judge_a", "judge_b"])
    g, h, r = [10, 40, 35, 80, 90, 55], [20, 30, 50, 70, 95, 60], [5, 50, 20, 60, 70]
    gh = pairs.loc[("precision", "g", "h")]
    assert gh["rows"] == 6
    assert gh["spearman"] == pytest.approx(scipy_stats.spearmanr(g, h).statistic)
    assert gh["kendall"] == pytest.approx(scipy_stats.kendalltau(g, h).statistic)
    gr = pairs.loc[("precision", "g", "rougeL")]
    assert gr["rows"] == 5 and gr["spearman"] == pytest.approx(scipy_stats.spearmanr(g[:5], r).statistic)
    alpha = evaluate.krippendorff_alpha(judgments).set_index("metric").loc["precision"]
    expected = krippendorff.alpha(reliability_data=[g, h, [*r, np.nan]], level_of_measurement="interval")
    assert alpha["alpha"] == pytest.approx(expected) and alpha["units"] == 6
    same = [_j(f"p{i}", judge, 0, v) for judge in ("a", "b") for i, v in enumerate([10, 50, 90])]
    assert evaluate.krippendorff_alpha(same)["alpha"].tolist() == pytest.approx([1.0, 1.0])


def test_repeat_spread_shows_whether_m_is_large_enough():
    judgments = [_j("a", "g", 0, 40), _j("a", "g", 1, 60), _j("b", "g", 0, 30), _j("b", "g", 1, 70)]
    judgments += [_j("c", "g", 0, 50), _j("c", "g", 1, ok=False)]  # one success: no spread to measure
    judgments += [_j(p, "rougeL", 0, 30) for p in "abc"]  # M = 1 by nature: no line at all
    table = evaluate.repeat_spread(judgments)
    assert set(table["judge"]) == {"g"}
    spread = table.set_index(["judge", "metric"]).loc[("g", "precision")]
    assert spread["rows"] == 2
    assert spread["sd_mean"] == pytest.approx((10 + 20) / 2)  # population SDs of (40, 60) and (30, 70)
    assert spread["wide_share"] == pytest.approx(0.5)  # only b differs by more than 20 points
    report = evaluate.agreement_report(judgments)
    assert set(report) >= {"repeat_spread", "judge_pairs", "krippendorff_alpha"}


# --------------------------------------------------------------------------- reference-metric judges

ROWS = [
    ("s1", "The meeting is on Friday.", "The meeting moved to Friday.", "Summarization"),
    ("s2", "Paris.", "The capital of France is Paris.", "Closed QA"),
    ("c1", "Negative. The reviewer is unhappy.", "negative: the delivery was late", "Classification"),
    ("c2", "Spam. It promises a prize.", "This is not spam.", "Classification"),
    ("c3", "Business. The story is about rates.", "Business", "Classification"),
]


def _rows() -> list[dict]:
    return [
        {"prompt_id": pid, "sample_index": 0, "reference": ref, "candidate": cand, "category": cat}
        for pid, ref, cand, cat in ROWS
    ]


def test_rouge_l_and_chrf_judges_match_rouge_score_and_sacrebleu():
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    chrf = CHRF()
    rouge = evaluate.metric_judgments("rougeL", _rows())
    chrfs = evaluate.metric_judgments("chrF", _rows())
    for row, r, c in zip(_rows(), rouge, chrfs, strict=True):
        f1 = scorer.score(row["reference"], row["candidate"])["rougeL"].fmeasure
        assert r["similarity"] == pytest.approx(1 + 99 * f1) and r["precision"] == r["similarity"]
        expected = chrf.sentence_score(row["candidate"], [row["reference"]]).score
        assert c["similarity"] == pytest.approx(1 + 0.99 * expected)
        assert r["ok"] and r["repeat"] == 0 and 1 <= c["similarity"] <= 100


def test_exact_match_scores_labels_of_classification_rows_only():
    judged = evaluate.metric_judgments("exact_match", _rows(), label_categories=["Classification"])
    assert {j["prompt_id"]: j["precision"] for j in judged} == {"c1": 100.0, "c2": 1.0, "c3": 100.0}
    assert evaluate.reference_label("Negative. The reviewer is unhappy.") == ["negative"]
    assert evaluate.reference_label("A long answer with many words in it.") == [
        "a", "long", "answer", "with", "many", "words", "in", "it",
    ]  # fmt: skip


def test_metric_judges_need_no_service_and_count_failed_answers():
    cfg = EvaluateConfig(metric_judges=["rougeL", "exact_match"], m=5)
    rows = _rows()
    rows[0] = {**rows[0], "candidate": "", "error": "HTTP 500"}
    judgments = evaluate.judge_rows(None, rows, cfg)
    rouge = [j for j in judgments if j["judge"] == "rougeL"]
    assert len(rouge) == len(rows)  # M = 1 by nature, whatever cfg.m says
    failed = [j for j in rouge if not j["ok"]]
    assert [j["prompt_id"] for j in failed] == ["s1"] and failed[0]["error"].startswith("answer:")
    metrics = evaluate.compute_metrics(judgments, dataclasses.replace(cfg, epsilon=1.0), cycle=0)
    assert metrics["per_judge"]["rougeL"]["rows_unscored"] == 1
    assert metrics["per_judge"]["exact_match"]["n_rows"] == 3
    assert metrics["decision"]["passed"] is True
