"""The service-LLM client layer against real HTTP: a scripted local server for failures, the real llama.cpp server.

The scripted server on 127.0.0.1 speaks the OpenAI, Anthropic and Google wire formats and answers from
a queue (429, 5xx, 4xx, slow replies), which is the honest way to make a provider fail on purpose. The
real SDK clients talk to it over HTTP, so retries, headers, structured-output requests and parsing
are exercised for real.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from llamaduo_nb.callcache import CallCache, read_ledger
from llamaduo_nb.config import RunConfig, build
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.services import (
    ChatRequest,
    MissingAPIKeyError,
    ServicePool,
    StageStopped,
    extract_json,
    parse_structured,
)

ROOT = Path(__file__).resolve().parent.parent

SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer"}, "n": {"type": "integer"}},
    "required": ["score"],
}


# --------------------------------------------------------------------------- a scripted provider on 127.0.0.1


class ScriptedLLMServer:
    """Replies from `script` (status, headers, body) in order; once it is empty, `fail_with` if set, else a valid
    answer (a script entry with body None is a valid answer too).

    `requests` records every HTTP request: path, lower-cased headers, JSON body, arrival time.
    """

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str], Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.reply_text: str | None = None  # None: '{"score": 7, "n": <request number>}'
        self.usage = (11, 5)
        self.delay_s = 0.0
        self.fail_with: tuple[int, dict[str, str], Any] | None = None  # answer every request with this error
        self.finish_reason = "stop"  # OpenAI spelling; mapped to Anthropic / Google spellings below
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with server._lock:
                    server.requests.append(
                        {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                         "body": body, "t": time.monotonic()}
                    )  # fmt: skip
                    n = len(server.requests)
                    scripted = server.script.pop(0) if server.script else server.fail_with
                if server.delay_s:
                    time.sleep(server.delay_s)
                status, headers, payload = scripted or (200, {}, None)
                if payload is None:
                    payload = server.answer(self.path, body, n)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str, body: dict, n: int) -> dict:
        text = self.reply_text if self.reply_text is not None else json.dumps({"score": 7, "n": n})
        prompt_tokens, completion_tokens = self.usage
        if path.endswith("/chat/completions"):
            return {
                "id": f"chatcmpl-{n}", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": self.finish_reason}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
            }  # fmt: skip
        if path.endswith("/messages"):
            if body.get("tools"):
                content = [{"type": "tool_use", "id": f"tu_{n}", "name": body["tools"][0]["name"],
                            "input": json.loads(text)}]  # fmt: skip
            else:
                content = [{"type": "text", "text": text}]
            return {
                "id": f"msg_{n}", "type": "message", "role": "assistant", "model": body.get("model", ""),
                "content": content, "stop_reason": {"stop": "end_turn", "length": "max_tokens"}.get(
                    self.finish_reason, self.finish_reason), "stop_sequence": None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
            }  # fmt: skip
        if ":generateContent" in path:
            return {
                "candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                "finishReason": {"stop": "STOP", "length": "MAX_TOKENS"}.get(
                                    self.finish_reason, self.finish_reason)}],
                "usageMetadata": {"promptTokenCount": prompt_tokens, "candidatesTokenCount": completion_tokens,
                                  "totalTokenCount": prompt_tokens + completion_tokens},
            }  # fmt: skip
        return {"error": {"message": f"no route {path}"}}

    def error(self, status: int, headers: dict[str, str] | None = None, message: str = "try again") -> None:
        self.script.append(
            (status, headers or {}, {"error": {"message": message, "type": "test", "code": status}})
        )

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def llm_server():
    server = ScriptedLLMServer()
    yield server
    server.close()


def make_pool(
    tmp_path: Path,
    provider: dict[str, Any],
    stage: str = "04_evaluate",
    cycle: int | None = 0,
    forecast: bool = True,
):
    provider = {
        "name": "judge",
        "kind": "openai_compatible",
        "model": "test-model",
        "max_retries": 3,
        **provider,
    }
    if provider["kind"] == "openai_compatible":
        provider.setdefault("free", True)  # the scripted server is "self-hosted": no price needed
    data = {
        "run_name": "svc",
        "outputs_dir": str(tmp_path / "outputs"),
        "prices_file": str(ROOT / "params" / "prices.yaml"),
        "coverage": {"source": "unused.jsonl"},
        "evaluate": {"judges": [provider["name"]]},
        "synthesize": {"generator": provider["name"]},
        "providers": [provider],
    }
    cfg = build(RunConfig, data, source="<test>")
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    if forecast:
        record_forecast(layout, stage, cycle, provider["name"])
    return ServicePool(cfg, layout, stage=stage, cycle=cycle), layout


def record_forecast(layout: RunLayout, stage: str, cycle: int | None, provider: str) -> None:
    """A paid call needs its stage's forecast on record (the runner and the notebooks record the real one
    before a stage; these tests drive the pool directly, so they note one line of it)."""
    with CallCache(layout.calls_db) as cache:
        cache.record_forecast(stage, cycle, [{"stage": stage, "cycle": cycle, "provider": provider}])


def ask(text: str = "Rate this answer.", repeat: int = 0, **kw: Any) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], repeat=repeat, **kw)


# --------------------------------------------------------------------------- cache and ledger


def test_identical_request_is_replayed_from_the_cache_and_another_repeat_is_not(tmp_path, llm_server):
    pool, layout = make_pool(tmp_path, {"base_url": f"{llm_server.root}/v1"})
    with pool:
        first = pool.complete_many("judge", [ask(repeat=0), ask(repeat=1)])
    assert len(llm_server.requests) == 2
    assert [r.cached for r in first] == [False, False]
    assert first[0].parsed is None and first[0].text != first[1].text  # M repeats stay distinct answers

    with pool:  # a re-run after a crash: a fresh pool on the same run folder
        again = pool.complete_many("judge", [ask(repeat=0), ask(repeat=2)])
    assert len(llm_server.requests) == 3  # only repeat 2 went out
    assert again[0].cached and again[0].text == first[0].text and again[0].cost_usd == 0.0
    assert not again[1].cached
    ledger = read_ledger(layout.calls_db)
    assert len(ledger) == 3  # the cache hit added no ledger row
    assert {row["cache_key"] for row in ledger} == {
        first[0].cache_key,
        first[1].cache_key,
        again[1].cache_key,
    }


def test_duplicate_requests_in_one_batch_make_one_call(tmp_path, llm_server):
    pool, layout = make_pool(tmp_path, {"base_url": f"{llm_server.root}/v1"})
    with pool:
        results = pool.complete_many("judge", [ask(), ask(), ask()])
    assert len(llm_server.requests) == 1
    assert len({r.text for r in results}) == 1 and sum(not r.cached for r in results) == 1
    assert len(read_ledger(layout.calls_db)) == 1


def test_ledger_row_has_tokens_and_cost_from_the_price_table(tmp_path, llm_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-ledger")
    llm_server.usage = (1000, 500)
    pool, layout = make_pool(
        tmp_path, {"kind": "openai", "model": "gpt-4o-mini", "base_url": f"{llm_server.root}/v1"}, cycle=2
    )
    with pool:
        (result,) = pool.complete_many("judge", [ask(json_schema=SCORE_SCHEMA)])
    expected = (1000 * 0.15 + 500 * 0.60) / 1_000_000  # params/prices.yaml: gpt-4o-mini $0.15 / $0.60
    assert result.cost_usd == pytest.approx(expected)
    (row,) = read_ledger(layout.calls_db)
    assert row["stage"] == "04_evaluate" and row["cycle"] == 2
    assert (row["provider"], row["kind"], row["model"]) == ("judge", "openai", "gpt-4o-mini")
    assert (row["input_tokens"], row["output_tokens"]) == (1000, 500)
    assert row["cost_usd"] == pytest.approx(expected) and row["ok"] is True and row["attempts"] == 1
    assert row["latency_s"] > 0
    assert layout.ledger_csv.read_text().count("gpt-4o-mini") == 1  # exported when the pool closed
    # OpenAI proper: schema enforced by response_format, token cap named max_completion_tokens
    body = llm_server.requests[0]["body"]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == SCORE_SCHEMA
    assert body["response_format"]["json_schema"]["strict"] is False  # open schema: strict would reject it
    assert body["max_completion_tokens"] == 512 and "max_tokens" not in body
    assert result.parsed == {"score": 7, "n": 1}


# --------------------------------------------------------------------------- retries, failures, timeouts


def test_429_is_retried_after_the_time_the_server_asks_for(tmp_path, llm_server):
    llm_server.error(429, {"retry-after": "1"}, "rate limited")
    pool, layout = make_pool(tmp_path, {"base_url": f"{llm_server.root}/v1"})
    with pool:
        (result,) = pool.complete_many("judge", [ask()])
    assert result.error is None and result.attempts == 2
    assert result.text == json.dumps({"score": 7, "n": 2})
    first, second = llm_server.requests
    assert second["t"] - first["t"] >= 0.95  # retry-after: 1 was honoured
    # every HTTP attempt has its ledger row (issue 22): the 429, at $0, then the answer
    retried, row = read_ledger(layout.calls_db)
    assert not retried["ok"] and retried["error"].startswith("retried: HTTP 429") and retried["cost_usd"] == 0
    assert retried["attempts"] == 1
    assert row["ok"] is True and row["attempts"] == 2


def test_server_errors_are_retried_until_success(tmp_path, llm_server):
    llm_server.error(503, {"retry-after-ms": "50"})
    llm_server.error(500)  # no hint: exponential backoff with jitter
    pool, layout = make_pool(tmp_path, {"base_url": f"{llm_server.root}/v1"})
    with pool:
        (result,) = pool.complete_many("judge", [ask()])
    assert result.error is None and result.attempts == 3 and len(llm_server.requests) == 3
    assert read_ledger(layout.calls_db)[-1]["attempts"] == 3  # the answer; each failed attempt has a row
    assert [r["attempts"] for r in read_ledger(layout.calls_db)] == [1, 2, 3]


def test_permanent_failures_come_back_as_errors_not_exceptions(tmp_path, llm_server):
    pool, layout = make_pool(
        tmp_path, {"base_url": f"{llm_server.root}/v1", "max_retries": 1, "max_concurrency": 1}
    )
    with pool:
        llm_server.error(400, message="bad request: unknown field")  # not retryable: one attempt
        bad, fine = pool.complete_many("judge", [ask("a"), ask("b")])
        for _ in range(2):
            llm_server.error(500, {"retry-after-ms": "10"})  # retryable, but max_retries=1 runs out
        (down,) = pool.complete_many("judge", [ask("c")])
    assert bad.error.startswith("HTTP 400") and "unknown field" in bad.error and bad.attempts == 1
    assert bad.text == "" and bad.parsed is None and not bad.cached
    assert fine.error is None  # one bad call does not sink the batch
    assert down.error.startswith("HTTP 500") and down.attempts == 2
    assert len(llm_server.requests) == 4
    rows = read_ledger(layout.calls_db)
    # each HTTP attempt has its row (issue 22): "c"'s first 500 was retried, its second is the final failure
    assert [(r["ok"], r["attempts"]) for r in rows] == [(False, 1), (True, 1), (False, 1), (False, 2)]
    assert rows[2]["error"].startswith("retried: HTTP 500") and rows[3]["error"].startswith("HTTP 500")
    with pool:  # failures are not cached: a re-run tries them again
        retried = pool.complete_many("judge", [ask("a")])
    assert retried[0].error is None and not retried[0].cached


def test_a_slow_reply_times_out_into_an_error(tmp_path, llm_server):
    llm_server.delay_s = 1.5
    pool, layout = make_pool(
        tmp_path, {"base_url": f"{llm_server.root}/v1", "timeout_s": 0.3, "max_retries": 0}
    )
    with pool:
        (result,) = pool.complete_many("judge", [ask()])
    assert result.error is not None and "timeout" in result.error.lower()
    (row,) = read_ledger(layout.calls_db)
    assert row["ok"] is False and "timeout" in row["error"] and row["attempts"] == 1


def test_the_pools_spend_is_its_ledgers_resent_unusable_replies_and_timeouts_included(
    tmp_path, llm_server, monkeypatch
):
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    empty = llm_server.answer("/v1/chat/completions", {"model": "gpt-4o"}, 0)
    empty["choices"][0]["message"]["content"] = ""
    llm_server.script.append((200, {}, empty))  # paid, unusable: re-sent once, then answered
    pool, layout = make_pool(
        tmp_path,
        {"kind": "openai", "model": "gpt-4o", "base_url": f"{llm_server.root}/v1", "timeout_s": 0.5,
         "max_retries": 0, "unusable_retries": 1},
    )  # fmt: skip
    with pool:
        (answered,) = pool.complete_many("judge", [ask("a")])
        llm_server.delay_s = 2.0
        (timed_out,) = pool.complete_many("judge", [ask("b")])  # billed at its worst case
    assert answered.error is None and "timeout" in timed_out.error.lower()
    ledger = read_ledger(layout.calls_db)
    assert len(ledger) == 3 and all(row["cost_usd"] > 0 for row in ledger)
    spent = sum(row["cost_usd"] for row in ledger)
    assert pool.stats.cost_usd == pytest.approx(spent)
    assert pool.stats.by_provider["judge"]["cost_usd"] == pytest.approx(spent)
    # what the results say they cost misses the unusable reply and the timed-out attempt: the ledger does not
    assert answered.cost_usd + timed_out.cost_usd < spent


def test_a_request_larger_than_the_token_budget_still_goes_out(tmp_path, llm_server):
    pool, _ = make_pool(tmp_path, {"base_url": f"{llm_server.root}/v1", "tpm": 50, "rpm": 1000})
    with pool:
        (result,) = pool.complete_many("judge", [ask(max_tokens=400)])
    assert result.error is None


# --------------------------------------------------------------------------- event loops


def test_complete_many_works_inside_a_running_event_loop(tmp_path, llm_server):
    pool, _ = make_pool(tmp_path, {"base_url": f"{llm_server.root}/v1"})

    async def notebook_cell():  # Jupyter runs cells while its own loop is running
        assert asyncio.get_running_loop().is_running()
        results = pool.complete_many("judge", [ask(repeat=i) for i in range(4)])
        awaited = await pool.acomplete("judge", ask(repeat=9))
        return results, awaited

    with pool:
        results, awaited = asyncio.run(notebook_cell())
    assert [r.error for r in results] == [None] * 4 and awaited.error is None
    assert len(llm_server.requests) == 5


# --------------------------------------------------------------------------- keys


def test_missing_key_is_reported_by_name_before_any_call(tmp_path, llm_server, monkeypatch):
    monkeypatch.delenv("LLAMADUO_TEST_ABSENT_KEY", raising=False)
    pool, layout = make_pool(
        tmp_path,
        {
            "kind": "openai",
            "model": "gpt-4o",
            "base_url": f"{llm_server.root}/v1",
            "api_key_env": "LLAMADUO_TEST_ABSENT_KEY",
        },  # fmt: skip
        forecast=False,
    )
    with pytest.raises(MissingAPIKeyError, match="LLAMADUO_TEST_ABSENT_KEY"):
        with pool:
            pass
    assert llm_server.requests == [] and not layout.calls_db.exists()


def test_a_paid_model_without_a_price_is_never_called_at_0_dollars(tmp_path, llm_server, monkeypatch):
    """Config validation refuses a paid provider without a price; a provider that reaches the pool another way
    (built in code, or the price table edited under a run) stops the stage before its first call."""
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    priced, layout = make_pool(
        tmp_path, {"kind": "openai", "model": "gpt-4o", "base_url": f"{llm_server.root}/v1"}
    )
    unpriced = dataclasses.replace(priced.cfg.providers[0], model="gpt-unlisted-9")
    pool = ServicePool(dataclasses.replace(priced.cfg, providers=[unpriced]), layout, "04_evaluate", 0)
    with pytest.raises(StageStopped, match=r"model 'gpt-unlisted-9', which has no price"):
        with pool:
            pool.complete_many("judge", [ask()])
    assert llm_server.requests == [] and read_ledger(layout.calls_db) == []


def test_a_planted_api_key_is_never_written_under_the_run_folder(tmp_path, llm_server, monkeypatch):
    planted = "sk-" + "planted-7f3a9c1e5b2d4f6a8c0e"  # built at run time: no key-shaped literal in the tree
    monkeypatch.setenv("OPENAI_API_KEY", planted)
    # the provider echoes the key in an error, as real providers do for a wrong key
    llm_server.error(401, message=f"Incorrect API key provided: {planted}. Find your key at ...")
    pool, layout = make_pool(
        tmp_path, {"kind": "openai", "model": "gpt-4o", "base_url": f"{llm_server.root}/v1"}
    )
    with pool, pytest.raises(StageStopped) as stopped:  # a rejected key stops the stage at once
        pool.complete_many("judge", [ask("a")])
    assert "authentication failed" in str(stopped.value) and planted not in str(stopped.value)
    with pool:  # the key "fixed" (the server accepts from now on): a fresh pool continues
        accepted = pool.complete_many("judge", [ask("b")])[0]
        accepted_again = pool.complete_many("judge", [ask("b")])[0]
    rejected = read_ledger(layout.calls_db)[0]
    assert llm_server.requests[0]["headers"]["authorization"] == f"Bearer {planted}"  # the key was in play
    assert rejected["error"] is not None and planted not in rejected["error"]
    assert accepted.error is None and accepted_again.cached
    files = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]  # the run and the shared cache
    assert layout.calls_db in files and layout.ledger_csv in files
    for path in files:
        assert planted.encode() not in path.read_bytes(), path
        assert planted[-8:].encode() not in path.read_bytes(), path  # not even a masked tail


# --------------------------------------------------------------------------- structured output


def test_json_is_extracted_from_fences_and_prose_and_checked_against_the_schema():
    assert extract_json('Sure!\n```json\n{"score": 3}\n```\nHope this helps {not json}') == {"score": 3}
    assert extract_json('[1, 2] and {"a": 1}') == [1, 2]
    assert parse_structured('{"score": 3}', SCORE_SCHEMA) == ({"score": 3}, None)
    parsed, error = parse_structured('{"score": "high"}', SCORE_SCHEMA)
    assert parsed is None and "score" in error
    parsed, error = parse_structured("I cannot rate this.", SCORE_SCHEMA)
    assert parsed is None and "no JSON" in error


def test_prompt_only_json_mode_states_the_schema_and_parses_leniently(tmp_path, llm_server):
    llm_server.reply_text = 'Here you go:\n```json\n{"score": 4}\n```\nAnything else?'
    pool, _ = make_pool(tmp_path, {"base_url": f"{llm_server.root}/v1", "json_mode": "none"})
    with pool:
        good, bad = pool.complete_many(
            "judge", [ask(json_schema=SCORE_SCHEMA), ask("x", json_schema={"type": "array"})]
        )
    assert good.parsed == {"score": 4} and good.parse_error is None
    assert bad.parsed is None and bad.parse_error and bad.error is None  # a parse failure never raises
    (body,) = [
        r["body"] for r in llm_server.requests if r["body"]["messages"][-1]["content"] == "Rate this answer."
    ]
    assert "response_format" not in body and body["max_tokens"] == 512
    assert body["messages"][0]["role"] == "system" and '"score"' in body["messages"][0]["content"]


def test_anthropic_schema_goes_through_a_forced_tool(tmp_path, llm_server, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    pool, layout = make_pool(tmp_path, {"kind": "anthropic", "model": "claude-3-5-sonnet-20241022",
                                        "base_url": llm_server.root})  # fmt: skip
    request = ChatRequest(
        messages=[
            {"role": "system", "content": "You grade answers."},
            {"role": "user", "content": "Grade it."},
        ],
        temperature=1.0,
        json_schema=SCORE_SCHEMA,
        schema_name="grade",
    )
    with pool:
        (result,) = pool.complete_many("judge", [request])
    assert result.parsed == {"score": 7, "n": 1} and result.error is None
    http = llm_server.requests[0]
    assert http["path"] == "/v1/messages" and "sk-ant-test" in http["headers"]["authorization"]
    body = http["body"]
    assert body["system"] == "You grade answers." and [m["role"] for m in body["messages"]] == ["user"]
    assert body["tools"][0]["input_schema"] == SCORE_SCHEMA
    assert body["tool_choice"] == {"type": "tool", "name": "grade"}
    assert "temperature" not in body  # API version 2026-10-21 has no sampling parameters
    assert read_ledger(layout.calls_db)[0]["cost_usd"] == pytest.approx((11 * 3.0 + 5 * 15.0) / 1e6)


def test_google_schema_goes_through_the_response_schema(tmp_path, llm_server, monkeypatch):
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", "gm-test")
    pool, _ = make_pool(
        tmp_path, {"kind": "google", "model": "gemini-2.0-flash", "base_url": llm_server.root}
    )
    request = ChatRequest(
        messages=[
            {"role": "system", "content": "You grade answers."},
            {"role": "user", "content": "Grade it."},
        ],
        temperature=0.5,
        json_schema=SCORE_SCHEMA,
    )
    with pool:
        (result,) = pool.complete_many("judge", [request])
    assert result.parsed == {"score": 7, "n": 1} and (result.input_tokens, result.output_tokens) == (11, 5)
    http = llm_server.requests[0]
    assert http["path"].endswith("/models/gemini-2.0-flash:generateContent")
    assert http["headers"]["x-goog-api-key"] == "gm-test"
    config = http["body"]["generationConfig"]
    assert config["responseMimeType"] == "application/json" and config["responseJsonSchema"] == SCORE_SCHEMA
    assert config["temperature"] == 0.5 and config["maxOutputTokens"] == 512
    assert http["body"]["systemInstruction"]["parts"][0]["text"] == "You grade answers."


# --------------------------------------------------------------------------- the embedded llama.cpp server


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_embedded_server_answers_a_json_schema_request_through_the_openai_client(tmp_path):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population_millions": {"type": "number"}},
        "required": ["city", "population_millions"],
        "additionalProperties": False,
    }
    pool, layout = make_pool(
        tmp_path, {"kind": "embedded", "model": "smollm2", "max_concurrency": 1}, stage="05_synthesize"
    )
    request = ChatRequest(
        messages=[{"role": "user", "content": "Name a large city and its population in millions, as JSON."}],
        max_tokens=64,
        json_schema=schema,
    )
    with pool:
        server = pool._server
        assert server.base_url.startswith("http://127.0.0.1:")
        (result,) = pool.complete_many("judge", [request])
        (replayed,) = pool.complete_many("judge", [request])
    assert server.process is None  # stopped on exit
    assert result.error is None, result.error
    assert result.parse_error is None, (result.text, result.parse_error)
    jsonschema.validate(result.parsed, schema)
    assert replayed.cached and replayed.parsed == result.parsed
    (row,) = read_ledger(layout.calls_db)
    assert row["kind"] == "embedded" and row["cost_usd"] == 0.0
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_the_embedded_server_gets_its_first_calls_together(tmp_path):
    """The pool starts and checks the embedded server itself, so its first call does not go out alone: two
    answers overlap in time (the ledger's finish time minus latency is each start). A remote
    provider's first call goes alone: test_dead_provider_and_budgets."""
    from datetime import datetime

    pool, layout = make_pool(
        tmp_path,
        {"kind": "embedded", "model": "smollm2", "max_concurrency": 2, "rpm": 100_000, "tpm": 10**9},
        stage="05_synthesize",
    )
    requests = [
        ChatRequest(messages=[{"role": "user", "content": f"Name {n} colours."}], max_tokens=256)
        for n in ("two", "three")
    ]
    with pool:
        assert pool._lane("judge").provider.probe_first_call is False  # set by the pool, not the params
        results = pool.complete_many("judge", requests)
    assert all(r.error is None for r in results)
    spans = []
    for row in read_ledger(layout.calls_db):
        end = datetime.fromisoformat(row["ts"]).timestamp()
        spans.append((end - row["latency_s"], end))
    assert len(spans) == 2 and max(s for s, _ in spans) < min(e for _, e in spans)  # both in flight at once
