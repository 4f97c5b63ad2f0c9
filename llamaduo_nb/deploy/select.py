"""06 step 1: which cycle to ship (the first that met epsilon, or the best by the decision value)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..jsonio import save_figure
from ..runlayout import RunLayout
from ..schemas import read_metrics


class DeployError(RuntimeError):
    """06 cannot go on; the message says which file or setting and what to do."""


@dataclass(frozen=True)
class CycleChoice:
    cycle: int
    select: str
    reason: str
    value: float | None
    passed: bool


def _count_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def cycle_table(layout: RunLayout) -> pd.DataFrame:
    """One line per cycle folder: training rows, synthetic rows, decision value and verdict, adapter present."""
    records = []
    for cycle in layout.cycles():
        metrics = read_metrics(layout, cycle)
        decision = metrics.get("decision", {}) if metrics is not None else {}
        records.append(
            {
                "cycle": cycle,
                "train_rows": _count_lines(layout.train_data_file(cycle)),
                "synthetic_rows": _count_lines(layout.synthetic_file(cycle)),
                "statistic": f"{decision.get('statistic', '')}({decision.get('metric', '')})"
                if decision
                else "",
                "value": decision.get("value"),
                "epsilon": decision.get("epsilon"),
                "passed": bool(decision.get("passed", False)),
                "has_metrics": metrics is not None,
                "has_adapter": (layout.adapter_dir(cycle) / "adapter_config.json").is_file(),
            }
        )
    columns = [
        "cycle",
        "train_rows",
        "synthetic_rows",
        "statistic",
        "value",
        "epsilon",
        "passed",
        "has_metrics",
        "has_adapter",
    ]
    return pd.DataFrame(records, columns=columns)


def select_cycle(layout: RunLayout, select: str) -> CycleChoice:
    """The cycle to ship: `first_passing` (earliest that met epsilon, else the best) or `best` by value."""
    table = cycle_table(layout)
    usable = table[table["has_metrics"] & table["has_adapter"]]
    if usable.empty:
        raise DeployError(
            f"no cycle under {layout.root} has both an adapter (cycle_NN/adapter/adapter_config.json) and "
            "a metrics.json; run 02_finetune, 03_batch_inference and 04_evaluate for at least one cycle first"
        )
    if select not in ("first_passing", "best"):
        raise DeployError(f"deploy.select must be 'first_passing' or 'best', got {select!r}")
    if select == "first_passing":
        passing = usable[usable["passed"]]
        if not passing.empty:
            row = passing.iloc[0]
            return CycleChoice(
                int(row["cycle"]),
                select,
                f"cycle {int(row['cycle'])} is the first to meet epsilon "
                f"({row['value']:.2f} >= {row['epsilon']:g})",
                _num(row["value"]),
                True,
            )
    scored = usable.assign(sort_value=usable["value"].astype(float).fillna(-np.inf))
    best = scored.sort_values(["sort_value", "cycle"], ascending=[False, True]).iloc[0]
    value = _num(best["value"])
    shown = "n/a" if value is None else f"{value:.2f}"
    reason = f"cycle {int(best['cycle'])} has the best decision value ({shown})"
    if select == "first_passing":
        reason = f"no cycle met epsilon; shipping the best instead: {reason}"
    return CycleChoice(int(best["cycle"]), select, reason, value, bool(best["passed"]))


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else value


def plot_cycles(table: pd.DataFrame, choice: CycleChoice, path: str | Path):
    """Decision value per cycle, epsilon as a line, the shipped cycle highlighted; saved as PNG."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    values = table["value"].astype(float).fillna(0.0)
    colours = ["tab:orange" if c == choice.cycle else "tab:blue" for c in table["cycle"]]
    ax.bar(table["cycle"].astype(str), values, color=colours)
    epsilons = table["epsilon"].dropna()
    if not epsilons.empty:
        ax.axhline(
            float(epsilons.iloc[-1]), color="grey", ls="--", lw=1, label=f"epsilon = {epsilons.iloc[-1]:g}"
        )
        ax.legend(loc="lower right")
    ax.set(
        xlabel="cycle",
        ylabel=str(table["statistic"].iloc[0]) if len(table) else "value",
        ylim=(0, 100),
        title=f"Decision value per cycle (shipping cycle {choice.cycle})",
    )
    fig.tight_layout()
    save_figure(fig, path)
    return fig
