"""Review and curation views without a browser: decisions persist at once, 01 applies them, filters are right,
callback errors show inside the widget, and a notebook opened from notebooks/ resolves paths from the root."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from reviewrun import BASELINE, BASES, JUDGE, make_reviewed_run

from llamaduo_nb import evaluate, review
from llamaduo_nb.config import CoverageConfig, load_config
from llamaduo_nb.coverage import (
    describe_left,
    import_coverage,
    load_decisions,
    run_coverage,
    split_of,
    split_table,
)
from llamaduo_nb.jsonio import read_jsonl, write_jsonl
from llamaduo_nb.notebook import Stage, resolve_project_paths
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.runner import PROJECT_ROOT, execute_notebook
from llamaduo_nb.ui import ALL, CurationView, ReviewView


@pytest.fixture
def run(tmp_path) -> RunLayout:
    return make_reviewed_run(tmp_path / "outputs" / "reviewed")


def test_review_items_show_every_candidate_with_repeat_spread_and_rationale(run):
    items = review.load_items(run, 0)
    assert len(items) == len(BASES)
    first = items[0]
    assert [(c.model, c.sample_index) for c in first.candidates] == [
        ("student", 0),
        ("student", 1),
        (BASELINE, 0),
    ]
    wide = first.candidates[0].scores[JUDGE]["precision"]
    assert (wide.mean, wide.range, wide.scores) == (20.0, 30.0, (5.0, 20.0, 35.0))
    assert first.candidates[2].score("precision") == 90.0
    assert first.candidates[0].rationales[JUDGE][0] == "repeat 0: judged against the reference"
    failed = items[1].candidates[1].scores[JUDGE]["precision"]
    assert failed.failures == 1 and len(failed.scores) == 2
    html = review.render_item(first, {"bad_reference": True}, None, 70.0)
    assert "reference marked bad" in html and "repeat 0: judged" in html and BASELINE in html


def test_review_filters_by_zeta_disagreement_model_category_and_text(run):
    items = review.load_items(run, 0)
    # 01 splits the sample data into 6 test prompts per category, sorted by id; reviewrun answers the first
    # eight: 6 Classification and 2 Coding prompts, student means BASES = 20 35 50 65 75 85 95 45
    assert [(i.prompt_id, i.category) for i in items] == [
        *((f"cov-cls-0{n}", "Classification") for n in (11, 12, 14, 16, 19, 20)),
        ("cov-code-007", "Coding"),
        ("cov-code-011", "Coding"),
    ]
    below = review.filter_items(items, below=70.0, model="student")
    assert [i.prompt_id for i in below] == [
        "cov-cls-011",
        "cov-cls-012",
        "cov-cls-014",
        "cov-cls-016",
        "cov-code-011",
    ]
    # the baseline scores 90 everywhere: nothing of it is below ζ
    assert review.filter_items(items, below=70.0, model=BASELINE) == []
    assert [i.prompt_id for i in review.filter_items(items, disagreement=20.0)] == [items[0].prompt_id]
    assert [i.prompt_id for i in review.filter_items(items, category="Coding")] == [
        "cov-code-007",
        "cov-code-011",
    ]
    assert len(review.filter_items(items, category="Classification")) == 6
    assert review.filter_items(items, category="Summarization") == []  # not answered in this fixture
    assert [i.prompt_id for i in review.filter_items(items, query=items[5].prompt_id.upper())] == [
        items[5].prompt_id
    ]


def test_review_shows_the_base_student_and_baselines_that_04_stored_for_the_run(run):
    """04 answers and judges the reference rows once per run, under <run>/baselines/<model>/."""
    first, second = (row["id"] for row in read_jsonl(run.test_file)[:2])
    base = [
        {"prompt_id": pid, "candidate": f"untuned answer {k} to {pid}", "sample_index": k}
        for pid in (first, second)
        for k in range(2)
    ]
    write_jsonl(run.baseline_responses_file("base_student"), base)
    write_jsonl(
        run.baseline_judgments_file("base_student"),
        [
            {**row, "judge": JUDGE, "repeat": r, "ok": True, "precision": score, "similarity": score}
            for row, score in zip(base, [10, 30, 40, 60], strict=True)
            for r in range(3)
        ],
    )
    write_jsonl(
        run.baseline_responses_file("claude"), [{"prompt_id": first, "candidate": "a service answer"}]
    )
    write_jsonl(
        run.baseline_judgments_file("claude"),
        [{"prompt_id": first, "judge": JUDGE, "ok": True, "precision": 80, "similarity": 75}],
    )

    items = {item.prompt_id: item for item in review.load_items(run, 0)}
    assert len(items) == len(BASES)  # the reference rows add answers, not prompts
    shown = [(c.model, c.sample_index, c.text) for c in items[first].candidates]
    assert shown == [
        ("student", 0, f"student answer 0 to {first}"),
        ("student", 1, f"student answer 1 to {first}"),
        ("base student", 0, f"untuned answer 0 to {first}"),
        ("base student", 1, f"untuned answer 1 to {first}"),
        ("claude", 0, "a service answer"),
        (BASELINE, 0, f"baseline answer to {first}"),
    ]
    assert items[first].score("precision", "base student") == 20.0  # (10 + 30) / 2
    assert items[second].score("precision", "base student") == 50.0  # (40 + 60) / 2
    assert items[first].score("precision", "claude") == 80.0
    assert items[first].score("precision") == 20.0  # the student's own score is unchanged
    assert items[second].models() == ["student", "base student", BASELINE]
    # the untuned student is below ζ on both prompts; the service model on neither
    assert [
        i.prompt_id for i in review.filter_items(list(items.values()), below=70.0, model="base student")
    ] == [
        first,
        second,
    ]
    assert review.filter_items(list(items.values()), below=70.0, model="claude") == []
    html = review.render_item(items[first])
    assert "base student" in html and "untuned answer 1" in html and "a service answer" in html


def test_04_leaves_a_prompt_marked_ambiguous_out_of_the_decision(run):
    """Student precision per answer, 8 prompts x K=2 (reviewrun.BASES; prompt 0 averages 20, prompt 1's
    second sample 32.5 after its failed repeat): V = 937.5 / 16 = 58.6 < ε 60. Without prompt 0 it is
    897.5 / 14 = 64.1, so marking prompt 0 ambiguous passes the cycle."""
    cfg = resolve_project_paths(load_config(run.params_file))
    cfg = replace(cfg, evaluate=replace(cfg.evaluate, decision_judges=[JUDGE], epsilon=60.0))
    stage = Stage("04_evaluate", cfg, run, 0)
    student = [j for j in read_jsonl(run.judgments_file(0)) if "model" not in j]
    ambiguous = read_jsonl(run.test_file)[0]["id"]

    metrics = evaluate.write_metrics(stage, student)
    assert metrics["ambiguous_excluded"] == {"prompts": 0, "prompt_ids": []}
    judge = metrics["per_judge"][JUDGE]
    assert (judge["n_rows"], judge["judgments"]) == (16, 48)
    assert judge["precision"]["mean"] == pytest.approx(937.5 / 16)
    assert metrics["decision"]["passed"] is False

    review.record_decision(run.review_file, ambiguous, cycle=0, ambiguous=True)
    metrics = evaluate.write_metrics(stage, student)
    assert metrics["ambiguous_excluded"] == {"prompts": 1, "prompt_ids": [ambiguous]}
    judge = metrics["per_judge"][JUDGE]
    assert (judge["n_rows"], judge["judgments"]) == (14, 42)
    assert judge["precision"]["mean"] == pytest.approx(897.5 / 14)
    assert metrics["decision"]["passed"] is True
    assert "1 prompt(s) marked ambiguous in review were left out" in metrics["decision"]["reason"]
    assert json.loads(run.metrics_file(0).read_text()) == json.loads(json.dumps(metrics))


def test_review_grid_chips_filters_and_sort_follow_the_chosen_judge():
    """Two judges: a reference metric (precision = similarity, M = 1) that decides, and an LLM judge (M = 2)
    that scores everything high. Filters and colours follow the chosen judge; the other is one click away."""
    responses, judgments = [], []
    for pid, label, metric in (("p1", "Negative", 100), ("p2", "Positive", 1), ("p3", "Neutral", 40)):
        common = {"prompt_id": pid, "instruction": "Label it:\n```python\nx = 1\n```", "reference": label}
        for model in (None, "base student", "smollm2-service"):
            extra = {"model": model} if model else {}
            responses += [{**common, **extra, "candidate": "Negative", "sample_index": k} for k in (0, 1)]
            for k in (0, 1):
                row = {"prompt_id": pid, "sample_index": k, "ok": True, **extra}
                judgments.append({**row, "judge": "rougeL", "precision": metric, "similarity": metric})
                judgments += [
                    {**row, "judge": "llm", "repeat": r, "precision": 90 + r, "similarity": 80, "rationale": "ok"}
                    for r in (0, 1)
                ]  # fmt: skip
    items = review.build_items(responses, judgments, cycle=0)
    decide = ["rougeL"]
    below = review.filter_items(items, below=70.0, judges=decide)
    assert [i.prompt_id for i in below] == ["p2", "p3"]
    assert review.filter_items(items, below=70.0, judges=["llm"]) == []
    assert review.filter_items(items, below=70.0) == items[1:]  # every judge: (1 or 40 + 90.5) / 2
    # disagreement: the chosen judge against the others (the LLM judge's repeats spread by 1)
    assert [i.prompt_id for i in review.filter_items(items, disagreement=20.0, judges=decide)] == ["p2", "p3"]
    assert [i.prompt_id for i in review.filter_items(items, judges=decide, sort="score")] == [
        "p2",
        "p3",
        "p1",
    ]
    assert [i.prompt_id for i in review.filter_items(items, judges=decide, sort="disagreement ↓")] == [
        "p2", "p3", "p1",
    ]  # fmt: skip
    html = review.render_item(items[2], None, None, 70.0, decide)
    # one column per model, one row per sample: 3 header cells then 6 answers
    assert html.count("class='ld-col'") == 3 and html.count("class='llamaduo-candidate") == 6
    assert html.count("llamaduo-chip ld-low' data-judge='rougeL'") == 6  # coloured against ζ
    assert "rougeL <b>40</b></span>" in html  # a reference metric: one score, no spread (M = 1)
    assert "llm P <b>90</b> S <b>80</b> ±1" in html  # an LLM judge with M = 2: both metrics and the spread
    assert html.count("+1 other judge</summary>") == 6  # the LLM judge one click away, its rationale folded
    assert "<details class='ld-why'>" in html and "“ok”" in html
    assert "<mark class='ld-diff'" in html  # "Negative" against the reference "Neutral"
    assert "<pre><code>" in html and "```" not in html  # code is rendered, not shown as raw fences
    assert "<b>x</b>" not in review.render_markdown("<b>x</b>")  # raw HTML is escaped


def test_loader_tolerates_extra_fields_foreign_rows_and_an_unjudged_cycle(tmp_path):
    responses = [
        {
            "prompt_id": "p1",
            "instruction": "q",
            "reference": "r",
            "candidate": "a",
            "sample_index": 0,
            "extra": 1,
        },
        {"prompt_id": "p1", "candidate": "b", "sample_index": 0, "model": "claude"},
        {"candidate": "row without a prompt id"},
    ]
    judgments = [
        {"prompt_id": "p1", "sample_index": 0, "judge": "j", "ok": True, "precision": 40, "similarity": 50},
        {
            "prompt_id": "p1",
            "sample_index": 0,
            "model": "claude",
            "judge": "j",
            "ok": True,
            "precision": 80,
            "similarity": 70,
            "rationale": "  complete  ",
        },  # fmt: skip
        {
            "prompt_id": "unknown",
            "sample_index": 0,
            "judge": "j",
            "ok": True,
            "precision": 1,
            "similarity": 1,
        },
    ]
    (item,) = review.build_items(responses, judgments, cycle=3)
    assert item.models() == ["student", "claude"]
    assert item.score("precision") == 40.0 and item.score("precision", "claude") == 80.0
    assert item.candidates[1].rationales == {"j": ["complete"]}
    unjudged = review.build_items(responses, [], cycle=0)[0]
    assert "not judged yet" in review.render_item(unjudged)


def test_review_decisions_persist_at_once_and_01_applies_them(run):
    view = ReviewView(run, 0, zeta=70.0)
    assert len(view.visible) == len(BASES)
    view.below_box.value = True
    view.model_box.value = "student"
    assert len(view.visible) == sum(b < 70 for b in BASES)
    dropped = view.item.prompt_id
    view.bad_button.value = True  # saved at once
    assert review.load_review(run.review_file)[dropped]["bad_reference"] is True
    view.on_key({"type": "keydown", "key": "j"})
    edited = view.item.prompt_id
    view.reference_edit.value = "A corrected reference."
    view.save_reference_button.click()
    view.on_key({"type": "keydown", "key": "a"})
    view.note.value = "the prompt asks two things"
    view.save_note_button.click()
    view.next_button.click()
    unflagged = view.item.prompt_id
    view.bad_button.value = True
    view.bad_button.value = False  # un-flagging removes the entry

    saved = review.load_review(run.review_file)
    assert set(saved) == {dropped, edited}
    assert saved[edited] | {"updated": None} == {
        "bad_reference": True, "reference_edit": "A corrected reference.", "ambiguous": True,
        "note": "the prompt asks two things", "cycle": 0, "updated": None,
    }  # fmt: skip
    assert review.ambiguous_prompt_ids(run) == {edited}
    assert "2 bad references (1 corrected), 1 ambiguous" in view.counts.value
    assert unflagged not in saved

    before = {r["id"]: r for r in read_jsonl(run.test_file)}
    cfg = resolve_project_paths(load_config(run.params_file))
    result = run_coverage(cfg.coverage, cfg.seed, run)
    after = {r["id"]: r for r in read_jsonl(run.test_file)}
    assert set(after) == set(before) - {dropped}
    assert after[edited]["response"] == "A corrected reference." and after[edited]["reviewed"] is True
    assert all(after[i] == before[i] for i in after if i != edited)  # no other row moved or changed
    assert result.report["review"] == {"references_dropped": 1, "references_edited": 1, "ambiguous": 1}

    # 01's curation view and split counts show what the review did, and which cycle's review it was
    assert result.reviewed[dropped] == {
        "state": "dropped", "split": "test", "category": before[dropped]["category"], "cycle": 0,
        "reason": "reference marked bad in cycle 0's review",
    }  # fmt: skip
    assert result.reviewed[edited]["state"] == "corrected"
    assert result.report["left_by_category"]["dropped by review"] == {before[dropped]["category"]: 1}
    table = split_table(result)
    assert table["left: dropped by review"].sum() == 1 and "left: rejected in curation" not in table
    assert "1 dropped by review" in describe_left(result) and "review of cycle 0" in describe_left(result)
    curation = CurationView(
        import_coverage(cfg.coverage).rows, split_of(result), run.curation_file, reviewed=result.reviewed
    )
    assert curation.left.value.endswith(
        "1 dropped by review, 1 corrected by review (review of cycle 0)</span>"
    )
    curation.state_box.value = "dropped by review"
    assert [curation.row["id"]] == [curation.rows[i]["id"] for i in curation.visible] == [dropped]
    assert "dropped by review" in curation.header.value and "cycle 0" in curation.header.value
    assert curation.split.value == "test" and curation.split.disabled
    curation.state_box.value = "corrected by review"
    assert curation.row["id"] == edited and "reference corrected in cycle 0" in curation.header.value


def test_a_failing_callback_shows_its_error_inside_the_view(run):
    view = ReviewView(run, 0)
    run.review_file.mkdir()  # the decisions file cannot be written now
    view.bad_button.value = True
    assert "error" in view.status.value
    assert any("Error" in o.get("text", "") for o in view.errors.outputs)
    view.next_button.click()  # the view stays usable
    assert view.position == 1


def test_curation_view_filters_searches_and_warns_before_losing_an_edit(tmp_path):
    cfg = CoverageConfig(source=str(PROJECT_ROOT / "data" / "sample_coverage.jsonl"))
    layout = RunLayout(tmp_path / "run")
    result = run_coverage(cfg, 42, layout)
    rows = import_coverage(cfg).rows
    view = CurationView(rows, split_of(result), layout.curation_file)
    category = rows[0]["category"]
    view.category.value = category
    assert {view.rows[i]["category"] for i in view.visible} == {category}
    assert view.category.options[0] == ALL
    assert len(view.visible) == 24  # the sample data holds 24 prompts of each of its 4 categories
    # every summarization prompt opens with the same request; one names the dog Biscuit (case ignored)
    view.category.value = ALL
    view.search.value = "SUMMARIZE THIS TEXT"
    assert len(view.visible) == 24 and {view.rows[i]["category"] for i in view.visible} == {"Summarization"}
    view.search.value = "missing DOG biscuit"
    assert [view.rows[i]["id"] for i in view.visible] == ["cov-sum-003"]
    view.search.value = ""
    view.response.value = "half-typed edit"
    assert "unsaved edit" in view.unsaved.value
    here = view.row["id"]
    view.next_button.click()  # refused once, with a warning
    assert view.row["id"] == here and "unsaved edit" in view.status.value
    view.next_button.click()  # a second move discards the edit
    assert view.row["id"] != here and view.unsaved.value == ""
    assert load_decisions(layout.curation_file) == {}


def test_01_runs_from_the_notebooks_folder_with_project_relative_paths(tmp_path):
    """The kernel's working directory is notebooks/ (as in JupyterLab); every relative path is the root's."""
    data = yaml.safe_load((PROJECT_ROOT / "params" / "demo.yaml").read_text())
    # relative to the project root, as a user writes them; from notebooks/ these would point elsewhere
    data["outputs_dir"] = os.path.relpath(tmp_path / "outputs", PROJECT_ROOT)
    assert data["coverage"]["source"] == "data/sample_coverage.jsonl"
    assert data["prices_file"] == "params/prices.yaml"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    run_dir = tmp_path / "outputs" / "demo"
    out = execute_notebook(
        PROJECT_ROOT / "notebooks" / "01_coverage.ipynb",
        tmp_path / "01.ipynb",
        {
            "run_dir": os.path.relpath(run_dir, PROJECT_ROOT),
            "params_file": os.path.relpath(params, PROJECT_ROOT),
        },
        cwd=PROJECT_ROOT / "notebooks",
    )
    layout = RunLayout(run_dir)
    # 96 sample rows, train_ratio 0.75 stratified over 4 categories of 24: 18 train / 6 test each
    assert len(read_jsonl(layout.train_file)) == 72 and len(read_jsonl(layout.test_file)) == 24
    assert json.loads(out.read_text())["metadata"]["papermill"]["parameters"]["run_dir"].startswith("..")
    assert not (PROJECT_ROOT / "notebooks" / "outputs").exists()
    assert not (Path(PROJECT_ROOT / "notebooks") / Path(data["outputs_dir"])).resolve().exists()


def test_review_view_filters_and_sorts_on_the_deciding_judge_by_default(tmp_path):
    """The demo-like run: ROUGE-L decides (student scores BASES), the LLM judge scores every answer 60-70.
    The judge box starts on the deciding judges; below ζ and the sort follow the judge chosen there."""
    run = make_reviewed_run(tmp_path / "outputs" / "demo-like", demo_like=True)
    view = ReviewView(run, 0, zeta=70.0, deciding=["rougeL"])
    assert view.judge_box.value == "deciding judges" and view.judges() == ["rougeL"]
    assert len(view.item.candidates) == 6  # student, base student, service LLM: K = 2 each
    html = view.card.value
    assert html.count("data-judge='rougeL'") == 6 and "+1 other judge" in html
    view.model_box.value = "student"
    view.below_box.value = True
    assert len(view.visible) == sum(b < 70 for b in BASES)  # on ROUGE-L
    view.judge_box.value = JUDGE  # the LLM judge's student means are 20..95 too (its repeats BASES ± 5)
    assert view.judges() == [JUDGE]
    view.judge_box.value = "every judge"
    assert view.judges() is None
    view.judge_box.value = "deciding judges"
    view.below_box.value = False
    view.sort_box.value = "score ↑ (worst first)"
    assert [i.prompt_id for i in view.visible][:2] == [i.prompt_id for i in view.items[:2]]  # BASES 20, 35
    assert view.visible[-1].prompt_id == view.items[6].prompt_id  # BASES 95: last
