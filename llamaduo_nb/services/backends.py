"""The provider backends and what the pool must know about their errors.

One backend per SDK: `_OpenAIBackend` (OpenAI and every OpenAI-compatible server: vLLM, Ollama, llama.cpp, the
embedded server), `_AnthropicBackend`, `_GoogleBackend`. Each turns a `ChatRequest` into its SDK's request body
(`request_body`, shared by the live call and a provider batch's line) and the SDK's answer into a `Reply`
(`reply_from`). `backend_for` picks one for a provider; `Lane` holds a provider's backend, rate scheduler and
endpoint, and derives the request payload the cache key is computed from.

Structured output: `json_mode: schema` asks the provider to enforce the schema (OpenAI-shaped
servers: `response_format` json_schema, which the embedded server turns into a llama.cpp grammar, see
embedded.py; Anthropic: a forced tool whose input_schema is the schema; Google: JSON mime type +
`response_json_schema`). `object` asks for any JSON object and `none` asks nothing of the API; in
both the schema is stated in the system prompt.

Anthropic: SDK 2.x speaks API version 2026-10-21, which has no temperature/top_p; they are not sent
(the model samples at its own setting, so M repeats still differ).

Errors: `stop_reason` (an error that must stop the stage at once: auth, permission, quota, unknown model),
`failure_class` (the provider-side cause class of a failed attempt: those, rate limit, server errors, timeouts,
connection errors), `is_retryable`, `retry_after_seconds` (the server's hint) and `WaitRetryAfter` (tenacity's wait: a 429 pauses
the whole provider). The SDKs' own retries are switched off (`max_retries=0`, Google: `attempts=1`) so every
attempt is counted exactly once by the pool.

Keys come only from environment variables (`api_key_for`: `ProviderConfig.api_key_env`, else the provider's
usual name); they live only inside the SDK clients in memory.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import re
import time
from dataclasses import dataclass, replace
from typing import Any

import tenacity

from ..config import ConfigError, ProviderConfig
from ..scheduler import RETRY_AFTER_CAP_S, RateScheduler
from .types import ChatRequest, Choice, MissingAPIKeyError, Reply

KEY_ENV_DEFAULTS: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "google": ("GOOGLE_API_KEY", "GEMINI_API_KEY"),
}
LOCAL_DUMMY_KEY = "local-no-key"  # local OpenAI-compatible servers accept any key

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


RATE_LIMITED = "rate limited (HTTP 429)"
SERVER_ERRORS = "server errors (HTTP 5xx)"
TIMEOUTS = "timeouts (no reply within timeout_s)"
CONNECTION_ERRORS = "connection errors (no HTTP answer)"


def failure_class(exc: BaseException) -> str | None:
    """The provider-side cause class of a failed attempt, or None when the failure is not the provider's
    (a request it rejected as malformed, a reply it answered but we could not use).

    Classes: those of `stop_reason` (authentication, permission, quota, unknown model), `RATE_LIMITED`,
    `SERVER_ERRORS`, `TIMEOUTS`, `CONNECTION_ERRORS`. A provider whose every call fails in one of them is dead
    for this stage (`accounting._Guard`)."""
    fatal = stop_reason(exc)
    if fatal is not None:
        return fatal
    # the SDKs' own timeouts (openai.APITimeoutError, httpx.ReadTimeout...) are connection errors by type
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) or "Timeout" in type(exc).__name__:
        return TIMEOUTS
    status = _status_code(exc)
    if status == 429:
        return RATE_LIMITED
    if status is not None and (status >= 500 or status in (408, 409, 425)):
        return SERVER_ERRORS
    if status is None and isinstance(exc, _connection_error_types()):
        return CONNECTION_ERRORS
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


class WaitRetryAfter(tenacity.wait.wait_base):
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


def describe_error(exc: BaseException) -> str:
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


# --------------------------------------------------------------------------- backends


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


def reasoning_allowance(provider: ProviderConfig) -> int:
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
        if request.n > 1:
            kwargs["n"] = request.n  # n completions from one prefill of the prompt
        response_format = self._response_format(request)
        if response_format is not None:
            kwargs["response_format"] = response_format
        if self.provider.reasoning_effort is not None:
            kwargs["reasoning_effort"] = self.provider.reasoning_effort
            # reasoning tokens come out of max_completion_tokens: keep the answer's budget on top of them
            kwargs["max_completion_tokens"] = request.max_tokens + reasoning_allowance(self.provider)
        return kwargs

    async def call(self, request: ChatRequest) -> Reply:
        completion = await self.client.chat.completions.create(**self.request_body(request))
        reply = self.reply_from(completion, request.n)
        if request.n > 1 and _llama_server_reply(completion):
            reply = await self._count_llama_server_choices(reply, request.max_tokens)
        return reply

    @staticmethod
    def _choice_text(choice: Any) -> str:
        message = choice.message
        text = message.content or ""
        if not text and getattr(message, "refusal", None):
            text = f"[refusal] {message.refusal}"
        return text

    @classmethod
    def reply_from(cls, completion: Any, n: int = 1) -> Reply:
        """The `Reply` of a chat completion; with n > 1 its `choices` hold all n completions (OpenAI and vLLM
        report the prompt once and the completion tokens of all of them; for llama-server see `call`)."""
        if not completion.choices:
            raise RuntimeError("the server returned no choices")
        usage = completion.usage
        details = getattr(usage, "prompt_tokens_details", None)
        output_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        choices: list[Choice] = []
        if n > 1:
            if len(completion.choices) != n:
                raise RuntimeError(
                    f"asked for n={n} completions, the server returned {len(completion.choices)}"
                )
            # each choice's own token count is not in the OpenAI reply: the total is split evenly
            # (llama-server replies are counted exactly in `call`)
            share, extra = divmod(output_tokens, n)
            choices = [
                Choice(cls._choice_text(c), share + int(i < extra), c.finish_reason)
                for i, c in enumerate(completion.choices)
            ]
        return Reply(
            text=cls._choice_text(completion.choices[0]),
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=output_tokens,
            finish_reason=completion.choices[0].finish_reason,
            cached_input_tokens=int(getattr(details, "cached_tokens", 0) or 0),
            choices=choices,
        )

    async def _count_llama_server_choices(self, reply: Reply, max_tokens: int) -> Reply:
        """llama-server answers `n` with one task per completion that share the prompt's prefill, but its
        reply's usage is the first task's alone (it keeps only the other tasks' choices). The first choice's
        count is that usage; each other one is max_tokens when cut at the limit, else its text's tokens (the
        server's own /tokenize) plus the stop token it ended on, which llama-server counts as generated."""
        import httpx

        root = str(self.client.base_url).rstrip("/").removesuffix("/v1")
        first = reply.output_tokens

        async def count(http: httpx.AsyncClient, choice: Choice) -> int:
            if choice.finish_reason == "length":
                return max_tokens
            response = await http.post(f"{root}/tokenize", json={"content": choice.text})
            response.raise_for_status()
            return len(response.json()["tokens"]) + 1

        async with httpx.AsyncClient(timeout=self.provider.timeout_s) as http:
            rest = await asyncio.gather(*(count(http, c) for c in reply.choices[1:]))
        counts = [first, *rest]
        choices = [replace(c, output_tokens=k) for c, k in zip(reply.choices, counts, strict=True)]
        return replace(reply, output_tokens=sum(counts), choices=choices)

    async def aclose(self) -> None:
        await self.client.close()


def _llama_server_reply(completion: Any) -> bool:
    """Whether a chat completion came from llama.cpp's server (it adds its `timings` to every reply)."""
    return isinstance(getattr(completion, "model_extra", None) or {}, dict) and "timings" in (
        completion.model_extra or {}
    )


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

    async def call(self, request: ChatRequest) -> Reply:
        kwargs, wrapped = self.request_body(request)
        return self.reply_from(await self.client.messages.create(**kwargs), wrapped)

    @staticmethod
    def reply_from(message: Any, wrapped: bool) -> Reply:
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
        return Reply(
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

    async def call(self, request: ChatRequest) -> Reply:
        contents, config = self.request_body(request)
        response = await self.client.aio.models.generate_content(
            model=self.provider.model, contents=contents, config=config
        )
        return self.reply_from(response)

    @staticmethod
    def reply_from(response: Any) -> Reply:
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
        return Reply(
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


def backend_for(provider: ProviderConfig, api_key: str, embedded_url: str | None) -> Any:
    """The SDK backend of `provider` (the embedded server is reached at `embedded_url`)."""
    p = provider
    if p.kind in ("openai", "openai_compatible"):
        return _OpenAIBackend(p, api_key, p.base_url)
    if p.kind == "embedded":
        return _OpenAIBackend(p, api_key, embedded_url)
    if p.kind == "anthropic":
        return _AnthropicBackend(p, api_key)
    if p.kind == "google":
        return _GoogleBackend(p, api_key)
    # config validation makes this unreachable
    raise ConfigError(f"provider '{p.name}': unknown kind {p.kind!r}")


# --------------------------------------------------------------------------- lanes


@dataclass
class Lane:
    """Everything one provider needs at call time."""

    provider: ProviderConfig
    endpoint: str  # stable description of where calls go (part of the cache key)
    backend: Any = None
    scheduler: RateScheduler | None = None

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        """What identifies `request` sent through this lane: the cache key is the hash of it."""
        p = self.provider
        return {
            "v": 1,
            "kind": p.kind,
            "model": p.model,
            "endpoint": self.endpoint,
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
            **({"n": int(request.n)} if request.n > 1 else {}),
        }
