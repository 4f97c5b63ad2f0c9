"""The data of a cycle (02): train split + earlier cycles' synthetic rows, as TRL prompt-completion pairs,
and the checks of what the loss sees (the loss mask, TRL's truncation)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..jsonio import (
    DataFileError,
    iter_jsonl,
    write_jsonl,
)
from ..runlayout import RunLayout
from ..student import (
    student_messages,
)

COVERAGE_ORIGIN = "coverage"
LOSS_MASK_METHOD = "prompt-completion, completion_only_loss (prompt tokens labelled -100)"


# --------------------------------------------------------------------------- the data of a cycle


def synthetic_origin(cycle: int) -> str:
    return f"synthetic/cycle_{cycle:02d}"


def _checked_rows(path: Path, origin: str) -> list[dict]:
    rows = []
    for i, row in enumerate(iter_jsonl(path), start=1):
        for key in ("instruction", "response"):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DataFileError(path, i, key, f"expected a non-empty string, got {value!r}")
        rows.append({**row, "origin": origin})
    return rows


@dataclass(frozen=True)
class TrainData:
    """The rows of one cycle and where they came from."""

    path: Path
    rows: list[dict]
    by_origin: dict[str, int]
    missing_synthetic: list[int] = field(default_factory=list)  # earlier cycles without a synthetic file

    def table(self) -> pd.DataFrame:
        frame = pd.DataFrame(
            [{"origin": origin, "rows": n} for origin, n in self.by_origin.items()],
            columns=["origin", "rows"],
        )
        return pd.concat(
            [frame, pd.DataFrame([{"origin": "total", "rows": len(self.rows)}])], ignore_index=True
        )


def build_train_data(layout: RunLayout, cycle: int, write: bool = True) -> TrainData:
    """Write `train_data.jsonl` of `cycle`: coverage train split ∪ synthetic rows accepted in cycles < `cycle`.

    Every row keeps its fields and gains `origin` ("coverage" or "synthetic/cycle_NN"). `write=False`
    (the other processes of a multi-process launch, after rank 0 wrote it) only reads.
    """
    if not layout.train_file.is_file():
        raise FileNotFoundError(f"{layout.train_file} not found: run 01_coverage first")
    rows = _checked_rows(layout.train_file, COVERAGE_ORIGIN)
    if not rows:
        raise DataFileError(layout.train_file, None, None, "the coverage train split is empty")
    missing = []
    for previous in range(cycle):
        path = layout.synthetic_file(previous)
        if path.is_file():
            rows.extend(_checked_rows(path, synthetic_origin(previous)))
        else:
            missing.append(previous)
    out = layout.train_data_file(cycle)
    if write:
        write_jsonl(out, rows)
    counts = Counter(row["origin"] for row in rows)
    by_origin = {COVERAGE_ORIGIN: counts.pop(COVERAGE_ORIGIN, 0), **dict(sorted(counts.items()))}
    return TrainData(out, rows, by_origin, missing)


def to_prompt_completion(rows: list[dict]) -> list[dict]:
    """Coverage rows -> TRL's conversational prompt-completion format."""
    return [
        {
            "prompt": student_messages(row["instruction"], row.get("system")),
            "completion": [{"role": "assistant", "content": row["response"]}],
        }
        for row in rows
    ]


def check_loss_mask(dataset: Any, tokenizer: Any, limit: int = 2000) -> dict[str, Any]:
    """Verify that the prompt is labelled -100 and the completion is learned, on every row (at most `limit`
    evenly spaced rows of a large dataset).

    The prompt is re-tokenized independently (chat template + generation prompt); its tokens must be a
    prefix of the row's input ids and all masked, and every later token must carry its own id as label.
    """
    prompt_tokens = trained_tokens = 0
    step = max(1, math.ceil(len(dataset) / limit))
    checked = range(0, len(dataset), step)
    for i in checked:
        example = dataset[i]
        ids, labels = example["input_ids"], example["labels"]
        prompt_ids = _prompt_ids(tokenizer, example["prompt"])
        n = len(prompt_ids)
        if list(ids[:n]) != list(prompt_ids)[: len(ids[:n])]:
            raise RuntimeError(f"training row {i}: the tokenized prompt is not a prefix of the tokenized row")
        if any(label != -100 for label in labels[:n]):
            raise RuntimeError(f"training row {i}: a prompt token would be learned (label != -100)")
        if list(labels[n:]) != list(ids[n:]):
            raise RuntimeError(f"training row {i}: a completion token is masked out of the loss")
        prompt_tokens += min(n, len(ids))
        trained_tokens += max(0, len(ids) - n)
    return {
        "method": LOSS_MASK_METHOD,
        "rows_checked": len(checked),
        "prompt_tokens_masked": prompt_tokens,
        "completion_tokens_trained": trained_tokens,
    }


def _prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def truncate_rows(dataset: Any, max_length: int) -> Any:
    """TRL's truncation (keep the first `max_length` tokens of input_ids and labels) and its filter (drop
    rows left without a learned token), for padding-free training, where TRL leaves rows untruncated."""
    cut = dataset.map(
        lambda row: {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]},
        desc="Truncating train dataset",
    )
    return cut.filter(
        lambda row: any(label != -100 for label in row["labels"]), desc="Dropping fully masked examples"
    )
