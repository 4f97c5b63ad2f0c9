"""04_evaluate: judge prompt, judgment parsing, V / C@zeta with failures excluded, the epsilon decision,
and the notebook run against the embedded llama.cpp judge with M repeats per row in the call cache."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
from tinyrun import make_tiny_run

from llamaduo_nb import evaluate
from llamaduo_nb.callcache import CallCache
from llamaduo_nb.config import EvaluateConfig, dump_config, load_config
from llamaduo_nb.jsonio import DataFileError, read_json, read_jsonl, write_jsonl
from llamaduo_nb.prompts import TemplateError, load_template
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.runner import NOTEBOOKS_DIR, execute_notebook

# --------------------------------------------------------------------------- the judge prompt


def test_judge_template_puts_each_text_in_its_own_slot():
    template = evaluate.judge_template()
    assert template.placeholders == {
        "instruction",
        "reference_response",
        "candidate_response",
        "reply_format",
    }
    row = {"instruction": "INSTR-1", "reference": "REF-2", "candidate": "CAND-3 costs $5"}
    (message,) = evaluate.judge_messages(row, template)
    text = message["content"]
    assert "$" not in text.replace("$5", "")
    # the paper's Figure 5 repeats the human response in the model slot; ours shows each text once, in order
    assert text.count("REF-2") == 1 and text.count("CAND-3 costs $5") == 1
    assert text.index("INSTR-1") < text.index("REF-2") < text.index("CAND-3")
    assert "similarity" in text and "precision" in text and "rationale" not in text
    (asked,) = evaluate.judge_messages(row, template, rationale=True)
    assert '"rationale"' in asked["content"]


def test_template_rendering_is_strict_about_placeholders():
    template = evaluate.judge_template()
    with pytest.raises(TemplateError, match="candidate_response"):
        template.render(instruction="a", reference_response="b")
    with pytest.raises(TemplateError, match="extra_value"):
        template.render(
            instruction="a", reference_response="b", candidate_response="c", reply_format="f", extra_value="d"
        )


def test_template_files_comment_dollar_and_required_placeholders(tmp_path):
    (tmp_path / "t.md").write_text("<!-- for people: uses $name -->\nHello $name, that costs $$3.\n")
    template = load_template("t", prompts_dir=tmp_path)
    assert template.placeholders == {"name"}
    assert template.render(name="Ada") == "Hello Ada, that costs $3.\n"
    with pytest.raises(TemplateError, match="differ from the expected"):
        load_template("t", prompts_dir=tmp_path, required={"name", "topic"})
    (tmp_path / "bad.md").write_text("Price: $ 3 for $name\n")
    with pytest.raises(TemplateError, match="invalid placeholder"):
        load_template("bad", prompts_dir=tmp_path)
    with pytest.raises(TemplateError, match="not found"):
        load_template("missing", prompts_dir=tmp_path)


# --------------------------------------------------------------------------- parsing judgments


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"similarity": 70, "precision": 85}', {"similarity": 70.0, "precision": 85.0}),
        ('```json\n{"precision": 12, "similarity": 99}\n```', {"similarity": 99.0, "precision": 12.0}),
        (
            'Here you go: {"similarity": "40", "precision": "55/100"} Thanks!',
            {"similarity": 40.0, "precision": 55.0},
        ),
        # the paper's nested shape
        ('{"score": 61, "precision_assessment": {"score": 73}}', {"similarity": 61.0, "precision": 73.0}),
        ('{"Similarity_Score": 1, "Precision_Score": 100}', {"similarity": 1.0, "precision": 100.0}),
    ],
)
def test_parse_judgment_accepts_the_shapes_judges_return(reply, expected):
    assert evaluate.parse_judgment(reply) == expected


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        ('{"similarity": 0, "precision": 50}', "outside"),
        ('{"similarity": 50, "precision": 101}', "outside"),
        ('{"similarity": 50}', "missing"),
        ('{"similarity": true, "precision": 50}', "boolean"),
        ('{"similarity": "high", "precision": 50}', "not a number"),
        ("I think the answer is good.", "no JSON"),
        ("", "no JSON"),
    ],
)
def test_parse_judgment_rejects_what_is_not_a_valid_score(reply, problem):
    with pytest.raises(ValueError, match=problem):
        evaluate.parse_judgment(reply)


@dataclasses.dataclass
class _Reply:
    """The fields of services.ChatResult that judgment_record reads, for hand-made replies."""

    text: str
    parsed: object = None
    error: str | None = None
    cached: bool = False
    cache_key: str = "k"


def test_judgment_record_marks_failures_without_a_score():
    row = {"prompt_id": "p1", "sample_index": 0, "category": "qa"}
    ok = evaluate.judgment_record(row, "gpt", 0, _Reply('{"similarity": 80, "precision": 90}'))
    assert ok["ok"] and ok["similarity"] == 80 and ok["precision"] == 90 and ok["error"] is None
    bad_range = evaluate.judgment_record(row, "gpt", 1, _Reply('{"similarity": 0, "precision": 0}'))
    errored = evaluate.judgment_record(row, "gpt", 2, _Reply("", error="HTTP 429 RateLimitError: slow down"))
    for record, kind in ((bad_range, "range"), (errored, "request")):
        assert record["ok"] is False
        assert record["similarity"] is None and record["precision"] is None
        assert record["error"].startswith(kind)


def test_judgment_record_keeps_the_judges_rationale():
    row = {"prompt_id": "p1", "sample_index": 0, "category": "qa"}
    reply = '{"similarity": 80, "precision": 90, "rationale": "Names the right city."}'
    record = evaluate.judgment_record(row, "gpt", 0, _Reply(reply))
    assert record["ok"] and record["rationale"] == "Names the right city."
    plain = evaluate.judgment_record(row, "gpt", 0, _Reply('{"similarity": 80, "precision": 90}'))
    assert plain["ok"] and plain["rationale"] is None
    schema = evaluate.JUDGMENT_SCHEMA_RATIONALE
    assert schema["required"] == ["similarity", "precision", "rationale"]


# --------------------------------------------------------------------------- V and C@zeta


def _judgment(prompt_id, judge, repeat, similarity=None, precision=None, *, ok=True, sample=0, category="qa"):
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


def _hand_made() -> list[dict]:
    """Judge g: row a = (60,80),(40,60); row b = one failure + (90,90); row c = two failures (unscored).
    Judge h: every judgment succeeds."""
    return [
        _judgment("a", "g", 0, 60, 80),
        _judgment("a", "g", 1, 40, 60),
        _judgment("b", "g", 0, ok=False),
        _judgment("b", "g", 1, 90, 90),
        _judgment("c", "g", 0, ok=False, category="sum"),
        _judgment("c", "g", 1, ok=False, category="sum"),
        _judgment("a", "h", 0, 50, 50),
        _judgment("a", "h", 1, 70, 70),
        _judgment("b", "h", 0, 20, 30),
        _judgment("b", "h", 1, 20, 30),
        _judgment("c", "h", 0, 80, 75, category="sum"),
        _judgment("c", "h", 1, 80, 75, category="sum"),
    ]


def test_failures_are_excluded_not_scored_zero():
    per_judge = evaluate.summarize(_hand_made(), zetas=[50, 70], n_boot=200)
    g = per_judge["g"]
    # row means: a -> precision 70, similarity 50; b -> 90 / 90 (its failure is ignored); c -> unscored
    assert g["precision"]["mean"] == pytest.approx((70 + 90) / 2)
    assert g["similarity"]["mean"] == pytest.approx((50 + 90) / 2)
    assert g["precision"]["c@70"] == pytest.approx(100.0)
    assert g["similarity"]["c@70"] == pytest.approx(50.0)
    assert g["similarity"]["c@50"] == pytest.approx(100.0)
    assert g["precision"]["n_rows_scored"] == 2
    assert (g["n_rows"], g["rows_unscored"], g["failures"], g["judgments"]) == (3, 1, 3, 6)
    assert g["failure_rate"] == pytest.approx(0.5)
    assert g["failure_kinds"] == {"parse": 3}
    lo, hi = g["precision"]["mean_ci95"]
    assert 70 <= lo <= 80 <= hi <= 90

    h = per_judge["h"]
    assert h["precision"]["mean"] == pytest.approx((60 + 30 + 75) / 3)
    assert h["precision"]["c@70"] == pytest.approx(100 / 3)
    assert h["failures"] == 0 and h["rows_unscored"] == 0


def test_score_table_and_category_breakdown():
    table = evaluate.score_table(_hand_made())
    row_c = table[(table["judge"] == "g") & (table["prompt_id"] == "c")].iloc[0]
    assert row_c["n_ok"] == 0 and row_c["n_failed"] == 2
    assert row_c.isna()["precision"]
    by_category = evaluate.category_table(_hand_made(), [50, 70]).set_index(["judge", "category"])
    assert by_category.loc[("g", "sum"), "precision"] == "n/a"
    assert by_category.loc[("h", "sum"), "precision"] == "75.00 / 100% / 100%"


def test_all_failed_judge_gives_no_score_and_no_pass():
    judgments = [_judgment("a", "g", r, ok=False) for r in range(3)]
    metrics = evaluate.compute_metrics(judgments, EvaluateConfig(judges=["g"], m=3, epsilon=1), cycle=0)
    assert metrics["per_judge"]["g"]["precision"]["mean"] is None
    assert metrics["per_judge"]["g"]["failure_rate"] == 1.0
    assert metrics["decision"]["passed"] is False
    assert "no successful judgments" in metrics["decision"]["reason"]


# --------------------------------------------------------------------------- the epsilon decision


def _decide(**settings) -> dict:
    cfg = EvaluateConfig(**{"judges": ["g", "h"], "m": 2, **settings})
    return evaluate.decide(evaluate.summarize(_hand_made(), cfg.zetas, n_boot=0), cfg)


def test_decision_statistic_mean_vs_coverage():
    # precision means: g 80, h 55; precision C@70: g 100%, h 33.3%
    mean = _decide(epsilon=67.5, decision_statistic="mean")
    assert mean["value"] == pytest.approx(67.5) and mean["passed"] is True
    coverage = _decide(epsilon=67.0, decision_statistic="coverage@70")
    assert coverage["value"] == pytest.approx((100 + 100 / 3) / 2) and coverage["passed"] is False


def test_decision_judge_aggregation():
    assert _decide(epsilon=60, judge_aggregation="mean")["passed"] is True  # (80 + 55) / 2 = 67.5
    worst = _decide(epsilon=60, judge_aggregation="min")
    assert worst["value"] == pytest.approx(55) and worst["passed"] is False
    every = _decide(epsilon=55, judge_aggregation="all")
    assert every["passed"] is True and every["per_judge"]["h"]["passed"] is True
    assert _decide(epsilon=56, judge_aggregation="all")["passed"] is False


def test_decision_metric_both_needs_both_metrics():
    # similarity means: g 70, h 53.3; precision means: g 80, h 55
    both = _decide(epsilon=70, decision_metric="both", judge_aggregation="min")
    assert both["per_judge"]["g"]["value"] == pytest.approx(70)
    assert both["value"] == pytest.approx(160 / 3) and both["passed"] is False
    g_only = EvaluateConfig(judges=["g"], m=2, epsilon=70, decision_metric="both")
    assert evaluate.decide(evaluate.summarize(_hand_made(), [50, 70], n_boot=0), g_only)["passed"] is True
    g_sim = dataclasses.replace(g_only, epsilon=71)
    assert evaluate.decide(evaluate.summarize(_hand_made(), [50, 70], n_boot=0), g_sim)["passed"] is False


def test_a_judge_that_scored_too_few_rows_cannot_pass_the_model():
    # judge g scored 2 of its 3 rows (row c only failed); its precision mean is 80
    assert _decide(epsilon=50, min_scored_share=0.6, judges=["g"])["passed"] is True
    strict = _decide(epsilon=50, min_scored_share=0.7, judges=["g"])
    assert strict["passed"] is False and strict["value"] == pytest.approx(80)
    assert strict["reason"].startswith("refused") and "g scored 2/3 rows" in strict["reason"]
    assert strict["per_judge"]["g"]["scored_share"] == pytest.approx(2 / 3)


def test_results_table_uses_the_paper_format():
    cfg = EvaluateConfig(judges=["g", "h"], m=2)
    table = evaluate.results_table(evaluate.compute_metrics(_hand_made(), cfg, cycle=0, n_boot=0))
    assert table.loc["g", "precision (mean / C@50 / C@70)"] == "80.00 / 100% / 100%"
    assert table.loc["g", "failed judgments"] == "3/6 (50%)"
    assert table.loc["g", "rows scored"] == "2/3"


# --------------------------------------------------------------------------- bad input


def test_load_responses_names_file_row_and_field(tmp_path):
    good = {"prompt_id": "p", "instruction": "i", "reference": "r", "candidate": "c", "sample_index": 0}
    path = tmp_path / "responses.jsonl"
    write_jsonl(
        path, [good, {**good, "sample_index": 1}, {k: v for k, v in good.items() if k != "candidate"}]
    )
    with pytest.raises(DataFileError, match=r"row 3, field 'candidate'"):
        evaluate.load_responses(path)
    write_jsonl(path, [good, good])
    with pytest.raises(DataFileError, match=r"row 2.*duplicate"):
        evaluate.load_responses(path)


# --------------------------------------------------------------------------- the notebook, for real

M = 2
RESPONSES = [  # (prompt_id, sample_index, instruction, reference, candidate, category): tinyrun's TEST split
    ("test-0", 0, "What is the capital of Italy?", "Rome.", "The capital of Italy is Rome.", "Closed QA"),
    ("test-0", 1, "What is the capital of Italy?", "Rome.", "Milan.", "Closed QA"),
    ("test-1", 0, "Classify the sentiment: What a wonderful day!", "Positive", "Positive", "Classification"),
    ("test-1", 1, "Classify the sentiment: What a wonderful day!", "Positive", "Negative.", "Classification"),
]


def _tiny_run(root: Path) -> RunLayout:
    """tinyrun's folder (demo params: smollm2-service LLM judge, rougeL + exact_match, baseline smollm2-service, base student)
    with M = 2, pairwise comparison on, and this cycle's responses written as 03 would."""
    layout = make_tiny_run(root)
    cfg = load_config(layout.params_file)
    # no rationale: at 40 tokens a 135M judge's sentence of reasons ran past the budget in up to half of the
    # calls (sampled at 0.8), and the fail-fast window then stopped the stage at random (a flaky test, not a
    # bug: a judge whose replies are cut is a failing judge); the bare scores fit in 40 tokens
    ev = dataclasses.replace(
        cfg.evaluate,
        m=M,
        max_tokens=40,
        temperature=0.8,
        bootstrap_samples=200,
        pairwise=True,
        rationale=False,
    )
    dump_config(dataclasses.replace(cfg, evaluate=ev), layout.params_file)
    rows = [
        {
            "prompt_id": pid,
            "instruction": instruction,
            "reference": reference,
            "candidate": candidate,
            "sample_index": sample_index,
            "category": category,
            "model_id": "embedded:smollm2",
            "model_revision": None,
            "adapter": "adapter",
            "generation": {"temperature": 0.7},
        }
        for pid, sample_index, instruction, reference, candidate, category in RESPONSES
    ]
    write_jsonl(layout.responses_file(0), rows)
    return layout


def _recompute(judgments: list[dict], judge: str, metric: str, zetas: list[float]) -> dict:
    """V and C@zeta straight from the formulas, without evaluate's helpers."""
    per_row: dict[tuple, list[float]] = {}
    for j in judgments:
        if j["judge"] == judge:
            per_row.setdefault((j["prompt_id"], j["sample_index"]), [])
            if j["ok"]:
                per_row[(j["prompt_id"], j["sample_index"])].append(j[metric])
    means = [sum(v) / len(v) for v in per_row.values() if v]
    if not means:
        return {"mean": None}
    return {
        "mean": sum(means) / len(means),
        **{z: 100 * sum(m >= z for m in means) / len(means) for z in zetas},
    }


@pytest.mark.slow
def test_notebook_judges_each_row_m_times_and_metrics_match(tmp_path):
    layout = _tiny_run(tmp_path / "tiny")
    out = execute_notebook(
        NOTEBOOKS_DIR / "04_evaluate.ipynb",
        layout.notebook_out("04_evaluate", 0),
        {"run_dir": str(layout.root), "cycle": 0},
    )
    assert out.is_file() and layout.scores_plot(0).stat().st_size > 0
    for plot in (layout.models_scores_plot(0), layout.category_hist_plot(0), layout.cycles_fig2_plot):
        assert plot.stat().st_size > 0

    judgments = read_jsonl(layout.judgments_file(0))
    llm = [j for j in judgments if j["judge"] == "smollm2-service"]
    assert len(llm) == len(RESPONSES) * M
    assert len([j for j in judgments if j["judge"] == "rougeL"]) == len(RESPONSES)
    exact = {
        (j["prompt_id"], j["sample_index"]): j["precision"] for j in judgments if j["judge"] == "exact_match"
    }
    assert exact == {("test-1", 0): 100.0, ("test-1", 1): 1.0}
    for pid, sample_index, *_ in RESPONSES:
        repeats = [j["repeat"] for j in llm if (j["prompt_id"], j["sample_index"]) == (pid, sample_index)]
        assert sorted(repeats) == list(range(M))
    for j in judgments:
        assert j["ok"] == (j["error"] is None)
        assert (j["precision"] is None) == (not j["ok"])

    # M distinct cached calls per row: rebuild the requests, ask the pool for their keys, look them up
    from llamaduo_nb.services import ServicePool

    cfg = load_config(layout.params_file)
    rows = evaluate.load_responses(layout.responses_file(0))
    requests = evaluate.judge_requests(rows, cfg.evaluate, evaluate.judge_template())
    with ServicePool(cfg, layout, "test", providers=["smollm2-service"]) as pool:
        keys = [pool.cache_key("smollm2-service", request) for request in requests]
    assert len(set(keys)) == len(RESPONSES) * M
    assert {r.repeat for r in requests} == set(range(M))
    request_failed = {j["cache_key"] for j in llm if (j["error"] or "").startswith("request")}
    with CallCache(layout.calls_db) as cache:
        for key in keys:
            assert key in request_failed or cache.get(key) is not None
    assert {j["cache_key"] for j in llm} == set(keys)

    metrics = read_json(layout.metrics_file(0))
    local = metrics["per_judge"]["smollm2-service"]
    assert local["failures"] == sum(not j["ok"] for j in llm)
    assert local["failure_rate"] == pytest.approx(local["failures"] / len(llm))
    for metric in ("precision", "similarity"):
        expected = _recompute(judgments, "smollm2-service", metric, [50.0, 70.0])
        if expected["mean"] is None:
            assert local[metric]["mean"] is None
            continue
        assert local[metric]["mean"] == pytest.approx(expected["mean"])
        assert local[metric]["c@50"] == pytest.approx(expected[50.0])
        assert local[metric]["c@70"] == pytest.approx(expected[70.0])
        lo, hi = local[metric]["mean_ci95"]
        assert lo <= local[metric]["mean"] <= hi

    # the demo's decision rests on ROUGE-L alone
    decision = metrics["decision"]
    rouge = metrics["per_judge"]["rougeL"]["precision"]["mean"]
    assert decision["judges"] == ["rougeL"] and decision["value"] == pytest.approx(rouge)
    assert decision["passed"] is (rouge >= cfg.evaluate.epsilon)
    assert metrics["bootstrap"]["seed"] == cfg.evaluate.bootstrap_seed

    # Table 1: base student, this cycle, the embedded service baseline, P-Match; every judge a column
    table = layout.table1_md(0).read_text()
    for label in ("base student", "cycle 0", "| smollm2-service |", "P-Match"):
        assert label in table
    assert "smollm2-service precision" in table and "smollm2-service similarity" in table
    header = [cell.strip() for cell in table.split("\n\n")[1].splitlines()[0].strip("|").split("|")]
    for judge in ("rougeL", "exact_match"):  # a reference metric: one column (precision = similarity)
        assert judge in header and f"{judge} similarity" not in header
    long = pd.read_csv(layout.table1_csv(0))
    assert set(long["model"]) == {"base student", "cycle 0", "smollm2-service"}
    base = read_jsonl(layout.baseline_responses_file("base_student"))
    assert len(base) == len(RESPONSES) and all(r["adapter"] is None for r in base)
    # the base student answers through 03's engine (its sampler), not another one
    from llamaduo_nb.student import resolve_engine

    assert {r["generation"]["engine"] for r in base} == {resolve_engine(cfg.inference.engine)}
    if resolve_engine(cfg.inference.engine) == "llamacpp":  # its GGUF kept, the full-precision scratch gone
        base_dir = layout.baseline_dir("base_student")
        assert (base_dir / f"model-{cfg.inference.llamacpp_gguf}.gguf").is_file()
        assert not (base_dir / "model").exists() and not list(base_dir.glob("**/*.safetensors"))
    service = read_jsonl(layout.baseline_responses_file("smollm2-service"))
    assert [r["model_id"] for r in service] == ["service:smollm2-service"] * len(RESPONSES)
    assert read_json(layout.agreement_file(0))["krippendorff_alpha"]

    # pairwise: every answer against its reference, both orders, by the LLM judge only; the block and its plot
    pairwise = evaluate.load_pairwise(layout.pairwise_file(0))
    assert len(pairwise) == len(RESPONSES) * 2 and {p["judge"] for p in pairwise} == {"smollm2-service"}
    entry = metrics["pairwise"]["per_judge"]["smollm2-service"]
    assert entry["pairs"] + entry["failures"] == len(RESPONSES)
    assert entry["wins"] + entry["ties"] + entry["losses"] == entry["pairs"]
    assert layout.pairwise_plot(0).stat().st_size > 0

    # computed once per run: a later cycle reuses the reference rows without a pool or the student
    again = evaluate.reference_rows(cfg, layout, log=lambda msg: None)
    assert all(ref["reused"] for ref in again.values()) and list(again) == ["base_student", "smollm2-service"]
