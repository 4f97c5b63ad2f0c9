"""The records and errors of the service client: requests, results, the raw reply, the pool's counters.

`ChatRequest` / `ChatResult` are what stages hand to and get from `ServicePool`; `Reply` is one provider reply
as the backends read it (text, tokens, finish reason) before it is priced and booked; `NotSent` marks a call
held back because the stage is stopping. `MissingAPIKeyError` and `StageStopped` are the two errors a stage
sees. Also the request checks every pool entry point applies (`validate_request`) and the token estimate the
rate limiter and the budget reservation share (`estimate_tokens`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError

ROLES = ("system", "user", "assistant")


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


class NotSent(Exception):
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
    # The stage's reading of a reply (text -> value; ValueError when the reply is not an answer): fills the
    # result's parsed / parse_error, live, replayed or batched (`parsing.read_reply`). Not part of the request
    # sent nor of its cache key, so a cached reply is read again by today's reader when it is replayed.
    reader: Callable[[str], Any] | None = field(default=None, compare=False, repr=False)
    # Completions of this prompt from ONE request (one prefill; OpenAI's `n`, llama-server's `n_cmpl`). In the
    # request body and the cache key only when > 1; the result then holds all of them in `choices`.
    n: int = 1


@dataclass(frozen=True)
class Choice:
    """One completion of an n > 1 request: its text, its own output tokens and stop reason."""

    text: str
    output_tokens: int
    finish_reason: str | None = None


@dataclass
class ChatResult:
    text: str
    # the request's reading of the reply: its reader's value, else the one JSON value valid against its
    # json_schema (None without either, or when the reply does not read: then parse_error says why)
    parsed: Any | None
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
    # the n completions of an n > 1 request, live or replayed (text is the first); empty for n == 1
    choices: list[Choice] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def texts(self) -> list[str]:
        """Every completion's text: the n choices of an n > 1 request, else [text]."""
        return [c.text for c in self.choices] if self.choices else [self.text]


@dataclass
class Reply:
    """One provider reply as a backend reads it (live or from a batch), before it is priced and booked."""

    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str | None = (
        None  # as the provider spells it: stop / length / max_tokens / MAX_TOKENS / ...
    )
    cached_input_tokens: int = 0  # input tokens the provider served from its prompt cache (billed lower)
    # an n > 1 request's completions (text is the first; input_tokens counts the one prompt, output_tokens all)
    choices: list[Choice] = field(default_factory=list)


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


def estimate_tokens(request: ChatRequest) -> int:
    """Tokens one call may use, known before it is sent: prompt characters / 4 + n x max_tokens (+ 1)."""
    chars = sum(len(m.get("content", "")) for m in request.messages)
    if request.json_schema is not None:
        chars += len(json.dumps(request.json_schema))
    return chars // 4 + int(request.max_tokens) * int(request.n) + 1


def validate_request(request: ChatRequest, index: int) -> None:
    where = f"request {index}"
    if not isinstance(request, ChatRequest):
        raise TypeError(f"{where}: expected a ChatRequest, got {type(request).__name__}")
    if not request.messages:
        raise ValueError(f"{where}: messages is empty; e.g. [{{'role': 'user', 'content': 'Hello'}}]")
    for j, m in enumerate(request.messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"{where}, message {j}: expected {{'role': one of {list(ROLES)}, 'content': str}}, got {m!r}"
            )
    if request.max_tokens < 1:
        raise ValueError(f"{where}: max_tokens must be >= 1, got {request.max_tokens}")
    if request.n < 1:
        raise ValueError(f"{where}: n (completions per request) must be >= 1, got {request.n}")
