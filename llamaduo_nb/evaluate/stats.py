"""Pure statistics of judgments: V, C@zeta, cluster-bootstrap intervals and the epsilon decision.

Per judge and metric (paper eqs. 3-5):

    V^j    = mean of row j's successful judgments                       (eq. 5)
    V      = mean of V^j over the rows that have at least one success    (eq. 3)
    C@zeta = percent of those rows with V^j >= zeta                      (eq. 4)

A row is one (prompt, sample). Rows without a single successful judgment are counted (`rows_unscored`)
and excluded. Intervals come from a *cluster* bootstrap over prompts: a prompt's K samples are drawn
together, because they share the prompt's difficulty; treating them as independent rows would make the
intervals too narrow. Every function here takes plain judgment dicts, so tests and 06's parity check
recompute exactly what 04 reports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..config import EvaluateConfig
from .judging import METRICS

CONFIDENCE = 0.95


def zeta_key(zeta: float) -> str:
    return f"c@{float(zeta):g}"


def statistic_key(statistic: str) -> str:
    """'mean' -> 'mean'; 'coverage@70' -> 'c@70' (the key used in metrics.json)."""
    if statistic == "mean":
        return "mean"
    if statistic.startswith("coverage@"):
        return zeta_key(float(statistic.split("@", 1)[1]))
    raise ValueError(f"unknown decision statistic {statistic!r}; use 'mean' or 'coverage@<zeta>'")


def score_table(judgments: Iterable[dict]) -> pd.DataFrame:
    """One line per (judge, prompt_id, sample_index): V^j per metric over the successful judgments.

    Columns: judge, prompt_id, sample_index, category, n_judgments, n_ok, n_failed, precision, similarity
    (NaN where a row has no successful judgment), precision_sd, similarity_sd (spread of the repeats).
    """
    frame = pd.DataFrame(list(judgments))
    sds = [f"{m}_sd" for m in METRICS]
    columns = ["judge", "prompt_id", "sample_index", "category", "n_judgments", "n_ok", "n_failed"]
    columns += [*METRICS, *sds]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    if "category" not in frame:
        frame["category"] = None
    frame["category"] = frame["category"].fillna("")
    frame["ok"] = frame["ok"].astype(bool)
    keys = ["judge", "prompt_id", "sample_index"]
    counts = frame.groupby(keys, sort=True).agg(
        category=("category", "first"), n_judgments=("ok", "size"), n_ok=("ok", "sum")
    )
    for metric in METRICS:
        frame[metric] = pd.to_numeric(frame[metric], errors="coerce")
    scored = frame[frame["ok"]].groupby(keys, sort=True)[list(METRICS)]
    means = scored.mean()
    spread = scored.std(ddof=0).rename(columns={m: f"{m}_sd" for m in METRICS})
    table = counts.join(means, how="left").join(spread, how="left").reset_index()
    table["n_ok"] = table["n_ok"].astype(int)
    table["n_failed"] = table["n_judgments"] - table["n_ok"]
    return table[columns]


# --------------------------------------------------------------------------- intervals


def cluster_bootstrap(
    values: Sequence[float],
    clusters: Sequence[Any],
    zeta: float | None = None,
    *,
    n_boot: int = 1000,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile interval of V (zeta None) or C@zeta (percent), resampling whole clusters (prompts).

    Each draw picks as many prompts as there are, with replacement, and pools all their rows: a prompt's
    K samples move together. None when there is nothing to resample or `n_boot` is 0.
    """
    data = np.asarray(list(values), dtype=float)
    if data.size == 0 or n_boot <= 0:
        return None
    labels, index = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    hits = data if zeta is None else (data >= zeta).astype(float) * 100.0
    sums = np.bincount(index, weights=hits, minlength=labels.size)
    counts = np.bincount(index, minlength=labels.size).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, labels.size, size=(n_boot, labels.size))
    stats = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1.0 - tail))


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    n_boot: int = 1000,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile interval of `statistic` treating every value as independent (rows resampled alone).

    Kept for callers with independent values; judged rows of one prompt are not independent, so 04's
    statistics use `cluster_bootstrap`.
    """
    data = np.asarray(list(values), dtype=float)
    if data.size == 0 or n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, data.size, size=(n_boot, data.size))
    stats = np.array([statistic(data[idx]) for idx in draws])
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1.0 - tail))


def metric_summary(
    row_means: Sequence[float],
    zetas: Sequence[float],
    *,
    clusters: Sequence[Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """V (eq. 3), C@zeta in percent (eq. 4), each with its 95% cluster-bootstrap interval (`<key>_ci95`)."""
    row_means = list(row_means)
    clusters = list(clusters) if clusters is not None else list(range(len(row_means)))
    keep = [i for i, v in enumerate(row_means) if v is not None and not math.isnan(v)]
    values = np.asarray([row_means[i] for i in keep], dtype=float)
    groups = [clusters[i] for i in keep]
    summary: dict[str, Any] = {"n_rows_scored": int(values.size), "n_prompts_scored": len(set(groups))}
    keys = ["mean", *(zeta_key(z) for z in zetas)]
    if values.size == 0:
        for key in keys:
            summary[key] = None
            summary[f"{key}_ci95"] = None
        return summary
    for key, zeta in zip(keys, [None, *zetas], strict=True):
        summary[key] = float(values.mean()) if zeta is None else float(100.0 * np.mean(values >= zeta))
        ci = cluster_bootstrap(values, groups, zeta, n_boot=n_boot, seed=seed)
        summary[f"{key}_ci95"] = list(ci) if ci else None
    return summary


def summarize(
    judgments: Iterable[dict], zetas: Sequence[float], *, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Per judge: per-metric V / C@zeta with intervals, the rows scored and the failures (by kind)."""
    judgments = list(judgments)
    table = score_table(judgments)
    per_judge: dict[str, dict] = {}
    for judge, rows in table.groupby("judge", sort=False):
        failed = [j for j in judgments if j["judge"] == judge and not j["ok"]]
        kinds: dict[str, int] = {}
        for j in failed:
            kind = str(j.get("error") or "unknown").split(":", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        total = int(rows["n_judgments"].sum())
        clusters = rows["prompt_id"].tolist()
        entry: dict[str, Any] = {
            metric: metric_summary(rows[metric].tolist(), zetas, clusters=clusters, n_boot=n_boot, seed=seed)
            for metric in METRICS
        }
        entry.update(
            n_rows=int(len(rows)),
            rows_unscored=int((rows["n_ok"] == 0).sum()),
            judgments=total,
            failures=len(failed),
            failure_rate=(len(failed) / total) if total else 0.0,
            failure_kinds=kinds,
        )
        per_judge[str(judge)] = entry
    return per_judge


# --------------------------------------------------------------------------- the decision


def _checks(cfg: EvaluateConfig) -> list[tuple[str, str]]:
    metrics = list(METRICS) if cfg.decision_metric == "both" else [cfg.decision_metric]
    return [(metric, stat) for stat in cfg.decision_statistics for metric in metrics]


def _judge_value(entry: dict | None, metric: str, stat: str, lower: bool) -> float | None:
    if not entry:
        return None
    key = statistic_key(stat)
    if lower:
        ci = entry[metric].get(f"{key}_ci95")
        return None if ci is None else float(ci[0])
    value = entry[metric].get(key)
    return None if value is None else float(value)


def decision_rule_text(cfg: EvaluateConfig) -> str:
    """The rule in words, e.g. 'mean over judges [gpt4o, claude] of mean(precision) and c@50(precision) >= 70'."""
    checks = " and ".join(f"{s}({m})" for m, s in _checks(cfg))
    bound = "the 95% lower bound of " if cfg.require_lower_bound else ""
    return (
        f"{cfg.aggregation} over judges {cfg.deciding_judges} of {bound}{checks} >= epsilon {cfg.epsilon:g}"
    )


def decide(per_judge: dict, cfg: EvaluateConfig) -> dict:
    """Pass/fail against epsilon (paper eq. 9 when several statistics are listed).

    Every (metric, statistic) check must pass. A check's value over the deciding judges is their mean
    (`mean`), their lowest (`strictest`); with `each`, every judge must pass every check on its own and the
    value reported is the lowest. With `require_lower_bound` the judges' lower 95% bounds are used (for
    `mean`: the mean of the judges' lower bounds).

    Failed judgments are excluded from the statistics, so a judge that could score only a few rows would
    decide on those alone: when a deciding judge has no successful judgment, or scored fewer than
    `min_scored_share` of its rows, the decision is refused ("not passed") with the reason.
    """
    judges = cfg.deciding_judges
    checks = _checks(cfg)
    lower = cfg.require_lower_bound
    judges_detail: dict[str, dict] = {}
    for judge in judges:
        entry = per_judge.get(judge)
        values = {f"{s}({m})": _judge_value(entry, m, s, lower) for m, s in checks}
        n_rows = entry["n_rows"] if entry else 0
        scored_share = (n_rows - entry["rows_unscored"]) / n_rows if entry and n_rows else 0.0
        value = None if any(v is None for v in values.values()) else min(values.values())
        judges_detail[judge] = {
            **values,
            "value": value,
            "rows_scored": (n_rows - entry["rows_unscored"]) if entry else 0,
            "rows": n_rows,
            "scored_share": scored_share,
            "passed": value is not None and value >= cfg.epsilon and scored_share >= cfg.min_scored_share,
        }
    decision: dict[str, Any] = {
        "passed": False,
        "refused": False,
        "rule": decision_rule_text(cfg),
        "metric": cfg.decision_metric,
        "statistic": " and ".join(cfg.decision_statistics),
        "statistics": cfg.decision_statistics,
        "judges": judges,
        "lower_bound": lower,
        "value": None,
        "epsilon": cfg.epsilon,
        "aggregation": cfg.aggregation,
        "checks": [],
        "per_judge": judges_detail,
    }
    missing = [j for j, d in judges_detail.items() if d["value"] is None]
    too_few = {j: d for j, d in judges_detail.items() if d["scored_share"] < cfg.min_scored_share}
    if missing:
        what = "no interval (bootstrap_samples is 0?)" if lower else "no successful judgments"
        decision.update(
            refused=True, reason=f"refused: {what} from {missing}: cannot decide, treated as not passed"
        )
        return decision
    check_rows = []
    for m, s in checks:
        label = f"{s}({m})"
        per = [judges_detail[j][label] for j in judges]
        value = float(np.mean(per)) if cfg.aggregation == "mean" else float(min(per))
        check_rows.append({"check": label, "value": value, "passed": value >= cfg.epsilon})
    value = min(c["value"] for c in check_rows)
    if cfg.aggregation == "each":
        passed = all(d["passed"] for d in judges_detail.values())
    else:
        passed = all(c["passed"] for c in check_rows)
    parts = ", ".join(f"{c['check']} = {c['value']:.2f}" for c in check_rows)
    verdict = "passed" if passed else "not passed"
    reason = f"{verdict}: {cfg.aggregation} over {judges} of {parts} against epsilon {cfg.epsilon:g}"
    if lower:
        reason += " (95% lower bounds)"
    if too_few:
        passed = False
        shares = ", ".join(f"{j} scored {d['rows_scored']}/{d['rows']} rows" for j, d in too_few.items())
        reason = (
            f"refused: a decision on a minority of rows ({shares} < min_scored_share "
            f"{cfg.min_scored_share:g}) is not made; treated as not passed. Statistics: {parts}"
        )
        decision["refused"] = True
    decision.update(passed=bool(passed), value=value, checks=check_rows, reason=reason)
    return decision


def compute_metrics(
    judgments: Iterable[dict], cfg: EvaluateConfig, cycle: int, *, n_boot: int | None = None
) -> dict:
    """The content of `metrics.json`: per-judge statistics with intervals plus the epsilon decision."""
    judgments = list(judgments)
    n_boot = cfg.bootstrap_samples if n_boot is None else n_boot
    per_judge = summarize(judgments, cfg.zetas, n_boot=n_boot, seed=cfg.bootstrap_seed)
    n_rows = len({(j["prompt_id"], j["sample_index"]) for j in judgments})
    return {
        "cycle": cycle,
        "n_rows": n_rows,
        "m": cfg.m,
        "zetas": list(cfg.zetas),
        "bootstrap": {
            "samples": n_boot,
            "seed": cfg.bootstrap_seed,
            "confidence": CONFIDENCE,
            "unit": "prompt (a prompt's K samples are resampled together)",
        },
        "per_judge": per_judge,
        "decision": decide(per_judge, cfg),
    }
