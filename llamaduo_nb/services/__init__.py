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
1a. Admission: the first real call to a provider goes out alone (a revoked key costs one call), and so does
   each next one while every call so far failed provider-side; a call is sent only while the stage has not
   stopped and its worst case (input estimate + max_tokens at list price) fits under every `budget:` cap,
   counting what the run's ledger already paid and the worst cases on their way. A call that fits only once
   those settle waits for them; one that could cross a cap with nothing on its way stops the stage. A paid call (any
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
4. Ledger: one row per HTTP attempt with tokens, latency and cost: the answer, each failed attempt at $0
   (one that was retried says so: `callcache.RETRIED`), a timed-out attempt at its estimated cost, an
   unusable reply at its price; `<run>/ledger.csv` is re-exported when the pool closes.
5. Usable replies only: an empty, truncated (finish_reason length), refused or blocked reply is never
   cached as an answer; it is ledgered (it was paid), kept raw in `failed_replies`, re-sent up to
   `unusable_retries` times (not when truncated: the same request would be cut again) and returned with
   `.error` set.
6. Fail fast: an authentication or permission error, an exhausted quota or credit, or a model that does
   not exist stops the stage at once (never retried); so does a dead provider (a call is a request after its
   retries: the last min(failure_window, 3) calls all failed for provider-side causes - rate limit, server
   errors, timeouts, connection errors - or, at the end of `complete_many`, every call so far did, in 3
   attempts or more, however small the stage), a failure share above `max_failure_share` over the last
   `failure_window` real calls, or a budget. Calls still queued are not sent (nor do they wait for a turn
   under the rate limits first), and `complete_many` raises `StageStopped` naming the provider and the cause;
   the runner records the stage as "stopped" and `llamaduo run --resume` continues it (answered calls replay
   for free).
7. Provider batches: for a provider with `batch: true`, steps 2-3 are replaced by the provider's batch API
   (batches.py): the uncached requests go out as batches, their ids persisted before polling, and each result
   goes through steps 4-6 like a live reply, priced at the batch discount.

Steps 1a and 4-6 are the books of the pool, kept by one object for live calls and provider batches alike
(`accounting.Accounts`): each live attempt and each batch is booked (worst case reserved against the budgets)
before it goes out and settled on every way out; a change to how money is counted is made there.

Structured output: `json_mode: schema` asks the provider to enforce the schema (OpenAI-shaped
servers: `response_format` json_schema, which the embedded server turns into a llama.cpp grammar, see
embedded.py; Anthropic: a forced tool whose input_schema is the schema; Google: JSON mime type +
`response_json_schema`). `object` asks for any JSON object and `none` asks nothing of the API; in
both the schema is stated in the system prompt. Either way the reply text is read by one rule
(`parsing.read_one`: the JSON value the reader wants, anywhere in the text; quoted examples and
placeholders are never the answer; several differing candidates are a failure): by the request's own
`reader` when it carries one (the judge, the reward judge and the pair generator do), else as the one value
valid against the schema. The reading fills `parsed`; a failure sets `parse_error`, it never raises.

Anthropic: SDK 2.x speaks API version 2026-10-21, which has no temperature/top_p; they are not sent
(the model samples at its own setting, so M repeats still differ).

Keys come only from environment variables (`ProviderConfig.api_key_env`, else the provider's usual
name); a missing key is an error when the pool is entered, before any call. Keys live only inside the
SDK clients in memory: they are not part of cache keys, rows, errors or files.

Jupyter: the pool runs its own event loop in a worker thread; `complete_many` is a plain blocking
call that works whether or not the caller's thread already runs a loop, and `acomplete` can be
awaited from any loop.

The modules (each imports only those listed before it):

- `types`: ChatRequest, ChatResult (an n > 1 request's `Choice`s), the raw `Reply`, PoolStats, StageStopped,
  MissingAPIKeyError, NotSent
- `parsing`: find_json / extract_json, `read_one` (the one rule that reads a reply's answer), parse_structured,
  unusable_reason, the result of a usable reply (read by the request's reader; n completions cached as one list)
- `backends`: the OpenAI / Anthropic / Google backends, `Lane`, api_key_for, error classification and retry waits
- `accounting`: `Accounts`, the one object that books every paid reply (budgets, ledger, cache writes, fail fast)
- `batches`: provider batch APIs, run with a lane and the pool's `Accounts`
- `pool`: `ServicePool` (lanes, scheduling, cache lookup, live calls, the embedded server)
"""

from .accounting import shared_cache_path
from .backends import (
    KEY_ENV_DEFAULTS,
    LOCAL_DUMMY_KEY,
    REASONING_ALLOWANCE,
    api_key_for,
    is_retryable,
    retry_after_seconds,
    stop_reason,
)
from .batches import BATCH_LIMITS, BatchBook, BatchStatus, ItemError
from .parsing import (
    extract_json,
    find_json,
    is_placeholder,
    json_spans,
    parse_structured,
    read_one,
    unusable_reason,
)
from .pool import EMBEDDED_N_CTX, EMBEDDED_PARALLEL, ServicePool
from .types import ChatRequest, ChatResult, Choice, MissingAPIKeyError, PoolStats, StageStopped

__all__ = [
    "BATCH_LIMITS",
    "EMBEDDED_N_CTX",
    "EMBEDDED_PARALLEL",
    "KEY_ENV_DEFAULTS",
    "LOCAL_DUMMY_KEY",
    "REASONING_ALLOWANCE",
    "BatchBook",
    "BatchStatus",
    "ChatRequest",
    "ChatResult",
    "Choice",
    "ItemError",
    "MissingAPIKeyError",
    "PoolStats",
    "ServicePool",
    "StageStopped",
    "api_key_for",
    "extract_json",
    "find_json",
    "is_placeholder",
    "is_retryable",
    "json_spans",
    "parse_structured",
    "read_one",
    "retry_after_seconds",
    "shared_cache_path",
    "stop_reason",
    "unusable_reason",
]
