"""Review and curation views without a browser: decisions persist at once, 01 applies them, filters are right,
callback errors show inside the widget, and a notebook opened from notebooks/ resolves paths from the root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from reviewrun import BASELINE, BASES, JUDGE, make_reviewed_run

from llamaduo_nb import review
from llamaduo_nb.config import CoverageConfig
from llamaduo_nb.coverage import import_coverage, load_decisions, run_coverage, split_of
from llamaduo_nb.jsonio import read_jsonl
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
    below = review.filter_items(items, below=70.0, model="student")
    assert len(below) == sum(b < 70 for b in BASES)
    # the baseline scores 90 everywhere: nothing of it is below ζ
    assert review.filter_items(items, below=70.0, model=BASELINE) == []
    assert [i.prompt_id for i in review.filter_items(items, disagreement=20.0)] == [items[0].prompt_id]
    category = items[3].category
    assert all(i.category == category for i in review.filter_items(items, category=category))
    assert [i.prompt_id for i in review.filter_items(items, query=items[5].prompt_id.upper())] == [
        items[5].prompt_id
    ]


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
    from llamaduo_nb.config import load_config
    from llamaduo_nb.notebook import resolve_project_paths

    cfg = resolve_project_paths(load_config(run.params_file))
    result = run_coverage(cfg.coverage, cfg.seed, run)
    after = {r["id"]: r for r in read_jsonl(run.test_file)}
    assert set(after) == set(before) - {dropped}
    assert after[edited]["response"] == "A corrected reference." and after[edited]["reviewed"] is True
    assert all(after[i] == before[i] for i in after if i != edited)  # no other row moved or changed
    assert result.report["review"] == {"references_dropped": 1, "references_edited": 1, "ambiguous": 1}


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
    view.search.value = rows[2]["instruction"][:25].upper()
    assert [view.rows[i]["id"] for i in view.visible] == [rows[2]["id"]]
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
    assert len(read_jsonl(layout.train_file)) == 40 and len(read_jsonl(layout.test_file)) == 8
    assert json.loads(out.read_text())["metadata"]["papermill"]["parameters"]["run_dir"].startswith("..")
    assert not (PROJECT_ROOT / "notebooks" / "outputs").exists()
    assert not (Path(PROJECT_ROOT / "notebooks") / Path(data["outputs_dir"])).resolve().exists()
