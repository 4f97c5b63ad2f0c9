"""Plots of 04 and of the run: paper Fig. 2 (over cycles) and Fig. 3 (precision vs similarity per model).

Every plot shows the interval of what it draws where there is one, and is saved as PNG.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..jsonio import read_json, save_figure
from ..runlayout import RunLayout
from ..schemas import read_metrics
from .judging import METRICS
from .stats import score_table, zeta_key


def plot_scores(judgments: Iterable[dict], path: str | Path, zetas: Sequence[float] = (50.0, 70.0)):
    """Per-row mean precision vs similarity, one panel per judge, with the zeta lines; saved as PNG."""
    import matplotlib.pyplot as plt

    table = score_table(judgments)
    judges = list(dict.fromkeys(table["judge"])) or ["(no judgments)"]
    fig, axes = plt.subplots(1, len(judges), figsize=(4.6 * len(judges), 4.4), squeeze=False)
    for ax, judge in zip(axes[0], judges, strict=True):
        rows = table[(table["judge"] == judge) & (table["n_ok"] > 0)]
        _density(ax, rows)
        _zeta_lines(ax, zetas)
        unscored = int((table[table["judge"] == judge]["n_ok"] == 0).sum())
        ax.set_title(f"{judge}: {len(rows)} rows" + (f", {unscored} unscored" if unscored else ""))
    fig.suptitle("Precision vs similarity per (prompt, sample)")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def _density(ax, rows: pd.DataFrame) -> None:
    if len(rows) > 400:
        ax.hexbin(rows["precision"], rows["similarity"], gridsize=25, extent=(0, 100, 0, 100), mincnt=1)
    else:
        ax.scatter(rows["precision"], rows["similarity"], s=28, alpha=0.6)
    ax.set(xlim=(0, 101), ylim=(0, 101), xlabel="precision (row mean)", ylabel="similarity (row mean)")


def _zeta_lines(ax, zetas: Sequence[float]) -> None:
    for zeta in zetas:
        ax.axvline(zeta, color="grey", lw=0.8, ls="--")
        ax.axhline(zeta, color="grey", lw=0.8, ls="--")
    ax.plot([0, 100], [0, 100], color="lightgrey", lw=0.8)


def plot_models_scores(
    models: Mapping[str, tuple[str, Sequence[dict]]],
    judges: Sequence[str],
    path: str | Path,
    zetas: Sequence[float] = (50.0, 70.0),
):
    """Paper Fig. 3: precision vs similarity density, a row of panels per LLM judge, a column per model.

    Reference-metric judges score both metrics alike (their points sit on the diagonal): left out.
    """
    import matplotlib.pyplot as plt

    names = list(models)
    judges = list(judges) or ["(no LLM judge)"]
    fig, axes = plt.subplots(
        len(judges), len(names), figsize=(3.4 * len(names), 3.3 * len(judges)), squeeze=False
    )
    for r, judge in enumerate(judges):
        for c, name in enumerate(names):
            table = score_table(models[name][1])
            rows = table[(table["judge"] == judge) & (table["n_ok"] > 0)] if len(table) else table
            ax = axes[r][c]
            _density(ax, rows)
            _zeta_lines(ax, zetas)
            ax.set_title(f"{name} | {judge} ({len(rows)} rows)", fontsize=9)
            if c:
                ax.set_ylabel("")
            if r < len(judges) - 1:
                ax.set_xlabel("")
    fig.suptitle("Precision vs similarity per model and judge (paper Fig. 3)")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def plot_category_histograms(judgments: Iterable[dict], path: str | Path, metric: str = "precision"):
    """Histogram of the rows' mean `metric` per task category, one colour per judge."""
    import matplotlib.pyplot as plt

    table = score_table(judgments)
    table = table[table["n_ok"] > 0] if len(table) else table
    categories = sorted(set(table["category"])) or ["(none)"]
    fig, axes = plt.subplots(1, len(categories), figsize=(3.6 * len(categories), 3.2), squeeze=False)
    bins = np.linspace(0, 100, 21)
    for ax, category in zip(axes[0], categories, strict=True):
        for judge, rows in table[table["category"] == category].groupby("judge", sort=False):
            ax.hist(rows[metric].astype(float), bins=bins, alpha=0.55, label=str(judge))
        ax.set(title=category or "(none)", xlabel=f"{metric} (row mean)", xlim=(0, 100))
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("rows")
    fig.suptitle(f"{metric} by task category")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- over cycles (Fig. 2)


def cycles_frame(layout: RunLayout) -> pd.DataFrame:
    """One line per (cycle, judge, metric, statistic) from every cycle's metrics.json, with its interval
    and the cycle's training-set size (finetune.json `rows`)."""
    records = []
    for cycle in layout.cycles():
        metrics = read_metrics(layout, cycle)
        if metrics is None:
            continue
        train = layout.train_summary(cycle)
        train_rows = read_json(train).get("rows") if train.is_file() else None
        keys = ["mean", *(zeta_key(z) for z in metrics.get("zetas", []))]
        for judge, entry in metrics.get("per_judge", {}).items():
            for metric in METRICS:
                stats = entry.get(metric, {})
                for key in keys:
                    ci = stats.get(f"{key}_ci95")
                    records.append(
                        {
                            "cycle": cycle,
                            "train_rows": train_rows,
                            "judge": judge,
                            "metric": metric,
                            "statistic": key,
                            "value": stats.get(key),
                            "ci_low": ci[0] if ci else None,
                            "ci_high": ci[1] if ci else None,
                        }
                    )
    return pd.DataFrame(
        records,
        columns=["cycle", "train_rows", "judge", "metric", "statistic", "value", "ci_low", "ci_high"],
    )


def reference_lines(long: pd.DataFrame) -> dict[str, dict]:
    """{model: {judge: {metric: {statistic: value}}}} of Table 1's base and service rows (Fig. 2's lines)."""
    lines: dict[str, dict] = {}
    for _, r in long[long["kind"].isin(["base", "service"])].iterrows():
        if pd.notna(r["value"]):
            lines.setdefault(r["model"], {}).setdefault(r["judge"], {}).setdefault(r["metric"], {})[
                r["statistic"]
            ] = float(r["value"])
    return lines


def plot_cycles(layout: RunLayout, epsilon: float, path: str | Path | None = None, references=None):
    """Paper Fig. 2: V and C@zeta per judge against cycle (and training-set size), 95% bands, epsilon line.

    `references` ({label: {judge: {metric: {stat: value}}}}, e.g. the base student and the baselines)
    are drawn as horizontal lines. Saved to `path` (default: <run>/fig2_cycles.png).
    """
    import matplotlib.pyplot as plt

    frame = cycles_frame(layout)
    stats = list(dict.fromkeys(frame["statistic"])) or ["mean"]
    fig, axes = plt.subplots(
        len(stats), len(METRICS), figsize=(5.2 * len(METRICS), 3.0 * len(stats)), squeeze=False
    )
    for r, stat in enumerate(stats):
        for c, metric in enumerate(METRICS):
            ax = axes[r][c]
            part = frame[(frame["statistic"] == stat) & (frame["metric"] == metric)]
            for judge, rows in part.groupby("judge", sort=False):
                rows = rows.sort_values("cycle")
                x, y = rows["cycle"].to_numpy(), rows["value"].astype(float).to_numpy()
                (line,) = ax.plot(x, y, marker="o", label=str(judge))
                lo, hi = rows["ci_low"].astype(float), rows["ci_high"].astype(float)
                if lo.notna().all():
                    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18)
            for label, per_judge in (references or {}).items():
                for judge, value in per_judge.items():
                    v = value.get(metric, {}).get(stat)
                    if v is not None:
                        ax.axhline(v, lw=0.9, ls=":", color="grey")
                        ax.annotate(f"{label} ({judge})", (0, v), fontsize=7, color="grey")
            ax.axhline(epsilon, color="red", lw=1.0, ls="--", label=f"epsilon {epsilon:g}")
            ticks = part.drop_duplicates("cycle").sort_values("cycle")
            ax.set_xticks(ticks["cycle"].tolist())
            ax.set_xticklabels(
                [f"{c}\n{n if n is not None and not pd.isna(n) else '?'} rows" for c, n in
                 zip(ticks["cycle"], ticks["train_rows"], strict=True)],
                fontsize=8,
            )  # fmt: skip
            name = "V" if stat == "mean" else stat.replace("c@", "C@")
            ax.set(ylim=(0, 101), title=f"{name} of {metric}", xlabel="cycle / training rows")
            ax.legend(fontsize=7)
    fig.suptitle("Over cycles (paper Fig. 2): 95% cluster-bootstrap bands")
    fig.tight_layout()
    save_figure(fig, path or layout.cycles_fig2_plot)
    return fig
