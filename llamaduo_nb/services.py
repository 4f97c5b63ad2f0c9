"""Service-LLM client layer: one interface over OpenAI(-compatible), Anthropic, Google and the embedded server.

Every call a stage makes to a service LLM (judging in 04, synthesis in 05, parity in 06) goes through
`ServicePool`:

    with ServicePool(cfg, layout, stage="04_evaluate", cycle=0) as pool:
        results = pool.complete_many("gpt4o", [ChatRequest(messages=[...], json_schema=SCHEMA, repeat=m) ...])

What the pool does for each request, in order:

1. Cache: the full request (provider kind, model, endpoint, messages, sampling, schema, repeat index)
   is hashed; a finished call with that key is replayed from `<run>/calls.sqlite` for free.
2. Limits: a `max_concurrency` semaphore, then a requests-per-minute and a tokens-per-minute leaky
   bucket (aiolimiter). Tokens are estimated before the call as prompt characters / 4 + max_tokens.
3. Retries (tenacity): 408/409/429/5xx, timeouts and connection errors are retried up to
   `max_retries` times. A `retry-after-ms` / `retry-after` header (or Google's RetryInfo) sets the
   wait; otherwise exponential backoff with jitter. The SDKs' own retries are switched off
   (`max_retries=0`, Google: no retry options) so every attempt is counted exactly once here.
   Each attempt has a total timeout of `timeout_s`.
4. Ledger: one row per real call (success or final failure) with tokens, latency and cost;
   `<run>/ledger.csv` is re-exported when the pool closes.

Structured output: `json_mode: schema` asks the provider to enforce the schema (OpenAI-shaped
servers: `response_format` json_schema, which the embedded server turns into a llama.cpp grammar, see
embedded.py; Anthropic: a forced tool whose input_schema is the schema; Google: JSON mime type +
`response_json_schema`). `object` asks for any JSON object and `none` asks nothing of the API; in
both the schema is stated in the system prompt. Either way the reply text is parsed leniently
(first JSON value in the text, code fences and trailing prose allowed) and checked against the
schema; a failure sets `parse_error`, it never raises.

Anthropic: SDK 2.x speaks API version 2026-10-21, which has no temperature/top_p; they are not sent
(the model samples at its own setting, so M repeats still differ).

Keys come only from environment variables (`ProviderConfig.api_key_env`, else the provider's usual
name); a missing key is an error when the pool is entered, before any call. Keys live only inside the
SDK clients in memory: they are not part of cache keys, rows, errors or files.

Jupyter: the pool runs its own event loop in a worker thread; `complete_many` is a plain blocking
call that works whether or not the caller's thread already runs a loop, and `acomplete` can be
awaited from any loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tenacity
from aiolimiter import AsyncLimiter

from .callcache import (
    CachedCall,
    CallCache,
    LedgerRow,
    PriceTable,
    export_ledger_csv,
    load_prices,
    request_key,
)
from .config import ConfigError, ProviderConfig, RunConfig
from .runlayout import RunLayout

KEY_ENV_DEFAULTS: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "google": ("GOOGLE_API_KEY", "GEMINI_API_KEY"),
}
LOCAL_DUMMY_KEY = "local-no-key"  # local OpenAI-compatible servers accept any key
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0
RETRY_AFTER_CAP_S = 300.0
EMBEDDED_N_CTX = 4096  # judge prompts (instruction + reference + candidate + schema) outgrow 2048
_ROLES = ("system", "user", "assistant")


class MissingAPIKeyError(ConfigError):
    """A provider's API key environment variable is not set."""


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": str}]
    temperature: float = 0.0
    max_tokens: int = 512
    top_p: float | None = None
    json_schema: dict | None = None  # ask for structured output (JSON schema) when not None
    schema_name: str = "response"
    repeat: int = 0  # repeat/sample index: part of the cache key (M repeats don't collapse)


@dataclass
class ChatResult:
    text: str
    parsed: Any | None  # the parsed JSON value when the request had a json_schema and parsing succeeded
    parse_error: str | None
    error: str | None  # set when the call failed after all retries (then text is "")
    input_tokens: int
    output_tokens: int
    latency_s: float  # duration of the last attempt (0 for cache hits)
    cost_usd: float  # what this call cost now: 0 for cache hits
    cached: bool
    attempts: int = 0  # HTTP attempts made for this result (0 for cache hits)
    cache_key: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


# --------------------------------------------------------------------------- parsing


def find_json(text: str, wanted: Callable[[Any], bool] | None = None) -> list[Any]:
    """Every JSON object or array in `text` that `wanted` accepts (all of them without `wanted`), in order.

    Scans each `{` and `[` (code fences, prose, rubric brackets around it are fine); a value that decodes
    but is not wanted is looked into, so {"result": {...wanted...}} finds the inner object; the inside of a
    wanted value is not searched again.
    """
    decoder = json.JSONDecoder()
    found: list[Any] = []
    end = 0
    for match in re.finditer(r"[{\[]", text):
        if match.start() < end:
            continue
        try:
            value, stop = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if wanted is None or wanted(value):
            found.append(value)
            end = stop
    return found


def extract_json(text: str, wanted: Callable[[Any], bool] | None = None) -> Any:
    """The first JSON object or array in `text` that `wanted` accepts (the first of any kind without it).

    So "rubric [1] ... {json}" yields the object when `wanted` asks for its keys. Raises ValueError when
    there is none.
    """
    found = find_json(text, wanted) if wanted is not None else _first_json(text)
    if not found:
        what = "JSON object with the expected keys" if wanted is not None else "JSON object or array"
        raise ValueError(f"no {what} found in the reply")
    return found[0]


def _first_json(text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            return [decoder.raw_decode(text, match.start())[0]]
        except json.JSONDecodeError:
            continue
    return []


def parse_structured(text: str, schema: dict | None) -> tuple[Any | None, str | None]:
    """(parsed, parse_error): lenient JSON extraction, then validation against `schema` when given."""
    try:
        value = extract_json(text)
    except ValueError as exc:
        snippet = text.strip().replace("\n", " ")[:120]
        return None, f"{exc}: {snippet!r}"
    if schema:
        import jsonschema

        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "<root>"
            return None, f"reply does not match the schema at {where}: {exc.message}"
        except jsonschema.SchemaError as exc:
            return value, f"the request's JSON schema is invalid, reply not checked: {exc.message}"
    return value, None


# --------------------------------------------------------------------------- retries


def _header_retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    parsed = email.utils.parsedate_to_datetime(value) if value else None
    if parsed is None:
        return None
    return max(0.0, parsed.timestamp() - time.time())


def retry_after_seconds(exc: BaseException | None) -> float | None:
    """Seconds the server asked us to wait (retry-after-ms, retry-after, Google RetryInfo), if any."""
    if exc is None:
        return None
    response = getattr(exc, "response", None)
    seconds = _header_retry_after(getattr(response, "headers", None))
    if seconds is not None:
        return seconds
    details = getattr(exc, "details", None)  # google.genai APIError: the JSON error body
    if isinstance(details, dict):
        for item in (details.get("error") or {}).get("details") or []:
            delay = item.get("retryDelay") if isinstance(item, dict) else None
            if isinstance(delay, str) and delay.endswith("s"):
                try:
                    return float(delay[:-1])
                except ValueError:
                    return None
    return None


def _status_code(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return status
    code = getattr(exc, "code", None)
    if isinstance(code, int) and type(exc).__module__.startswith("google."):
        return code
    return None


def _connection_error_types() -> tuple[type, ...]:
    """Transport-level errors of the HTTP stacks in use (a module not yet imported cannot have raised)."""
    import sys

    found: list[type] = []
    for module, name in (
        ("openai", "APIConnectionError"),
        ("anthropic", "APIConnectionError"),
        ("httpx", "TransportError"),
        ("httpx2", "TransportError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def is_retryable(exc: BaseException) -> bool:
    """Rate limits, server errors, timeouts and dropped connections are worth another attempt."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return True
    status = _status_code(exc)
    if status is not None:
        return status in (408, 409, 425, 429) or status >= 500
    return isinstance(exc, _connection_error_types())


class _WaitRetryAfter(tenacity.wait.wait_base):
    """Wait what the server asked for; without a hint, exponential backoff with jitter."""

    def __init__(self) -> None:
        self._fallback = tenacity.wait_exponential_jitter(
            initial=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S, jitter=1.0
        )

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hinted = retry_after_seconds(exc)
        if hinted is not None:
            return min(max(hinted, 0.0), RETRY_AFTER_CAP_S)
        return self._fallback(retry_state)


# --------------------------------------------------------------------------- backends


@dataclass
class _Reply:
    text: str
    input_tokens: int
    output_tokens: int


def _schema_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "response"


def _strict_compatible(schema: Any) -> bool:
    """OpenAI strict mode needs every object closed (additionalProperties: false) with all keys required."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" or "properties" in schema:
            props = schema.get("properties", {})
            if schema.get("additionalProperties", True) is not False or set(
                schema.get("required", [])
            ) != set(props):
                return False
        return all(_strict_compatible(v) for v in schema.values())
    if isinstance(schema, list):
        return all(_strict_compatible(v) for v in schema)
    return True


def _schema_instruction(schema: dict) -> str:
    return (
        "Reply with JSON only: one value that validates against this JSON schema, no prose around it.\n"
        + json.dumps(schema, ensure_ascii=False)
    )


def _with_schema_in_prompt(messages: list[dict[str, str]], schema: dict) -> list[dict[str, str]]:
    """State the schema in the system message (first one, or a new one) for modes the API cannot enforce."""
    note = _schema_instruction(schema)
    out = [dict(m) for m in messages]
    for m in out:
        if m["role"] == "system":
            m["content"] = f"{m['content']}\n\n{note}"
            return out
    return [{"role": "system", "content": note}, *out]


def _split_system(messages: list[dict[str, str]]) -> tuple[str, list[dict[str, str]]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return system, [m for m in messages if m["role"] != "system"]


class _OpenAIBackend:
    """OpenAI and every OpenAI-compatible server (vLLM, Ollama, llama.cpp, the embedded server)."""

    def __init__(self, provider: ProviderConfig, api_key: str, base_url: str | None):
        import openai

        self.provider = provider
        self.client = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=provider.timeout_s
        )

    def _response_format(self, request: ChatRequest) -> dict | None:
        mode = self.provider.json_mode
        if request.json_schema is None or mode == "none":
            return None
        if mode == "object":
            return {"type": "json_object"}
        return {
            "type": "json_schema",
            "json_schema": {
                "name": _schema_name(request.schema_name),
                "schema": request.json_schema,
                "strict": _strict_compatible(request.json_schema),
            },
        }

    async def call(self, request: ChatRequest) -> _Reply:
        messages = request.messages
        if request.json_schema is not None and self.provider.json_mode != "schema":
            messages = _with_schema_in_prompt(messages, request.json_schema)
        kwargs: dict[str, Any] = {
            "model": self.provider.model,
            "messages": messages,
            "temperature": request.temperature,
        }
        # api.openai.com wants max_completion_tokens (reasoning models reject max_tokens); other servers know max_tokens
        kwargs["max_completion_tokens" if self.provider.kind == "openai" else "max_tokens"] = (
            request.max_tokens
        )
        if request.top_p is not None:
            kwargs["top_p"] = request.top_p
        response_format = self._response_format(request)
        if response_format is not None:
            kwargs["response_format"] = response_format
        completion = await self.client.chat.completions.create(**kwargs)
        if not completion.choices:
            raise RuntimeError("the server returned no choices")
        message = completion.choices[0].message
        text = message.content or ""
        if not text and getattr(message, "refusal", None):
            text = f"[refusal] {message.refusal}"
        usage = completion.usage
        return _Reply(
            text=text,
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        )

    async def aclose(self) -> None:
        await self.client.close()


class _AnthropicBackend:
    def __init__(self, provider: ProviderConfig, api_key: str):
        import anthropic

        self.provider = provider
        self.client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=provider.base_url, max_retries=0, timeout=provider.timeout_s
        )

    async def call(self, request: ChatRequest) -> _Reply:
        messages = request.messages
        schema = request.json_schema
        forced_tool = schema is not None and self.provider.json_mode == "schema"
        if schema is not None and not forced_tool:
            messages = _with_schema_in_prompt(messages, schema)
        system, turns = _split_system(messages)
        kwargs: dict[str, Any] = {
            "model": self.provider.model,
            "max_tokens": request.max_tokens,
            "messages": turns,
        }
        if system:
            kwargs["system"] = system
        wrapped = False
        if forced_tool:
            # tool input must be an object: wrap other schemas in {"value": ...} and unwrap the answer
            wrapped = schema.get("type") != "object"
            input_schema = (
                {"type": "object", "properties": {"value": schema}, "required": ["value"]}
                if wrapped
                else schema
            )
            name = _schema_name(request.schema_name)
            kwargs["tools"] = [
                {
                    "name": name,
                    "description": "Record the answer in this structure.",
                    "input_schema": input_schema,
                }
            ]
            kwargs["tool_choice"] = {"type": "tool", "name": name}
        message = await self.client.messages.create(**kwargs)
        text = ""
        for block in message.content:
            if getattr(block, "type", "") == "tool_use":
                value = block.input.get("value") if wrapped and isinstance(block.input, dict) else block.input
                text = json.dumps(value, ensure_ascii=False)
                break
        else:
            text = "".join(
                getattr(b, "text", "") for b in message.content if getattr(b, "type", "") == "text"
            )
        usage = message.usage
        return _Reply(text, int(usage.input_tokens or 0), int(usage.output_tokens or 0))

    async def aclose(self) -> None:
        await self.client.close()


class _GoogleBackend:
    def __init__(self, provider: ProviderConfig, api_key: str):
        from google import genai
        from google.genai import types

        self.provider = provider
        self.types = types
        # retry_options left unset: the SDK then makes exactly one attempt; timeout is in milliseconds
        http_options = types.HttpOptions(timeout=int(provider.timeout_s * 1000), base_url=provider.base_url)
        self.client = genai.Client(api_key=api_key, http_options=http_options)

    async def call(self, request: ChatRequest) -> _Reply:
        types = self.types
        messages = request.messages
        schema = request.json_schema
        if schema is not None and self.provider.json_mode != "schema":
            messages = _with_schema_in_prompt(messages, schema)
        system, turns = _split_system(messages)
        contents = [
            types.Content(
                role="model" if m["role"] == "assistant" else "user", parts=[types.Part(text=m["content"])]
            )
            for m in turns
        ]
        config: dict[str, Any] = {"temperature": request.temperature, "max_output_tokens": request.max_tokens}
        if system:
            config["system_instruction"] = system
        if request.top_p is not None:
            config["top_p"] = request.top_p
        if schema is not None and self.provider.json_mode in ("schema", "object"):
            config["response_mime_type"] = "application/json"
            if self.provider.json_mode == "schema":
                config["response_json_schema"] = schema
        response = await self.client.aio.models.generate_content(
            model=self.provider.model, contents=contents, config=types.GenerateContentConfig(**config)
        )
        parts = []
        for candidate in (response.candidates or [])[:1]:
            for part in (candidate.content.parts if candidate.content else None) or []:
                if part.text and not part.thought:
                    parts.append(part.text)
        usage = response.usage_metadata
        # thinking tokens are billed as output
        output_tokens = (
            (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0) if usage else 0
        )
        return _Reply("".join(parts), int(usage.prompt_token_count or 0) if usage else 0, int(output_tokens))

    async def aclose(self) -> None:
        await self.client.aio.aclose()


# --------------------------------------------------------------------------- keys


def api_key_for(provider: ProviderConfig, environ: dict[str, str] | None = None) -> str:
    """The provider's key from the environment; raises MissingAPIKeyError naming the variable."""
    import os

    env = os.environ if environ is None else environ
    if provider.api_key_env:
        names: tuple[str, ...] = (provider.api_key_env,)
    elif provider.kind in ("openai_compatible", "embedded"):
        return LOCAL_DUMMY_KEY
    else:
        names = KEY_ENV_DEFAULTS[provider.kind]
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    if provider.kind == "embedded":
        return LOCAL_DUMMY_KEY
    wanted = " or ".join(names)
    raise MissingAPIKeyError(
        f"provider '{provider.name}' ({provider.kind}, model {provider.model}) needs an API key in the environment "
        f"variable {wanted}, which is not set. Set it before starting (e.g. `export {names[0]}=...` or in the "
        f"kernel's environment); keys are never read from params files."
    )


# --------------------------------------------------------------------------- pool


@dataclass
class _Lane:
    """Everything one provider needs at call time."""

    provider: ProviderConfig
    endpoint: str  # stable description of where calls go (part of the cache key)
    backend: Any = None
    semaphore: asyncio.Semaphore | None = None
    rpm: AsyncLimiter | None = None
    tpm: AsyncLimiter | None = None


@dataclass
class PoolStats:
    """Counters of this pool's lifetime (all providers)."""

    requests: int = 0
    cache_hits: int = 0
    real_calls: int = 0
    failures: int = 0
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    by_provider: dict[str, dict[str, float]] = field(default_factory=dict)


def _answered(
    request: ChatRequest,
    text: str,
    input_tokens: int,
    output_tokens: int,
    latency_s: float,
    cost_usd: float,
    cached: bool,
    attempts: int,
    cache_key: str,
) -> ChatResult:
    """A successful call's result, live or replayed: the text parsed against the request's schema, if any."""
    parsed, parse_error = (
        parse_structured(text, request.json_schema) if request.json_schema is not None else (None, None)
    )
    return ChatResult(
        text=text,
        parsed=parsed,
        parse_error=parse_error,
        error=None,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        latency_s=latency_s,
        cost_usd=cost_usd,
        cached=cached,
        attempts=attempts,
        cache_key=cache_key,
    )


class ServicePool:
    """Context manager over the service LLMs a stage uses; see the module docstring.

    `providers` restricts the pool (key checks, embedded server start) to the named providers;
    default: every provider declared in the config.
    """

    def __init__(
        self,
        cfg: RunConfig,
        layout: RunLayout,
        stage: str,
        cycle: int | None = None,
        *,
        providers: Sequence[str] | None = None,
    ):
        self.cfg, self.layout, self.stage, self.cycle = cfg, layout, stage, cycle
        if isinstance(providers, str):
            providers = [providers]
        names = list(providers) if providers is not None else [p.name for p in cfg.providers]
        self._providers: dict[str, ProviderConfig] = {name: cfg.provider(name) for name in names}
        self._lanes: dict[str, _Lane] = {}
        self._cache: CallCache | None = None
        self._prices: PriceTable | None = None
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._inflight: dict[str, asyncio.Future] = {}
        self._secrets: list[str] = []
        self._stats_lock = threading.Lock()
        self.stats = PoolStats()

    # ---- lifecycle
    def __enter__(self) -> ServicePool:
        if self._loop is not None:
            raise RuntimeError("this ServicePool is already open")
        keys = {name: api_key_for(p) for name, p in self._providers.items()}  # fail before starting anything
        self._secrets = sorted({k for k in keys.values() if k != LOCAL_DUMMY_KEY}, key=len, reverse=True)
        try:
            self._prices = load_prices(self.cfg.prices_file)
            self._cache = CallCache(self.layout.calls_db)
            embedded_url, embedded_label = self._start_embedded_server()
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name="llamaduo-services", daemon=True
            )
            self._thread.start()
            for name, provider in self._providers.items():
                if provider.kind == "embedded":
                    endpoint = embedded_label
                else:
                    endpoint = provider.base_url or f"{provider.kind}:default"
                self._lanes[name] = _Lane(provider, endpoint)
            asyncio.run_coroutine_threadsafe(self._setup(keys, embedded_url), self._loop).result()
        except BaseException:
            self._shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._shutdown()
        finally:
            # keep <run>/ledger.csv in step with the database for people who read it in a spreadsheet
            if self.layout.calls_db.is_file():
                export_ledger_csv(self.layout.calls_db, self.layout.ledger_csv)

    def _start_embedded_server(self) -> tuple[str | None, str]:
        if not any(p.kind == "embedded" for p in self._providers.values()):
            return None, ""
        from .embedded import LlamaServer, embedded_gguf_path

        gguf = embedded_gguf_path()
        self._server = LlamaServer(gguf, n_ctx=EMBEDDED_N_CTX)
        self._server.__enter__()
        # the port changes each start; the cache key names the model file instead
        return self._server.base_url, f"embedded:{Path(gguf).name}"

    async def _setup(self, keys: dict[str, str], embedded_url: str | None) -> None:
        for name, lane in self._lanes.items():
            p = lane.provider
            if p.kind in ("openai", "openai_compatible"):
                lane.backend = _OpenAIBackend(p, keys[name], p.base_url)
            elif p.kind == "embedded":
                lane.backend = _OpenAIBackend(p, keys[name], embedded_url)
            elif p.kind == "anthropic":
                lane.backend = _AnthropicBackend(p, keys[name])
            elif p.kind == "google":
                lane.backend = _GoogleBackend(p, keys[name])
            else:  # config validation makes this unreachable
                raise ConfigError(f"provider '{name}': unknown kind {p.kind!r}")
            lane.semaphore = asyncio.Semaphore(p.max_concurrency)
            lane.rpm = AsyncLimiter(p.rpm, 60.0)
            lane.tpm = AsyncLimiter(p.tpm, 60.0)

    async def _teardown(self) -> None:
        for lane in self._lanes.values():
            if lane.backend is not None:
                try:
                    await lane.backend.aclose()
                except Exception:  # closing is best effort; the loop is going away anyway
                    pass

    def _shutdown(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._teardown(), loop).result(timeout=30)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=30)
        if loop is not None and not loop.is_running():
            loop.close()
        self._loop = self._thread = None
        self._lanes.clear()
        if self._server is not None:
            server, self._server = self._server, None
            server.__exit__(None, None, None)
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        self._secrets = []

    # ---- public calls
    def complete_many(self, provider: str, requests: list[ChatRequest], desc: str = "") -> list[ChatResult]:
        """Run `requests` against `provider`; results come back in request order.

        Blocks until done, showing a tqdm bar. Safe inside Jupyter (the work runs on the pool's own
        loop thread). A request that still fails after retries comes back with `.error` set.
        """
        self._require_open()
        self._lane(provider)
        for i, request in enumerate(requests):
            _validate_request(request, i)
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "complete_many called from the pool's own event loop; use `await pool.acomplete(...)`"
            )
        if not requests:
            return []
        from tqdm.auto import tqdm

        progress = {"done": 0, "cached": 0, "failed": 0, "cost": 0.0}
        future = asyncio.run_coroutine_threadsafe(self._run_many(provider, requests, progress), self._loop)
        shown = 0
        with tqdm(total=len(requests), desc=desc or f"{provider} calls", unit="call") as bar:
            try:
                while True:
                    try:
                        results = future.result(timeout=0.25)
                        break
                    except concurrent.futures.TimeoutError:
                        pass
                    finally:
                        done = progress["done"]
                        if done > shown:
                            bar.update(done - shown)
                            shown = done
                            bar.set_postfix(
                                cached=progress["cached"],
                                failed=progress["failed"],
                                usd=f"{progress['cost']:.4f}",
                            )
            except BaseException:
                future.cancel()
                raise
        return results

    async def acomplete(self, provider: str, request: ChatRequest) -> ChatResult:
        """One request; await it from any event loop (it runs on the pool's loop)."""
        self._require_open()
        self._lane(provider)
        _validate_request(request, 0)
        coro = self._complete(provider, request)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def cache_key(self, provider: str, request: ChatRequest) -> str:
        """The cache key `request` has with `provider` (pool must be open: the embedded endpoint is known then)."""
        self._require_open()
        return request_key(self._request_payload(self._lane(provider), request))

    # ---- internals
    def _require_open(self) -> None:
        if self._loop is None:
            raise RuntimeError("ServicePool is not open; use `with ServicePool(cfg, layout, stage) as pool:`")

    def _lane(self, provider: str) -> _Lane:
        try:
            return self._lanes[provider]
        except KeyError:
            raise ConfigError(
                f"provider '{provider}' is not in this pool; available: {sorted(self._lanes)}"
            ) from None

    def _request_payload(self, lane: _Lane, request: ChatRequest) -> dict[str, Any]:
        p = lane.provider
        return {
            "v": 1,
            "kind": p.kind,
            "model": p.model,
            "endpoint": lane.endpoint,
            "json_mode": p.json_mode,
            "messages": [{"role": m["role"], "content": m["content"]} for m in request.messages],
            "temperature": float(request.temperature),
            "top_p": None if request.top_p is None else float(request.top_p),
            "max_tokens": int(request.max_tokens),
            "json_schema": request.json_schema,
            "schema_name": request.schema_name,
            "repeat": int(request.repeat),
        }

    async def _run_many(self, provider: str, requests: list[ChatRequest], progress: dict) -> list[ChatResult]:
        async def one(request: ChatRequest) -> ChatResult:
            result = await self._complete(provider, request)
            progress["done"] += 1
            progress["cached"] += int(result.cached)
            progress["failed"] += int(result.error is not None)
            progress["cost"] += result.cost_usd
            return result

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _complete(self, provider: str, request: ChatRequest) -> ChatResult:
        lane = self._lane(provider)
        payload = self._request_payload(lane, request)
        key = request_key(payload)
        hit = self._cache.get(key)
        if hit is not None:
            return self._count(provider, self._from_cache(hit, request))
        pending = self._inflight.get(key)
        if pending is not None:  # the same request is already on its way: share its answer
            first = await asyncio.shield(pending)
            return self._count(provider, replace(first, cached=first.error is None, cost_usd=0.0, attempts=0))
        pending = asyncio.get_running_loop().create_future()
        self._inflight[key] = pending
        try:
            result = await self._call(lane, request, key, payload)
            pending.set_result(result)
        finally:
            if not pending.done():
                pending.cancel()
            del self._inflight[key]
        return self._count(provider, result)

    def _from_cache(self, hit: CachedCall, request: ChatRequest) -> ChatResult:
        return _answered(
            request, hit.text, hit.input_tokens, hit.output_tokens, 0.0, 0.0, True, 0, hit.cache_key
        )

    async def _attempt(self, lane: _Lane, request: ChatRequest) -> tuple[_Reply, float]:
        estimate = min(_estimate_tokens(request), lane.provider.tpm)
        async with lane.semaphore:
            await lane.rpm.acquire()
            await lane.tpm.acquire(estimate)
            started = time.monotonic()
            reply = await asyncio.wait_for(lane.backend.call(request), timeout=lane.provider.timeout_s)
            return reply, time.monotonic() - started

    async def _call(self, lane: _Lane, request: ChatRequest, key: str, payload: dict) -> ChatResult:
        p = lane.provider
        attempts = 0
        started = time.monotonic()
        try:
            retrying = tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(p.max_retries + 1),
                wait=_WaitRetryAfter(),
                retry=tenacity.retry_if_exception(is_retryable),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    reply, latency = await self._attempt(lane, request)
        except Exception as exc:  # one bad call must not sink the batch: report it in the result and ledger
            error = self._redact(_describe(exc))
            self._cache.record(
                LedgerRow(
                    stage=self.stage, cycle=self.cycle, provider=p.name, kind=p.kind, model=p.model,
                    input_tokens=0, output_tokens=0, latency_s=time.monotonic() - started, cost_usd=0.0,
                    ok=False, error=error, attempts=attempts, cache_key=key,
                )
            )  # fmt: skip
            return ChatResult(
                "", None, None, error, 0, 0, time.monotonic() - started, 0.0, False, attempts, key
            )
        cost = self._prices.cost(p.kind, p.model, reply.input_tokens, reply.output_tokens)
        self._cache.put(key, payload, reply.text, reply.input_tokens, reply.output_tokens, latency, cost)
        self._cache.record(
            LedgerRow(
                stage=self.stage, cycle=self.cycle, provider=p.name, kind=p.kind, model=p.model,
                input_tokens=reply.input_tokens, output_tokens=reply.output_tokens, latency_s=latency,
                cost_usd=cost, ok=True, error=None, attempts=attempts, cache_key=key,
            )
        )  # fmt: skip
        return _answered(
            request, reply.text, reply.input_tokens, reply.output_tokens, latency, cost, False, attempts, key
        )

    def _count(self, provider: str, result: ChatResult) -> ChatResult:
        with self._stats_lock:
            s = self.stats
            s.requests += 1
            s.cache_hits += int(result.cached)
            s.real_calls += int(not result.cached and result.attempts > 0)
            s.failures += int(result.error is not None)
            s.attempts += result.attempts
            if not result.cached:
                s.input_tokens += result.input_tokens
                s.output_tokens += result.output_tokens
            s.cost_usd += result.cost_usd
            row = s.by_provider.setdefault(
                provider, {"requests": 0, "cache_hits": 0, "failures": 0, "cost_usd": 0.0}
            )
            row["requests"] += 1
            row["cache_hits"] += int(result.cached)
            row["failures"] += int(result.error is not None)
            row["cost_usd"] += result.cost_usd
        return result

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        # some providers echo a masked key ("Incorrect API key provided: sk-...abcd"); drop even that
        return re.sub(r"(?i)(api[ _-]?key[^:]{0,20}:)\s*\S+", r"\1 [redacted]", text)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout: no complete reply within timeout_s"
    status = _status_code(exc)
    prefix = f"HTTP {status} " if status is not None else ""
    message = str(exc).strip() or repr(exc)
    return f"{prefix}{type(exc).__name__}: {message}"[:1000]


def _estimate_tokens(request: ChatRequest) -> int:
    chars = sum(len(m.get("content", "")) for m in request.messages)
    if request.json_schema is not None:
        chars += len(json.dumps(request.json_schema))
    return chars // 4 + int(request.max_tokens) + 1


def _validate_request(request: ChatRequest, index: int) -> None:
    where = f"request {index}"
    if not isinstance(request, ChatRequest):
        raise TypeError(f"{where}: expected a ChatRequest, got {type(request).__name__}")
    if not request.messages:
        raise ValueError(f"{where}: messages is empty; e.g. [{{'role': 'user', 'content': 'Hello'}}]")
    for j, m in enumerate(request.messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"{where}, message {j}: expected {{'role': one of {list(_ROLES)}, 'content': str}}, got {m!r}"
            )
    if request.max_tokens < 1:
        raise ValueError(f"{where}: max_tokens must be >= 1, got {request.max_tokens}")
