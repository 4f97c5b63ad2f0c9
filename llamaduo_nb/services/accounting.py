"""The books of one ServicePool: every paid reply, live or from a provider batch, is counted here and only here.

`Accounts` owns the money side of the service client:

- Admission and reservation: `booking(...)` (an async context manager) clears a live attempt or a provider
  batch to go out: not once the stage stopped, not a paid call (live or batch) without a price or before its
  stage's forecast is recorded,
  and only while its worst case (input estimate + all of max_tokens + the reasoning allowance, at list or batch
  price: `worst_case`) fits under every `budget:` cap counting what the run's ledger already paid and the worst
  cases on their way. One that would fit once calls on their way settle (they mostly cost far less than their
  worst case) waits for them (`room_freed`); one that could cross a cap even with nothing on its way is refused:
  that stops the stage and raises `NotSent`. A provider batch holds only the requests that fit (`batch_room`).
- Settlement: the booking is settled when its block is left, on every exit path (success, error,
  cancellation): at what was paid (`Booking.paid`, priced by `price`), at the worst case (a timed-out attempt
  the provider may have billed), at nothing (the default: nothing went out or nothing was billed), or kept at
  the worst case when `committed` (a submitted batch whose bill is still out).
- The ledger has a row per HTTP attempt: one per paid reply (`take_reply`, `record_paid`), one per failed live
  attempt (`record_attempt`: at $0, or at its estimated cost when it timed out; `callcache.RETRIED` marks one
  that was retried), one per failure that is no attempt's (`record_error`). Only usable replies are cached (run
  and shared cache); unusable ones are ledgered and kept raw in `failed_replies`.
- Fail fast: each real call's outcome (a call is a request after its retries) feeds the provider's `_Guard`:
  calls go out one at a time until one did not fail provider-side; a dead provider (the last
  `min(failure_window, DEAD_AFTER_CALLS)` calls all failed for provider-side causes, or at the end of a set of
  requests every call did: `stop_if_dead`), too many failures in the window, a fatal error (`stop_if_fatal`) or
  a budget stop the stage (`stop`, `stopped`) with a reason naming the provider and the cause class.
- Replay: `lookup` finds a finished call in the run's cache, else in the project's shared cache (copied into
  the run and noted as reused: paid by an earlier run); `count` keeps the pool's `PoolStats`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..callcache import RETRIED, CachedCall, CallCache, LedgerRow
from ..config import BudgetConfig, ProviderConfig, RunConfig
from ..prices import PriceTable, load_prices
from ..runlayout import RunLayout
from .backends import describe_error, failure_class, reasoning_allowance, stop_reason
from .parsing import answered, cached_text, unusable_reason
from .types import ChatRequest, ChatResult, NotSent, PoolStats, Reply, estimate_tokens


def shared_cache_path(cfg: RunConfig) -> Path:
    """Where the project's shared call cache lives (`cache.path`, default <outputs_dir>/.callcache/calls.sqlite)."""
    if cfg.cache.path:
        return Path(cfg.cache.path)
    return Path(cfg.outputs_dir) / ".callcache" / "calls.sqlite"  # resolved like the run folders are


def who(p: ProviderConfig) -> str:
    """How stop reasons name a provider."""
    return f"provider '{p.name}' ({p.kind}, model {p.model})"


DEAD_AFTER_CALLS = 3  # consecutive calls failed provider-side (each after its retries): the provider is dead
UNUSABLE = "unusable replies"  # answered, but not an answer (empty, truncated, refused, blocked)
# an error that is not the provider's (e.g. HTTP 400: the request was malformed)
REJECTED = "requests rejected"


def _tally(causes: Sequence[str]) -> str:
    """ "rate limited (HTTP 429) x3, server errors (HTTP 5xx) x1" (most frequent first)."""
    return ", ".join(f"{cause} x{n}" for cause, n in collections.Counter(causes).most_common())


@dataclass
class _Guard:
    """Fail-fast bookkeeping of one provider in one pool.

    A call is one request after its retries. The first real call goes out alone (a revoked key costs one call,
    not `max_concurrency`), and so does each next one until a call did not fail provider-side (`admit`); not for
    a server this process started and checked (`probe_first_call: false`; the pool sets it for the embedded
    kind). Two
    rules stop the stage:

    - dead provider: the last `min(failure_window, DEAD_AFTER_CALLS)` calls all failed for a provider-side cause
      (rate limit, server errors, timeouts, connection errors; auth, quota and unknown models stop at once
      anyway), or, at the end of a set of requests (`dead`), every call of this pool so far did, in at least
      that many attempts together (a stage of one call retried twice stops; one failed attempt does not).
      Any other outcome (an answer, even an unusable one; a request the provider rejected) resets it: a
      healthy stage is not stopped by a blip. The window is a ceiling, not a floor: a stage smaller than it
      stops too.
    - failure share: more than `max_failure_share` of the last `failure_window` calls failed, for any cause.

    `max_failure_share: 1` switches both off (the provider is never stopped for failing; its calls still go
    out one at a time while every call failed).
    """

    window: int
    max_share: float
    outcomes: collections.deque = field(default_factory=collections.deque)  # None (answered) or a cause
    calls: int = 0  # real calls recorded in this pool
    streak: list[str] = field(default_factory=list)  # causes of the consecutive provider-side failures
    streak_attempts: int = 0
    last_error: str = ""
    opened: bool = False  # a call was answered (or rejected by the provider): calls no longer go out alone
    probing: bool = False  # a probe is on its way
    turn: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) when a probe ends

    async def admit(self) -> bool:
        """True when the call goes out alone (a probe): the first real call, and each next one while every call
        so far failed for a provider-side cause; the others wait for the probe's outcome. A dead provider thus
        costs `min(failure_window, DEAD_AFTER_CALLS)` calls (each with its retries), not what concurrency
        would have sent meanwhile."""
        while not self.opened:
            if not self.probing:
                self.probing = True
                return True
            await self.turn.wait()
        return False

    def probed(self) -> None:
        """The probe has its outcome (recorded): open the gate unless it failed provider-side like all before."""
        self.probing = False
        if self.calls > len(self.streak):
            self.opened = True
        turn, self.turn = self.turn, asyncio.Event()
        turn.set()

    def record(
        self, cause: str | None, provider_side: bool = False, attempts: int = 1, error: str = ""
    ) -> str | None:
        """Add one real call's outcome (`cause` None: answered); a reason to stop the stage, or None."""
        self.calls += 1
        self.outcomes.append(cause)
        while len(self.outcomes) > self.window:
            self.outcomes.popleft()
        if cause is not None and provider_side:
            self.streak.append(cause)
            self.streak_attempts += attempts
            self.last_error = error
        else:
            self.streak.clear()
            self.streak_attempts = 0
        if self.max_share >= 1:
            return None
        if len(self.streak) >= min(self.window, DEAD_AFTER_CALLS):
            return self._dead_reason(f"the last {len(self.streak)} calls all failed")
        failed = [c for c in self.outcomes if c is not None]
        if len(self.outcomes) >= self.window and len(failed) / len(self.outcomes) > self.max_share:
            return (
                f"{len(failed)} of the last {len(self.outcomes)} calls failed "
                f"(more than max_failure_share={self.max_share:g} of failure_window={self.window}): "
                f"{_tally(failed)}"
            )
        return None

    def dead(self) -> str | None:
        """At the end of a set of requests: a reason when every real call of this pool so far failed for a
        provider-side cause, in `min(failure_window, DEAD_AFTER_CALLS)` attempts or more (a stage smaller than
        the window stops too), else None."""
        if self.max_share >= 1 or not self.streak or len(self.streak) != self.calls:
            return None
        if self.streak_attempts < min(self.window, DEAD_AFTER_CALLS):
            return None  # one or two failed attempts in all: too little to call the provider dead
        return self._dead_reason(f"every call so far failed ({len(self.streak)} of {self.calls})")

    def _dead_reason(self, what: str) -> str:
        causes = sorted(set(self.streak), key=self.streak.index)
        return (
            f"{' and '.join(causes)}: {what} after their retries ({self.streak_attempts} attempts; "
            f"{_tally(self.streak)}); last error: {self.last_error}"
        )


class _Budget:
    """Spending caps of `budget:` against what the run's ledger already paid (`spent`) plus the worst cases of
    the calls on their way (`held`, `open` bookings).

    A booking's worst case (input estimate + max_tokens, at list price) is held until the call returns; then
    it is replaced by the real cost (`settle`).
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
        self.spent = {
            k: [
                sum(float(r["cost_usd"]) for r in rows if scopes[k][2](r)),
                sum(int(r["input_tokens"]) + int(r["output_tokens"]) for r in rows if scopes[k][2](r)),
            ]
            for k in self.caps
        }
        self.held = [0.0, 0]  # worst cases of the bookings not settled yet (the same in every scope)
        self.open = 0  # how many bookings are not settled yet

    def over(self, usd: float, tokens: int, in_flight: bool = True) -> str | None:
        """Why a call of this worst case could cross a cap (counting the calls on their way unless not
        `in_flight`), or None when it fits."""
        held_usd, held_tokens = self.held if in_flight else (0.0, 0)
        way = " or on its way" if in_flight and self.open else ""
        for scope, (cap_usd, cap_tokens) in self.caps.items():
            used_usd, used_tokens = self.spent[scope][0] + held_usd, self.spent[scope][1] + held_tokens
            if cap_usd is not None and used_usd + usd > cap_usd + 1e-12:
                return (
                    f"budget.{scope}_usd={cap_usd:g} reached: ${used_usd:.4f} spent{way}, and the next "
                    f"call may cost up to ${usd:.4f}"
                )
            if cap_tokens is not None and used_tokens + tokens > cap_tokens:
                return (
                    f"budget.{scope}_tokens={cap_tokens} reached: {used_tokens} tokens used{way}, and "
                    f"the next call may use up to {tokens}"
                )
        return None

    def hold(self, usd: float, tokens: int) -> None:
        """Book a call's worst case (checked by the caller, or committed spending that must be counted)."""
        self.held[0] += usd
        self.held[1] += tokens
        self.open += 1

    def settle(self, booked: tuple[float, int, int], used: tuple[float, int] | None) -> None:
        """Replace a booking (USD, input, output tokens) by what the call really used; `used` None: the
        booking stays held (a submitted batch whose bill is still out)."""
        if used is None:
            return
        self.held[0] -= booked[0]
        self.held[1] -= booked[1] + booked[2]
        self.open -= 1
        for scope in self.caps:
            self.spent[scope][0] += used[0]
            self.spent[scope][1] += used[1]


class Booking:
    """One reservation against the budgets: the worst case of one live attempt or of one provider batch.

    Made by `Accounts.booking`, which settles it when the `with` block is left, however it is left: at what
    was `paid`, at the worst case (`paid_worst_case`: a timed-out attempt the provider may have billed), at
    nothing (the default: nothing went out, or the provider bills nothing), or not at all when `committed`
    and never paid (a submitted batch whose bill is still out keeps its worst case booked).
    """

    def __init__(self, worst: tuple[float, int, int]):
        self.worst = worst  # (USD, input tokens, output tokens)
        self.used: tuple[float, int] | None = (
            0.0,
            0,
        )  # (USD, tokens) to settle at; None: keep the worst case

    def paid(self, usd: float, tokens: int) -> None:
        """Settle at what the provider billed."""
        self.used = (usd, tokens)

    def paid_worst_case(self) -> None:
        """Settle at the worst case: the provider may have billed all of it."""
        self.used = (self.worst[0], self.worst[1] + self.worst[2])

    def committed(self) -> None:
        """The money is out of our hands (a submitted batch): keep the worst case booked unless `paid` follows."""
        self.used = None


class Accounts:
    """The books of one pool (stage, cycle): budgets, ledger, caches, failure windows, stop, counters.

    Open between `open` and `close` (the pool's `with` block); `stopped` and `stats` outlive it.
    """

    def __init__(self, stage: str, cycle: int | None, layout: RunLayout):
        self.stage, self.cycle, self.layout = stage, cycle, layout
        self.stats = PoolStats()
        self.stopped: str | None = None  # why the stage stopped sending (None while it goes on)
        self.cache: CallCache | None = None
        self.shared: CallCache | None = None
        self.prices: PriceTable | None = None
        self._budget: _Budget | None = None
        self._guards: dict[str, _Guard] = {}
        self._room = asyncio.Event()  # set (and replaced) whenever a booking settles or the stage stops
        self._has_forecast = False  # a forecast of (stage, cycle) is recorded: paid calls may go out
        self._secrets: list[str] = []
        self._stats_lock = threading.Lock()

    # ---- lifecycle
    def open(self, cfg: RunConfig, secrets: Sequence[str]) -> None:
        """Start the books: price table, run cache, shared cache, budgets from the run's ledger."""
        self.stopped = None  # a reopened pool (e.g. after the key was fixed) starts sending again
        self._secrets = sorted(set(secrets), key=len, reverse=True)
        self.prices = load_prices(cfg.prices_file)
        self.cache = CallCache(self.layout.calls_db)
        if cfg.cache.shared:
            self.shared = CallCache(shared_cache_path(cfg))
        self._budget = _Budget(cfg.budget, self.cache.ledger_rows(), self.stage, self.cycle)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        if self.shared is not None:
            self.shared.close()
            self.shared = None
        self._guards.clear()
        self._secrets = []

    # ---- stopping
    def stop(self, reason: str) -> None:
        """Stop the stage (the first reason is kept); calls waiting for budget room give up."""
        if self.stopped is None:
            self.stopped = reason
            self._free_room()

    def stop_if_fatal(self, p: ProviderConfig, exc: BaseException, error: str) -> None:
        """Stop the stage at once when `exc` is an auth, permission, quota or model-not-found error."""
        fatal = stop_reason(exc)
        if fatal is not None:
            self.stop(f"{who(p)}: {fatal}: {error}")

    def guard(self, p: ProviderConfig) -> _Guard:
        """The provider's failure window (and first-call probe)."""
        guard = self._guards.get(p.name)
        if guard is None:
            opened = not p.probe_first_call  # a server started here answered its check (the pool says so)
            guard = self._guards[p.name] = _Guard(p.failure_window, p.max_failure_share, opened=opened)
        return guard

    def record_failure(
        self,
        p: ProviderConfig,
        exc: BaseException | None,
        error: str,
        attempts: int = 1,
        where: str = "",
        live: bool = True,
    ) -> None:
        """One real call failed (after its retries) with `exc`: into the provider's failure window, stopping
        the stage when the provider is dead or the window holds too many failures. An errored item of a
        provider batch (not `live`: never retried, judged per batch by `batches`) counts in the window only."""
        cause = failure_class(exc) if exc is not None else None
        why = self.guard(p).record(cause or REJECTED, live and cause is not None, attempts, error)
        if why is not None:
            self.stop(f"{who(p)}: {where}{why}")

    def stop_if_dead(self, p: ProviderConfig) -> None:
        """At the end of a set of requests: stop the stage when every real call to `p` in this pool failed
        for a provider-side cause, however few calls that was."""
        guard = self._guards.get(p.name)
        if guard is not None and (why := guard.dead()) is not None:
            self.stop(f"{who(p)}: {why}")

    def redact(self, text: str) -> str:
        """`text` without the pool's API keys (errors are ledgered and shown)."""
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        # some providers echo a masked key ("Incorrect API key provided: sk-...abcd"); drop even that
        return re.sub(r"(?i)(api[ _-]?key[^:]{0,20}:)\s*\S+", r"\1 [redacted]", text)

    # ---- money
    def price(self, p: ProviderConfig, reply: Reply, batch: bool = False) -> float:
        """What `reply` cost (prompt-cached input billed lower, the batch discount for a batch's reply)."""
        return self.prices.cost(
            p.kind,
            p.model,
            reply.input_tokens,
            reply.output_tokens,
            free=p.is_free,
            cached_input_tokens=reply.cached_input_tokens,
            batch=batch,
        )

    def worst_case(
        self, p: ProviderConfig, request: ChatRequest, batch: bool = False
    ) -> tuple[float, int, int]:
        """(USD, input tokens, output tokens) one attempt can cost at most: input estimate + all of max_tokens
        (at the batch price when it goes in a provider batch)."""
        prompt = estimate_tokens(request) - int(request.max_tokens) * request.n - 1
        output = (int(request.max_tokens) + reasoning_allowance(p)) * request.n
        usd = self.prices.cost(p.kind, p.model, prompt, output, free=p.is_free, batch=batch)
        return usd, prompt, output

    def _worst_of(
        self, p: ProviderConfig, requests: Sequence[ChatRequest], batch: bool
    ) -> tuple[float, int, int]:
        usd, prompt, output = 0.0, 0, 0
        for request in requests:
            u, i, o = self.worst_case(p, request, batch=batch)
            usd, prompt, output = usd + u, prompt + i, output + o
        return usd, prompt, output

    def _admissible(self, p: ProviderConfig, batch: bool) -> None:
        """Raise `NotSent` when the stage stopped, or when a paid call (live or batch) has no price or no
        forecast (either stops the stage)."""
        if self.stopped is not None:
            raise NotSent(self.stopped)
        if not p.is_free and self.prices.lookup(p.model) is None:
            # config validation refuses this; a provider built or priced otherwise must not cost $0 by accident
            why = f"no call sent: {self.prices.missing_advice(p)}"
            self.stop(why)
            raise NotSent(why)
        # live calls and provider batches alike: no paid request goes out before its stage's forecast
        if not p.is_free and not self._forecast_recorded():
            why = (
                f"no forecast recorded for {self.stage}"
                + (f" (cycle {self.cycle})" if self.cycle is not None else "")
                + f" in {self.layout.calls_db}: no paid call goes out before its stage's forecast. `llamaduo"
                " run` records it before each paid notebook; run the notebook's forecast cell first"
                " (`forecast.forecast_stage(cfg, notebook_stage, cycle, layout)`; 04_evaluate covers Table"
                " 1's baselines, 05_synthesize the teacher study)"
            )
            self.stop(why)
            raise NotSent(why)

    async def room_freed(self) -> None:
        """Wait until a booking is settled or the stage stops (then the budgets may admit more)."""
        await self._room.wait()

    def _free_room(self) -> None:
        self._room.set()
        self._room = asyncio.Event()

    def batch_room(self, p: ProviderConfig, requests: Sequence[ChatRequest]) -> tuple[int, bool]:
        """(how many of `requests`, from the first, one provider batch may hold now without crossing a cap
        given what is on its way; whether any booking is on its way). Everything fits without a cap."""
        if not self._budget.caps:
            return len(requests), self._budget.open > 0
        usd, tokens = 0.0, 0
        for n, request in enumerate(requests):
            u, i, o = self.worst_case(p, request, batch=True)
            if self._budget.over(usd + u, tokens + i + o) is not None:
                return n, self._budget.open > 0
            usd, tokens = usd + u, tokens + i + o
        return len(requests), self._budget.open > 0

    @contextlib.asynccontextmanager
    async def booking(
        self,
        p: ProviderConfig,
        requests: Sequence[ChatRequest],
        *,
        batch: bool = False,
        committed: bool = False,
        what: str = "",
    ) -> AsyncIterator[Booking]:
        """Reserve the worst case of `requests` (one live attempt, or every request of a provider batch) and
        settle it when the block is left (see `Booking`).

        Admission against the budgets: a booking whose worst case fits under every cap given what was spent
        and what is on its way goes out; one that would fit only once calls on their way have settled waits
        for them (they usually cost far less than their worst case); one that could cross a cap even with
        nothing on its way is refused. Raises `NotSent` when the stage stopped, when a paid call (live or a
        provider batch) has no forecast of its stage (that stops the stage), or when refused by a budget (that stops the stage;
        `what` is added to the reason). `committed` (a batch an earlier, killed run submitted) books without
        asking: spending already committed must be counted, never refused.
        """
        worst = self._worst_of(p, requests, batch)
        usd, tokens = worst[0], worst[1] + worst[2]
        if not committed:
            self._admissible(p, batch)
            while (over := self._budget.over(usd, tokens)) is not None:
                if not self._budget.open or self._budget.over(usd, tokens, in_flight=False) is not None:
                    over = self._budget.over(usd, tokens, in_flight=False) or over
                    self.stop(f"{over}{what}")
                    raise NotSent(f"{over}{what}")
                await self.room_freed()  # calls on their way settle below their worst case: ask again then
                self._admissible(p, batch)
        self._budget.hold(usd, tokens)
        booking = Booking(worst)
        if committed:
            booking.committed()  # its bill is out: the worst case stays booked unless it is paid
        try:
            yield booking
        finally:
            self._budget.settle(booking.worst, booking.used)
            if booking.used is not None:
                self._free_room()

    def _forecast_recorded(self) -> bool:
        """Whether the run's calls.sqlite holds a forecast of this pool's stage and cycle (asked until yes)."""
        if not self._has_forecast:
            self._has_forecast = self.cache.has_forecast(self.stage, self.cycle)
        return self._has_forecast

    # ---- the ledger
    def _ledger(self, row: LedgerRow) -> None:
        """Write one ledger row and count its cost: the pool's spend (`stats.cost_usd`, the progress bar, the
        per-provider figures) is the sum of its ledger rows, re-sent unusable replies and timed-out attempts
        included."""
        self.cache.record(row)
        with self._stats_lock:
            self.stats.cost_usd += row.cost_usd
            self._provider_stats(row.provider)["cost_usd"] += row.cost_usd

    def _provider_stats(self, provider: str) -> dict[str, float]:
        return self.stats.by_provider.setdefault(
            provider, {"requests": 0, "cache_hits": 0, "failures": 0, "cost_usd": 0.0}
        )

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

    def paid_row(
        self,
        p: ProviderConfig,
        key: str,
        reply: Reply,
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

    def record_paid(
        self,
        p: ProviderConfig,
        key: str,
        reply: Reply,
        latency: float,
        cost: float,
        attempts: int,
        error: str | None,
    ) -> None:
        """Ledger one paid reply."""
        self._ledger(self.paid_row(p, key, reply, latency, cost, attempts, error))

    def record_error(self, p: ProviderConfig, key: str, error: str, latency: float, attempts: int) -> None:
        """Ledger a call that failed without a billed reply, at $0."""
        self._ledger(
            self._row(
                p,
                key,
                input_tokens=0,
                output_tokens=0,
                latency_s=latency,
                cost_usd=0.0,
                ok=False,
                error=error,
                attempts=attempts,
            )
        )

    def record_attempt(
        self,
        p: ProviderConfig,
        key: str,
        booking: Booking,
        exc: BaseException,
        attempt: int,
        latency: float,
        retried: bool,
    ) -> None:
        """Ledger one live HTTP attempt that failed (every attempt has its row, so the ledger explains the time
        spent): `attempts` holds its number within the call, `error` starts with `RETRIED` when the call tries
        again (unless the stage stops first: then its next attempt is never sent). At $0, except a timed-out attempt: the provider may have computed (and billed) the reply we
        stopped waiting for, so it is settled and ledgered at its worst case (input estimate + max_tokens)."""
        timed_out = isinstance(exc, TimeoutError | asyncio.TimeoutError)
        prefix = RETRIED if retried else ""
        if timed_out:
            booking.paid_worst_case()
            usd, prompt, output = booking.worst
            error = "timeout: cost estimated (input estimate + max_tokens)"
        else:
            usd, prompt, output = 0.0, 0, 0
            error = self.redact(describe_error(exc))
        self._ledger(
            self._row(
                p,
                key,
                input_tokens=prompt,
                output_tokens=output,
                latency_s=p.timeout_s if timed_out else latency,
                cost_usd=usd,
                ok=False,
                attempts=attempt,
                error=f"{prefix}{error}",
            )
        )

    def take_reply(
        self,
        p: ProviderConfig,
        request: ChatRequest,
        key: str,
        payload: dict,
        reply: Reply,
        latency: float,
        attempts: int,
        cost: float,
    ) -> tuple[ChatResult, bool]:
        """Ledger and (when usable) cache one paid reply, live or from a provider batch, priced at `cost`.

        Returns the result and whether re-sending the request may help (an unusable but not truncated reply).
        """
        guard = self.guard(p)
        unusable = unusable_reason(reply, request.max_tokens, request.allow_truncated)
        if unusable is None:
            guard.record(None)
            text = cached_text(reply)  # n completions: all of them
            self.cache.put(key, payload, text, reply.input_tokens, reply.output_tokens, latency, cost)
            if self.shared is not None:
                self.shared.put(key, payload, text, reply.input_tokens, reply.output_tokens, latency, cost)
            self.record_paid(p, key, reply, latency, cost, attempts, error=None)
            result = answered(
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
                reply.choices,
            )
            return result, False
        why, worth_resending = unusable
        # paid but not an answer: ledger it, keep the raw reply, never cache it
        self.record_paid(p, key, reply, latency, cost, attempts, error=why)
        self.cache.record_failed_reply(
            self.stage, self.cycle, p.name, p.model, key, payload, reply.text, reply.finish_reason, why
        )
        if (stop := guard.record(UNUSABLE)) is not None:
            self.stop(f"{who(p)}: {stop}")
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
            reply.choices,
        )
        return failed, worth_resending

    # ---- replay and counters
    def lookup(self, p: ProviderConfig, key: str, payload: dict) -> CachedCall | None:
        """The cached answer of `key`: this run's cache, else the project's shared cache (noted as reused)."""
        hit = self.cache.get(key)
        if hit is None and self.shared is not None:
            hit = self.shared.get(key)
            if (
                hit is not None
            ):  # paid by an earlier run of the project: copy it into this run, note the reuse
                self.cache.put(
                    key, payload, hit.text, hit.input_tokens, hit.output_tokens, hit.latency_s, hit.cost_usd
                )
                self.cache.record_reuse(self.stage, self.cycle, p.name, p.model, key, hit.cost_usd)
                with self._stats_lock:
                    self.stats.reused += 1
        return hit

    def note_not_sent(self) -> None:
        with self._stats_lock:
            self.stats.not_sent += 1

    def count(self, provider: str, result: ChatResult) -> ChatResult:
        """Add one result (cached, paid or failed) to the pool's counters (its cost was counted when ledgered)."""
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
            row = self._provider_stats(provider)
            row["requests"] += 1
            row["cache_hits"] += int(result.cached)
            row["failures"] += int(result.error is not None)
        return result
