"""Service-LLM client layer: one interface over OpenAI(-compatible), Anthropic, Google and the embedded server.

Every call a stage makes to a service LLM (judging in 04, synthesis in 05, parity in 06) goes through
`ServicePool`:

    with ServicePool(cfg, layout, stage="04_evaluate", cycle=0) as pool:
        results = pool.complete_many("gpt4o", [ChatRequest(messages=[...], json_schema=SCHEMA, repeat=m) ...])

What the pool does for each request, in order:

1. Cache: the full request (provider kind, model, endpoint, messages, sampling, schema, repeat index)
   is hashed; a finished call with that key is replayed from `<run>/calls.sqlite` for free, else from the
   project's shared cache (`cache.path`, default `<outputs_dir>/.callcache/calls.sqlite`; `cache.shared:
   false` bypasses it), which is noted in the run's `reused` table.
1a. Admission: the first real call to a provider goes out alone (a revoked key costs one call); a call is
   sent only while the stage has not stopped and its worst case (input estimate + max_tokens at list
   price) fits under every `budget:` cap, counting what the run's ledger already paid. A paid call (any
   provider but embedded / `free: true`) is sent only when the run's calls.sqlite holds a forecast of the
   pool's stage and cycle (`forecast.forecast_stage`; the runner records it before each paid notebook);
   without one the stage stops before its first paid call, saying what to run.
2. Limits: the provider's `scheduler.RateScheduler` - RPM and TPM over a sliding minute, paced, with
   as many calls in flight as rate x latency needs (`max_concurrency` is an optional hard cap).
   Tokens are estimated before the call as prompt characters / 4 + max_tokens.
3. Retries (tenacity): 408/409/429/5xx, timeouts and connection errors are retried up to
   `max_retries` times. A 429 pauses the whole provider (shared cooldown: `retry-after-ms` /
   `retry-after` / Google's RetryInfo, else an exponential step); other errors wait the server's hint
   or exponential backoff with full jitter. The SDKs' own retries are switched off
   (`max_retries=0`, Google: `attempts=1`) so every attempt is counted exactly once here.
   Each attempt has a total timeout of `timeout_s`.
4. Ledger: one row per real call (success or final failure) with tokens, latency and cost, one per
   timed-out attempt at its estimated cost, one per unusable reply; `<run>/ledger.csv` is re-exported
   when the pool closes.
5. Usable replies only: an empty, truncated (finish_reason length), refused or blocked reply is never
   cached as an answer; it is ledgered (it was paid), kept raw in `failed_replies`, re-sent up to
   `unusable_retries` times (not when truncated: the same request would be cut again) and returned with
   `.error` set.
6. Fail fast: an authentication or permission error, an exhausted quota or credit, or a model that does
   not exist stops the stage at once (never retried); so does a failure share above `max_failure_share`
   over the last `failure_window` real calls, or a budget. Calls still queued are not sent, and
   `complete_many` raises `StageStopped` naming the provider and the reason; the runner records the stage
   as "stopped" and `llamaduo run --resume` continues it (answered calls replay for free).
7. Provider batches: for a provider with `batch: true`, steps 2-3 are replaced by the provider's batch API
   (batches.py): the uncached requests go out as batches, their ids persisted before polling, and each result
   goes through steps 4-6 like a live reply, priced at the batch discount.

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
import collections
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

from .callcache import (
    CachedCall,
    CallCache,
    LedgerRow,
    export_ledger_csv,
    request_key,
)
from .config import BudgetConfig, ConfigError, ProviderConfig, RunConfig
from .prices import PriceTable, load_prices
from .runlayout import RunLayout
from .scheduler import RETRY_AFTER_CAP_S, RateScheduler, Slot

KEY_ENV_DEFAULTS: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "google": ("GOOGLE_API_KEY", "GEMINI_API_KEY"),
}
LOCAL_DUMMY_KEY = "local-no-key"  # local OpenAI-compatible servers accept any key
EMBEDDED_N_CTX = 4096  # judge prompts (instruction + reference + candidate + schema) outgrow 2048
# llama-server's slots for the embedded service LLM: requests in flight are decoded together in one batch
# (continuous batching); more in flight than slots would only queue there. An embedded provider's
# max_concurrency, when set, caps both.
EMBEDDED_PARALLEL = 8
_ROLES = ("system", "user", "assistant")


class MissingAPIKeyError(ConfigError):
    """A provider's API key environment variable is not set."""


class StageStopped(RuntimeError):
    """The stage must not go on spending: a provider rejected the key, the quota is exhausted, the model does
    not exist, too many calls failed in a row, or a budget would be crossed. Raised by `complete_many` /
    `acomplete` after the calls already on their way have finished; nothing that succeeded is lost (it is in
    the cache), and the runner records the stage as "stopped" so `llamaduo run --resume` continues it."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(
            f"{reason}. Nothing that succeeded is lost: fix the cause, then continue with "
            "`llamaduo run <params> --resume` (answered calls replay from the cache for free)."
        )


class _NotSent(Exception):
    """A call held back because the stage is stopping (never retried, never ledgered)."""


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": str}]
    temperature: float = 0.0
    max_tokens: int = 512
    top_p: float | None = None
    json_schema: dict | None = None  # ask for structured output (JSON schema) when not None
    schema_name: str = "response"
    repeat: int = 0  # repeat/sample index: part of the cache key (M repeats don't collapse)
    # Free-text answers (03's samples, Table-1 baselines, parity, teacher answers): a reply cut at max_tokens is
    # the model's answer at that budget, usable and cached. Structured replies (judge, synthesis) never are.
    allow_truncated: bool = False


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

    finish_reason: str | None = None  # the provider's stop reason of the last reply (None for cache hits)

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
        # google-genai's async client uses aiohttp when it is installed
        ("aiohttp", "ClientConnectionError"),
        ("aiohttp", "ClientPayloadError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _error_text(exc: BaseException) -> str:
    """The exception's message and JSON error body, lower-cased, for recognising the provider's error codes."""
    parts = [str(exc)]
    for attr in ("body", "details", "code", "type", "status"):
        value = getattr(exc, attr, None)
        if value is not None and not callable(value):
            try:
                parts.append(json.dumps(value, default=str))
            except (TypeError, ValueError):
                parts.append(str(value))
    return " ".join(parts).lower()


def stop_reason(exc: BaseException) -> str | None:
    """Why `exc` means the stage must stop at once (retrying or going on would only fail or spend), or None.

    Authentication and permission errors, exhausted quota or credit (OpenAI `insufficient_quota`, Anthropic
    `billing_error` / "credit balance is too low", Google's daily or zero quota) and a model that does not exist.
    """
    status = _status_code(exc)
    text = _error_text(exc)
    if (
        "insufficient_quota" in text
        or "billing_error" in text
        or "credit balance is too low" in text
        or status == 402
        or (status == 429 and ("perday" in text or "limit: 0" in text))
    ):
        return "quota exhausted (the account has no credit or quota left)"
    if (
        status == 401
        or "authentication_error" in text
        or "api_key_invalid" in text
        or "api key not valid" in text
    ):
        return "authentication failed (the API key was rejected)"
    if status == 403 or "permission_error" in text or "permission_denied" in text:
        return "permission denied (the key may not use this model or endpoint)"
    if status == 404 or "model_not_found" in text or "not_found_error" in text:
        return "model not found (check the provider's model name and base_url)"
    return None


def is_retryable(exc: BaseException) -> bool:
    """Rate limits, server errors, timeouts and dropped connections are worth another attempt.

    A 429 that says the quota is exhausted is not: waiting does not bring credit back.
    """
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return True
    if stop_reason(exc) is not None:
        return False
    status = _status_code(exc)
    if status is not None:
        return status in (408, 409, 425, 429) or status >= 500
    return isinstance(exc, _connection_error_types())


class _WaitRetryAfter(tenacity.wait.wait_base):
    """A 429 pauses the whole provider (the next attempt waits in the scheduler); other errors wait
    the server's hint, else exponential backoff with full jitter."""

    def __init__(self, scheduler: RateScheduler) -> None:
        self._scheduler = scheduler

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hinted = retry_after_seconds(exc)
        if exc is not None and _status_code(exc) == 429:
            return self._scheduler.rate_limited(hinted, retry_state.attempt_number)
        if hinted is not None:
            return min(max(hinted, 0.0), RETRY_AFTER_CAP_S)
        return self._scheduler.backoff_s(retry_state.attempt_number)


# --------------------------------------------------------------------------- backends


@dataclass
class _Reply:
    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str | None = (
        None  # as the provider spells it: stop / length / max_tokens / MAX_TOKENS / ...
    )
    cached_input_tokens: int = 0  # input tokens the provider served from its prompt cache (billed lower)


_LENGTH_STOPS = frozenset({"length", "max_tokens", "MAX_TOKENS"})
_BLOCKED_STOPS = frozenset(
    {
        "content_filter",
        "refusal",
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "LANGUAGE",
        "OTHER",
    }
)


def unusable_reason(reply: _Reply, max_tokens: int, allow_truncated: bool = False) -> tuple[str, bool] | None:
    """(why the reply cannot be used as an answer, whether re-sending may help) or None for a usable reply.

    Usable replies are the only ones cached as answers; the others are ledgered (they were paid), kept with
    their raw text in the failed-replies table, and re-sent under the provider's `unusable_retries`.
    """
    finish = reply.finish_reason or ""
    empty = not reply.text.strip()
    if finish in _LENGTH_STOPS:
        if empty:
            return (
                f"empty reply with a length stop (finish_reason {finish}): the model spent all max_tokens="
                f"{max_tokens} before answering, e.g. on thinking; raise max_tokens or lower the provider's "
                "reasoning_effort / thinking_budget",
                False,
            )
        if allow_truncated:
            return None
        return f"truncated reply (finish_reason {finish} at max_tokens={max_tokens})", False
    if finish in _BLOCKED_STOPS or reply.text.startswith("[refusal]"):
        return f"refused or blocked reply (finish_reason {finish or 'refusal'})", True
    if empty:
        return f"empty reply (finish_reason {finish or 'none'})", True
    return None


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


REASONING_ALLOWANCE = {"minimal": 1024, "low": 4096, "medium": 16384, "high": 32768}


def _reasoning_allowance(provider: ProviderConfig) -> int:
    """Tokens a reasoning model may think on top of the answer's max_tokens (a cap, not a spend)."""
    if provider.thinking_budget is not None:
        return provider.thinking_budget
    return REASONING_ALLOWANCE.get(provider.reasoning_effort or "", 0)


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

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        """The chat.completions body of `request` (JSON: the live call's kwargs and a batch line's body)."""
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
        if self.provider.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.provider.reasoning_effort
            # reasoning tokens come out of max_completion_tokens: keep the answer's budget on top of them
            kwargs["max_completion_tokens"] = request.max_tokens + _reasoning_allowance(self.provider)
        return kwargs

    async def call(self, request: ChatRequest) -> _Reply:
        return self.reply_from(await self.client.chat.completions.create(**self.request_body(request)))

    @staticmethod
    def reply_from(completion: Any) -> _Reply:
        if not completion.choices:
            raise RuntimeError("the server returned no choices")
        message = completion.choices[0].message
        text = message.content or ""
        if not text and getattr(message, "refusal", None):
            text = f"[refusal] {message.refusal}"
        usage = completion.usage
        details = getattr(usage, "prompt_tokens_details", None)
        return _Reply(
            text=text,
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            finish_reason=completion.choices[0].finish_reason,
            cached_input_tokens=int(getattr(details, "cached_tokens", 0) or 0),
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

    def request_body(self, request: ChatRequest) -> tuple[dict[str, Any], bool]:
        """(messages.create params of `request`, whether the answer is wrapped in {"value": ...})."""
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
        if self.provider.thinking_budget:
            # extended thinking: budget_tokens count inside max_tokens, so add them on top of the answer's budget
            # (Anthropic allows no forced tool and no temperature with thinking: the schema goes in the prompt)
            kwargs["thinking"] = {"type": "enabled", "budget_tokens": self.provider.thinking_budget}
            kwargs["max_tokens"] = request.max_tokens + self.provider.thinking_budget
            if forced_tool:
                forced_tool = False
                system, turns = _split_system(_with_schema_in_prompt(messages, schema))
                kwargs["messages"] = turns
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
        return kwargs, wrapped

    async def call(self, request: ChatRequest) -> _Reply:
        kwargs, wrapped = self.request_body(request)
        return self.reply_from(await self.client.messages.create(**kwargs), wrapped)

    @staticmethod
    def reply_from(message: Any, wrapped: bool) -> _Reply:
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
        cache_read = int(getattr(usage, "cache_read_input_tokens", 0) or 0)
        return _Reply(
            text,
            int(usage.input_tokens or 0) + cache_read,
            int(usage.output_tokens or 0),
            finish_reason=message.stop_reason,
            cached_input_tokens=cache_read,
        )

    async def aclose(self) -> None:
        await self.client.close()


class _GoogleBackend:
    def __init__(self, provider: ProviderConfig, api_key: str):
        from google import genai
        from google.genai import types

        self.provider = provider
        self.types = types
        # one attempt per call, retried (and counted) by the pool. Left unset, retry_options is not enough:
        # google-genai's aiohttp transport then re-sends a dropped request once by itself, uncounted, after
        # 1-10 s. timeout is in milliseconds.
        http_options = types.HttpOptions(
            timeout=int(provider.timeout_s * 1000),
            base_url=provider.base_url,
            retry_options=types.HttpRetryOptions(attempts=1),
        )
        self.client = genai.Client(api_key=api_key, http_options=http_options)

    def request_body(self, request: ChatRequest) -> tuple[list[Any], Any]:
        """(contents, GenerateContentConfig) of `request`, for a live call and a batch's inlined request."""
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
        if self.provider.thinking_budget is not None:
            # Gemini 2.5 thinks out of max_output_tokens: give the answer its own budget on top
            config["thinking_config"] = types.ThinkingConfig(thinking_budget=self.provider.thinking_budget)
            config["max_output_tokens"] = request.max_tokens + self.provider.thinking_budget
        if schema is not None and self.provider.json_mode in ("schema", "object"):
            config["response_mime_type"] = "application/json"
            if self.provider.json_mode == "schema":
                config["response_json_schema"] = schema
        return contents, types.GenerateContentConfig(**config)

    async def call(self, request: ChatRequest) -> _Reply:
        contents, config = self.request_body(request)
        response = await self.client.aio.models.generate_content(
            model=self.provider.model, contents=contents, config=config
        )
        return self.reply_from(response)

    @staticmethod
    def reply_from(response: Any) -> _Reply:
        parts = []
        finish: str | None = None
        feedback = getattr(response, "prompt_feedback", None)
        if not response.candidates and feedback is not None and getattr(feedback, "block_reason", None):
            finish = "SAFETY"  # the prompt itself was blocked
        for candidate in (response.candidates or [])[:1]:
            reason = getattr(candidate, "finish_reason", None)
            finish = getattr(reason, "name", None) or (str(reason) if reason is not None else None)
            for part in (candidate.content.parts if candidate.content else None) or []:
                if part.text and not part.thought:
                    parts.append(part.text)
        usage = response.usage_metadata
        # thinking tokens are billed as output
        output_tokens = (
            (usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0) if usage else 0
        )
        return _Reply(
            "".join(parts),
            int(usage.prompt_token_count or 0) if usage else 0,
            int(output_tokens),
            finish_reason=finish,
            cached_input_tokens=int(getattr(usage, "cached_content_token_count", 0) or 0) if usage else 0,
        )

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


def shared_cache_path(cfg: RunConfig) -> Path:
    """Where the project's shared call cache lives (`cache.path`, default <outputs_dir>/.callcache/calls.sqlite)."""
    if cfg.cache.path:
        return Path(cfg.cache.path)
    return Path(cfg.outputs_dir) / ".callcache" / "calls.sqlite"  # resolved like the run folders are


@dataclass
class _Lane:
    """Everything one provider needs at call time."""

    provider: ProviderConfig
    endpoint: str  # stable description of where calls go (part of the cache key)
    backend: Any = None
    scheduler: RateScheduler | None = None


@dataclass
class _Guard:
    """Fail-fast bookkeeping of one provider in one pool.

    The first real call goes out alone (a revoked key costs one call, not `max_concurrency`); after it, a
    sliding window over the last `failure_window` real calls stops the stage when more than
    `max_failure_share` of them failed.
    """

    window: int
    max_share: float
    outcomes: collections.deque = field(default_factory=collections.deque)
    probe_started: bool = False
    probe_done: asyncio.Event = field(default_factory=asyncio.Event)

    async def admit(self) -> bool:
        """True for the probe (the first real call); the others wait until the probe has an outcome."""
        if not self.probe_started:
            self.probe_started = True
            return True
        await self.probe_done.wait()
        return False

    def record(self, ok: bool) -> str | None:
        """Add one real call's outcome; a reason to stop when the window holds too many failures."""
        self.outcomes.append(ok)
        while len(self.outcomes) > self.window:
            self.outcomes.popleft()
        failed = self.outcomes.count(False)
        if len(self.outcomes) >= self.window and failed / len(self.outcomes) > self.max_share:
            return (
                f"{failed} of the last {len(self.outcomes)} calls failed "
                f"(more than max_failure_share={self.max_share:g} of failure_window={self.window})"
            )
        return None


class _StopGate:
    """Wraps a lane's backend: once the stage stopped, a call that got through the limiters is not sent.

    The check sits here, after the concurrency semaphore and the rate limiters, so calls that queued behind
    them before the stop never go out.
    """

    def __init__(self, backend: Any, pool: ServicePool):
        self._backend, self._pool = backend, pool

    async def call(self, request: ChatRequest) -> _Reply:
        if self._pool._stopped is not None:
            raise _NotSent(self._pool._stopped)
        return await self._backend.call(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class _Budget:
    """Spending caps of `budget:` against what the run's ledger already paid plus the calls on their way.

    A call is admitted only if its worst case (input estimate + max_tokens, at list price) fits under every
    cap; its reservation is replaced by the real cost when it returns.
    """

    def __init__(self, cfg: BudgetConfig, rows: list[dict[str, Any]], stage: str, cycle: int | None):
        scopes = {
            "run": (cfg.run_usd, cfg.run_tokens, lambda r: True),
            "cycle": (cfg.cycle_usd, cfg.cycle_tokens, lambda r: cycle is not None and r["cycle"] == cycle),
            "stage": (
                cfg.stage_usd,
                cfg.stage_tokens,
                lambda r: r["stage"] == stage and r["cycle"] == cycle,
            ),
        }
        self.caps = {
            k: (usd, tok) for k, (usd, tok, _) in scopes.items() if usd is not None or tok is not None
        }
        self.used = {
            k: [
                sum(float(r["cost_usd"]) for r in rows if scopes[k][2](r)),
                sum(int(r["input_tokens"]) + int(r["output_tokens"]) for r in rows if scopes[k][2](r)),
            ]
            for k in self.caps
        }

    def reserve(self, usd: float, tokens: int, force: bool = False) -> str | None:
        """Book a call's worst case; a reason (and nothing booked) when it could cross a cap.

        `force` books without checking: spending already committed (a provider batch submitted by an earlier,
        killed run of the stage) must be counted, never refused.
        """
        for scope, (cap_usd, cap_tokens) in self.caps.items() if not force else ():
            used_usd, used_tokens = self.used[scope]
            if cap_usd is not None and used_usd + usd > cap_usd + 1e-12:
                return (
                    f"budget.{scope}_usd={cap_usd:g} reached: ${used_usd:.4f} spent or on its way, and the next "
                    f"call may cost up to ${usd:.4f}"
                )
            if cap_tokens is not None and used_tokens + tokens > cap_tokens:
                return (
                    f"budget.{scope}_tokens={cap_tokens} reached: {used_tokens} tokens used or on their way, and "
                    f"the next call may use up to {tokens}"
                )
        for scope in self.caps:
            self.used[scope][0] += usd
            self.used[scope][1] += tokens
        return None

    def settle(self, booked: tuple[float, int, int], usd: float, tokens: int) -> None:
        """Replace a booking (USD, input, output tokens) by what the call really used."""
        for scope in self.caps:
            self.used[scope][0] += usd - booked[0]
            self.used[scope][1] += tokens - booked[1] - booked[2]


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
    reused: int = 0  # answers taken from the project's shared cache (paid by an earlier run)
    not_sent: int = 0  # calls held back because the stage stopped
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
    finish_reason: str | None = None,
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
        finish_reason=finish_reason,
    )


class ServicePool:
    """Context manager over the service LLMs a stage uses; see the module docstring.

    `providers` restricts the pool (key checks, embedded server start) to the named providers;
    default: every provider declared in the config. `rate_period_s` is the window of the rpm/tpm
    limits (60: per minute); only benchmarks and tests shrink it, to run minutes in seconds.
    """

    def __init__(
        self,
        cfg: RunConfig,
        layout: RunLayout,
        stage: str,
        cycle: int | None = None,
        *,
        providers: Sequence[str] | None = None,
        rate_period_s: float = 60.0,
    ):
        self.cfg, self.layout, self.stage, self.cycle = cfg, layout, stage, cycle
        self.rate_period_s = rate_period_s
        if isinstance(providers, str):
            providers = [providers]
        names = list(providers) if providers is not None else [p.name for p in cfg.providers]
        self._providers: dict[str, ProviderConfig] = {name: cfg.provider(name) for name in names}
        self._lanes: dict[str, _Lane] = {}
        self._cache: CallCache | None = None
        self._shared: CallCache | None = None
        self._guards: dict[str, _Guard] = {}
        self._budget: _Budget | None = None
        self._has_forecast = False  # a forecast of (stage, cycle) is recorded: paid calls may go out
        self._stopped: str | None = None
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
        self._stopped = None  # a reopened pool (e.g. after the key was fixed) starts sending again
        self._secrets = sorted({k for k in keys.values() if k != LOCAL_DUMMY_KEY}, key=len, reverse=True)
        try:
            self._prices = load_prices(self.cfg.prices_file)
            self._cache = CallCache(self.layout.calls_db)
            if self.cfg.cache.shared:
                self._shared = CallCache(shared_cache_path(self.cfg))
            self._budget = _Budget(self.cfg.budget, self._cache.ledger_rows(), self.stage, self.cycle)
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
        caps = [
            p.max_concurrency for p in self._providers.values() if p.kind == "embedded" and p.max_concurrency
        ]
        slots = min([EMBEDDED_PARALLEL, *caps])
        self._server = LlamaServer(gguf, n_ctx=EMBEDDED_N_CTX, parallel=slots)
        self._server.__enter__()
        # the port changes each start; the cache key names the model file and the server that samples from it
        from .llamacpp import llama_cpp_python_version

        return self._server.base_url, f"embedded:{Path(gguf).name}:llama-server-{llama_cpp_python_version()}"

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
            lane.backend = _StopGate(lane.backend, self)
            self._guards[name] = _Guard(p.failure_window, p.max_failure_share)
            cap = p.max_concurrency
            if cap is None and p.kind == "embedded":
                cap = EMBEDDED_PARALLEL
            lane.scheduler = RateScheduler(p.rpm, p.tpm, max_concurrency=cap, period_s=self.rate_period_s)

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
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        self._guards.clear()
        self._secrets = []

    # ---- public calls
    def complete_many(self, provider: str, requests: list[ChatRequest], desc: str = "") -> list[ChatResult]:
        """Run `requests` against `provider`; results come back in request order.

        Blocks until done, showing a tqdm bar. Safe inside Jupyter (the work runs on the pool's own
        loop thread). A request that still fails after retries comes back with `.error` set.
        """
        return self.complete_groups({provider: requests}, desc=desc or f"{provider} calls")[provider]

    def complete_groups(
        self, groups: dict[str, Sequence[ChatRequest]], desc: str = ""
    ) -> dict[str, list[ChatResult]]:
        """`{provider: [requests]}` -> `{provider: [results]}`, every provider at the same time.

        Each provider keeps its own limits, so judges of different providers fill their own rate
        limits side by side instead of one after another. One tqdm bar counts all calls.
        """
        self._require_open()
        for provider, requests in groups.items():
            self._lane(provider)
            for i, request in enumerate(requests):
                _validate_request(request, i)
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "complete_many called from the pool's own event loop; use `await pool.acomplete(...)`"
            )
        self._raise_if_stopped()
        total = sum(len(requests) for requests in groups.values())
        if not total:
            return {provider: [] for provider in groups}
        from tqdm.auto import tqdm

        progress = {"done": 0, "cached": 0, "failed": 0, "cost": 0.0}

        async def run_all() -> list[list[ChatResult]]:
            return list(
                await asyncio.gather(*(self._run_many(p, list(rs), progress) for p, rs in groups.items()))
            )

        future = asyncio.run_coroutine_threadsafe(run_all(), self._loop)
        shown, shown_batch = 0, None
        with tqdm(total=total, desc=desc or f"{'+'.join(groups)} calls", unit="call") as bar:
            try:
                while True:
                    try:
                        results = future.result(timeout=0.25)
                        break
                    except concurrent.futures.TimeoutError:
                        pass
                    finally:
                        done, batch = progress["done"], progress.get("batch")
                        if done > shown or batch != shown_batch:
                            bar.update(done - shown)
                            shown, shown_batch = done, batch
                            bar.set_postfix(
                                cached=progress["cached"],
                                failed=progress["failed"],
                                usd=f"{progress['cost']:.4f}",
                                # a provider batch's status while it runs (batch: true providers)
                                **({"batch": batch} if batch else {}),
                            )
            except BaseException:
                future.cancel()
                raise
        self._raise_if_stopped()
        return dict(zip(groups, results, strict=True))

    async def acomplete(self, provider: str, request: ChatRequest) -> ChatResult:
        """One request; await it from any event loop (it runs on the pool's loop)."""
        self._require_open()
        self._lane(provider)
        _validate_request(request, 0)
        self._raise_if_stopped()
        coro = self._complete(provider, request)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            result = await coro
        else:
            result = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))
        self._raise_if_stopped()
        return result

    @property
    def stopped(self) -> str | None:
        """Why this pool stopped sending (None while it goes on)."""
        return self._stopped

    def cache_key(self, provider: str, request: ChatRequest) -> str:
        """The cache key `request` has with `provider` (pool must be open: the embedded endpoint is known then)."""
        self._require_open()
        return request_key(self._request_payload(self._lane(provider), request))

    # ---- internals
    def _raise_if_stopped(self) -> None:
        if self._stopped is not None:
            raise StageStopped(
                f"{self.stage}"
                + (f" (cycle {self.cycle})" if self.cycle is not None else "")
                + f" stopped: {self._stopped}"
            )

    def _stop(self, reason: str) -> None:
        if self._stopped is None:
            self._stopped = reason

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
            # only when set, so the keys of every other request stay what they were
            **({"allow_truncated": True} if request.allow_truncated else {}),
        }

    def _left_batches_possible(self) -> bool:
        """Whether this stage ever submitted a provider batch (then a killed run may have left one open)."""
        return self.layout.batches_file(self.stage, self.cycle).is_file()

    async def _run_many(self, provider: str, requests: list[ChatRequest], progress: dict) -> list[ChatResult]:
        lane = self._lane(provider)
        if lane.provider.batch:
            from .batches import run_batched

            return await run_batched(self, provider, requests, progress)
        if lane.provider.kind in ("openai", "anthropic", "google") and self._left_batches_possible():
            from .batches import collect_left_batches

            await collect_left_batches(self, provider, requests, progress)

        async def one(request: ChatRequest) -> ChatResult:
            result = await self._complete(provider, request)
            progress["done"] += 1
            progress["cached"] += int(result.cached)
            progress["failed"] += int(result.error is not None)
            progress["cost"] += result.cost_usd
            return result

        return list(await asyncio.gather(*(one(r) for r in requests)))

    def _lookup(self, lane: _Lane, key: str, payload: dict) -> CachedCall | None:
        """The cached answer of `key`: this run's cache, else the project's shared cache (noted as reused)."""
        hit = self._cache.get(key)
        if hit is None and self._shared is not None:
            hit = self._shared.get(key)
            if (
                hit is not None
            ):  # paid by an earlier run of the project: copy it into this run, note the reuse
                self._cache.put(
                    key, payload, hit.text, hit.input_tokens, hit.output_tokens, hit.latency_s, hit.cost_usd
                )
                self._cache.record_reuse(
                    self.stage, self.cycle, lane.provider.name, lane.provider.model, key, hit.cost_usd
                )
                with self._stats_lock:
                    self.stats.reused += 1
        return hit

    async def _complete(self, provider: str, request: ChatRequest) -> ChatResult:
        lane = self._lane(provider)
        payload = self._request_payload(lane, request)
        key = request_key(payload)
        hit = self._lookup(lane, key, payload)
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
        slot: Slot = await lane.scheduler.acquire(_estimate_tokens(request))
        latency = None
        try:
            started = time.monotonic()
            reply = await asyncio.wait_for(lane.backend.call(request), timeout=lane.provider.timeout_s)
            latency = time.monotonic() - started
            return reply, latency
        finally:
            lane.scheduler.release(slot, latency)

    def _worst_case(self, lane: _Lane, request: ChatRequest, batch: bool = False) -> tuple[float, int, int]:
        """(USD, input tokens, output tokens) one attempt can cost at most: input estimate + all of max_tokens
        (at the batch price when it goes in a provider batch)."""
        p = lane.provider
        prompt = _estimate_tokens(request) - int(request.max_tokens) - 1
        output = int(request.max_tokens) + _reasoning_allowance(p)
        usd = self._prices.cost(p.kind, p.model, prompt, output, free=p.is_free, batch=batch)
        return usd, prompt, output

    def _admit(self, lane: _Lane, request: ChatRequest) -> tuple[float, int, int]:
        """Clear one attempt to go out: not when the stage stopped, not across a budget. Returns the booking."""
        if self._stopped is not None:
            raise _NotSent(self._stopped)
        if not lane.provider.is_free and not self._forecast_recorded():
            why = (
                f"no forecast recorded for {self.stage}"
                + (f" (cycle {self.cycle})" if self.cycle is not None else "")
                + f" in {self.layout.calls_db}: no paid call goes out before its stage's forecast. `llamaduo run`"
                " records it before each paid notebook; run the notebook's forecast cell first"
                " (`forecast.forecast_stage(cfg, notebook_stage, cycle, layout)`; 04_evaluate covers Table 1's"
                " baselines, 05_synthesize the teacher study)"
            )
            self._stop(why)
            raise _NotSent(why)
        usd, prompt, output = self._worst_case(lane, request)
        over = self._budget.reserve(usd, prompt + output)
        if over is not None:
            self._stop(over)
            raise _NotSent(over)
        return usd, prompt, output

    def _forecast_recorded(self) -> bool:
        """Whether the run's calls.sqlite holds a forecast of this pool's stage and cycle (asked until yes)."""
        if not self._has_forecast:
            self._has_forecast = self._cache.has_forecast(self.stage, self.cycle)
        return self._has_forecast

    def _row(self, p: ProviderConfig, key: str, **values: Any) -> LedgerRow:
        return LedgerRow(
            stage=self.stage,
            cycle=self.cycle,
            provider=p.name,
            kind=p.kind,
            model=p.model,
            cache_key=key,
            **values,
        )

    def _paid_row(
        self,
        p: ProviderConfig,
        key: str,
        reply: _Reply,
        latency: float,
        cost: float,
        attempts: int,
        error: str | None,
    ) -> LedgerRow:
        """The ledger row of one paid reply (live or from a batch): ok when `error` is None."""
        return self._row(
            p,
            key,
            input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens,
            latency_s=latency,
            cost_usd=cost,
            ok=error is None,
            error=error,
            attempts=attempts,
        )

    async def _call(self, lane: _Lane, request: ChatRequest, key: str, payload: dict) -> ChatResult:
        p = lane.provider
        guard = self._guards[p.name]
        probe = await guard.admit()
        try:
            return await self._call_until_usable(lane, request, key, payload, guard)
        finally:
            if probe:
                guard.probe_done.set()

    async def _call_until_usable(
        self, lane: _Lane, request: ChatRequest, key: str, payload: dict, guard: _Guard
    ) -> ChatResult:
        """Send until a usable reply arrives, `unusable_retries` are spent, or the call fails after retries."""
        p = lane.provider
        resends = 0
        while True:
            outcome = await self._send(lane, request, key)
            if isinstance(outcome, ChatResult):  # failed (or never sent)
                if outcome.attempts and (why := guard.record(False)) is not None:
                    self._stop(f"provider '{p.name}' ({p.kind}, model {p.model}): {why}")
                return outcome
            reply, latency, attempts = outcome
            result, worth_resending = self._take_reply(lane, request, key, payload, reply, latency, attempts)
            if result.error is None:
                return result
            if worth_resending and resends < p.unusable_retries and self._stopped is None:
                resends += 1
                continue
            return result

    def _take_reply(
        self,
        lane: _Lane,
        request: ChatRequest,
        key: str,
        payload: dict,
        reply: _Reply,
        latency: float,
        attempts: int,
        batch: bool = False,
    ) -> tuple[ChatResult, bool]:
        """Price, ledger and (when usable) cache one paid reply, live or from a provider batch.

        Returns the result and whether re-sending the request may help (an unusable but not truncated reply).
        """
        p = lane.provider
        guard = self._guards[p.name]
        cost = self._prices.cost(
            p.kind,
            p.model,
            reply.input_tokens,
            reply.output_tokens,
            free=p.is_free,
            cached_input_tokens=reply.cached_input_tokens,
            batch=batch,
        )
        unusable = unusable_reason(reply, request.max_tokens, request.allow_truncated)
        if unusable is None:
            guard.record(True)
            self._cache.put(key, payload, reply.text, reply.input_tokens, reply.output_tokens, latency, cost)
            if self._shared is not None:
                self._shared.put(
                    key, payload, reply.text, reply.input_tokens, reply.output_tokens, latency, cost
                )
            self._cache.record(self._paid_row(p, key, reply, latency, cost, attempts, error=None))
            answered = _answered(
                request,
                reply.text,
                reply.input_tokens,
                reply.output_tokens,
                latency,
                cost,
                False,
                attempts,
                key,
                reply.finish_reason,
            )
            return answered, False
        why, worth_resending = unusable
        # paid but not an answer: ledger it, keep the raw reply, never cache it
        self._cache.record(self._paid_row(p, key, reply, latency, cost, attempts, error=why))
        self._cache.record_failed_reply(
            self.stage, self.cycle, p.name, p.model, key, payload, reply.text, reply.finish_reason, why
        )
        if (stop := guard.record(False)) is not None:
            self._stop(f"provider '{p.name}' ({p.kind}, model {p.model}): {stop}")
        failed = ChatResult(
            reply.text,
            None,
            None,
            why,
            reply.input_tokens,
            reply.output_tokens,
            latency,
            cost,
            False,
            attempts,
            key,
            reply.finish_reason,
        )
        return failed, worth_resending

    async def _send(
        self, lane: _Lane, request: ChatRequest, key: str
    ) -> tuple[_Reply, float, int] | ChatResult:
        """One call with retries: (reply, latency, attempts), or the failed ChatResult (ledgered if sent)."""
        p = lane.provider
        attempts = 0
        started = time.monotonic()
        try:
            retrying = tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(p.max_retries + 1),
                wait=_WaitRetryAfter(lane.scheduler),
                retry=tenacity.retry_if_exception(is_retryable),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    usd, prompt, output = booked = self._admit(lane, request)
                    attempts += 1
                    try:
                        reply, latency = await self._attempt(lane, request)
                    except _NotSent:  # stopped while it waited for its turn: nothing went out
                        attempts -= 1
                        self._budget.settle(booked, 0.0, 0)
                        raise
                    except (TimeoutError, asyncio.TimeoutError):
                        # the provider may have computed (and billed) the reply we stopped waiting for
                        self._budget.settle(booked, usd, prompt + output)
                        self._cache.record(
                            self._row(
                                p,
                                key,
                                input_tokens=prompt,
                                output_tokens=output,
                                latency_s=p.timeout_s,
                                cost_usd=usd,
                                ok=False,
                                attempts=1,
                                error="timeout: cost estimated (input estimate + max_tokens)",
                            )
                        )
                        raise
                    except BaseException:
                        self._budget.settle(booked, 0.0, 0)
                        raise
                    paid = self._prices.cost(
                        p.kind,
                        p.model,
                        reply.input_tokens,
                        reply.output_tokens,
                        free=p.is_free,
                        cached_input_tokens=reply.cached_input_tokens,
                    )
                    self._budget.settle(booked, paid, reply.input_tokens + reply.output_tokens)
        except _NotSent as exc:
            with self._stats_lock:
                self.stats.not_sent += 1
            return ChatResult("", None, None, f"not sent: {exc}", 0, 0, 0.0, 0.0, False, attempts, key)
        except Exception as exc:  # one bad call must not sink the batch: report it in the result and ledger
            error = self._redact(_describe(exc))
            fatal = stop_reason(exc)
            if fatal is not None:
                self._stop(f"provider '{p.name}' ({p.kind}, model {p.model}): {fatal}: {error}")
            timed_out = isinstance(exc, TimeoutError | asyncio.TimeoutError)
            if not timed_out:  # timed-out attempts have their own (estimated) rows already
                self._cache.record(
                    self._row(
                        p,
                        key,
                        input_tokens=0,
                        output_tokens=0,
                        latency_s=time.monotonic() - started,
                        cost_usd=0.0,
                        ok=False,
                        error=error,
                        attempts=attempts,
                    )
                )
            return ChatResult(
                "", None, None, error, 0, 0, time.monotonic() - started, 0.0, False, attempts, key
            )
        return reply, latency, attempts

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
    for attr in (
        "code",
        "type",
    ):  # OpenAI's machine-readable reason, e.g. insufficient_quota, is not in str(exc)
        detail = getattr(exc, attr, None)
        if isinstance(detail, str) and detail and detail not in message:
            message += f" [{attr}: {detail}]"
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
