"""Datasets people actually have: Alpaca, Dolly, SQuAD-like, ShareGPT, OpenAI chat with a system turn, JSON
arrays, Parquet, JSONL with a BOM, save_to_disk datasets with several splits — every bad input gets an error
naming file, row and field (lenient imports skip it), and no text is dropped without a word."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaduo_nb.config import CoverageConfig, GivenSplits
from llamaduo_nb.coverage import (
    build_coverage,
    content_id,
    curation_rows,
    describe_import,
    import_coverage,
    run_coverage,
)
from llamaduo_nb.jsonio import DataFileError, read_json
from llamaduo_nb.runlayout import RunLayout

ALPACA = [
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Translate to French.", "input": "Thank you", "output": "Merci"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red"},
]
SHAREGPT = [
    {
        "id": "s1",
        "conversations": [
            {"from": "system", "value": "You answer in one word."},
            {"from": "human", "value": "Capital of Spain?"},
            {"from": "gpt", "value": "Madrid"},
        ],
    },
    {"id": "s2", "conversations": [{"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"}]},
]
OPENAI_CHAT = [
    {
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Largest planet?"},
            {"role": "assistant", "content": "Jupiter"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Largest planet?"},
            {"role": "assistant", "content": "Jupiter, matey"},
        ]
    },
]


def jsonl(path: Path, rows: list, bom: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def load(path: Path, **kw) -> list[dict]:
    return import_coverage(CoverageConfig(source=str(path), **kw)).rows


def test_alpaca_keeps_the_input_in_the_prompt(tmp_path):
    rows = load(jsonl(tmp_path / "alpaca.jsonl", ALPACA))
    assert [r["instruction"] for r in rows] == [
        "Translate to French.\n\nGood morning",
        "Translate to French.\n\nThank you",  # same instruction, different input: not a duplicate
        "Name a primary colour.",
    ]
    assert [r["response"] for r in rows] == ["Bonjour", "Merci", "Red"]
    # ids are a hash of the prompt, as before passages of other shapes were merged (pinned from main)
    assert (rows[0]["id"], rows[2]["id"]) == ("cov-4923ad5d753b", "cov-bdf8fbc49f5d")


def test_sharegpt_and_openai_chat_keep_the_system_prompt(tmp_path):
    share = load(jsonl(tmp_path / "share.jsonl", SHAREGPT))
    assert [(r["id"], r.get("system"), r["instruction"], r["response"]) for r in share] == [
        ("s1", "You answer in one word.", "Capital of Spain?", "Madrid"),
        ("s2", None, "2 + 2?", "4"),
    ]
    chat = load(jsonl(tmp_path / "chat.jsonl", OPENAI_CHAT))
    # the same user turn under two system prompts is two prompts, not a duplicate
    assert [r["system"] for r in chat] == ["You are a terse assistant.", "You are a pirate."]
    assert chat[0]["id"] != chat[1]["id"]
    # ... and the system prompt is what training and inference put before the user turn
    from llamaduo_nb.finetune import to_prompt_completion
    from llamaduo_nb.student import student_messages

    prompt = to_prompt_completion(chat[:1])[0]["prompt"]
    assert prompt == [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Largest planet?"},
    ]
    assert student_messages("Hi") == [{"role": "user", "content": "Hi"}]


def test_system_prompt_reaches_the_real_chat_template(tmp_path):
    from transformers import AutoTokenizer

    from llamaduo_nb.embedded import student_base_dir
    from llamaduo_nb.student import prompt_token_ids

    tok = AutoTokenizer.from_pretrained(student_base_dir())
    chat = load(jsonl(tmp_path / "chat.jsonl", OPENAI_CHAT))
    text = tok.decode(prompt_token_ids(tok, chat[1]["instruction"], chat[1]["system"]))
    assert "You are a pirate." in text and text.index("You are a pirate.") < text.index("Largest planet?")


def test_json_array_and_object_holding_one(tmp_path):
    array = tmp_path / "alpaca.json"
    array.write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
    assert len(load(array)) == 3
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": SHAREGPT}), encoding="utf-8")
    assert [r["id"] for r in load(wrapped)] == ["s1", "s2"]
    lines_named_json = jsonl(tmp_path / "lines.json", ALPACA)  # JSON Lines saved as .json
    assert len(load(lines_named_json)) == 3


def test_bad_row_in_a_json_array_names_the_element(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([*ALPACA[:2], {"instruction": "x", "output": 5}]), encoding="utf-8")
    with pytest.raises(DataFileError) as err:
        load(path)
    assert (err.value.path, err.value.row, err.value.field) == (str(path), 3, "output")
    assert "expected text, got int" in str(err.value)


def test_broken_json_array_is_an_error_with_its_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(
        '[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": ', encoding="utf-8"
    )
    with pytest.raises(DataFileError, match=r"broken.json: invalid JSON at line 2"):
        load(path, strictness="lenient")


def test_jsonl_with_a_byte_order_mark(tmp_path):
    rows = load(jsonl(tmp_path / "bom.jsonl", ALPACA, bom=True))
    assert rows[0]["instruction"].startswith("Translate")


def test_lenient_import_skips_and_reports_undecodable_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(r).encode() for r in ALPACA]
    path.write_bytes(b"\n".join([lines[0], b'{"instruction": "caf\xe9", "output": "x"}', *lines[1:]]) + b"\n")
    result = import_coverage(CoverageConfig(source=str(path), strictness="lenient"))
    assert len(result.rows) == 3
    assert [(s.row, s.problem) for s in result.skipped] == [
        (2, "not valid UTF-8 (invalid continuation byte at byte 20)")
    ]
    with pytest.raises(DataFileError, match=r"mixed.jsonl, row 2: not valid UTF-8"):
        load(path)


def test_lenient_csv_skips_undecodable_rows_naming_the_field(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"instruction,response\nhello,world\ncaf\xe9,latte\nbye,now\n")
    result = import_coverage(CoverageConfig(source=str(path), strictness="lenient"))
    assert [r["instruction"] for r in result.rows] == ["hello", "bye"]
    assert [(s.row, s.field) for s in result.skipped] == [(3, "instruction")]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(SHAREGPT + [{"id": "s3", "conversations": []}]), path)
    with pytest.raises(DataFileError) as err:
        load(path)
    assert (err.value.row, err.value.field) == (3, "conversations")
    result = import_coverage(CoverageConfig(source=str(path), strictness="lenient"))
    assert [r["id"] for r in result.rows] == ["s1", "s2"] and result.rows[0][
        "system"
    ] == "You answer in one word."
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(DataFileError, match="fake.parquet: not a readable Parquet file"):
        load(not_parquet)


@pytest.mark.parametrize(
    ("row", "field", "problem"),
    [
        (
            {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
            "conversations[1].from",
            "unknown speaker 'robot'",
        ),  # fmt: skip
        ({"conversations": [{"from": "human"}]}, "conversations[0]", "'from' and 'value'"),
        ({"conversations": [{"from": "human", "value": "a"}]}, "conversations", "got roles ['user']"),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "s"},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "messages",
            "system turn",
        ),  # fmt: skip
        (
            {
                "messages": [
                    {"role": "system", "content": " "},
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "messages[system].content",
            "empty",
        ),  # fmt: skip
        ({"instruction": "a", "input": ["x"], "output": "b"}, "input", "expected text, got list"),
        ({"instruction": "a", "output": "b", "system": 3}, "system", "expected text, got int"),
        ({"text": "a"}, "instruction", "missing"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, field, problem):
    path = jsonl(tmp_path / "cov.jsonl", [ALPACA[0], row, ALPACA[2]])
    with pytest.raises(DataFileError) as err:
        load(path)
    assert (err.value.path, err.value.row, err.value.field) == (str(path), 2, field)
    assert problem in str(err.value)
    result = import_coverage(CoverageConfig(source=str(path), strictness="lenient"))
    assert [(s.row, s.field) for s in result.skipped] == [(2, field)] and len(result.rows) == 2


def test_json_file_holding_something_else(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text(json.dumps({"name": "x", "version": 1}), encoding="utf-8")
    with pytest.raises(DataFileError, match=r"obj.json: a JSON object with keys \['name', 'version'\]"):
        load(path)


# ------------------------------------------------------------------ passages, unused columns, several splits

DOLLY = [  # databricks-dolly-15k: a generic instruction repeated over different passages
    {
        "instruction": "Summarize this paragraph.",
        "context": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue.",
        "response": "Virgin Blue started flying in August 2000.",
        "category": "summarization",
    },
    {
        "instruction": "Summarize this paragraph.",
        "context": "The Loch Ness Monster is a creature said to inhabit Loch Ness in Scotland.",
        "response": "Nessie is said to live in a Scottish loch.",
        "category": "summarization",
    },
    {"instruction": "Name a primary colour.", "context": "", "response": "Red", "category": "open_qa"},
    {
        "instruction": "Which is a species of fish? Tope or Rope",
        "context": "",
        "response": "Tope",
        "category": "classification",
    },
]
SQUAD = [  # SQuAD-like: several questions over one passage, plus a title the shape does not use
    {
        "id": "sq1",
        "title": "Normans",
        "context": "The Normans gave their name to Normandy, a region in France.",
        "question": "In what country is Normandy located?",
        "answer": "France",
    },
    {
        "id": "sq2",
        "title": "Normans",
        "context": "The Normans gave their name to Normandy, a region in France.",
        "question": "Who gave their name to Normandy?",
        "answer": "The Normans",
    },
    {
        "id": "sq3",
        "title": "",
        "context": "Computational complexity theory classifies problems by their difficulty.",
        "question": "What does complexity theory classify?",
        "answer": "Problems, by their difficulty",
    },
]


def assert_no_text_lost(records: list[dict], rows: list[dict], unused: dict[str, int]) -> None:
    """Every non-empty source value is in an imported row, or its column is reported as unused."""
    imported = [
        " ".join(str(r.get(k, "")) for k in ("id", "instruction", "response", "category")) for r in rows
    ]
    for record in records:
        for key, value in record.items():
            if value in (None, "") or key in unused:
                continue
            assert isinstance(value, str), (key, value)
            assert any(value in text for text in imported), f"{key}: {value!r} lost"


def test_dolly_context_goes_into_the_prompt_after_the_instruction(tmp_path):
    path = jsonl(tmp_path / "dolly.jsonl", DOLLY)
    rows = load(path)  # strict: the repeated instruction over two passages is two prompts, not a duplicate
    assert [r["instruction"] for r in rows] == [
        "Summarize this paragraph.\n\nVirgin Australia commenced services on 31 August 2000 as Virgin Blue.",
        "Summarize this paragraph.\n\nThe Loch Ness Monster is a creature said to inhabit Loch Ness in Scotland.",
        "Name a primary colour.",
        "Which is a species of fish? Tope or Rope",
    ]
    assert [r["category"] for r in rows] == ["summarization", "summarization", "open_qa", "classification"]
    # the id covers the passage; a row without one keeps the id it always had (pinned from main)
    assert rows[0]["id"] == content_id(rows[0]["instruction"]) != rows[1]["id"]
    assert rows[2]["id"] == "cov-bdf8fbc49f5d"
    result = run_coverage(CoverageConfig(source=str(path), stratify_by=None), 0, RunLayout(tmp_path / "run"))
    report = read_json(RunLayout(tmp_path / "run").coverage_report)
    assert report["context_columns"] == {"context": 2} and report["unused_columns"] == {}
    assert report["prompt_template"] == "{instruction}\n\n{context}"
    assert_no_text_lost(DOLLY, result.train + result.test, report["unused_columns"])
    shown = describe_import(result)
    assert "context (2 rows)" in shown and "row 1, context: 'Virgin Australia" in shown
    assert "-> instruction: 'Summarize this paragraph.\\n\\nVirgin Australia" in shown


def test_a_true_duplicate_with_its_passage_is_still_a_duplicate(tmp_path):
    path = jsonl(tmp_path / "dolly.jsonl", [*DOLLY, {**DOLLY[1], "response": "Another answer."}])
    with pytest.raises(DataFileError) as err:
        load(path)
    assert (err.value.row, err.value.field) == (5, "instruction")
    assert "duplicate prompt (same instruction and passage as row 2)" in str(err.value)
    result = import_coverage(CoverageConfig(source=str(path), strictness="lenient"))
    assert len(result.rows) == 4 and [s.row for s in result.skipped] == [5]


def test_squad_like_rows_keep_their_passage_and_report_the_title(tmp_path):
    path = jsonl(tmp_path / "squad.jsonl", SQUAD)
    layout = RunLayout(tmp_path / "run")
    result = run_coverage(CoverageConfig(source=str(path)), 0, layout)
    rows = sorted(result.train + result.test, key=lambda r: r["id"])
    assert [r["id"] for r in rows] == ["sq1", "sq2", "sq3"]
    assert rows[0]["instruction"] == (
        "In what country is Normandy located?\n\nThe Normans gave their name to Normandy, a region in France."
    )
    assert rows[0]["response"] == "France"
    report = read_json(layout.coverage_report)
    assert report["unused_columns"] == {"title": 2}  # named, with its count of non-empty values
    assert report["context_columns"] == {"context": 3}
    assert_no_text_lost(SQUAD, rows, report["unused_columns"])
    assert "Columns not imported (non-empty values): title (2)" in describe_import(result)


def test_unknown_columns_and_second_prompt_keys_are_reported_not_dropped(tmp_path):
    records = [
        {"instruction": f"Task {i}?", "response": f"Done {i}.", "notes": "check" if i else "", "n": i}
        for i in range(3)
    ] + [{"instruction": "Task 9?", "prompt": "An older wording of task 9?", "response": "Done 9."}]
    result = build_coverage(CoverageConfig(source=str(jsonl(tmp_path / "x.jsonl", records))), seed=0)
    # a number is a value too: 0 counts as non-empty; the empty note does not
    assert result.report["unused_columns"] == {"n": 3, "notes": 2, "prompt": 1}
    assert result.report["context_columns"] == {} and result.report["prompt_template"] is None
    assert_no_text_lost(records, result.train + result.test, result.report["unused_columns"])
    assert "No passage column" in describe_import(result)


def save_dataset_dict(folder: Path, splits: dict[str, list[dict]]) -> Path:
    import datasets

    datasets.DatasetDict(
        {name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}
    ).save_to_disk(str(folder))
    return folder


def test_a_dataset_with_several_splits_is_never_read_one_split_in_silence(tmp_path):
    folder = save_dataset_dict(
        tmp_path / "dolly", {"train": DOLLY, "test": [{**DOLLY[0], "context": "Other."}]}
    )
    with pytest.raises(DataFileError) as err:
        import_coverage(CoverageConfig(source=str(folder)))
    assert err.value.field == "splits"
    assert "the dataset has 2 splits ['train', 'test']" in str(err.value)
    assert '"splits: {train: train, test: test}" (keeps them as given)' in str(err.value)
    assert '"hub_split: train" (reads that split alone' in str(err.value)

    # the dataset's own splits, as the error proposes: every row of both, nothing lost
    result = build_coverage(CoverageConfig(source=str(folder), splits=GivenSplits()), seed=0)
    assert (len(result.train), len(result.test)) == (4, 1)
    assert result.test[0]["instruction"] == "Summarize this paragraph.\n\nOther."
    assert result.report["dataset_splits"] == {"found": ["train", "test"], "used": ["train", "test"]}
    assert result.report["context_columns"] == {"context": 3}
    assert_no_text_lost(DOLLY, result.train, result.report["unused_columns"])
    # ... and 01's curation view offers the rows of both
    assert len(curation_rows(CoverageConfig(source=str(folder), splits=GivenSplits()))) == 5

    # one split by choice: the report and 01 say which were left out
    one = build_coverage(CoverageConfig(source=str(folder), hub_split="train", stratify_by=None), seed=0)
    assert len(one.train) + len(one.test) == 4
    assert one.report["dataset_splits"] == {"found": ["train", "test"], "used": ["train"]}
    assert "Dataset splits read: ['train']; not read: ['test']" in describe_import(one)
    with pytest.raises(DataFileError, match=r"no split named 'dev'; the dataset has \['train', 'test'\]"):
        import_coverage(CoverageConfig(source=str(folder), hub_split="dev"))


def test_a_dataset_of_one_split_is_read_whole(tmp_path):
    folder = save_dataset_dict(tmp_path / "one", {"validation": DOLLY})
    result = import_coverage(CoverageConfig(source=str(folder)))
    assert len(result.rows) == 4 and result.dataset_splits == {
        "found": ["validation"],
        "used": ["validation"],
    }


def test_hub_loader_with_several_splits_asks_too(tmp_path):
    (tmp_path / "hubish").mkdir()
    jsonl(tmp_path / "hubish" / "train.jsonl", DOLLY)
    jsonl(tmp_path / "hubish" / "test.jsonl", [{**DOLLY[0], "context": "Other."}])  # one schema per dataset
    with pytest.raises(DataFileError, match=r"2 splits \['train', 'test'\]"):
        import_coverage(CoverageConfig(source=str(tmp_path / "hubish"), format="hub"))
    rows = import_coverage(
        CoverageConfig(source=str(tmp_path / "hubish"), format="hub", hub_split="test")
    ).rows
    assert [r["instruction"] for r in rows] == ["Summarize this paragraph.\n\nOther."]
