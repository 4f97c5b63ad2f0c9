"""`clean` = `decontaminate`, then `dedup` of the remaining rows against ``against``, sharing the
tokenisation; `CleanResult.report` counts per rule and shows examples. 05_synthesize cleans each synthetic
batch with it, against the data kept so far and the test split.

Speed (``make bench``, 2-core VM shared with other jobs): `clean` of 20K rows against 1K test items in
~1.0 s where the reference pipeline takes ~50 s (50x; per-token datasketch MinHash, MinHashLSH,
rouge-score, an O(N^2) membership filter); 300K rows in ~16 s (``--dq-large 300000``). 1M rows against
5K test items (the child process of ``python -m benches --only dataquality``): 59.2 s wall, 58.6 CPU-s at
load 3.5, peak RSS 2.93 GiB of which ~1.0 GiB is the pool itself; other runs 64 CPU-s and 66-80 s wall
at load 3 (before the numpy encoder, the shared doc gather and the length bound: 86 CPU-s, 92 s wall,
2.8 GiB; the same rows kept and dropped, and identical results on a 30K fixture). Where the time goes
at 1M: encoding 20 CPU-s, the decontamination scan (second thread) ~30 s, which overlaps it on a second
core, then in dedup signatures 8 s (above ~8M shingles they are
recomputed rather than cached, to bound memory), 3.5M LSH candidate pairs confirmed by LCS ~12-18 s
(rapidfuzz, 2 threads; candidates grow faster than rows because template shingles below the
boilerplate cut form large buckets).
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .decontam import RULES, DecontamParams, DecontamResult, _decontaminate
from .duplicates import DedupResult, _DedupIndex, _gc_paused, _Progress
from .minhash import MinHashParams, _chunks, _row_shingles, _RowShingles
from .rows import FIELDS, _fields_of, row_text
from .tokens import Encoded, _Encoder


@dataclass
class CleanResult:
    kept: list[dict[str, Any]]
    kept_indices: list[int]  # positions in the pool
    decontamination: DecontamResult | None
    dedup: DedupResult  # indices in it are positions in the pool too

    def report(self, examples: int = 3, pool: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Counts per rule, timings, and a few dropped examples (texts shown when ``pool`` is given)."""
        counts: dict[str, Any] = {
            "input": len(self.kept)
            + len(self.dedup.dropped)
            + (len(self.decontamination.dropped) if self.decontamination else 0),
            "kept": len(self.kept),
            "dropped": {"exact_duplicate": 0, "near_duplicate": 0}
            | {f"contaminated:{rule}": 0 for rule in RULES},
        }
        for drop in self.dedup.dropped:
            counts["dropped"][drop.reason] += 1
        for c in self.decontamination.dropped if self.decontamination else []:
            counts["dropped"][f"contaminated:{c.rule}"] += 1

        def text(index: int) -> dict[str, str]:
            if pool is None:
                return {}
            instruction, response = row_text(pool[index])
            return {"instruction": instruction[:200], "response": response[:200]}

        shown: dict[str, list[dict[str, Any]]] = {}
        for drop in self.dedup.dropped:
            bucket = shown.setdefault(drop.reason, [])
            if len(bucket) < examples:
                bucket.append(
                    {
                        "index": drop.index,
                        "duplicate_of": drop.duplicate_of,
                        "duplicate_of_source": drop.duplicate_of_source,
                        "score": round(drop.score, 4),
                    }
                    | text(drop.index)
                )
        for c in self.decontamination.dropped if self.decontamination else []:
            bucket = shown.setdefault(f"contaminated:{c.rule}", [])
            if len(bucket) < examples:
                bucket.append(
                    {
                        "index": c.index,
                        "test_index": c.test_index,
                        "test_id": c.test_id,
                        "field": c.field,
                        "test_field": c.test_field,
                        "score": round(c.score, 4),
                    }
                    | text(c.index)
                )
        seconds = {"dedup": self.dedup.stats.get("seconds", {})}
        if self.decontamination:
            seconds["decontaminate"] = self.decontamination.stats.get("seconds", {})
        return counts | {"examples": shown, "seconds": seconds}


def clean(
    pool: Sequence[Mapping[str, Any]],
    against: Sequence[Mapping[str, Any]] | None = None,
    test: Sequence[Mapping[str, Any]] | None = None,
    *,
    dedup_threshold: float = 0.7,
    decontam: DecontamParams | None = None,
    minhash: MinHashParams | None = None,
    use_stemmer: bool = False,
    progress: bool = False,
) -> CleanResult:
    """Decontaminate ``pool`` against ``test``, then dedup the rest (within itself and against ``against``).

    Tokenisation is shared between both steps. Indices in the result refer to positions in ``pool``.
    """
    with _gc_paused():
        return _clean(pool, against, test, dedup_threshold, decontam, minhash, use_stemmer, progress)


def _clean(
    pool: Sequence[Mapping[str, Any]],
    against: Sequence[Mapping[str, Any]] | None,
    test: Sequence[Mapping[str, Any]] | None,
    dedup_threshold: float,
    decontam: DecontamParams | None,
    minhash: MinHashParams | None,
    use_stemmer: bool,
    progress: bool,
) -> CleanResult:
    minhash = minhash or MinHashParams()
    decontam = decontam or DecontamParams(minhash=minhash)
    against, test = against or [], test or []
    encoder = _Encoder(use_stemmer)
    pool_fields = _fields_of(pool, FIELDS, "pool")
    against_fields = _fields_of(against, FIELDS, "against")
    test_fields = _fields_of(test, FIELDS, "test")
    test_encoded = encoder.encode_many([text for f in test_fields for text in f])
    n_against = len(against)

    # Decontamination runs in a second thread and scans the pool chunk by chunk as this thread encodes
    # it; this thread then builds the dedup index of every pool row. Both sides are mostly numpy work,
    # which releases the GIL. Dedup finally considers only the rows that decontamination kept.
    encoded: list[Encoded] = []
    ready: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()

    def encoded_ranges() -> Iterator[tuple[int, int]]:
        while (item := ready.get()) is not None:
            yield item

    n_rows = n_against + len(pool)
    gathered = _RowShingles(minhash, n_rows) if test else None
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = None
        if test:
            pending = worker.submit(
                _decontaminate,
                *(pool, encoded, test, test_encoded, encoder, decontam, progress),
                *(encoded_ranges(), gathered, n_against),
            )
        try:
            for start, end in tqdm(_chunks(len(pool)), desc="encode pool", disable=not progress, leave=False):
                encoded.extend(encoder.encode_many([text for f in pool_fields[start:end] for text in f]))
                ready.put((2 * start, 2 * end))
        finally:
            ready.put(None)
        against_codes = encoder.encode_many([text for f in against_fields for text in f])
        if gathered is not None:
            against_shingles = _RowShingles(minhash, n_rows)
            for start, end in _chunks(n_against):
                _, hashes, owner = _row_shingles(against_codes[2 * start : 2 * end], encoder, minhash)
                against_shingles.add(hashes, owner // 2 + start)
        contamination = pending.result() if pending is not None else None
    if gathered is not None:
        gathered.merge(against_shingles)
    stages = _Progress(progress, 5, "dedup")
    fields = against_fields + pool_fields
    index = _DedupIndex.build(fields, n_against, against_codes + encoded, gathered, encoder, minhash, stages)
    active = np.ones(len(pool), dtype=bool)
    if contamination is not None:
        active[[c.index for c in contamination.dropped]] = False
    kept, dropped, stats = index.resolve(active, dedup_threshold, stages)
    deduplicated = DedupResult(kept=[pool[i] for i in kept], kept_indices=kept, dropped=dropped, stats=stats)
    return CleanResult(
        kept=deduplicated.kept, kept_indices=kept, decontamination=contamination, dedup=deduplicated
    )
