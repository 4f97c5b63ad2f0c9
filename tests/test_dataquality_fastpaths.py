"""The data-quality engine's fast paths change nothing: numpy batch encoding gives the per-token path's
codes and vocabulary, and `clean` keeps and drops the same rows, for the same reasons and scores, with the
fast paths on as with them off (the per-token encoder and every candidate pair scored, as before)."""

from __future__ import annotations

import random

import pytest
from test_dataquality import _pairs

from benches.bench_dataquality import generate
from llamaduo_nb import dataquality as dq
from llamaduo_nb.dataquality import duplicates as dup
from llamaduo_nb.dataquality import tokens as tok


def _texts() -> list[str]:
    texts = [text for pair in _pairs(400, seed=11) for text in pair]
    rng = random.Random(5)
    long_tokens = ["x" * 17, "supercalifragilisticexpialidocious", "a1b2c3d4e5f6g7h8i9", "abcdefghijklmnop"]
    texts += [" ".join(rng.choice(long_tokens + ["short", "12345678", "123456789"]) for _ in range(30))]
    texts += ["", "   ", "\x00 zero \x00 bytes", "ÅNGSTRÖM \u212a İstanbul", "lone \ud800 surrogate", "a"]
    return texts


def test_batch_encoding_gives_the_per_token_codes_and_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = _texts()
    monkeypatch.setattr(tok, "_FAST_BATCH", 37)  # many small batches: the token table grows and rehashes
    fast = tok._Encoder()
    fast_codes = fast.encode_many(texts)
    monkeypatch.setattr(tok, "_FAST_BATCH", 0)
    slow = tok._Encoder()
    slow_codes = slow.encode_many(texts)
    assert fast_codes == slow_codes
    assert fast.tokens == slow.tokens  # ids given in the same order: the same code points
    assert fast._table.size == sum(1 for token in fast.tokens if len(token) <= tok._KEY_BYTES)


def test_fast_paths_keep_and_drop_the_same_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    syn = generate(1500, 150, seed=3)  # planted exact/near duplicates and contamination
    against = syn.pool[:100]
    pool, test = syn.pool[100:], syn.test
    monkeypatch.setattr(tok, "_FAST_BATCH", 256)
    fast = dq.clean(pool, against, test)
    monkeypatch.setattr(tok, "_FAST_BATCH", 0)
    monkeypatch.setattr(dup, "_LENGTH_BOUND", False)
    slow = dq.clean(pool, against, test)
    assert fast.kept_indices == slow.kept_indices
    assert fast.dedup.dropped == slow.dedup.dropped  # same rows, reasons, representatives and scores
    assert fast.decontamination == slow.decontamination
    reasons = {drop.reason for drop in fast.dedup.dropped}
    assert reasons == {"exact_duplicate", "near_duplicate"} and fast.decontamination.dropped
    for key in ("candidate_pairs", "confirmed_pairs"):
        assert fast.dedup.stats[key] == slow.dedup.stats[key]


def test_a_longer_copy_at_the_length_bound_is_still_a_near_duplicate() -> None:
    # ROUGE-L F1 = 2 * 18 / (18 + 32) = 0.72: the LCS is the whole shorter text, so the score equals the
    # length bound that lets dedup skip pairs; the bound must not skip this one
    base = " ".join(f"word{i}" for i in range(18))
    longer = base + " " + " ".join(f"extra{i}" for i in range(14))
    result = dq.dedup([{"instruction": base, "response": ""}, {"instruction": longer, "response": ""}])
    assert [(d.index, d.reason, d.duplicate_of) for d in result.dropped] == [(1, "near_duplicate", 0)]
    assert result.dropped[0].score == 2 * 18 / 50
    assert dq.dedup([{"instruction": base}, {"instruction": longer}], threshold=0.73).dropped == []
