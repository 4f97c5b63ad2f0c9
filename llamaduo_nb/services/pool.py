"""`ServicePool`: the one door through which stages call service LLMs (lanes, scheduling, cache, live calls).

What the pool does with a request is described step by step in the package docstring (`llamaduo_nb.services`).
This module owns the lanes (one per provider: backend, `scheduler.RateScheduler`, endpoint), the event loop
the calls run on, the cache lookup and the in-flight sharing of equal requests, and the live call path: the
first-call probe, retries (tenacity), re-sending unusable replies, and the embedded llama-server. Every paid
attempt is booked with the pool's `accounting.Accounts` (reservation, settlement, ledger, cache, failure window,
stop); a `batch: true` provider's requests go to `batches.run_batched` with the lane and the same `Accounts`.

Jupyter: the pool runs its own event loop in a worker thread; `complete_many` is a plain blocking
call that works whether or not the caller's thread already runs a loop, and `acomplete` can be
awaited from any loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import tenacity

from ..callcache import export_ledger_csv, request_key
from ..config import ConfigError, ProviderConfig, RunConfig
from ..embedded import LlamaServer, embedded_gguf_path
from ..llamacpp import llama_cpp_python_version
from ..runlayout import RunLayout
from ..scheduler import GaveUp, RateScheduler, Slot
from .accounting import Accounts
from .backends import (
    LOCAL_DUMMY_KEY,
    Lane,
    WaitRetryAfter,
    api_key_for,
    backend_for,
    describe_error,
    is_retryable,
)
from .batches import BatchBook, collect_left_batches, run_batched
from .parsing import replayed
from .types import (
    ChatRequest,
    ChatResult,
    NotSent,
    Reply,
    StageStopped,
    estimate_tokens,
    validate_request,
)

EMBEDDED_N_CTX = 4096  # judge prompts (instruction + reference + candidate + schema) outgrow 2048
# llama-server's slots for the embedded service LLM: requests in flight are decoded together in one batch
# (continuous batching); more in flight than slots would only queue there. An embedded provider's
# max_concurrency, when set, caps both.
EMBEDDED_PARALLEL = 8


class _StopGate:
    """Wraps a lane's backend: once the stage stopped, a call that got through the limiters is not sent.

    The check sits here, after the concurrency semaphore and the rate limiters, so calls that queued behind
    them before the stop never go out. Calls still waiting in the limiters when the stage stops leave them at
    once (`RateScheduler.acquire(give_up=...)`) instead of each waiting for a turn it will not use.
    """

    def __init__(self, backend: Any, accounts: Accounts):
        self._backend, self._accounts = backend, accounts

    async def call(self, request: ChatRequest) -> Reply:
        if self._accounts.stopped is not None:
            raise NotSent(self._accounts.stopped)
        return await self._backend.call(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


def _served_here(p: ProviderConfig) -> ProviderConfig:
    """The embedded kind is the llama-server this pool starts and checks (it answers /v1/models before the
    first call): its first call need not go out alone (`probe_first_call`)."""
    return replace(p, probe_first_call=False) if p.kind == "embedded" else p


class ServicePool:
    """Context manager over the service LLMs a stage uses; see the package docstring.

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
        self._providers: dict[str, ProviderConfig] = {
            name: _served_here(cfg.provider(name)) for name in names
        }
        self._lanes: dict[str, Lane] = {}
        self._accounts = Accounts(stage, cycle, layout)  # budgets, ledger, caches, failure windows, stop
        self._server: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._inflight: dict[str, asyncio.Future] = {}
        self.stats = self._accounts.stats

    # ---- lifecycle
    def __enter__(self) -> ServicePool:
        if self._loop is not None:
            raise RuntimeError("this ServicePool is already open")
        keys = {name: api_key_for(p) for name, p in self._providers.items()}  # fail before starting anything
        try:
            self._accounts.open(self.cfg, [k for k in keys.values() if k != LOCAL_DUMMY_KEY])
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
                self._lanes[name] = Lane(provider, endpoint)
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
        gguf = embedded_gguf_path()
        caps = [
            p.max_concurrency for p in self._providers.values() if p.kind == "embedded" and p.max_concurrency
        ]
        slots = min([EMBEDDED_PARALLEL, *caps])
        self._server = LlamaServer(gguf, n_ctx=EMBEDDED_N_CTX, parallel=slots)
        self._server.__enter__()
        # the port changes each start; the cache key names the model file and the server that samples from it
        return self._server.base_url, f"embedded:{Path(gguf).name}:llama-server-{llama_cpp_python_version()}"

    async def _setup(self, keys: dict[str, str], embedded_url: str | None) -> None:
        for name, lane in self._lanes.items():
            p = lane.provider
            lane.backend = _StopGate(backend_for(p, keys[name], embedded_url), self._accounts)
            self._accounts.guard(p)  # made on the pool's loop, like the calls that wait on its probe
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
        self._accounts.close()

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
                validate_request(request, i)
        if threading.current_thread() is self._thread:
            raise RuntimeError(
                "complete_many called from the pool's own event loop; use `await pool.acomplete(...)`"
            )
        self._raise_if_stopped()
        total = sum(len(requests) for requests in groups.values())
        if not total:
            return {provider: [] for provider in groups}
        from tqdm.auto import tqdm

        progress = {"done": 0, "cached": 0, "failed": 0}
        spent_before = self.stats.cost_usd  # the bar shows what the ledger booked during this call

        async def run_all() -> list[list[ChatResult]]:
            results = list(
                await asyncio.gather(*(self._run_many(p, list(rs), progress) for p, rs in groups.items()))
            )
            for provider in groups:  # a stage smaller than the failure window stops on a dead provider too
                self._accounts.stop_if_dead(self._lane(provider).provider)
            return results

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
                                usd=f"{self.stats.cost_usd - spent_before:.4f}",
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
        validate_request(request, 0)
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
        return self._accounts.stopped

    def cache_key(self, provider: str, request: ChatRequest) -> str:
        """The cache key `request` has with `provider` (pool must be open: the embedded endpoint is known then)."""
        self._require_open()
        return request_key(self._lane(provider).payload(request))

    # ---- internals
    def _raise_if_stopped(self) -> None:
        if self._accounts.stopped is not None:
            raise StageStopped(
                f"{self.stage}"
                + (f" (cycle {self.cycle})" if self.cycle is not None else "")
                + f" stopped: {self._accounts.stopped}"
            )

    def _require_open(self) -> None:
        if self._loop is None:
            raise RuntimeError("ServicePool is not open; use `with ServicePool(cfg, layout, stage) as pool:`")

    def _lane(self, provider: str) -> Lane:
        try:
            return self._lanes[provider]
        except KeyError:
            raise ConfigError(
                f"provider '{provider}' is not in this pool; available: {sorted(self._lanes)}"
            ) from None

    def _left_batches_possible(self) -> bool:
        """Whether this stage ever submitted a provider batch (then a killed run may have left one open)."""
        return self.layout.batches_file(self.stage, self.cycle).is_file()

    def _batch_book(self) -> BatchBook:
        return BatchBook(self.layout.batches_file(self.stage, self.cycle), self.stage, self.cycle)

    async def _run_many(self, provider: str, requests: list[ChatRequest], progress: dict) -> list[ChatResult]:
        lane = self._lane(provider)
        if lane.provider.batch:
            return await run_batched(lane, self._accounts, self._batch_book(), requests, progress)
        if lane.provider.kind in ("openai", "anthropic", "google") and self._left_batches_possible():
            await collect_left_batches(lane, self._accounts, self._batch_book(), requests, progress)

        async def one(request: ChatRequest) -> ChatResult:
            result = await self._complete(provider, request)
            progress["done"] += 1
            progress["cached"] += int(result.cached)
            progress["failed"] += int(result.error is not None)
            return result

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def _complete(self, provider: str, request: ChatRequest) -> ChatResult:
        lane = self._lane(provider)
        payload = lane.payload(request)
        key = request_key(payload)
        hit = self._accounts.lookup(lane.provider, key, payload)
        if hit is not None:
            return self._accounts.count(provider, replayed(hit, request))
        pending = self._inflight.get(key)
        if pending is not None:  # the same request is already on its way: share its answer
            first = await asyncio.shield(pending)
            shared = replace(first, cached=first.error is None, cost_usd=0.0, attempts=0)
            return self._accounts.count(provider, shared)
        pending = asyncio.get_running_loop().create_future()
        self._inflight[key] = pending
        try:
            result = await self._call(lane, request, key, payload)
            pending.set_result(result)
        finally:
            if not pending.done():
                pending.cancel()
            del self._inflight[key]
        return self._accounts.count(provider, result)

    async def _attempt(self, lane: Lane, request: ChatRequest, sent: list[float]) -> tuple[Reply, float]:
        """One HTTP attempt once the scheduler gives it a slot; `sent` receives when it went out."""
        try:  # once the stage stopped, a call still waiting for its turn leaves without taking one
            slot: Slot = await lane.scheduler.acquire(
                estimate_tokens(request), give_up=lambda: self._accounts.stopped is not None
            )
        except GaveUp:
            raise NotSent(self._accounts.stopped) from None
        latency = None
        try:
            started = time.monotonic()
            sent.append(started)
            reply = await asyncio.wait_for(lane.backend.call(request), timeout=lane.provider.timeout_s)
            latency = time.monotonic() - started
            return reply, latency
        finally:
            lane.scheduler.release(slot, latency)

    async def _call(self, lane: Lane, request: ChatRequest, key: str, payload: dict) -> ChatResult:
        guard = self._accounts.guard(lane.provider)
        probe = await guard.admit()
        try:
            return await self._call_until_usable(lane, request, key, payload)
        finally:
            if probe:
                guard.probed()

    async def _call_until_usable(
        self, lane: Lane, request: ChatRequest, key: str, payload: dict
    ) -> ChatResult:
        """Send until a usable reply arrives, `unusable_retries` are spent, or the call fails after retries."""
        p = lane.provider
        resends = 0
        while True:
            outcome = await self._send(lane, request, key)
            if isinstance(outcome, ChatResult):  # failed (or never sent)
                return outcome
            reply, latency, attempts, cost = outcome
            result, worth_resending = self._accounts.take_reply(
                p, request, key, payload, reply, latency, attempts, cost
            )
            if result.error is None:
                return result
            if worth_resending and resends < p.unusable_retries and self._accounts.stopped is None:
                resends += 1
                continue
            return result

    async def _send(
        self, lane: Lane, request: ChatRequest, key: str
    ) -> tuple[Reply, float, int, float] | ChatResult:
        """One call with retries: (reply, latency, attempts, cost), or the failed ChatResult.

        Each attempt is booked: its worst case reserved before it goes out (waiting while calls on their way
        may still settle below theirs), settled at its price when it returns, at its worst case when it times
        out, at nothing otherwise. Each failed attempt has its own ledger row; a call that failed after its
        retries goes into the provider's failure window."""
        p = lane.provider
        accounts = self._accounts
        attempts = 0
        failed: BaseException | None = None  # the last attempt that went out and failed (it has its row)
        started = time.monotonic()
        try:
            retrying = tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(p.max_retries + 1),
                wait=WaitRetryAfter(lane.scheduler),
                retry=tenacity.retry_if_exception(is_retryable),
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    async with accounts.booking(p, [request]) as booking:
                        attempts += 1
                        sent: list[float] = []
                        try:
                            reply, latency = await self._attempt(lane, request, sent)
                        except NotSent:  # stopped while it waited for its turn: nothing went out
                            attempts -= 1
                            raise
                        except Exception as exc:
                            failed = exc
                            # tenacity retries exactly when the error is retryable and attempts are left
                            retried = is_retryable(exc) and attempts <= p.max_retries
                            took = time.monotonic() - sent[0] if sent else 0.0
                            accounts.record_attempt(p, key, booking, exc, attempts, took, retried)
                            raise
                        cost = accounts.price(p, reply)
                        booking.paid(cost, reply.input_tokens + reply.output_tokens)
        except NotSent as exc:
            accounts.note_not_sent()
            if failed is not None:  # attempts went out and failed before the stage stopped
                error = accounts.redact(describe_error(failed))
                accounts.record_failure(p, failed, error, attempts)
            return ChatResult("", None, None, f"not sent: {exc}", 0, 0, 0.0, 0.0, False, attempts, key)
        except Exception as exc:  # one bad call must not sink the batch: report it in the result and ledger
            error = accounts.redact(describe_error(exc))
            accounts.stop_if_fatal(p, exc, error)
            if exc is not failed:  # not an attempt's failure (those have their rows): ledger it here
                accounts.record_error(p, key, error, time.monotonic() - started, attempts)
            if attempts:  # a real call failed
                accounts.record_failure(p, exc, error, attempts)
            return ChatResult(
                "", None, None, error, 0, 0, time.monotonic() - started, 0.0, False, attempts, key
            )
        return reply, latency, attempts, cost
