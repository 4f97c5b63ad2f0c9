"""Tables people read: paper Table 1 (models x judges x metric, with P-Match), the decision, failures.

Table 1 keeps the paper's cell format `mean / C@50 / C@70` and adds what the paper leaves out: the 95%
cluster-bootstrap interval of each statistic and the rows a judge could score (failed judgments are
excluded, so every cell says on how many rows it rests). The P-Match row is, per judge and metric,
100 x (best local model) / (best service model) for each statistic, "best" taken per statistic; it is shown
only where the best service value is at least `P_MATCH_MIN_SERVICE` (below that the service model does not do
the task by that judge's measure, and a ratio against it says nothing: 1 -> 34 read as 3400%).
A reference metric (ROUGE-L, chrF, exact match) scores precision = similarity: its Table-1 column is one.
The Markdown form puts the intervals in a second table of the same shape, so both stay narrow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from .. import jsonio
from ..config import EvaluateConfig
from ..jsonio import atomic_write
from .judging import METRICS
from .metric_judges import METRIC_JUDGES
from .stats import metric_summary, score_table, summarize, zeta_key

P_MATCH_MIN_SERVICE = 50.0  # mean on the 1..100 scale, or C@zeta in percent
P_MATCH_NOTE = (
    f"P-Match = 100 x best local / best service, shown only where the best service value is at least "
    f"{P_MATCH_MIN_SERVICE:g} (—: the service model does not do the task by that measure, a ratio against it "
    "says nothing)."
)
BASE_MODEL = "base student"  # Table-1 label of the student before fine-tuning (providers cannot hold spaces)
KINDS = ("base", "local", "service")


def cycle_label(cycle: int) -> str:
    return f"cycle {cycle}"


def _stat_keys(zetas: Sequence[float]) -> list[str]:
    return ["mean", *(zeta_key(z) for z in zetas)]


def _fmt_cell(summary: dict, zetas: Sequence[float]) -> str:
    if summary.get("mean") is None:
        return "n/a"
    parts = [f"{summary['mean']:.2f}"] + [f"{summary[zeta_key(z)]:.0f}%" for z in zetas]
    return " / ".join(parts)


def _fmt_ci(summary: dict, zetas: Sequence[float]) -> str:
    cis = [summary.get(f"{key}_ci95") for key in _stat_keys(zetas)]
    if any(ci is None for ci in cis):
        return ""
    return "[" + " / ".join(f"{lo:.0f}-{hi:.0f}" for lo, hi in cis) + "]"


# --------------------------------------------------------------------------- Table 1


def table1_long(
    models: Mapping[str, tuple[str, Sequence[dict]]],
    cfg: EvaluateConfig,
    *,
    n_boot: int | None = None,
) -> pd.DataFrame:
    """Every statistic of every (model, judge, metric) with its interval and the rows scored.

    `models` maps a row label to (kind, judgments) with kind one of "base", "local", "service", in the
    order the rows should appear. Columns: model, kind, judge, metric, statistic, value, ci_low, ci_high,
    rows_scored, rows.
    """
    n_boot = cfg.bootstrap_samples if n_boot is None else n_boot
    records = []
    for model, (kind, judgments) in models.items():
        if kind not in KINDS:
            raise ValueError(f"model {model!r}: kind {kind!r} is not one of {KINDS}")
        per_judge = summarize(judgments, cfg.zetas, n_boot=n_boot, seed=cfg.bootstrap_seed)
        for judge in cfg.all_judges:
            entry = per_judge.get(judge)
            for metric in METRICS:
                for key in _stat_keys(cfg.zetas):
                    summary = entry[metric] if entry else {}
                    ci = summary.get(f"{key}_ci95")
                    records.append(
                        {
                            "model": model,
                            "kind": kind,
                            "judge": judge,
                            "metric": metric,
                            "statistic": key,
                            "value": summary.get(key),
                            "ci_low": ci[0] if ci else None,
                            "ci_high": ci[1] if ci else None,
                            "rows_scored": (entry["n_rows"] - entry["rows_unscored"]) if entry else 0,
                            "rows": entry["n_rows"] if entry else 0,
                        }
                    )
    return pd.DataFrame(
        records,
        columns=["model", "kind", "judge", "metric", "statistic", "value", "ci_low", "ci_high"]
        + ["rows_scored", "rows"],
    )


def p_match(long: pd.DataFrame) -> pd.DataFrame:
    """P-Match per (judge, metric, statistic): 100 x best local (base or cycle) / best service value.

    Columns: judge, metric, statistic, best_local, best_local_model, best_service, best_service_model,
    p_match (None when either side has no value).
    """
    records = []
    for (judge, metric, stat), group in long.groupby(["judge", "metric", "statistic"], sort=False):
        local = group[group["kind"].isin(["base", "local"])].dropna(subset=["value"])
        service = group[group["kind"] == "service"].dropna(subset=["value"])
        best_local = local.loc[local["value"].idxmax()] if len(local) else None
        best_service = service.loc[service["value"].idxmax()] if len(service) else None
        ratio = None
        if best_local is not None and best_service is not None and best_service["value"] > 0:
            ratio = 100.0 * float(best_local["value"]) / float(best_service["value"])
        records.append(
            {
                "judge": judge,
                "metric": metric,
                "statistic": stat,
                "best_local": None if best_local is None else float(best_local["value"]),
                "best_local_model": None if best_local is None else best_local["model"],
                "best_service": None if best_service is None else float(best_service["value"]),
                "best_service_model": None if best_service is None else best_service["model"],
                "p_match": ratio,
            }
        )
    return pd.DataFrame(records)


def _metrics_shown(judge: str) -> tuple[str, ...]:
    """A reference metric's precision equals its similarity: one column (its precision) is enough."""
    return ("precision",) if judge in METRIC_JUDGES else METRICS


def _column(judge: str, metric: str) -> str:
    return judge if judge in METRIC_JUDGES else f"{judge} {metric}"


def table1(
    long: pd.DataFrame, zetas: Sequence[float], *, intervals: bool = True, only_intervals: bool = False
) -> pd.DataFrame:
    """Paper Table 1: a line per model plus P-Match; a column per (judge, metric): `mean / C@50 / C@70`
    (one column per reference metric, whose precision equals its similarity).

    Each cell ends with the rows scored (`n=18/20`) and, when `intervals`, the 95% intervals in the same
    order (`[61-72 / 40-80 / 10-45]`); `only_intervals` gives the intervals alone (no P-Match row).
    """
    keys = _stat_keys(zetas)
    columns: list[str] = []
    rows: dict[str, dict[str, str]] = {}
    for (model, judge, metric), group in long.groupby(["model", "judge", "metric"], sort=False):
        if metric not in _metrics_shown(judge):
            continue
        column = _column(judge, metric)
        if column not in columns:
            columns.append(column)
        by_stat = group.set_index("statistic")
        values = [by_stat.loc[k, "value"] for k in keys]
        if any(v is None or pd.isna(v) for v in values):
            cell = "n/a"
        else:
            cell = " / ".join([f"{values[0]:.2f}"] + [f"{v:.0f}%" for v in values[1:]])
        first = group.iloc[0]
        cell += f" (n={int(first['rows_scored'])}/{int(first['rows'])})"
        lows, highs = [by_stat.loc[k, "ci_low"] for k in keys], [by_stat.loc[k, "ci_high"] for k in keys]
        ci = ""
        if not any(v is None or pd.isna(v) for v in lows + highs):
            ci = "[" + " / ".join(f"{lo:.0f}-{hi:.0f}" for lo, hi in zip(lows, highs, strict=True)) + "]"
        if only_intervals:
            cell = ci or "n/a"
        elif intervals and ci:
            cell += " " + ci
        rows.setdefault(model, {})[column] = cell
    match = p_match(long)
    if len(match) and (long["kind"] == "service").any() and not only_intervals:
        pm_row = {}
        for (judge, metric), group in match.groupby(["judge", "metric"], sort=False):
            if metric not in _metrics_shown(judge):
                continue
            by_stat = group.set_index("statistic")
            cells = []
            for k in keys:
                ratio, service = by_stat.loc[k, "p_match"], by_stat.loc[k, "best_service"]
                if ratio is None or pd.isna(ratio):
                    cells.append("n/a")
                elif service is None or pd.isna(service) or service < P_MATCH_MIN_SERVICE:
                    cells.append("—")
                else:
                    cells.append(f"{ratio:.0f}%")
            pm_row[_column(judge, metric)] = " / ".join(cells)
        rows["P-Match (best local / best service)"] = pm_row
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=columns)
    frame.index.name = "model"
    header = "mean / " + " / ".join(f"C@{z:g}" for z in zetas)
    frame.columns = [f"{c} ({header})" for c in frame.columns]
    return frame


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of `frame` with its index as the first column (`jsonio.markdown_table`)."""
    rows = [[label, *("" if pd.isna(v) else v for v in row.tolist())] for label, row in frame.iterrows()]
    return jsonio.markdown_table([frame.index.name or "", *frame.columns], rows) + "\n"


def write_table1(long: pd.DataFrame, zetas: Sequence[float], csv_path: Path, md_path: Path) -> pd.DataFrame:
    """Write Table 1 as CSV (every statistic, interval and row count, long form) and Markdown (paper form)."""
    wide = table1(long, zetas)
    with atomic_write(csv_path) as fh:
        long.to_csv(fh, index=False)
    stats = "mean / " + " / ".join(f"C@{z:g}" for z in zetas)

    def short(frame: pd.DataFrame) -> pd.DataFrame:  # the caption says what a cell holds
        return frame.rename(columns=lambda c: c.removesuffix(f" ({stats})"))

    text = f"Cells: {stats} (n = rows scored / rows); a reference metric (precision = similarity) has one column.\n\n"
    text += markdown_table(short(table1(long, zetas, intervals=False)))
    if (long["kind"] == "service").any():
        text += "\n" + P_MATCH_NOTE + "\n"
    text += "\n95% cluster-bootstrap intervals, same cells and order:\n\n"
    text += markdown_table(short(table1(long, zetas, only_intervals=True)))
    with atomic_write(md_path) as fh:
        fh.write(text)
    return wide


# --------------------------------------------------------------------------- this cycle's tables


def results_table(metrics: dict) -> pd.DataFrame:
    """One line per judge of this cycle: `mean / C@50 / C@70` per metric, intervals, failures (a reference
    metric's similarity, equal to its precision, reads "(same)")."""
    zetas = metrics["zetas"]
    header = "mean / " + " / ".join(f"C@{z:g}" for z in zetas)
    records = []
    for judge, entry in metrics["per_judge"].items():
        same = judge in METRIC_JUDGES
        records.append(
            {
                "judge": judge,
                f"precision ({header})": _fmt_cell(entry["precision"], zetas),
                "precision 95% CI": _fmt_ci(entry["precision"], zetas),
                f"similarity ({header})": "(same)" if same else _fmt_cell(entry["similarity"], zetas),
                "similarity 95% CI": "" if same else _fmt_ci(entry["similarity"], zetas),
                "rows scored": f"{entry['n_rows'] - entry['rows_unscored']}/{entry['n_rows']}",
                "failed judgments": f"{entry['failures']}/{entry['judgments']} ({100 * entry['failure_rate']:.0f}%)",
            }
        )
    return pd.DataFrame(records).set_index("judge")


def decision_table(metrics: dict) -> pd.DataFrame:
    """The epsilon decision: each deciding judge's checks, rows scored and verdict, then the combined one."""
    decision = metrics["decision"]
    records = []
    for judge, d in decision["per_judge"].items():
        record = {"judge": judge}
        record.update({k: v for k, v in d.items() if "(" in k})
        record.update(
            {"value": d["value"], "rows scored": f"{d['rows_scored']}/{d['rows']}", "passed": d["passed"]}
        )
        records.append(record)
    combined = {"judge": f"{decision['aggregation']} over judges"}
    combined.update({c["check"]: c["value"] for c in decision.get("checks", [])})
    combined.update({"value": decision["value"], "rows scored": "", "passed": decision["passed"]})
    records.append(combined)
    return pd.DataFrame(records).set_index("judge")


def responses_preview(rows: Sequence[dict], n: int = 5, width: int = 80) -> pd.DataFrame:
    """The first rows to be judged, texts shortened."""
    columns = ["prompt_id", "sample_index", "category", "instruction", "candidate"]
    frame = pd.DataFrame(list(rows[:n])).reindex(columns=columns)
    for column in ("instruction", "candidate"):
        frame[column] = frame[column].str.slice(0, width)
    return frame


def failure_table(judgments: Iterable[dict]) -> pd.DataFrame:
    """Failed judgments per judge and kind (request error / unparseable / out of range / answer failed)."""
    frame = pd.DataFrame([j for j in judgments if not j["ok"]])
    if frame.empty:
        return pd.DataFrame(columns=["judge", "kind", "count", "example"])
    frame["kind"] = frame["error"].fillna("unknown").str.split(":", n=1).str[0]
    grouped = frame.groupby(["judge", "kind"])
    return grouped.agg(count=("ok", "size"), example=("error", "first")).reset_index()


def category_table(
    judgments: Iterable[dict], zetas: Sequence[float], *, n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """Per judge and task category: rows scored, `mean / C@zeta` per metric and its 95% intervals (a reference
    metric's similarity reads "(same)")."""

    table = score_table(judgments)
    records = []
    for (judge, category), rows in table.groupby(["judge", "category"], sort=True):
        record = {"judge": judge, "category": category or "(none)", "rows": len(rows)}
        for metric in METRICS:
            if metric not in _metrics_shown(judge):  # a reference metric's similarity is its precision
                record[metric], record[f"{metric} 95% CI"] = "(same)", ""
                continue
            summary = metric_summary(
                rows[metric].tolist(), zetas, clusters=rows["prompt_id"].tolist(), n_boot=n_boot, seed=seed
            )
            record[metric] = _fmt_cell(summary, zetas)
            record[f"{metric} 95% CI"] = _fmt_ci(summary, zetas)
        records.append(record)
    columns = ["judge", "category", "rows"] + [c for m in METRICS for c in (m, f"{m} 95% CI")]
    return pd.DataFrame(records, columns=columns)


def comparison(
    models: Mapping[str, Sequence[dict]], cfg: EvaluateConfig, *, n_boot: int | None = None
) -> pd.DataFrame:
    """V and C@zeta with 95% intervals for a few models side by side (06's evaluated vs served).

    Columns: judge, metric, statistic, then `<model>`, `<model>_ci95`, `<model>_rows` per model.
    """
    long = table1_long({name: ("local", j) for name, j in models.items()}, cfg, n_boot=n_boot)
    records: dict[tuple, dict] = {}
    for _, r in long.iterrows():
        key = (r["judge"], r["metric"], r["statistic"])
        rec = records.setdefault(key, {"judge": key[0], "metric": key[1], "statistic": key[2]})
        rec[r["model"]] = None if pd.isna(r["value"]) else float(r["value"])
        rec[f"{r['model']}_ci95"] = (
            None if pd.isna(r["ci_low"]) else [float(r["ci_low"]), float(r["ci_high"])]
        )
        rec[f"{r['model']}_rows"] = int(r["rows_scored"])
    return pd.DataFrame(list(records.values()))
