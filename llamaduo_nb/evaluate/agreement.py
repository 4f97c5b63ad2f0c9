"""How far the judges can be trusted: the spread of each judge's M repeats, and agreement between judges.

* Repeat spread (per LLM judge and metric): the standard deviation of a row's successful repeats,
  summarised over rows (mean, median, 90th percentile) with the share of rows whose repeats differ by
  more than `wide` points. A large spread means M should grow (or the judge's temperature fall).
  Reference-metric judges are deterministic (M = 1) and have none.
* Between judges (per metric), on the rows both scored (row means V^j): Spearman's rho and Kendall's
  tau-b (scipy.stats), and Krippendorff's alpha at interval level over all judges at once
  (`krippendorff`), rows one judge could not score left missing.

A reference metric beside an LLM judge is the cheap sanity check: if they disagree, read the answers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import combinations

import numpy as np
import pandas as pd

from .judging import METRICS
from .stats import score_table

WIDE_SPREAD = 20.0  # points between a row's highest and lowest repeat that count as "wide"


def repeat_spread(judgments: Iterable[dict], wide: float = WIDE_SPREAD) -> pd.DataFrame:
    """Per (judge, metric): rows with >= 2 successful repeats, their SD summary and the share that is wide.

    Judges with one judgment per row (M = 1, reference metrics) have no line.
    """
    frame = pd.DataFrame([j for j in judgments if j["ok"]])
    records = []
    if frame.empty:
        return pd.DataFrame(
            columns=["judge", "metric", "rows", "sd_mean", "sd_median", "sd_p90", "wide_share"]
        )
    for (judge, metric), group in (
        frame.melt(
            id_vars=["judge", "prompt_id", "sample_index"], value_vars=list(METRICS), var_name="metric"
        )
        .assign(value=lambda f: pd.to_numeric(f["value"], errors="coerce"))
        .groupby(["judge", "metric"], sort=False)
    ):
        values = group.dropna(subset=["value"]).groupby(["prompt_id", "sample_index"])["value"]
        per_row = values.agg(sd=lambda s: float(np.std(s.to_numpy())), lo="min", hi="max", n="size")
        per_row = per_row[per_row["n"] >= 2]
        if per_row.empty:  # one judgment per row (M = 1, or a reference metric): no spread to show
            continue
        sd = per_row["sd"]
        records.append(
            {
                "judge": judge,
                "metric": metric,
                "rows": int(len(per_row)),
                "sd_mean": float(sd.mean()) if len(sd) else None,
                "sd_median": float(sd.median()) if len(sd) else None,
                "sd_p90": float(sd.quantile(0.9)) if len(sd) else None,
                "wide_share": float(((per_row["hi"] - per_row["lo"]) > wide).mean()) if len(sd) else None,
            }
        )
    return pd.DataFrame(records)


def _row_means(judgments: Iterable[dict], metric: str) -> pd.DataFrame:
    """Rows x judges matrix of V^j for `metric` (NaN where a judge could not score a row)."""
    table = score_table(judgments)
    if table.empty:
        return pd.DataFrame()
    table[metric] = table[metric].astype(float)
    return table.pivot_table(
        index=["prompt_id", "sample_index"], columns="judge", values=metric, aggfunc="first", sort=True
    )


def _nan_to_none(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def judge_pairs(judgments: Iterable[dict]) -> pd.DataFrame:
    """Per metric and pair of judges, on rows both scored: rows, Spearman rho (p), Kendall tau-b (p)."""
    from scipy import stats

    judgments = list(judgments)
    records = []
    for metric in METRICS:
        wide = _row_means(judgments, metric)
        for a, b in combinations(list(wide.columns), 2):
            both = wide[[a, b]].dropna()
            record = {"metric": metric, "judge_a": a, "judge_b": b, "rows": int(len(both))}
            rho = tau = (float("nan"), float("nan"))
            if len(both) >= 3 and both[a].nunique() > 1 and both[b].nunique() > 1:
                rho = stats.spearmanr(both[a], both[b])
                tau = stats.kendalltau(both[a], both[b])
            record.update(
                spearman=_nan_to_none(float(rho[0])),
                spearman_p=_nan_to_none(float(rho[1])),
                kendall=_nan_to_none(float(tau[0])),
                kendall_p=_nan_to_none(float(tau[1])),
            )
            records.append(record)
    return pd.DataFrame(
        records,
        columns=["metric", "judge_a", "judge_b", "rows", "spearman", "spearman_p", "kendall", "kendall_p"],
    )


def krippendorff_alpha(judgments: Iterable[dict]) -> pd.DataFrame:
    """Per metric: Krippendorff's alpha (interval) over all judges, rows as units, missing scores allowed."""
    import krippendorff

    judgments = list(judgments)
    records = []
    for metric in METRICS:
        wide = _row_means(judgments, metric)
        judges = list(wide.columns)
        alpha = None
        units = int(wide.notna().sum(axis=1).ge(2).sum()) if len(judges) else 0
        if len(judges) >= 2 and units >= 2:
            data = wide.to_numpy(dtype=float).T  # coders x units
            values = data[~np.isnan(data)]
            if np.unique(values).size > 1:
                alpha = float(krippendorff.alpha(reliability_data=data, level_of_measurement="interval"))
        records.append(
            {"metric": metric, "judges": ", ".join(map(str, judges)), "units": units, "alpha": alpha}
        )
    return pd.DataFrame(records, columns=["metric", "judges", "units", "alpha"])


def agreement_report(judgments: Iterable[dict]) -> dict:
    """All agreement statistics of one set of judgments, JSON-ready (written to agreement.json)."""
    judgments = list(judgments)

    def records(frame: pd.DataFrame) -> list[dict]:
        return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]

    return {
        "repeat_spread": records(repeat_spread(judgments)),
        "judge_pairs": records(judge_pairs(judgments)),
        "krippendorff_alpha": records(krippendorff_alpha(judgments)),
        "wide_spread_points": WIDE_SPREAD,
    }


def _plain(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
