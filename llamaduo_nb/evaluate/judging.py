"""Answering and judging: the one path every model's answers take to become judgments.

Used by 04 (the cycle's student, the base student, the service baselines) and by 06's parity check.

* `answer_with_provider(pool, provider, test_rows, k, sampling)` asks a service LLM (or a served GGUF)
  K times per test prompt through the ServicePool (cached, ledgered) and returns rows in 03's
  `responses.jsonl` shape (a failed answer keeps its `error` and is never judged).
* `judge_rows(pool, rows, cfg)` judges every row M times with every LLM judge (`cfg.judges`, through the
  pool) and once with every reference-metric judge (`cfg.metric_judges`, computed here, free); rows whose
  answer failed get one failed judgment per judge ("answer: ...") so they are counted, not dropped.

How 06 should call it (one pool holding the served model and the judges):

    with ServicePool(cfg, layout, "06_deploy", providers=[served, *cfg.evaluate.judges]) as pool:
        rows = evaluate.answer_with_provider(pool, served, test_rows, cfg.inference.k, cfg.inference,
                                             model_id=f"gguf:{gguf.name}")
        judgments = evaluate.judge_rows(pool, rows, dataclasses.replace(cfg.evaluate, m=parity_m))
    served = evaluate.compute_metrics(judgments, cfg.evaluate, cycle)          # same statistics as 04
    table = evaluate.comparison(                                                # V / C@zeta with CIs
        {"evaluated": cycle_judgments, "served": judgments}, cfg.evaluate)

A judgment that errors after the client's retries, does not parse, or has a score outside 1..100 is a
*failure*: it is written to `judgments.jsonl` with `ok=false` and the reason, counted per judge, and left
out of every statistic (never scored 0). A judge may add a short `rationale` (kept for review).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import EvaluateConfig, InferenceConfig
from ..jsonio import DataFileError, read_jsonl
from ..prompts import PromptTemplate, load_template
from ..services import ChatRequest, ChatResult, ServicePool, extract_json
from .metric_judges import applicable, metric_judgments

METRICS = ("precision", "similarity")
SCORE_MIN, SCORE_MAX = 1, 100
JUDGE_TEMPLATE = "judge"
JUDGE_PLACEHOLDERS = {"instruction", "reference_response", "candidate_response", "reply_format"}
RAW_KEEP_CHARS = 2000  # how much of a failed judgment's text is kept for inspection
RATIONALE_MAX_CHARS = 400  # a rationale is a short reason; longer text is cut

REPLY_FORMAT = '{"similarity": <integer 1-100>, "precision": <integer 1-100>}'
REPLY_FORMAT_RATIONALE = (
    '{"similarity": <integer 1-100>, "precision": <integer 1-100>, '
    '"rationale": "<one short sentence: why these scores>"}'
)

JUDGMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "similarity": {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX},
        "precision": {"type": "integer", "minimum": SCORE_MIN, "maximum": SCORE_MAX},
    },
    "required": ["similarity", "precision"],
    "additionalProperties": False,
}
JUDGMENT_SCHEMA_RATIONALE: dict[str, Any] = {
    **JUDGMENT_SCHEMA,
    "properties": {**JUDGMENT_SCHEMA["properties"], "rationale": {"type": "string"}},
    "required": ["similarity", "precision", "rationale"],
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


def judge_messages(row: dict, template: PromptTemplate, rationale: bool = False) -> list[dict[str, str]]:
    """The chat messages of one judgment: the candidate answer goes in the candidate slot."""
    content = template.render(
        instruction=row["instruction"],
        reference_response=row["reference"],
        candidate_response=row["candidate"],
        reply_format=REPLY_FORMAT_RATIONALE if rationale else REPLY_FORMAT,
    )
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------- parsing one judgment


def _as_score(value: Any, name: str) -> float:
    if isinstance(value, dict) and "score" in value:
        value = value["score"]
    if isinstance(value, bool):
        raise ValueError(f"{name} is a boolean ({value!r}), expected a number 1-100")
    if isinstance(value, str):
        text = value.strip()
        match = re.fullmatch(r"(-?\d+(?:\.\d+)?)\s*(?:/\s*100)?", text)
        if not match:
            raise ValueError(f"{name} is not a number: {value!r}")
        value = float(match.group(1))
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} is not a number: {value!r}")
    if not SCORE_MIN <= value <= SCORE_MAX:
        raise ValueError(f"{name}={value:g} is outside {SCORE_MIN}..{SCORE_MAX}")
    return float(value)


def scores_from_object(obj: Any) -> dict[str, float]:
    """Read similarity and precision from a judge's JSON reply; ValueError says what is wrong.

    Accepted shapes: {"similarity": s, "precision": p} (what we ask for), the same keys with a `_score`
    suffix or holding {"score": x}, and the paper's nested {"score": s, "precision_assessment": {"score": p}}.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    found: dict[str, Any] = {}
    for metric in METRICS:
        for key in (metric, f"{metric}_score", f"{metric}_assessment"):
            if key in lowered:
                found[metric] = lowered[key]
                break
    if "similarity" not in found and "score" in lowered:
        found["similarity"] = lowered["score"]
    missing = [m for m in METRICS if m not in found]
    if missing:
        raise ValueError(f"missing {missing} in {json.dumps(obj)[:200]}")
    return {metric: _as_score(found[metric], metric) for metric in METRICS}


def parse_judgment(text: str, parsed: Any = None) -> dict[str, float]:
    """Scores of one judge reply: the client's parsed JSON when present, else the JSON found in `text`."""
    obj = parsed if isinstance(parsed, dict) else extract_json(text or "")
    return scores_from_object(obj)


def rationale_of(text: str, parsed: Any = None) -> str | None:
    """The judge's optional short reason (`rationale`, `reason` or `explanation`), cut to a few sentences."""
    obj = parsed if isinstance(parsed, dict) else None
    if obj is None:
        try:
            obj = extract_json(text or "")
        except ValueError:
            return None
    if not isinstance(obj, dict):
        return None
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    for key in ("rationale", "reason", "explanation"):
        value = lowered.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()[:RATIONALE_MAX_CHARS]
    return None


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
        "rationale": None,
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
    record.update(scores, ok=True, rationale=rationale_of(result.text, result.parsed))
    return record


def answer_failed_record(row: dict, judge: str) -> dict:
    """A row whose answer failed cannot be judged: one failed judgment per judge keeps it counted."""
    return {
        "prompt_id": row["prompt_id"],
        "sample_index": row["sample_index"],
        "category": row.get("category"),
        "judge": judge,
        "repeat": 0,
        "similarity": None,
        "precision": None,
        "ok": False,
        "error": f"answer: {row.get('error')}",
        "cached": False,
        "cache_key": None,
        "raw": None,
        "rationale": None,
    }


# --------------------------------------------------------------------------- answering


def answer_with_provider(
    pool: ServicePool,
    provider: str,
    test_rows: Sequence[dict],
    k: int,
    sampling: InferenceConfig,
    *,
    model_id: str | None = None,
    desc: str = "",
) -> list[dict]:
    """K sampled answers per test prompt from `provider`, in 03's responses.jsonl shape.

    `test_rows` are coverage rows (`id`, `instruction`, `response`, `category`); `sampling` gives
    temperature, top_p and max_new_tokens (an InferenceConfig). The instruction is put to the service
    exactly as to the student (one user turn). A failed call keeps its `error` (candidate "").
    """
    from ..finetune import student_messages

    generation = {
        "engine": f"service:{provider}",
        "k": k,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens,
    }
    requests = [
        ChatRequest(
            messages=student_messages(row["instruction"]),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            repeat=sample,
        )
        for row in test_rows
        for sample in range(k)
    ]
    results = pool.complete_many(
        provider, requests, desc=desc or f"answers of {provider} ({len(test_rows)} prompts x K={k})"
    )
    responses = []
    for i, result in enumerate(results):
        row = test_rows[i // k]
        responses.append(
            {
                "prompt_id": row["id"],
                "instruction": row["instruction"],
                "reference": row["response"],
                "candidate": result.text or "",
                "sample_index": i % k,
                "category": row.get("category") or "",
                "model_id": model_id or f"service:{provider}",
                "model_revision": None,
                "adapter": None,
                "output_tokens": int(result.output_tokens or 0),
                "finish_reason": "error" if result.error else "stop",
                "generation": generation,
                "error": result.error,
            }
        )
    return responses


# --------------------------------------------------------------------------- judging


def judge_requests(rows: Sequence[dict], cfg: EvaluateConfig, template: PromptTemplate) -> list[ChatRequest]:
    """M requests per row, row-major; `repeat` keeps the M repeats apart in the call cache."""
    return [
        ChatRequest(
            messages=judge_messages(row, template, cfg.rationale),
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            json_schema=JUDGMENT_SCHEMA_RATIONALE if cfg.rationale else JUDGMENT_SCHEMA,
            schema_name="judgment",
            repeat=repeat,
        )
        for row in rows
        for repeat in range(cfg.m)
    ]


def _llm_judgments(pool: ServicePool | None, rows: Sequence[dict], cfg: EvaluateConfig) -> list[dict]:
    """Judge every answered row M times with every LLM judge through the ServicePool."""
    answered = [row for row in rows if not row.get("error")]
    failed = [row for row in rows if row.get("error")]
    judgments: list[dict] = []
    if cfg.judges and answered:
        if pool is None:
            raise ValueError(f"LLM judges {cfg.judges} need an open ServicePool")
        requests = judge_requests(answered, cfg, judge_template())
        for judge in cfg.judges:
            desc = f"judge {judge} ({len(answered)} rows x M={cfg.m})"
            results = pool.complete_many(judge, requests, desc=desc)
            for i, result in enumerate(results):
                judgments.append(judgment_record(answered[i // cfg.m], judge, i % cfg.m, result))
    for judge in cfg.judges:
        judgments += [answer_failed_record(row, judge) for row in failed]
    return judgments


def judge_rows(pool: ServicePool | None, rows: Sequence[dict], cfg: EvaluateConfig) -> list[dict]:
    """All judgments of `rows`: LLM judges (M repeats each, via `pool`) then reference-metric judges (M = 1).

    `pool` may be None when `cfg.judges` is empty (reference metrics need no service).
    """
    judgments = _llm_judgments(pool, rows, cfg)
    for judge in cfg.metric_judges:
        answered = [row for row in rows if not row.get("error")]
        judgments += metric_judgments(judge, answered, cfg.label_categories)
        judgments += [
            answer_failed_record(row, judge)
            for row in rows
            if row.get("error") and applicable(judge, row, cfg.label_categories)
        ]
    return judgments


judge_responses = judge_rows  # the name 06 used before the shared path; same judgments


def judge_names(cfg: EvaluateConfig) -> list[str]:
    """Every judge of a run, LLM judges first, then reference-metric judges."""
    return [*cfg.judges, *cfg.metric_judges]


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
