"""The data-quality engine: ROUGE-L identical to rouge-score, one row kept per duplicate cluster,
order-independent clusters, decontamination that says why, and the `llamaduo dedup` entry point."""

from __future__ import annotations

import argparse
import json
import random

import pytest
from rouge_score import rouge_scorer

from llamaduo_nb import dataquality as dq
from llamaduo_nb.dataquality import tokens as tok
from llamaduo_nb.jsonio import DataFileError, read_json, read_jsonl, write_jsonl

WORDS = (
    "the model answers questions about running runners ran easily generous generation generalization "
    "data pipeline caching cached caches, fine-tuning fine tuned tune; LoRA adapters adapt adaptive 42 3.14 "
    "naïve café Zürich İstanbul ÅNGSTRÖM Kelvin-\u212a résumé über straße 東京 emoji 🙂 x² ½ "
    "it's don't U.S.A. e-mail C++ #hashtag @user http://example.com/path?q=1 snake_case CamelCase"
).split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words) + rng.choice(["", ".", "!", "?", " ...", "\n"])


def _pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = [
        ("", ""),
        ("", "some words"),
        ("some words", ""),
        ("!!! ... ???", "---"),
        ("İstanbul CAFÉ", "istanbul cafe"),
        ("\u212a\u212a kelvin", "kk KELVIN"),
        ("lone \ud800 surrogate", "lone surrogate"),
        ("tab\tseparated\nlines", "tab separated lines"),
    ]
    while len(pairs) < n:
        a = _sentence(rng, 0, 40)
        kind = rng.randrange(4)
        if kind == 0:
            b = _sentence(rng, 0, 40)
        elif kind == 1:  # light edit
            words = a.split()
            if words:
                words[rng.randrange(len(words))] = rng.choice(WORDS)
            b = " ".join(words)
        elif kind == 2:  # long texts
            a = " ".join(_sentence(rng, 40, 80) for _ in range(3))  # 120-240 tokens
            b = a[: len(a) // 2] + _sentence(rng, 10, 30) + a[len(a) // 2 :]
        else:
            b = a.upper()
        pairs.append((a, b))
    return pairs


@pytest.mark.parametrize("use_stemmer", [False, True])
def test_rouge_l_is_identical_to_rouge_score(use_stemmer: bool) -> None:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    pairs = _pairs(300, seed=1 + use_stemmer)
    expected = [scorer.score(a, b)["rougeL"].fmeasure for a, b in pairs]
    batch = dq.rouge_l_f1_batch([a for a, _ in pairs], [b for _, b in pairs], use_stemmer=use_stemmer)
    assert batch.tolist() == expected  # bit-for-bit, not approximately
    assert [dq.rouge_l_f1(a, b, use_stemmer=use_stemmer) for a, b in pairs[:40]] == expected[:40]
    tokenizer = scorer._tokenizer
    assert all(dq.rouge_tokens(a, use_stemmer) == tokenizer.tokenize(a) for a, _ in pairs[:100])


def test_rouge_l_stays_exact_when_the_vocabulary_outgrows_unicode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tok, "_ID_CAPACITY", 5)  # as if the corpus had more than 1.1M distinct tokens
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = _pairs(60, seed=7)
    expected = [scorer.score(a, b)["rougeL"].fmeasure for a, b in pairs]
    assert dq.rouge_l_f1_batch([a for a, _ in pairs], [b for _, b in pairs]).tolist() == expected


def test_dedup_and_decontamination_agree_when_the_vocabulary_outgrows_unicode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = _pool() + [{"id": "leak", "instruction": _edit(LONG_A, {"twelve": "ten"}), "response": "x"}]
    expected = dq.clean(rows, test=TEST)
    monkeypatch.setattr(tok, "_ID_CAPACITY", 7)  # most tokens now take the tuple-of-ids path
    result = dq.clean(rows, test=TEST)
    assert result.kept_indices == expected.kept_indices
    assert result.dedup.dropped == expected.dedup.dropped
    assert result.decontamination == expected.decontamination


def test_rouge_l_batch_rejects_unequal_lengths() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        dq.rouge_l_f1_batch(["a"], ["a", "b"])


# --------------------------------------------------------------------------------------------------
# rows


def test_row_text_reads_both_coverage_schemas() -> None:
    assert dq.row_text({"instruction": "Sum 2+2", "response": "4", "id": 1}) == ("Sum 2+2", "4")
    assert dq.row_text({"instruction": "only a prompt"}) == ("only a prompt", "")
    assert dq.row_text({"prompt": "Sum 2+2", "completion": "4"}) == ("Sum 2+2", "4")  # as 01_coverage reads
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Sum 2+2"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6"},
        ]
    }
    assert dq.row_text(chat) == ("Sum 2+2", "4")
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert dq.row_text(parts) == ("hi", "")


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"text": "x"}, "no instruction/response fields and no 'messages'"),
        ({"instruction": 3}, "field 'instruction' must be a string"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "no user turn"),
        ({"messages": "hello"}, "must be a list"),
    ],
)
def test_unreadable_rows_say_what_is_wrong(row: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        dq.row_text(row)
    with pytest.raises(dq.RowError, match=r"pool row 1 \(id='b'\)") as caught:
        dq.dedup([{"id": "a", "instruction": "fine"}, {"id": "b", **row}])
    assert caught.value.index == 1


# --------------------------------------------------------------------------------------------------
# dedup

LONG_A = (
    "Summarize the quarterly report: revenue grew twelve percent while operating costs fell, the board "
    "approved a new buyback and the outlook for the next two quarters was raised by management."
)
LONG_B = (
    "Write a Python function that parses ISO dates from log lines, skips malformed entries, and returns "
    "a sorted list of unique days seen in the file together with the count of lines for each day."
)
LONG_C = (
    "Classify the sentiment of this review: the hotel room was spotless, the staff remembered our names, "
    "and breakfast had fresh fruit every single morning of our long stay by the lake."
)


def _edit(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


def _pool() -> list[dict]:
    return [
        {"id": "a", "instruction": LONG_A, "response": "Revenue up, costs down, buyback approved."},
        {"id": "b", "instruction": LONG_B, "response": "def days(lines): ..."},
        {"id": "a-copy", "instruction": LONG_A, "response": "Revenue up, costs down, buyback approved."},
        {
            "id": "a-near",
            "instruction": _edit(LONG_A, {"twelve": "eleven", "raised": "lifted"}),
            "response": "Revenue up, costs down, buyback approved.",
        },
        {"id": "c", "instruction": LONG_C, "response": "Positive"},
        {
            "id": "c-chat",
            "messages": [{"role": "user", "content": LONG_C}, {"role": "assistant", "content": "Positive"}],
        },
        {"id": "c-case", "instruction": LONG_C.upper(), "response": "POSITIVE"},
    ]


def test_dedup_keeps_exactly_one_row_per_cluster() -> None:
    rows = _pool()
    result = dq.dedup(rows)
    assert [row["id"] for row in result.kept] == ["a", "b", "c"]
    assert result.kept_indices == [0, 1, 4]
    why = {rows[d.index]["id"]: d for d in result.dropped}
    assert why["a-copy"].reason == "exact_duplicate" and why["a-copy"].score == 1.0
    assert why["a-near"].reason == "near_duplicate" and 0.9 < why["a-near"].score < 1.0
    assert why["c-chat"].reason == "exact_duplicate"  # same texts in the chat schema
    assert why["c-case"].reason == "near_duplicate" and why["c-case"].score == 1.0  # only case differs
    assert {d.duplicate_of_source for d in result.dropped} == {"pool"}
    assert {rows[d.index]["id"]: rows[d.duplicate_of]["id"] for d in result.dropped} == {
        "a-copy": "a",
        "a-near": "a",
        "c-chat": "c",
        "c-case": "c",
    }
    assert result.counts() == {"input": 7, "kept": 3, "exact_duplicate": 2, "near_duplicate": 2}


def test_rows_near_the_existing_pool_are_dropped_and_the_pool_wins() -> None:
    existing = [{"id": "old", "instruction": LONG_A, "response": "Revenue up, costs down, buyback approved."}]
    rows = _pool()
    result = dq.dedup(rows, against=existing)
    assert [row["id"] for row in result.kept] == ["b", "c"]
    for drop in result.dropped:
        if rows[drop.index]["id"].startswith("a"):
            assert (drop.duplicate_of_source, drop.duplicate_of) == ("against", 0)
    cleaned = dq.clean(rows, against=existing)  # no test split: dedup only, same decisions
    assert cleaned.decontamination is None
    assert (cleaned.kept_indices, cleaned.dedup.dropped) == (result.kept_indices, result.dropped)


def test_threshold_decides_what_is_near() -> None:
    rows = _pool()[:4]
    strict = dq.dedup(rows, threshold=0.99)
    assert [row["id"] for row in strict.kept] == ["a", "b", "a-near"]


def test_dedup_is_deterministic_across_runs_and_input_orders() -> None:
    rows = _pool() + [
        {"id": f"u{i}", "instruction": f"Unique task number {i}: {LONG_B[i:]}", "response": str(i)}
        for i in range(30)
    ]
    first = dq.dedup(rows)
    assert dq.dedup(rows) == first

    def clusters(result: dq.DedupResult, order: list[dict]) -> set[frozenset[str]]:
        groups: dict[int, set[str]] = {i: {order[i]["id"]} for i in result.kept_indices}
        for drop in result.dropped:
            groups[drop.duplicate_of].add(order[drop.index]["id"])
        return {frozenset(group) for group in groups.values()}

    expected = clusters(first, rows)
    rng = random.Random(3)
    for _ in range(5):
        shuffled = rows[:]
        rng.shuffle(shuffled)
        result = dq.dedup(shuffled)
        assert clusters(result, shuffled) == expected
        position = {row["id"]: i for i, row in enumerate(shuffled)}
        for group in expected:  # the kept row of each cluster is its earliest row in this order
            assert min(group, key=position.__getitem__) in {row["id"] for row in result.kept}


def test_a_large_family_of_near_copies_keeps_one_row() -> None:
    rng = random.Random(5)
    words = LONG_A.split()
    rows = []
    for i in range(40):
        variant = words[:]
        variant[rng.randrange(len(variant))] = f"w{i}"
        rows.append({"id": i, "instruction": " ".join(variant), "response": "ok"})
    params = dq.MinHashParams(max_bucket=4)  # forces the star + chain linking of big buckets
    result = dq.dedup(rows, params=params)
    assert len(result.kept) == 1
    shuffled = rows[::-1]
    assert len(dq.dedup(shuffled, params=params).kept) == 1


def test_empty_and_single_row_inputs() -> None:
    assert dq.dedup([]).kept == []
    only = [{"instruction": "just one", "response": "row"}]
    assert dq.dedup(only).kept == only
    assert dq.dedup(only, against=only).kept == []
    blank = [
        {"instruction": "", "response": ""},
        {"instruction": "", "response": ""},
        {"instruction": "?!", "response": ""},
    ]
    result = dq.dedup(blank)
    assert result.kept_indices == [0, 2] and result.dropped[0].reason == "exact_duplicate"
    assert dq.decontaminate([], [{"instruction": "x"}]).kept == []
    assert dq.decontaminate(only, []).kept == only
    cleaned = dq.clean([], [], [])
    assert cleaned.kept == [] and cleaned.report()["input"] == 0


def test_stemming_option_reaches_the_near_duplicate_decision() -> None:
    a = "the runner was running generously through generated examples of caching caches for models"
    b = "the runners were run generous through generating example of cached cache for model"
    rows = [{"instruction": a, "response": ""}, {"instruction": b, "response": ""}]
    assert dq.rouge_l_f1(a, b) < 0.7 <= dq.rouge_l_f1(a, b, use_stemmer=True)
    assert len(dq.dedup(rows, threshold=0.7).kept) == 2
    stemmed = dq.dedup(rows, threshold=0.7, use_stemmer=True)
    assert len(stemmed.kept) == 1


# --------------------------------------------------------------------------------------------------
# decontamination

TEMPLATE = "Classify the sentiment of the following product review as positive, negative or neutral: "
TEST = [
    {"id": "t-summary", "instruction": LONG_A, "response": "Revenue rose and the outlook improved."},
    {
        "id": "t-code",
        "instruction": "Write a function that merges two sorted lists.",
        "response": "Walk both lists with two indices, always appending the smaller head element, and when one "
        "list runs out append everything that is left of the other list to the result.",
    },
    {
        "id": "t-review-1",
        "instruction": TEMPLATE + "the blender broke after two days of light use.",
        "response": "Negative",
    },
    {
        "id": "t-review-2",
        "instruction": TEMPLATE + "shipping was quick and the colours are lovely.",
        "response": "Positive",
    },
    {
        "id": "t-review-3",
        "instruction": TEMPLATE + "it does what it says, nothing more.",
        "response": "Neutral",
    },
]


def test_decontamination_catches_edited_prompts_and_says_why() -> None:
    rows = [
        {"id": "clean", "instruction": LONG_B, "response": "def days(lines): ..."},
        {
            "id": "edited",
            "instruction": _edit(LONG_A, {"quarterly": "annual", "two": "three"}),
            "response": "New.",
        },
        {
            "id": "copied",
            "instruction": "Explain how to combine ordered sequences efficiently.",
            "response": "Sure! "
            + TEST[1]["response"]
            + " This linear merge is also the heart of merge sort and runs in time proportional to both lengths,"
            " which is optimal: every element has to be looked at once, and no element is ever moved twice.",
        },
        {
            "id": "same-prompt",
            "instruction": "write a function that merges two SORTED lists",
            "response": "?",
        },
        {
            "id": "same-template",
            "instruction": TEMPLATE + "the lamp is bright but the switch feels cheap.",
            "response": "Neutral",
        },
        {"id": "label-only", "instruction": "Is this review positive? I loved it.", "response": "Positive"},
    ]
    result = dq.decontaminate(rows, TEST)
    assert [row["id"] for row in result.kept] == ["clean", "same-template", "label-only"]
    why = {rows[c.index]["id"]: c for c in result.dropped}
    edited = why["edited"]
    assert (edited.rule, edited.test_id, edited.test_index, edited.field, edited.test_field) == (
        "rouge_l",
        "t-summary",
        0,
        "instruction",
        "instruction",
    )
    assert 0.7 <= edited.score < 1.0
    assert edited.score == dq.rouge_l_f1(TEST[0]["instruction"], rows[1]["instruction"])
    copied = why["copied"]
    assert (copied.rule, copied.test_id, copied.field, copied.test_field) == (
        "ngram_13",
        "t-code",
        "response",
        "response",
    )
    assert copied.score == 1.0  # every distinctive 8-gram of the test response is in the row
    assert (why["same-prompt"].rule, why["same-prompt"].test_id) == ("exact_match", "t-code")
    assert result.counts() == {
        "input": 6,
        "kept": 3,
        "exact_match": 1,
        "rouge_l": 1,
        "ngram_13": 1,
        "ngram_containment": 0,
    }


def test_containment_rule_catches_a_short_test_prompt_inside_a_longer_one() -> None:
    # 8 tokens: too short for a 13-token span, and ROUGE-L is low against the long row
    row = {
        "instruction": "Here is an exercise from a textbook. Write a function that merges two sorted lists. "
        "Explain the complexity of your solution in detail, with examples and unit tests.",
        "response": "Sure.",
    }
    (hit,) = dq.decontaminate([row], TEST).dropped
    assert (hit.rule, hit.test_id, hit.field, hit.test_field, hit.score) == (
        "ngram_containment",
        "t-code",
        "instruction",
        "instruction",
        1.0,
    )
    assert dq.rouge_l_f1(TEST[1]["instruction"], row["instruction"]) < 0.5


# --------------------------------------------------------------------------------------------------
# clean and the CLI


def test_clean_decontaminates_then_dedups_with_indices_into_the_pool() -> None:
    rows = _pool() + [
        {"id": "leak", "instruction": _edit(LONG_A.upper(), {"TWELVE": "TEN"}), "response": "x"}
    ]
    result = dq.clean(rows, test=[TEST[0]])
    assert result.decontamination is not None
    leaked = {rows[c.index]["id"] for c in result.decontamination.dropped}
    assert leaked == {"a", "a-copy", "a-near", "leak"}
    assert [row["id"] for row in result.kept] == ["b", "c"]
    assert {rows[d.index]["id"]: rows[d.duplicate_of]["id"] for d in result.dedup.dropped} == {
        "c-chat": "c",
        "c-case": "c",
    }
    report = result.report(pool=rows)
    assert report["kept"] == 2 and report["input"] == len(rows)
    assert report["dropped"]["contaminated:exact_match"] == 2  # "a" and "a-copy" reuse the test prompt
    assert report["dropped"]["contaminated:rouge_l"] == 2
    assert report["examples"]["near_duplicate"][0]["instruction"].startswith("CLASSIFY")


def test_run_dedup_cli_writes_kept_rows_unchanged_and_a_report(tmp_path, capsys) -> None:
    pool = _pool() + [
        {"id": "leak", "instruction": LONG_A + " Please.", "response": "x", "extra": {"k": [1, 2]}}
    ]
    against = [
        {
            "id": "old",
            "messages": [
                {"role": "user", "content": LONG_B},
                {"role": "assistant", "content": "def days(lines): ..."},
            ],
        }
    ]
    write_jsonl(tmp_path / "pool.jsonl", pool)
    write_jsonl(tmp_path / "against.jsonl", against)
    write_jsonl(tmp_path / "test.jsonl", [TEST[0]])
    report = dq.run_dedup_cli(
        tmp_path / "pool.jsonl",
        tmp_path / "against.jsonl",
        tmp_path / "test.jsonl",
        tmp_path / "out.jsonl",
        tmp_path / "report.json",
    )
    kept = read_jsonl(tmp_path / "out.jsonl")
    assert kept == [row for row in pool if row["id"] == "c"]
    assert read_json(tmp_path / "report.json") == json.loads(json.dumps(report))
    assert report["dropped"]["exact_duplicate"] == 2  # "b" is in --against; "c-chat" copies "c"
    assert report["kept"] == 1 and report["input"] == len(pool)
    printed = capsys.readouterr().out
    assert "kept 1 of 8 rows" in printed and "contaminated:rouge_l" in printed


def test_run_dedup_cli_names_the_file_and_row_of_a_bad_row(tmp_path) -> None:
    write_jsonl(tmp_path / "pool.jsonl", [{"instruction": "ok"}, {"text": "no instruction here"}])
    with pytest.raises(DataFileError, match=r"pool\.jsonl, row 2: row has no instruction/response"):
        dq.run_dedup_cli(tmp_path / "pool.jsonl", None, None, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_dedup_subcommand_parses_and_runs(tmp_path) -> None:
    write_jsonl(tmp_path / "pool.jsonl", _pool())
    parser = argparse.ArgumentParser(prog="llamaduo")
    dq.add_dedup_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "dedup",
            "--pool",
            str(tmp_path / "pool.jsonl"),
            "--out",
            str(tmp_path / "out.jsonl"),
            "--threshold",
            "0.99",
        ]
    )
    assert args.func(args) == 0
    assert [row["id"] for row in read_jsonl(tmp_path / "out.jsonl")] == ["a", "b", "a-near", "c"]
