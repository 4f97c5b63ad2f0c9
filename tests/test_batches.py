"""Provider batch APIs: `batch: true` sends a stage's calls as one OpenAI / Anthropic / Gemini batch.

The real SDKs talk over HTTP to the local test server (llamaduo_nb.testing), which speaks each provider's batch
wire format and ends a batch after a delay, so submitting, persisting the id, polling and reading the results
are all exercised. A killed run is a real SIGKILL of a child process that submitted the batch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_services import record_forecast

from llamaduo_nb.callcache import CallCache, read_ledger
from llamaduo_nb.config import RunConfig, build, load_config
from llamaduo_nb.prices import load_prices
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.services import ChatRequest, ServicePool, StageStopped
from llamaduo_nb.services.batches import BatchBook
from llamaduo_nb.testing import Behaviour, TestLLMServer

ROOT = Path(__file__).resolve().parent.parent
SCORE_SCHEMA = {
    "type": "object",
    "properties": {"similarity": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["similarity"],
    "additionalProperties": False,
}
MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-3-5-haiku", "google": "gemini-1.5-flash"}
KINDS = list(MODELS)


@pytest.fixture
def server():
    with TestLLMServer(Behaviour(batch_delay_s=0.3)) as running:
        yield running


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.setenv(name, f"test-{name.lower()}")


def batch_config(tmp_path: Path, server: TestLLMServer, kind: str, **provider) -> RunConfig:
    judge = {
        "name": "judge",
        "kind": kind,
        "model": MODELS[kind],
        "base_url": server.base_url if kind == "openai" else server.root,
        "batch": True,
        "batch_poll_s": 0.05,
        "max_retries": 1,
        **provider,
    }
    data = {
        "run_name": "batched",
        "outputs_dir": str(tmp_path / "outputs"),
        "prices_file": str(ROOT / "params" / "prices.yaml"),
        "coverage": {"source": "unused.jsonl"},
        "evaluate": {"judges": ["judge"]},
        "synthesize": {"generator": "judge"},
        "providers": [judge],
    }
    return build(RunConfig, data, source="<test>")


def judge_requests(n: int = 3) -> list[ChatRequest]:
    return [
        ChatRequest(
            messages=[{"role": "user", "content": f"Rate answer {i}."}],
            json_schema=SCORE_SCHEMA,
            max_tokens=64,
        )
        for i in range(n)
    ]


def run_pool(cfg: RunConfig, requests: list[ChatRequest], forecast: bool = True):
    """The requests through a 04 pool of cycle 0, after recording the stage's forecast (as the runner does)."""
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    if forecast:
        record_forecast(layout, "04_evaluate", 0, "judge")
    with ServicePool(cfg, layout, stage="04_evaluate", cycle=0) as pool:
        return pool.complete_many("judge", requests), layout


@pytest.mark.parametrize("kind", KINDS)
def test_batched_answers_land_in_the_cache_and_ledger_at_the_batch_price(tmp_path, server, kind):
    cfg = batch_config(tmp_path, server, kind)
    requests = judge_requests(3)
    results, layout = run_pool(cfg, [*requests, requests[0]])  # a duplicate rides along for free

    assert server.batch_submits == {kind: 1}  # one batch, no live call
    assert {e.path for e in server.entries()} == {f"batch:{kind}"}
    assert all(r.ok and r.parse_error is None for r in results)
    assert all(0 <= r.parsed["similarity"] <= 100 for r in results)
    assert results[3].text == results[0].text and results[3].cost_usd == 0.0

    prices = load_prices(cfg.prices_file)
    ledger = read_ledger(layout.calls_db)
    assert len(ledger) == 3 and all(row["ok"] for row in ledger)
    for row in ledger:
        listed = prices.cost(kind, MODELS[kind], row["input_tokens"], row["output_tokens"])
        assert row["cost_usd"] == pytest.approx(listed * 0.5) and row["cost_usd"] > 0

    (entry,) = BatchBook(layout.batches_file("04_evaluate", 0), "04_evaluate", 0).entries()
    assert entry["status"] == "collected" and sorted(entry["keys"]) == sorted(
        r.cache_key for r in results[:3]
    )

    again, _ = run_pool(cfg, requests)  # a re-run replays from the cache: no second batch
    assert server.batch_submits == {kind: 1} and all(r.cached for r in again)
    with CallCache(layout.calls_db) as cache:
        assert cache.n_cached() == 3


CHILD = """
import sys
from llamaduo_nb.config import load_config
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.services import ChatRequest, ServicePool
sys.path.insert(0, {tests!r})
from test_batches import judge_requests
from test_services import record_forecast
cfg = load_config({params!r})
layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
record_forecast(layout, "04_evaluate", 0, "judge")
with ServicePool(cfg, layout, "04_evaluate", 0) as pool:
    pool.complete_many("judge", judge_requests(3))
"""


def submit_then_kill(tmp_path: Path, server: TestLLMServer, kind: str) -> Path:
    """A child process submits judge_requests(3) as a batch and is SIGKILLed while it polls; the params file."""
    server.behaviour = Behaviour(batch_delay_s=3600)  # the batch runs for as long as the child lives
    cfg = batch_config(tmp_path, server, kind)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_plain(cfg)))
    book = RunLayout.for_run(cfg.outputs_dir, cfg.run_name).batches_file("04_evaluate", 0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = CHILD.format(tests=str(Path(__file__).parent), params=str(params))
    child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not book.is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert book.is_file(), "the child never persisted its batch id"
        child.send_signal(signal.SIGKILL)  # killed while it polls
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    server.behaviour = Behaviour(batch_delay_s=0.0)  # the provider finishes the batch meanwhile
    return params


@pytest.mark.parametrize("kind", KINDS)
def test_a_killed_run_collects_its_batch_instead_of_submitting_again(tmp_path, server, kind):
    params = submit_then_kill(tmp_path, server, kind)
    cfg = load_config(params)
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    assert server.batch_submits == {kind: 1} and read_ledger(layout.calls_db) == []

    results, _ = run_pool(cfg, judge_requests(3))
    assert server.batch_submits == {kind: 1}  # picked up, never paid twice
    assert all(r.ok for r in results)
    assert len(read_ledger(layout.calls_db)) == 3
    (entry,) = BatchBook(layout.batches_file("04_evaluate", 0), "04_evaluate", 0).entries()
    assert entry["status"] == "collected"


def test_a_provider_switched_back_to_live_calls_still_collects_the_left_batch(tmp_path, server):
    params = submit_then_kill(tmp_path, server, "anthropic")
    data = yaml.safe_load(params.read_text())
    data["providers"][0]["batch"] = False
    params.write_text(yaml.safe_dump(data))
    cfg = load_config(params)

    results, layout = run_pool(cfg, judge_requests(3))
    assert all(r.ok and r.cached for r in results)  # answered by the left batch: no live call paid again
    assert server.batch_submits == {"anthropic": 1}
    assert {e.path for e in server.entries()} == {"batch:anthropic"}
    ledger = read_ledger(layout.calls_db)
    assert len(ledger) == 3 and all(row["ok"] and row["cost_usd"] > 0 for row in ledger)


def test_a_left_batch_waits_for_the_call_that_asks_for_its_requests(tmp_path, server):
    """05 asks in rounds: a batch of a killed later round is collected by that round, so its answers are cached."""
    params = submit_then_kill(tmp_path, server, "openai")
    cfg = load_config(params)
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    book = BatchBook(layout.batches_file("04_evaluate", 0), "04_evaluate", 0)
    other = [ChatRequest(messages=[{"role": "user", "content": "Another round."}], max_tokens=32)]

    run_pool(cfg, other)  # an earlier round with its own requests: submits its own batch, leaves the other
    assert server.batch_submits == {"openai": 2}
    assert [e["status"] for e in book.entries()] == ["submitted", "collected"]

    results, _ = run_pool(cfg, judge_requests(3))  # the killed round again: collects its batch
    assert server.batch_submits == {"openai": 2} and all(r.ok for r in results)
    assert [e["status"] for e in book.entries()] == ["collected", "collected"]
    with CallCache(layout.calls_db) as cache:
        assert cache.n_cached() == 4


def _plain(cfg: RunConfig) -> dict:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}


@pytest.mark.parametrize("kind", KINDS)
def test_an_errored_item_is_ledgered_as_a_failure_and_the_rest_are_kept(tmp_path, server, kind):
    cfg = batch_config(tmp_path, server, kind, failure_window=5)
    server.fail_next("error", 1)  # the first item of the batch errors
    results, layout = run_pool(cfg, judge_requests(3))

    failed = [r for r in results if not r.ok]
    assert len(failed) == 1 and failed[0].cost_usd == 0.0 and "batch" in failed[0].error
    ledger = read_ledger(layout.calls_db)
    assert sorted(row["ok"] for row in ledger) == [False, True, True]
    (bad,) = [row for row in ledger if not row["ok"]]
    assert bad["cost_usd"] == 0.0 and bad["cache_key"] == failed[0].cache_key
    with CallCache(layout.calls_db) as cache:
        assert cache.get(failed[0].cache_key) is None and cache.n_cached() == 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_with_too_many_errored_items_stops_the_stage(tmp_path, server, kind):
    cfg = batch_config(tmp_path, server, kind, failure_window=3, max_failure_share=0.5)
    server.fail_next("error", 2)
    with pytest.raises(StageStopped, match=r"'judge'.*2 of 3 requests in batch \S+ failed"):
        run_pool(cfg, judge_requests(3))


@pytest.mark.parametrize("kind", KINDS)
def test_a_rejected_key_on_submit_stops_the_stage_naming_the_provider(tmp_path, server, kind):
    server.behaviour = Behaviour(auth_error=True)
    cfg = batch_config(tmp_path, server, kind)
    with pytest.raises(StageStopped) as stopped:
        run_pool(cfg, judge_requests(3))
    message = str(stopped.value)
    assert f"'judge' ({kind}, model {MODELS[kind]})" in message and "authentication" in message
    assert "test-" not in message  # the key is never echoed
    assert server.batch_submits == {}
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    (row,) = read_ledger(layout.calls_db)  # the failed submit, at $0
    assert not row["ok"] and row["cost_usd"] == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_an_expired_batch_stops_the_stage_and_resume_sends_only_the_unanswered(tmp_path, server, kind):
    cfg = batch_config(tmp_path, server, kind)
    server.end_next_batch("expired")  # answers the first half (2 of 3), then expires
    with pytest.raises(StageStopped, match=r"batch \S+ expired.*1 of 3 requests unanswered"):
        run_pool(cfg, judge_requests(3))
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    assert sum(row["ok"] for row in read_ledger(layout.calls_db)) == 2

    results, _ = run_pool(cfg, judge_requests(3))  # --resume: one new batch with the one unanswered request
    assert server.batch_submits == {kind: 2} and all(r.ok for r in results)
    assert [r.cached for r in results].count(False) == 1
    entries = BatchBook(layout.batches_file("04_evaluate", 0), "04_evaluate", 0).entries()
    assert [len(e["keys"]) for e in entries] == [3, 1]


def test_a_batch_is_not_submitted_across_the_budget(tmp_path, server):
    cfg = batch_config(tmp_path, server, "openai")
    cfg = build(RunConfig, {**_plain(cfg), "budget": {"stage_usd": 1e-6}}, source="<test>")
    with pytest.raises(StageStopped, match="budget.stage_usd"):
        run_pool(cfg, judge_requests(3))
    assert server.batch_submits == {}


@pytest.mark.parametrize("kind", KINDS)
def test_no_batch_is_submitted_before_its_stage_forecast(tmp_path, server, kind):
    cfg = batch_config(tmp_path, server, kind)
    with pytest.raises(StageStopped, match="no forecast recorded for 04_evaluate"):
        run_pool(cfg, judge_requests(3), forecast=False)
    assert server.batch_submits == {} and server.entries() == []
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    assert read_ledger(layout.calls_db) == []

    results, _ = run_pool(cfg, judge_requests(3))  # once the forecast is recorded, the batch goes out
    assert server.batch_submits == {kind: 1} and all(r.ok for r in results)


def test_the_forecast_prices_a_batch_provider_at_the_batch_discount(tmp_path, server):
    from llamaduo_nb.forecast import forecast_stage

    live = forecast_stage(batch_config(tmp_path, server, "openai", batch=False), "04_evaluate", 0)
    batched = forecast_stage(batch_config(tmp_path, server, "openai"), "04_evaluate", 0)
    assert live.loc[0, "usd"] > 0
    assert batched.loc[0, "usd"] == pytest.approx(live.loc[0, "usd"] * 0.5)
    assert batched.loc[0, "worst_usd"] == pytest.approx(live.loc[0, "worst_usd"] * 0.5)
    assert batched.loc[0, "batch_usd"] == pytest.approx(live.loc[0, "batch_usd"])


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_reply_is_paid_kept_out_of_the_cache_and_re_sent_in_the_next_batch(tmp_path, server, kind):
    cfg = batch_config(tmp_path, server, kind, unusable_retries=1)
    server.fail_next("empty", 1)
    results, layout = run_pool(cfg, judge_requests(3))

    assert server.batch_submits == {
        kind: 2
    }  # the follow-up batch holds the one empty reply, never a live call
    assert {e.path for e in server.entries()} == {f"batch:{kind}"}
    assert all(r.ok for r in results)
    ledger = read_ledger(layout.calls_db)
    (empty,) = [row for row in ledger if not row["ok"]]
    assert "empty reply" in empty["error"] and empty["cost_usd"] > 0  # paid, at the batch price
    assert sum(row["ok"] for row in ledger) == 3
    entries = BatchBook(layout.batches_file("04_evaluate", 0), "04_evaluate", 0).entries()
    assert [len(e["keys"]) for e in entries] == [3, 1] and entries[1]["keys"] == [empty["cache_key"]]


def test_04_judging_of_the_paper_configuration_through_three_provider_batches(tmp_path, server):
    from llamaduo_nb import evaluate
    from llamaduo_nb.notebook import Stage

    data = yaml.safe_load((ROOT / "params" / "paper_gemma7b.yaml").read_text())
    data["outputs_dir"] = str(tmp_path / "outputs")
    data["prices_file"] = str(ROOT / "params" / "prices.yaml")
    for provider in data["providers"]:
        base_url = server.base_url if provider["kind"] == "openai" else server.root
        provider.update(base_url=base_url, batch=True, batch_poll_s=0.05, max_retries=1)
    data["evaluate"]["m"] = 2
    cfg = build(RunConfig, data, source="paper-shaped")
    rows = [
        {"prompt_id": f"p{i}", "sample_index": 0, "category": "Summarize", "instruction": f"Summarize text {i}.",
         "reference": f"Summary {i}.", "candidate": f"A summary of {i}."}
        for i in range(3)
    ]  # fmt: skip
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    for judge in cfg.evaluate.judges:
        record_forecast(layout, "04_evaluate", 0, judge)
    judgments = evaluate.run_judges(Stage("04_evaluate", cfg, layout, 0), rows)

    assert server.batch_submits == {
        "openai": 1,
        "anthropic": 1,
        "google": 1,
    }  # the judges' batches side by side
    assert {e.path for e in server.entries()} == {"batch:openai", "batch:anthropic", "batch:google"}
    ledger = read_ledger(layout.calls_db)
    assert len(ledger) == 3 * len(rows) * 2 and all(row["ok"] and row["cost_usd"] > 0 for row in ledger)
    llm = [j for j in judgments if j["judge"] in ("gpt4o", "claude", "gemini")]
    assert len(llm) == 3 * len(rows) * 2 and all(
        j["ok"] for j in llm
    )  # every judgment parsed, scores in range
