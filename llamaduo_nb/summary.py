"""The run's summary (`summary.md`, `summary.json`): per-cycle statistics with intervals, the decision and
its reason, the latest Table 1 with P-Match, Fig. 2 over cycles, and where the time went.

`runner.run()` calls `write_summary` at the end of a run; 06 and the docs show `table1_markdown`.
"""

from __future__ import annotations

from typing import Any

from .config import RunConfig
from .jsonio import atomic_write, read_json, write_json
from .runlayout import RunLayout


def _cell(stats: dict) -> str:
    """`mean / C@50 / C@70 [lo-hi of the mean]` of one metric in metrics.json."""
    if stats.get("mean") is None:
        return "n/a"
    cells = [f"{stats['mean']:.2f}"] + [
        f"{v:.0f}%"
        for k, v in stats.items()
        if k.startswith("c@") and not k.endswith("_ci95") and isinstance(v, int | float)
    ]
    text = " / ".join(cells)
    ci = stats.get("mean_ci95")
    return text + (f" [{ci[0]:.1f}-{ci[1]:.1f}]" if ci else "")


def cycle_rows(layout: RunLayout) -> list[dict[str, Any]]:
    """One row per evaluated cycle: training volume, V and C@zeta per judge and metric, the decision."""
    rows = []
    for cycle in layout.cycles():
        path = layout.metrics_file(cycle)
        if not path.is_file():
            continue
        metrics = read_json(path)
        row: dict[str, Any] = {"cycle": cycle}
        train = layout.train_summary(cycle)
        if train.is_file():
            row["train_rows"] = read_json(train).get("rows")
        for judge, entry in metrics.get("per_judge", {}).items():
            for metric in ("precision", "similarity"):
                row[f"{judge} {metric}"] = _cell(entry.get(metric, {}))
            if "n_rows" in entry:
                row[f"{judge} rows scored"] = (
                    f"{entry['n_rows'] - entry.get('rows_unscored', 0)}/{entry['n_rows']}"
                )
        decision = metrics.get("decision", {})
        row["decision value"] = None if decision.get("value") is None else round(decision["value"], 2)
        row["passed"] = decision.get("passed")
        row["reason"] = decision.get("reason", "")
        rows.append(row)
    return rows


def latest_table1_cycle(layout: RunLayout) -> int | None:
    cycles = [c for c in layout.cycles() if layout.table1_md(c).is_file()]
    return cycles[-1] if cycles else None


def table1_markdown(layout: RunLayout, cycle: int | None = None) -> str:
    """Table 1 (models x judges x metric, with intervals and P-Match) of `cycle` (default: the latest)."""
    cycle = latest_table1_cycle(layout) if cycle is None else cycle
    if cycle is None or not layout.table1_md(cycle).is_file():
        return "_No Table 1 yet: run 04_evaluate._\n"
    return layout.table1_md(cycle).read_text(encoding="utf-8")


def _md(rows: list[dict[str, Any]]) -> list[str]:
    headers = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(r.get(h, "")).replace("|", "\\|") for h in headers) + " |" for r in rows]
    return lines


def write_summary(cfg: RunConfig, layout: RunLayout, state: Any) -> str:
    """summary.md + summary.json: the story of the run's cycles, Table 1, Fig. 2 and the time per notebook."""
    from .evaluate.stats import decision_rule_text

    rows = cycle_rows(layout)
    ev = cfg.evaluate
    lines = [
        f"# Run {cfg.run_name}",
        "",
        f"Stopped: {state.stop_reason}.",
        f"Decision rule: {decision_rule_text(ev)}.",
        "",
        "## Cycles",
        "",
        "Each cell is mean / C@zeta for zeta in "
        + ", ".join(f"{z:g}" for z in ev.zetas)
        + " [95% cluster-bootstrap interval of the mean].",
        "",
    ]
    if rows:
        lines += _md(rows)
    t1 = latest_table1_cycle(layout)
    if t1 is not None:
        lines += ["", f"## Table 1 (cycle {t1})", "", table1_markdown(layout, t1).rstrip("\n")]
    fig2 = None
    if rows:
        try:
            import pandas as pd

            from .evaluate.plots import plot_cycles, reference_lines

            refs = reference_lines(pd.read_csv(layout.table1_csv(t1))) if t1 is not None else None
            fig = plot_cycles(layout, ev.epsilon, references=refs)
            import matplotlib.pyplot as plt

            plt.close(fig)
            fig2 = layout.cycles_fig2_plot
        except Exception as exc:  # a plot must never cost the run its summary
            lines += ["", f"(Fig. 2 could not be drawn: {type(exc).__name__}: {exc})"]
    if fig2 is not None:
        lines += ["", "## Over cycles (paper Fig. 2)", "", f"![V and C@zeta over cycles]({fig2.name})"]
    lines += ["", "## Time per notebook (s)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in state.timings.items()]
    text = "\n".join(lines) + "\n"
    with atomic_write(layout.summary_file) as fh:
        fh.write(text)
    write_json(
        layout.summary_json,
        {
            "cycles": rows,
            "table1_cycle": t1,
            "stop_reason": state.stop_reason,
            "timings": state.timings,
        },
    )
    return text
