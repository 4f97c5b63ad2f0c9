"""Pairwise comparison beside the grading (04, `evaluate.pairwise`): the student's answer against the reference,
asked in both orders through the real ServicePool against the fake LLM server, whose judge follows a known
policy (always the first slot, the longer answer, the student's marker, unreadable prose), so the wins, ties,
position flips, win rate and its cluster-bootstrap interval are known. The verdict reader on realistic replies;
the forecast plans exactly the calls the ledger then books."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from tinyrun import TEST, make_tiny_run

import llamaduo_nb.testing.server as fake_server
from llamaduo_nb import evaluate, forecast, summary
from llamaduo_nb.callcache import read_ledger
from llamaduo_nb.config import ConfigError, RunConfig, build, dump_config, load_config
from llamaduo_nb.jsonio import read_jsonl, write_jsonl
from llamaduo_nb.notebook import Stage
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.schemas import LEDGER_PAIRWISE, read_metrics
from llamaduo_nb.services import ServicePool
from llamaduo_nb.testing import Behaviour, TestLLMServer

ROOT = Path(__file__).resolve().parent.parent
ANSWERS = re.compile(r"### Answer A\n(?P<a>.*)\n\n### Answer B\n(?P<b>.*)\n\Z", re.DOTALL)
STUDENT = "[student]"  # marks the student's answers, for the judge that recognises them
_default_reply = fake_server.reply_text
POLICY: dict[str, object] = {}


def winner(name: str) -> str:
    return json.dumps({"winner": name})


def policy_reply(body: dict) -> str:
    """The fake judge: a comparison is answered by the test's policy, anything else as the server would."""
    match = ANSWERS.search(body["messages"][0]["content"]) if body.get("messages") else None
    if match is None:
        return _default_reply(body)
    return POLICY["reply"](match.group("a"), match.group("b"))


@pytest.fixture(scope="module")
def server():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fake_server, "reply_text", policy_reply)
        with TestLLMServer(Behaviour()) as running:
            yield running


def config(root: Path, server: TestLLMServer, **evaluate_keys) -> RunConfig:
    judge = {"name": "judge", "kind": "openai_compatible", "model": "pairwise-judge", "base_url": server.base_url,
             "free": True, "rpm": 60_000, "max_retries": 0}  # fmt: skip
    data = {
        "run_name": "pairwise",
        "outputs_dir": str(root / "outputs"),
        "prices_file": str(ROOT / "params" / "prices.yaml"),
        "coverage": {"source": "unused.jsonl"},
        "evaluate": {
            "judges": ["judge"],
            "m": 1,
            "pairwise": True,
            "bootstrap_samples": 400,
            **evaluate_keys,
        },
        "synthesize": {"generator": "judge"},
        "providers": [judge],
    }
    return build(RunConfig, data, source="<test>")


def rows_of(prompts: list[tuple[str, str, list[str]]]) -> list[dict]:
    """03-shaped rows: per prompt (id, reference, K candidate answers)."""
    return [
        {"prompt_id": pid, "instruction": f"Task {pid}: answer it.", "reference": ref, "candidate": cand,
         "sample_index": j, "category": "qa"}
        for pid, ref, candidates in prompts
        for j, cand in enumerate(candidates)
    ]  # fmt: skip


def compare(cfg: RunConfig, rows: list[dict]) -> tuple[list[dict], dict]:
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    with ServicePool(cfg, layout, LEDGER_PAIRWISE, cycle=0) as pool:
        records = evaluate.judge_pairwise(pool, rows, cfg.evaluate)
    ev = cfg.evaluate
    block = evaluate.summarize_pairwise(records, n_boot=ev.bootstrap_samples, seed=ev.bootstrap_seed)
    return records, block["per_judge"]["judge"]


PROMPTS = [
    ("p1", "Paris.", ["Paris is the capital of France.", "Paris, on the Seine."]),  # both longer
    ("p2", "The meeting moved to Friday.", ["Friday.", "On Friday, because the room was booked."]),
    ("p3", "Blue, on a clear day.", ["Blue.", "Grey."]),  # both shorter
]


def test_a_judge_that_always_picks_the_first_slot_flips_every_pair_to_a_tie(tmp_path, server):
    POLICY["reply"] = lambda a, b: winner("A")
    cfg = config(tmp_path, server, pairwise_m=2)
    rows = rows_of(PROMPTS)
    records, entry = compare(cfg, rows)
    # both orders asked for every (row, repeat): the student is A, then B
    assert len(records) == len(rows) * 2 * 2
    assert {(r["order"], r["verdict"], r["student"]) for r in records} == {
        ("student_first", "A", "win"),
        ("student_second", "A", "loss"),
    }
    pairs = len(rows) * 2
    assert entry["pairs"] == entry["ties"] == entry["position_flips"] == entry["first_slot_both"] == pairs
    assert entry["wins"] == entry["losses"] == entry["failures"] == entry["second_slot_both"] == 0
    assert entry["win_rate"] == 0.5 and entry["win_rate_ci95"] == [0.5, 0.5]
    assert "mostly flips" in evaluate.pairwise_line({"pairwise": {"per_judge": {"judge": entry}}})


def test_a_judge_that_prefers_the_longer_answer_gives_the_known_win_rate(tmp_path, server):
    POLICY["reply"] = lambda a, b: winner("A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie")
    cfg = config(tmp_path, server)
    # p4: as long as the reference, a tie stated in both orders; p5: the reference itself, a tie without a call
    rows = rows_of([*PROMPTS, ("p4", "Milan.", ["Turin."]), ("p5", "Rome.", [" Rome.\n"])])
    records, entry = compare(cfg, rows)
    longer = [len(r["candidate"]) > len(r["reference"]) for r in rows[:-2]]
    wins, losses = sum(longer), len(longer) - sum(longer)
    assert (entry["wins"], entry["losses"], entry["ties"], entry["position_flips"]) == (wins, losses, 2, 0)
    assert entry["pairs"] == len(rows) and entry["prompts"] == 5 and entry["identical"] == 1
    assert entry["win_rate"] == pytest.approx((wins + 1) / len(rows))
    same = [r for r in records if r["prompt_id"] == "p5"]
    assert [(r["ok"], r["student"], r["identical"], r["cache_key"]) for r in same] == [
        (True, "tie", True, None)
    ] * 2
    # the interval resamples prompts (a prompt's K answers together), as V's does
    points = [1.0 if s else 0.0 for s in longer] + [0.5, 0.5]
    expected = evaluate.cluster_bootstrap(points, [r["prompt_id"] for r in rows], n_boot=400, seed=0)
    assert entry["win_rate_ci95"] == pytest.approx(list(expected))
    lo, hi = entry["win_rate_ci95"]
    assert 0 <= lo < entry["win_rate"] < hi <= 1
    # per prompt, the K answers' outcomes: p1 wins twice, p3 loses twice
    table = evaluate.pair_outcomes(records)
    assert set(table[table.prompt_id == "p1"].outcome) == {"win"}
    assert set(table[table.prompt_id == "p3"].outcome) == {"loss"}


def test_a_judge_that_sees_through_the_order_wins_every_pair_and_unreadable_replies_are_failures(
    tmp_path, server
):
    def judge(a: str, b: str) -> str:
        if "unclear" in a + b:
            return "Both answers have merits; I lean towards the first one."  # no verdict: never guessed
        return winner("A" if STUDENT in a else "B")

    POLICY["reply"] = judge
    cfg = config(tmp_path, server)
    rows = rows_of([("p1", "Paris.", [f"Paris {STUDENT}", f"It is Paris {STUDENT}"]),
                    ("p2", "Rome.", [f"unclear {STUDENT}"])])  # fmt: skip
    rows.append({**rows[0], "sample_index": 2, "candidate": "", "error": "timeout"})  # a failed answer
    records, entry = compare(cfg, rows)
    assert (entry["pairs"], entry["wins"], entry["failures"]) == (2, 2, 2)
    assert entry["win_rate"] == 1.0 and entry["win_rate_ci95"] == [1.0, 1.0]
    unread = [r for r in records if r["prompt_id"] == "p2"]
    assert len(unread) == 2 and all(not r["ok"] and r["error"].startswith("parse:") for r in unread)
    assert all(r["raw"].startswith("Both answers have merits") for r in unread)  # kept for inspection
    answer_failed = [r for r in records if r["sample_index"] == 2]
    assert [r["error"] for r in answer_failed] == ["answer: timeout"] * 2


# --------------------------------------------------------------------------- the reader on realistic replies

READABLE = [
    ('{"winner": "A"}', "A"),
    ('```json\n{"winner": "B"}\n```', "B"),
    ('Answer A misses the date; answer B gives it.\n{"winner": "B"}', "B"),
    ('{"winner": "tie"}', "tie"),
    ('{"winner": "Tie"}', "tie"),
    ('{"winner": "Answer A"}', "A"),
    ('{"winner": "b"}', "B"),
    ('{"winner": "equal"}', "tie"),
    ('{"verdict": "A", "reason": "A follows the instruction."}', "A"),
    ('The format is {"winner": "<A, B or tie>"}. My verdict: {"winner": "A"}', "A"),
    ('For example: {"winner": "B"}\nHere: {"winner": "A"}', "A"),
    ('{"winner": "A"}\nTo repeat: {"winner": "A"}', "A"),
    ('Both are fine. {"winner": "neither"}', "tie"),
]
UNREADABLE = [
    ("I prefer the first answer.", "no JSON object"),
    ('{"winner": "A"} ... on reflection {"winner": "B"}', "2 different"),
    ('{"winner": "A or B"}', "expected"),
    ('{"winner": "<A, B or tie>"}', "quoted examples or placeholders"),
    ('{"score": 80}', "no JSON object with a winner key"),
    ('{"winner": 1}', "expected"),
    ('{"winner": "A", "better": "B"}', "different winners"),
    ("", "no JSON object"),
]


@pytest.mark.parametrize(("reply", "expected"), READABLE)
def test_the_verdict_reader_reads_what_judges_write(reply, expected):
    assert evaluate.read_verdict(reply) == expected


@pytest.mark.parametrize(("reply", "problem"), UNREADABLE)
def test_a_reply_without_one_clear_verdict_is_a_failure(reply, problem):
    with pytest.raises(ValueError, match=problem):
        evaluate.read_verdict(reply)


def test_the_pool_reads_verdicts_with_the_requests_reader_live_and_replayed(tmp_path, server):
    """The free-text replies above on the pool path: `parsed` is the reader's verdict, live and from the cache."""
    cases = READABLE + [(reply, None) for reply, _ in UNREADABLE if reply]  # "" is an unusable reply
    replies = {f"row{i}": reply for i, (reply, _) in enumerate(cases)}

    def judge(a: str, b: str) -> str:  # the row's key starts the student's answer, in either slot
        return replies.get(a.split()[0]) or replies[b.split()[0]]

    POLICY["reply"] = judge
    cfg = config(tmp_path, server)
    rows = rows_of([(key, "ref", [f"{key} answer"]) for key in replies])
    requests = evaluate.pairwise_requests(rows, cfg.evaluate, evaluate.pairwise_template())
    assert all(r.reader is evaluate.read_verdict for r in requests)
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    with ServicePool(cfg, layout, LEDGER_PAIRWISE, cycle=0) as pool:
        live = pool.complete_many("judge", requests)
        again = pool.complete_many("judge", requests)
    expected = [want for _, want in cases]
    for i, want in enumerate(expected):
        for result in (live[2 * i], again[2 * i]):  # student first; the policy answers both orders alike
            assert result.parsed == want
            assert (result.parse_error is None) == (want is not None)
    assert all(r.cached for r in again)


# --------------------------------------------------------------------------- config, forecast and metrics.json


def test_pairwise_needs_an_llm_judge_and_its_keys_are_checked(tmp_path, server):
    with pytest.raises(ConfigError, match="pairwise comparison needs an LLM judge"):
        config(tmp_path, server, judges=[], metric_judges=["rougeL"])
    with pytest.raises(ConfigError, match="pairwise_m"):
        config(tmp_path, server, pairwise_m=0)
    with pytest.raises(ConfigError, match="unknown key"):
        config(tmp_path, server, pairwise_orders=2)


def test_the_forecast_plans_every_pairwise_call_the_ledger_books_and_metrics_hold_the_block(tmp_path, server):
    """A paid-priced judge: 04's forecast holds a `04_pairwise` line whose calls equal the ledger's rows of
    that stage (every answer x 2 orders x pairwise_m), within its USD bound; metrics.json gets the block."""
    POLICY["reply"] = lambda a, b: winner("A" if len(a) >= len(b) else "B")
    layout = make_tiny_run(tmp_path / "run")
    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump({"models": {"paid-test-model": {"input": 1.0, "output": 4.0}}}))
    data = yaml.safe_load(layout.params_file.read_text())
    data.update(prices_file=str(prices))
    data["providers"] = [{"name": "svc", "kind": "openai_compatible", "model": "paid-test-model",
                          "base_url": server.base_url, "rpm": 100_000, "tpm": 100_000_000}]  # fmt: skip
    data["evaluate"] = {"judges": ["svc"], "m": 1, "metric_judges": ["rougeL"], "decision_judges": ["rougeL"],
                        "baselines": [], "base_student": False, "pairwise": True, "pairwise_m": 2}  # fmt: skip
    data["synthesize"]["generator"] = "svc"
    data.pop("teacher_study", None)
    cfg = build(RunConfig, data, source="tests")
    dump_config(cfg, layout.params_file)
    k = cfg.inference.k
    write_jsonl(
        layout.responses_file(0),
        [{"prompt_id": f"test-{i}", "instruction": q, "reference": a, "candidate": f"{a} (sample {j})" if j else "x",
          "sample_index": j, "category": c} for i, (q, a, c) in enumerate(TEST) for j in range(k)],
    )  # fmt: skip
    responses = evaluate.load_responses(layout.responses_file(0))

    shown = forecast.forecast_stage(cfg, "04_evaluate", 0, layout)
    line = shown[shown.stage == LEDGER_PAIRWISE].iloc[0]
    planned = evaluate.planned_pairwise_calls(cfg, 0, [], layout).calls
    assert line.calls == len(planned) == len(TEST) * k * 2 * 2
    stage = Stage("04_evaluate", cfg, layout, 0)
    judgments = evaluate.run_judges(stage, responses)
    records = evaluate.run_pairwise(stage, responses)
    assert records == read_jsonl(layout.pairwise_file(0))
    booked = [r for r in read_ledger(layout.calls_db) if r["stage"] == LEDGER_PAIRWISE]
    assert len(booked) == line.calls and all(r["ok"] for r in booked)
    assert 0 < sum(r["cost_usd"] for r in booked) <= line.worst_usd

    evaluate.write_metrics(stage, judgments, records)
    block = read_metrics(layout, 0)["pairwise"]
    entry = block["per_judge"]["svc"]
    # sample 0 ("x") is shorter than every reference, samples 1 longer: the longer-answer judge decides
    assert (entry["wins"], entry["losses"], entry["ties"]) == (2 * len(TEST), 2 * len(TEST), 0)  # 2 repeats
    assert entry["win_rate"] == 0.5 and block["m"] == 2 and "both orders" in block["rule"]
    assert list(evaluate.pairwise_table(read_metrics(layout, 0)).index) == ["svc"]
    assert "svc 0.50" in evaluate.pairwise_line(read_metrics(layout, 0))
    (line,) = summary.pairwise_lines(cfg, layout)
    assert (
        line.startswith("- cycle 0: win rate against the reference: svc 0.50 [")
        and "mostly flips" not in line
    )
    demo = load_config(ROOT / "params" / "demo.yaml", {"evaluate.pairwise": True})
    assert "the embedded 135M model; its verdicts mean little" in summary.pairwise_lines(demo, layout)[-1]
    fig = evaluate.plot_pairwise(read_metrics(layout, 0), layout.pairwise_plot(0))
    assert layout.pairwise_plot(0).stat().st_size > 0
    import matplotlib.pyplot as plt

    plt.close(fig)
    # off: nothing planned, nothing sent, no block
    off = build(RunConfig, {**data, "evaluate": {**data["evaluate"], "pairwise": False}}, source="tests")
    assert not evaluate.planned_pairwise_calls(off, 0, [], layout)
    assert evaluate.run_pairwise(Stage("04_evaluate", off, layout, 0), responses) == []
