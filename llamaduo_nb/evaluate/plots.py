"""Plots of 04 and of the run: paper Fig. 2 (over cycles) and Fig. 3 (precision vs similarity per model).

Every plot shows the interval of what it draws where there is one, and is saved as PNG.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..jsonio import save_figure
from ..runlayout import RunLayout
from ..schemas import evaluated_cycles
from .judging import METRICS
from .metric_judges import METRIC_JUDGES
from .stats import score_table, zeta_key


def plot_scores(judgments: Iterable[dict], path: str | Path, zetas: Sequence[float] = (50.0, 70.0)):
    """Per-row mean precision vs similarity, one panel per judge, with the zeta lines (a reference metric,
    whose precision equals its similarity, gets a histogram of its one score); saved as PNG."""
    import matplotlib.pyplot as plt

    table = score_table(judgments)
    judges = list(dict.fromkeys(table["judge"])) or ["(no judgments)"]
    fig, axes = plt.subplots(1, len(judges), figsize=(4.6 * len(judges), 4.4), squeeze=False)
    for ax, judge in zip(axes[0], judges, strict=True):
        rows = table[(table["judge"] == judge) & (table["n_ok"] > 0)]
        if judge in METRIC_JUDGES:  # precision = similarity: a histogram of the one score, not a diagonal
            ax.hist(rows["precision"].astype(float), bins=np.linspace(0, 100, 21), color="#1f77b4", alpha=0.8)
            for zeta in zetas:
                ax.axvline(zeta, color="grey", lw=0.8, ls="--")
            ax.set(xlim=(0, 101), xlabel="score (row mean; precision = similarity)", ylabel="rows")
        else:
            _density(ax, rows)
            _zeta_lines(ax, zetas)
        unscored = int((table[table["judge"] == judge]["n_ok"] == 0).sum())
        ax.set_title(f"{judge}: {len(rows)} rows" + (f", {unscored} unscored" if unscored else ""))
    fig.suptitle("Scores per (prompt, sample)")
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
    for cycle, metrics, train_rows in evaluated_cycles(layout):
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


METRIC_STYLE = {
    "precision": {"color": "#1f77b4", "marker": "o"},
    "similarity": {"color": "#ff7f0e", "marker": "s"},
}
REFERENCE_STYLES = (":", "-.", (0, (5, 2)), (0, (1, 3)))  # one linestyle per reference model (base, services)


def plot_cycles(layout: RunLayout, epsilon: float, path: str | Path | None = None, references=None):
    """Paper Fig. 2: V and C@zeta against cycle (and training-set size), a row per statistic and a column per
    judge, 95% bands, the epsilon line.

    A reference metric (precision = similarity) draws one line, an LLM judge one per metric.
    `references` ({label: {judge: {metric: {stat: value}}}}, e.g. the base student and the baselines) are
    horizontal lines in the metric's colour, one linestyle per reference model, named in the figure's one
    legend below the panels (no label inside a panel, so none can collide). Saved to `path` (default:
    <run>/fig2_cycles.png).
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    frame = cycles_frame(layout)
    stats = list(dict.fromkeys(frame["statistic"])) or ["mean"]
    judges = list(dict.fromkeys(frame["judge"])) or ["(no judgments)"]
    shown = {j: _fig_metrics(j) for j in judges}
    refs = list(references or {})
    ref_style = {label: REFERENCE_STYLES[i % len(REFERENCE_STYLES)] for i, label in enumerate(refs)}
    fig, axes = plt.subplots(
        len(stats), len(judges), figsize=(4.2 * len(judges), 2.6 * len(stats) + 0.9), squeeze=False,
        sharex=True, sharey=True,
    )  # fmt: skip
    ticks = frame.drop_duplicates("cycle").sort_values("cycle")
    for r, stat in enumerate(stats):
        for c, judge in enumerate(judges):
            ax = axes[r][c]
            for metric in shown[judge]:
                rows = frame[
                    (frame["statistic"] == stat) & (frame["metric"] == metric) & (frame["judge"] == judge)
                ]
                rows = rows.sort_values("cycle")
                x, y = rows["cycle"].to_numpy(), rows["value"].astype(float).to_numpy()
                style = METRIC_STYLE[metric]
                ax.plot(x, y, marker=style["marker"], color=style["color"], lw=1.6, ms=5)
                lo, hi = rows["ci_low"].astype(float), rows["ci_high"].astype(float)
                if len(rows) and lo.notna().all():
                    ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15, lw=0)
                for label in refs:
                    v = (references[label].get(judge) or {}).get(metric, {}).get(stat)
                    if v is not None:
                        ax.axhline(v, lw=1.1, ls=ref_style[label], color=style["color"], alpha=0.8)
            ax.axhline(epsilon, color="#d62728", lw=1.0, ls="--")
            ax.set_ylim(0, 101)
            ax.grid(axis="y", color="#eeeeee", lw=0.6)
            if r == 0:
                kind = "reference metric" if shown[judge] == ("precision",) else "LLM judge"
                ax.set_title(f"{judge} ({kind})", fontsize=10)
            if c == 0:
                ax.set_ylabel("V" if stat == "mean" else stat.replace("c@", "C@"))
            if r == len(stats) - 1:
                ax.set_xticks(ticks["cycle"].tolist())
                ax.set_xticklabels(
                    [f"{cy}\n{n if n is not None and not pd.isna(n) else '?'} rows" for cy, n in
                     zip(ticks["cycle"], ticks["train_rows"], strict=True)],
                    fontsize=8,
                )  # fmt: skip
                ax.set_xlabel("cycle / training rows", fontsize=9)
            if len(ticks) == 1:
                only = float(ticks["cycle"].iloc[0])
                ax.set_xlim(only - 0.5, only + 0.5)
    handles = [
        Line2D([], [], color=METRIC_STYLE[m]["color"], marker=METRIC_STYLE[m]["marker"], label=m)
        for m in METRICS
        if any(m in ms for ms in shown.values())
    ]
    handles += [
        Line2D([], [], color="grey", ls=ref_style[label], label=f"{label} (reference)") for label in refs
    ]
    handles.append(Line2D([], [], color="#d62728", ls="--", label=f"epsilon {epsilon:g}"))
    fig.suptitle("Over cycles (paper Fig. 2): 95% cluster-bootstrap bands")
    fig.legend(handles=handles, loc="lower center", ncols=min(len(handles), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05 if len(handles) <= 5 else 0.09, 1, 1))
    save_figure(fig, path or layout.cycles_fig2_plot)
    return fig


def _fig_metrics(judge: str) -> tuple[str, ...]:
    """A reference metric scores precision = similarity: one line."""
    return ("precision",) if judge in METRIC_JUDGES else METRICS


def text_overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of drawn, non-empty texts of `fig` (suptitle, titles, axis labels, the tick labels inside each
    axis' view, legend entries) whose rendered boxes overlap: a figure people read has none."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [*fig.texts]
    if fig._suptitle is not None:
        texts.append(fig._suptitle)
    for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes)]:
        if legend is not None:
            texts += legend.get_texts()
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            pad = (hi - lo) * 1e-6
            texts += [
                t.label1
                for t in axis.get_major_ticks()
                if lo - pad <= t.get_loc() <= hi + pad and t.label1.get_visible()
            ]
    unique = {id(t): t for t in texts if t.get_visible() and str(t.get_text()).strip()}
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in unique.values()]
    return [
        (a, b)
        for i, (a, box_a) in enumerate(boxes)
        for b, box_b in boxes[i + 1 :]
        if box_a.overlaps(box_b) and box_a.width > 0 and box_b.width > 0
    ]
