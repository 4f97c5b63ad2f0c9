"""Never burn money silently: a failing provider or a budget stops the stage, and --resume re-pays nothing.

The paper's configuration (params/paper_gemma7b.yaml: GPT-4o, Claude 3 Sonnet, Gemini 1.5 Flash) is pointed at
scripted servers on 127.0.0.1 that speak each provider's wire format, one server per provider, and stages 04
(judging) and 05 (synthesis) run through the real ServicePool and the real SDKs.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import yaml
from test_services import SCORE_SCHEMA, ScriptedLLMServer, ask, make_pool

from llamaduo_nb import evaluate, forecast, runner, synthesize
from llamaduo_nb.callcache import CallCache, LedgerRow, read_ledger
from llamaduo_nb.config import ConfigError, RunConfig, build
from llamaduo_nb.jsonio import write_jsonl
from llamaduo_nb.notebook import Stage
from llamaduo_nb.runlayout import STAGES, RunLayout
from llamaduo_nb.services import ServicePool, StageStopped

ROOT = Path(__file__).resolve().parent.parent
UNAUTHORIZED = (
    401,
    {},
    {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}},
)
NO_QUOTA = (
    429,
    {},
    {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    },
)
ROWS = [
    {
        "prompt_id": f"p{i}",
        "sample_index": 0,
        "category": "Summarize",
        "instruction": f"Summarize text {i}.",
        "reference": f"Summary {i}.",
        "candidate": f"A summary of {i}.",
    }
    for i in range(3)
]


@pytest.fixture
def servers():
    made = {name: ScriptedLLMServer() for name in ("gpt4o", "claude", "gemini")}
    for server in made.values():
        server.reply_text = json.dumps({"similarity": 80, "precision": 75})
    yield made
    for server in made.values():
        server.close()


@pytest.fixture
def keys(monkeypatch):
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY"):
        monkeypatch.setenv(name, f"test-{name.lower()}")


def paper_config(tmp_path: Path, servers: dict[str, ScriptedLLMServer], **sections: dict) -> RunConfig:
    """params/paper_gemma7b.yaml with its three providers pointed at the local servers; M=2, small 05."""
    data = yaml.safe_load((ROOT / "params" / "paper_gemma7b.yaml").read_text())
    data["outputs_dir"] = str(tmp_path / "outputs")
    data["prices_file"] = str(ROOT / "params" / "prices.yaml")
    for provider in data["providers"]:
        root = servers[provider["name"]].root
        provider["base_url"] = f"{root}/v1" if provider["kind"] == "openai" else root
        provider["max_retries"] = 1
    data["evaluate"]["m"] = 2
    # one generator (the config's study has three arms) and a small 05
    data["synthesize"].update(generator="gpt4o", generators=None, volumes=None, target_per_cycle=20,
                              max_requests_per_cycle=4)  # fmt: skip
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return build(RunConfig, data, source="paper-shaped")


def judge_stage(cfg: RunConfig) -> Stage:
    return forecasted(Stage("04_evaluate", cfg, RunLayout.for_run(cfg.outputs_dir, cfg.run_name), 0))


def forecasted(stage: Stage) -> Stage:
    """The stage with its forecast recorded, as the runner and the notebook's forecast cell do before it."""
    forecast.forecast_stage(stage.cfg, stage.name, stage.cycle, stage.layout)
    return stage


def paid_keys(layout: RunLayout) -> list[str]:
    return [row["cache_key"] for row in read_ledger(layout.calls_db) if row["ok"]]


def test_a_rejected_key_stops_judging_at_once_and_resume_repays_nothing(tmp_path, servers, keys):
    servers["claude"].fail_with = UNAUTHORIZED
    stage = judge_stage(paper_config(tmp_path, servers))
    calls = len(ROWS) * stage.cfg.evaluate.m

    with pytest.raises(StageStopped) as stopped:
        evaluate.run_judges(stage, ROWS)
    message = str(stopped.value)
    assert "'claude'" in message and "claude-3-sonnet-20240229" in message and "authentication" in message
    assert "--resume" in message and "test-anthropic_api_key" not in message  # the key is never echoed
    assert len(servers["claude"].requests) == 1  # one call, not max_concurrency or M x rows
    # the judges run side by side: the others sent at most what was under way when claude's probe failed
    before = {name: len(servers[name].requests) for name in ("gpt4o", "gemini")}
    assert all(1 <= n <= calls for n in before.values())
    assert not stage.layout.judgments_file(0).exists()  # no partial output

    servers["claude"].fail_with = None  # "fix the key"
    judgments = evaluate.run_judges(stage, ROWS)
    assert len(judgments) == 3 * calls and all(j["ok"] for j in judgments)
    # what was answered before the stop replays from the cache: every other judge is asked each call once
    assert len(servers["gpt4o"].requests) == calls and len(servers["gemini"].requests) == calls
    assert len(servers["claude"].requests) == 1 + calls
    paid = paid_keys(stage.layout)
    assert len(paid) == len(set(paid)) == 3 * calls  # each answer paid exactly once over both runs


def test_an_exhausted_quota_stops_synthesis_without_retrying_and_resume_continues(tmp_path, servers, keys):
    cfg = paper_config(tmp_path, servers)
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    rows = [
        {
            "id": f"t{i}",
            "instruction": f"Summarize text {i}.",
            "response": f"Summary {i}.",
            "category": "Summarize",
        }
        for i in range(6)
    ]
    write_jsonl(layout.train_file, rows[:4])
    write_jsonl(layout.test_file, rows[4:])
    gpt = servers["gpt4o"]
    gpt.script = [(200, {}, None)] * 2  # two answers, then the account runs dry
    gpt.fail_with = NO_QUOTA
    stage = forecasted(Stage("05_synthesize", cfg, layout, 0))

    with pytest.raises(StageStopped) as stopped:
        synthesize.run_synthesis(stage)
    message = str(stopped.value)
    assert "'gpt4o'" in message and "quota exhausted" in message and "insufficient_quota" in message
    assert len(gpt.requests) <= 4  # a handful, and no retry of a 429 that says the quota is gone
    assert not layout.synthetic_file(0).exists()
    answered_before = paid_keys(layout)
    assert len(answered_before) == 2

    gpt.fail_with = None  # credit added
    before = len(gpt.requests)
    synthesize.run_synthesis(stage)
    paid = paid_keys(layout)
    assert paid[:2] == answered_before and len(paid) == len(set(paid))  # nothing answered was paid twice
    assert len(gpt.requests) - before == len(paid) - 2


def test_a_failure_share_above_the_threshold_stops_the_stage(tmp_path):
    server = ScriptedLLMServer()
    try:
        server.fail_with = (400, {}, {"error": {"message": "bad request", "type": "invalid_request_error"}})
        pool, layout = make_pool(
            tmp_path,
            {
                "base_url": f"{server.root}/v1",
                "failure_window": 4,
                "max_failure_share": 0.5,
                "max_concurrency": 1,
            },
        )
        with pool, pytest.raises(StageStopped, match=r"4 of the last 4 calls failed"):
            pool.complete_many("judge", [ask(repeat=i) for i in range(50)])
        assert len(server.requests) == 4  # 400 is not retried, and the window stopped the rest
        with pool, pytest.raises(StageStopped):  # every new pool starts its own window
            pool.complete_many("judge", [ask(repeat=i) for i in range(50, 100)])
        assert len(server.requests) == 8
    finally:
        server.close()


# --------------------------------------------------------------------------- budgets


def test_a_budget_stops_the_stage_before_the_crossing_call_and_resume_completes_it(tmp_path, servers, keys):
    servers["gpt4o"].usage = (1000, 100)
    # one gpt-4o judge call: worst case ~ (prompt estimate + max_tokens 256) at $2.50 / $10 per 1M tokens
    cfg = paper_config(tmp_path, servers, evaluate={"judges": ["gpt4o"], "m": 4}, budget={"stage_usd": 0.01})
    stage = judge_stage(cfg)
    with pytest.raises(StageStopped, match=r"budget\.stage_usd=0\.01 reached"):
        evaluate.run_judges(stage, ROWS)
    first = len(servers["gpt4o"].requests)
    spent = sum(row["cost_usd"] for row in read_ledger(stage.layout.calls_db))
    assert 0 < first < len(ROWS) * 4 and spent <= 0.01  # stopped before the call that could cross it

    raised = paper_config(
        tmp_path, servers, evaluate={"judges": ["gpt4o"], "m": 4}, budget={"stage_usd": 1.0}
    )
    judgments = evaluate.run_judges(judge_stage(raised), ROWS)
    assert all(j["ok"] for j in judgments)
    assert len(servers["gpt4o"].requests) == len(ROWS) * 4  # equal to an uninterrupted run: nothing twice


def test_a_token_budget_counts_what_earlier_stages_of_the_run_used(tmp_path, servers, keys):
    cfg = paper_config(
        tmp_path, servers, evaluate={"judges": ["gemini"], "m": 1}, budget={"run_tokens": 100_000}
    )
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    with CallCache(layout.calls_db) as cache:  # what 05 of an earlier cycle used
        cache.record(
            LedgerRow(
                stage="05_synthesize",
                cycle=0,
                provider="gpt4o",
                kind="openai",
                model="gpt-4o",
                input_tokens=60_000,
                output_tokens=39_900,
                latency_s=1.0,
                cost_usd=0.55,
                ok=True,
                error=None,
                attempts=1,
                cache_key="k",
            )
        )
    with pytest.raises(StageStopped, match=r"budget\.run_tokens=100000 reached: 99900 tokens"):
        evaluate.run_judges(judge_stage(cfg), ROWS)
    assert servers["gemini"].requests == []  # the first call could cross the cap: nothing was sent


# --------------------------------------------------------------------------- cache hygiene


@pytest.mark.parametrize(
    "finish, text, resent",
    [("length", '{"score": 1', False), ("content_filter", "", True), ("stop", "   ", True)],
)
def test_unusable_replies_are_ledgered_kept_raw_and_never_cached(tmp_path, finish, text, resent):
    server = ScriptedLLMServer()
    try:
        server.finish_reason, server.reply_text = finish, text
        pool, layout = make_pool(tmp_path, {"base_url": f"{server.root}/v1", "unusable_retries": 1})
        with pool:
            (result,) = pool.complete_many("judge", [ask()])
        assert result.error is not None and result.finish_reason == finish and not result.cached
        sent = 2 if resent else 1  # truncation is not re-sent: the same request would be cut again
        assert len(server.requests) == sent
        rows = read_ledger(layout.calls_db)
        assert len(rows) == sent and not any(r["ok"] for r in rows)
        with CallCache(layout.calls_db) as cache:
            kept = cache.failed_replies()
            assert cache.n_cached() == 0
        assert [(r["text"], r["finish_reason"]) for r in kept] == [(text, finish)] * sent
        if finish == "length":
            assert "truncated" in result.error
        server.finish_reason, server.reply_text = "stop", None
        with pool:  # a re-run re-sends it (failures are never replayed)
            (again,) = pool.complete_many("judge", [ask()])
        assert again.ok and not again.cached
    finally:
        server.close()


def test_an_empty_reply_with_a_length_stop_says_so(tmp_path, monkeypatch):
    server = ScriptedLLMServer()
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        server.finish_reason, server.reply_text = "length", ""
        pool, _ = make_pool(
            tmp_path,
            {"kind": "openai", "model": "o3", "base_url": f"{server.root}/v1", "reasoning_effort": "low"},
        )
        with pool:
            (result,) = pool.complete_many("judge", [ask(max_tokens=64)])
        assert "empty reply with a length stop" in result.error and "reasoning_effort" in result.error
        body = server.requests[0]["body"]
        # the reasoning allowance comes on top of the answer's own budget
        assert body["reasoning_effort"] == "low" and body["max_completion_tokens"] == 64 + 4096
    finally:
        server.close()


def test_a_timed_out_call_is_ledgered_at_its_estimated_cost(tmp_path, monkeypatch):
    server = ScriptedLLMServer()
    try:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        server.delay_s = 1.0
        pool, layout = make_pool(
            tmp_path,
            {
                "kind": "openai",
                "model": "gpt-4o",
                "base_url": f"{server.root}/v1",
                "timeout_s": 0.2,
                "max_retries": 1,
            },
        )
        with pool:
            (result,) = pool.complete_many("judge", [ask(max_tokens=100)])
        assert "timeout" in result.error
        rows = read_ledger(layout.calls_db)
        assert len(rows) == 2 and all("timeout" in r["error"] for r in rows)  # each attempt counted
        assert all(
            r["cost_usd"] >= 100 * 10.0 / 1e6 for r in rows
        )  # at least max_tokens at gpt-4o's output price
    finally:
        server.close()


# --------------------------------------------------------------------------- a cache that outlives a run


def test_a_new_run_reuses_answers_from_the_shared_cache_and_ledgers_the_reuse(tmp_path):
    server = ScriptedLLMServer()
    try:
        first, first_layout = make_pool(tmp_path, {"base_url": f"{server.root}/v1"})
        with first:
            paid = first.complete_many("judge", [ask(repeat=i) for i in range(3)])
        # the same project (outputs_dir), another run folder: as after --fresh or under a new run_name
        second = ServicePool(first.cfg, RunLayout(first_layout.root.parent / "svc-again"), "04_evaluate", 0)
        with second:
            reused = second.complete_many("judge", [ask(repeat=i) for i in range(3)])
        assert len(server.requests) == 3 and all(r.cached for r in reused)
        assert [r.text for r in reused] == [r.text for r in paid]
        assert read_ledger(second.layout.calls_db) == [] and second.stats.reused == 3
        with CallCache(second.layout.calls_db) as cache:
            assert len(cache.reused_rows()) == 3 and cache.n_cached() == 3

        bypass = ServicePool(
            build(RunConfig, {**second.cfg.to_dict(), "run_name": "svc-bypass", "cache": {"shared": False}}),
            RunLayout(first_layout.root.parent / "svc-bypass"),
            "04_evaluate",
            0,
        )
        with bypass:
            bypass.complete_many("judge", [ask(repeat=0)])
        assert len(server.requests) == 4  # the switch bypasses the shared cache
    finally:
        server.close()


# --------------------------------------------------------------------------- the runner never moves on

STOPPING_04 = """
from llamaduo_nb.config import load_config
from llamaduo_nb.services import ChatRequest, ServicePool
layout = RunLayout(Path(run_dir))
cfg = load_config(layout.params_file)
with ServicePool(cfg, layout, "04_evaluate", cycle, providers=["judge"]) as pool:
    pool.complete_many("judge", [ChatRequest([{"role": "user", "content": "Rate."}], repeat=i) for i in range(4)])
write_json(layout.metrics_file(cycle), {"decision": {"passed": (layout.root / "pass").exists(), "value": 10.0}})
"""


def stand_in(stage: str, body: str = "") -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "llamaduo-nb", "display_name": "llamaduo-nb", "language": "python"}
    per_cycle = stage not in ("01_coverage", "06_deploy")
    params = nbformat.v4.new_code_cell(
        'run_dir: str = "outputs/x"  # run folder\n' + ("cycle: int = 0  # cycle\n" if per_cycle else "")
    )
    params.metadata["tags"] = ["parameters"]
    tag = f"{stage}@{{cycle}}" if per_cycle else stage
    nb.cells = [
        params,
        nbformat.v4.new_code_cell(
            "from pathlib import Path\nfrom llamaduo_nb.jsonio import write_json\nfrom llamaduo_nb.runlayout import RunLayout\n"
            + body
            + f"\nwith open(Path(run_dir) / 'executed.log', 'a') as fh:\n    fh.write(f'{tag}\\n')"
        ),
    ]
    return nb


def test_the_runner_records_a_stopped_stage_and_never_moves_on(tmp_path, make_params, monkeypatch):
    server = ScriptedLLMServer()
    try:
        server.fail_with = UNAUTHORIZED[:2] + (
            {"error": {"message": "Incorrect API key", "code": "invalid_api_key"}},
        )
        monkeypatch.setenv("OPENAI_API_KEY", "sk-revoked")  # the kernel inherits the environment
        judge = {"name": "judge", "kind": "openai", "model": "gpt-4o-mini", "base_url": f"{server.root}/v1"}
        demo_local = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())["providers"][0]
        params = make_params(
            {"providers": [demo_local, judge], "evaluate": {"judges": ["judge"]}, "loop": {"max_cycles": 2}}
        )
        notebooks = tmp_path / "nbs"
        notebooks.mkdir()
        for stage in STAGES:
            nbformat.write(
                stand_in(stage, STOPPING_04 if stage == "04_evaluate" else ""), notebooks / f"{stage}.ipynb"
            )
        layout = RunLayout(tmp_path / "outputs" / "demo")

        with pytest.raises(runner.NotebookFailed) as failed:
            runner.run(params, notebooks_dir=notebooks, log=lambda m: None)
        assert (
            failed.value.stopped
            and "authentication" in failed.value.evalue
            and "'judge'" in failed.value.evalue
        )
        state = runner.RunState.load(layout.state_file)
        assert state.status == "stopped" and "cycle_00/04_evaluate stopped" in state.stop_reason
        assert state.done == ["01_coverage", "cycle_00/02_finetune", "cycle_00/03_batch_inference"]
        assert (layout.root / "executed.log").read_text().split()[
            -1
        ] == "03_batch_inference@0"  # no 05 after it
        assert len(server.requests) == 1

        server.fail_with = None  # a working key
        (layout.root / "pass").touch()  # (and a student good enough to end the loop: keeps the test short)
        state = runner.run(params, resume=True, notebooks_dir=notebooks, log=lambda m: None)
        assert state.status == "finished" and state.done[-2:] == ["cycle_00/04_evaluate", "06_deploy"]
        assert len(server.requests) == 1 + 4
    finally:
        server.close()


# --------------------------------------------------------------------------- reasoning models


def test_thinking_budgets_come_on_top_of_the_answer_budget(tmp_path, monkeypatch):
    server = ScriptedLLMServer()
    try:
        monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
        monkeypatch.setenv("GOOGLE_API_KEY", "test-key")
        server.reply_text = json.dumps({"score": 7})
        claude, _ = make_pool(
            tmp_path / "a",
            {
                "kind": "anthropic",
                "model": "claude-sonnet-4-5",
                "base_url": server.root,
                "thinking_budget": 1024,
            },
        )
        with claude:
            (answer,) = claude.complete_many("judge", [ask(max_tokens=200, json_schema=SCORE_SCHEMA)])
        body = server.requests[-1]["body"]
        assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024} and body["max_tokens"] == 1224
        assert "tools" not in body and "JSON schema" in body["system"]  # no forced tool with thinking
        assert answer.parsed == {"score": 7}

        gemini, _ = make_pool(
            tmp_path / "g",
            {"kind": "google", "model": "gemini-2.5-flash", "base_url": server.root, "thinking_budget": 512},
        )
        with gemini:
            gemini.complete_many("judge", [ask(max_tokens=200)])
        config = server.requests[-1]["body"]["generationConfig"]
        # google-genai sends the inner field as thinking_budget (proto JSON accepts either spelling)
        assert config["thinkingConfig"] in ({"thinkingBudget": 512}, {"thinking_budget": 512})
        assert config["maxOutputTokens"] == 712
    finally:
        server.close()


GOOGLE_DAILY_QUOTA = {
    "error": {
        "code": 429,
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}],
            },
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"},
        ],
    }
}


@pytest.mark.parametrize(
    "kind, model, reply, reason",
    [
        ("anthropic", "claude-haiku-4-5", (400, {}, {"type": "error", "error": {"type": "invalid_request_error",
         "message": "Your credit balance is too low to access the Anthropic API."}}), "quota exhausted"),
        ("google", "gemini-2.0-flash", (429, {}, GOOGLE_DAILY_QUOTA), "quota exhausted"),
        ("google", "gemini-2.0-flash", (400, {}, {"error": {"code": 400, "message": "API key not valid.",
         "status": "INVALID_ARGUMENT", "details": [{"reason": "API_KEY_INVALID"}]}}), "authentication failed"),
        ("anthropic", "claude-haiku-4-5", (403, {}, {"type": "error", "error": {"type": "permission_error",
         "message": "no access"}}), "permission denied"),
        ("openai", "gpt-4o-mini", (404, {}, {"error": {"message": "The model `gpt-4o-mini` does not exist",
         "type": "invalid_request_error", "code": "model_not_found"}}), "model not found"),
    ],
)  # fmt: skip
def test_each_providers_fatal_errors_stop_after_one_call(tmp_path, monkeypatch, kind, model, reply, reason):
    server = ScriptedLLMServer()
    try:
        for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY"):
            monkeypatch.setenv(name, "test-key")
        server.fail_with = reply
        base_url = f"{server.root}/v1" if kind == "openai" else server.root
        pool, _ = make_pool(tmp_path, {"kind": kind, "model": model, "base_url": base_url})
        with pool, pytest.raises(StageStopped, match=reason):
            pool.complete_many("judge", [ask(repeat=i) for i in range(5)])
        assert len(server.requests) == 1  # no retry (not even Google's retryDelay), no second call
    finally:
        server.close()


def paid_stand_in(stage: str, n: int) -> str:
    """A stand-in paid notebook body: `n` distinct calls of `stage` through the pool."""
    return f"""
from llamaduo_nb.config import load_config
from llamaduo_nb.services import ChatRequest, ServicePool
layout = RunLayout(Path(run_dir))
cfg = load_config(layout.params_file)
with ServicePool(cfg, layout, {stage!r}, cycle, providers=["judge"]) as pool:
    pool.complete_many("judge", [ChatRequest([{{"role": "user", "content": f"{stage} {{cycle}}"}}], repeat=i)
                                 for i in range({n})])
"""


def test_retry_failed_resends_the_failed_calls_of_every_finished_paid_stage(
    tmp_path, make_params, monkeypatch, capsys
):
    from llamaduo_nb.cli import main, retry_failed

    server = ScriptedLLMServer()
    try:
        failing = (500, {}, {"error": {"message": "overloaded"}})
        # 04 of cycle 0 (4 calls): the 2nd fails; 05 of cycle 0 (2 calls): the 2nd fails; cycle 1 all answered
        server.script = [(200, {}, None), failing, (200, {}, None), (200, {}, None), (200, {}, None), failing]
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        judge = {"name": "judge", "kind": "openai", "model": "gpt-4o-mini", "base_url": f"{server.root}/v1",
                 "max_retries": 0, "max_failure_share": 1.0, "max_concurrency": 1}  # fmt: skip
        demo_local = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())["providers"][0]
        params = make_params({"providers": [demo_local, judge], "evaluate": {"judges": ["judge"]},
                              "synthesize": {"generator": "judge"}, "loop": {"max_cycles": 2},
                              "deploy": {"enabled": False}})  # fmt: skip
        notebooks = tmp_path / "nbs"
        notebooks.mkdir()
        decision = '\nwrite_json(layout.metrics_file(cycle), {"decision": {"passed": False, "value": 1.0}})'
        bodies = {
            "04_evaluate": paid_stand_in("04_evaluate", 4) + decision,
            "05_synthesize": paid_stand_in("05_synthesize", 2),
        }
        for stage in STAGES:
            nbformat.write(stand_in(stage, bodies.get(stage, "")), notebooks / f"{stage}.ipynb")
        logged: list[str] = []
        state = runner.run(params, notebooks_dir=notebooks, log=logged.append)
        assert state.status == "finished" and state.done[-1] == "cycle_01/04_evaluate"
        # the runner recorded (and showed) each paid stage's forecast before it ran: the stand-ins have no cell
        for step in ("cycle_00/04_evaluate", "cycle_00/05_synthesize", "cycle_01/04_evaluate"):
            assert any(m.startswith(f"[llamaduo] forecast {step}: ") for m in logged), step
        assert len(server.requests) == 4 + 2 + 4
        layout = RunLayout(tmp_path / "outputs" / "demo")

        with pytest.raises(ConfigError, match="no such finished paid step"):
            retry_failed(params, notebooks_dir=notebooks, step="cycle_01/05_synthesize")
        # a named step: only its failure goes out again
        message = retry_failed(params, notebooks_dir=notebooks, step="05_synthesize", log=lambda m: None)
        assert message.startswith("cycle_00/05_synthesize: re-sent 1 failed call(s); 0 still failing")
        assert "already ran on its earlier outputs: cycle_01/02_finetune" in message
        assert len(server.requests) == 4 + 2 + 4 + 1
        # every finished paid stage: what is left is 04's of cycle 0 (not the last step)
        message = retry_failed(params, notebooks_dir=notebooks, log=lambda m: None)
        assert message.startswith("cycle_00/04_evaluate: re-sent 1 failed call(s); 0 still failing")
        assert len(server.requests) == 4 + 2 + 4 + 2  # every answer replayed from the cache
        assert retry_failed(params, notebooks_dir=notebooks).endswith("no failed calls to retry")
        assert (
            main(["run", str(params), "--retry-failed", "--step", "04_evaluate"]) == 0
        )  # the CLI's spelling
        assert (
            "cycle_00/04_evaluate, cycle_01/04_evaluate: no failed calls to retry" in capsys.readouterr().out
        )
        paid = paid_keys(layout)
        assert len(paid) == len(set(paid)) == 4 + 2 + 4  # each answer paid once
        assert "cycle_00" not in runner.RunState.load(layout.state_file).decisions  # re-read on --resume
    finally:
        server.close()
