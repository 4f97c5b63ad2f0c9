"""The books of one ServicePool: every paid reply, live or from a provider batch, is counted here and only here.

`Accounts` owns the money side of the service client:

- Admission and reservation: `booking(...)` clears a live attempt or a provider batch to go out: not once the
  stage stopped, not a paid live call before its stage's forecast is recorded, and not when its worst case
  (input estimate + all of max_tokens + the reasoning allowance, at list or batch price: `worst_case`) could
  cross a `budget:` cap, counting what the run's ledger already paid and what is on its way. A refused booking
  stops the stage and raises `NotSent`.
- Settlement: the booking is a context manager and is settled when its `with` block is left, on every exit
  path (success, error, cancellation): at what was paid (`Booking.paid`, priced by `price`), at the worst case
  (a timed-out attempt the provider may have billed), at nothing (the default: nothing went out or nothing was
  billed), or kept at the worst case when `committed` (a submitted batch whose bill is still out).
- The ledger: one row per paid reply (`take_reply`, `record_paid`), one per final failure at $0
  (`record_error`), one per timed-out attempt at its estimated cost (`record_timeout`). Only usable replies
  are cached (run and shared cache); unusable ones are ledgered and kept raw in `failed_replies`.
- Fail fast: each real call's outcome feeds the provider's failure window (`_Guard`, which also lets the first
  real call go out alone); too many failures, a fatal error (`stop_if_fatal`) or a budget stop the stage
  (`stop`, `stopped`).
- Replay: `lookup` finds a finished call in the run's cache, else in the project's shared cache (copied into
  the run and noted as reused: paid by an earlier run); `count` keeps the pool's `PoolStats`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..callcache import CachedCall, CallCache, LedgerRow
from ..config import BudgetConfig, ProviderConfig, RunConfig
from ..prices import PriceTable, load_prices
from ..runlayout import RunLayout
from .backends import reasoning_allowance, stop_reason
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
        """Stop the stage (the first reason is kept)."""
        if self.stopped is None:
            self.stopped = reason

    def stop_if_fatal(self, p: ProviderConfig, exc: BaseException, error: str) -> None:
        """Stop the stage at once when `exc` is an auth, permission, quota or model-not-found error."""
        fatal = stop_reason(exc)
        if fatal is not None:
            self.stop(f"{who(p)}: {fatal}: {error}")

    def guard(self, p: ProviderConfig) -> _Guard:
        """The provider's failure window (and first-call probe)."""
        guard = self._guards.get(p.name)
        if guard is None:
            guard = self._guards[p.name] = _Guard(p.failure_window, p.max_failure_share)
        return guard

    def record_failure(self, p: ProviderConfig, where: str = "") -> None:
        """One real call failed: into the provider's failure window, stopping the stage when it holds too many."""
        if (why := self.guard(p).record(False)) is not None:
            self.stop(f"{who(p)}: {where}{why}")

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

    @contextlib.contextmanager
    def booking(
        self,
        p: ProviderConfig,
        requests: Sequence[ChatRequest],
        *,
        batch: bool = False,
        committed: bool = False,
        what: str = "",
    ) -> Iterator[Booking]:
        """Reserve the worst case of `requests` (one live attempt, or every request of a provider batch) and
        settle it when the block is left (see `Booking`).

        Raises `NotSent` when the stage stopped, when a paid live call has no forecast of its stage (that stops
        the stage), or when the worst case could cross a budget cap (that stops the stage; `what` is added to
        the reason). `committed` (a batch an earlier, killed run submitted) books without asking: spending
        already committed must be counted, never refused.
        """
        if not committed:
            if self.stopped is not None:
                raise NotSent(self.stopped)
            # only live calls wait for the stage's forecast; a provider batch is submitted without one
            if not batch and not p.is_free and not self._forecast_recorded():
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
        usd, prompt, output = 0, 0, 0
        for request in requests:
            u, i, o = self.worst_case(p, request, batch=batch)
            usd, prompt, output = usd + u, prompt + i, output + o
        over = self._budget.reserve(usd, prompt + output, force=committed)
        if over is not None:
            self.stop(f"{over}{what}")
            raise NotSent(f"{over}{what}")
        booking = Booking((usd, prompt, output))
        if committed:
            booking.committed()  # its bill is out: the worst case stays booked unless it is paid
        try:
            yield booking
        finally:
            if booking.used is not None:
                self._budget.settle(booking.worst, *booking.used)

    def _forecast_recorded(self) -> bool:
        """Whether the run's calls.sqlite holds a forecast of this pool's stage and cycle (asked until yes)."""
        if not self._has_forecast:
            self._has_forecast = self.cache.has_forecast(self.stage, self.cycle)
        return self._has_forecast

    # ---- the ledger
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
        self.cache.record(self.paid_row(p, key, reply, latency, cost, attempts, error))

    def record_error(self, p: ProviderConfig, key: str, error: str, latency: float, attempts: int) -> None:
        """Ledger a call that failed without a billed reply, at $0."""
        self.cache.record(
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

    def record_timeout(self, p: ProviderConfig, key: str, booking: Booking) -> None:
        """A timed-out attempt: the provider may have computed (and billed) the reply we stopped waiting for,
        so it is settled and ledgered at its worst case."""
        booking.paid_worst_case()
        _, prompt, output = booking.worst
        self.cache.record(
            self._row(
                p,
                key,
                input_tokens=prompt,
                output_tokens=output,
                latency_s=p.timeout_s,
                cost_usd=booking.worst[0],
                ok=False,
                attempts=1,
                error="timeout: cost estimated (input estimate + max_tokens)",
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
            guard.record(True)
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
        if (stop := guard.record(False)) is not None:
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
        """Add one result (cached, paid or failed) to the pool's counters."""
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
