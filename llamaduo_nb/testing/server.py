"""A local OpenAI-compatible (and Gemini-shaped) LLM server that misbehaves on purpose, for tests and benches.

    with TestLLMServer(Behaviour(latency_s=0.5, rpm=600)) as server:
        ...  # point a provider at server.base_url ("http://127.0.0.1:<port>/v1")
        server.log  # one LoggedRequest per HTTP request: arrival, finish, outcome, body key, tokens

What it does, on 127.0.0.1 (aiohttp, real HTTP, its own event loop in a daemon thread):

- Answers `POST /v1/chat/completions` (OpenAI) and `POST /<version>/models/<model>:generateContent`
  (Gemini) after `latency_s` (+ a deterministic jitter of up to `latency_jitter_s`).
- Deterministic replies: when the request asks for a JSON schema (`response_format` json_schema,
  Gemini `responseJsonSchema`) the reply is a valid instance of it, drawn from the request's own
  hash - so a judge gets scores in range and a synthesis request gets distinct pairs; otherwise a
  sentence drawn the same way. The same request always gets the same reply.
- Limits like a provider's: more than `rpm` requests or `tpm` tokens (prompt characters / 4 +
  max_tokens, counted at arrival, as OpenAI does) within any `period_s` window is answered 429
  with `retry-after-ms` and `retry-after` saying when the window frees.
- Faults, chosen per request from a seeded hash of (request, how many times it was seen) so runs
  repeat: `error_rate` answers 500/502/503, `hang_rate` sleeps `hang_s` (the client times out),
  `drop_rate` closes the connection without a reply. `fail_next(outcome, n)` forces the next n.
- A request log for counting: arrivals per window, answers per request (duplicates), 429s.
- Batch APIs, in each provider's wire format: OpenAI (`POST /v1/files` purpose=batch, `POST /v1/batches`,
  `GET /v1/batches/<id>`, `GET /v1/files/<id>/content`), Anthropic Message Batches (`POST /v1/messages/batches`,
  `GET /v1/messages/batches/<id>[/results]`) and Gemini batch mode with inlined requests
  (`POST /<version>/models/<model>:batchGenerateContent`, `GET /<version>/batches/<id>`). A batch ends
  `batch_delay_s` after it was created; each of its requests is decided like a live one (forced faults,
  `error_rate`) and logged, an "error" becoming an errored item. `batch_submits` counts the batches created
  per API; `end_next_batch(state)` makes the next batch end expired, cancelled or failed.
- `auth_error`: every request is answered 401 (the key was rejected).

Run it by hand: `python -m llamaduo_nb.testing --rpm 600 --latency 0.5` (Ctrl-C stops it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

OUTCOMES = ("ok", "rate_limited", "error", "hang", "drop", "empty")  # empty: a 200 with no text (forced only)
_WORDS = (
    "apple river stone cloud garden lantern mirror harbor violin pepper candle meadow silver forest "
    "engine basket anchor pillow marble orbit thunder velvet copper desert island ladder rocket saddle "
    "tunnel window yellow zebra planet crystal falcon goblet hammer jungle kettle lemon magnet needle "
    "oyster pencil quartz ribbon shadow tiger umbrella valley walnut yogurt bridge castle dragon feather "
    "glacier helmet ivory jacket koala lizard mango nectar olive parrot quiver radar salmon tulip"
).split()


@dataclass(frozen=True)
class Behaviour:
    latency_s: float = 0.0  # seconds before every answer
    latency_jitter_s: float = 0.0  # plus up to this much, fixed per request
    rpm: int | None = None  # requests per period_s; None: unlimited
    tpm: int | None = None  # tokens per period_s; None: unlimited
    period_s: float = 60.0  # the limits' window (shrink it to scale time)
    retry_after: bool = True  # send retry-after(-ms) with a 429
    error_rate: float = 0.0  # share answered 500/502/503
    hang_rate: float = 0.0  # share that sleep hang_s before answering (client timeouts)
    hang_s: float = 30.0
    drop_rate: float = 0.0  # share whose connection is closed without a reply
    seed: int = 0
    usage_output_tokens: int | None = None  # completion tokens to report; None: about len(reply) / 4
    batch_delay_s: float = 0.0  # a batch ends this long after it was created (batch APIs)
    auth_error: bool = False  # answer every request 401, as a provider does to a revoked key


@dataclass
class LoggedRequest:
    key: str  # hash of the request body minus volatile fields: equal requests share it
    path: str
    arrived: float  # time.monotonic() of this process
    tokens: int  # counted against tpm
    outcome: str = "pending"  # one of OUTCOMES once decided
    status: int = 0
    finished: float | None = None  # when the answer (or the drop) went out


def request_key(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


def _prompt_chars(body: dict) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content", ""))) for m in body["messages"])
    chars = sum(len(p.get("text", "")) for c in body.get("contents", []) for p in c.get("parts", []))
    system = body.get("systemInstruction") or body.get("system_instruction") or {}
    return chars + sum(len(p.get("text", "")) for p in system.get("parts", []))


def _max_tokens(body: dict) -> int:
    config = body.get("generationConfig") or body.get("generation_config") or {}
    return int(
        body.get("max_completion_tokens") or body.get("max_tokens") or config.get("maxOutputTokens") or 16
    )


def counted_tokens(body: dict) -> int:
    """What a request counts against tpm: prompt characters / 4 + max_tokens (counted at arrival)."""
    return _prompt_chars(body) // 4 + _max_tokens(body)


def schema_instance(schema: Any, rng: random.Random) -> Any:
    """A value valid against the (simple) JSON `schema`, drawn from `rng`."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    for combinator in ("anyOf", "oneOf", "allOf"):
        if schema.get(combinator):
            return schema_instance(schema[combinator][0], rng)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {name: schema_instance(sub, rng) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        low = int(schema.get("minItems", 1))
        high = max(low, min(int(schema.get("maxItems", low + 2)), low + 2))
        return [schema_instance(schema.get("items", {}), rng) for _ in range(rng.randint(low, high))]
    if kind == "integer":
        return rng.randint(int(schema.get("minimum", 0)), int(schema.get("maximum", 100)))
    if kind == "number":
        return round(rng.uniform(float(schema.get("minimum", 0)), float(schema.get("maximum", 1))), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return _sentence(rng, max(int(schema.get("minLength", 0)), 1))


def _sentence(rng: random.Random, min_chars: int = 1) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 12))]
    text = " ".join(words).capitalize() + "."
    while len(text) < min_chars:
        text += " " + rng.choice(_WORDS)
    return text


def _requested_schema(body: dict) -> Any:
    if body.get("tools"):  # Anthropic: the schema is the forced tool's input_schema
        return body["tools"][0].get("input_schema") or {}
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        return (fmt.get("json_schema") or {}).get("schema") or {}
    if fmt.get("type") == "json_object":
        return {"type": "object", "properties": {"answer": {"type": "string"}}}
    config = body.get("generationConfig") or body.get("generation_config") or {}
    for name in ("responseJsonSchema", "response_json_schema", "responseSchema"):
        if config.get(name):
            return config[name]
    return None


def reply_text(body: dict) -> str:
    """The deterministic reply to `body`: a schema instance (as JSON) or a sentence."""
    rng = random.Random(request_key(body))
    schema = _requested_schema(body)
    if schema is not None:
        return json.dumps(schema_instance(schema, rng))
    return _sentence(rng)


class TestLLMServer:
    """Context manager: the server runs while the block runs; `behaviour` may be swapped at any time."""

    __test__ = False  # not a pytest test class

    def __init__(self, behaviour: Behaviour | None = None, host: str = "127.0.0.1", port: int = 0):
        self.behaviour = behaviour or Behaviour()
        self.host, self.port = host, port
        self.log: list[LoggedRequest] = []
        self._forced: deque[tuple[str, float | None]] = deque()
        self._seen: Counter[str] = Counter()
        self._window: deque[tuple[float, int]] = deque()  # accepted (arrival, tokens) within period_s
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self.batch_submits: Counter[str] = Counter()  # batches created per API: openai, anthropic, google
        self._batches: dict[str, dict] = {}
        self._files: dict[str, bytes] = {}
        self._batch_endings: deque[str] = deque()

    # ---- lifecycle
    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL (`.../v1`)."""
        return f"{self.root}/v1"

    @property
    def root(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> TestLLMServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="llm-testserver", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
            self._loop = None

    async def _start(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/files", self._openai_upload)
        app.router.add_get("/v1/files/{file_id}/content", self._openai_file_content)
        app.router.add_post("/v1/batches", self._openai_create_batch)
        app.router.add_get("/v1/batches/{batch_id}", self._openai_get_batch)
        app.router.add_post("/v1/messages/batches", self._anthropic_create_batch)
        app.router.add_get("/v1/messages/batches/{batch_id}", self._anthropic_get_batch)
        app.router.add_get("/v1/messages/batches/{batch_id}/results", self._anthropic_results)
        app.router.add_post("/{version}/models/{model_action}", self._handle)
        app.router.add_get("/{version}/batches/{batch_id}", self._google_get_batch)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    # ---- controls and counts
    def fail_next(self, outcome: str, n: int = 1, retry_after_s: float | None = None) -> None:
        """Force the next `n` requests to `outcome` ("rate_limited", "error", "hang", "drop", "empty").

        A forced 429 carries `retry_after_s` when given (else the window's own wait).
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        with self._lock:
            self._forced.extend([(outcome, retry_after_s)] * n)

    def end_next_batch(self, state: str) -> None:
        """Make the next batch created end `state` ("expired", "cancelled", "failed") instead of completing.

        Expired and cancelled batches answer the first half of their requests; a failed one answers none."""
        if state not in ("expired", "cancelled", "failed"):
            raise ValueError(f"state must be expired, cancelled or failed, got {state!r}")
        with self._lock:
            self._batch_endings.append(state)

    def reset_log(self) -> None:
        with self._lock:
            self.log = []
            self._window.clear()

    def entries(self, outcome: str | None = None) -> list[LoggedRequest]:
        with self._lock:
            return [e for e in self.log if outcome is None or e.outcome == outcome]

    def answered(self) -> Counter[str]:
        """How many times each distinct request was answered 200."""
        return Counter(e.key for e in self.entries("ok"))

    def max_in_window(self, period_s: float, outcome: str | None = None) -> int:
        """Most requests that arrived within any `period_s` window (optionally: only those with `outcome`)."""
        times = sorted(e.arrived for e in self.entries(outcome))
        most, start = 0, 0
        for end, t in enumerate(times):
            while times[start] <= t - period_s:
                start += 1
            most = max(most, end - start + 1)
        return most

    def max_in_flight(self) -> int:
        """Most requests the server was working on at once (arrived, answer not yet out)."""
        events = []
        for e in self.entries():
            events.append((e.arrived, 1))
            events.append((e.finished if e.finished is not None else math.inf, -1))
        most = current = 0
        for _, step in sorted(events, key=lambda ev: (ev[0], ev[1])):
            current += step
            most = max(most, current)
        return most

    # ---- the handler
    def _decide(self, key: str, tokens: int, now: float) -> tuple[str, float | None]:
        b = self.behaviour
        with self._lock:
            self._seen[key] += 1
            if self._forced:
                return self._forced.popleft()
            while self._window and self._window[0][0] <= now - b.period_s:
                self._window.popleft()
            used = sum(t for _, t in self._window)
            if (b.rpm is not None and len(self._window) >= b.rpm) or (
                b.tpm is not None and used + tokens > b.tpm
            ):
                return "rate_limited", None
            self._window.append((now, tokens))
            u = random.Random(f"{b.seed}:{key}:{self._seen[key]}").random()
        for outcome, rate in (("drop", b.drop_rate), ("hang", b.hang_rate), ("error", b.error_rate)):
            if u < rate:
                return outcome, None
            u -= rate
        return "ok", None

    def _retry_after_s(self, tokens: int, now: float) -> float:
        b = self.behaviour
        with self._lock:
            window = list(self._window)
        wait = 0.0
        if b.rpm is not None and len(window) >= b.rpm:
            wait = window[len(window) - b.rpm][0] + b.period_s - now
        if b.tpm is not None:
            excess, freed = sum(t for _, t in window) + tokens - b.tpm, 0
            for arrived, used in window:
                if excess <= 0:
                    break
                freed += used
                if freed >= excess:
                    wait = max(wait, arrived + b.period_s - now)
                    break
        return max(wait, 0.001)

    async def _handle(self, request: Any) -> Any:
        if self.behaviour.auth_error:
            return self._unauthorized()
        if request.path.endswith(":batchGenerateContent"):
            return await self._google_create_batch(request)
        now = time.monotonic()
        body = await request.json()
        key = request_key(body)
        tokens = counted_tokens(body)
        entry = LoggedRequest(key=key, path=request.path, arrived=now, tokens=tokens)
        with self._lock:
            self.log.append(entry)
        outcome, wait = self._decide(key, tokens, now)
        entry.outcome = outcome
        b = self.behaviour
        if outcome == "rate_limited":
            headers = {}
            if b.retry_after:
                wait = self._retry_after_s(tokens, now) if wait is None else wait
                headers = {"retry-after-ms": str(math.ceil(wait * 1000)), "retry-after": str(math.ceil(wait))}
            return self._finish(entry, 429, self._error_body(429, "rate limit reached"), headers)
        if outcome == "drop":
            entry.finished = time.monotonic()
            request.transport.close()
            raise asyncio.CancelledError  # nothing goes back: the client sees a dropped connection
        if outcome == "hang":
            await asyncio.sleep(b.hang_s)
        elif b.latency_s or b.latency_jitter_s:
            jitter = random.Random(f"latency:{key}").random() * b.latency_jitter_s
            await asyncio.sleep(b.latency_s + jitter)
        if outcome == "error":
            status = (500, 502, 503)[self._seen[key] % 3]
            return self._finish(entry, status, self._error_body(status, "injected server error"), {})
        text = "" if outcome == "empty" else reply_text(body)
        return self._finish(entry, 200, self._answer(request.path, body, text, tokens), {})

    def _finish(self, entry: LoggedRequest, status: int, payload: dict, headers: dict[str, str]) -> Any:
        from aiohttp import web

        entry.status, entry.finished = status, time.monotonic()
        return web.json_response(payload, status=status, headers=headers)

    @staticmethod
    def _error_body(status: int, message: str) -> dict:
        return {"error": {"message": message, "type": "test_server", "code": status}}

    def _answer(self, path: str, body: dict, text: str, tokens: int) -> dict:
        prompt = _prompt_chars(body) // 4 + 1
        output = self.behaviour.usage_output_tokens
        output = max(1, len(text) // 4) if output is None else output
        if path.endswith("/messages"):
            if body.get("tools") and text:
                content = [{"type": "tool_use", "id": f"toolu_{request_key(body)}", "name": body["tools"][0]["name"],
                            "input": json.loads(text)}]  # fmt: skip
            else:
                content = [{"type": "text", "text": text}]
            return {
                "id": f"msg_{request_key(body)}", "type": "message", "role": "assistant",
                "model": body.get("model", ""), "content": content, "stop_reason": "end_turn",
                "stop_sequence": None, "usage": {"input_tokens": prompt, "output_tokens": output},
            }  # fmt: skip
        if path.endswith("/chat/completions"):
            n = int(body.get("n") or 1)  # OpenAI's n: n choices, the prompt counted once, the completions all
            return {
                "id": f"chatcmpl-{request_key(body)}", "object": "chat.completion", "created": 0,
                "model": body.get("model", ""),
                "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"} for i in range(n)],
                "usage": {"prompt_tokens": prompt, "completion_tokens": output * n,
                          "total_tokens": prompt + output * n},
            }  # fmt: skip
        return {
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": output,
                              "totalTokenCount": prompt + output},
        }  # fmt: skip

    # ---- batch APIs
    def _unauthorized(self) -> Any:
        from aiohttp import web

        body = {"error": {"message": "Incorrect API key provided.", "type": "authentication_error",
                          "code": "invalid_api_key"}}  # fmt: skip
        return web.json_response(body, status=401)

    def _new_batch(self, api: str, items: list[tuple[str, str, dict]]) -> dict:
        """Decide every (custom id, answer path, body) now; the batch shows its results once it ended."""
        now = time.monotonic()
        results: dict[str, tuple[int, dict]] = {}
        with self._lock:
            ending = self._batch_endings.popleft() if self._batch_endings else "completed"
        for n, (custom_id, path, body) in enumerate(items):
            key = request_key(body)
            tokens = counted_tokens(body)
            entry = LoggedRequest(key=key, path=f"batch:{api}", arrived=now, tokens=tokens)
            with self._lock:
                self.log.append(entry)
            if ending == "failed" or (ending != "completed" and n >= (len(items) + 1) // 2):
                entry.outcome, entry.finished = "unanswered", now
                continue
            outcome, _ = self._decide(key, 0, now)
            entry.outcome, entry.finished = (outcome if outcome in ("ok", "empty") else "error"), now
            if entry.outcome != "error":
                entry.status = 200
                text = "" if outcome == "empty" else reply_text(body)
                results[custom_id] = (200, self._answer(path, body, text, tokens))
            else:
                entry.status = 500
                results[custom_id] = (500, self._error_body(500, "injected server error"))
        with self._lock:
            self.batch_submits[api] += 1
            number = sum(self.batch_submits.values())
        batch_id = f"{api}-batch-{number}"
        batch = {"id": batch_id, "api": api, "created": now, "wall": int(time.time()), "n": len(items),
                 "ending": ending, "results": results, "ids": [i for i, _, _ in items]}  # fmt: skip
        with self._lock:
            self._batches[batch_id] = batch
        return batch

    def _ended(self, batch: dict) -> bool:
        return time.monotonic() - batch["created"] >= self.behaviour.batch_delay_s

    def _batch_or_404(self, batch_id: str) -> dict | None:
        with self._lock:
            return self._batches.get(batch_id)

    async def _openai_upload(self, request: Any) -> Any:
        from aiohttp import web

        if self.behaviour.auth_error:
            return self._unauthorized()
        form = await request.post()
        upload = form["file"]
        data = upload.file.read()
        with self._lock:
            file_id = f"file-{len(self._files) + 1}"
            self._files[file_id] = data
        return web.json_response({"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                  "filename": upload.filename, "purpose": form.get("purpose", "batch"),
                                  "status": "processed"})  # fmt: skip

    async def _openai_create_batch(self, request: Any) -> Any:
        from aiohttp import web

        if self.behaviour.auth_error:
            return self._unauthorized()
        body = await request.json()
        with self._lock:
            data = self._files.get(body.get("input_file_id", ""))
        if data is None:
            return web.json_response(self._error_body(404, "no such file"), status=404)
        lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
        batch = self._new_batch("openai", [(x["custom_id"], x["url"], x["body"]) for x in lines])
        batch["input_file_id"] = body["input_file_id"]
        return web.json_response(self._openai_batch(batch))

    def _openai_batch(self, batch: dict) -> dict:
        ended = self._ended(batch)
        ok = [cid for cid, (status, _) in batch["results"].items() if status == 200]
        failed = [cid for cid in batch["ids"] if cid not in ok]
        status = (
            ("completed" if batch["ending"] == "completed" else batch["ending"]) if ended else "in_progress"
        )
        out = {"id": batch["id"], "object": "batch", "endpoint": "/v1/chat/completions",
               "input_file_id": batch.get("input_file_id", ""), "completion_window": "24h", "status": status,
               "created_at": batch["wall"], "output_file_id": None, "error_file_id": None,
               "request_counts": {"total": batch["n"], "completed": len(ok) if ended else 0,
                                  "failed": len(failed) if ended and status == "completed" else 0}}  # fmt: skip
        if ended and status == "failed":
            out["errors"] = {
                "object": "list",
                "data": [{"code": "invalid_request", "message": "injected failure"}],
            }
        if ended and status != "failed":
            with self._lock:
                if ok:
                    out["output_file_id"] = f"{batch['id']}-output"
                    self._files[out["output_file_id"]] = self._jsonl(
                        {"id": f"batch_req_{cid}", "custom_id": cid, "error": None,
                         "response": {"status_code": 200, "request_id": cid, "body": batch["results"][cid][1]}}
                        for cid in ok)  # fmt: skip
                if failed:
                    out["error_file_id"] = f"{batch['id']}-errors"
                    self._files[out["error_file_id"]] = self._jsonl(
                        {"id": f"batch_req_{cid}", "custom_id": cid, "response": None,
                         "error": {"code": "batch_expired", "message": "not processed in time"}}
                        if cid not in batch["results"] else
                        {"id": f"batch_req_{cid}", "custom_id": cid, "error": None,
                         "response": {"status_code": 500, "request_id": cid, "body": batch["results"][cid][1]}}
                        for cid in failed)  # fmt: skip
        return out

    @staticmethod
    def _jsonl(rows: Any) -> bytes:
        return "".join(json.dumps(r) + "\n" for r in rows).encode()

    async def _openai_get_batch(self, request: Any) -> Any:
        from aiohttp import web

        if self.behaviour.auth_error:
            return self._unauthorized()
        batch = self._batch_or_404(request.match_info["batch_id"])
        if batch is None:
            return web.json_response(self._error_body(404, "no such batch"), status=404)
        if batch["api"] == "google":  # google-genai (api_version v1 with a base_url) reads /v1/batches/<id>
            return web.json_response(self._google_batch(batch))
        return web.json_response(self._openai_batch(batch))

    async def _openai_file_content(self, request: Any) -> Any:
        from aiohttp import web

        with self._lock:
            data = self._files.get(request.match_info["file_id"])
        if data is None:
            return web.json_response(self._error_body(404, "no such file"), status=404)
        return web.Response(body=data, content_type="application/octet-stream")

    async def _anthropic_create_batch(self, request: Any) -> Any:
        from aiohttp import web

        if self.behaviour.auth_error:
            return self._unauthorized()
        body = await request.json()
        items = [(r["custom_id"], "/v1/messages", r["params"]) for r in body["requests"]]
        return web.json_response(self._anthropic_batch(self._new_batch("anthropic", items), request))

    def _anthropic_batch(self, batch: dict, request: Any) -> dict:
        ended = self._ended(batch)
        results = batch["results"]
        ok = sum(1 for status, _ in results.values() if status == 200)
        unanswered = batch["n"] - len(results)
        stamp = "2026-01-01T00:00:00Z"
        return {"id": batch["id"], "type": "message_batch", "processing_status": "ended" if ended else "in_progress",
                "request_counts": {"processing": 0 if ended else batch["n"], "succeeded": ok if ended else 0,
                                   "errored": len(results) - ok if ended else 0,
                                   "canceled": unanswered if ended and batch["ending"] == "cancelled" else 0,
                                   "expired": unanswered if ended and batch["ending"] != "cancelled" else 0},
                "created_at": stamp, "expires_at": stamp, "ended_at": stamp if ended else None,
                "archived_at": None, "cancel_initiated_at": stamp if batch["ending"] == "cancelled" else None,
                "results_url": f"{self.root}/v1/messages/batches/{batch['id']}/results" if ended else None,
                }  # fmt: skip

    async def _anthropic_get_batch(self, request: Any) -> Any:
        from aiohttp import web

        if self.behaviour.auth_error:
            return self._unauthorized()
        batch = self._batch_or_404(request.match_info["batch_id"])
        if batch is None:
            return web.json_response(self._error_body(404, "no such batch"), status=404)
        return web.json_response(self._anthropic_batch(batch, request))

    async def _anthropic_results(self, request: Any) -> Any:
        from aiohttp import web

        batch = self._batch_or_404(request.match_info["batch_id"])
        if batch is None or not self._ended(batch):
            return web.json_response(self._error_body(404, "no results yet"), status=404)
        gone = "canceled" if batch["ending"] == "cancelled" else "expired"
        rows = []
        for cid in batch["ids"]:
            if cid not in batch["results"]:
                rows.append({"custom_id": cid, "result": {"type": gone}})
                continue
            status, payload = batch["results"][cid]
            if status == 200:
                rows.append({"custom_id": cid, "result": {"type": "succeeded", "message": payload}})
            else:
                rows.append({"custom_id": cid, "result": {"type": "errored", "error": {"type": "error",
                             "error": {"type": "api_error", "message": "injected server error"}}}})  # fmt: skip
        return web.Response(body=self._jsonl(rows), content_type="application/binary")

    async def _google_create_batch(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        version, model = request.match_info["version"], request.match_info["model_action"].split(":")[0]
        inlined = body["batch"]["inputConfig"]["requests"]["requests"]
        items = [(json.dumps(r.get("metadata") or {}, sort_keys=True), f"/{version}/models/{model}:generateContent",
                  r["request"]) for r in inlined]  # fmt: skip
        batch = self._new_batch("google", items)
        batch["metadata"] = [r.get("metadata") for r in inlined]
        return web.json_response(self._google_batch(batch))

    def _google_batch(self, batch: dict) -> dict:
        ended = self._ended(batch)
        state = {"completed": "SUCCEEDED", "expired": "EXPIRED", "cancelled": "CANCELLED", "failed": "FAILED"}
        out = {"name": f"batches/{batch['id']}",
               "metadata": {"@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
                            "name": f"batches/{batch['id']}",
                            "state": f"BATCH_STATE_{state[batch['ending']] if ended else 'RUNNING'}"}}  # fmt: skip
        if ended and batch["ending"] != "failed":
            responses = []
            for cid, metadata in zip(batch["ids"], batch["metadata"], strict=True):
                if cid not in batch["results"]:
                    continue
                status, payload = batch["results"][cid]
                if status == 200:
                    responses.append({"response": payload, "metadata": metadata})
                else:
                    responses.append(
                        {"error": {"code": 13, "message": "injected server error"}, "metadata": metadata}
                    )
            out["metadata"]["output"] = {"inlinedResponses": {"inlinedResponses": responses}}
            out["done"] = True
        return out

    async def _google_get_batch(self, request: Any) -> Any:
        from aiohttp import web

        if self.behaviour.auth_error:
            return self._unauthorized()
        batch = self._batch_or_404(request.match_info["batch_id"])
        if batch is None:
            return web.json_response(self._error_body(404, "no such batch"), status=404)
        return web.json_response(self._google_batch(batch))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llamaduo_nb.testing", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--tpm", type=int, default=None)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--drop-rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    behaviour = Behaviour(
        latency_s=args.latency,
        rpm=args.rpm,
        tpm=args.tpm,
        error_rate=args.error_rate,
        drop_rate=args.drop_rate,
    )
    with TestLLMServer(behaviour, port=args.port) as server:
        print(f"OpenAI-compatible test server on {server.base_url} (Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
