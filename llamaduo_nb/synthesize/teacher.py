"""05_synthesize, teacher study: choose the response generator by Compatibility-Adjusted Reward (CAR).

"Stronger Models are NOT Stronger Teachers for Instruction Tuning" (arXiv 2411.07133) finds that a larger or
stronger service LLM is not necessarily the better teacher of a given student, and ranks candidate response
generators without fine-tuning by

    CAR = r / (1 + beta * L)

r: the average reward of a candidate's responses (the return); L: the student *base* model's average loss on
them (the risk: a response the student finds improbable is harder to learn from); beta = 3 in the paper.

How one study runs (`run_study`):

1. A seeded sample of `sample_size` train-split instructions (the same every cycle, so a repeated study is
   replayed from the call cache for free).
2. Every candidate (provider + temperature + top_p + N) answers each instruction N times through the
   ServicePool (stage "teacher_study": cached and ledgered). With N > 1 the highest-reward answer is kept
   (best-of-N reject sampling) and all N rewards are recorded.
3. Reward r behind one interface (`Reward.score`): an LLM judge with the reference-free prompt
   `prompts/reward.md` (M repeats, failures excluded and counted as in 04, never scored 0), or a reward
   model loaded with transformers' AutoModelForSequenceClassification (Skywork / ArmoRM families on a GPU).
4. Loss L under the student base model: the mean per-token negative log-likelihood of each response given
   its instruction, tokenized exactly as 02 trains (the student's chat template, prompt tokens masked, the
   answer and its end-of-turn token scored, cut at `finetune.max_length`); per response, then averaged.
5. The paper's baselines under the same student: average reward alone, response length (tokens), perplexity
   PPL(y|x) = exp(L_i) and IFD = PPL(y|x) / PPL(y), with PPL(y) the answer's perplexity after an empty user
   turn (same chat template, so the answer tokens are the same). Each baseline ranks "higher is better",
   the direction data-selection work uses them in (longer, harder answers preferred).

The candidate with the highest CAR becomes the cycle's teacher: its provider and sampling settings drive the
cycle's synthesis, and every synthetic row's lineage names it. A cheap check of those rankings by fine-tuning,
laid out like the paper's Table 4 (a short LoRA per candidate, judged like 04, Spearman's rho against every
metric's ranking; a proxy, not the paper's AlpacaEval 2 / Arena-Hard after full SFT) is the end-to-end
workflow `llamaduo_nb.validation` (`llamaduo validate-teachers`), which uses this module's rankings.

The study's calls as the forecast prices them: `planned_study_calls` (the requests `run_study` sends).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from ..config import RewardConfig, RunConfig, TeacherCandidate
from ..embedded import resolve_model_path
from ..jsonio import atomic_write, read_json, save_figure, write_json, write_jsonl
from ..plan import PlannedCall, PlannedCalls
from ..prompts import PromptTemplate, load_template
from ..runlayout import RunLayout
from ..schemas import LEDGER_TEACHER_STUDY
from ..services import ChatRequest, ChatResult, ServicePool, extract_json, read_one
from ..student import load_student, student_messages
from .splits import load_split

STAGE = LEDGER_TEACHER_STUDY
REWARD_TEMPLATE = "reward"
REWARD_PLACEHOLDERS = {"instruction", "response"}
REWARD_MIN, REWARD_MAX = 1, 100
REWARD_REPLY_TOKENS = 12  # what a reward reply is expected to cost: {"quality": 80}
RAW_KEEP_CHARS = 1000
METRICS = ("car", "reward", "length", "ppl", "ifd")  # every ranking the study reports, CAR first
METRIC_LABELS = {
    "car": "CAR",
    "reward": "reward r",
    "length": "response length",
    "ppl": "PPL(y|x)",
    "ifd": "IFD",
}

REWARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"quality": {"type": "integer", "minimum": REWARD_MIN, "maximum": REWARD_MAX}},
    "required": ["quality"],
}


# --------------------------------------------------------------------------- the arithmetic (pure)


def car(reward: float, loss: float, beta: float) -> float:
    """Compatibility-Adjusted Reward: r / (1 + beta * L), for r > 0 (with r <= 0 a higher loss, i.e. a teacher
    the student fits worse, would raise the value: the ratio ranks only positive rewards)."""
    if loss < 0:
        raise ValueError(f"a mean negative log-likelihood cannot be negative, got L={loss}")
    if reward <= 0:
        raise ValueError(f"CAR = r / (1 + beta L) ranks positive rewards only, got r={reward}")
    return reward / (1.0 + beta * loss)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean per-token negative log-likelihood)."""
    if n_tokens <= 0:
        raise ValueError("perplexity of an empty answer is undefined")
    return math.exp(nll_sum / n_tokens)


def ifd(ppl_given_instruction: float, ppl_alone: float) -> float:
    """Instruction-following difficulty: PPL(y|x) / PPL(y) (above 1: the instruction does not help)."""
    return ppl_given_instruction / ppl_alone


def rank_descending(values: Sequence[float | None]) -> list[float | None]:
    """Rank 1 = highest value; ties share the average rank (as Spearman's rho needs); None stays unranked."""
    from scipy.stats import rankdata

    present = [i for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    ranks: list[float | None] = [None] * len(values)
    if present:
        order = rankdata([-float(values[i]) for i in present], method="average")  # type: ignore[arg-type]
        for i, r in zip(present, order, strict=True):
            ranks[i] = float(r)
    return ranks


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation: Pearson's r of the average ranks (ties handled as scipy does).

    None when fewer than two pairs or when one side is constant (rho undefined)."""
    from scipy.stats import rankdata

    pairs = [
        (float(x), float(y))
        for x, y in zip(a, b, strict=True)
        if x is not None and y is not None and not (math.isnan(x) or math.isnan(y))
    ]
    if len(pairs) < 2:
        return None
    ra = rankdata([p[0] for p in pairs], method="average")
    rb = rankdata([p[1] for p in pairs], method="average")
    if np.std(ra) == 0 or np.std(rb) == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def best_of_n(rewards: Sequence[float | None]) -> int | None:
    """Index of the highest reward (the first one on a tie); None when no response was scored."""
    scored = [(r, -i) for i, r in enumerate(rewards) if r is not None]
    if not scored:
        return None
    return -max(scored)[1]


# --------------------------------------------------------------------------- reward r


@dataclass
class RewardScores:
    """One reward per item (None: not scored) and, per item, what went into it."""

    values: list[float | None]
    details: list[dict] = field(default_factory=list)  # per item: {"scores": [...], "errors": [...]}

    @property
    def n_failed(self) -> int:
        return sum(1 for v in self.values if v is None)


class Reward(Protocol):
    """Scores (instruction, response) pairs; higher is better. One interface for every reward source."""

    name: str

    def score(self, items: Sequence[tuple[str, str]], tag: str = "") -> RewardScores: ...


def reward_template() -> PromptTemplate:
    return load_template(REWARD_TEMPLATE, required=REWARD_PLACEHOLDERS)


def _reward_keys(obj: Any) -> bool:
    return isinstance(obj, dict) and bool({str(k).strip().lower() for k in obj} & {"quality", "score"})


def _reward_value(obj: dict) -> float:
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    value = lowered.get("quality", lowered.get("score"))
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"quality is not a number: {value!r}")
    if not REWARD_MIN <= value <= REWARD_MAX:
        raise ValueError(f"quality={value:g} is outside {REWARD_MIN}..{REWARD_MAX}")
    return float(value)


def _explain_reward(text: str) -> None:
    obj = extract_json(text, lambda v: isinstance(v, dict))
    raise ValueError(f"no quality or score in {json.dumps(obj)[:200]}")


def parse_reward(text: str) -> float:
    """The 1-100 quality score of a reward-judge reply (the reward requests' `reader`); ValueError says what is
    wrong. The object with a `quality` (or `score`) key anywhere in the reply, by `services.read_one`'s rule:
    a quoted example or placeholder is never the score, two different scores in one reply are a failure."""
    return read_one(text or "", _reward_keys, _reward_value, what="reward", none_found=_explain_reward)[0]


def reward_requests(
    cfg: RewardConfig, items: Sequence[tuple[str, str]], template: PromptTemplate | None = None
) -> list[ChatRequest]:
    """M requests per (instruction, response), item-major: what the reward judge is sent."""
    template = template or reward_template()
    return [
        ChatRequest(
            messages=[{"role": "user", "content": template.render(instruction=inst, response=resp)}],
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            json_schema=REWARD_SCHEMA,
            schema_name="reward",
            repeat=repeat,
            reader=parse_reward,
        )
        for inst, resp in items
        for repeat in range(cfg.m)
    ]


class JudgeReward:
    """r from an LLM judge (prompts/reward.md): the mean of M repeats; failed repeats are left out."""

    def __init__(self, pool: ServicePool, cfg: RewardConfig):
        if not cfg.judge:
            raise ValueError("reward kind judge needs reward.judge (a provider name)")
        self.pool, self.cfg, self.name = pool, cfg, f"judge:{cfg.judge}"
        self.template = reward_template()

    def requests(self, items: Sequence[tuple[str, str]]) -> list[ChatRequest]:
        return reward_requests(self.cfg, items, self.template)

    def score(self, items: Sequence[tuple[str, str]], tag: str = "") -> RewardScores:
        m = self.cfg.m
        results = self.pool.complete_many(
            self.cfg.judge, self.requests(items), desc=f"reward {tag} ({len(items)} x M={m})".strip()
        )
        values: list[float | None] = []
        details: list[dict] = []
        for i in range(len(items)):
            scores, errors = [], []
            for result in results[i * m : (i + 1) * m]:
                try:
                    if result.error:
                        raise ValueError(f"request: {result.error}")
                    scores.append(parse_reward(result.text))  # the requests' reader, one reading
                except ValueError as exc:
                    errors.append({"error": str(exc)[:300], "raw": (result.text or "")[:RAW_KEEP_CHARS]})
            values.append(float(np.mean(scores)) if scores else None)
            details.append({"scores": scores, "errors": errors})
        return RewardScores(values, details)


class RewardModelReward:
    """r from a sequence-classification reward model: the first logit of the chat-formatted exchange."""

    def __init__(self, cfg: RewardConfig, model: Any = None, tokenizer: Any = None):
        self.cfg, self.name = cfg, f"reward_model:{cfg.model_id}"
        if model is None or tokenizer is None:
            import torch
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            path = resolve_model_path(cfg.model_id)
            remote = cfg.trust_remote_code
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=dtype, trust_remote_code=remote
            )
            if torch.cuda.is_available():
                model = model.to("cuda")
        model.eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        self.model, self.tokenizer = model, tokenizer

    def encode(self, instruction: str, response: str) -> list[int]:
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]
        if self.tokenizer.chat_template:
            out = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
            ids = list(out["input_ids"])
        else:
            ids = self.tokenizer(f"{instruction}\n\n{response}")["input_ids"]
        return ids[: self.cfg.max_length]

    def score(self, items: Sequence[tuple[str, str]], tag: str = "") -> RewardScores:
        import torch
        from tqdm.auto import tqdm

        encoded = [self.encode(inst, resp) for inst, resp in items]
        values: list[float | None] = []
        device = next(self.model.parameters()).device
        self.tokenizer.padding_side = "right"
        batches = range(0, len(encoded), self.cfg.batch_size)
        for start in tqdm(batches, desc=f"reward model {tag}".strip(), leave=False):
            chunk = encoded[start : start + self.cfg.batch_size]
            batch = self.tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt").to(device)
            with torch.inference_mode():
                logits = self.model(**batch).logits
            values.extend(float(v) for v in logits[:, 0].float().cpu())
        return RewardScores(values, [{"scores": [v], "errors": []} for v in values])


def make_reward(cfg: RewardConfig, pool: ServicePool | None) -> Reward:
    if cfg.kind == "judge":
        if pool is None:
            raise ValueError("reward kind judge needs an open ServicePool")
        return JudgeReward(pool, cfg)
    return RewardModelReward(cfg)


# --------------------------------------------------------------------------- loss L under the student base


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt

    @property
    def n_scored(self) -> int:
        return sum(1 for label in self.labels[1:] if label != -100)


def encode_for_loss(tokenizer: Any, instruction: str, response: str, max_length: int) -> Encoded:
    """Tokens and labels of one pair exactly as 02 trains on it (TRL prompt-completion, completion-only loss).

    The prompt is the student's chat template with the generation prompt; the whole conversation is
    rendered once more and the prompt must be its prefix (02 checks the same); prompt tokens get -100.
    The sequence is cut at `max_length`, keeping its start, as TRL's truncation does.
    """
    prompt = student_messages(instruction)
    conversation = prompt + [{"role": "assistant", "content": response}]
    prompt_ids = list(
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    full_ids = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return Encoded(full_ids[:max_length], labels[:max_length])


def nll_sums(
    model: Any, encoded: Sequence[Encoded], batch_size: int = 4, desc: str = ""
) -> list[tuple[float, int]]:
    """(sum of token NLLs, number of scored tokens) per sequence: label t is predicted from positions < t."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))  # less padding per batch
    results: dict[int, tuple[float, int]] = {}
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc=desc or "loss under the student", leave=False):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i].input_ids) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(encoded[i].input_ids)
            ids[row, :n] = torch.tensor(encoded[i].input_ids)
            labels[row, :n] = torch.tensor(encoded[i].labels)
            mask[row, :n] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        target = labels[:, 1:]
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = logprobs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scored = target != -100
        sums = -(picked * scored).sum(dim=1)
        counts = scored.sum(dim=1)
        for row, i in enumerate(idx):
            results[i] = (float(sums[row]), int(counts[row]))
    out = [results[i] for i in range(len(encoded))]
    return out


@dataclass
class StudentScorer:
    """The student base model (no adapter) with its tokenizer: computes L, PPL(y|x), PPL(y)."""

    model: Any
    tokenizer: Any
    max_length: int
    batch_size: int = 4

    @classmethod
    def load(cls, cfg: RunConfig) -> StudentScorer:
        model, tokenizer, _ = load_student(cfg.student, "none", "float32")
        model.eval()
        return cls(model, tokenizer, cfg.finetune.max_length, cfg.teacher_study.loss_batch_size)

    def losses(self, pairs: Sequence[tuple[str, str]], tag: str = "") -> list[dict]:
        """Per pair: tokens, mean NLL given the instruction (L_i), PPL(y|x), PPL(y), IFD."""
        given = [encode_for_loss(self.tokenizer, inst, resp, self.max_length) for inst, resp in pairs]
        alone = [encode_for_loss(self.tokenizer, "", resp, self.max_length) for _, resp in pairs]
        with_x = nll_sums(self.model, given, self.batch_size, desc=f"L under the student {tag}".strip())
        without_x = nll_sums(self.model, alone, self.batch_size, desc=f"PPL(y) {tag}".strip())
        rows = []
        for (sum_x, n_x), (sum_0, n_0) in zip(with_x, without_x, strict=True):
            if n_x == 0 or n_0 == 0:
                rows.append({"tokens": n_x, "loss": None, "ppl": None, "ppl_alone": None, "ifd": None})
                continue
            ppl_x, ppl_0 = perplexity(sum_x, n_x), perplexity(sum_0, n_0)
            rows.append(
                {
                    "tokens": n_x,
                    "loss": sum_x / n_x,
                    "ppl": ppl_x,
                    "ppl_alone": ppl_0,
                    "ifd": ifd(ppl_x, ppl_0),
                }
            )
        return rows


# --------------------------------------------------------------------------- answering


def sample_instructions(train: Sequence[dict], n: int, seed: int) -> list[dict]:
    """`n` train rows drawn without replacement by a seeded generator (all rows when the split is smaller)."""
    rows = list(train)
    if not rows:
        raise ValueError("the coverage train split is empty: the teacher study has nothing to ask")
    random.Random(seed).shuffle(rows)
    return rows[: min(n, len(rows))]


def answer_requests(
    candidate: TeacherCandidate, instructions: Sequence[str], salt: int = 0
) -> list[ChatRequest]:
    """N requests per instruction (instruction-major). `repeat` keeps the N samples (and, with `salt`, the
    answers of different synthesis requests) apart in the call cache."""
    return [
        ChatRequest(
            messages=[{"role": "user", "content": text}],
            temperature=candidate.temperature,
            top_p=candidate.top_p,
            max_tokens=candidate.max_tokens,
            repeat=salt + j,
            allow_truncated=True,
        )
        for text in instructions
        for j in range(candidate.n)
    ]


def _answer_text(result: ChatResult) -> tuple[str | None, str | None]:
    if result.error:
        return None, f"request: {result.error}"
    text = (result.text or "").strip()
    if not text:
        return None, "empty reply"
    return text, None


@dataclass
class BestOfN:
    """The kept answer per instruction (None when every sample failed) and the record of all N."""

    kept: list[str | None]
    records: list[dict]  # per instruction: {"samples": [...], "rewards": [...], "kept_index": i}


def pick_best(answers: Sequence[Sequence[str | None]], rewards: Sequence[Sequence[float | None]]) -> BestOfN:
    """Keep the highest-reward answer of each instruction's N samples (argmax; first one on ties)."""
    kept, records = [], []
    for samples, scores in zip(answers, rewards, strict=True):
        index = best_of_n(scores)
        if index is None:  # nothing scored: keep the first answer there is (its reward stays unknown)
            index = next((i for i, a in enumerate(samples) if a is not None), None)
        kept.append(samples[index] if index is not None else None)
        records.append({"n": len(samples), "rewards": list(scores), "kept_index": index})
    return BestOfN(kept, records)


def answer_best_of_n(
    pool: ServicePool,
    candidate: TeacherCandidate,
    instructions: Sequence[str],
    reward: Reward,
    *,
    salt: int = 0,
    seed_answers: Sequence[str | None] | None = None,
) -> tuple[BestOfN, list[list[str | None]], list[list[str]]]:
    """Ask `candidate` for N answers per instruction, score every answer, keep the best of each.

    `seed_answers` (synthesis) are answers the generator already wrote: each counts as sample 0, so only
    N - 1 new answers are requested. Returns (best, the N answers per instruction, errors per instruction).
    """
    have = 1 if seed_answers is not None else 0
    fresh = candidate.n - have
    answers: list[list[str | None]] = (
        [[a] for a in seed_answers] if seed_answers is not None else [[] for _ in instructions]
    )
    errors: list[list[str]] = [[] for _ in instructions]
    if fresh > 0:
        results = pool.complete_many(
            candidate.provider,
            answer_requests(replace(candidate, n=fresh), instructions, salt=salt + have),
            desc=f"{candidate.name}: {len(instructions)} instructions x {fresh}",
        )
        for i in range(len(instructions)):
            for result in results[i * fresh : (i + 1) * fresh]:
                text, error = _answer_text(result)
                answers[i].append(text)
                if error:
                    errors[i].append(error)
    flat = [
        (inst, a) for inst, group in zip(instructions, answers, strict=True) for a in group if a is not None
    ]
    values = iter(reward.score(flat, tag=candidate.name).values if flat else [])
    rewards = [[None if a is None else next(values) for a in group] for group in answers]
    return pick_best(answers, rewards), answers, errors


# --------------------------------------------------------------------------- the study


def candidate_info(run_cfg: RunConfig, candidate: TeacherCandidate) -> dict:
    provider = run_cfg.provider(candidate.provider)
    return {
        "name": candidate.name,
        "provider": provider.name,
        "kind": provider.kind,
        "model": provider.model,
        "params": {
            "temperature": candidate.temperature,
            "top_p": candidate.top_p,
            "n": candidate.n,
            "max_tokens": candidate.max_tokens,
        },
    }


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def summarize_candidate(
    rows: Sequence[dict], beta: float, min_scored_share: float, offset: float = 0.0
) -> dict:
    """One candidate's metrics from its per-instruction rows (reward, loss, tokens, ppl, ifd per row).

    Rows without a reward (every sample failed or was unscored) are excluded from r and counted; a
    candidate with fewer scored rows than `min_scored_share` gets no CAR (it is not ranked), and so does one
    whose mean reward plus `offset` (`teacher_study.reward.offset`) is not positive (the ratio would rank it
    backwards)."""
    n = len(rows)
    scored = [r for r in rows if r.get("reward") is not None and r.get("loss") is not None]
    r = _mean([row["reward"] for row in scored])
    loss = _mean([row["loss"] for row in scored])
    share = len(scored) / n if n else 0.0
    entry = {
        "rows": n,
        "rows_scored": len(scored),
        "scored_share": share,
        "reward": r,
        "loss": loss,
        "car": car(r + offset, loss, beta)
        if r is not None and loss is not None and share >= min_scored_share and r + offset > 0
        else None,
        "length": _mean([row.get("tokens") for row in scored]),
        "ppl": _mean([row.get("ppl") for row in scored]),
        "ifd": _mean([row.get("ifd") for row in scored]),
    }
    if share < min_scored_share:
        entry["note"] = f"only {len(scored)}/{n} responses scored (< {min_scored_share:.0%}): not ranked"
    elif r is not None and r + offset <= 0:
        entry["note"] = (
            f"mean reward {r:.3g} + offset {offset:g} is not positive: CAR = r / (1 + beta L) would rank it "
            "backwards; not ranked (set teacher_study.reward.offset so every reward is positive)"
        )
    if offset:
        entry["reward_offset"] = offset
    return entry


def study_table(candidates: dict[str, dict]) -> pd.DataFrame:
    """All candidates with every metric and its rank (1 = best by that metric)."""
    names = list(candidates)
    frame = pd.DataFrame({"candidate": names})
    for metric in METRICS:
        values = [candidates[name].get(metric) for name in names]
        frame[METRIC_LABELS[metric]] = values
        frame[f"rank {METRIC_LABELS[metric]}"] = rank_descending(values)
    frame["L (student loss)"] = [candidates[name].get("loss") for name in names]
    frame["scored"] = [f"{candidates[n]['rows_scored']}/{candidates[n]['rows']}" for n in names]
    return frame.sort_values(f"rank {METRIC_LABELS['car']}", na_position="last").reset_index(drop=True)


def choose(candidates: dict[str, dict], beta: float) -> tuple[str | None, str]:
    """(chosen candidate, why): the highest CAR; None when no candidate could be ranked."""
    ranked = {name: c["car"] for name, c in candidates.items() if c.get("car") is not None}
    if not ranked:
        notes = "; ".join(f"{name}: {c['note']}" for name, c in candidates.items() if c.get("note"))
        return None, f"no candidate could be ranked by CAR ({notes or 'no candidate'})"
    best = max(ranked, key=lambda name: (ranked[name], -list(ranked).index(name)))
    c = candidates[best]
    runner_up = sorted(ranked.values(), reverse=True)[1:2]
    margin = f", ahead of the next by {ranked[best] - runner_up[0]:.2f}" if runner_up else ""
    offset = c.get("reward_offset", 0.0)
    reward = f"({c['reward']:.2f} + {offset:g})" if offset else f"{c['reward']:.2f}"
    why = (
        f"highest CAR = r / (1 + {beta:g} L) = {reward} / (1 + {beta:g} x {c['loss']:.3f}) "
        f"= {c['car']:.2f}{margin}"
    )
    by_reward = max(ranked, key=lambda name: candidates[name]["reward"])
    if by_reward != best:
        why += f"; by reward alone {by_reward} would have been chosen"
    return best, why


@dataclass
class StudyResult:
    candidates: dict[str, dict]  # name -> metrics (+ info)
    responses: list[dict]  # one row per (candidate, instruction)
    chosen: str | None
    why: str
    table: pd.DataFrame
    report: dict


def run_study(
    run_cfg: RunConfig, layout: RunLayout, pool: ServicePool, scorer: StudentScorer | None = None
) -> StudyResult:
    """Score every candidate on the sampled train instructions; choose the teacher (no files written)."""
    study = run_cfg.teacher_study
    if not study.enabled:
        raise ValueError("teacher_study.candidates is empty: there is nothing to compare")
    started = time.monotonic()
    train = load_split(layout.train_file, "train")
    sample = sample_instructions(train, study.sample_size, study.seed)
    instructions = [row["instruction"] for row in sample]
    reward = make_reward(study.reward, pool)
    scorer = scorer or StudentScorer.load(run_cfg)
    responses: list[dict] = []
    candidates: dict[str, dict] = {}
    for candidate in study.candidates:
        best, answers, errors = answer_best_of_n(pool, candidate, instructions, reward)
        kept_pairs = [(inst, a) for inst, a in zip(instructions, best.kept, strict=True) if a is not None]
        losses = iter(scorer.losses(kept_pairs, tag=candidate.name))
        rows = []
        for i, (row, kept) in enumerate(zip(sample, best.kept, strict=True)):
            record = best.records[i]
            entry = {
                "candidate": candidate.name,
                "instruction_id": row["id"],
                "instruction": row["instruction"],
                "response": kept,
                "samples": answers[i],
                "errors": errors[i],
                "rewards": record["rewards"],
                "kept_index": record["kept_index"],
                "reward": None if kept is None else record["rewards"][record["kept_index"]],
                **({"tokens": None, "loss": None, "ppl": None, "ppl_alone": None, "ifd": None}),
            }
            if kept is not None:
                entry.update(next(losses))
            rows.append(entry)
        responses.extend(rows)
        metrics = summarize_candidate(rows, study.beta, study.reward.min_scored_share, study.reward.offset)
        candidates[candidate.name] = {**metrics, "info": candidate_info(run_cfg, candidate)}
    chosen, why = choose(candidates, study.beta)
    table = study_table(candidates)
    report = {
        "beta": study.beta,
        "reward": {"kind": study.reward.kind, "source": reward.name, "m": study.reward.m},
        "sample_size": len(sample),
        "sample_seed": study.seed,
        "instruction_ids": [row["id"] for row in sample],
        "candidates": candidates,
        "chosen": chosen,
        "chosen_info": candidates[chosen]["info"] if chosen else None,
        "why": why,
        "seconds": round(time.monotonic() - started, 2),
    }
    return StudyResult(candidates, responses, chosen, why, table, report)


def run_teacher_study(stage: Any) -> StudyResult | None:
    """05's teacher-study step: open the ServicePool (candidates + reward judge), run, write the cycle's files.

    None when `teacher_study.candidates` is empty (05 then synthesizes with `synthesize.generator`)."""
    cfg = stage.cfg
    study = cfg.teacher_study
    if not study.enabled:
        return None
    providers = list(dict.fromkeys(c.provider for c in study.candidates))
    if study.reward.kind == "judge" and study.reward.judge not in providers:
        providers.append(study.reward.judge)
    with ServicePool(cfg, stage.layout, STAGE, stage.cycle, providers=providers) as pool:
        result = run_study(cfg, stage.layout, pool)
    write_study(result, stage.layout, stage.cycle)
    return result


def write_study(result: StudyResult, layout: RunLayout, cycle: int) -> None:
    write_jsonl(layout.teacher_responses_file(cycle), result.responses)
    with atomic_write(layout.teacher_table_csv(cycle)) as fh:
        result.table.to_csv(fh, index=False)
    plot_study(result.table, layout.teacher_plot(cycle), chosen=result.chosen)
    write_json(layout.teacher_study_file(cycle), result.report)


def chosen_candidate(run_cfg: RunConfig, layout: RunLayout, cycle: int) -> TeacherCandidate | None:
    """The candidate the cycle's study chose (None: no study file, or no candidate could be ranked)."""
    path = layout.teacher_study_file(cycle)
    if not path.is_file():
        return None
    name = read_json(path).get("chosen")
    return next((c for c in run_cfg.teacher_study.candidates if c.name == name), None)


def plot_study(table: pd.DataFrame, path: str | Path, chosen: str | None = None):
    """Reward r against the student's loss L per candidate (bubble: CAR), and the rank of every metric."""
    import matplotlib.pyplot as plt

    fig, (ax, rank_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    data = table.dropna(subset=["reward r", "L (student loss)"])
    cars = data["CAR"].fillna(0).clip(lower=0)
    size = 60 + 540 * (cars / cars.max()) if len(cars) and cars.max() > 0 else 80
    ax.scatter(data["L (student loss)"], data["reward r"], s=size, alpha=0.6)
    for _, row in data.iterrows():
        label = row["candidate"] + (" (chosen)" if row["candidate"] == chosen else "")
        ax.annotate(
            label, (row["L (student loss)"], row["reward r"]), textcoords="offset points", xytext=(6, 4)
        )
    ax.set(xlabel="L: student base loss on the responses (nats/token)", ylabel="reward r (mean)")
    ax.set_title("Return vs risk (bubble size: CAR)")
    ax.grid(alpha=0.3)
    labels = [METRIC_LABELS[m] for m in METRICS]
    for _, row in table.iterrows():
        ranks = [row[f"rank {label}"] for label in labels]
        rank_ax.plot(labels, ranks, marker="o", label=row["candidate"])
    rank_ax.invert_yaxis()
    rank_ax.set(ylabel="rank (1 = best)", title="Each metric's ranking of the candidates")
    rank_ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- planned calls (the forecast prices them)


def planned_reward_calls(
    stage: str, cycle: int | None, cfg: RewardConfig, items: Sequence[tuple[str, str]], count: int = 1
) -> list[PlannedCall]:
    """The reward judge's calls for `items` (M each; none for a local reward model). `count`: how many items
    each one stands for (a representative item)."""
    if cfg.kind != "judge" or not items:
        return []
    reply = min(REWARD_REPLY_TOKENS, cfg.max_tokens)
    return [PlannedCall(stage, cycle, cfg.judge, r, reply, count) for r in reward_requests(cfg, items)]


def planned_study_calls(run_cfg: RunConfig, cycle: int, train: Sequence[dict]) -> PlannedCalls:
    """05's teacher study (`run_study`, ledger stage "teacher_study"): every candidate answers the sampled
    train instructions N times (`answer_requests`), each answer as long as the row's reference (at most the
    candidate's max_tokens), and the reward judge scores every answer M times (`reward_requests`)."""
    study = run_cfg.teacher_study
    if not study.enabled or not train:
        return PlannedCalls()
    sample = sample_instructions(train, study.sample_size, study.seed)
    calls: list[PlannedCall] = []
    for candidate in study.candidates:
        requests = answer_requests(candidate, [row["instruction"] for row in sample])
        for i, request in enumerate(requests):
            expected = min(candidate.max_tokens, len(sample[i // candidate.n]["response"]) // 4)
            calls.append(PlannedCall(STAGE, cycle, candidate.provider, request, expected))
        items = [(row["instruction"], row["response"]) for row in sample for _ in range(candidate.n)]
        calls += planned_reward_calls(STAGE, cycle, study.reward, items)
    return PlannedCalls(calls)
