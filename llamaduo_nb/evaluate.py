"""04_evaluate: service LLMs judge the local model's answers; V, C@zeta and the epsilon decision.

Every (prompt, sample) row of `responses.jsonl` is judged M times by every judge (paper eq. 5) with the
template `prompts/judge.md`; each judgment gives a similarity and a precision score from 1 to 100.

A judgment that errors after the client's retries, does not parse, or has a score outside 1..100 is a
*failure*: it is written to `judgments.jsonl` with `ok=false` and the reason, counted per judge, and left
out of every statistic (never scored 0). Per judge and metric:

    V^j   = mean of row j's successful judgments                       (eq. 5)
    V     = mean of V^j over the rows that have at least one success    (eq. 3)
    C@zeta = percent of those rows with V^j >= zeta                      (eq. 4)

Rows without a single successful judgment are counted (`rows_unscored`) and excluded. The pure functions
`score_table`, `summarize`, `decide` and `compute_metrics` take plain judgment dicts, so tests and the
deploy stage's parity check recompute exactly what this stage reports.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import EvaluateConfig
from .jsonio import DataFileError, read_jsonl, save_figure, write_json, write_jsonl
from .notebook import Stage
from .prompts import PromptTemplate, load_template
from .services import ChatRequest, ChatResult, ServicePool, extract_json, find_json

METRICS = ("precision", "similarity")
SCORE_MIN, SCORE_MAX = 1, 100
JUDGE_TEMPLATE = "judge"
JUDGE_PLACEHOLDERS = {"instruction", "reference_response", "candidate_response"}
RAW_KEEP_CHARS = 2000  # how much of a failed judgment's text is kept for inspection

JUDGMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "similarity": {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX},
        "precision": {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX},
    },
    "required": ["similarity", "precision"],
    "additionalProperties": False,
}

_RESPONSE_FIELDS = {
    "prompt_id": str,
    "instruction": str,
    "reference": str,
    "candidate": str,
    "sample_index": int,
}


# --------------------------------------------------------------------------- inputs


def load_responses(path: str | Path) -> list[dict]:
    """Read and check 03's `responses.jsonl`: required fields typed, (prompt_id, sample_index) unique."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run 03_batch_inference for this cycle first")
    rows = read_jsonl(path)
    seen: dict[tuple[str, int], int] = {}
    for lineno, row in enumerate(rows, start=1):
        for field, kind in _RESPONSE_FIELDS.items():
            if field not in row:
                raise DataFileError(path, lineno, field, "required field is missing")
            value = row[field]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise DataFileError(
                    path, lineno, field, f"expected {kind.__name__}, got {type(value).__name__}"
                )
        key = (row["prompt_id"], row["sample_index"])
        if key in seen:
            raise DataFileError(path, lineno, "sample_index", f"duplicate of row {seen[key]} for {key}")
        seen[key] = lineno
    if not rows:
        raise DataFileError(path, None, None, "no responses to judge")
    return rows


def judge_template() -> PromptTemplate:
    return load_template(JUDGE_TEMPLATE, required=JUDGE_PLACEHOLDERS)


def judge_messages(row: dict, template: PromptTemplate) -> list[dict[str, str]]:
    """The chat messages of one judgment: the candidate answer goes in the candidate slot."""
    content = template.render(
        instruction=row["instruction"],
        reference_response=row["reference"],
        candidate_response=row["candidate"],
    )
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------- parsing one judgment


# "8/10", "4 out of 5", "on a scale of 1-10", "(0 to 10)": the reply says which scale it used.
_SCALE_MENTION = re.compile(
    r"\b\d+(?:\.\d+)?\s*(?:/|out\s+of)\s*(?P<den>\d+)\b(?![/\d])"
    r"|\bscale\s+(?:of|from)\s+[01]\s*(?:-|–|to)\s*(?P<top>\d+)\b",
    re.IGNORECASE,
)
_SCALE_KEYS = ("out_of", "max", "max_score", "scale", "scale_max")
_METRIC_KEYS = {metric: (metric, f"{metric}_score", f"{metric}_assessment") for metric in METRICS}


def _other_scale(name: str, top: Any, scale_max: int) -> ValueError:
    return ValueError(
        f"{name} is on a 0-{top} scale, outside the {SCORE_MIN}..{scale_max} scale the prompt asked for"
    )


def _check_scale_keys(obj: dict, name: str, scale_max: int) -> None:
    for key in _SCALE_KEYS:
        top = obj.get(key)
        if top is None:
            continue
        if isinstance(top, str):
            match = re.search(r"(\d+)\s*$", top)
            top = int(match.group(1)) if match else top
        if top != scale_max:
            raise _other_scale(name, top, scale_max)


def _as_score(value: Any, name: str, scale_max: int = SCORE_MAX) -> float:
    """One score on the 1..100 scale; a score on the asked `scale_max` scale is rescaled to 1..100.

    A score that says it is on another scale ("8/10", {"score": 8, "out_of": 10}) is an error, never read
    as 8/100.
    """
    if isinstance(value, dict) and "score" in value:
        _check_scale_keys({str(k).lower(): v for k, v in value.items()}, name, scale_max)
        value = value["score"]
    if isinstance(value, bool):
        raise ValueError(f"{name} is a boolean ({value!r}), expected a number {SCORE_MIN}-{scale_max}")
    if isinstance(value, str):
        text = value.strip()
        match = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*(?:(?:/|out\s+of)\s*(\d+))?", text, re.IGNORECASE)
        if not match:
            raise ValueError(f"{name} is not a number: {value!r}")
        if match.group(2) is not None and int(match.group(2)) != scale_max:
            raise _other_scale(f"{name}={text!r}", match.group(2), scale_max)
        value = float(match.group(1))
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} is not a number: {value!r}")
    if not SCORE_MIN <= value <= scale_max:
        raise ValueError(f"{name}={value:g} is outside {SCORE_MIN}..{scale_max}")
    return float(value) * SCORE_MAX / scale_max


def _judgment_keys(obj: Any) -> bool:
    """Whether `obj` is an object carrying both scores (under any accepted key)."""
    if not isinstance(obj, dict):
        return False
    keys = {str(k).strip().lower() for k in obj}
    has_similarity = bool(keys & {*_METRIC_KEYS["similarity"], "score"})
    return has_similarity and bool(keys & set(_METRIC_KEYS["precision"]))


def scores_from_object(obj: Any, scale_max: int = SCORE_MAX) -> dict[str, float]:
    """Read similarity and precision from a judge's JSON reply; ValueError says what is wrong.

    Accepted shapes: {"similarity": s, "precision": p} (what we ask for), the same keys with a `_score`
    suffix or holding {"score": x}, and the paper's nested {"score": s, "precision_assessment": {"score": p}}.
    Scores are on the 1..`scale_max` scale the prompt asked for (rescaled to 1..100).
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    _check_scale_keys(lowered, "the judgment", scale_max)
    found: dict[str, Any] = {}
    for metric, keys in _METRIC_KEYS.items():
        for key in keys:
            if key in lowered:
                found[metric] = lowered[key]
                break
    if "similarity" not in found and "score" in lowered:
        found["similarity"] = lowered["score"]
    missing = [m for m in METRICS if m not in found]
    if missing:
        raise ValueError(f"missing {missing} in {json.dumps(obj)[:200]}")
    return {metric: _as_score(found[metric], metric, scale_max) for metric in METRICS}


def parse_judgment(text: str, parsed: Any = None, scale_max: int = SCORE_MAX) -> dict[str, float]:
    """Scores of one judge reply, on 1..100; ValueError says why the reply is not a judgment.

    Uses the client's parsed JSON when it is an object, else the JSON object with both score keys found
    anywhere in `text` (so "rubric [1] ... {json}" works). A reply that holds two different judgments, or
    says it scored on another scale than the 1..`scale_max` the prompt asked for ("8/10", "on a scale of
    1-10"), is a failure. Pass `scale_max` only when the judge prompt asked for that scale.
    """
    text = text or ""
    for mention in _SCALE_MENTION.finditer(text):
        top = mention.group("den") or mention.group("top")
        if int(top) != scale_max:
            raise _other_scale(f"the reply ({mention.group(0)!r})", top, scale_max)
    if isinstance(parsed, dict):
        return scores_from_object(parsed, scale_max)
    candidates = find_json(text, _judgment_keys)
    if not candidates:  # say what is wrong with the JSON that is there (missing key, ...), if any
        return scores_from_object(extract_json(text, lambda v: isinstance(v, dict)), scale_max)
    judgments = [scores_from_object(obj, scale_max) for obj in candidates]
    if any(j != judgments[0] for j in judgments[1:]):
        raise ValueError(f"the reply holds {len(judgments)} different judgments: {judgments}")
    return judgments[0]


def judgment_record(row: dict, judge: str, repeat: int, result: ChatResult) -> dict:
    """One line of judgments.jsonl from a ChatResult; failures carry the reason, never a score."""
    record = {
        "prompt_id": row["prompt_id"],
        "sample_index": row["sample_index"],
        "category": row.get("category"),
        "judge": judge,
        "repeat": repeat,
        "similarity": None,
        "precision": None,
        "ok": False,
        "error": None,
        "cached": bool(getattr(result, "cached", False)),
        "cache_key": getattr(result, "cache_key", "") or None,
        "raw": None,
    }
    if result.error:
        record["error"] = f"request: {result.error}"
        return record
    try:
        scores = parse_judgment(result.text, result.parsed)
    except ValueError as exc:
        kind = "range" if "outside" in str(exc) else "parse"
        record["error"] = f"{kind}: {exc}"
        record["raw"] = (result.text or "")[:RAW_KEEP_CHARS]
        return record
    record.update(scores, ok=True)
    return record


# --------------------------------------------------------------------------- calling the judges


def judge_requests(rows: Sequence[dict], cfg: EvaluateConfig, template: PromptTemplate) -> list[ChatRequest]:
    """M requests per row, row-major; `repeat` keeps the M repeats apart in the call cache."""
    return [
        ChatRequest(
            messages=judge_messages(row, template),
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            json_schema=JUDGMENT_SCHEMA,
            schema_name="judgment",
            repeat=repeat,
        )
        for row in rows
        for repeat in range(cfg.m)
    ]


def judge_responses(pool: ServicePool, rows: Sequence[dict], cfg: EvaluateConfig) -> list[dict]:
    """Judge every row M times with every judge through the ServicePool; returns judgment records."""
    template = judge_template()
    requests = judge_requests(rows, cfg, template)
    judgments: list[dict] = []
    for judge in cfg.judges:
        results = pool.complete_many(judge, requests, desc=f"judge {judge} ({len(rows)} rows x M={cfg.m})")
        for i, result in enumerate(results):
            row = rows[i // cfg.m]
            judgments.append(judgment_record(row, judge, i % cfg.m, result))
    return judgments


def run_judges(stage: Stage, rows: Sequence[dict]) -> list[dict]:
    """04's judging step: open the ServicePool, judge, write `judgments.jsonl`; returns the records."""
    judges = stage.cfg.evaluate.judges
    with ServicePool(stage.cfg, stage.layout, stage.name, stage.cycle, providers=judges) as pool:
        judgments = judge_responses(pool, rows, stage.cfg.evaluate)
    write_jsonl(stage.layout.judgments_file(stage.cycle), judgments)
    return judgments


# --------------------------------------------------------------------------- statistics (pure)


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
    (NaN where a row has no successful judgment).
    """
    frame = pd.DataFrame(list(judgments))
    columns = ["judge", "prompt_id", "sample_index", "category", "n_judgments", "n_ok", "n_failed", *METRICS]
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
    means = frame[frame["ok"]].groupby(keys, sort=True)[list(METRICS)].mean()
    table = counts.join(means, how="left").reset_index()
    table["n_ok"] = table["n_ok"].astype(int)
    table["n_failed"] = table["n_judgments"] - table["n_ok"]
    return table[columns]


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic` over rows (resampled with replacement).

    None when there is nothing to resample or `n_boot` is 0.
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
    row_means: Sequence[float], zetas: Sequence[float], *, n_boot: int = 1000, seed: int = 0
) -> dict:
    """V (eq. 3), C@zeta in percent (eq. 4) and a bootstrap CI of V over per-row means V^j."""
    values = np.asarray([v for v in row_means if v is not None and not math.isnan(v)], dtype=float)
    summary: dict[str, Any] = {"n_rows_scored": int(values.size)}
    if values.size == 0:
        summary["mean"] = None
        summary["mean_ci95"] = None
        for zeta in zetas:
            summary[zeta_key(zeta)] = None
        return summary
    summary["mean"] = float(values.mean())
    ci = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    summary["mean_ci95"] = list(ci) if ci else None
    for zeta in zetas:
        summary[zeta_key(zeta)] = float(100.0 * np.mean(values >= zeta))
    return summary


def summarize(
    judgments: Iterable[dict], zetas: Sequence[float], *, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Per judge: per-metric V / C@zeta / CI, and the judge's failure count and rate."""
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
        entry: dict[str, Any] = {
            metric: metric_summary(rows[metric].tolist(), zetas, n_boot=n_boot, seed=seed)
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


def decide(per_judge: dict, cfg: EvaluateConfig) -> dict:
    """Pass/fail against epsilon.

    For each judge the value is the chosen statistic of the chosen metric ("both": the lower of precision
    and similarity, so both must reach epsilon). Judges are combined by `judge_aggregation`: "mean" averages
    their values, "min" takes the worst, "all" requires every judge to pass on its own (same outcome as
    "min"; the value reported is the worst judge's).

    Failed judgments are excluded from the statistics, so a judge that could score only a few rows would
    decide on those alone: a judge without any successful judgment, or one that scored fewer than
    `min_scored_share` of the rows, cannot vouch for the model, and the decision is "not passed" with
    the reason (the value is still reported when it exists).
    """
    key = statistic_key(cfg.decision_statistic)
    metrics = list(METRICS) if cfg.decision_metric == "both" else [cfg.decision_metric]
    judges_detail: dict[str, dict] = {}
    missing: list[str] = []
    for judge in cfg.judges:
        entry = per_judge.get(judge)
        per_metric = {m: (entry[m].get(key) if entry else None) for m in metrics}
        value = None if any(v is None for v in per_metric.values()) else min(per_metric.values())
        if value is None:
            missing.append(judge)
        n_rows = entry["n_rows"] if entry else 0
        scored_share = (n_rows - entry["rows_unscored"]) / n_rows if entry and n_rows else 0.0
        judges_detail[judge] = {
            **per_metric,
            "value": value,
            "scored_share": scored_share,
            "passed": value is not None and value >= cfg.epsilon and scored_share >= cfg.min_scored_share,
        }
    decision: dict[str, Any] = {
        "passed": False,
        "metric": cfg.decision_metric,
        "statistic": cfg.decision_statistic,
        "value": None,
        "epsilon": cfg.epsilon,
        "aggregation": cfg.judge_aggregation,
        "per_judge": judges_detail,
    }
    if missing:
        decision["reason"] = f"no successful judgments from {missing}: cannot decide, treated as not passed"
        return decision
    values = [d["value"] for d in judges_detail.values()]
    if cfg.judge_aggregation == "mean":
        value = float(np.mean(values))
        passed = value >= cfg.epsilon
    elif cfg.judge_aggregation == "min":
        value = float(min(values))
        passed = value >= cfg.epsilon
    else:
        value = float(min(values))
        passed = all(d["passed"] for d in judges_detail.values())
    verb = ">=" if value >= cfg.epsilon else "<"
    reason = (
        f"{cfg.judge_aggregation} over judges of {cfg.decision_statistic}({cfg.decision_metric}) "
        f"= {value:.2f} {verb} epsilon {cfg.epsilon:g}"
    )
    too_few = {
        j: d["scored_share"] for j, d in judges_detail.items() if d["scored_share"] < cfg.min_scored_share
    }
    if too_few:
        passed = False
        shares = ", ".join(f"{j} {100 * share:.0f}%" for j, share in too_few.items())
        reason += f"; not passed: too few rows scored ({shares} < min_scored_share {cfg.min_scored_share:g})"
    decision.update(passed=bool(passed), value=value, reason=reason)
    return decision


def compute_metrics(
    judgments: Iterable[dict], cfg: EvaluateConfig, cycle: int, *, n_boot: int = 1000
) -> dict:
    """The content of `metrics.json`: per-judge statistics plus the epsilon decision."""
    judgments = list(judgments)
    per_judge = summarize(judgments, cfg.zetas, n_boot=n_boot)
    n_rows = len({(j["prompt_id"], j["sample_index"]) for j in judgments})
    return {
        "cycle": cycle,
        "n_rows": n_rows,
        "m": cfg.m,
        "zetas": list(cfg.zetas),
        "per_judge": per_judge,
        "decision": decide(per_judge, cfg),
    }


def write_metrics(stage: Stage, judgments: Iterable[dict]) -> dict:
    """04's last step: compute the metrics of this cycle and write `metrics.json` (the runner reads it)."""
    metrics = compute_metrics(judgments, stage.cfg.evaluate, stage.cycle)
    write_json(stage.layout.metrics_file(stage.cycle), metrics)
    return metrics


def load_judgments(path: str | Path) -> list[dict]:
    path = Path(path)
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, start=1):
        for field in ("prompt_id", "sample_index", "judge", "repeat", "ok"):
            if field not in row:
                raise DataFileError(path, lineno, field, "required field is missing")
        if row["ok"]:
            for metric in METRICS:
                value = row.get(metric)
                if not isinstance(value, int | float) or not SCORE_MIN <= value <= SCORE_MAX:
                    raise DataFileError(
                        path, lineno, metric, f"ok judgment needs a score 1-100, got {value!r}"
                    )
    return rows


# --------------------------------------------------------------------------- tables and plots


def _fmt_cell(summary: dict, zetas: Sequence[float]) -> str:
    if summary.get("mean") is None:
        return "n/a"
    parts = [f"{summary['mean']:.2f}"] + [f"{summary[zeta_key(z)]:.0f}%" for z in zetas]
    return " / ".join(parts)


def results_table(metrics: dict) -> pd.DataFrame:
    """Paper Table 1 layout: one line per judge, `mean / C@50 / C@70` per metric, plus failures."""
    zetas = metrics["zetas"]
    header = "mean / " + " / ".join(f"C@{z:g}" for z in zetas)
    records = []
    for judge, entry in metrics["per_judge"].items():
        records.append(
            {
                "judge": judge,
                f"precision ({header})": _fmt_cell(entry["precision"], zetas),
                f"similarity ({header})": _fmt_cell(entry["similarity"], zetas),
                "rows scored": f"{entry['n_rows'] - entry['rows_unscored']}/{entry['n_rows']}",
                "failed judgments": f"{entry['failures']}/{entry['judgments']} ({100 * entry['failure_rate']:.0f}%)",
            }
        )
    return pd.DataFrame(records).set_index("judge")


def responses_preview(rows: Sequence[dict], n: int = 5, width: int = 80) -> pd.DataFrame:
    """The first rows to be judged, texts shortened."""
    columns = ["prompt_id", "sample_index", "category", "instruction", "candidate"]
    frame = pd.DataFrame(list(rows[:n])).reindex(columns=columns)
    for column in ("instruction", "candidate"):
        frame[column] = frame[column].str.slice(0, width)
    return frame


def decision_table(metrics: dict) -> pd.DataFrame:
    """The epsilon decision: each judge's value, share of rows it scored and verdict, then the combined one."""
    decision = metrics["decision"]
    records = [
        {
            "judge": judge,
            "value": d["value"],
            "rows scored": f"{100 * d['scored_share']:.0f}%",
            "passed": d["passed"],
        }
        for judge, d in decision["per_judge"].items()
    ]
    records.append(
        {
            "judge": f"{decision['aggregation']} over judges",
            "value": decision["value"],
            "rows scored": "",
            "passed": decision["passed"],
        }
    )
    return pd.DataFrame(records).set_index("judge")


def failure_table(judgments: Iterable[dict]) -> pd.DataFrame:
    """Failed judgments per judge and kind (request error / unparseable / out of range)."""
    frame = pd.DataFrame([j for j in judgments if not j["ok"]])
    if frame.empty:
        return pd.DataFrame(columns=["judge", "kind", "count", "example"])
    frame["kind"] = frame["error"].fillna("unknown").str.split(":", n=1).str[0]
    grouped = frame.groupby(["judge", "kind"])
    return grouped.agg(count=("ok", "size"), example=("error", "first")).reset_index()


def category_table(judgments: Iterable[dict], zetas: Sequence[float]) -> pd.DataFrame:
    """Per judge and task category: rows scored and `mean / C@zeta` per metric."""
    table = score_table(judgments)
    records = []
    for (judge, category), rows in table.groupby(["judge", "category"], sort=True):
        record = {"judge": judge, "category": category or "(none)", "rows": len(rows)}
        for metric in METRICS:
            record[metric] = _fmt_cell(metric_summary(rows[metric].tolist(), zetas, n_boot=0), zetas)
        records.append(record)
    return pd.DataFrame(records, columns=["judge", "category", "rows", *METRICS])


def plot_scores(judgments: Iterable[dict], path: str | Path, zetas: Sequence[float] = (50.0, 70.0)):
    """Per-row mean precision vs similarity, one panel per judge, with the zeta lines; saved as PNG."""
    import matplotlib.pyplot as plt

    table = score_table(judgments)
    judges = list(dict.fromkeys(table["judge"])) or ["(no judgments)"]
    fig, axes = plt.subplots(1, len(judges), figsize=(4.6 * len(judges), 4.4), squeeze=False)
    for ax, judge in zip(axes[0], judges, strict=True):
        rows = table[(table["judge"] == judge) & (table["n_ok"] > 0)]
        if len(rows) > 400:
            ax.hexbin(rows["precision"], rows["similarity"], gridsize=25, extent=(0, 100, 0, 100), mincnt=1)
        else:
            ax.scatter(rows["precision"], rows["similarity"], s=28, alpha=0.7)
        for zeta in zetas:
            ax.axvline(zeta, color="grey", lw=0.8, ls="--")
            ax.axhline(zeta, color="grey", lw=0.8, ls="--")
        ax.plot([0, 100], [0, 100], color="lightgrey", lw=0.8)
        ax.set(xlim=(0, 101), ylim=(0, 101), xlabel="precision (row mean)", ylabel="similarity (row mean)")
        unscored = int((table[table["judge"] == judge]["n_ok"] == 0).sum())
        ax.set_title(f"{judge}: {len(rows)} rows" + (f", {unscored} unscored" if unscored else ""))
    fig.suptitle("Precision vs similarity per (prompt, sample)")
    fig.tight_layout()
    save_figure(fig, path)
    return fig
