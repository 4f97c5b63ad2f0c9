"""Token statistics per split, in the layout of LlamaDuo's appendix (Table 4: min, max, mean, std of token counts
per dataset), under the student's real tokenizer.

    stats = token_statistics({"train": train_rows, "test": test_rows}, tokenizer)
    stats.summary()   # {"tokenizer", "counted", "std", "splits": {split: {part: {count, min, max, mean, std}}},
                      #  "by_category": {category: {split: {part: {...}}}}}
    stats.table()     # one line per (split, part), with the count of rows
    stats.table(by_category=True)   # one line per (category, split, part): the paper's "Task (split)" rows

Each row (any schema 01_coverage accepts, read by `rows.row_text`) gives three counts: its **prompt** (the
instruction as 01 stored it, a passage merged into it included; no system prompt, no chat template), its
**response**, and the **pair** (prompt + response: one number per row, as the paper's table gives). Tokens are
the tokenizer's own ids without special tokens (`add_special_tokens=False`), so the counts are the content's,
not the chat template's; std is the population standard deviation (ddof 0: it describes the split itself, and
a split of one row has std 0). The paper does not say which text it counted: it gives one number per row, like
`pair` here.

The tokenizer is passed in (a Hugging Face tokenizer, or anything called as `tokenizer(texts,
add_special_tokens=False)` returning `input_ids`): loading it is the student's business
(`student.load_tokenizer`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .rows import row_text

PARTS = ("prompt", "response", "pair")
STATISTICS = ("count", "min", "max", "mean", "std")
BATCH = 512  # texts per tokenizer call
COUNTED = (
    "tokens of the prompt (instruction with any merged passage; no system prompt, no chat template), of the "
    "response, and of both (pair), without special tokens"
)


def count_tokens(texts: Sequence[str], tokenizer: Any, batch_size: int = BATCH) -> list[int]:
    """The number of tokens of each text under `tokenizer` (no special tokens), in batches."""
    counts: list[int] = []
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        counts += [len(ids) for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]]
    return counts


def describe(counts: Sequence[int]) -> dict[str, float | int | None]:
    """count, min, max, mean and population std of token counts (None for an empty split)."""
    values = np.asarray(list(counts), dtype=float)
    if values.size == 0:
        return {"count": 0, "min": None, "max": None, "mean": None, "std": None}
    return {
        "count": int(values.size),
        "min": int(values.min()),
        "max": int(values.max()),
        "mean": float(values.mean()),
        "std": float(values.std(ddof=0)),
    }


@dataclass
class TokenStatistics:
    """Per split and part, each row's token count (`counts`), and the statistics of them (`summary`); `error`
    says why there are none (the tokenizer could not be loaded)."""

    tokenizer: str
    counts: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    error: str | None = None
    categories: dict[str, list[str]] = field(default_factory=dict)  # per split, each row's category ("")

    def summary(self) -> dict[str, Any]:
        """What report.json and summary.json keep: the statistics, not the per-row counts ({"error"} when
        there are none)."""
        if self.error is not None:
            return {"tokenizer": self.tokenizer, "error": self.error}
        return {
            "tokenizer": self.tokenizer,
            "counted": COUNTED,
            "std": "population (ddof 0)",
            "splits": {
                split: {part: describe(values) for part, values in parts.items()}
                for split, parts in self.counts.items()
            },
            "by_category": self._by_category(),
        }

    def _by_category(self) -> dict[str, dict[str, dict]]:
        out: dict[str, dict[str, dict]] = {}
        for split, parts in self.counts.items():
            labels = self.categories.get(split) or [""] * len(parts["prompt"])
            for category in dict.fromkeys(labels):
                keep = [i for i, label in enumerate(labels) if label == category]
                out.setdefault(category, {})[split] = {
                    part: describe([values[i] for i in keep]) for part, values in parts.items()
                }
        return dict(sorted(out.items()))

    def table(self, by_category: bool = False):
        return token_table(self.summary(), by_category)


def token_statistics(
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    tokenizer: Any,
    name: str | None = None,
    batch_size: int = BATCH,
) -> TokenStatistics:
    """Token counts of every row's prompt, response and pair, per split (in the order given), under
    `tokenizer` (`name`: what the tables call it; default its `name_or_path`). A row that is not readable
    raises ValueError naming the split and the row (0-based)."""
    name = name or str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    stats = TokenStatistics(name)
    for split, rows in splits.items():
        prompts, responses, categories = [], [], []
        for i, row in enumerate(rows):
            try:
                prompt, response = row_text(row)
            except ValueError as exc:
                raise ValueError(f"{split} row {i}: {exc}") from exc
            prompts.append(prompt)
            responses.append(response)
            categories.append(str(row.get("category") or ""))
        stats.categories[split] = categories
        prompt_counts = count_tokens(prompts, tokenizer, batch_size)
        response_counts = count_tokens(responses, tokenizer, batch_size)
        stats.counts[split] = {
            "prompt": prompt_counts,
            "response": response_counts,
            "pair": [p + r for p, r in zip(prompt_counts, response_counts, strict=True)],
        }
    return stats


def token_table(summary: Mapping[str, Any], by_category: bool = False):
    """The appendix's layout from a `TokenStatistics.summary()` (as stored in report.json): one line per split
    and part (with `by_category`, per category, split and part: the paper's "Task (split)" rows), columns
    count, min, max, mean, std (mean and std rounded to 0.1)."""
    import pandas as pd

    if by_category:
        keys = ["category", "split", "part"]
        records = [
            {"category": category, "split": split, "part": part, **{k: stats.get(k) for k in STATISTICS}}
            for category, splits in (summary.get("by_category") or {}).items()
            for split, parts in splits.items()
            for part, stats in parts.items()
        ]
    else:
        keys = ["split", "part"]
        records = [
            {"split": split, "part": part, **{k: stats.get(k) for k in STATISTICS}}
            for split, parts in (summary.get("splits") or {}).items()
            for part, stats in parts.items()
        ]
    table = pd.DataFrame(records, columns=[*keys, *STATISTICS])
    for column in ("mean", "std"):
        table[column] = pd.to_numeric(table[column]).round(1)
    return table.set_index(keys)
