"""One reading of a judge reply on every path: 04's real path (a ServicePool against the local OpenAI-compatible
fake server in free-text mode, then `judge_rows`), its cache replay and the pool's `parsed` read a reply exactly
as the judge's reader does. Replies that quote an example, repeat themselves, correct themselves or mention a
fraction from the task: no wrong score, no valid judgment lost. Property tests over generated replies run on
the pool path, not only the parser; the reward and pair readers are the requests' readers too."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_services import record_forecast

import llamaduo_nb.testing.server as fake_server
from llamaduo_nb import evaluate, synthesize
from llamaduo_nb.config import RewardConfig, RunConfig, SynthesizeConfig, build
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.schemas import LEDGER_JUDGING
from llamaduo_nb.services import ChatRequest, ServicePool, parse_structured, read_one
from llamaduo_nb.synthesize.teacher import parse_reward, reward_requests
from llamaduo_nb.testing import Behaviour, TestLLMServer

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"ROW-\d+")
REPLIES: dict[str, str] = {}  # row marker -> what the fake judge answers for it
_ids = itertools.count()


def judgment(similarity: int, precision: int, rationale: str | None = None) -> str:
    obj: dict = {"similarity": similarity, "precision": precision}
    if rationale is not None:
        obj["rationale"] = rationale
    return json.dumps(obj)


def scripted_reply(body: dict) -> str:
    """The fake server's reply to a request: the one scripted for the row marker in its prompt."""
    found = MARK.search(json.dumps(body))
    return REPLIES[found.group(0)] if found else "no row marker in the prompt"


@pytest.fixture(scope="module")
def server():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fake_server, "reply_text", scripted_reply)
        with TestLLMServer(Behaviour()) as running:
            yield running


def judge_config(root: Path, server: TestLLMServer, json_mode: str) -> RunConfig:
    judge = {
        "name": "judge",
        "kind": "openai_compatible",
        "model": "free-text-judge",
        "base_url": server.base_url,
        "json_mode": json_mode,
        "free": True,
        "rpm": 60_000,  # no pacing: the server is local
        "max_retries": 1,
    }
    data = {
        "run_name": f"judged-{json_mode}",
        "outputs_dir": str(root / "outputs"),
        "prices_file": str(ROOT / "params" / "prices.yaml"),
        "coverage": {"source": "unused.jsonl"},
        "evaluate": {"judges": ["judge"], "m": 1},
        "synthesize": {"generator": "judge"},
        "providers": [judge],
    }
    return build(RunConfig, data, source="<test>")


def row_for(reply: str, instruction: str = "", reference: str = "", candidate: str = "") -> dict:
    """A response row (03's shape) whose judge will answer `reply`."""
    marker = f"ROW-{next(_ids)}"
    REPLIES[marker] = reply
    return {
        "prompt_id": marker,
        "instruction": f"{marker}: {instruction or 'Name the capital of France.'}",
        "reference": reference or "Paris.",
        "candidate": candidate or "It is Paris.",
        "sample_index": 0,
        "category": "qa",
    }


def judge_on_the_pool(cfg: RunConfig, rows: list[dict]) -> tuple[list[dict], list]:
    """04's real path: judge_rows through a ServicePool; then the same requests again (cache replays)."""
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    with ServicePool(cfg, layout, LEDGER_JUDGING, cycle=0) as pool:
        judgments = evaluate.judge_rows(pool, rows, cfg.evaluate)
        requests = evaluate.judge_requests(rows, cfg.evaluate, evaluate.judge_template())
        replayed = pool.complete_many("judge", requests)
    assert all(r.cached for r in replayed)  # answered once, re-read from the cache
    return judgments, replayed


def scores_of(record: dict) -> tuple[float, float] | None:
    return (record["similarity"], record["precision"]) if record["ok"] else None


# --------------------------------------------------------------------------- the acceptance replies

PIZZA = {
    "instruction": "Seven of the 8 slices were eaten. What fraction of the pizza was eaten?",
    "reference": "7/8 of the pizza was eaten.",
    "candidate": "They ate 7/8 of it.",
}
CRITIC = {
    "instruction": "The critic gave the film a rating of 4 out of 5. Summarize the review in a sentence.",
    "reference": "A warm, funny film; the critic rates it 4 out of 5.",
    "candidate": "The critic hated the film.",
}
PLACEHOLDER = '{"similarity": "<integer 1-100>", "precision": "<integer 1-100>"}'

# (reply, the row's texts, the scores the judge gave, or None when the reply must be a failure)
CASES = [
    (f"Reply format: {PLACEHOLDER}\nMy judgment: {judgment(62, 71)}", {}, (62, 71)),
    (f"For example: {judgment(85, 90)}\nFor this answer: {judgment(40, 55)}", {}, (40, 55)),
    (
        f"Example output:\n```json\n{judgment(100, 100)}\n```\nActual:\n```json\n{judgment(33, 48)}\n```",
        {},
        (33, 48),
    ),
    (f"{judgment(85, 90)} is just an example of the format; mine: {judgment(20, 30)}", {}, (20, 30)),
    (f"e.g. {judgment(50, 50)}. Here it is: {judgment(91, 88)}", {}, (91, 88)),
    (f"Here is my judgment in the requested JSON format:\n{judgment(77, 64)}", {}, (77, 64)),
    (f"Expected format: {judgment(85, 90)}\nMy scores: {judgment(12, 25)}", {}, (12, 25)),
    (f"Minor issues such as missing units:\n{judgment(66, 61)}", {}, (66, 61)),
    # repeats itself (a different rationale is the same judgment)
    (f"{judgment(58, 60, 'Close.')}\nTo repeat: {judgment(58, 60, 'Close enough.')}", {}, (58, 60)),
    # corrects itself, either way round: ambiguous, a failure, never the first (or the last) attempt
    (f"First {judgment(40, 50)}, on reflection {judgment(70, 80)}", {}, None),
    (f"{judgment(70, 80)} - no wait, {judgment(45, 50)} is fairer.", {}, None),
    # fractions from the task are not a scale
    (
        "The reference says 7/8 and the candidate also gives 7/8; it covers 3 out of 4 points of the "
        f"reference. {judgment(95, 97)}",
        PIZZA,
        (95, 97),
    ),
    (f"Precision: the candidate lists 3 out of 4 steps correctly. {judgment(70, 75)}", {}, (70, 75)),
    (f"The candidate drops the critic's rating of 4 out of 5 entirely. {judgment(4, 3)}", CRITIC, (4, 3)),
    # the judge's own statement of another scale: never read as x/100
    (f"Similarity: 8/10. Precision: 7 out of 10.\n{judgment(8, 7)}", {}, None),
    (f"I rate it 6/10 overall {judgment(6, 9)}", {}, None),
    (f"On a scale of 1-10: {judgment(5, 5)}", {}, None),
    (f"Score: 8/10, i.e. {judgment(80, 75)}", {}, (80, 75)),  # the verdict cannot be on the 0-10 scale
    # only a placeholder: nothing to score
    (f"Use this format: {PLACEHOLDER}", {}, None),
]


@pytest.mark.parametrize("json_mode", ["none", "object"])
def test_free_text_judge_replies_read_the_same_on_04s_real_path(tmp_path, server, json_mode):
    cfg = judge_config(tmp_path, server, json_mode)
    rows = [row_for(reply, **texts) for reply, texts, _ in CASES]
    judgments, replayed = judge_on_the_pool(cfg, rows)

    assert [j["prompt_id"] for j in judgments] == [r["prompt_id"] for r in rows]
    for (reply, _, expected), record, result in zip(CASES, judgments, replayed, strict=True):
        wanted = None if expected is None else tuple(float(v) for v in expected)
        assert scores_of(record) == wanted, reply  # no wrong score, no valid judgment lost
        if expected is None:
            assert record["error"].startswith(("parse:", "range:")) and record["raw"] == reply
            assert result.parsed is None and result.parse_error  # the pool read it the same way
        else:
            assert (result.parsed["similarity"], result.parsed["precision"]) == wanted
            assert result.parse_error is None
    # the verdict's rationale, not the example's
    assert judgments[8]["rationale"] == "Close."


def test_provider_batch_results_are_read_by_the_judges_reader(tmp_path, server, monkeypatch):
    """A `batch: true` judge (OpenAI's batch API on the fake server): batch results are read like live ones."""
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    live = judge_config(tmp_path, server, "none")
    judge = dataclasses.replace(
        live.providers[0], kind="openai", model="gpt-4o-mini", free=False, batch=True, batch_poll_s=0.05
    )
    cfg = dataclasses.replace(live, providers=[judge])
    rows = [row_for(reply, **texts) for reply, texts, _ in CASES]
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    requests = evaluate.judge_requests(rows, cfg.evaluate, evaluate.judge_template())
    record_forecast(layout, LEDGER_JUDGING, 0, "judge")
    with ServicePool(cfg, layout, LEDGER_JUDGING, cycle=0) as pool:
        batched = pool.complete_many("judge", requests)  # one batch: every result read from the batch file
        judgments = evaluate.judge_rows(pool, rows, cfg.evaluate)  # replays
    assert server.batch_submits["openai"] == 1 and not any(r.cached for r in batched)
    for (reply, _, expected), result, record in zip(CASES, batched, judgments, strict=True):
        wanted = None if expected is None else tuple(map(float, expected))
        read = None if result.parsed is None else (result.parsed["similarity"], result.parsed["precision"])
        assert read == wanted == scores_of(record), reply


def test_a_cached_reply_is_read_again_by_todays_reader(tmp_path, server):
    """The reader is not part of the cache key: a reply cached before (read by another reader) replays and
    is read by the request's reader now."""
    cfg = judge_config(tmp_path, server, "none")
    rows = [row_for('Mine: {"similarity": "40", "precision": "55/100"}')]
    requests = evaluate.judge_requests(rows, cfg.evaluate, evaluate.judge_template())
    bare = [dataclasses.replace(r, reader=None) for r in requests]
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    with ServicePool(cfg, layout, LEDGER_JUDGING, cycle=0) as pool:
        assert pool.cache_key("judge", bare[0]) == pool.cache_key("judge", requests[0])
        (first,) = pool.complete_many("judge", bare)  # no reader: the schema's reading (integers only)
        (again,) = pool.complete_many("judge", requests)
    assert not first.cached and first.parsed is None and "schema" in first.parse_error
    assert again.cached and again.parsed["similarity"] == 40.0 and again.parse_error is None


# --------------------------------------------------------------------------- generated replies, pool path

SCORES = st.integers(min_value=1, max_value=100)
PROSE = st.sampled_from(
    ["", "The candidate is mostly right. ", "Close to the reference, one detail is missing. ", "Hmm. "]
)


@st.composite
def judge_replies(draw) -> tuple[str, dict, tuple[float, float] | None]:
    """(reply, row texts, expected scores or None): a verdict with quoted examples, repeats, corrections,
    fractions from the task, and the judge's own scale statements around it."""
    s, p = draw(SCORES), draw(SCORES)
    verdict = judgment(s, p, draw(st.sampled_from([None, "Names the right city."])))
    # the task's fractions have tops 2-4, the judge's own statements 5-20: they never coincide
    a, b = draw(st.integers(1, 9)), draw(st.integers(2, 4))
    texts = {"reference": f"About {a}/{b} of the cases.", "candidate": f"Roughly {a}/{b}."}
    expected: tuple[float, float] | None = (float(s), float(p))
    parts = [draw(PROSE)]
    example = draw(st.sampled_from(["none", "placeholder", "for example", "fenced", "after"]))
    other = judgment(draw(SCORES), draw(SCORES))
    if example == "placeholder":
        parts.append(f"The format is {PLACEHOLDER}. ")
    elif example == "for example":
        parts.append(f"For example: {other}\n")
    elif example == "fenced":
        parts.append(f"Example:\n```json\n{other}\n```\nMine:\n")
    elif example == "after":
        parts.append(f"{other} (example)\n")
    fraction = draw(st.sampled_from(["none", "quoted", "quoted near a score word", "count", "own"]))
    if fraction == "quoted":
        parts.append(f"The reference says {a}/{b}. ")
    elif fraction == "quoted near a score word":
        parts.append(f"Its precision matches the reference's {a}/{b}. ")
    elif fraction == "count":  # the judge's own count next to a score word: a scale only if a score fits it
        n, d = draw(st.integers(1, 5)), draw(st.integers(5, 20))
        parts.append(f"Precision: it lists {n} out of {d} steps. ")
        if min(s, p) <= d:
            expected = None
    elif fraction == "own":
        d = draw(st.sampled_from([5, 10, 20]))
        parts.append(f"Score: {max(1, round(s * d / 100))}/{d}. ")
        if min(s, p) <= d:
            expected = None
    parts.append(draw(st.sampled_from(["", "```json\n"])) + verdict)
    ending = draw(st.sampled_from(["none", "repeat", "correction"]))
    if ending == "repeat":
        parts.append(f"\nAgain: {judgment(s, p)}")
    elif ending == "correction":
        corrected = draw(st.tuples(SCORES, SCORES).filter(lambda sp: sp != (s, p)))
        parts.append(f"\nOn reflection: {judgment(*corrected)}")
        expected = None
    return "".join(parts), texts, expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(judge_replies(), min_size=1, max_size=6))
def test_generated_replies_on_the_pool_path_are_the_verdict_or_a_failure(tmp_path, server, replies):
    cfg = judge_config(tmp_path, server, "none")
    rows = [row_for(reply, **texts) for reply, texts, _ in replies]
    judgments, replayed = judge_on_the_pool(cfg, rows)
    for (reply, texts, expected), record, result in zip(replies, judgments, replayed, strict=True):
        assert scores_of(record) == expected, reply
        read = None if result.parsed is None else (result.parsed["similarity"], result.parsed["precision"])
        assert read == expected, reply  # the pool's parsed is the same reading
        quoted = [texts.get("instruction", ""), texts["reference"], texts["candidate"]]
        try:
            alone = evaluate.parse_judgment(reply, quoted=quoted)
        except ValueError:
            alone = None
        assert alone == (
            None if expected is None else dict(zip(("similarity", "precision"), expected, strict=True))
        )


# --------------------------------------------------------------------------- the rule itself

VERDICT, OTHER = judgment(30, 40), judgment(85, 90)


@pytest.mark.parametrize(
    "intro",
    [
        "For example: {other}\n",
        "e.g. {other}. ",
        "Here is an example of the format: {other}\n",
        "The format is {other}; ",
        "Expected format:\n```json\n{other}\n```\n",
        "A reply should look like {other}, so:\n",
        "{other} is just an example.\n",
        "{other} (example)\n",
        'Format: {{"similarity": "<integer 1-100>", "precision": "..."}}\n',
    ],
)
def test_a_quoted_example_is_never_the_verdict(intro):
    assert evaluate.parse_judgment(intro.format(other=OTHER) + VERDICT) == {
        "similarity": 30.0,
        "precision": 40.0,
    }
    with pytest.raises(ValueError, match="quoted examples or placeholders"):
        evaluate.parse_judgment(intro.format(other=OTHER))  # an example alone is no verdict either


@pytest.mark.parametrize(
    "intro",
    [
        "Here is my judgment in the requested JSON format:\n",
        "Following the format:\n",
        "Minor issues such as missing units:\n",
        "The candidate misses one example. ",
        "My verdict:\n```json\n",
    ],
)
def test_prose_that_announces_the_verdict_keeps_it(intro):
    assert evaluate.parse_judgment(intro + VERDICT) == {"similarity": 30.0, "precision": 40.0}


# --------------------------------------------------------------------------- the other readers


def test_reward_and_pair_requests_carry_their_reader_and_read_by_the_same_rule():
    (request,) = reward_requests(RewardConfig(judge="g", m=1), [("q", "a")])
    assert request.reader is parse_reward
    assert parse_reward('e.g. {"quality": 50}. Mine: {"quality": 77}') == 77.0
    assert parse_reward('Format: {"quality": "<integer 1-100>"}\n{"quality": 64}') == 64.0
    with pytest.raises(ValueError, match="2 different"):
        parse_reward('{"quality": 30} ... actually {"quality": 60}')

    templates = synthesize.load_templates()
    seed = {"id": "s1", "instruction": "Say hi.", "response": "Hi.", "category": "general"}
    (pairs_request,) = synthesize.request_batch([seed], SynthesizeConfig(generator="g"), templates, 0)
    assert pairs_request.reader is synthesize.parse_pairs
    pairs = '{"pairs": [{"instruction": "a", "response": "b"}]}'
    echoed = '{"pairs": [{"instruction": "...", "response": "..."}]}'  # the prompt's format, echoed
    assert synthesize.parse_pairs(f"Format: {echoed}\nHere are two example pairs: {pairs}")[0] == [
        {"instruction": "a", "response": "b"}
    ]
    with pytest.raises(ValueError, match="2 different lists of pairs"):
        synthesize.parse_pairs(f'{pairs}\nOr: {{"pairs": [{{"instruction": "c", "response": "d"}}]}}')


def test_without_a_reader_the_schema_reading_follows_the_same_rule():
    schema = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
    assert parse_structured('For example: {"score": 1}. Mine: {"score": 4}', schema) == ({"score": 4}, None)
    assert parse_structured('{"score": 4} then {"score": 4}', schema) == ({"score": 4}, None)
    parsed, error = parse_structured('{"score": 4}, no, {"score": 5}', schema)
    assert parsed is None and "2 different" in error
    reading, value = read_one('{"a": 1}', lambda v: isinstance(v, dict))
    assert reading == value == {"a": 1}
    assert ChatRequest(messages=[{"role": "user", "content": "x"}], reader=len) == ChatRequest(
        messages=[{"role": "user", "content": "x"}]
    )  # a reader does not make requests differ


def test_reward_and_pair_replies_on_the_pool_path_are_read_by_their_readers(tmp_path, server):
    """The reward judge and the pair generator in free-text mode: the pool's parsed is their reader's value
    (a quoted example or the echoed format is never the answer; a self-correction is a failure)."""
    cfg = judge_config(tmp_path, server, "none")
    rewards = {
        'e.g. {"quality": 50}. Mine: {"quality": 77}': 77.0,
        'Format: {"quality": "<integer 1-100>"}\n{"quality": 64}': 64.0,
        '{"quality": 30} ... actually {"quality": 60}': None,
    }
    markers = [row_for(reply)["instruction"] for reply in rewards]
    reward = reward_requests(RewardConfig(judge="judge", m=1), [(m, "an answer") for m in markers])
    pairs = '{"pairs": [{"instruction": "a", "response": "b"}]}'
    echoed = '{"pairs": [{"instruction": "...", "response": "..."}]}'
    seeds = [
        {"id": "s1", "instruction": row_for(f"Format: {echoed}\nHere are the pairs: {pairs}")["instruction"],
         "response": "Hi.", "category": "general"},
        {"id": "s2", "instruction": row_for(f'{pairs}\nOr: {{"pairs": [{{"instruction": "c", "response": "d"}}]}}')[
            "instruction"], "response": "Hi.", "category": "general"},
    ]  # fmt: skip
    generate = synthesize.request_batch(
        seeds, SynthesizeConfig(generator="judge"), synthesize.load_templates(), 0
    )
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    with ServicePool(cfg, layout, LEDGER_JUDGING, cycle=0) as pool:
        scored = pool.complete_many("judge", reward)
        written = pool.complete_many("judge", generate)
    assert [r.parsed for r in scored] == list(rewards.values())
    assert "2 different rewards" in scored[2].parse_error
    assert (
        written[0].parsed == ([{"instruction": "a", "response": "b"}], 0) and written[0].parse_error is None
    )
    assert written[1].parsed is None and "2 different lists of pairs" in written[1].parse_error
