"""Candidate pairs for ROUGE-L: word-bigram shingles, one-permutation MinHash signatures, LSH band keys.

Candidate generation, with the numbers that chose it (benchmark pool of benches/bench_dataquality.py, 20K rows)
-------------------------------------------------------------------------------------------------------
* Signatures: one-permutation MinHash (one 64-bit hash per shingle picks a bin and a value; one
  ``np.minimum.at`` fills every bin of every text) with densification by the nearest filled bin, left or
  right by a fixed per-bin direction (Shrivastava & Li, UAI 2014). The chance that two texts agree on a
  bin stays their Jaccard similarity. For 1.6M shingles this takes 0.01-0.04 s plus densification;
  classic MinHash with numpy universal hashing took 1.6 s (64 permutations) / 3.7 s (128), datasketch
  ``MinHash.bulk`` 3.4 s, and per-token ``MinHash.update`` calls ~25 s. Bands use bins b, b + 32 (not
  adjacent ones): densification copies values between neighbours, and adjacent bands made 2.3M
  candidate pairs at 100K rows instead of 6K.
* Shingles: word bigrams of the ROUGE tokens, per field (a row's set is the union of its fields').
  Unigrams made every pair of rows sharing a prompt template a candidate (569K pairs at 20K rows with
  16 x 4 bands); trigrams lose short instructions (a 20%-edited 30-token text keeps Jaccard ~0.3).
* Boilerplate: shingles occurring more than max(20, 0.5% of the rows) times (counted in hashed
  buckets) are left out of a row's signature when they are less than half of its shingles. Templates
  otherwise make same-template rows collide (with 42 x 3 bands: 456K candidate pairs at 20K rows with
  them, 3.1K without); a row made mostly of frequent shingles keeps them, because a large family of
  near-copies makes its own text frequent and must still find itself.
* 64 bins, 32 bands x 2 rows (S-curve midpoint (1/32)^(1/2) = 0.18): near-duplicate recall 0.998 at
  20K and 300K rows, 99% for copies with 20% of their words edited. 128 bins as 42 x 3 found 0.992
  (0.96 at 20% edits) and 64 bins as 21 x 3 0.978, for the same time: candidates are cheap, since
  every one is confirmed exactly by ROUGE-L (~0.5 us a pair).
* A bucket of more than 64 rows is linked as a star plus a chain in content-hash order instead of all
  its pairs: bounded work, still independent of input order.

Also the sorted-array helpers (`_sorted_unique`, `_runs`, `_distinct_pairs`, `_expand`) and `_KeyIndex`
(band keys of a fixed set of texts, searched with other texts' keys) that `duplicates` and `decontam` use.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .tokens import _MULT, Encoded, _all_str, _as_ids, _Encoder, _fmix, _ids_of_codes

_WORKERS = min(4, os.cpu_count() or 1)  # numpy sorts and rapidfuzz release the GIL
_EMPTY = np.uint32(0xFFFFFFFF)


@dataclass(frozen=True)
class MinHashParams:
    """Candidate generation; see the module docstring for why these defaults."""

    ngram: int = 2  # word n-gram shingles
    num_perm: int = 64  # one-permutation-hashing bins
    bands: int = 32
    rows: int = 2  # bands * rows <= num_perm
    common_fraction: float = 0.005  # shingles more frequent than this share of texts are boilerplate
    common_min_count: int = 20  # ... and never below this count
    max_bucket: int = 64  # larger LSH buckets are linked as star + chain

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.bands < 1 or self.rows < 1:
            raise ValueError(f"ngram, bands and rows must be >= 1, got {self}")
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")


@dataclass
class _TokenArrays:
    """The token hashes of many encoded texts, concatenated."""

    hashes: np.ndarray  # uint64 per token
    starts: np.ndarray  # int64 per text
    lengths: np.ndarray  # int64 per text

    @classmethod
    def of(cls, encoded: Sequence[Encoded], encoder: _Encoder) -> _TokenArrays:
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        if _all_str(encoded):
            ids = _ids_of_codes(np.frombuffer("".join(encoded).encode("utf-32-le"), dtype=np.uint32))
        else:
            ids = np.fromiter(
                (i for e in encoded for i in _as_ids(e)), dtype=np.int64, count=int(lengths.sum())
            )
        starts = np.zeros(len(encoded), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        return cls(encoder.token_hashes()[ids], starts, lengths)


def _mult_power(k: int) -> np.uint64:
    return np.uint64(pow(int(_MULT), k, 1 << 64))


def _window_hashes(token_hashes: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of every n-token window (length len - n + 1), by binary doubling."""
    total = token_hashes.size
    if total < n:
        return np.zeros(0, dtype=np.uint64)
    powers = {1: token_hashes}
    width = 1
    while width * 2 <= n:
        prev = powers[width]
        powers[width * 2] = prev[: prev.size - width] * _mult_power(width) + prev[width:]
        width *= 2
    result: np.ndarray | None = None
    covered = 0
    for width in sorted(powers, reverse=True):
        if covered + width <= n and (n - covered) & width:
            block = powers[width][covered : covered + total - n + 1]
            result = block if result is None else result * _mult_power(width) + block
            covered += width
    assert result is not None and covered == n
    return result[: total - n + 1]


def _ngrams(tokens: _TokenArrays, n: int, short_texts: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash, owner text, start position) of every n-gram inside a text, grouped by text.

    With ``short_texts``, a text shorter than n contributes one shingle of its whole token sequence
    (appended after the others; positions are then not returned).
    """
    windows = _window_hashes(tokens.hashes, n)
    per_text = np.maximum(tokens.lengths - n + 1, 0)
    inside = np.ones(windows.size, dtype=bool)
    if n > 1:  # windows starting in the last n - 1 tokens of a text cross into the next one
        ends = (tokens.starts + tokens.lengths)[tokens.lengths > 0]
        crossing = (ends[:, None] - np.arange(n - 1, 0, -1)).ravel()
        inside[crossing[(crossing >= 0) & (crossing < windows.size)]] = False
    hashes = windows[inside]
    owner = np.repeat(np.arange(tokens.lengths.size), per_text)
    position = np.flatnonzero(inside) if not short_texts else np.zeros(0, dtype=np.int64)
    if short_texts and n > 1:
        extra_h, extra_o = [hashes], [owner]
        for length in range(1, n):
            which = np.flatnonzero(tokens.lengths == length)
            if which.size:
                extra_h.append(_window_hashes(tokens.hashes, length)[tokens.starts[which]])
                extra_o.append(which)
        hashes, owner = np.concatenate(extra_h), np.concatenate(extra_o)
    return _fmix(hashes), owner, position


# Texts are processed in chunks so that numpy's temporaries stay small enough for the allocator to
# recycle them: fresh memory is expensive to touch on this class of (virtual) machine.
_CHUNK = 8192


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(start, min(start + _CHUNK, n)) for start in range(0, n, _CHUNK)]


def _shingles(
    encoded: Sequence[Encoded], encoder: _Encoder, params: MinHashParams
) -> tuple[np.ndarray, np.ndarray]:
    hashes, owner, _ = _ngrams(_TokenArrays.of(encoded, encoder), params.ngram, short_texts=True)
    return hashes, owner


def _bucket_count(n_texts: int) -> int:
    """Size of a hashed table of shingles: about 32 buckets per text, between 2^16 and 2^22."""
    return 1 << max(16, min(22, (32 * n_texts).bit_length()))


def _bucket_of(hashes: np.ndarray, buckets: int) -> np.ndarray:
    return (hashes & np.uint64(buckets - 1)).astype(np.intp)


_SHINGLE_CACHE_LIMIT = 8_000_000  # shingles kept between the counting and the signature pass (~100 MB)


def _row_shingles(
    codes: Sequence[Encoded], encoder: _Encoder, params: MinHashParams
) -> tuple[_TokenArrays, np.ndarray, np.ndarray]:
    """Tokens, shingle hashes and owning text of consecutive encoded texts (a row's fields)."""
    tokens = _TokenArrays.of(codes, encoder)
    hashes, owner, _ = _ngrams(tokens, params.ngram, short_texts=True)
    return tokens, hashes, owner


class _RowShingles:
    """Shingles of rows (the union of their fields' shingles), gathered chunk by chunk, with hashed
    counts for the boilerplate limit; kept for the signature pass while they fit the cache limit."""

    def __init__(self, params: MinHashParams, n_rows: int):
        self.params, self.n_rows = params, n_rows
        self.buckets = _bucket_count(n_rows)
        self.counts = np.zeros(self.buckets, dtype=np.int64)
        self._pending: list[np.ndarray] = []  # bucket numbers not yet counted
        self._pending_size = 0
        self.chunks: list[tuple[np.ndarray, np.ndarray]] | None = []  # (hashes, global row)
        self.total = 0

    def add(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        self._pending.append(_bucket_of(hashes, self.buckets))
        self._pending_size += hashes.size
        if self._pending_size >= 2 * self.buckets:  # one pass over the counts per several chunks
            self._count()
        self.total += hashes.size
        if self.chunks is not None:
            self.chunks = self.chunks + [(hashes, rows)] if self.total <= _SHINGLE_CACHE_LIMIT else None

    def _count(self) -> None:
        if self._pending:
            self.counts += np.bincount(np.concatenate(self._pending), minlength=self.buckets)
        self._pending, self._pending_size = [], 0

    def merge(self, other: _RowShingles) -> None:
        other._count()
        self.counts += other.counts
        self.total += other.total
        both = self.chunks is not None and other.chunks is not None and self.total <= _SHINGLE_CACHE_LIMIT
        self.chunks = self.chunks + other.chunks if both else None  # type: ignore[operator]

    def common(self) -> np.ndarray | None:
        """Buckets of shingles more frequent than the boilerplate limit (None if there are none)."""
        self._count()
        limit = max(self.params.common_min_count, self.params.common_fraction * self.n_rows)
        common = self.counts > limit
        return common if common.any() else None


def _test_boilerplate(
    test_texts: Sequence[Encoded], items: np.ndarray, encoder: _Encoder, params: MinHashParams, min_df: int
) -> np.ndarray | None:
    """Buckets of shingles found in at least ``min_df`` distinct test items: the test split's templates."""
    hashes, owner = _shingles(test_texts, encoder, params)
    distinct, df = _runs(_distinct_pairs(hashes, items[owner])[0])
    if not (df >= min_df).any():
        return None
    common = np.zeros(_bucket_count(len(test_texts)), dtype=bool)
    common[_bucket_of(distinct[df >= min_df], common.size)] = True
    return common


def _drop_common(
    hashes: np.ndarray,
    owner: np.ndarray,
    n_texts: int,
    common: np.ndarray | None,
    keep_if_mostly_common: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Leave boilerplate shingles out of a text's signature, unless it has nothing else.

    With ``keep_if_mostly_common``, a text keeps them all as soon as they are at least half of its
    shingles: a short text under a long template, or a member of a large family of near-copies, whose
    shared text is frequent *because* it is duplicated; dropping it would hide those duplicates.
    """
    if common is None:
        return hashes, owner
    is_common = common[_bucket_of(hashes, common.size)]
    if keep_if_mostly_common:
        filtered = 2 * np.bincount(owner[is_common], minlength=n_texts) < np.bincount(
            owner, minlength=n_texts
        )
    else:
        filtered = np.zeros(n_texts, dtype=bool)
        filtered[owner[~is_common]] = True
    keep = ~is_common | ~filtered[owner]
    return hashes[keep], owner[keep]


def _band_key_chunks(
    texts: Sequence[Encoded],
    encoder: _Encoder,
    params: MinHashParams,
    common: np.ndarray | None,
    keep_if_mostly_common: bool,
) -> Iterable[tuple[int, int, np.ndarray, np.ndarray]]:
    """(start, end, band keys (bands, end - start), has shingles) for consecutive chunks of texts."""
    for start, end in _chunks(len(texts)):
        hashes, owner = _shingles(texts[start:end], encoder, params)
        hashes, owner = _drop_common(hashes, owner, end - start, common, keep_if_mostly_common)
        signatures = _signatures(hashes, owner, end - start, params.num_perm)
        yield start, end, _band_keys(signatures, params), signatures[:, 0] != _EMPTY


@functools.cache
def _rightward(num_perm: int) -> np.ndarray:
    return np.random.default_rng(20140723).random(num_perm) < 0.5  # fixed: runs must agree


def _nearest_filled_left(filled: np.ndarray) -> np.ndarray:
    """Column of the nearest True at or left of each column, cyclically (-1 in rows without any)."""
    source = np.where(filled, np.arange(filled.shape[1], dtype=np.int16), np.int16(-1))
    np.maximum.accumulate(source, axis=1, out=source)
    np.copyto(source, source[:, -1:], where=source < 0)
    return source


def _signatures(hashes: np.ndarray, owner: np.ndarray, n_texts: int, num_perm: int) -> np.ndarray:
    """One-permutation MinHash, densified; rows that stay all-EMPTY have no shingles.

    An empty bin takes the value of the nearest non-empty bin to its left or to its right, cyclically,
    the direction being fixed per bin (Shrivastava & Li, "Improved densification of one permutation
    hashing", UAI 2014). The rule is the same for every text, so the probability that two texts agree
    on a bin is still their Jaccard similarity.
    """
    bins = ((hashes >> np.uint64(32)) % np.uint64(num_perm)).astype(np.intp)
    values = np.minimum((hashes & np.uint64(0xFFFFFFFF)).astype(np.uint32), _EMPTY - np.uint32(1))
    flat = np.full(n_texts * num_perm, _EMPTY, dtype=np.uint32)
    np.minimum.at(flat, owner.astype(np.intp) * num_perm + bins, values)
    signatures = flat.reshape(n_texts, num_perm)
    filled = signatures != _EMPTY
    if filled.all():
        return signatures
    left = _nearest_filled_left(filled)
    right = np.int16(num_perm - 1) - _nearest_filled_left(filled[:, ::-1])[:, ::-1]
    source = np.where(_rightward(num_perm), right, left)
    source[~filled.any(axis=1)] = 0  # no shingles: stays EMPTY
    return np.take_along_axis(signatures, source.astype(np.intp), axis=1)


def _band_keys(signatures: np.ndarray, params: MinHashParams) -> np.ndarray:
    """(bands, texts) uint64 keys; an equal key in some band makes two texts a candidate pair.

    Band b's keys are offset by b so that keys of different bands never meet when all bands are
    searched together.
    """
    n = signatures.shape[0]
    # band b holds bins b, b + bands, b + 2 * bands, ...: densification copies values between
    # neighbouring bins, so a band of adjacent bins would often hold a single shingle three times
    used = signatures[:, : params.bands * params.rows].reshape(n, params.rows, params.bands)
    keys = np.zeros((params.bands, n), dtype=np.uint64)
    for r in range(params.rows):
        keys *= _MULT
        keys += used[:, r, :].T
    keys += (np.arange(params.bands, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93))[:, None]
    return _fmix(keys)  # high bits feed the bitmap prefilter of _KeyIndex and must look random


def _self_pairs(
    keys: np.ndarray, members: np.ndarray, digest: Callable[[int], bytes], max_bucket: int
) -> np.ndarray:
    """Candidate pairs among ``members`` (text indices), as int64 codes ``low * n + high``.

    Buckets of up to ``max_bucket`` texts give all their pairs; a larger bucket is linked as a star plus
    a chain in ``digest`` order, which does not depend on input order either.
    """
    n = int(keys.shape[1])
    if members.size < 2:
        return np.zeros(0, dtype=np.int64)
    index_bits = max(1, (n - 1).bit_length())
    key_mask = ~np.uint64((1 << index_bits) - 1)
    members_u64 = members.astype(np.uint64)

    def band_pairs(band_keys: np.ndarray) -> np.ndarray:
        packed = np.sort((band_keys[members] & key_mask) | members_u64)
        bucket = packed & key_mask
        boundary = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1], True])
        sizes = np.diff(boundary)
        if not (sizes > 1).any():
            return np.zeros(0, dtype=np.int64)
        items = (packed & ~key_mask).astype(np.int64)
        size_of = np.repeat(sizes, sizes)
        offset = np.arange(packed.size) - np.repeat(boundary[:-1], sizes)
        count = np.where(size_of <= max_bucket, size_of - 1 - offset, 0)
        left, partner = _expand(np.arange(packed.size) + 1, count)
        codes = [items[left] * n + items[partner]]  # items ascending within a bucket
        for start in boundary[:-1][sizes > max_bucket].tolist():
            big = sorted(items[start : start + int(size_of[start])].tolist(), key=digest)
            star = [(big[0], other) for other in big[1:]]
            chain = list(zip(big[1:-1], big[2:], strict=True))
            codes.append(np.array([min(a, b) * n + max(a, b) for a, b in star + chain], dtype=np.int64))
        return np.concatenate(codes)

    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        per_band = list(pool.map(band_pairs, keys))
    return _sorted_unique(np.concatenate(per_band))


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is several times slower on large int arrays)."""
    values = np.sort(values)
    keep = np.ones(values.size, dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, how often each occurs) of an already sorted array."""
    starts = (
        np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
        if sorted_values.size
        else np.zeros(0, dtype=np.intp)
    )
    return sorted_values[starts], np.diff(np.r_[starts, sorted_values.size])


def _distinct_pairs(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (first, second) pairs, sorted by first, then second."""
    order = np.lexsort((second, first))
    first, second = first[order], second[order]
    new = np.ones(first.size, dtype=bool)
    new[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
    return first[new], second[new]


def _expand(lo: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [lo, lo + count): (index of the range, position) of every element."""
    which = np.repeat(np.arange(lo.size), count)
    return which, np.repeat(lo, count) + (np.arange(which.size) - np.repeat(np.cumsum(count) - count, count))


class _KeyIndex:
    """Sorted band keys of a fixed set of texts, searched with the band keys of other texts."""

    def __init__(self, keys: np.ndarray, items: np.ndarray):
        flat = keys.ravel()  # band offsets keep the bands apart
        order = np.argsort(flat, kind="stable")
        self.sorted = flat[order]
        self.items = np.tile(items, keys.shape[0])[order]
        self.shift = np.uint64(64 - max(16, min(24, int(self.sorted.size).bit_length() + 6)))
        self.bitmap = np.zeros(1 << (64 - int(self.shift)), dtype=bool)
        self.bitmap[(self.sorted >> self.shift).astype(np.intp)] = True

    def query(self, keys: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query item, index item) for every shared key; may contain repeats."""
        flat = keys.ravel()
        maybe = np.flatnonzero(self.bitmap[(flat >> self.shift).astype(np.intp)])
        lo = np.searchsorted(self.sorted, flat[maybe], side="left")
        count = np.searchsorted(self.sorted, flat[maybe], side="right") - lo
        which, at = _expand(lo, count)
        return np.tile(items, keys.shape[0])[maybe[which]], self.items[at]
