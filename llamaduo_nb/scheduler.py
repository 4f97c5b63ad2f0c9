"""Per-provider call scheduling: fill a provider's RPM/TPM limits without ever going over them.

One `RateScheduler` per provider lane (services.ServicePool owns them). Every HTTP attempt does

    slot = await scheduler.acquire(estimated_tokens)   # waits for cooldown, rate budget, a concurrency slot
    ... the call ...
    scheduler.release(slot, latency_s)                 # feeds the latency estimate that sizes concurrency

and a 429 calls `scheduler.rate_limited(retry_after_s)`, which pauses the whole provider.

How the limits hold:

- Sliding window. The send times (and token estimates) of the last `period_s` seconds are kept; a
  request goes out only when the window holds fewer than `rpm` requests and `tpm` tokens after it.
  So no window of `period_s` - the provider's minute - ever carries more than the limit, including the
  first one (aiolimiter's leaky bucket starts full and lets a whole minute's budget out at once).
- Pacing. On top of the window, a token bucket refilled at rpm/period (and tpm/period) with room
  for one second's worth spreads sends evenly, so a provider that also checks shorter intervals
  (OpenAI quantises RPM to per-second buckets) never sees a spike.
- Concurrency follows latency. Throughput = in-flight calls / latency (Little's law), so the number
  of calls allowed in flight is `headroom x rate x latency` plus a floor, where latency is the larger
  of the recent average (EWMA) and the age of the oldest call still in flight. While latency is
  unknown the oldest call's age grows with the clock, so the cap never binds before the rate does;
  20-40 s synthesis calls at 500 RPM get ~250 calls in flight, 0.5 s judge calls ~10. `max_concurrency`
  is an optional hard cap for servers with few slots (a local llama.cpp server).
- 429. `rate_limited()` sets a cooldown shared by every caller of the provider: the server's
  `retry-after` when it gave one, else an exponential step per consecutive 429. Waiting callers
  resume through the pacing bucket (emptied by the 429), so retries go out spread, not in lockstep.
  Other retryable errors (5xx, timeouts, dropped connections) wait `backoff_s()`: exponential with
  full jitter (tenacity's wait_random_exponential), per call.

Send order is first come, first served (one asyncio.Lock gates the budget), so a long batch cannot
starve a short one and results never depend on who waited.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import tenacity

BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0
RETRY_AFTER_CAP_S = 300.0
COOLDOWN_STEP_MAX_S = 60.0
# the window we keep is longer than the provider's by 1 % (at least 0.5 s): a request reaches the server a
# little after we count it sent, and that delay varies (new connections, a busy CPU)
WINDOW_SAFETY = 0.01
WINDOW_SAFETY_MIN_S = 0.5
LATENCY_EWMA_ALPHA = 0.2
HEADROOM = 1.5  # concurrency allowed beyond rate x latency (latency varies call to call)
MIN_CONCURRENCY = 4
_POLL_S = 0.05  # how often a caller blocked only by concurrency re-checks (the cap grows with in-flight age)
_GIVE_UP_POLL_S = 0.25  # how often a caller that may give up (`acquire(give_up=...)`) asks while it waits


class GaveUp(Exception):
    """`acquire` stopped waiting because its caller's `give_up()` said so; nothing was counted as sent."""


@dataclass(frozen=True)
class Slot:
    """One acquired permission to send: released with the attempt's latency."""

    id: int
    tokens: int
    sent_at: float


@dataclass
class SchedulerStats:
    sent: int = 0
    rate_limited: int = 0  # 429s reported
    max_in_flight: int = 0
    waited_s: float = 0.0  # total time callers spent in acquire()
    cooldowns: list[tuple[float, float]] = field(default_factory=list)  # (start, seconds)


class _Bucket:
    """Token bucket with room for `capacity`, refilled at `rate` per second, starting full.

    A cost above the capacity is allowed once the bucket is full (it goes into debt), so one large
    request is never blocked forever.
    """

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate, self.capacity = rate, capacity
        self.level, self.updated = capacity, now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_s(self, cost: float, now: float) -> float:
        self._refill(now)
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float, now: float) -> None:
        self._refill(now)
        self.level -= cost

    def empty(self, now: float) -> None:
        self._refill(now)
        self.level = min(self.level, 0.0)


class RateScheduler:
    """RPM + TPM limits, latency-sized concurrency and a shared 429 cooldown for one provider.

    `period_s` is the limits' window (60 s: "per minute"); benchmarks and tests shrink it to run
    a minute's behaviour in seconds. `clock` must be monotonic seconds.
    """

    def __init__(
        self,
        rpm: int,
        tpm: int,
        *,
        max_concurrency: int | None = None,
        period_s: float = 60.0,
        min_concurrency: int = MIN_CONCURRENCY,
        headroom: float = HEADROOM,
        clock: Callable[[], float] = time.monotonic,
    ):
        if rpm < 1 or tpm < 1:
            raise ValueError(f"rpm and tpm must be >= 1, got rpm={rpm}, tpm={tpm}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency}")
        self.rpm, self.tpm, self.period_s = rpm, tpm, float(period_s)
        self.max_concurrency = max_concurrency
        self.min_concurrency, self.headroom = min_concurrency, headroom
        self._clock = clock
        now = clock()
        per_second = self.period_s / 60.0  # "one second's worth" in the (possibly scaled) period
        self._requests = _Bucket(rpm / self.period_s, max(1.0, rpm / 60.0 * per_second), now)
        self._tokens = _Bucket(tpm / self.period_s, max(1.0, tpm / 60.0 * per_second), now)
        self._window: deque[tuple[float, int]] = deque()  # (sent_at, tokens) within the window
        self._window_tokens = 0
        self._window_s = self.period_s + max(WINDOW_SAFETY * self.period_s, WINDOW_SAFETY_MIN_S)
        self._in_flight: dict[int, float] = {}  # slot id -> sent_at, oldest first
        self._latency: float | None = None
        self._cooldown_until = now
        self._consecutive_429 = 0
        self._ids = itertools.count()
        self._gate: asyncio.Lock | None = None
        self._freed: asyncio.Event | None = None
        self._backoff = tenacity.wait_random_exponential(multiplier=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S)
        self.stats = SchedulerStats()

    # ---- what limits the next send
    def concurrency_limit(self, now: float | None = None) -> int:
        """Calls allowed in flight now: headroom x rate x latency (+ floor), under the hard cap."""
        now = self._clock() if now is None else now
        latency = self._latency or 0.0
        if self._in_flight:
            latency = max(latency, now - next(iter(self._in_flight.values())))
        rate = (
            min(self.rpm, self.tpm) / self.period_s
        )  # requests per second at most (a request costs >= 1 token)
        limit = self.min_concurrency + math.ceil(self.headroom * rate * latency)
        return limit if self.max_concurrency is None else min(limit, self.max_concurrency)

    def _expire(self, now: float) -> None:
        while self._window and self._window[0][0] <= now - self._window_s:
            _, tokens = self._window.popleft()
            self._window_tokens -= tokens

    def _window_wait_s(self, tokens: int, now: float) -> float:
        self._expire(now)
        wait = 0.0
        if len(self._window) >= self.rpm:
            wait = self._window[len(self._window) - self.rpm][0] + self._window_s - now
        excess = self._window_tokens + tokens - self.tpm
        if excess > 0:  # wait until enough of the oldest sends leave the window
            freed = 0
            for sent_at, used in self._window:
                freed += used
                if freed >= excess:
                    wait = max(wait, sent_at + self._window_s - now)
                    break
        return max(wait, 0.0)

    def wait_s(self, tokens: int, now: float | None = None) -> float:
        """Seconds until a request of `tokens` may go out by rate alone (0: now)."""
        now = self._clock() if now is None else now
        return max(
            self._cooldown_until - now,
            self._window_wait_s(tokens, now),
            self._requests.wait_s(1, now),
            self._tokens.wait_s(tokens, now),
        )

    # ---- acquire / release
    async def acquire(self, tokens: int, give_up: Callable[[], bool] | None = None) -> Slot:
        """Wait (first come, first served) until a request of `tokens` may be sent; count it as sent.

        `give_up()` is asked while the caller waits (at least every 0.25 s); when it says so, `GaveUp` is raised
        and the request takes no room in the limits (a stopped stage's queued calls leave at once instead of
        each waiting for its turn under the rate limit).
        """
        tokens = max(1, min(int(tokens), self.tpm))
        if self._gate is None:  # created lazily: bound to the loop that first uses them
            self._gate, self._freed = asyncio.Lock(), asyncio.Event()
        started = self._clock()
        async with self._gate:
            while True:
                if give_up is not None and give_up():
                    raise GaveUp()
                now = self._clock()
                wait = self.wait_s(tokens, now)
                if wait > 0:
                    await asyncio.sleep(wait if give_up is None else min(wait, _GIVE_UP_POLL_S))
                    continue
                if len(self._in_flight) < self.concurrency_limit(now):
                    break
                self._freed.clear()
                try:
                    await asyncio.wait_for(self._freed.wait(), timeout=_POLL_S)
                except asyncio.TimeoutError:
                    pass
            now = self._clock()
            self._requests.take(1, now)
            self._tokens.take(tokens, now)
            self._window.append((now, tokens))
            self._window_tokens += tokens
            slot = Slot(next(self._ids), tokens, now)
            self._in_flight[slot.id] = now
        self.stats.sent += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, len(self._in_flight))
        self.stats.waited_s += now - started
        return slot

    def release(self, slot: Slot, latency_s: float | None = None) -> None:
        """The attempt is over; `latency_s` (successful replies only) updates the latency estimate."""
        self._in_flight.pop(slot.id, None)
        if latency_s is not None:
            self._consecutive_429 = 0
            previous = self._latency
            self._latency = (
                latency_s if previous is None else previous + LATENCY_EWMA_ALPHA * (latency_s - previous)
            )
        if self._freed is not None:
            self._freed.set()

    # ---- failures
    def rate_limited(self, retry_after_s: float | None, attempt: int = 1) -> float:
        """A 429 on try `attempt` of a call: pause every caller of this provider.

        Returns how long this caller should sleep before it acquires again: 0, because `acquire`
        itself waits out the shared cooldown (`cooldown_left_s()`).
        """
        self._consecutive_429 += 1
        self.stats.rate_limited += 1
        if retry_after_s is not None:
            seconds = min(max(retry_after_s, 0.0), RETRY_AFTER_CAP_S)
        else:
            seconds = min(BACKOFF_INITIAL_S * 2 ** (self._consecutive_429 - 1), COOLDOWN_STEP_MAX_S)
        now = self._clock()
        if now + seconds > self._cooldown_until:
            self._cooldown_until = now + seconds
            self.stats.cooldowns.append((now, seconds))
        self._requests.empty(now)  # resume paced, not with a burst
        self._tokens.empty(now)
        return 0.0

    def backoff_s(self, attempt: int) -> float:
        """Wait before retry number `attempt` (1-based) of one call: exponential, full jitter."""
        state = tenacity.RetryCallState(None, None, (), {})
        state.attempt_number = attempt
        return float(self._backoff(state))

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def cooldown_left_s(self) -> float:
        return max(0.0, self._cooldown_until - self._clock())
