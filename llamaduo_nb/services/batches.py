"""Provider batch APIs: a stage's uncached calls to a `batch: true` provider go out as provider batches.

    providers:
      - {name: gpt4o, kind: openai, model: gpt-4o-2024-08-06, batch: true, batch_poll_s: 60}

OpenAI's Batch API (a JSONL file of /v1/chat/completions bodies: `files.create(purpose="batch")`, then
`batches.create`), Anthropic's Message Batches (`messages.batches.create`) and Gemini's batch mode
(`batches.create` with inlined requests) answer within 24 h at a discount (`batch_discount` in
params/prices.yaml: half the list price today). `ServicePool.complete_many` hands such a provider's requests to
`run_batched` instead of calling live, and the caller gets the same `ChatResult`s:

1. Cache first: answered requests replay from the run's or the project's cache, exactly as live.
2. Resume: batches that an earlier, killed run of the same stage submitted (listed in
   `RunLayout.batches_file`, `<run>/batches/<stage>-cycle_NN.json`) are collected, never submitted again.
3. Budget: a batch's worst case (input estimate + all of max_tokens for every request, at the batch price)
   is booked with the pool's `Accounts` before it is submitted, exactly as a live attempt is. A batch holds
   only the requests whose worst case fits under the `budget:` caps given what is on its way; the rest wait
   for the next round, once this round's batches are collected and settled at what their results cost (a
   batch left running keeps its worst case booked). When not one request fits with nothing on its way, the
   stage stops, like a live call. (Near a cap that is a round per batch wait: each round spends what the
   worst cases leave room for.)
4. Submit, in chunks within the provider's per-batch limits (`BATCH_LIMITS`). Each batch id is written
   atomically to the batches file as soon as the provider accepted it, before any polling.
5. Poll every `batch_poll_s` seconds (the stage's tqdm bar shows the batch's status and counts) until it ended.
6. Every result takes the path of a live reply (`Accounts.take_reply`): priced with the batch discount,
   ledgered, cached (run and shared cache) only when usable, unusable replies kept in `failed_replies`.
   An errored item is ledgered as a failure at $0 (providers bill no errored item) and counts in the
   provider's failure window; a batch in which more than `max_failure_share` of the requests failed (errored
   or unusable) stops the stage. Errored items are not re-sent by the same call (`--resume` / `--retry-failed`
   re-send them).
7. Unusable replies (empty, refused, blocked; not truncated ones) are re-sent in a follow-up batch, up to the
   provider's `unusable_retries`, at the batch price: never live.
8. An authentication, permission, quota or model-not-found error on submit stops the stage at once (one
   ledger row for the failed submit, nothing else sent); a submit that still fails after its retries stops it
   naming the cause (rate limit, server errors...), with a row per failed attempt. A batch that failed validation, expired or was
   cancelled stops the stage with its id and state; what it answered is kept, the rest is re-submitted
   by `llamaduo run --resume`.

A provider switched from `batch: true` back to live calls still collects the batches a killed run left for
its requests (`collect_left_batches`) before calling live: a paid answer is never asked for twice.

Limit: a kill in the instant between the provider accepting a batch and its id reaching the disk loses the id;
that batch then runs (and is billed) unseen, and the resumed stage submits its requests again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import tenacity

from ..callcache import RETRIED, canonical_json, request_key
from ..jsonio import read_json, write_json
from .accounting import Accounts, Booking, who
from .backends import Lane, WaitRetryAfter, describe_error, failure_class, is_retryable, stop_reason
from .parsing import replayed
from .types import ChatRequest, ChatResult, NotSent, Reply

# (requests, bytes) one batch may hold: OpenAI 50,000 requests / 200 MB input file, Anthropic 100,000 requests /
# 256 MB, Gemini's inlined requests ride in one HTTP request of at most 20 MB. Kept a little under the limits.
BATCH_LIMITS: dict[str, tuple[int, int]] = {
    "openai": (50_000, 190 * 2**20),
    "anthropic": (100_000, 240 * 2**20),
    "google": (10_000, 18 * 2**20),
}
OPENAI_COMPLETION_WINDOW = "24h"


class ItemError(Exception):
    """One request of a batch the provider answered with an error (or never answered)."""

    def __init__(self, message: str, status_code: int | None = None, body: Any = None):
        super().__init__(message)
        self.status_code, self.body = status_code, body


@dataclass(frozen=True)
class BatchStatus:
    ended: bool  # nothing more will change: collect the results
    state: str  # the provider's word for it (in_progress, completed, ended, JOB_STATE_SUCCEEDED, ...)
    counts: str  # e.g. "7/10 done, 1 failed"
    problem: str | None = None  # failed / expired / cancelled, with the provider's reason where it gives one
    handle: Any = None  # what the adapter needs to read the results (OpenAI's file ids, Gemini's job)


@dataclass
class _Item:
    key: str  # the cache key, also the batch's custom_id
    request: ChatRequest
    payload: dict
    indices: list[int]  # positions in the caller's request list (equal requests share one item)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the batches file


class BatchBook:
    """The batches of one stage and cycle, persisted atomically (`RunLayout.batches_file`).

    Every change re-reads the file and writes it whole with no await in between: the providers of one pool
    share the file and run on one event loop, so no change is lost.
    """

    def __init__(self, path: Any, stage: str, cycle: int | None):
        self.path, self.stage, self.cycle = path, stage, cycle

    def entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return list(read_json(self.path).get("batches", []))

    def _write(self, entries: list[dict]) -> None:
        write_json(self.path, {"stage": self.stage, "cycle": self.cycle, "batches": entries})

    def add(self, entry: dict) -> None:
        self._write([*self.entries(), entry])

    def update(self, batch_id: str, **values: Any) -> None:
        self._write([{**e, **values} if e["id"] == batch_id else e for e in self.entries()])


# --------------------------------------------------------------------------- provider adapters


class _OpenAIBatches:
    """OpenAI Batch API: upload a JSONL file of chat.completions bodies, create the batch, read the output file."""

    def __init__(self, lane: Lane):
        self.backend, self.client = lane.backend, lane.backend.client

    async def submit(self, items: list[_Item], label: str) -> str:
        lines = [
            canonical_json(
                {
                    "custom_id": item.key,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": self.backend.request_body(item.request),
                }
            )
            for item in items
        ]
        upload = await self.client.files.create(
            file=(f"{label}.jsonl", ("\n".join(lines) + "\n").encode("utf-8"), "application/jsonl"),
            purpose="batch",
        )
        batch = await self.client.batches.create(
            input_file_id=upload.id,
            endpoint="/v1/chat/completions",
            completion_window=OPENAI_COMPLETION_WINDOW,
            metadata={"llamaduo": label},
        )
        return batch.id

    async def status(self, batch_id: str) -> BatchStatus:
        batch = await self.client.batches.retrieve(batch_id)
        c = batch.request_counts
        counts = f"{c.completed + c.failed}/{c.total} done, {c.failed} failed" if c is not None else ""
        problem = None
        if batch.status == "failed":
            reasons = "; ".join(
                f"{e.code}: {e.message}" for e in ((batch.errors.data if batch.errors else None) or [])[:3]
            )
            problem = f"failed ({reasons or 'no reason given'})"
        elif batch.status in ("expired", "cancelled"):
            problem = batch.status
        ended = batch.status in ("completed", "failed", "expired", "cancelled")
        return BatchStatus(ended, batch.status, counts, problem, (batch.output_file_id, batch.error_file_id))

    async def results(self, status: BatchStatus, items: dict[str, _Item]) -> dict[str, Reply | ItemError]:
        from openai.types.chat import ChatCompletion

        found: dict[str, Reply | ItemError] = {}
        for file_id in status.handle:
            if not file_id:
                continue
            content = await self.client.files.content(file_id)
            for line in content.text.splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                response, error = row.get("response") or {}, row.get("error")
                status, body = response.get("status_code"), response.get("body") or {}
                if status == 200 and not error:
                    try:
                        found[row["custom_id"]] = self.backend.reply_from(ChatCompletion.model_validate(body))
                    except Exception as exc:  # a malformed body is that item's failure, not the batch's
                        found[row["custom_id"]] = ItemError(f"unreadable result: {exc}")
                    continue
                detail = error or (body.get("error") if isinstance(body, dict) else None) or body
                message = detail.get("message", "") if isinstance(detail, dict) else str(detail)
                code = detail.get("code", "") if isinstance(detail, dict) else ""
                found[row["custom_id"]] = ItemError(f"{code}: {message}" if code else message, status, detail)
        return found


class _AnthropicBatches:
    """Anthropic Message Batches: one create call holding every request's params, results as JSONL."""

    def __init__(self, lane: Lane):
        self.backend, self.client = lane.backend, lane.backend.client

    async def submit(self, items: list[_Item], label: str) -> str:
        requests = [
            {"custom_id": item.key, "params": self.backend.request_body(item.request)[0]} for item in items
        ]
        batch = await self.client.messages.batches.create(requests=requests)
        return batch.id

    async def status(self, batch_id: str) -> BatchStatus:
        batch = await self.client.messages.batches.retrieve(batch_id)
        c = batch.request_counts
        done = c.succeeded + c.errored + c.canceled + c.expired
        counts = f"{done}/{done + c.processing} done, {c.errored} errored"
        problem = None
        if batch.processing_status == "ended":
            if batch.cancel_initiated_at is not None:
                problem = "cancelled"
            elif c.expired:
                problem = f"expired ({c.expired} requests not processed within 24 h)"
        return BatchStatus(
            batch.processing_status == "ended", batch.processing_status, counts, problem, batch_id
        )

    async def results(self, status: BatchStatus, items: dict[str, _Item]) -> dict[str, Reply | ItemError]:
        found: dict[str, Reply | ItemError] = {}
        async for entry in await self.client.messages.batches.results(status.handle):
            result = entry.result
            if result.type == "succeeded":
                item = items.get(entry.custom_id)
                wrapped = self.backend.request_body(item.request)[1] if item is not None else False
                found[entry.custom_id] = self.backend.reply_from(result.message, wrapped)
            elif result.type == "errored":
                error = result.error.error
                body = result.error.model_dump(mode="json")
                found[entry.custom_id] = ItemError(
                    f"{error.type}: {getattr(error, 'message', '')}", None, body
                )
            else:  # canceled / expired: never processed, not billed
                found[entry.custom_id] = ItemError(
                    f"request {result.type} before it was processed (not billed)"
                )
        return found


class _GoogleBatches:
    """Gemini batch mode with inlined requests (Gemini Developer API)."""

    def __init__(self, lane: Lane):
        self.backend, self.client = lane.backend, lane.backend.client
        self.model = lane.provider.model

    async def submit(self, items: list[_Item], label: str) -> str:
        types = self.backend.types
        inlined = []
        for item in items:
            contents, config = self.backend.request_body(item.request)
            inlined.append(types.InlinedRequest(contents=contents, config=config, metadata={"key": item.key}))
        job = await self.client.aio.batches.create(
            model=self.model, src=inlined, config=types.CreateBatchJobConfig(display_name=label)
        )
        return job.name

    async def status(self, batch_id: str) -> BatchStatus:
        job = await self.client.aio.batches.get(name=batch_id)
        state = getattr(job.state, "value", str(job.state))
        ended = state in (
            "JOB_STATE_SUCCEEDED",
            "JOB_STATE_FAILED",
            "JOB_STATE_CANCELLED",
            "JOB_STATE_EXPIRED",
            "JOB_STATE_PARTIALLY_SUCCEEDED",
        )
        problem = None
        if state in ("JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"):
            reason = getattr(job.error, "message", None) if getattr(job, "error", None) else None
            problem = state.removeprefix("JOB_STATE_").lower() + (f" ({reason})" if reason else "")
        return BatchStatus(ended, state, "", problem, job)

    async def results(self, status: BatchStatus, items: dict[str, _Item]) -> dict[str, Reply | ItemError]:
        dest = getattr(status.handle, "dest", None)
        found: dict[str, Reply | ItemError] = {}
        for response in (getattr(dest, "inlined_responses", None) or []) if dest is not None else []:
            key = (response.metadata or {}).get("key")
            if key is None:
                continue
            if response.error is not None:
                # JobError.code is a google.rpc code (13: INTERNAL), not an HTTP status
                error = response.error
                found[key] = ItemError(
                    f"code {error.code}: {error.message}", None, error.model_dump(mode="json")
                )
            elif response.response is not None:
                found[key] = self.backend.reply_from(response.response)
        return found


_ADAPTERS = {"openai": _OpenAIBatches, "anthropic": _AnthropicBatches, "google": _GoogleBatches}


# --------------------------------------------------------------------------- one provider's batched calls


class _BatchRun:
    """The batched calls of one provider in one `complete_many` / `complete_groups`.

    Its collaborators are the provider's `Lane` (backend, scheduler, endpoint, request payloads), the pool's
    `Accounts` (cache lookup, bookings against the budgets, ledger, failure window, stop, counters) and the
    stage's `BatchBook`.
    """

    def __init__(self, lane: Lane, accounts: Accounts, book: BatchBook, progress: dict):
        self.lane, self.accounts, self.book, self.progress = lane, accounts, book, progress
        self.p = lane.provider
        self.api = _ADAPTERS[self.p.kind](lane)
        self.items: dict[str, _Item] = {}
        self.outcome: dict[str, ChatResult] = {}
        self.resend: set[str] = set()

    async def _retrying(
        self, call: Callable[[], Awaitable[Any]], on_retry: Callable[[BaseException, int], None] | None = None
    ) -> Any:
        """A submit / status / results call, retried like a live call (the SDKs' own retries are off);
        `on_retry(error, attempt)` is told of each attempt that failed and is retried."""

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_retry is not None and state.outcome is not None and state.outcome.exception() is not None:
                on_retry(state.outcome.exception(), state.attempt_number)

        async for attempt in tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.p.max_retries + 1),
            wait=WaitRetryAfter(self.lane.scheduler),
            retry=tenacity.retry_if_exception(is_retryable),
            before_sleep=before_sleep,
            reraise=True,
        ):
            with attempt:
                return await call()
        raise AssertionError("unreachable")

    def _mine(self, entry: dict) -> bool:
        return (
            entry.get("provider") == self.p.name
            and entry.get("kind") == self.p.kind
            and entry.get("model") == self.p.model
            and entry.get("endpoint") == self.lane.endpoint
        )

    def _requests(self, keys: list[str]) -> list[ChatRequest]:
        """The requests of `keys` this call asks for (a left batch may hold others: those are not booked)."""
        return [self.items[key].request for key in keys if key in self.items]

    # ---- the flow
    async def run(self, requests: list[ChatRequest]) -> list[ChatResult]:
        results: list[ChatResult | None] = [None] * len(requests)
        for i, request in enumerate(requests):
            payload = self.lane.payload(request)
            key = request_key(payload)
            if key in self.items:
                self.items[key].indices.append(i)
                continue
            hit = self.accounts.lookup(self.p, key, payload)
            if hit is not None:
                results[i] = self._done(replayed(hit, request))
            else:
                self.items[key] = _Item(key, request, payload, [i])
        if self.items:
            await self._resume()
            sends: collections.Counter[str] = collections.Counter()
            todo = [key for key in self.items if key not in self.outcome]
            while self.accounts.stopped is None:
                # unusable replies go out again in the next batch, up to unusable_retries times each
                again = [key for key in self.resend if sends[key] < self.p.unusable_retries]
                sends.update(again)
                self.resend.clear()
                todo += again
                if not todo:
                    break
                todo = await self._submit_and_collect(todo)  # what the budgets held back goes next round
        for key, item in self.items.items():
            result = self.outcome.get(key) or self._not_sent(key)
            for n, i in enumerate(item.indices):
                # equal requests share one answer; the copies cost nothing
                results[i] = self._done(result if n == 0 else _shared_copy(result))
        self.progress.pop("batch", None)
        return [r for r in results if r is not None]

    def _done(self, result: ChatResult) -> ChatResult:
        result = self.accounts.count(self.p.name, result)
        self.progress["done"] += 1
        self.progress["cached"] += int(result.cached)
        self.progress["failed"] += int(result.error is not None)
        return result

    def _not_sent(self, key: str) -> ChatResult:
        why = self.accounts.stopped or "the stage stopped"
        return ChatResult("", None, None, f"not sent: {why}", 0, 0, 0.0, 0.0, False, 0, key)

    async def _resume(self) -> None:
        """Collect the batches an earlier run of this stage submitted and never collected.

        Only those holding a request of this call: 05 asks in rounds, and a batch of round 3 waits for the
        resumed round 3 (whose requests are the same), so its answers are cached, not merely ledgered.
        Their worst case is booked without asking (committed spending) until their results are read."""
        open_entries = [
            e
            for e in self.book.entries()
            if self._mine(e)
            and e.get("status") == "submitted"
            and not self.items.keys().isdisjoint(e["keys"])
        ]
        for entry in open_entries:
            requests = self._requests(entry["keys"])
            async with self.accounts.booking(self.p, requests, batch=True, committed=True) as booking:
                await self._collect(entry, booking)

    async def _submit_and_collect(self, keys: list[str]) -> list[str]:
        """Submit `keys` in batches and collect them; returns the keys held back for the next round.

        Every batch is booked before it is submitted, and the bookings settle when their batches are collected.
        A batch holds only the requests whose worst case fits under the budgets given what is on its way; the
        rest wait for the next round, when this round's batches are collected (and settled below their worst
        case). When not even one request fits with nothing on its way, the budget stops the stage."""
        limit_n, limit_bytes = BATCH_LIMITS[self.p.kind]
        chunks: list[list[str]] = [[]]
        size = 0
        for key in keys:
            item_bytes = len(canonical_json(self.items[key].payload)) + 200
            if chunks[-1] and (len(chunks[-1]) >= limit_n or size + item_bytes > limit_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(key)
            size += item_bytes
        later: list[str] = []
        async with contextlib.AsyncExitStack() as bookings:
            submitted = []
            for i, chunk in enumerate(chunks):
                if self.accounts.stopped is not None:
                    break
                while True:
                    fits, busy = self.accounts.batch_room(self.p, self._requests(chunk))
                    if fits or not busy or submitted or self.accounts.stopped is not None:
                        break
                    await self.accounts.room_freed()  # only others' calls are on their way: they settle
                if self.accounts.stopped is not None:
                    break
                if not fits and submitted:
                    # this round's batches settle when they are collected: the rest go in the next round
                    later = [key for rest in chunks[i:] for key in rest]
                    break
                if fits and fits < len(chunk):
                    later += chunk[fits:]
                    chunk = chunk[:fits]
                what = f" (a batch of {len(chunk)} requests to provider '{self.p.name}')"
                try:
                    booking = await bookings.enter_async_context(
                        self.accounts.booking(self.p, self._requests(chunk), batch=True, what=what)
                    )
                except NotSent:  # it could cross a budget with nothing on its way: the stage stopped
                    break
                entry = await self._submit(chunk, booking)
                if entry is not None:
                    submitted.append((entry, booking))
            await asyncio.gather(*(self._collect(entry, booking) for entry, booking in submitted))
        return later

    async def _submit(self, keys: list[str], booking: Booking) -> dict | None:
        """Submit one batch; its entry in the batches file, or None when the submit failed (nothing billed)."""
        accounts, p = self.accounts, self.p
        n = sum(1 for e in self.book.entries() if self._mine(e)) + 1
        label = f"llamaduo-{accounts.stage}-{accounts.cycle}-{p.name}-{n}"
        self.progress["batch"] = f"submitting {len(keys)} requests"
        started = time.monotonic()
        tries = [1]

        def retried(exc: BaseException, attempt: int) -> None:  # each failed submit attempt has its row
            error = accounts.redact(describe_error(exc))
            accounts.record_error(
                p, keys[0], f"{RETRIED}batch submit of {len(keys)} requests failed: {error}", 0.0, attempt
            )
            tries[0] = attempt + 1

        try:
            batch_id = await self._retrying(
                lambda: self.api.submit([self.items[k] for k in keys], label), on_retry=retried
            )
        except Exception as exc:
            error = accounts.redact(describe_error(exc))
            reason = failure_class(exc) or "the batch could not be submitted"
            accounts.stop(f"{who(p)}: {reason}: {error}")
            accounts.record_error(
                p,
                keys[0],
                f"batch submit of {len(keys)} requests failed: {error}",
                time.monotonic() - started,
                attempts=tries[0],
            )
            return None
        booking.committed()  # the provider runs (and bills) it now, whatever happens to this process
        entry = {
            "id": batch_id,
            "provider": p.name,
            "kind": p.kind,
            "model": p.model,
            "endpoint": self.lane.endpoint,
            "submitted_at": _now(),
            "status": "submitted",
            "keys": keys,
        }
        self.book.add(entry)  # before polling: a killed run collects this batch instead of paying twice
        return entry

    async def _collect(self, entry: dict, booking: Booking) -> None:
        """Poll one batch until it ended, then book every result; the booking is settled at what they cost.

        A batch left running (its status unreadable, or the stage stopped for another reason) keeps its worst
        case booked and stays on file as submitted: `--resume` collects it."""
        accounts, p = self.accounts, self.p
        batch_id = entry["id"]
        started = time.monotonic()
        while True:
            try:
                status = await self._retrying(lambda: self.api.status(batch_id))
            except Exception as exc:
                reason = stop_reason(exc) or "its status could not be read"
                accounts.stop(f"{who(p)}: batch {batch_id}: {reason}: {accounts.redact(describe_error(exc))}")
                return  # still listed as submitted: --resume collects it
            self.progress["batch"] = f"{batch_id} {status.state} {status.counts}".strip()
            if status.ended:
                break
            if (
                accounts.stopped is not None
            ):  # stopped for another reason: leave the batch on file for --resume
                return
            await asyncio.sleep(p.batch_poll_s)
        try:
            found = await self._retrying(lambda: self.api.results(status, self.items))
        except Exception as exc:
            reason = stop_reason(exc) or "its results could not be read"
            accounts.stop(f"{who(p)}: batch {batch_id}: {reason}: {accounts.redact(describe_error(exc))}")
            return
        latency = time.monotonic() - started
        paid_usd, paid_tokens = 0.0, 0
        unanswered = 0
        for key in entry["keys"]:
            got = found.get(key) or ItemError(
                f"batch {status.state}: no result for this request (not billed)"
            )
            unanswered += int(not isinstance(got, Reply))
            usd, tokens = self._take(batch_id, key, got, latency)
            paid_usd, paid_tokens = paid_usd + usd, paid_tokens + tokens
        booking.paid(paid_usd, paid_tokens)
        self.book.update(batch_id, status="collected", state=status.state, collected_at=_now())
        failed = sum(
            1 for key in entry["keys"] if key in self.outcome and self.outcome[key].error is not None
        )
        if failed / len(entry["keys"]) > p.max_failure_share:
            accounts.stop(
                f"{who(p)}: {failed} of {len(entry['keys'])} requests in batch {batch_id} failed "
                f"(more than max_failure_share={p.max_failure_share:g})"
            )
        if status.problem is not None:
            accounts.stop(
                f"{who(p)}: batch {batch_id} {status.problem}: {unanswered} of {len(entry['keys'])} requests "
                "unanswered (the answered ones are kept; --resume submits the rest in a new batch)"
            )

    def _take(self, batch_id: str, key: str, got: Reply | ItemError, latency: float) -> tuple[float, int]:
        """Ledger (and cache) one item of a batch; returns its (USD, tokens)."""
        accounts, p = self.accounts, self.p
        item = self.items.get(key)
        if isinstance(got, Reply) and item is None:
            # paid in a batch of an earlier run that this call no longer asks for: ledgered, never lost.
            # Priced without its prompt-cached input tokens (as this path always was), unlike a reply asked for.
            cost = accounts.price(p, replace(got, cached_input_tokens=0), batch=True)
            why = f"batch {batch_id}: answered a request this run no longer makes (not cached)"
            accounts.record_paid(p, key, got, latency, cost, 1, error=why)
            return cost, got.input_tokens + got.output_tokens
        if isinstance(got, Reply):
            cost = accounts.price(p, got, batch=True)
            result, worth_resending = accounts.take_reply(
                p, item.request, key, item.payload, got, latency, 1, cost
            )
            self.outcome[key] = result
            if result.error is not None and worth_resending:
                self.resend.add(key)
            return result.cost_usd, got.input_tokens + got.output_tokens
        error = accounts.redact(f"batch {batch_id}: {describe_error(got)}")
        accounts.stop_if_fatal(p, got, error)
        accounts.record_error(p, key, error, latency, attempts=1)
        accounts.record_failure(p, got, error, where=f"batch {batch_id}: ", live=False)
        if item is not None:
            self.outcome[key] = ChatResult("", None, None, error, 0, 0, latency, 0.0, False, 1, key)
        return 0.0, 0


def _shared_copy(result: ChatResult) -> ChatResult:
    return replace(result, cached=result.error is None, cost_usd=0.0, attempts=0)


async def collect_left_batches(
    lane: Lane, accounts: Accounts, book: BatchBook, requests: list[ChatRequest], progress: dict
) -> None:
    """For a provider that is no longer `batch: true`: collect the batches a killed run left with any of
    `requests` in them, so the live calls that follow replay those answers from the cache instead of paying
    for them again."""
    run = _BatchRun(lane, accounts, book, progress)
    for i, request in enumerate(requests):
        payload = lane.payload(request)
        key = request_key(payload)
        if key not in run.items and accounts.lookup(lane.provider, key, payload) is None:
            run.items[key] = _Item(key, request, payload, [i])
    if run.items:
        await run._resume()
    progress.pop("batch", None)


async def run_batched(
    lane: Lane, accounts: Accounts, book: BatchBook, requests: list[ChatRequest], progress: dict
) -> list[ChatResult]:
    """`requests` to a `batch: true` provider, through its batch API; results in request order."""
    return await _BatchRun(lane, accounts, book, progress).run(requests)


__all__ = ["BATCH_LIMITS", "BatchBook", "BatchStatus", "ItemError", "collect_left_batches", "run_batched"]
