"""Token statistics of the run's data, per split (the appendix's Table 4 layout), under the student's tokenizer.

* `write_token_statistics(cfg, layout, result)`: 01's train and test splits, kept in report.json under
  `token_statistics` (or `{"error": ...}` when the student's tokenizer cannot be loaded: the statistics are
  left out, 01 goes on and says why).
* `run_token_statistics(cfg, layout)`: every split the run has on disk, train, test and each cycle's synthetic
  data (05's synthetic.jsonl), for the run summary.
* `plot_token_lengths(stats, path)`: the token counts per split, prompt and response, as box plots.

The counting itself is `dataquality.token_statistics` (one function, one home); the tokenizer is the student's
(`student.load_tokenizer`: the embedded default loads offline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..dataquality import TokenStatistics, token_statistics
from ..jsonio import read_json, read_jsonl, save_figure, write_json
from ..runlayout import RunLayout
from ..student import load_tokenizer

TOKEN_KEY = "token_statistics"  # report.json's key


def synthetic_split(cycle: int) -> str:
    """The name of cycle `cycle`'s synthetic data in the tables ("synthetic cycle_00")."""
    return f"synthetic cycle_{cycle:02d}"


def split_token_statistics(cfg: RunConfig, splits: dict[str, list[dict]]) -> TokenStatistics:
    """`dataquality.token_statistics` of `splits` under the student's tokenizer (`cfg.student`)."""
    return token_statistics(splits, load_tokenizer(cfg.student), cfg.student.model_id)


def write_token_statistics(cfg: RunConfig, layout: RunLayout, result: Any) -> TokenStatistics:
    """01: token statistics of the train and test splits of `result` (a `CoverageResult`), written into
    report.json and `result.report` (`token_statistics`). When the student's tokenizer cannot be loaded (a
    gated or missing model), the statistics' `error` says why (report.json too) and 01 goes on."""
    name = cfg.student.model_id
    try:
        tokenizer = load_tokenizer(cfg.student)
    except (OSError, ValueError, ImportError) as exc:
        problem = f"the student's tokenizer ({name}) could not be loaded: {type(exc).__name__}: {exc}"
        stats = TokenStatistics(name, error=problem)
    else:
        stats = token_statistics({"train": result.train, "test": result.test}, tokenizer, name)
    report = read_json(layout.coverage_report)
    report[TOKEN_KEY] = result.report[TOKEN_KEY] = stats.summary()
    write_json(layout.coverage_report, report)
    return stats


def run_splits(layout: RunLayout) -> dict[str, list[dict]]:
    """The run's data on disk: train, test (01) and each cycle's synthetic rows (05), in that order."""
    splits = {}
    for name, path in (("train", layout.train_file), ("test", layout.test_file)):
        if path.is_file():
            splits[name] = read_jsonl(path)
    for cycle in layout.cycles():
        if layout.synthetic_file(cycle).is_file():
            splits[synthetic_split(cycle)] = read_jsonl(layout.synthetic_file(cycle))
    return splits


def run_token_statistics(cfg: RunConfig, layout: RunLayout) -> dict[str, Any] | None:
    """The statistics (`TokenStatistics.summary()`) of every split the run has (`run_splits`), None without
    any data."""
    splits = run_splits(layout)
    return split_token_statistics(cfg, splits).summary() if splits else None


def plot_token_lengths(stats: TokenStatistics, path: str | Path | None = None):
    """Box plots of the token counts per split, one panel for prompts and one for responses (the whiskers
    reach the min and max, as the appendix's table does)."""
    import matplotlib.pyplot as plt

    splits = list(stats.counts)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), squeeze=False)
    for ax, part in zip(axes[0], ("prompt", "response"), strict=True):
        data = [stats.counts[s][part] or [0] for s in splits]
        ax.boxplot(data, whis=(0, 100), showmeans=True)
        ax.set_xticks(range(1, len(splits) + 1), splits, rotation=15)
        ax.set_title(f"{part.capitalize()} tokens per row")
        ax.set_ylabel("tokens")
    fig.suptitle(f"Token counts under {stats.tokenizer} (box: quartiles; whiskers: min-max; triangle: mean)")
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig
