"""Issue 22: a dead provider stops any stage, every HTTP attempt has its ledger row, budgets spend up to their cap.

Real components: the local fake LLM server (`llamaduo_nb.testing`), the real ServicePool and OpenAI SDK, and the
real runner (with stand-in notebooks whose 04 goes through the real judging path or the real pool) for the
run-level acceptance checks.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml
from test_failfast import stand_in
from test_services import ask, make_pool, record_forecast

from llamaduo_nb import runner
from llamaduo_nb.callcache import RETRIED, CallCache, LedgerRow, read_ledger
from llamaduo_nb.config import RunConfig, build, is_non_semantic
from llamaduo_nb.economics import ledger_costs
from llamaduo_nb.forecast import forecast_vs_actual
from llamaduo_nb.runlayout import STAGES, RunLayout
from llamaduo_nb.services import ChatRequest, ServicePool, StageStopped
from llamaduo_nb.summary import cost_lines
from llamaduo_nb.testing import Behaviour, TestLLMServer

ROOT = Path(__file__).resolve().parent.parent
FOREVER = 100_000  # forced outcomes: more than any test sends
FAST = {"rpm": 100_000, "tpm": 10**9}  # the provider's own limits never pace these tests


# --------------------------------------------------------------------------- a dead provider stops any stage


@pytest.mark.parametrize(
    "outcome, cause",
    [("rate_limited", "rate limited (HTTP 429)"), ("error", "server errors (HTTP 5xx)")],
)
def test_a_dead_provider_stops_a_stage_smaller_than_the_window_after_a_few_calls(tmp_path, outcome, cause):
    with TestLLMServer(Behaviour()) as server:
        server.fail_next(outcome, FOREVER, retry_after_s=0.01)
        pool, layout = make_pool(
            tmp_path, {"base_url": server.base_url, "max_retries": 2, "max_concurrency": 2, **FAST}
        )
        with pool, pytest.raises(StageStopped) as stopped:
            pool.complete_many("judge", [ask(repeat=i) for i in range(16)])  # 16 < failure_window (20)
        sent = server.entries()
    message = str(stopped.value)
    assert cause in message and "'judge'" in message and "the last 3 calls all failed" in message
    # a call is a request after its retries; while every call failed they go out one at a time: 3 calls x 3
    assert len(sent) == 3 * 3
    rows = read_ledger(layout.calls_db)
    assert len(rows) == len(sent)  # every HTTP attempt has its ledger row, free or not
    assert all(not r["ok"] and r["cost_usd"] == 0 for r in rows)
    assert sum(r["error"].startswith("retried: ") for r in rows) >= 6  # 2 retried attempts per failed call


def test_a_server_started_and_checked_here_gets_its_calls_together_from_the_first(tmp_path):
    """`probe_first_call: false` (the llama-servers 03 and 06 start, which answered /v1/models first): the first
    call does not go out alone, so 4 slow calls overlap from the start; a dead one still stops the stage."""
    with TestLLMServer(Behaviour(latency_s=0.3)) as server:
        pool, _ = make_pool(
            tmp_path, {"base_url": server.base_url, "max_concurrency": 4, "probe_first_call": False, **FAST}
        )
        with pool:
            results = pool.complete_many("judge", [ask(repeat=i) for i in range(4)])
        sent = server.entries()
    assert all(r.error is None for r in results) and len(sent) == 4
    assert max(e.arrived for e in sent) < min(e.finished for e in sent)  # all four in flight at once
    with TestLLMServer(Behaviour(latency_s=0.3)) as server:  # the default: the first call alone
        pool, _ = make_pool(tmp_path / "probed", {"base_url": server.base_url, "max_concurrency": 4, **FAST})
        with pool:
            pool.complete_many("judge", [ask(repeat=i) for i in range(4)])
        sent = sorted(server.entries(), key=lambda e: e.arrived)
    assert sent[0].finished <= sent[1].arrived
    with TestLLMServer(Behaviour()) as server:
        server.fail_next("error", FOREVER, retry_after_s=0.01)
        pool, _ = make_pool(
            tmp_path / "dead",
            {
                "base_url": server.base_url,
                "max_retries": 0,
                "max_concurrency": 2,
                "probe_first_call": False,
                **FAST,
            },
        )
        with pool, pytest.raises(StageStopped, match="the last 3 calls all failed"):
            pool.complete_many("judge", [ask(repeat=i) for i in range(16)])


def test_a_stage_of_two_calls_stops_when_every_call_failed(tmp_path):
    with TestLLMServer(Behaviour()) as server:
        server.fail_next("rate_limited", FOREVER, retry_after_s=0.01)
        pool, layout = make_pool(tmp_path, {"base_url": server.base_url, "max_retries": 1, **FAST})
        with pool, pytest.raises(StageStopped, match=r"rate limited \(HTTP 429\): every call so far failed"):
            pool.complete_many("judge", [ask(repeat=0), ask(repeat=1)])
        assert len(server.entries()) == 4
    rows = read_ledger(layout.calls_db)
    assert [(r["attempts"], r["error"].startswith("retried: ")) for r in rows] == [
        (1, True),
        (2, False),
        (1, True),
        (2, False),
    ]


def test_a_blip_does_not_stop_a_healthy_stage(tmp_path):
    with TestLLMServer(Behaviour()) as server:
        server.fail_next(
            "rate_limited", 2, retry_after_s=0.01
        )  # two calls fail (no retries), then all is well
        server.fail_next("ok", 1)
        server.fail_next("error", 2)  # and two more later
        pool, layout = make_pool(
            tmp_path, {"base_url": server.base_url, "max_retries": 0, "max_concurrency": 1, **FAST}
        )
        with pool:
            results = pool.complete_many("judge", [ask(repeat=i) for i in range(10)])
            assert pool.stopped is None
    assert [r.ok for r in results] == [False, False, True, False, False] + [True] * 5
    assert len(read_ledger(layout.calls_db)) == 10


# --------------------------------------------------------------------------- budgets spend up to their cap


def paid_config(tmp_path: Path, server: TestLLMServer, budget: dict | None = None) -> RunConfig:
    judge = {
        "name": "judge",
        "kind": "openai",
        "model": "gpt-4o-mini",
        "base_url": server.base_url,
        "max_concurrency": 16,
        **FAST,
    }
    data = {
        "run_name": "budget",
        "outputs_dir": str(tmp_path / "outputs"),
        "prices_file": str(ROOT / "params" / "prices.yaml"),
        "coverage": {"source": "unused.jsonl"},
        "evaluate": {"judges": ["judge"]},
        "synthesize": {"generator": "judge"},
        "providers": [judge],
        "budget": budget or {},
    }
    return build(RunConfig, data, source="<test>")


def long_requests(n: int) -> list[ChatRequest]:
    """Requests whose worst case (max_tokens 1000) is ten times what the server bills (100 output tokens)."""
    return [ask(f"Rate answer {i}.", max_tokens=1000) for i in range(n)]


def test_a_budget_admits_every_call_that_fits_given_what_is_in_flight(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with TestLLMServer(Behaviour(usage_output_tokens=100, latency_s=0.05)) as server:
        cfg = paid_config(tmp_path, server)
        layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
        record_forecast(layout, "04_evaluate", 0, "judge")
        with ServicePool(cfg, layout, "04_evaluate", 0) as probe:
            worst = probe._accounts.worst_case(cfg.provider("judge"), long_requests(1)[0])[0]
        cap = 10 * worst  # ten calls' worst case; the work needs about 15 times what the cap allows
        cfg = paid_config(tmp_path, server, {"run_usd": cap})
        with ServicePool(cfg, layout, "04_evaluate", 0) as pool:
            with pytest.raises(StageStopped, match=r"budget\.run_usd=.* reached"):
                pool.complete_many("judge", long_requests(150))
        assert server.max_in_flight() > 1  # calls went out side by side, not one by one
    spent = sum(r["cost_usd"] for r in read_ledger(layout.calls_db))
    print(f"live: spent {spent / cap:.1%} of the cap")
    # before: stopped once ten worst cases were on their way, at one worst case spent (10 % of the cap)
    assert 0.8 * cap <= spent <= cap, spent / cap
    assert spent > cap - worst  # it stopped only when the next call's worst case could cross the cap


def test_a_provider_batch_spends_up_to_the_cap_in_rounds(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with TestLLMServer(Behaviour(usage_output_tokens=100, batch_delay_s=0.05)) as server:
        cfg = paid_config(tmp_path, server)
        data = cfg.to_dict()
        data["providers"][0].update(batch=True, batch_poll_s=0.05)
        layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
        record_forecast(layout, "04_evaluate", 0, "judge")
        batch_cfg = build(RunConfig, data, source="<test>")
        with ServicePool(batch_cfg, layout, "04_evaluate", 0) as probe:
            worst = probe._accounts.worst_case(batch_cfg.provider("judge"), long_requests(1)[0], batch=True)[
                0
            ]
        cap = 10 * worst
        capped = build(RunConfig, {**data, "budget": {"run_usd": cap}}, source="<test>")
        with ServicePool(capped, layout, "04_evaluate", 0) as pool:
            with pytest.raises(StageStopped, match=r"budget\.run_usd=.* reached"):
                pool.complete_many("judge", long_requests(150))
        assert server.batch_submits["openai"] > 1  # each round's batch held what fitted, the next round more
    spent = sum(r["cost_usd"] for r in read_ledger(layout.calls_db))
    print(f"batch: spent {spent / cap:.1%} of the cap in {server.batch_submits['openai']} batches")
    assert 0.8 * cap <= spent <= cap, spent / cap


def test_the_non_semantic_keys():
    for key in ("budget.run_usd", "budget.stage_tokens", "providers.gpt4o.max_retries", "providers.x.rpm"):
        assert is_non_semantic(key), key
    for key in ("loop.max_cycles", "providers.gpt4o.model", "providers.gpt4o.base_url", "evaluate.m"):
        assert not is_non_semantic(key), key


# --------------------------------------------------------------------------- the runner, end to end

JUDGING_04 = """
from llamaduo_nb.config import load_config
from llamaduo_nb.evaluate import run_judges
from llamaduo_nb.notebook import Stage
layout = RunLayout(Path(run_dir))
cfg = load_config(layout.params_file)
rows = [{"prompt_id": f"p{i}", "sample_index": 0, "category": "Summarize", "instruction": f"Summarize text {i}.",
         "reference": f"Summary {i}.", "candidate": f"A summary of {i}."} for i in range(8)]
run_judges(Stage("04_evaluate", cfg, layout, cycle), rows)  # 8 rows x M=2: 16 judgments
write_json(layout.metrics_file(cycle), {"decision": {"passed": False, "value": 1.0}})
"""

PAYING_04 = """
from llamaduo_nb.config import load_config
from llamaduo_nb.services import ChatRequest, ServicePool
layout = RunLayout(Path(run_dir))
cfg = load_config(layout.params_file)
with ServicePool(cfg, layout, "04_evaluate", cycle, providers=["judge"]) as pool:
    pool.complete_many("judge", [ChatRequest([{"role": "user", "content": f"Rate answer {i}."}], max_tokens=1000)
                                 for i in range(150)])
write_json(layout.metrics_file(cycle), {"decision": {"passed": True, "value": 10.0}})
"""


def stand_ins(tmp_path: Path, body_04: str) -> Path:
    notebooks = tmp_path / "nbs"
    notebooks.mkdir()
    for stage in STAGES:
        nbformat.write(
            stand_in(stage, body_04 if stage == "04_evaluate" else ""), notebooks / f"{stage}.ipynb"
        )
    return notebooks


def runner_params(make_params, server: TestLLMServer, **extra: dict) -> Path:
    judge = {"name": "judge", "kind": "openai", "model": "gpt-4o-mini", "base_url": server.base_url, **FAST}
    demo_local = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())["providers"][0]
    judge.update(extra.pop("judge", {}))
    return make_params({"providers": [demo_local, judge], "evaluate": {"judges": ["judge"], "m": 2}, **extra})


def test_a_judge_answering_429_forever_stops_cycle_0_of_a_tiny_run(tmp_path, make_params, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # the kernel inherits the environment
    with TestLLMServer(Behaviour()) as server:
        server.fail_next("rate_limited", FOREVER, retry_after_s=0.01)
        params = runner_params(
            make_params, server, judge={"max_retries": 2, "max_concurrency": 2}, loop={"max_cycles": 2}
        )
        logged: list[str] = []
        with pytest.raises(runner.NotebookFailed) as failed:
            runner.run(params, notebooks_dir=stand_ins(tmp_path, JUDGING_04), log=logged.append)
        attempts = len(server.entries())
    assert failed.value.stopped and "rate limited (HTTP 429)" in failed.value.evalue
    assert "provider 'judge'" in failed.value.evalue
    layout = RunLayout(tmp_path / "outputs" / "demo")
    state = runner.RunState.load(layout.state_file)
    assert state.status == "stopped" and state.stop_reason.startswith("cycle_00/04_evaluate stopped: ")
    assert "rate limited" in state.stop_reason
    assert state.done == ["01_coverage", "cycle_00/02_finetune", "cycle_00/03_batch_inference"]
    assert any(
        m.startswith("[llamaduo] STOPPED cycle_00/04_evaluate") and "rate limited" in m for m in logged
    )
    assert not any("max_cycles" in m for m in logged)
    assert not layout.judgments_file(0).exists()  # no judgments file of 16 failures to train on
    rows = read_ledger(layout.calls_db)
    assert len(rows) == attempts == 3 * 3  # a row per attempt; three calls, not every call's retries


def test_a_run_spends_its_budget_then_resumes_after_the_cap_is_raised(tmp_path, make_params, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with TestLLMServer(Behaviour(usage_output_tokens=100, latency_s=0.02)) as server:
        # gpt-4o-mini, max_tokens 1000: a worst case of ~$0.0006 a call, billed ~$0.00006 (100 output tokens);
        # the cap is ten worst cases, the work 150 calls (about 1.5 times the cap)
        cap = 0.006
        common = {"judge": {"max_concurrency": 16}, "loop": {"max_cycles": 1}, "deploy": {"enabled": False}}
        params = runner_params(make_params, server, budget={"run_usd": cap}, **common)
        notebooks = stand_ins(tmp_path, PAYING_04)
        with pytest.raises(runner.NotebookFailed) as failed:
            runner.run(params, notebooks_dir=notebooks, log=lambda m: None)
        assert failed.value.stopped and "budget.run_usd=0.006 reached" in failed.value.evalue
        layout = RunLayout(tmp_path / "outputs" / "demo")
        spent = sum(r["cost_usd"] for r in read_ledger(layout.calls_db))
        print(f"runner: spent {spent / cap:.1%} of the cap")
        assert 0.8 * cap <= spent <= cap, spent / cap
        first = len(server.entries())
        assert first < 150

        raised = runner_params(
            make_params, server, budget={"run_usd": 1.0}, **common
        )  # the same file, raised
        state = runner.run(raised, resume=True, notebooks_dir=notebooks, log=lambda m: None)
        assert state.status == "finished" and state.done[-1] == "cycle_00/04_evaluate"
        assert state.param_changes[-1]["accepted"] == "non-semantic settings only"
        assert state.param_changes[-1]["changes"] == [{"key": "budget.run_usd", "old": cap, "new": 1.0}]
        answered = server.answered()
    assert len(answered) == 150 and set(answered.values()) == {1}  # nothing paid twice
    paid = [r["cache_key"] for r in read_ledger(layout.calls_db) if r["ok"]]
    assert len(paid) == len(set(paid)) == 150


def test_retried_attempts_count_as_attempts_not_calls(tmp_path):
    layout = RunLayout(tmp_path / "run")
    row = {"stage": "04_evaluate", "cycle": 0, "provider": "judge", "kind": "openai", "model": "gpt-4o-mini",
           "latency_s": 0.1, "cache_key": "k"}  # fmt: skip
    with CallCache(layout.calls_db) as cache:
        for attempt, error in ((1, f"{RETRIED}HTTP 429 RateLimitError"), (2, f"{RETRIED}HTTP 503 x")):
            cache.record(LedgerRow(**row, input_tokens=0, output_tokens=0, cost_usd=0.0, ok=False,
                                   error=error, attempts=attempt))  # fmt: skip
        cache.record(LedgerRow(**row, input_tokens=10, output_tokens=5, cost_usd=1e-5, ok=True, error=None,
                               attempts=3))  # fmt: skip
        cache.record(LedgerRow(**{**row, "cache_key": "k2"}, input_tokens=0, output_tokens=0, cost_usd=0.0,
                               ok=False, error="HTTP 400 BadRequestError", attempts=1))  # fmt: skip
    by_stage = ledger_costs(layout.calls_db)["by_stage"].iloc[0]
    assert (by_stage["calls"], by_stage["failed"]) == (2, 1)
    assert int(forecast_vs_actual(layout)["actual_calls"].iloc[0]) == 2

    class State:
        timings = {"cycle_00/04_evaluate": 1.0}

    (line,) = [x for x in cost_lines(layout, State()) if x.startswith("| 04_evaluate")]
    assert line.startswith("| 04_evaluate | 1.0 | 2 | 4 | 1 | 15 |")  # calls, HTTP attempts, failed calls
