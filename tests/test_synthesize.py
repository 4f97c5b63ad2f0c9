"""05_synthesize: seeds (train only, reseeded per cycle), templates, reply parsing, quality rules, dedup and
decontamination with reasons, and the notebook run against the embedded llama.cpp generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamaduo_nb import dataquality, synthesize
from llamaduo_nb.config import SynthesizeConfig, dump_config, load_config
from llamaduo_nb.jsonio import read_json, read_jsonl, write_jsonl
from llamaduo_nb.prompts import TemplateError
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.runner import NOTEBOOKS_DIR, execute_notebook

TRAIN = [
    {
        "id": "train-sum-1",
        "instruction": "Summarize in one sentence: The town library reopened after a year of repairs, "
        "with a new children's wing and longer opening hours on weekends.",
        "response": "The library reopened after repairs with a children's wing and longer weekend hours.",
        "category": "Summarization",
        "source": "test",
    },
    {
        "id": "train-cls-1",
        "instruction": "Is this review positive or negative? 'The soup was cold and the staff ignored us.'",
        "response": "Negative.",
        "category": "Classification",
        "source": "test",
    },
    {
        "id": "train-qa-1",
        "instruction": "Using the text, answer: which planet is known as the red planet? "
        "Text: Mars looks red because of iron oxide dust on its surface.",
        "response": "Mars.",
        "category": "Closed QA",
        "source": "test",
    },
    {
        "id": "train-code-1",
        "instruction": "Write a Python function that returns the square of a number.",
        "response": "def square(x):\n    return x * x",
        "category": "Coding",
        "source": "test",
    },
]
TEST = [
    {
        "id": "test-qa-1",
        "instruction": "According to the passage, what is the boiling point of water at sea level? "
        "Passage: At sea level, pure water boils at 100 degrees Celsius.",
        "response": "Water boils at 100 degrees Celsius at sea level.",
        "category": "Closed QA",
        "source": "test",
    },
    {
        "id": "test-cls-1",
        "instruction": "Classify the sentiment of this tweet: 'Best concert of my life, the band was amazing!'",
        "response": "Positive.",
        "category": "Classification",
        "source": "test",
    },
]


def _candidate(instruction: str, response: str, n: int, category: str = "Closed QA") -> dict:
    return {
        "id": f"cand-{n}",
        "instruction": instruction,
        "response": response,
        "category": category,
        "source": "synthetic",
        "lineage": {
            "seed_id": "train-qa-1",
            "cycle": 0,
            "generator": {"provider": "x", "model": "y", "params": {}},
        },
    }


# --------------------------------------------------------------------------- seeds and volume


def test_seeds_differ_between_cycles_and_do_not_repeat_within_a_pass():
    train = [{"id": f"r{i}"} for i in range(20)]
    cycle0 = synthesize.sample_seeds(train, 8, synthesize.cycle_seed(42, 0))
    cycle1 = synthesize.sample_seeds(train, 8, synthesize.cycle_seed(42, 1))
    assert [r["id"] for r in cycle0] != [r["id"] for r in cycle1]
    assert len({r["id"] for r in cycle0}) == 8
    # deterministic for the same (seed, cycle)
    assert synthesize.sample_seeds(train, 8, synthesize.cycle_seed(42, 0)) == cycle0
    # more requests than rows: every row is used once before any is used twice
    many = [r["id"] for r in synthesize.sample_seeds(train, 30, 7)]
    assert sorted(many[:20]) == sorted(r["id"] for r in train)
    with pytest.raises(ValueError, match="train split is empty"):
        synthesize.sample_seeds([], 1, 0)


def test_target_volume_doubles_per_cycle():
    double = SynthesizeConfig(generator="g", target_per_cycle=10, growth="double")
    constant = SynthesizeConfig(generator="g", target_per_cycle=10, growth="constant")
    assert [synthesize.target_rows(double, t) for t in range(4)] == [10, 20, 40, 80]
    assert [synthesize.target_rows(constant, t) for t in range(3)] == [10, 10, 10]


# --------------------------------------------------------------------------- templates


def test_templates_render_with_all_placeholders_and_match_the_task():
    templates = synthesize.load_templates()
    cfg = SynthesizeConfig(generator="g", pairs_per_request=3)
    assert synthesize.task_kind("Summarization") == "summarization"
    assert synthesize.task_kind("Closed QA") == "general"
    for seed in TRAIN:
        (message,) = synthesize.synthesis_messages(seed, cfg, templates)
        text = message["content"]
        assert seed["instruction"] in text and seed["response"] in text and seed["category"] in text
        assert "3 new" in text and '"pairs"' in text
        assert "$" not in text
    summary = synthesize.synthesis_messages(TRAIN[0], cfg, templates)[0]["content"]
    general = synthesize.synthesis_messages(TRAIN[1], cfg, templates)[0]["content"]
    assert "summar" in summary.lower() and "passage" in summary.lower()
    assert summary.split("###")[0] != general.split("###")[0]
    with pytest.raises(TemplateError, match="n_pairs"):
        templates["general"].render(instruction="a", response="b", category="c")


# --------------------------------------------------------------------------- parsing replies


@pytest.mark.parametrize(
    ("reply", "n_pairs", "n_malformed"),
    [
        ('{"pairs": [{"instruction": "a", "response": "b"}, {"instruction": "c", "response": "d"}]}', 2, 0),
        ('```json\n{"contents": [{"Instruction": "a", "Response": "b"}, {"instruction": "c"}]}\n```', 1, 1),
        ('[{"question": "a", "answer": "b"}, "junk"]', 1, 1),
        ('Sure! {"instruction": "a", "response": "b"}', 1, 0),
    ],
)
def test_parse_pairs_accepts_common_shapes(reply, n_pairs, n_malformed):
    pairs, malformed = synthesize.parse_pairs(reply)
    assert (len(pairs), malformed) == (n_pairs, n_malformed)
    assert all(set(p) == {"instruction", "response"} for p in pairs)


@pytest.mark.parametrize("reply", ["", "no json here", '{"note": "nothing"}', '{"pairs": "a, b"}'])
def test_parse_pairs_rejects_replies_without_pairs(reply):
    with pytest.raises(ValueError):
        synthesize.parse_pairs(reply)


# --------------------------------------------------------------------------- quality rules


LONG = "Tardigrades survive extreme cold, radiation and even the vacuum of space for days. " * 4


@pytest.mark.parametrize(
    ("instruction", "response", "reason"),
    [
        ("", "An answer.", "empty"),
        ("A question?", "   ", "empty"),
        ("A question?", "x" * 7000, "too_long"),
        ("Explain tardigrades.", LONG + "They can also", "truncated"),
        ("Write code.", "```python\ndef f():\n    return 1\n", "truncated"),
        ("Do it.", "I'm sorry, but I cannot help with that request.", "refusal"),
        ("Do it.", "As an AI language model, I do not have opinions.", "refusal"),
        ("Explain tardigrades.", LONG.strip(), None),
        ("Classify: 'great!'", "Positive", None),
        ("Write code.", "```python\ndef f():\n    return 1\n```", None),
        ("List three fruits.", LONG + "\n- apple\n- pear\n- plum", None),
    ],
)
def test_quality_rules(instruction, response, reason):
    found = synthesize.quality_reason(instruction, response, max_chars=6000)
    assert (found[0] if found else None) == reason


# --------------------------------------------------------------------------- dedup and decontamination


def test_postprocess_removes_duplicates_and_contamination_with_reasons():
    cfg = SynthesizeConfig(generator="g", dedup_threshold=0.7, decontam_threshold=0.6)
    fresh = "Which gas do plants absorb from the air for photosynthesis? Text: Plants take in carbon dioxide."
    candidates = [
        _candidate(fresh, "Carbon dioxide.", 0),
        _candidate(fresh, "Carbon dioxide.", 1),  # exact copy inside the batch
        _candidate(
            TRAIN[2]["instruction"].replace("red planet", "Red Planet"), "Mars.", 2
        ),  # near-dup of train
        _candidate(
            TEST[0]["instruction"].replace("According to", "Based on"), "100 C.", 3
        ),  # edited test prompt
        _candidate(
            "Tell me about water at sea level and when it boils.", TEST[0]["response"], 4
        ),  # test response
        _candidate("", "Nothing asked.", 5),  # quality rule first
        _candidate(
            "Name the largest ocean on Earth. Text: The Pacific is the largest and deepest ocean.",
            "The Pacific Ocean.",
            6,
        ),
    ]
    accepted, rejected = synthesize.postprocess(candidates, TRAIN, TEST, cfg)
    assert [r["id"] for r in accepted] == ["cand-0", "cand-6"]
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert reasons == {
        "cand-1": "duplicate_in_batch",
        "cand-2": "duplicate_of_earlier",
        "cand-3": "contaminated",
        "cand-4": "contaminated",
        "cand-5": "empty",
    }
    by_id = {r["id"]: r for r in rejected}
    assert by_id["cand-1"]["matched_id"] == "cand-0"
    assert by_id["cand-2"]["matched_id"] == "train-qa-1"
    assert by_id["cand-3"]["matched_id"] == "test-qa-1" and by_id["cand-4"]["matched_id"] == "test-qa-1"
    assert all(r["detail"] for r in rejected)
    # the lineage survives post-processing
    assert accepted[0]["lineage"]["seed_id"] == "train-qa-1"


def test_postprocess_of_an_empty_batch():
    cfg = SynthesizeConfig(generator="g")
    assert synthesize.postprocess([], TRAIN, TEST, cfg) == ([], [])


# --------------------------------------------------------------------------- the notebook, for real


def _tiny_run(make_params, tmp_path: Path) -> RunLayout:
    params = make_params(
        {
            "synthesize": {
                "generator": "smollm2-service",
                "pairs_per_request": 2,
                "target_per_cycle": 2,
                "growth": "double",
                "max_requests_per_cycle": 3,
                "max_tokens": 160,
                "temperature": 0.9,
            }
        }
    )
    cfg = load_config(params)
    layout = RunLayout(tmp_path / "tiny")
    dump_config(cfg, layout.params_file)
    # a train seed that is a light edit of a test prompt: if the small generator copies its example,
    # decontamination must catch it
    planted = {
        **TEST[0],
        "id": "train-planted",
        "instruction": TEST[0]["instruction"].replace("what", "tell me"),
    }
    write_jsonl(layout.train_file, [*TRAIN, planted])
    write_jsonl(layout.test_file, TEST)
    return layout


def test_prompt_preview_renders_the_first_request_of_the_cycle(make_params, tmp_path):
    layout = _tiny_run(make_params, tmp_path)
    cfg = load_config(layout.params_file)
    train = read_jsonl(layout.train_file)
    for cycle in (0, 1):
        (seed,) = synthesize.sample_seeds(train, 1, synthesize.cycle_seed(cfg.seed, cycle))
        text = synthesize.prompt_preview(cfg, layout, cycle)
        assert text.startswith(f"seed {seed['id']} ")
        body = synthesize.synthesis_messages(seed, cfg.synthesize, synthesize.load_templates())[0]["content"]
        assert text.endswith(body) and seed["instruction"] in text and "$" not in text


@pytest.mark.slow
def test_notebook_writes_lineage_and_keeps_test_items_out(make_params, tmp_path):
    layout = _tiny_run(make_params, tmp_path)
    cycle = 1  # growth "double": target 2 * 2**1 = 4 rows; budget 3 requests of 2 pairs
    execute_notebook(
        NOTEBOOKS_DIR / "05_synthesize.ipynb",
        layout.notebook_out("05_synthesize", cycle),
        {"run_dir": str(layout.root), "cycle": cycle},
    )
    report = read_json(layout.synth_report(cycle))
    accepted = read_jsonl(layout.synthetic_file(cycle))
    rejected = read_jsonl(layout.synthetic_rejected_file(cycle))
    assert layout.synth_plot(cycle).stat().st_size > 0

    assert report["target"] == 4
    # the first round asks for target / pairs_per_request = 2 requests; more only while short of the target
    assert report["requests"] == 2 if report["rounds"] == 1 else report["requests"] == 3
    assert report["target_met"] or report["requests"] == 3
    assert len(report["request_log"]) == report["requests"]
    assert report["candidates"] == len(accepted) + len(rejected)
    assert sum(report["rejected"].values()) == len(rejected)
    assert report["accepted"] == len(accepted)
    failed_requests = report["request_failures"] + report["parse_failures"]
    assert failed_requests == sum(1 for r in report["request_log"] if r["error"])

    train_ids = {r["id"] for r in read_jsonl(layout.train_file)}
    seeds = synthesize.sample_seeds(
        read_jsonl(layout.train_file),
        report["requests"],
        synthesize.cycle_seed(load_config(layout.params_file).seed, cycle),
    )
    assert [r["seed_id"] for r in report["request_log"]] == [s["id"] for s in seeds]
    for row in accepted:
        assert row["source"] == "synthetic" and row["id"].startswith("synth-c01-")
        lineage = row["lineage"]
        assert lineage["cycle"] == cycle and lineage["seed_id"] in train_ids
        assert lineage["generator"]["provider"] == "smollm2-service"
        assert lineage["generator"]["model"] == "smollm2-135m-instruct-q4_1"
        assert lineage["generator"]["params"]["pairs_per_request"] == 2
    assert len({r["id"] for r in accepted}) == len(accepted)
    test_texts = {t["instruction"].strip().lower() for t in TEST} | {
        t["response"].strip().lower() for t in TEST
    }
    for row in accepted:
        assert row["instruction"].strip().lower() not in test_texts
        assert row["response"].strip().lower() not in test_texts
    # nothing accepted would be flagged by the decontamination filter itself
    cfg = load_config(layout.params_file).synthesize
    params = dataquality.DecontamParams(rouge_threshold=cfg.decontam_threshold)
    assert dataquality.decontaminate(accepted, TEST, params=params).dropped == []
    for row in rejected:
        assert row["reason"] in synthesize.FILTERS and row["detail"]
