"""Datasets people actually have: Alpaca, ShareGPT, OpenAI chat with a system turn, JSON arrays, Parquet,
JSONL with a BOM — and every bad input gets an error naming file, row and field (lenient imports skip it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaduo_nb.config import CoverageConfig
from llamaduo_nb.coverage import import_coverage
from llamaduo_nb.jsonio import DataFileError

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
