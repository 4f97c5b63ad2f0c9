"""`decontaminate`: drop rows whose instruction or response is near a test item's.

* `decontaminate` drops a row when its instruction OR response is near a test item's instruction or
  response, by the first rule that matches, in this order: ``exact_match`` (same tokens as a test
  instruction), ``rouge_l`` (MinHash-LSH candidate with ROUGE-L F1 >= ``DecontamParams.rouge_threshold``:
  0.7 here and in ``llamaduo dedup --test-threshold``; 05_synthesize passes `synthesize.decontam_threshold`,
  0.6 by default; both texts need >= 8 tokens, so labels such as "Positive" never match), ``ngram_13`` (a shared 13-token span, as GPT-3's filter) and
  ``ngram_containment`` (>= 50% of the test text's distinctive 8-grams occur in the row: catches short test
  prompts inside longer rows). Template text is not evidence: an 8-gram found in >= 3 test items is
  boilerplate, and so is every span touching it; the LSH ignores shingles found in >= 3 test items. Each
  drop records the test item (index and id), both fields, the rule and the score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .duplicates import _encode_all, _gc_paused, _Progress
from .minhash import (
    MinHashParams,
    _band_key_chunks,
    _band_keys,
    _chunks,
    _distinct_pairs,
    _drop_common,
    _expand,
    _KeyIndex,
    _ngrams,
    _row_shingles,
    _RowShingles,
    _runs,
    _signatures,
    _sorted_unique,
    _test_boilerplate,
    _TokenArrays,
)
from .rouge import _f1_pairs
from .rows import FIELDS, _fields_of
from .tokens import Encoded, _as_ids, _Encoder

RULES = ("exact_match", "rouge_l", "ngram_13", "ngram_containment")


@dataclass(frozen=True)
class Contamination:
    """Why a row was dropped: which field of it is near which field of which test item."""

    index: int  # position in the rows given to decontaminate
    rule: str  # one of RULES (the first that matched, in that order)
    test_index: int
    test_id: Any  # the test row's "id", or its index when it has none
    field: str  # "instruction" | "response" (of the row)
    test_field: str  # "instruction" | "response" (of the test item)
    score: float  # 1.0 | ROUGE-L F1 | share of the test text's distinctive 8-grams found in the row field


@dataclass
class DecontamResult:
    kept: list[dict[str, Any]]
    kept_indices: list[int]
    dropped: list[Contamination]
    stats: dict[str, Any] = field(default_factory=dict, compare=False)  # timings, counts

    def counts(self) -> dict[str, int]:
        counts = {"input": len(self.kept) + len(self.dropped), "kept": len(self.kept)} | dict.fromkeys(
            RULES, 0
        )
        for drop in self.dropped:
            counts[drop.rule] += 1
        return counts


@dataclass(frozen=True)
class DecontamParams:
    rouge_threshold: float = 0.7
    min_tokens: int = 8  # both texts need this many tokens for the ROUGE-L rule
    span: int = 13  # ngram_13: shared span length in tokens
    containment_ngram: int = 8
    containment_threshold: float = 0.5
    boilerplate_df: int = 3  # an 8-gram in this many test items is template text, not evidence
    minhash: MinHashParams = field(default_factory=MinHashParams)

    def __post_init__(self) -> None:
        if self.span < self.containment_ngram:
            raise ValueError(f"span ({self.span}) must be >= containment_ngram ({self.containment_ngram})")


def decontaminate(
    rows: Sequence[Mapping[str, Any]],
    test_rows: Sequence[Mapping[str, Any]],
    *,
    params: DecontamParams | None = None,
    use_stemmer: bool = False,
    progress: bool = False,
) -> DecontamResult:
    """Drop rows whose instruction or response is near a test item's instruction or response."""
    pool_fields = _fields_of(rows, FIELDS, "pool")
    test_fields = _fields_of(test_rows, FIELDS, "test")
    with _gc_paused():
        encoder = _Encoder(use_stemmer)
        encoded = _encode_all(
            (t for f in pool_fields for t in f), encoder, 2 * len(rows), progress, "encode pool"
        )
        test_encoded = [encoder.encode(text) for f in test_fields for text in f]
        return _decontaminate(
            rows, encoded, test_rows, test_encoded, encoder, params or DecontamParams(), progress
        )


def _decontaminate(
    rows: Sequence[Mapping[str, Any]],
    pool_encoded: list[Encoded],  # [instruction 0, response 0, instruction 1, ...]
    test_rows: Sequence[Mapping[str, Any]],
    test_encoded: list[Encoded],  # same layout
    encoder: _Encoder,
    params: DecontamParams,
    progress: bool,
    ready: Iterable[tuple[int, int]] | None = None,  # ranges of pool_encoded as they become encoded
    gathered: _RowShingles | None = None,  # collects the pool rows' shingles for dedup on the way
    row_offset: int = 0,  # index of pool row 0 in `gathered`
) -> DecontamResult:
    stages = _Progress(progress, 4, "decontaminate")
    test_ids = [row.get("id", i) if isinstance(row, Mapping) else i for i, row in enumerate(test_rows)]
    # evidence[row] = (rule priority, -score, test field index, pool field index, score)
    evidence: dict[int, tuple[int, float, int, int, float]] = {}

    def found(rule: str, pool_field: int, test_field: int, score: float) -> None:
        candidate = (RULES.index(rule), -score, test_field, pool_field % 2, score)
        row = pool_field // 2
        if row not in evidence or candidate < evidence[row]:
            evidence[row] = candidate

    side = _TestSide.build(test_encoded, encoder, params) if test_rows else None
    if ready is None:
        ready = [(0, len(pool_encoded))]
    scan = _PoolScan(side, encoder, params, gathered, row_offset) if side is not None else None
    for start, end in ready:
        if scan is not None:
            scan.add(pool_encoded, start, end)
    stages.done("scan")
    n_rows = len(rows)
    test_instruction: dict[Encoded, int] = {}
    for t in range(len(test_rows)):
        if len(test_encoded[2 * t]):
            test_instruction.setdefault(test_encoded[2 * t], 2 * t)
    for r in range(n_rows):
        hit = test_instruction.get(pool_encoded[2 * r])
        if hit is not None:
            found("exact_match", 2 * r, hit, 1.0)
    if scan is not None and side is not None:
        _rouge_rule(scan.candidates(), pool_encoded, test_encoded, params, found)
        _ngram_rules(scan.matches(), pool_encoded, side, params, found)
    stages.done("rules")

    dropped = [
        Contamination(
            index=row,
            rule=RULES[priority],
            test_index=test_field // 2,
            test_id=test_ids[test_field // 2],
            field=FIELDS[pool_side],
            test_field=FIELDS[test_field % 2],
            score=score,
        )
        for row, (priority, _, test_field, pool_side, score) in sorted(evidence.items())
    ]
    kept_indices = [r for r in range(n_rows) if r not in evidence]
    stages.done("report")
    stages.close()
    return DecontamResult(
        kept=[rows[r] for r in kept_indices],
        kept_indices=kept_indices,
        dropped=dropped,
        stats={"seconds": stages.seconds},
    )


@dataclass
class _TestSide:
    """What pool texts are compared with: LSH keys of the test texts and their distinctive n-grams."""

    encoded: list[Encoded]
    boilerplate: np.ndarray | None  # bucket table of template shingles (shared by several test items)
    index: _KeyIndex | None  # band keys of the test texts with >= min_tokens tokens
    e_hash: np.ndarray  # evidence n-grams: hash (sorted), test field, start position in the field
    e_field: np.ndarray
    e_pos: np.ndarray
    distinct_per_field: np.ndarray  # distinct evidence n-grams of each test field
    bitmap: np.ndarray  # prefilter on the high bits of e_hash
    shift: np.uint64

    @classmethod
    def build(cls, test_encoded: list[Encoded], encoder: _Encoder, params: DecontamParams) -> _TestSide:
        lengths = np.fromiter(map(len, test_encoded), np.int64, len(test_encoded))
        long_test = np.flatnonzero(lengths >= params.min_tokens)
        boilerplate, index = None, None
        if long_test.size:
            texts = [test_encoded[i] for i in long_test.tolist()]
            # boilerplate = shingles shared by several test items (their templates); near-copies of ONE
            # test item in the pool cannot turn its text into boilerplate this way
            boilerplate = _test_boilerplate(
                texts, long_test // 2, encoder, params.minhash, params.boilerplate_df
            )
            keys = [k for _, _, k, _ in _band_key_chunks(texts, encoder, params.minhash, boilerplate, False)]
            index = _KeyIndex(np.concatenate(keys, axis=1), long_test)

        # Evidence for the n-gram rules: n-grams present in >= boilerplate_df distinct test items are
        # template text, so is every token they cover, and evidence n-grams must not touch template text.
        n = params.containment_ngram
        tokens = _TokenArrays.of(test_encoded, encoder)
        t_hash, t_field, t_pos = _ngrams(tokens, n, short_texts=False)
        distinct_hashes, df = _runs(_distinct_pairs(t_hash, t_field // 2)[0])
        boiler = np.isin(t_hash, distinct_hashes[df >= params.boilerplate_df])
        cover = np.zeros(tokens.hashes.size + 1, dtype=np.int64)
        np.add.at(cover, t_pos[boiler], 1)
        np.add.at(cover, t_pos[boiler] + n, -1)
        template_prefix = np.r_[0, np.cumsum(np.cumsum(cover)[:-1] > 0)]
        evidence = template_prefix[t_pos + n] - template_prefix[t_pos] == 0
        order = np.flatnonzero(evidence)[np.argsort(t_hash[evidence], kind="stable")]
        e_hash, e_field = t_hash[order], t_field[order]
        e_pos = t_pos[order] - tokens.starts[e_field]
        distinct_per_field = np.bincount(_distinct_pairs(e_field, e_hash)[0], minlength=len(test_encoded))
        bits = max(16, min(24, int(e_hash.size).bit_length() + 6))
        shift = np.uint64(64 - bits)
        bitmap = np.zeros(1 << bits, dtype=bool)
        bitmap[(e_hash >> shift).astype(np.intp)] = True
        return cls(
            test_encoded, boilerplate, index, e_hash, e_field, e_pos, distinct_per_field, bitmap, shift
        )


class _PoolScan:
    """Pool texts compared with the test side, range by range: LSH candidates (codes pool field * test
    fields + test field) for the ROUGE-L rule, and (pool field, evidence n-gram) matches for the n-gram
    rules. The rows' shingles are handed to ``rows`` on the way, for dedup."""

    def __init__(
        self,
        side: _TestSide,
        encoder: _Encoder,
        params: DecontamParams,
        rows: _RowShingles | None = None,
        row_offset: int = 0,
    ):
        self.side, self.encoder, self.params = side, encoder, params
        self.rows, self.row_offset = rows, row_offset
        self._codes: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        self._match_field: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        self._match_at: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]

    def add(self, pool_encoded: list[Encoded], start: int, end: int) -> None:
        """Scan fields [start, end) of pool_encoded (instruction, response, instruction, ...)."""
        side, params = self.side, self.params
        n, n_test, minhash = params.containment_ngram, len(side.encoded), params.minhash
        for first, last in _chunks(end - start):  # chunks of an even size: rows stay whole
            offset = start + first
            tokens, hashes, owner = _row_shingles(pool_encoded[offset : start + last], self.encoder, minhash)
            if self.rows is not None:
                self.rows.add(hashes, (owner + offset) // 2 + self.row_offset)
            long = tokens.lengths >= params.min_tokens
            if side.index is not None and long.any():
                position = np.cumsum(long) - 1
                mine = long[owner]
                long_hashes, long_owner = _drop_common(
                    hashes[mine], position[owner[mine]], int(position[-1]) + 1, side.boilerplate, False
                )
                signatures = _signatures(long_hashes, long_owner, int(position[-1]) + 1, minhash.num_perm)
                pool_f, test_f = side.index.query(
                    _band_keys(signatures, minhash), np.flatnonzero(long) + offset
                )
                self._codes.append(_sorted_unique(pool_f * n_test + test_f))
            if side.e_hash.size:
                p_hash, p_owner, _ = _ngrams(tokens, n, short_texts=False)
                maybe = np.flatnonzero(side.bitmap[(p_hash >> side.shift).astype(np.intp)])
                lo = np.searchsorted(side.e_hash, p_hash[maybe], side="left")
                count = np.searchsorted(side.e_hash, p_hash[maybe], side="right") - lo
                which, at = _expand(lo, count)
                self._match_field.append(p_owner[maybe[which]] + offset)
                self._match_at.append(at)

    def candidates(self) -> np.ndarray:
        return _sorted_unique(np.concatenate(self._codes))

    def matches(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self._match_field), np.concatenate(self._match_at)


def _rouge_rule(
    candidates: np.ndarray,
    pool_encoded: list[Encoded],
    test_encoded: list[Encoded],
    params: DecontamParams,
    found: Callable[[str, int, int, float], None],
) -> None:
    pool_field, test_field = np.divmod(candidates, max(len(test_encoded), 1))
    scores = _f1_pairs(
        [test_encoded[i] for i in test_field.tolist()], [pool_encoded[i] for i in pool_field.tolist()]
    )
    for k in np.flatnonzero(scores >= params.rouge_threshold).tolist():
        found("rouge_l", int(pool_field[k]), int(test_field[k]), float(scores[k]))


def _ngram_rules(
    matches: tuple[np.ndarray, np.ndarray],
    pool_encoded: list[Encoded],
    side: _TestSide,
    params: DecontamParams,
    found: Callable[[str, int, int, float], None],
) -> None:
    """Shared-span and containment rules, estimated from the hashed matches and verified exactly."""
    pool_f, at = matches
    if not at.size:
        return
    n, n_test = params.containment_ngram, len(side.encoded)
    pair = pool_f.astype(np.int64) * n_test + side.e_field[at]
    # containment estimate per (pool field, test field): distinct evidence hashes matched / distinct in test
    pairs, matched = _runs(_distinct_pairs(pair, side.e_hash[at])[0])
    share = matched / np.maximum(side.distinct_per_field[pairs % n_test], 1)
    # a shared span of `span` tokens shows up as span - n + 1 consecutive matched test positions
    run = params.span - n + 1
    pair_of, position = _distinct_pairs(pair, side.e_pos[at])
    starts = np.flatnonzero(
        (pair_of[run - 1 :] == pair_of[: pair_of.size - run + 1])
        & (position[run - 1 :] - position[: position.size - run + 1] == run - 1)
    )
    span_start: dict[int, list[int]] = {}
    for code, first in zip(pair_of[starts].tolist(), position[starts].tolist(), strict=True):
        span_start.setdefault(code, []).append(first)
    flagged = set(span_start) | set(pairs[share >= params.containment_threshold].tolist())
    evidence_grams: dict[int, set[Encoded]] = {}
    for code in sorted(flagged):
        pf, tf = divmod(code, n_test)
        hay, needle = pool_encoded[pf], side.encoded[tf]
        if tf not in evidence_grams:
            evidence_grams[tf] = {needle[p : p + n] for p in side.e_pos[side.e_field == tf].tolist()}
        grams = evidence_grams[tf]
        exact_share = sum(1 for gram in grams if _contains(hay, gram)) / max(len(grams), 1)
        if any(_contains(hay, needle[p : p + params.span]) for p in span_start.get(code, [])):
            found("ngram_13", pf, tf, exact_share)
        elif exact_share >= params.containment_threshold:
            found("ngram_containment", pf, tf, exact_share)


def _contains(hay: Encoded, needle: Encoded) -> bool:
    if isinstance(hay, str) and isinstance(needle, str):
        return needle in hay
    hay_ids, needle_ids = _as_ids(hay), _as_ids(needle)
    k = len(needle_ids)
    return any(hay_ids[i : i + k] == needle_ids for i in range(len(hay_ids) - k + 1))
