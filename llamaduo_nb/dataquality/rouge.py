"""ROUGE-L F1, exactly as rouge-score computes it, on `tokens`' encoded texts.

`rouge_l_f1` reproduces ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=...)`` bit for
bit: the same tokens (`tokens.rouge_tokens`) and the same precision/recall/F1 arithmetic. The tests
compare both on several hundred pairs (unicode, punctuation, empty and long texts). The LCS runs in
rapidfuzz: every distinct token gets a private code point, so a text becomes a string with one character
per token and ``rapidfuzz.distance.LCSseq`` (bit-parallel C++) gives the token LCS. Here, rouge-score needs
~0.7 ms for a pair of 80-token texts, rapidfuzz ~0.3 us. Beyond 1.1M distinct tokens (more than Unicode has
code points) texts fall back to tuples of ids: slower, still exact.

`rouge_l_f1_batch` is also 04's ROUGE-L judge (`evaluate.metric_judges`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

from .tokens import Encoded, _all_str, _as_ids, _Encoder


def _lcs_lengths(left: Sequence[Encoded], right: Sequence[Encoded], workers: int = -1) -> np.ndarray:
    """Token LCS length of each pair ``(left[k], right[k])``."""
    if not left:
        return np.zeros(0, dtype=np.float64)
    if _all_str(left) and _all_str(right):
        if len(left) < 2000:  # thread start-up costs more than it saves on small batches
            return np.fromiter(map(LCSseq.similarity, left, right), dtype=np.float64, count=len(left))
        return process.cpdist(left, right, scorer=LCSseq.similarity, workers=workers).astype(np.float64)
    pairs = [
        (a, b) if isinstance(a, str) and isinstance(b, str) else (_as_ids(a), _as_ids(b))
        for a, b in zip(left, right, strict=True)
    ]
    return np.fromiter((LCSseq.similarity(a, b) for a, b in pairs), dtype=np.float64, count=len(pairs))


def _f1(lcs: np.ndarray, target_len: np.ndarray, prediction_len: np.ndarray) -> np.ndarray:
    """rouge-score's arithmetic, elementwise (same IEEE operations in the same order, so equal bits)."""
    target_len = np.asarray(target_len, dtype=np.float64)
    prediction_len = np.asarray(prediction_len, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / prediction_len
        recall = lcs / target_len
        f1 = 2 * precision * recall / (precision + recall)
    undefined = (target_len == 0) | (prediction_len == 0) | ~(precision + recall > 0)
    f1[undefined] = 0.0
    return f1


def _f1_pairs(left: Sequence[Encoded], right: Sequence[Encoded]) -> np.ndarray:
    lcs = _lcs_lengths(left, right)
    return _f1(
        lcs,
        np.fromiter(map(len, left), np.float64, len(left)),
        np.fromiter(map(len, right), np.float64, len(right)),
    )


def rouge_l_f1(target: str, prediction: str, use_stemmer: bool = False) -> float:
    """ROUGE-L F1 exactly as ``RougeScorer(["rougeL"], use_stemmer).score(target, prediction)``."""
    return float(rouge_l_f1_batch([target], [prediction], use_stemmer=use_stemmer)[0])


def rouge_l_f1_batch(
    targets: Sequence[str], predictions: Sequence[str], use_stemmer: bool = False
) -> np.ndarray:
    """ROUGE-L F1 of each pair ``(targets[k], predictions[k])``, as a float64 array."""
    if len(targets) != len(predictions):
        raise ValueError(f"targets and predictions differ in length: {len(targets)} != {len(predictions)}")
    encoder = _Encoder(use_stemmer)
    return _f1_pairs([encoder.encode(t) for t in targets], [encoder.encode(p) for p in predictions])
