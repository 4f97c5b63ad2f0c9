"""`dedup`: exact and near-duplicate removal, one row kept per duplicate cluster.

* `dedup` keeps exactly ONE row per duplicate cluster. Two rows are linked when their text fields are
  identical (``exact_duplicate``) or when they are MinHash-LSH candidates (`minhash`) whose ROUGE-L F1
  (over the fields joined) reaches ``threshold`` (``near_duplicate``; default 0.7, Self-Instruct's value,
  also 05_synthesize's `synthesize.dedup_threshold` default). Clusters are the connected components of those
  links (union-find), so they do not depend on input order. The kept row is the earliest: rows of
  ``against`` (the data kept so far) always win and are never dropped; among new rows the first in input
  order wins. Each dropped row names the kept row of its cluster and its ROUGE-L F1 with it (a row can join
  through a chain, so that score may be lower). Note what the rule means for templated prompts: two rows
  "Classify the sentiment of ...: <8 words>" with different short inputs can reach 0.7 and are then
  near-duplicates; raise ``threshold`` if that is not wanted.
* Dedup confirms only candidate pairs whose lengths allow ROUGE-L F1 >= threshold (F1 <= 2 min/(m+n)),
  and builds each compared doc once, gathering pairs in numpy's object loop.

Also the stage timings (`_Progress`) and the garbage-collector pause that `decontam` and `cleaning` share.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .minhash import (
    _EMPTY,
    MinHashParams,
    _band_keys,
    _chunks,
    _drop_common,
    _KeyIndex,
    _row_shingles,
    _RowShingles,
    _self_pairs,
    _signatures,
    _sorted_unique,
)
from .rouge import _f1, _f1_pairs
from .rows import FIELDS, _fields_of
from .tokens import Encoded, _all_str, _as_ids, _Encoder

_LENGTH_BOUND = True  # dedup skips the LCS of pairs whose lengths alone rule out the threshold


@dataclass(frozen=True)
class DuplicateDrop:
    """A dropped row and the kept row of its cluster."""

    index: int  # position in the rows given to dedup
    reason: str  # "exact_duplicate" | "near_duplicate"
    duplicate_of: int  # position of the kept representative, in `rows` or in `against`
    duplicate_of_source: str  # "pool" | "against"
    score: float  # ROUGE-L F1 with the representative (1.0 for exact duplicates)


@dataclass
class DedupResult:
    kept: list[dict[str, Any]]
    kept_indices: list[int]
    dropped: list[DuplicateDrop]
    stats: dict[str, Any] = field(default_factory=dict, compare=False)  # timings, counts

    def counts(self) -> dict[str, int]:
        counts = {
            "input": len(self.kept) + len(self.dropped),
            "kept": len(self.kept),
            "exact_duplicate": 0,
            "near_duplicate": 0,
        }
        for drop in self.dropped:
            counts[drop.reason] += 1
        return counts


def _content_digest(fields: tuple[str, ...]) -> bytes:
    """A hash of a row's text: orders rows independently of their input order."""
    return hashlib.blake2b("\x1f".join(fields).encode("utf-8", "surrogatepass"), digest_size=8).digest()


class _Progress:
    """Stage timings, plus a tqdm bar over stages when asked."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False)
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 4)
        self._last = now
        self.bar.set_postfix_str(stage)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: encoding allocates millions of small lists (no cycles), and
    each collection would walk every object the caller holds -- 6% of the time with 300K rows loaded."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _encode_all(
    texts: Iterable[str], encoder: _Encoder, total: int, progress: bool, desc: str
) -> list[Encoded]:
    return encoder.encode_many(
        tqdm(texts, total=total, desc=desc, disable=not progress or total < 10_000, leave=False)
    )


def dedup(
    rows: Sequence[Mapping[str, Any]],
    against: Sequence[Mapping[str, Any]] | None = None,
    *,
    text_fields: Sequence[str] = FIELDS,
    threshold: float = 0.7,
    use_stemmer: bool = False,
    params: MinHashParams | None = None,
    progress: bool = False,
) -> DedupResult:
    """Keep one row per duplicate cluster of ``rows`` (rows near a row of ``against`` are all dropped).

    ``text_fields`` are compared together (their texts joined); "instruction"/"response" are read with
    `row_text`, so chat rows work. ``threshold`` is the ROUGE-L F1 that confirms a near-duplicate.
    """
    with _gc_paused():
        return _dedup_rows(rows, against or [], text_fields, threshold, use_stemmer, params, progress)


def _dedup_rows(
    rows: Sequence[Mapping[str, Any]],
    against: Sequence[Mapping[str, Any]],
    text_fields: Sequence[str],
    threshold: float,
    use_stemmer: bool,
    params: MinHashParams | None,
    progress: bool,
) -> DedupResult:
    params = params or MinHashParams()
    fields = _fields_of(against, text_fields, "against") + _fields_of(rows, text_fields, "pool")
    encoder = _Encoder(use_stemmer)
    stages = _Progress(progress, 5, "dedup")
    codes = _encode_all((t for f in fields for t in f), encoder, sum(map(len, fields)), progress, "encode")
    index = _DedupIndex.build(fields, len(against), codes, None, encoder, params, stages)
    kept, dropped, stats = index.resolve(None, threshold, stages)
    return DedupResult(kept=[rows[i] for i in kept], kept_indices=kept, dropped=dropped, stats=stats)


@dataclass
class _DedupIndex:
    """Exact groups and LSH band keys of the rows of `against` followed by the pool's rows ("global"
    indices). Built once; `resolve` then dedups any subset of the pool rows."""

    fields: list[tuple[str, ...]]
    n_against: int
    exact_rep: np.ndarray  # global index of the first row with the same texts
    unique: np.ndarray  # global indices of first occurrences; "docs" are numbered along it
    codes: list[Encoded]  # encoded fields, per_row per row
    per_row: int
    keys: np.ndarray  # (bands, docs)
    has_shingles: np.ndarray  # (docs,)
    params: MinHashParams

    @classmethod
    def build(
        cls,
        fields: list[tuple[str, ...]],
        n_against: int,
        codes: list[Encoded],  # the encoded fields of every row, row after row
        shingles: _RowShingles | None,  # the rows' shingles if already gathered
        encoder: _Encoder,
        params: MinHashParams,
        stages: _Progress,
    ) -> _DedupIndex:
        n = len(fields)
        per_row = len(fields[0]) if fields else 1
        first_of: dict[tuple[str, ...], int] = {}
        exact_rep = np.fromiter(
            (first_of.setdefault(f, i) for i, f in enumerate(fields)), dtype=np.int64, count=n
        )
        del first_of
        unique = np.flatnonzero(exact_rep == np.arange(n))
        doc_of_row = np.full(n, -1, dtype=np.int64)
        doc_of_row[unique] = np.arange(unique.size)
        stages.done("exact")
        keys = np.zeros((params.bands, unique.size), dtype=np.uint64)
        has_shingles = np.zeros(unique.size, dtype=bool)
        if unique.size > 1:
            if shingles is None:
                shingles = _RowShingles(params, n)
                for start, end in _chunks(n):
                    _, hashes, owner = _row_shingles(codes[per_row * start : per_row * end], encoder, params)
                    shingles.add(hashes, owner // per_row + start)
            common = shingles.common()
            for hashes, rows in shingles.chunks or cls._recomputed(codes, per_row, n, encoder, params):
                docs = doc_of_row[rows]
                mine = docs >= 0  # exact copies add nothing
                if not mine.any():
                    continue
                first, last = int(docs[mine].min()), int(docs[mine].max()) + 1
                owner = docs[mine] - first
                kept_hashes, owner = _drop_common(hashes[mine], owner, last - first, common, True)
                signatures = _signatures(kept_hashes, owner, last - first, params.num_perm)
                keys[:, first:last] = _band_keys(signatures, params)
                has_shingles[first:last] = signatures[:, 0] != _EMPTY
        stages.done("minhash")
        return cls(fields, n_against, exact_rep, unique, codes, per_row, keys, has_shingles, params)

    @staticmethod
    def _recomputed(
        codes: list[Encoded], per_row: int, n: int, encoder: _Encoder, params: MinHashParams
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start, end in _chunks(n):
            _, hashes, owner = _row_shingles(codes[per_row * start : per_row * end], encoder, params)
            yield hashes, owner // per_row + start

    def docs_of(self, *columns: np.ndarray) -> list[np.ndarray]:
        """The joined encoded texts of the docs in each column (object arrays): each distinct doc built once,
        by numpy on object arrays (no Python call per pair)."""
        needed = _sorted_unique(np.concatenate(columns)) if columns else np.zeros(0, dtype=np.int64)
        codes = np.empty(len(self.codes), dtype=object)
        codes[:] = self.codes
        rows = self.unique[needed] * self.per_row
        parts = [codes[rows + k] for k in range(self.per_row)]
        if all(_all_str(part) for part in parts):
            docs = functools.reduce(np.add, parts)  # str + str in numpy's object loop
        else:
            docs = np.empty(needed.size, dtype=object)
            docs[:] = [_join(fields) for fields in zip(*parts, strict=True)]
        position = np.zeros(self.unique.size, dtype=np.int64)
        position[needed] = np.arange(needed.size)
        return [docs[position[column]] for column in columns]

    def resolve(
        self, active_pool: np.ndarray | None, threshold: float, stages: _Progress
    ) -> tuple[list[int], list[DuplicateDrop], dict[str, Any]]:
        """Dedup the pool rows where ``active_pool`` is True (all when None); pool-relative indices."""
        n, n_against, unique = len(self.fields), self.n_against, self.unique
        active = np.ones(n, dtype=bool)
        if active_pool is not None:
            active[n_against:] = active_pool
        is_pool = unique >= n_against
        usable = active[unique] & self.has_shingles
        pool_members = np.flatnonzero(is_pool & usable)
        codes = [np.zeros(0, dtype=np.int64)]
        if pool_members.size:
            digest = lambda d: _content_digest(self.fields[unique[d]])  # noqa: E731
            codes.append(_self_pairs(self.keys, pool_members, digest, self.params.max_bucket))
            against_members = np.flatnonzero(~is_pool & usable)
            if against_members.size:
                index = _KeyIndex(self.keys[:, against_members], against_members)
                for start, end in _chunks(pool_members.size):
                    members = pool_members[start:end]
                    a, b = index.query(self.keys[:, members], members)
                    codes.append(_sorted_unique(b * unique.size + a))  # b (against) < a (pool)
        candidates = _sorted_unique(np.concatenate(codes))
        stages.done("lsh_pairs")

        low, high = np.divmod(candidates, max(unique.size, 1))
        left, right = self.docs_of(low, high)
        left_len = np.fromiter(map(len, left), np.float64, len(left))
        right_len = np.fromiter(map(len, right), np.float64, len(right))
        # F1 grows with the LCS, which is at most the shorter text: pairs of too different lengths cannot
        # reach the threshold and need no LCS (the margin covers rounding; their score stays 0 here)
        bound = _f1(np.minimum(left_len, right_len), left_len, right_len)
        possible = np.flatnonzero(bound >= threshold - 1e-9 if _LENGTH_BOUND else bound >= -1)
        scores = np.zeros(low.size, dtype=np.float64)
        scores[possible] = _f1_pairs(left[possible].tolist(), right[possible].tolist())
        confirmed = scores >= threshold
        stages.done("rouge_l")

        roots = _components(n, self.exact_rep, unique[low[confirmed]], unique[high[confirmed]])
        doc_of = np.full(n, -1, dtype=np.int64)
        doc_of[unique] = np.arange(unique.size)
        pool_rows = np.flatnonzero(active[n_against:]) + n_against
        dropped_g = pool_rows[roots[pool_rows] != pool_rows]
        near = dropped_g[self.exact_rep[dropped_g] != roots[dropped_g]]
        near_scores = _f1_pairs(
            *(docs.tolist() for docs in self.docs_of(doc_of[self.exact_rep[near]], doc_of[roots[near]]))
        )
        score_of = dict(zip(near.tolist(), near_scores.tolist(), strict=True))
        dropped = []
        for g, root in zip(dropped_g.tolist(), roots[dropped_g].tolist(), strict=True):
            from_against = root < n_against
            dropped.append(
                DuplicateDrop(
                    index=g - n_against,
                    reason="near_duplicate" if g in score_of else "exact_duplicate",
                    duplicate_of=root if from_against else root - n_against,
                    duplicate_of_source="against" if from_against else "pool",
                    score=score_of.get(g, 1.0),
                )
            )
        kept = (pool_rows[roots[pool_rows] == pool_rows] - n_against).tolist()
        stages.done("clusters")
        stages.close()
        stats = {
            "unique_texts": int(unique.size),
            "candidate_pairs": int(candidates.size),
            "confirmed_pairs": int(confirmed.sum()),
            "seconds": stages.seconds,
        }
        return kept, dropped, stats


def _components(n: int, exact_rep: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Root (smallest member) of every row's cluster; clusters join exact copies and confirmed pairs."""
    parent = exact_rep.tolist()  # an exact copy points at its first occurrence, which is a root

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(left.tolist(), right.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array(parent, dtype=np.int64)
    while True:  # pointer jumping until every row points at its root
        jumped = roots[roots]
        if np.array_equal(jumped, roots):
            return roots
        roots = jumped


def _join(parts: Sequence[Encoded]) -> Encoded:
    if _all_str(parts):
        return "".join(parts)  # type: ignore[arg-type]
    return tuple(i for p in parts for i in _as_ids(p))
