"""Reference-metric judges: deterministic, offline, free scores of an answer against its reference.

They sit beside the LLM judges (declared under `evaluate.metric_judges`, never as providers) and write
the same judgment records, with M = 1 by nature (`repeat` 0). Every score is on the judges' 1..100 scale:

    rougeL       1 + 99 * ROUGE-L F1 (the exact rouge-score value: `dataquality.rouge`)
    chrF         1 + 0.99 * chrF (sacrebleu's sentence chrF, 0..100)
    exact_match  label accuracy for classification-style rows (category in `evaluate.label_categories`):
                 100 when the answer starts with the reference's label, else 1. The label is the
                 reference's first sentence when that is at most 4 words ("Negative. The reviewer ...");
                 otherwise the whole reference must match. Case, spacing and edge punctuation are ignored.
                 Rows of other categories are not applicable and get no judgment at all.

A reference metric measures one thing, closeness to the reference, so the same score is reported as both
`similarity` and `precision`: it can drive a decision on either metric, and its Table-1 columns repeat.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ..dataquality import rouge_l_f1_batch

METRIC_JUDGES = ("rougeL", "chrF", "exact_match")
LABEL_MAX_WORDS = 4


def _record(row: dict, judge: str, score: float) -> dict:
    return {
        "prompt_id": row["prompt_id"],
        "sample_index": row["sample_index"],
        "category": row.get("category"),
        "judge": judge,
        "repeat": 0,
        "similarity": score,
        "precision": score,
        "ok": True,
        "error": None,
        "cached": False,
        "cache_key": None,
        "raw": None,
        "rationale": None,
    }


def rouge_l_scores(rows: Sequence[dict]) -> list[float]:
    f1 = rouge_l_f1_batch([r["reference"] for r in rows], [r["candidate"] for r in rows])
    return [1.0 + 99.0 * float(v) for v in f1]


def chrf_scores(rows: Sequence[dict]) -> list[float]:
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    return [1.0 + 0.99 * chrf.sentence_score(r["candidate"], [r["reference"]]).score for r in rows]


def _normalise(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.casefold()).split()


def reference_label(reference: str) -> list[str]:
    """The label words of a classification reference: its first sentence when short, else all of it."""
    first = re.split(r"[.\n:;!?]", reference.strip(), maxsplit=1)[0]
    words = _normalise(first)
    return words if 0 < len(words) <= LABEL_MAX_WORDS else _normalise(reference)


def label_match(reference: str, candidate: str) -> bool:
    label = reference_label(reference)
    return bool(label) and _normalise(candidate)[: len(label)] == label


def exact_match_scores(rows: Sequence[dict]) -> list[float]:
    return [100.0 if label_match(r["reference"], r["candidate"]) else 1.0 for r in rows]


_SCORERS: dict[str, Callable[[Sequence[dict]], list[float]]] = {
    "rougeL": rouge_l_scores,
    "chrF": chrf_scores,
    "exact_match": exact_match_scores,
}


def applicable(judge: str, row: dict, label_categories: Sequence[str]) -> bool:
    if judge == "exact_match":
        return (row.get("category") or "") in label_categories
    return True


def metric_judgments(judge: str, rows: Sequence[dict], label_categories: Sequence[str] = ()) -> list[dict]:
    """One judgment per applicable row from the reference metric `judge` (one of METRIC_JUDGES)."""
    if judge not in _SCORERS:
        raise ValueError(f"unknown reference-metric judge {judge!r}; known: {list(METRIC_JUDGES)}")
    rows = [r for r in rows if applicable(judge, r, label_categories)]
    if not rows:
        return []
    return [_record(row, judge, score) for row, score in zip(rows, _SCORERS[judge](rows), strict=True)]
