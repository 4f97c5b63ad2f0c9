"""The scheduler and the misbehaving test server, over real HTTP on 127.0.0.1.

Limits are checked where a provider checks them: by counting arrivals per window at the server.
Time is scaled where a minute would be too long (`rate_period_s`: the limits' window in seconds).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from test_services import record_forecast

from llamaduo_nb.callcache import read_ledger
from llamaduo_nb.config import RunConfig, build
from llamaduo_nb.evaluate import JUDGMENT_SCHEMA
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.scheduler import GaveUp, RateScheduler
from llamaduo_nb.services import ChatRequest, ServicePool
from llamaduo_nb.synthesize import PAIRS_SCHEMA
from llamaduo_nb.testing import Behaviour, TestLLMServer, reply_text

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:no price for model")


def pool_for(tmp_path: Path, providers: list[dict[str, Any]], rate_period_s: float = 60.0) -> ServicePool:
    providers = [
        {"kind": "openai_compatible", "model": "test-model", "max_retries": 4, **p} for p in providers
    ]
    for p in providers:  # a local test server costs nothing; a paid kind keeps its (priced) model
        if p["kind"] == "openai_compatible":
            p.setdefault("free", True)
    data = {
        "run_name": "sched",
        "outputs_dir": str(tmp_path / "outputs"),
        "prices_file": str(ROOT / "params" / "prices.yaml"),
        "coverage": {"source": "unused.jsonl"},
        "evaluate": {"judges": [providers[0]["name"]]},
        "synthesize": {"generator": providers[0]["name"]},
        "providers": providers,
    }
    cfg = build(RunConfig, data, source="<test>")
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    for p in cfg.providers:
        record_forecast(layout, "04_evaluate", 0, p.name)
    return ServicePool(cfg, layout, stage="04_evaluate", cycle=0, rate_period_s=rate_period_s)


def ask(i: int, max_tokens: int = 8) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": f"question {i}"}], max_tokens=max_tokens)


def post(url: str, body: dict, timeout: float = 10) -> tuple[int, dict[str, str], dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


# --------------------------------------------------------------------------- the scheduler through the pool


def test_no_window_carries_more_than_the_limit_not_even_the_first(tmp_path):
    # 20 requests per 4 s window; 45 requests queued at once. aiolimiter would let 20 out in the first instant.
    with TestLLMServer(Behaviour(latency_s=0.05, rpm=20, period_s=4.0)) as server:
        with pool_for(tmp_path, [{"name": "judge", "base_url": server.base_url, "rpm": 20}], 4.0) as pool:
            results = pool.complete_many("judge", [ask(i) for i in range(45)])
    assert all(r.ok for r in results)
    assert server.entries("rate_limited") == []
    assert server.max_in_window(4.0) <= 20
    # paced, not bursty: a tenth of the window holds about a tenth of the budget (+ one second's worth)
    assert server.max_in_window(0.4) <= 2 + 2
    assert sorted(server.answered().values()) == [1] * 45  # nothing lost, nothing sent twice


def test_a_429_pauses_every_caller_of_the_provider_for_retry_after(tmp_path):
    with TestLLMServer(Behaviour(latency_s=0.2)) as server:
        server.fail_next("rate_limited", 1, retry_after_s=2.0)
        with pool_for(tmp_path, [{"name": "judge", "base_url": server.base_url, "rpm": 600}]) as pool:
            results = pool.complete_many("judge", [ask(i) for i in range(20)])  # paced at 10/s
    assert all(r.ok for r in results)
    (limited,) = server.entries("rate_limited")
    # calls already on the wire when the 429 went out may still land (0.5 s on a loaded machine); after
    # that, silence until retry-after has passed - from the 429'd call and from the others queued behind it
    later = [e.arrived - limited.finished for e in server.entries() if e.arrived > limited.finished + 0.5]
    assert later, "the calls after the 429 never came"
    assert min(later) >= 2.0 - 0.05
    assert sum(r.attempts for r in results) == 21


def test_calls_in_flight_follow_latency_not_a_fixed_cap(tmp_path):
    # 20 requests/s allowed (120 per 6 s): with 1 s calls that needs ~20 in flight; the old default allowed 4
    with TestLLMServer(Behaviour(latency_s=1.0, rpm=120, period_s=6.0)) as server:
        with pool_for(tmp_path, [{"name": "judge", "base_url": server.base_url, "rpm": 120}], 6.0) as pool:
            results = pool.complete_many("judge", [ask(i) for i in range(60)])
    assert all(r.ok for r in results) and server.entries("rate_limited") == []
    assert server.max_in_flight() >= 15

    with TestLLMServer(Behaviour(latency_s=0.05, rpm=120, period_s=6.0)) as fast:
        with pool_for(tmp_path, [{"name": "judge", "base_url": fast.base_url, "rpm": 120}], 6.0) as pool:
            pool.complete_many("judge", [ask(i) for i in range(100, 140)])
    assert (
        fast.max_in_flight() <= server.max_in_flight() / 2
    )  # short calls: fewer in flight carry the same rate


def test_max_concurrency_stays_a_hard_cap_when_set(tmp_path):
    with TestLLMServer(Behaviour(latency_s=0.3)) as server:
        provider = {"name": "local", "base_url": server.base_url, "rpm": 6000, "max_concurrency": 2}
        with pool_for(tmp_path, [provider]) as pool:
            results = pool.complete_many("local", [ask(i) for i in range(8)])
    assert all(r.ok for r in results)
    assert server.max_in_flight() == 2


def test_judges_of_different_providers_run_at_the_same_time(tmp_path):
    with TestLLMServer(Behaviour(latency_s=0.5)) as a, TestLLMServer(Behaviour(latency_s=0.5)) as b:
        providers = [{"name": "judge_a", "base_url": a.base_url}, {"name": "judge_b", "base_url": b.base_url}]
        with pool_for(tmp_path, providers) as pool:
            out = pool.complete_groups(
                {"judge_a": [ask(i) for i in range(6)], "judge_b": [ask(i) for i in range(6)]}
            )
    assert [len(out["judge_a"]), len(out["judge_b"])] == [6, 6]
    assert [r.text for r in out["judge_a"]] == [r.text for r in out["judge_b"]]  # same request, same reply
    a_busy = (min(e.arrived for e in a.entries()), max(e.finished for e in a.entries()))
    b_busy = (min(e.arrived for e in b.entries()), max(e.finished for e in b.entries()))
    assert b_busy[0] < a_busy[1] and a_busy[0] < b_busy[1]  # their busy spans overlap


def test_dropped_connections_5xx_and_timeouts_are_retried_and_counted_once(tmp_path):
    with TestLLMServer(Behaviour(latency_s=0.02, hang_s=5.0)) as server:
        server.fail_next("drop")
        server.fail_next("error")
        server.fail_next("hang")
        provider = {"name": "judge", "base_url": server.base_url, "timeout_s": 1.0, "max_concurrency": 1}
        pool = pool_for(tmp_path, [provider])
        with pool:
            (result,) = pool.complete_many("judge", [ask(0)])
    assert result.ok and result.attempts == 4
    assert [e.outcome for e in server.entries()] == ["drop", "error", "hang", "ok"]
    rows = read_ledger(pool.layout.calls_db)
    (answered,) = [r for r in rows if r["ok"]]  # the call is ledgered once as answered ...
    assert answered["attempts"] == 4
    # ... and the attempt that hung is ledgered on its own at its estimated cost (it may have been billed)
    (timed_out,) = [r for r in rows if not r["ok"] and "imeout" in r["error"]]
    assert "imeout" in (timed_out["error"] or "") and timed_out["cost_usd"] == 0.0  # free local server
    # every HTTP attempt has its row (issue 22): the drop, the 5xx and the hang were retried
    assert [(r["attempts"], r["ok"]) for r in rows] == [(1, False), (2, False), (3, False), (4, True)]
    assert all(r["error"].startswith("retried: ") for r in rows[:3])


def test_google_connection_drops_over_aiohttp_are_retried(tmp_path, monkeypatch):
    pytest.importorskip("aiohttp")
    from google.genai import _api_client

    assert _api_client.has_aiohttp, "google-genai should use its aiohttp transport when aiohttp is installed"
    monkeypatch.setenv("GOOGLE_API_KEY", "test-key-not-real")
    with TestLLMServer(Behaviour()) as server:
        server.fail_next("drop")
        provider = {"name": "gemini", "kind": "google", "model": "gemini-2.5-flash", "base_url": server.root}
        with pool_for(tmp_path, [provider]) as pool:
            (result,) = pool.complete_many(
                "gemini", [ChatRequest(messages=[{"role": "user", "content": "hi"}])]
            )
    assert result.ok and result.attempts == 2, result.error
    assert [e.outcome for e in server.entries()] == ["drop", "ok"]


# --------------------------------------------------------------------------- the scheduler alone


def test_scheduler_sizes_concurrency_from_rate_and_latency():
    clock = [0.0]
    scheduler = RateScheduler(600, 10**6, clock=lambda: clock[0])
    assert scheduler.concurrency_limit() == 4  # nothing known yet: the floor
    scheduler.release(scheduler_slot(scheduler), latency_s=20.0)  # 20 s calls at 10 per second
    assert scheduler.concurrency_limit() == 4 + 300
    capped = RateScheduler(600, 10**6, max_concurrency=16, clock=lambda: clock[0])
    capped.release(scheduler_slot(capped), latency_s=20.0)
    assert capped.concurrency_limit() == 16


def scheduler_slot(scheduler: RateScheduler):
    return asyncio.run(scheduler.acquire(1))


def test_429_cooldown_grows_without_a_hint_and_follows_the_hint_with_one():
    clock = [100.0]
    scheduler = RateScheduler(60, 10**6, clock=lambda: clock[0])
    cooldowns = []
    for _ in range(3):
        assert scheduler.rate_limited(None) == 0.0  # the caller waits in acquire(), with everyone else
        cooldowns.append(scheduler.cooldown_left_s())
    assert cooldowns == [1.0, 2.0, 4.0]
    scheduler.rate_limited(7.5)
    assert scheduler.cooldown_left_s() == 7.5
    assert scheduler.wait_s(1) >= 7.5
    backoffs = {round(scheduler.backoff_s(3), 6) for _ in range(20)}
    assert len(backoffs) > 1 and all(0 <= b <= 4.0 for b in backoffs)  # jittered, not lockstep


def test_a_caller_that_gives_up_leaves_the_queue_without_taking_a_turn():
    # a stopped stage's queued calls: they leave at once, and what they leave behind is the limits as they were
    clock = [0.0]  # stands still: a waiting caller's turn never comes by itself
    scheduler = RateScheduler(60, 10**6, clock=lambda: clock[0])  # one request per second
    stopped: list[str] = []

    async def queue_then_stop() -> None:
        await scheduler.acquire(1)
        waiting = asyncio.ensure_future(scheduler.acquire(1, give_up=lambda: bool(stopped)))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        stopped.append("the stage stopped")
        with pytest.raises(GaveUp):
            await asyncio.wait_for(waiting, timeout=10)

    asyncio.run(queue_then_stop())
    assert scheduler.stats.sent == 1 and scheduler.in_flight == 1
    assert scheduler.wait_s(1) == pytest.approx(1.0)  # the next turn is where it was: the leaver took none


# --------------------------------------------------------------------------- the test server


def test_server_answers_429_with_retry_after_when_over_its_limit():
    with TestLLMServer(Behaviour(rpm=2, period_s=30.0)) as server:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        statuses = [post(f"{server.base_url}/chat/completions", body)[0] for _ in range(2)]
        status, headers, payload = post(f"{server.base_url}/chat/completions", body)
    assert statuses == [200, 200] and status == 429
    assert 28 <= float(headers["retry-after-ms"]) / 1000 <= 30 and headers["retry-after"] in ("29", "30")
    assert payload["error"]["code"] == 429
    assert server.answered() == {server.entries()[0].key: 2}  # the same request twice: a duplicate, counted


def test_server_tpm_limit_counts_prompt_and_max_tokens():
    with TestLLMServer(Behaviour(tpm=100, period_s=30.0)) as server:
        big = {"model": "m", "messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 40}  # 90
        assert post(f"{server.base_url}/chat/completions", big)[0] == 200
        assert post(f"{server.base_url}/chat/completions", big)[0] == 429


def test_server_replies_are_deterministic_and_valid_for_judges_and_synthesis():
    judge = {"messages": [{"role": "user", "content": "judge this"}],
             "response_format": {"type": "json_schema", "json_schema": {"name": "j", "schema": JUDGMENT_SCHEMA}}}  # fmt: skip
    synth = {"messages": [{"role": "user", "content": "make pairs"}],
             "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PAIRS_SCHEMA}}}  # fmt: skip
    for body, schema in ((judge, JUDGMENT_SCHEMA), (synth, PAIRS_SCHEMA)):
        text = reply_text(body)
        jsonschema.validate(json.loads(text), schema)
        assert reply_text(json.loads(json.dumps(body))) == text
    other = {**synth, "messages": [{"role": "user", "content": "make other pairs"}]}
    assert reply_text(other) != reply_text(synth)


def test_server_injected_faults_follow_the_seed():
    def outcomes(seed: int) -> list[str]:
        with TestLLMServer(Behaviour(error_rate=0.5, seed=seed)) as server:
            for i in range(12):
                post(
                    f"{server.base_url}/chat/completions", {"messages": [{"role": "user", "content": str(i)}]}
                )
            return [e.outcome for e in server.entries()]

    first = outcomes(3)
    assert first == outcomes(3)
    assert {"ok", "error"} <= set(first)
    assert first != outcomes(4)
