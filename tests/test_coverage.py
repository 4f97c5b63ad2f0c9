from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from llamaduo_nb.config import CoverageConfig, load_config
from llamaduo_nb.coverage import (
    build_coverage,
    import_coverage,
    load_decisions,
    normalize_prompt,
    run_coverage,
    split_of,
    split_rows,
)
from llamaduo_nb.jsonio import DataFileError, read_jsonl
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.runner import execute_notebook


def chat_row(i: int, category: str = "Coding", **extra) -> dict:
    prompt = f"Question number {i} about {category.lower()}?"
    row = {
        "prompt": prompt,
        "prompt_id": f"p{i:03d}",
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"Answer {i}."}],
        "category": category,
    }
    row.update(extra)
    return row


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_sample_dataset_split_is_stratified_and_disjoint(project_root):
    cfg = load_config(project_root / "params" / "demo.yaml")
    result = build_coverage(cfg.coverage, cfg.seed)
    assert result.report["rows_valid"] == 96 and result.report["skipped"] == 0
    assert len(result.train) == 72 and len(result.test) == 24
    for category, n in result.report["per_category"]["test"].items():
        assert n == 6, category
    train_prompts = {normalize_prompt(r["instruction"]) for r in result.train}
    assert not any(normalize_prompt(r["instruction"]) in train_prompts for r in result.test)


def test_split_is_seeded_and_order_independent(project_root):
    rows = import_coverage(CoverageConfig(source=str(project_root / "data" / "sample_coverage.jsonl"))).rows
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    a = split_rows(rows, 0.8, seed=1)
    b = split_rows(shuffled, 0.8, seed=1)
    c = split_rows(rows, 0.8, seed=2)
    assert [r["id"] for r in a[1]] == [r["id"] for r in b[1]]
    assert [r["id"] for r in a[1]] != [r["id"] for r in c[1]]


@pytest.mark.parametrize(
    ("bad", "field", "problem"),
    [
        (
            {
                "messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}],
                "prompt": None,
            },
            "messages[user].content",
            "empty",
        ),
        ({"messages": None, "prompt": "Hi?"}, "response", "missing"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"},
                    {"role": "assistant", "content": "d"},
                ],
                "prompt": "a",
            },
            "messages",
            "multi-turn",
        ),
        ({"prompt_id": "p000"}, "id", "duplicate id"),
    ],
)
def test_strict_errors_name_file_row_field(tmp_path, bad, field, problem):
    rows = [chat_row(i) for i in range(4)]
    rows[2].update(bad)
    path = write_jsonl(tmp_path / "cov.jsonl", rows)
    with pytest.raises(DataFileError) as err:
        import_coverage(CoverageConfig(source=str(path)))
    assert err.value.path == str(path) and err.value.row == 3 and err.value.field == field
    assert problem in str(err.value)
    # lenient mode skips the same row and says why
    result = import_coverage(CoverageConfig(source=str(path), strictness="lenient"))
    assert len(result.rows) == 3
    assert [(s.row, s.field) for s in result.skipped] == [(3, field)]


def test_non_utf8_and_over_long_rows(tmp_path):
    path = tmp_path / "cov.jsonl"
    good = [json.dumps(chat_row(i)).encode() for i in range(3)]
    path.write_bytes(
        b"\n".join([good[0], b'{"prompt": "caf\xe9", "response": "x"}', good[1], good[2]]) + b"\n"
    )
    with pytest.raises(DataFileError, match=r"row 2.*UTF-8"):
        import_coverage(CoverageConfig(source=str(path)))
    long_row = chat_row(9)
    long_row["messages"][1]["content"] = "word " * 500
    path2 = write_jsonl(tmp_path / "long.jsonl", [chat_row(1), long_row, chat_row(2)])
    result = import_coverage(CoverageConfig(source=str(path2), strictness="lenient", max_chars=1000))
    assert [s.row for s in result.skipped] == [2] and "over-long" in result.skipped[0].problem


def test_duplicate_prompts_differing_only_in_case_are_caught(tmp_path):
    rows = [chat_row(1), chat_row(2)]
    dup = chat_row(3)
    dup["prompt"] = rows[0]["prompt"].upper()
    dup["messages"][0]["content"] = dup["prompt"]
    path = write_jsonl(tmp_path / "cov.jsonl", rows + [dup])
    with pytest.raises(DataFileError, match="duplicate prompt"):
        import_coverage(CoverageConfig(source=str(path)))


def test_csv_and_instruction_response_rows(tmp_path):
    path = tmp_path / "cov.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "instruction", "response", "category"])
        writer.writeheader()
        for i in range(6):
            writer.writerow(
                {
                    "id": f"c{i}",
                    "instruction": f"Résumé {i}, please",
                    "response": f"Done {i}",
                    "category": "Summarization",
                }
            )
    result = import_coverage(CoverageConfig(source=str(path)))
    assert [r["id"] for r in result.rows] == [f"c{i}" for i in range(6)]
    assert result.rows[0]["instruction"] == "Résumé 0, please"
    path.write_text("id,instruction,response\nx1,hello,\n", encoding="utf-8")
    with pytest.raises(DataFileError) as err:
        import_coverage(CoverageConfig(source=str(path)))
    assert err.value.row == 2 and err.value.field == "response"


def test_hf_dataset_on_disk_and_load_dataset_path(tmp_path):
    import datasets

    rows = [chat_row(i, "Closed QA") for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    from_disk = import_coverage(CoverageConfig(source=str(tmp_path / "saved")))
    assert len(from_disk.rows) == 5 and from_disk.rows[0]["category"] == "Closed QA"
    # the hub code path (datasets.load_dataset) exercised on a local data folder
    (tmp_path / "hubish").mkdir()
    write_jsonl(tmp_path / "hubish" / "train.jsonl", rows)
    from_loader = import_coverage(CoverageConfig(source=str(tmp_path / "hubish"), format="hub"))
    assert [r["id"] for r in from_loader.rows] == [r["id"] for r in from_disk.rows]


def test_strict_failure_leaves_no_partial_output(tmp_path):
    rows = [chat_row(i) for i in range(4)] + [{"prompt": "x"}]
    path = write_jsonl(tmp_path / "cov.jsonl", rows)
    layout = RunLayout(tmp_path / "run")
    with pytest.raises(DataFileError):
        run_coverage(CoverageConfig(source=str(path)), 0, layout)
    assert not layout.train_file.exists() and not layout.test_file.exists()
    assert not any(layout.root.rglob("*")) if layout.root.exists() else True


def test_curation_decisions_persist_and_apply(tmp_path, project_root):
    from llamaduo_nb.ui import CurationView

    cfg = CoverageConfig(source=str(project_root / "data" / "sample_coverage.jsonl"))
    layout = RunLayout(tmp_path / "run")
    result = run_coverage(cfg, 42, layout)
    rows = import_coverage(cfg).rows
    view = CurationView(rows, split_of(result), layout.curation_file)
    first, second, third = (r["id"] for r in rows[:3])
    view.reject_button.click()  # row 0
    view.next_button.click()
    view.response.value = "An edited answer."
    view.edit_button.click()  # row 1
    view.next_button.click()
    target = "test" if split_of(result)[third] == "train" else "train"
    view.split.value = target  # row 2 moves
    decisions = load_decisions(layout.curation_file)
    assert decisions[first]["action"] == "reject"
    assert decisions[second] == {
        "action": "edit",
        "instruction": rows[1]["instruction"],
        "response": "An edited answer.",
    }
    assert decisions[third]["split"] == target
    # the non-interactive path applies them
    again = run_coverage(cfg, 42, layout)
    ids = split_of(again)
    assert first not in ids and ids[third] == target
    edited = next(r for r in again.train + again.test if r["id"] == second)
    assert edited["response"] == "An edited answer." and edited["curated"] is True
    assert again.report["curation"] == {"rejected": 1, "edited": 1, "moved": 1}


def test_01_coverage_notebook_runs_under_papermill(tmp_path, make_params, project_root):
    params = make_params()
    run_dir = tmp_path / "outputs" / "demo"
    out = execute_notebook(
        project_root / "notebooks" / "01_coverage.ipynb",
        run_dir / "coverage" / "01_coverage.ipynb",
        {"run_dir": str(run_dir), "params_file": str(params)},
    )
    layout = RunLayout(run_dir)
    train, test = read_jsonl(layout.train_file), read_jsonl(layout.test_file)
    assert len(train) == 72 and len(test) == 24
    assert {r["id"] for r in train}.isdisjoint({r["id"] for r in test})
    assert set(train[0]) >= {"id", "instruction", "response", "category"}
    assert layout.split_plot.is_file() and layout.params_file.is_file()
    # the appendix's token statistics, under the student's tokenizer, and their plot
    tokens = json.loads(layout.coverage_report.read_text())["token_statistics"]
    assert tokens["tokenizer"] == "embedded:smollm2" and layout.token_plot.is_file()
    assert [tokens["splits"][s]["pair"]["count"] for s in ("train", "test")] == [72, 24]
    executed = json.loads(out.read_text())
    assert any(
        o.get("output_type") == "display_data" for c in executed["cells"] for o in c.get("outputs", [])
    )


def test_notebook_rejects_ill_typed_parameter(tmp_path, make_params, project_root):
    from llamaduo_nb.runner import NotebookFailed

    run_dir = tmp_path / "outputs" / "demo"
    with pytest.raises(NotebookFailed, match="interactive"):
        execute_notebook(
            project_root / "notebooks" / "01_coverage.ipynb",
            run_dir / "x.ipynb",
            {"run_dir": str(run_dir), "params_file": str(make_params()), "interactive": "yes"},
        )
