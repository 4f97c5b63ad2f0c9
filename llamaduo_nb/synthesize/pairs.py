"""05_synthesize: grow the training data with service-LLM pairs seeded from the coverage train split.

One cycle of synthesis (paper §3.5, eq. 7-9):

1. **Seeds** come from the coverage *train* split only, drawn without replacement (a fresh permutation
   each pass through the split) with a random generator seeded by `cycle_seed(cfg.seed, cycle)`, so each
   cycle draws different seeds (the reference implementation reused the same ones every loop).
2. **Requests**: one per seed, with the summarization template for summarization seeds and the general
   template otherwise (`prompts/synthesize_*.md`), each asking for `pairs_per_request` pairs as JSON.
   Replies are parsed robustly; a request error or an unparseable reply is counted and logged.
3. **Post-processing** before anything is accepted: quality rules (empty or placeholder-only, too long,
   truncated, refusal, response merely repeating the instruction), decontamination against the test
   split (instructions and responses), and exact and near-duplicate removal within the batch and against
   all earlier data (train split and the synthetic data of earlier cycles), one copy kept. Dedup and
   decontamination are `dataquality.clean`'s; every rejected row keeps its reason and what it matched.

Volume: `target_per_cycle * 2**cycle` accepted rows when growth is "double"; with "double_total" the
cumulative synthetic volume doubles (1K, 2K, 4K, ... as in the paper's Table 3/5, see `target_rows`); with
`synthesize.volumes` listed, what the next listed volume adds; asked for
in rounds (sized by the yield of the rounds before) until the target is met or `max_requests_per_cycle`
requests have been sent.

Best-of-N (a generator with N > 1, `teacher.answer_best_of_n`): each pair's response is sample 0, N - 1 more
answers are asked for and the reward keeps the best; at most `pairs_per_request` pairs of a reply go on (the
surplus is logged), so the calls stay within what `planned_synthesis_calls` (the forecast's plan) bounds.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import MAX_BEST_OF_N, RunConfig, SynthesizeConfig, TeacherCandidate
from ..dataquality import DecontamParams, clean
from ..jsonio import read_json, read_jsonl, save_figure, write_json, write_jsonl
from ..notebook import Stage
from ..plan import PlannedCall, PlannedCalls
from ..prompts import PromptTemplate, load_template
from ..runlayout import RunLayout
from ..schemas import LEDGER_SYNTHESIS
from ..services import ChatRequest, ChatResult, ServicePool, read_one
from .splits import load_split
from .teacher import (
    Reward,
    answer_best_of_n,
    answer_requests,
    chosen_candidate,
    make_reward,
    planned_reward_calls,
)

SYNTH_PLACEHOLDERS = {"instruction", "response", "category", "n_pairs"}
TEMPLATES = {"summarization": "synthesize_summarization", "general": "synthesize_general"}
SYNTHETIC_SOURCE = "synthetic"

PAIRS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "pairs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"instruction": {"type": "string"}, "response": {"type": "string"}},
                "required": ["instruction", "response"],
            },
        }
    },
    "required": ["pairs"],
}

# Filters in the order they run; the report and the bar plot use this order.
FILTERS = (
    "empty",
    "too_long",
    "truncated",
    "refusal",
    "echo",
    "contaminated",
    "duplicate_in_batch",
    "duplicate_of_earlier",
    "over_target",  # synthesize.volumes: accepted beyond the listed volume (kept out, so the volume is exact)
)

_REFUSAL = re.compile(
    r"\bas an ai\b|\bas a(?:n ai)? language model\b|^\s*i['’]?m sorry\b|^\s*i apologi[sz]e\b"
    r"|\bi (?:cannot|can['’]t|am unable to|am not able to|won['’]t) (?:help|assist|provide|comply|fulfil)",
    re.IGNORECASE | re.MULTILINE,
)
_HAS_CONTENT = re.compile(r"\w")  # "..." or "  " is a placeholder, not text
_TRUNCATION_MIN_CHARS = 200  # shorter texts may legitimately end without punctuation ("Positive")
_OPEN_ENDING = re.compile(r"[A-Za-z,;:(\[{\-–]\s*$")
_LIST_OR_CODE_LINE = re.compile(r"^\s*(?:[-*+•]|\d+[.)]|#|\||    |\t)")


# --------------------------------------------------------------------------- seeds and volume


def cycle_seed(base_seed: int, cycle: int) -> int:
    """The random seed of cycle `cycle`'s seed sampling: a stable hash of (base seed, cycle)."""
    digest = hashlib.sha256(f"llamaduo-synth:{base_seed}:{cycle}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def target_rows(cfg: SynthesizeConfig, cycle: int) -> int:
    """Accepted rows wanted in cycle `cycle` (k = target_per_cycle).

    constant: k. double: 2^cycle k (cumulative k, 3k, 7k, ...). double_total: k, k, 2k, 4k, ... so the
    synthetic data of cycles 0..t adds up to 2^t k: the paper's volumes 1K, 2K, 4K, ..., 256K for k = 1K.
    With `volumes` listed (the synthetic rows cycle t + 1 trains on), 05 of cycle t asks for what the next
    volume adds: volumes[t] - volumes[t - 1] (volumes[0] in cycle 0); 0 beyond the list.
    """
    if cfg.volumes is not None:
        if cycle >= len(cfg.volumes):
            return 0
        return cfg.volumes[cycle] - (cfg.volumes[cycle - 1] if cycle else 0)
    k = cfg.target_per_cycle
    if cfg.growth == "double":
        return k * 2**cycle
    if cfg.growth == "double_total":
        return k * 2 ** max(0, cycle - 1)
    return k


def sample_seeds(train: Sequence[dict], n: int, seed: int) -> list[dict]:
    """`n` seed rows: successive random permutations of the train split, so no row repeats before all
    rows have been used once."""
    if not train:
        raise ValueError("the coverage train split is empty: nothing to seed synthesis with")
    rng = random.Random(seed)
    seeds: list[dict] = []
    while len(seeds) < n:
        order = list(range(len(train)))
        rng.shuffle(order)
        seeds.extend(train[i] for i in order[: n - len(seeds)])
    return seeds


def task_kind(category: str | None) -> str:
    """Which synthesis template a seed uses: "summarization" for summarization seeds, else "general"."""
    return "summarization" if category and "summar" in category.lower() else "general"


def load_templates() -> dict[str, PromptTemplate]:
    return {kind: load_template(name, required=SYNTH_PLACEHOLDERS) for kind, name in TEMPLATES.items()}


def synthesis_messages(seed: dict, cfg: SynthesizeConfig, templates: dict[str, PromptTemplate]) -> list[dict]:
    template = templates[task_kind(seed.get("category"))]
    content = template.render(
        instruction=seed["instruction"],
        response=seed["response"],
        category=seed.get("category") or "general",
        n_pairs=str(cfg.pairs_per_request),
    )
    return [{"role": "user", "content": content}]


def prompt_preview(run_cfg: RunConfig, layout: RunLayout, cycle: int) -> str:
    """The synthesis prompt of this cycle's first request: the template of its first seed (drawn from the
    train split exactly as `synthesize_cycle` draws it), rendered with that seed row."""
    train = load_split(layout.train_file, "train")
    seed = sample_seeds(train, 1, cycle_seed(run_cfg.seed, cycle))[0]
    messages = synthesis_messages(seed, run_cfg.synthesize, load_templates())
    header = (
        f"seed {seed['id']} ({seed.get('category') or 'general'}, template {task_kind(seed.get('category'))})"
    )
    return header + "\n\n" + messages[0]["content"]


# --------------------------------------------------------------------------- parsing replies


_INSTRUCTION_KEYS = ("instruction", "prompt", "question")
_RESPONSE_KEYS = ("response", "answer", "output")


def _pick(item: dict, keys: Sequence[str]) -> Any:
    lowered = {str(k).strip().lower(): v for k, v in item.items()}
    for key in keys:
        if key in lowered:
            return lowered[key]
    return None


def _pair_list(obj: Any) -> list | None:
    """The list of candidate pairs `obj` holds, or None when it holds none (see parse_pairs)."""
    if isinstance(obj, dict):
        if _pick(obj, _INSTRUCTION_KEYS) is not None and _pick(obj, _RESPONSE_KEYS) is not None:
            return [obj]
        lists = [v for k, v in obj.items() if isinstance(v, list)]
        preferred = [obj[k] for k in obj if str(k).lower() in ("pairs", "contents", "examples", "data")]
        if preferred and isinstance(preferred[0], list):
            return preferred[0]
        return lists[0] if len(lists) == 1 else None
    return obj if isinstance(obj, list) else None


def _holds_pairs(obj: Any) -> bool:
    """A JSON value worth taking as the reply: it holds a list with at least one object in it."""
    items = _pair_list(obj)
    return items is not None and any(isinstance(item, dict) for item in items)


def _no_pairs(text: str) -> None:
    raise ValueError(f"no list of pairs in the reply: {text[:200]!r}")


def parse_pairs(text: str) -> tuple[list[dict], int]:
    """(pairs, malformed_items) from a generator reply (the synthesis requests' `reader`); ValueError when no
    list of pairs is found.

    Accepted shapes: {"pairs": [...]} (what we ask for), the paper's {"contents": [...]}, any single
    top-level list value, a bare list, or one {"instruction", "response"} object — found anywhere in the
    reply (prose, fences, a "[1]" rubric before it are skipped), by `services.read_one`'s rule: a placeholder
    ({"pairs": [{"instruction": "...", "response": "..."}]}, the prompt's format) is never the answer, and two
    different lists of pairs in one reply are a failure. Prose calling the pairs "examples" does not make them
    quotes (they are examples by nature). Items that are not objects with string instruction and response are
    dropped and counted.
    """
    return read_one(
        text or "",
        _holds_pairs,
        _read_pairs,
        what="list of pairs",
        whats="lists of pairs",
        examples=False,
        none_found=_no_pairs,
    )[0]


def _read_pairs(obj: Any) -> tuple[list[dict], int]:
    items = _pair_list(obj)
    if not isinstance(items, list):
        raise ValueError(f"no list of pairs in {json.dumps(obj)[:200]}")
    pairs, malformed = [], 0
    for item in items:
        if not isinstance(item, dict):
            malformed += 1
            continue
        instruction, response = _pick(item, _INSTRUCTION_KEYS), _pick(item, _RESPONSE_KEYS)
        if not isinstance(instruction, str) or not isinstance(response, str):
            malformed += 1
            continue
        pairs.append({"instruction": instruction.strip(), "response": response.strip()})
    return pairs, malformed


# --------------------------------------------------------------------------- quality rules


def looks_truncated(text: str) -> bool:
    """An odd number of ``` fences, or a long text whose last prose line stops mid-sentence."""
    if text.count("```") % 2 == 1:
        return True
    if len(text) < _TRUNCATION_MIN_CHARS:
        return False
    last = text.rstrip().splitlines()[-1] if text.strip() else ""
    if _LIST_OR_CODE_LINE.match(last):
        return False
    return bool(_OPEN_ENDING.search(last))


def quality_reason(instruction: str, response: str, max_chars: int) -> tuple[str, str] | None:
    """(filter, detail) for the first quality rule a pair breaks, None when it passes them all."""
    for name, text in (("instruction", instruction), ("response", response)):
        if not _HAS_CONTENT.search(text):
            return "empty", f"{name} has no letters or digits: {text[:40]!r}"
    if len(response) > max_chars:
        return "too_long", f"response has {len(response)} chars > max_response_chars {max_chars}"
    if len(instruction) > max_chars:
        return "too_long", f"instruction has {len(instruction)} chars > max_response_chars {max_chars}"
    for name, text in (("response", response), ("instruction", instruction)):
        if looks_truncated(text):
            return "truncated", f"{name} looks cut off: ...{text.rstrip()[-60:]!r}"
    match = _REFUSAL.search(response)
    if match:
        return "refusal", f"response contains {match.group(0).strip()!r}"
    if _normalized(response) == _normalized(instruction):
        return "echo", "response repeats the instruction"
    return None


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


# --------------------------------------------------------------------------- generation


@dataclass
class SynthesisResult:
    accepted: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)  # one log line per request
    report: dict = field(default_factory=dict)


def generator_of(run_cfg: RunConfig, layout: RunLayout, cycle: int) -> TeacherCandidate:
    """Who writes this cycle's pairs and how it samples: the teacher study's choice when the cycle has one,
    else `synthesize.generator` with `synthesize.temperature / top_p / best_of_n`."""
    chosen = chosen_candidate(run_cfg, layout, cycle)
    return chosen if chosen is not None else default_generator(run_cfg)


def default_generator(run_cfg: RunConfig) -> TeacherCandidate:
    """`synthesize.generator` with `synthesize.temperature / top_p / best_of_n`: the generator without a
    study, or when the study ranks no candidate."""
    cfg = run_cfg.synthesize
    return TeacherCandidate(
        name=cfg.generator,
        provider=cfg.generator,
        temperature=cfg.temperature,
        top_p=cfg.top_p if cfg.top_p is not None else 1.0,
        n=cfg.best_of_n,
        max_tokens=cfg.max_tokens,
    )


def generator_info(run_cfg: RunConfig, teacher: TeacherCandidate | None = None) -> dict:
    """The generator as lineage records it: provider, model and the sampling params that wrote the pairs."""
    cfg = run_cfg.synthesize
    name = teacher.provider if teacher else cfg.generator
    provider = run_cfg.provider(name)
    top_p = teacher.top_p if teacher else cfg.top_p
    info = {
        "provider": provider.name,
        "kind": provider.kind,
        "model": provider.model,
        "params": {
            "temperature": teacher.temperature if teacher else cfg.temperature,
            "top_p": top_p,
            "max_tokens": cfg.max_tokens,
            "pairs_per_request": cfg.pairs_per_request,
            "best_of_n": teacher.n if teacher else cfg.best_of_n,
        },
    }
    if teacher is not None and teacher.name != teacher.provider:
        info["candidate"] = teacher.name  # chosen by the teacher study
    return info


def synthetic_id(cycle: int, repeat: int, pair_index: int) -> str:
    """Unique per candidate: cycle, the request's repeat number and the pair's place in the reply."""
    return f"synth-c{cycle:02d}-{repeat:05d}-{pair_index:02d}"


def request_batch(
    seeds: Sequence[dict],
    cfg: SynthesizeConfig,
    templates: dict[str, PromptTemplate],
    first_repeat: int,
    teacher: TeacherCandidate | None = None,
) -> list:
    """One ChatRequest per seed. `repeat` is unique per (cycle, request) so that a seed drawn again, in
    this cycle or a later one, gets a fresh answer rather than the cached one."""
    return [
        ChatRequest(
            messages=synthesis_messages(seed, cfg, templates),
            temperature=teacher.temperature if teacher else cfg.temperature,
            top_p=teacher.top_p if teacher else cfg.top_p,
            max_tokens=cfg.max_tokens,
            json_schema=PAIRS_SCHEMA,
            schema_name="pairs",
            repeat=first_repeat + i,
            reader=parse_pairs,
        )
        for i, seed in enumerate(seeds)
    ]


def candidates_from_results(
    seeds: Sequence[dict],
    results: Sequence[ChatResult],
    cycle: int,
    generator: dict,
    first_repeat: int,
    max_pairs: int | None = None,
) -> tuple[list[dict], list[dict]]:
    """Candidate rows (coverage schema + lineage) and one log record per request.

    `max_pairs`: keep at most this many pairs of a reply (the rest is logged as `surplus`). Best-of-N sets
    it to `pairs_per_request`: every kept pair costs N - 1 answers and N x M rewards, and a generator writing
    more pairs than asked must not make 05 pay more than its forecast's upper bound."""
    candidates, log = [], []
    for i, (seed, result) in enumerate(zip(seeds, results, strict=True)):
        entry = {"repeat": first_repeat + i, "seed_id": seed["id"], "kind": task_kind(seed.get("category"))}
        entry.update(cached=bool(getattr(result, "cached", False)), pairs=0, malformed=0, error=None)
        if result.error:
            entry["error"] = f"request: {result.error}"
            log.append(entry)
            continue
        try:
            pairs, malformed = parse_pairs(result.text)  # the requests' reader, one reading
        except ValueError as exc:
            entry["error"] = f"parse: {exc}"
            entry["raw"] = (result.text or "")[:1000]
            log.append(entry)
            continue
        if max_pairs is not None and len(pairs) > max_pairs:
            entry["surplus"] = len(pairs) - max_pairs
            pairs = pairs[:max_pairs]
        entry.update(pairs=len(pairs), malformed=malformed)
        log.append(entry)
        params = {**generator["params"], "repeat": first_repeat + i}
        named = {"candidate": generator["candidate"]} if "candidate" in generator else {}
        for pair_index, pair in enumerate(pairs):
            candidates.append(
                {
                    "id": synthetic_id(cycle, first_repeat + i, pair_index),
                    "instruction": pair["instruction"],
                    "response": pair["response"],
                    "category": seed.get("category") or "",
                    "source": SYNTHETIC_SOURCE,
                    "lineage": {
                        "seed_id": seed["id"],
                        "cycle": cycle,
                        "generator": {
                            "provider": generator["provider"],
                            "model": generator["model"],
                            **named,
                            "params": params,
                        },
                    },
                }
            )
    return candidates, log


# --------------------------------------------------------------------------- post-processing


def reject(
    row: dict, reason: str, detail: str, matched_id: str | None = None, score: float | None = None
) -> dict:
    """A rejected candidate: its fields plus why (`reason` is one of FILTERS) and what it matched."""
    return {**row, "reason": reason, "detail": detail, "matched_id": matched_id, "score": score}


def apply_quality_rules(rows: Sequence[dict], max_chars: int) -> tuple[list[dict], list[dict]]:
    kept, rejected = [], []
    for row in rows:
        reason = quality_reason(row["instruction"], row["response"], max_chars)
        if reason is None:
            kept.append(row)
        else:
            rejected.append(reject(row, *reason))
    return kept, rejected


def postprocess(
    candidates: Sequence[dict],
    earlier: Sequence[dict],
    test: Sequence[dict],
    cfg: SynthesizeConfig,
) -> tuple[list[dict], list[dict]]:
    """(accepted, rejected): quality rules, then `dataquality.clean` (decontamination against `test`,
    then exact/near-duplicate removal within the batch and against `earlier`, one copy kept).

    Rejected rows keep all their fields plus `reason` (one of FILTERS), `detail`, and for duplicates and
    contamination `matched_id` (the row or test item it matched) and `score`.
    """
    kept, rejected = apply_quality_rules(candidates, cfg.max_response_chars)
    if not kept:
        return [], rejected
    result = clean(
        kept,
        against=earlier,
        test=test,
        dedup_threshold=cfg.dedup_threshold,
        decontam=DecontamParams(rouge_threshold=cfg.decontam_threshold),
    )
    for hit in result.decontamination.dropped if result.decontamination else []:
        row = kept[hit.index]
        detail = f"{hit.field} ~ test {hit.test_id} {hit.test_field} by {hit.rule} ({hit.score:.2f})"
        rejected.append(reject(row, "contaminated", detail, str(hit.test_id), round(hit.score, 4)))
    for drop in result.dedup.dropped:
        row = kept[drop.index]
        in_batch = drop.duplicate_of_source == "pool"
        matched = (kept if in_batch else earlier)[drop.duplicate_of]
        where = "this batch" if in_batch else "earlier data"
        detail = (
            f"{drop.reason.replace('_', ' ')} of {matched.get('id')} ({where}), ROUGE-L F1 {drop.score:.2f}"
        )
        reason = "duplicate_in_batch" if in_batch else "duplicate_of_earlier"
        rejected.append(reject(row, reason, detail, matched.get("id"), round(drop.score, 4)))
    return [kept[i] for i in result.kept_indices], rejected


# --------------------------------------------------------------------------- the stage


def earlier_data(layout: RunLayout, cycle: int) -> list[dict]:
    """Train split + the accepted synthetic rows of cycles before `cycle` (the dedup reference D')."""
    rows = list(read_jsonl(layout.train_file))
    for previous in range(cycle):
        path = layout.synthetic_file(previous)
        if path.is_file():
            rows.extend(read_jsonl(path))
    return rows


def best_of_n_responses(
    candidates: list[dict], teacher: TeacherCandidate, pool: ServicePool, reward: Reward, cycle: int
) -> list[dict]:
    """Best-of-N: the pair's own response is sample 0; N - 1 more answers are asked for, every answer is
    scored by the reward, the highest one is kept and all N rewards go into the row's lineage."""
    out = []
    for row in candidates:
        # one cache salt per candidate row, so the extra answers of two rows never share a cache key
        salt = (cycle * 10**9 + int(row["lineage"]["generator"]["params"]["repeat"]) * 100) * 100
        salt += int(row["id"].rsplit("-", 1)[1]) * MAX_BEST_OF_N
        best, _, errors = answer_best_of_n(
            pool, teacher, [row["instruction"]], reward, salt=salt, seed_answers=[row["response"]]
        )
        record = {**best.records[0], "errors": errors[0]}
        lineage = {**row["lineage"], "best_of_n": record}
        out.append({**row, "response": best.kept[0] or row["response"], "lineage": lineage})
    return out


def synthesize_cycle(
    run_cfg: RunConfig,
    layout: RunLayout,
    cycle: int,
    pool: ServicePool,
    teacher: TeacherCandidate | None = None,
    reward: Reward | None = None,
) -> SynthesisResult:
    """Generate, post-process and account for one cycle's synthetic data (no files written).

    `teacher` (default: `generator_of`) decides provider and sampling; with N > 1 a `reward` is needed."""
    cfg = run_cfg.synthesize
    train = load_split(layout.train_file, "train")
    test = load_split(layout.test_file, "test")
    earlier = earlier_data(layout, cycle)
    templates = load_templates()
    teacher = teacher or generator_of(run_cfg, layout, cycle)
    if teacher.n > 1 and reward is None:
        raise ValueError(f"best-of-N with N={teacher.n} needs a reward (teacher_study.reward)")
    generator = generator_info(run_cfg, teacher)
    target = target_rows(cfg, cycle)
    seeds_stream = sample_seeds(train, cfg.max_requests_per_cycle, cycle_seed(run_cfg.seed, cycle))

    result = SynthesisResult()
    sent, rounds = 0, 0
    while len(result.accepted) < target and sent < cfg.max_requests_per_cycle:
        missing = target - len(result.accepted)
        # later rounds size themselves by the yield seen so far (accepted rows per request), so a high
        # rejection rate does not turn into many tiny rounds; the budget caps it either way
        per_request = cfg.pairs_per_request if sent == 0 else max(len(result.accepted) / sent, 0.5)
        n = min(math.ceil(missing / per_request), cfg.max_requests_per_cycle - sent)
        seeds = seeds_stream[sent : sent + n]
        first_repeat = cycle * cfg.max_requests_per_cycle + sent
        requests = request_batch(seeds, cfg, templates, first_repeat, teacher)
        results = pool.complete_many(
            teacher.provider, requests, desc=f"synthesize round {rounds + 1} ({n} requests)"
        )
        max_pairs = cfg.pairs_per_request if teacher.n > 1 else None
        candidates, log = candidates_from_results(seeds, results, cycle, generator, first_repeat, max_pairs)
        if teacher.n > 1 and candidates:
            candidates = best_of_n_responses(candidates, teacher, pool, reward, cycle)
        accepted, rejected = postprocess(candidates, earlier + result.accepted, test, cfg)
        result.accepted += accepted
        result.rejected += rejected
        result.requests += log
        sent += n
        rounds += 1

    if cfg.volumes is not None and len(result.accepted) > target:  # listed volumes are trained on exactly
        surplus, result.accepted = result.accepted[target:], result.accepted[:target]
        detail = f"beyond the {target} rows this cycle adds to reach synthesize.volumes"
        result.rejected += [reject(row, "over_target", detail, None, None) for row in surplus]
    result.report = build_report(result, cycle, target, rounds, generator, cfg)
    return result


def build_report(
    result: SynthesisResult, cycle: int, target: int, rounds: int, generator: dict, cfg: SynthesizeConfig
) -> dict:
    by_filter = Counter(r["reason"] for r in result.rejected)
    request_errors = sum(1 for r in result.requests if (r["error"] or "").startswith("request"))
    parse_errors = sum(1 for r in result.requests if (r["error"] or "").startswith("parse"))
    candidates = len(result.accepted) + len(result.rejected)
    return {
        "cycle": cycle,
        "target": target,
        "rounds": rounds,
        "requests": len(result.requests),
        "requests_cached": sum(1 for r in result.requests if r["cached"]),
        "request_failures": request_errors,
        "parse_failures": parse_errors,
        "malformed_pairs": sum(r["malformed"] for r in result.requests),
        "surplus_pairs": sum(
            r.get("surplus", 0) for r in result.requests
        ),  # best-of-N: beyond pairs_per_request
        "candidates": candidates,
        "rejected": {name: by_filter.get(name, 0) for name in FILTERS},
        "accepted": len(result.accepted),
        "target_met": len(result.accepted) >= target,
        "generator": generator,
        "thresholds": {"dedup_rouge_l": cfg.dedup_threshold, "decontam_rouge_l": cfg.decontam_threshold},
        "seeds_used": sorted({r["seed_id"] for r in result.requests}),
    }


def run_synthesis(stage: Stage) -> SynthesisResult:
    """05's work: open the ServicePool, synthesize, and write synthetic / rejected / report files.

    The generator is the teacher study's choice when this cycle ran one (`teacher.run_teacher_study`)."""
    teacher = generator_of(stage.cfg, stage.layout, stage.cycle)
    reward_cfg = stage.cfg.teacher_study.reward
    providers = [teacher.provider]
    if teacher.n > 1 and reward_cfg.kind == "judge" and reward_cfg.judge not in providers:
        providers.append(reward_cfg.judge)
    with ServicePool(stage.cfg, stage.layout, LEDGER_SYNTHESIS, stage.cycle, providers=providers) as pool:
        reward = make_reward(reward_cfg, pool) if teacher.n > 1 else None
        result = synthesize_cycle(stage.cfg, stage.layout, stage.cycle, pool, teacher, reward)
    study_file = stage.layout.teacher_study_file(stage.cycle)
    if study_file.is_file():
        study = read_json(study_file)
        result.report["teacher_study"] = {"chosen": study.get("chosen"), "why": study.get("why")}
    write_results(result, stage.layout, stage.cycle)
    return result


def write_results(result: SynthesisResult, layout: RunLayout, cycle: int) -> None:
    write_jsonl(layout.synthetic_rejected_file(cycle), result.rejected)
    write_json(layout.synth_report(cycle), {**result.report, "request_log": result.requests})
    write_jsonl(layout.synthetic_file(cycle), result.accepted)


# --------------------------------------------------------------------------- planned calls (the forecast prices them)


def expected_requests(cfg: SynthesizeConfig, cycle: int, accept_share: float) -> int:
    """Requests `synthesize_cycle` sends in `cycle` when a share `accept_share` of the pairs is kept (at most
    `max_requests_per_cycle`, what it can send)."""
    wanted = math.ceil(target_rows(cfg, cycle) / (cfg.pairs_per_request * accept_share))
    return min(wanted, cfg.max_requests_per_cycle)


def _generator_calls(
    run_cfg: RunConfig,
    cycle: int,
    gen: TeacherCandidate,
    seeds: Sequence[dict],
    expected: int,
    templates: dict[str, PromptTemplate],
    pair_tokens: int | None,
) -> list[PlannedCall]:
    sy = run_cfg.synthesize
    first_repeat = cycle * sy.max_requests_per_cycle  # as synthesize_cycle numbers its requests
    # request i goes to seeds[i] with repeat first_repeat + i, whatever the rounds; a seed drawn again is the
    # same prompt with another repeat: one representative request per distinct seed, with its count
    lines: dict[int, list] = {}
    for i, seed in enumerate(seeds):
        line = lines.setdefault(id(seed), [i, 0, 0])
        line[1] += i < expected
        line[2] += 1
    calls = []
    for first, count, most in lines.values():
        seed = seeds[first]
        (request,) = request_batch([seed], sy, templates, first_repeat + first, gen)
        pair = (
            pair_tokens
            if pair_tokens is not None
            else (len(seed["instruction"]) + len(seed["response"])) // 4
        )
        reply = min(sy.max_tokens, (pair + 20) * sy.pairs_per_request)  # 20: the JSON around each pair
        calls.append(PlannedCall(LEDGER_SYNTHESIS, cycle, gen.provider, request, reply, count, most))
    if gen.n > 1:  # best-of-N: per pair N - 1 more answers, and every one of the N answers rewarded M times
        used = seeds[: max(expected, 1)]
        instruction = "x" * (sum(len(s["instruction"]) for s in used) // len(used))  # a synthetic instruction
        answer = sum(len(s["response"]) for s in used) // len(used) // 4
        pairs, most = expected * sy.pairs_per_request, len(seeds) * sy.pairs_per_request
        (extra,) = answer_requests(replace(gen, n=1), [instruction])
        calls.append(
            PlannedCall(
                LEDGER_SYNTHESIS,
                cycle,
                gen.provider,
                extra,
                min(answer, gen.max_tokens),
                (gen.n - 1) * pairs,
                (gen.n - 1) * most,
            )
        )
        rewarded = planned_reward_calls(
            LEDGER_SYNTHESIS, cycle, run_cfg.teacher_study.reward, [(instruction, "y" * answer * 4)]
        )
        calls += [replace(c, count=gen.n * pairs, max_count=gen.n * most) for c in rewarded]
    return calls


def planned_synthesis_calls(
    run_cfg: RunConfig,
    cycle: int,
    train: Sequence[dict],
    accept_share: float = 0.7,
    pair_tokens: int | None = None,
) -> PlannedCalls:
    """05's synthesis (`synthesize_cycle`, ledger stage "05_synthesize"): the requests it sends, built by
    `request_batch` from its seed stream, `expected_requests` of them expected (a share `accept_share` of the
    pairs accepted) and at most `max_requests_per_cycle`; each reply holds `pairs_per_request` pairs as long as
    the seed row (or `pair_tokens` each). With best-of-N, per pair N - 1 more answers and N x M rewards.

    With a teacher study the generator is chosen at run time: one choice whose alternatives are every
    candidate and `synthesize.generator` (used when the study ranks none); the forecast prices the costliest."""
    sy = run_cfg.synthesize
    if not train:
        return PlannedCalls()
    expected = expected_requests(sy, cycle, accept_share)
    seeds = sample_seeds(train, sy.max_requests_per_cycle, cycle_seed(run_cfg.seed, cycle))
    templates = load_templates()
    generators = [*run_cfg.teacher_study.candidates, default_generator(run_cfg)]
    options = [
        _generator_calls(run_cfg, cycle, gen, seeds, expected, templates, pair_tokens) for gen in generators
    ]
    return PlannedCalls(choices=[options]) if len(options) > 1 else PlannedCalls(options[0])


# --------------------------------------------------------------------------- tables and plots


def plan_table(run_cfg: RunConfig, layout: RunLayout, cycle: int) -> pd.DataFrame:
    """What this cycle will ask for: target volume, request budget, seed pool and sampling seed."""
    cfg = run_cfg.synthesize
    train = load_split(layout.train_file, "train")
    kinds = Counter(task_kind(row.get("category")) for row in train)
    lines = [
        ("generator", f"{cfg.generator} ({run_cfg.provider(cfg.generator).model})"),
        (
            "target accepted rows",
            f"{target_rows(cfg, cycle)} (volumes {cfg.volumes}, cycle {cycle})"
            if cfg.volumes is not None
            else f"{target_rows(cfg, cycle)} ({cfg.growth}: k={cfg.target_per_cycle}, cycle {cycle})",
        ),
        ("pairs per request", cfg.pairs_per_request),
        ("request budget", cfg.max_requests_per_cycle),
        (
            "seed pool (train split)",
            f"{len(train)} rows: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
        ),
        ("earlier rows for dedup", len(earlier_data(layout, cycle))),
        ("seed sampling seed", cycle_seed(run_cfg.seed, cycle)),
    ]
    return pd.DataFrame(lines, columns=["setting", "value"]).set_index("setting")


def accepted_preview(accepted: Sequence[dict], n: int = 8, width: int = 80) -> pd.DataFrame:
    """The first accepted rows with their seed and id."""
    records = [
        {
            "id": row["id"],
            "seed_id": row["lineage"]["seed_id"],
            "category": row["category"],
            "instruction": row["instruction"][:width],
            "response": row["response"][:width],
        }
        for row in accepted[:n]
    ]
    return pd.DataFrame(records, columns=["id", "seed_id", "category", "instruction", "response"])


def counts_table(report: dict) -> pd.DataFrame:
    """Where the candidate pairs went: one line per filter, then accepted, plus request-level failures."""
    lines = [
        ("requests sent", report["requests"]),
        ("request failures", report["request_failures"]),
        ("unparseable replies", report["parse_failures"]),
        ("malformed pairs", report["malformed_pairs"]),
        ("candidate pairs", report["candidates"]),
        *((f"rejected: {name}", n) for name, n in report["rejected"].items()),
        ("accepted", report["accepted"]),
        ("target", report["target"]),
    ]
    return pd.DataFrame(lines, columns=["step", "count"]).set_index("step")


def rejected_examples(rejected: Sequence[dict], per_filter: int = 2) -> pd.DataFrame:
    """A few rejected rows per filter with the reason, for a quick look."""
    shown: Counter[str] = Counter()
    records = []
    for row in rejected:
        name = row["reason"]
        if shown[name] >= per_filter:
            continue
        shown[name] += 1
        records.append(
            {
                "filter": name,
                "instruction": row["instruction"][:80],
                "response": row["response"][:80],
                "detail": row["detail"][:120],
            }
        )
    return pd.DataFrame(records, columns=["filter", "instruction", "response", "detail"])


def plot_counts(report: dict, path: str | Path):
    """Horizontal bars: candidates, rejections per filter, accepted; saved as PNG."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    labels = ["candidates", *FILTERS, "accepted"]
    values = [report["candidates"], *(report["rejected"][f] for f in FILTERS), report["accepted"]]
    colors = ["tab:blue"] + ["tab:red"] * len(FILTERS) + ["tab:green"]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.barh(labels[::-1], values[::-1], color=colors[::-1])
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v}", va="center")
    ax.set_xlabel("pairs")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    failed = report["request_failures"] + report["parse_failures"]
    ax.set_title(
        f"Cycle {report['cycle']}: {report['accepted']} accepted of {report['candidates']} "
        f"(target {report['target']}; {report['requests']} requests, {failed} failed)"
    )
    fig.tight_layout()
    save_figure(fig, path)
    return fig
