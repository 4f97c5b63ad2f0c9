"""Answering and judging: the one path every model's answers take to become judgments.

Used by 04 (the cycle's student, the base student, the service baselines) and by 06's parity check.

* `answer_with_provider(pool, provider, test_rows, k, sampling)` asks a service LLM (or a served GGUF)
  K times per test prompt through the ServicePool (cached, ledgered) and returns rows in 03's
  `responses.jsonl` shape (a failed answer keeps its `error` and is never judged).
* `judge_rows(pool, rows, cfg)` judges every row M times with every LLM judge (`cfg.judges`, through the
  pool) and once with every reference-metric judge (`cfg.metric_judges`, computed here, free); rows whose
  answer failed get one failed judgment per judge ("answer: ...") so they are counted, not dropped.
* `planned_answer_calls` / `planned_judge_calls`: the calls those two will make, built with the same request
  builders (`answer_requests`, `judge_requests`), for the forecast (`plan.PlannedCall`); `assumed_answers`
  stands in for answers not written yet (as long as the reference).

How 06 calls it (`deploy.parity.parity_judgments`; one pool holding the served model and the judges):

    with ServicePool(cfg, layout, LEDGER_PARITY, providers=[served, *cfg.evaluate.judges]) as pool:
        rows = evaluate.answer_with_provider(pool, served, test_rows, cfg.inference.k, cfg.inference,
                                             model_id=f"gguf:{gguf.name}")
        judgments = evaluate.judge_rows(pool, rows, dataclasses.replace(cfg.evaluate, m=parity_m))
    served = evaluate.compute_metrics(judgments, cfg.evaluate, cycle)          # same statistics as 04
    table = evaluate.comparison(                                                # V / C@zeta with CIs
        {"evaluated": cycle_judgments, "served": judgments}, cfg.evaluate)

Every judge reply is read one way (`read_judgment`, on `services.read_one`'s rule): the judge requests carry a
`JudgmentReader` as their `reader`, so the pool's `parsed` (live, cache replay, batch) and `judgment_record`
read the same verdict; a quoted example is never scored, two different judgments in one reply are a failure,
and only the judge's own statements of a scale count (not fractions quoted from the task).

A judgment that errors after the client's retries, does not parse, or has a score outside 1..100 is a
*failure*: it is written to `judgments.jsonl` with `ok=false` and the reason, counted per judge, and left
out of every statistic (never scored 0). A judge may add a short `rationale` (kept for review).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import EvaluateConfig, InferenceConfig
from ..jsonio import DataFileError, read_jsonl
from ..plan import PlannedCall
from ..prompts import PromptTemplate, load_template
from ..services import ChatRequest, ChatResult, ServicePool, extract_json, json_spans, read_one
from ..student import student_messages
from .metric_judges import applicable, metric_judgments

METRICS = ("precision", "similarity")
SCORE_MIN, SCORE_MAX = 1, 100
JUDGE_TEMPLATE = "judge"
JUDGE_PLACEHOLDERS = {"instruction", "reference_response", "candidate_response", "reply_format"}
RAW_KEEP_CHARS = 2000  # how much of a failed judgment's text is kept for inspection
RATIONALE_MAX_CHARS = 400  # a rationale is a short reason; longer text is cut
JUDGE_REPLY_TOKENS = (
    25  # what a judgment's reply is expected to cost: {"similarity": 80, "precision": 75} + framing
)

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


# The judge's own statements of the scale it scored on, in the prose around the verdict: "Score: 8/10",
# "I rate it 7 out of 10", "8/10 for similarity", "on a scale of 1-10". A fraction counts only next to a score
# word (within three words before it, or "for <score word>" right after it), so "the reference says 7/8" or
# "it lists 3 out of 4 items" is not a statement of a scale.
_FRACTION = re.compile(
    r"(?<![\d.,/])(?P<num>\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*(?P<den>\d+)(?![\d/]|[.,]\d)", re.IGNORECASE
)
_SCALE_RANGE = re.compile(r"\bscale\s+(?:of|from)\s+[01]\s*(?:-|–|to)\s*(?P<den>\d+)\b", re.IGNORECASE)
_SCORE_WORDS = (
    r"(?:scor\w*|rat(?:e|es|ed|ing|ings)|grad(?:e|es|ed|ing)|similarity|precision|overall|marks?|marked"
    r"|giv(?:e|es|ing|en)|gave|award\w*|verdict|assessment)"
)
_SCORE_BEFORE = re.compile(rf"\b{_SCORE_WORDS}\b(?:\W+\w+){{0,3}}?\W*$", re.IGNORECASE)
_SCORE_AFTER = re.compile(
    rf"\s*(?:points?|pts|stars?)?\s*(?:for|on|in)\s+(?:the\s+|its\s+|my\s+)?{_SCORE_WORDS}\b", re.IGNORECASE
)
_CLAUSE_END = re.compile(r"[.!?](?:\s|$)|\n")
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


def _fractions(text: str) -> set[tuple[float | None, int]]:
    """Every fraction ("7/8", "3 out of 4") and scale ("scale of 1-10", as (None, 10)) written in `text`."""
    found: set[tuple[float | None, int]] = {
        (float(m.group("num")), int(m.group("den"))) for m in _FRACTION.finditer(text)
    }
    return found | {(None, int(m.group("den"))) for m in _SCALE_RANGE.finditer(text)}


def _score_statements(prose: str) -> list[tuple[float | None, int, str]]:
    """(score, top, as written) of every statement of a scale in `prose`: a fraction next to a score word,
    or "scale of 1-N" (score None)."""
    found = []
    for m in _FRACTION.finditer(prose):
        clause = _CLAUSE_END.split(prose[max(0, m.start() - 80) : m.start()])[-1]
        if _SCORE_BEFORE.search(clause) or _SCORE_AFTER.match(prose, m.end()):
            found.append((float(m.group("num")), int(m.group("den")), m.group(0)))
    found += [(None, int(m.group("den")), m.group(0)) for m in _SCALE_RANGE.finditer(prose)]
    return found


def _prose(text: str) -> str:
    """`text` with every JSON value in it blanked out: what the judge wrote around its objects."""
    out, last = [], 0
    for _, start, end in json_spans(text):
        out.append(text[last:start])
        last = end
    return " ".join([*out, text[last:]])


def read_judgment(
    text: str, *, scale_max: int = SCORE_MAX, quoted: Sequence[str] = ()
) -> tuple[dict[str, float], dict]:
    """(scores on 1..100, the verdict object) of one judge reply; ValueError says why it is not a judgment.

    The verdict is the JSON object with both score keys found anywhere in `text`, read by the one rule of
    `services.read_one`: quoted examples and placeholders ("For example: {...}", {"similarity": "<integer
    1-100>"}) are never the verdict, and a reply holding two different judgments (self-corrections
    included) is a failure; a repeated verdict is one. A judgment on another scale than the 1..`scale_max`
    the prompt asked for is a failure, never rescaled: a score written as "8/10", an `out_of`-style key, or a
    statement of the judge's own in the prose ("Score: 8/10", "I rate it 7 out of 10", "on a scale of
    1-10"). A fraction in the prose is such a statement only when (1) it sits next to a score word (see
    `_SCORE_BEFORE` / `_SCORE_AFTER`), (2) it is not quoted from the task: the same fraction is not written in
    `quoted` (the instruction, reference and candidate the prompt showed), and (3) a score of the verdict could
    be on that scale (some score <= its top); so "the reference says 7/8", "3 out of 4 items" or a "Precision:
    3 out of 4 steps" next to {"similarity": 70, "precision": 75} leave the judgment valid, while "Score:
    8/10" next to {"similarity": 8, ...} is a failure. Pass `scale_max` only when the judge prompt asked for
    that scale.
    """
    text = text or ""

    def explain(reply: str) -> None:  # say what is wrong with the JSON that is there (missing key, ...)
        scores_from_object(extract_json(reply, lambda v: isinstance(v, dict)), scale_max)

    scores, verdict = read_one(
        text,
        _judgment_keys,
        lambda obj: scores_from_object(obj, scale_max),
        what="judgment",
        none_found=explain,
    )
    from_task = _fractions("\n".join(quoted))
    lowest = min(scores.values()) * scale_max / SCORE_MAX
    for score, top, shown in _score_statements(_prose(text)):
        if top == scale_max or (score, top) in from_task or lowest > top:
            continue
        raise _other_scale(f"the reply ({shown!r})", top, scale_max)
    return scores, verdict


def parse_judgment(text: str, *, scale_max: int = SCORE_MAX, quoted: Sequence[str] = ()) -> dict[str, float]:
    """Scores of one judge reply, on 1..100; ValueError says why the reply is not a judgment (`read_judgment`)."""
    return read_judgment(text, scale_max=scale_max, quoted=quoted)[0]


def _rationale(obj: dict) -> str | None:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    for key in ("rationale", "reason", "explanation"):
        value = lowered.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()[:RATIONALE_MAX_CHARS]
    return None


def rationale_of(text: str, *, quoted: Sequence[str] = ()) -> str | None:
    """The judge's optional short reason (`rationale`, `reason` or `explanation`) in the verdict object, cut
    to a few sentences; None when the reply has none or is not a judgment."""
    try:
        return _rationale(read_judgment(text, quoted=quoted)[1])
    except ValueError:
        return None


@dataclass(frozen=True)
class JudgmentReader:
    """The reading of a judge reply, as the judge request's `reader` and `judgment_record` both apply it:
    {"similarity", "precision"} on 1..100 plus the "rationale" (or None); ValueError when it is not a
    judgment. `quoted`: the texts the prompt showed (fractions written there are not the judge's scale)."""

    quoted: tuple[str, ...] = ()
    scale_max: int = SCORE_MAX

    def __call__(self, text: str) -> dict[str, Any]:
        scores, verdict = read_judgment(text, scale_max=self.scale_max, quoted=self.quoted)
        return {**scores, "rationale": _rationale(verdict)}


def judge_reader(row: dict) -> JudgmentReader:
    """The reader of the judgments of `row` (its instruction, reference and candidate are the quoted texts)."""
    return JudgmentReader(tuple(str(row.get(key) or "") for key in ("instruction", "reference", "candidate")))


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
    try:  # the request's reader, applied to the text again: one reading, whatever filled `result.parsed`
        reading = judge_reader(row)(result.text)
    except ValueError as exc:
        kind = "range" if "outside" in str(exc) else "parse"
        record["error"] = f"{kind}: {exc}"
        record["raw"] = (result.text or "")[:RAW_KEEP_CHARS]
        return record
    record.update(reading, ok=True)
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


def answer_requests(
    test_rows: Sequence[dict], k: int, sampling: InferenceConfig, repeat_offset: int = 0
) -> list[ChatRequest]:
    """K requests per test prompt (prompt-major), as `answer_with_provider` sends them: the instruction put to
    the service exactly as to the student (one user turn), sample j with `repeat = repeat_offset + j`."""
    return [
        ChatRequest(
            messages=student_messages(row["instruction"], row.get("system")),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            repeat=repeat_offset + sample,
            allow_truncated=True,  # judged like the student's answers, which are kept when cut at the budget
        )
        for row in test_rows
        for sample in range(k)
    ]


def answer_with_provider(
    pool: ServicePool,
    provider: str,
    test_rows: Sequence[dict],
    k: int,
    sampling: InferenceConfig,
    *,
    model_id: str | None = None,
    desc: str = "",
    repeat_offset: int = 0,
) -> list[dict]:
    """K sampled answers per test prompt from `provider`, in 03's responses.jsonl shape.

    `test_rows` are coverage rows (`id`, `instruction`, `response`, `category`); `sampling` gives
    temperature, top_p and max_new_tokens (an InferenceConfig). The requests are `answer_requests`'. A failed
    call keeps its `error` (candidate ""). A caller whose answers must be fresh calls rather than replays of
    another stage's identical requests (06's parity against 03) gives its own `repeat_offset`.
    """
    generation = {
        "engine": f"service:{provider}",
        "k": k,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens,
    }
    requests = answer_requests(test_rows, k, sampling, repeat_offset)
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
            reader=judge_reader(row),
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
        # every judge at once: each provider fills its own rate limit (scheduler), none waits for another
        desc = f"judges {'+'.join(cfg.judges)} ({len(answered)} rows x M={cfg.m})"
        grouped = pool.complete_groups({judge: requests for judge in cfg.judges}, desc=desc)
        for judge in cfg.judges:
            for i, result in enumerate(grouped[judge]):
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


# --------------------------------------------------------------------------- planned calls (the forecast prices them)


def assumed_answers(test_rows: Sequence[dict], k: int, max_new_tokens: int) -> list[dict]:
    """Answers not written yet, as a plan assumes them: K per test prompt, each as long as the reference
    (at most `max_new_tokens`, ~4 characters a token), in 03's responses.jsonl shape."""
    return [
        {
            "prompt_id": row["id"],
            "instruction": row["instruction"],
            "reference": row["response"],
            "candidate": row["response"][: max_new_tokens * 4],
            "sample_index": sample,
            "category": row.get("category") or "",
        }
        for row in test_rows
        for sample in range(k)
    ]


def planned_answer_calls(
    stage: str,
    cycle: int | None,
    provider: str,
    test_rows: Sequence[dict],
    k: int,
    sampling: InferenceConfig,
    repeat_offset: int = 0,
) -> list[PlannedCall]:
    """The calls `answer_with_provider` makes: its requests, each reply as long as the reference (capped)."""
    requests = answer_requests(test_rows, k, sampling, repeat_offset)
    return [
        PlannedCall(
            stage,
            cycle,
            provider,
            request,
            min(sampling.max_new_tokens, len(test_rows[i // k]["response"]) // 4),
        )
        for i, request in enumerate(requests)
    ]


def planned_judge_calls(
    stage: str, cycle: int | None, rows: Sequence[dict], cfg: EvaluateConfig, min_repeat: int = 0
) -> list[PlannedCall]:
    """The calls `judge_rows` makes for `rows`: every LLM judge, the requests of every answered row, M repeats
    (reference-metric judges are offline and free). Repeats below `min_repeat` are left out: a caller whose
    first repeats replay from the call cache (06 re-judging 04's answers) says so."""
    answered = [row for row in rows if not row.get("error")]
    if not cfg.judges or not answered:
        return []
    requests = [r for r in judge_requests(answered, cfg, judge_template()) if r.repeat >= min_repeat]
    reply = min(JUDGE_REPLY_TOKENS, cfg.max_tokens)
    return [PlannedCall(stage, cycle, judge, request, reply) for judge in cfg.judges for request in requests]
