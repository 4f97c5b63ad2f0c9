"""What the paid stages will cost, before they run: calls, tokens and USD per stage, cycle and provider.

    table = forecast_run(cfg)                       # every cycle's 04 and 05, and 06
    table = forecast_stage(cfg, "04_evaluate", 0)   # one notebook stage, as the runner and notebooks record it

Every paid call site is counted, each line under the ledger stage its pool writes:

* 04 (`04_evaluate`): every LLM judge scores the K answers per test prompt M times; Table 1's reference rows
  (`baselines`, once per run): each service baseline answers the test prompts K times, and the judges score
  the base student's and each baseline's answers like the student's (rows already computed are not counted).
* 05 (`teacher_study`): each candidate answers `sample_size` train instructions N times, the reward judge
  scores every answer M times; (`05_synthesize`) the synthesis requests, and with best-of-N the N - 1 extra
  answers per pair and their rewards. With a study the generator is chosen at run time: the costliest
  candidate is forecast.
* 06 (`06_deploy`): judged parity: the served GGUF (local, free) answers, the judges score its answers
  `deploy.parity_m` times and re-judge the evaluated answers as often (04's repeats replay from the cache).

The numbers come from the params (K, M, judges, targets, growth, caps, max_tokens), the data and the price
table (params/prices.yaml):

* Prompts are the real ones: the requests are built by the stage modules from the run's test and train
  splits (or, before 01 ran, from `coverage.source` when it is a local file, else from `Assumptions`), and
  their input tokens are estimated like the ServicePool's rate limiter does (characters / 4; schemas count).
* Output tokens: a judgment is a two-number JSON object (`JUDGE_REPLY_TOKENS`), a reward one number; an
  answer is as long as the reference, capped by max_tokens; a synthesis reply holds `pairs_per_request` pairs
  as long as the seed rows, capped by `max_tokens`.
* Upper bounds: `max_calls` (synthesis: `max_requests_per_cycle`; elsewhere the calls themselves, fixed by the
  params) and `worst_usd` / `worst_tokens` (`max_calls` calls, every reply at max_tokens: what the budgets
  reserve before each call). Equal requests are paid once, so a run can pay fewer calls than forecast, never
  more (re-sent failures and unusable replies aside).
* Synthesis requests per cycle (`calls`): the target (2^t k with `growth: double`) over pairs per request and
  the share of pairs that survive the filters (`Assumptions.accept_share`), capped by `max_requests_per_cycle`.
* A provider with `batch: true` is priced at its batch discount in `usd` and `worst_usd` (that is what it
  pays); `batch_usd` is always the batch price, to show what switching a provider to batch would save.
* Every cycle is counted (the loop may stop earlier when epsilon is met; 05 never runs on the last cycle).
* Reasoning models think on top of this; their thinking is not forecast (the worst case includes the
  allowance). Cache hits are free and not subtracted: this is the cost of a run from an empty cache.

The forecast of a notebook stage is recorded in the run's calls.sqlite before it runs (the runner does it, so
do the notebooks' forecast cells); the ServicePool sends no paid call of a stage without it, and the ledger
can be read as forecast vs actual per stage (`forecast_vs_actual`). A `budget:` cap below the forecast's upper
bound is said before the stage starts (`BudgetWarning`, `budget_notes`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .callcache import CallCache, ledger_frame, read_ledger
from .config import RunConfig
from .prices import PriceTable, load_prices
from .runlayout import RunLayout

if TYPE_CHECKING:
    import pandas as pd

JUDGE_REPLY_TOKENS = 25  # {"similarity": 80, "precision": 75} plus the provider's framing
REWARD_REPLY_TOKENS = 12  # {"quality": 80}
# the notebooks whose forecast is recorded before they run (the runner does it; so do their forecast cells)
PAID_STAGES = ("04_evaluate", "05_synthesize", "06_deploy")
# the ledger stages each notebook's pools write (their forecast lines carry these names)
LEDGER_STAGES = {
    "04_evaluate": ("04_evaluate", "baselines"),
    "05_synthesize": ("teacher_study", "05_synthesize"),
    "06_deploy": ("06_deploy",),
}
COLUMNS = [
    "stage",
    "cycle",
    "provider",
    "model",
    "calls",
    "max_calls",
    "input_tokens",
    "output_tokens",
    "usd",
    "batch_usd",
    "worst_usd",
    "worst_tokens",
]
NUMERIC = [
    "calls",
    "max_calls",
    "input_tokens",
    "output_tokens",
    "usd",
    "batch_usd",
    "worst_usd",
    "worst_tokens",
]


class BudgetWarning(UserWarning):
    """A stage's forecast upper bound (worst_usd, or its tokens) exceeds a `budget:` cap."""


@dataclass(frozen=True)
class Assumptions:
    """What the forecast assumes where the run has no data yet (used only without splits or a local source)."""

    n_train: int = 395  # the paper's summarization split (Table 3): 395 train / 25 test
    n_test: int = 25
    instruction_chars: int = 1250  # with response_chars: ~389 tokens a row, the paper's Table 4 train average
    response_chars: int = 310
    accept_share: float = 0.7  # share of synthesized pairs that survive quality, dedup and decontamination
    pair_tokens: int | None = None  # tokens per synthesized pair (None: as long as the seed rows; paper: ~95)


def _tokens(chars: int) -> int:
    return chars // 4


def _request_tokens(request: Any) -> int:
    chars = sum(len(m["content"]) for m in request.messages)
    if request.json_schema is not None:
        chars += len(json.dumps(request.json_schema))
    return _tokens(chars)


def _rows(
    cfg: RunConfig, layout: RunLayout | None, assume: Assumptions
) -> tuple[list[dict], list[dict], str]:
    """(train rows, test rows, where they came from)."""
    if layout is not None and layout.train_file.is_file() and layout.test_file.is_file():
        from .jsonio import read_jsonl

        return list(read_jsonl(layout.train_file)), list(read_jsonl(layout.test_file)), "the run's splits"
    source = Path(cfg.coverage.source)
    if source.is_file() or (Path(__file__).resolve().parents[1] / source).is_file():
        from .coverage import import_coverage

        rows = import_coverage(cfg.coverage).rows
        n_train = max(1, round(len(rows) * cfg.coverage.train_ratio))
        return rows[:n_train], rows[n_train:] or rows[:1], f"{cfg.coverage.source} (split by train_ratio)"
    row = {
        "instruction": "x" * assume.instruction_chars,
        "response": "y" * assume.response_chars,
        "category": (cfg.coverage.categories or ["general"])[0],
    }
    train = [dict(row, id=f"train-{i}") for i in range(assume.n_train)]
    test = [dict(row, id=f"test-{i}") for i in range(assume.n_test)]
    return train, test, "assumptions (no splits and no local coverage source)"


def _line(
    stage: str,
    cycle: int | None,
    cfg: RunConfig,
    provider: str,
    prices: PriceTable,
    calls: int,
    input_tokens: int,
    output_tokens: int,
    worst_output_tokens: int,
    max_calls: int | None = None,
) -> dict:
    """One forecast line. `worst_output_tokens`: the `calls` replies all at max_tokens. `worst_usd` and
    `worst_tokens` scale that to `max_calls` calls (default: `calls`): the upper bound budgets reserve against."""
    p = cfg.provider(provider)
    max_calls = calls if max_calls is None else max_calls
    scale = max_calls / calls if calls else 0.0

    def usd(inp: float, out: float, batch: bool = p.batch) -> float:
        return prices.cost(p.kind, p.model, round(inp), round(out), free=p.is_free, batch=batch)

    return {
        "stage": stage,
        "cycle": cycle,
        "provider": provider,
        "model": p.model,
        "calls": calls,
        "max_calls": max_calls,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "usd": usd(
            input_tokens, output_tokens
        ),  # at the batch price for a `batch: true` provider (what it pays)
        "batch_usd": usd(input_tokens, output_tokens, batch=True),
        "worst_usd": usd(input_tokens * scale, worst_output_tokens * scale),
        "worst_tokens": round((input_tokens + worst_output_tokens) * scale),
    }


def _merge(lines: list[dict]) -> list[dict]:
    """One line per (stage, cycle, provider), as the ledger groups its rows (forecast vs actual)."""
    merged: dict[tuple, dict] = {}
    for line in lines:
        key = (line["stage"], line["cycle"], line["provider"])
        if key in merged:
            for c in NUMERIC:
                merged[key][c] += line[c]
        else:
            merged[key] = dict(line)
    return list(merged.values())


def _answer_rows(cfg: RunConfig, test: Sequence[dict]) -> list[dict]:
    # an answer: as long as the reference, at most max_new_tokens
    return [
        {
            "instruction": r["instruction"],
            "reference": r["response"],
            "candidate": r["response"][: cfg.inference.max_new_tokens * 4],
        }
        for r in test
    ]


def _judge_lines(
    cfg: RunConfig,
    stage: str,
    cycle: int | None,
    test: Sequence[dict],
    prices: PriceTable,
    m: int,
    models: int,
) -> list[dict]:
    """Every LLM judge scores `models` models' K answers per test prompt M times (04, Table 1, 06 parity)."""
    from .evaluate import judge_requests, judge_template

    ev, k = cfg.evaluate, cfg.inference.k
    if not models or not test:
        return []
    one_each = judge_requests(_answer_rows(cfg, test), dataclasses.replace(ev, m=1), judge_template())
    per_sample = sum(_request_tokens(r) for r in one_each)  # one judgment of each test prompt's sample
    calls = len(test) * k * m * models
    reply = min(JUDGE_REPLY_TOKENS, ev.max_tokens)
    return [
        _line(
            stage,
            cycle,
            cfg,
            judge,
            prices,
            calls,
            per_sample * k * m * models,
            calls * reply,
            calls * ev.max_tokens,
        )
        for judge in ev.judges
    ]


def _judging(cfg: RunConfig, cycle: int, test: Sequence[dict], prices: PriceTable) -> list[dict]:
    return _judge_lines(cfg, "04_evaluate", cycle, test, prices, cfg.evaluate.m, 1)


def _answer_line(
    cfg: RunConfig, stage: str, cycle: int | None, provider: str, test: Sequence[dict], prices: PriceTable
) -> dict:
    """A service LLM answers every test prompt K times (a Table-1 baseline)."""
    from .student import student_messages

    inf = cfg.inference
    calls = len(test) * inf.k
    prompt = sum(
        _tokens(sum(len(m["content"]) for m in student_messages(r["instruction"], r.get("system"))))
        for r in test
    )
    answer = sum(min(inf.max_new_tokens, _tokens(len(r["response"]))) for r in test)
    return _line(
        stage, cycle, cfg, provider, prices, calls, prompt * inf.k, answer * inf.k, calls * inf.max_new_tokens
    )


def _baselines(
    cfg: RunConfig, test: Sequence[dict], prices: PriceTable, layout: RunLayout | None
) -> list[dict]:
    """Table 1's reference rows (ledger stage "baselines"): each service baseline answers the test prompts K
    times, and the judges score those answers and the base student's. Rows already computed in this run
    (`<run>/baselines/<model>/meta.json` matching today's settings) are not counted again."""
    from .evaluate.stage import BASE_DIR, answers_meta, judges_meta

    ev = cfg.evaluate
    models = ([BASE_DIR] if ev.base_student else []) + list(ev.baselines)

    def stored(model: str, part: str, meta: dict) -> bool:
        if layout is None or not layout.baseline_meta_file(model).is_file():
            return False
        from .jsonio import read_json

        return read_json(layout.baseline_meta_file(model)).get(part) == meta

    answer = [m for m in models if not stored(m, "answers", answers_meta(cfg, test, m))]
    judge = [m for m in models if m in answer or not stored(m, "judges", judges_meta(cfg))]
    lines = [_answer_line(cfg, "baselines", None, m, test, prices) for m in answer if m != BASE_DIR]
    return lines + _judge_lines(cfg, "baselines", None, test, prices, ev.m, len(judge))


def _reward_line(
    cfg: RunConfig, stage: str, cycle: int, items: Sequence[tuple[str, str]], prices: PriceTable
) -> list[dict]:
    """The reward judge scores each (instruction, answer) M times (teacher study, best-of-N)."""
    from .teacher import JudgeReward

    reward = cfg.teacher_study.reward
    if reward.kind != "judge" or not items:
        return []
    requests = JudgeReward(None, reward).requests(items)  # type: ignore[arg-type]
    calls = len(requests)
    reply = min(REWARD_REPLY_TOKENS, reward.max_tokens)
    return [
        _line(
            stage,
            cycle,
            cfg,
            reward.judge,
            prices,
            calls,
            sum(_request_tokens(r) for r in requests),
            calls * reply,
            calls * reward.max_tokens,
        )
    ]


def _teacher_study(cfg: RunConfig, cycle: int, train: Sequence[dict], prices: PriceTable) -> list[dict]:
    """05's teacher study (ledger stage "teacher_study"): every candidate answers `sample_size` train
    instructions N times, and the reward judge scores every answer M times."""
    from .teacher import answer_requests, sample_instructions

    study = cfg.teacher_study
    if not study.enabled or not train:
        return []
    sample = sample_instructions(train, study.sample_size, study.seed)
    lines = []
    for candidate in study.candidates:
        requests = answer_requests(candidate, [r["instruction"] for r in sample])
        answer = sum(min(candidate.max_tokens, _tokens(len(r["response"]))) for r in sample) * candidate.n
        lines.append(
            _line(
                "teacher_study",
                cycle,
                cfg,
                candidate.provider,
                prices,
                len(requests),
                sum(_request_tokens(r) for r in requests),
                answer,
                len(requests) * candidate.max_tokens,
            )
        )
        items = [(r["instruction"], r["response"]) for r in sample for _ in range(candidate.n)]
        lines += _reward_line(cfg, "teacher_study", cycle, items, prices)
    return lines


def synthesis_requests(cfg: RunConfig, cycle: int, assume: Assumptions) -> int:
    """Requests 05 sends in `cycle` when a share `accept_share` of the pairs is kept."""
    from .synthesize import target_rows

    sy = cfg.synthesize
    wanted = math.ceil(target_rows(sy, cycle) / (sy.pairs_per_request * assume.accept_share))
    return min(wanted, sy.max_requests_per_cycle)


def _synthesis(
    cfg: RunConfig, cycle: int, train: Sequence[dict], prices: PriceTable, assume: Assumptions
) -> list[dict]:
    """05's synthesis requests (`calls` at the assumed accept share; `max_calls` = max_requests_per_cycle),
    and with best-of-N the N - 1 extra answers per pair and their rewards. With a teacher study the generator
    is chosen at run time: the candidate (or `synthesize.generator`, used when the study ranks none) whose
    synthesis would cost most is forecast (an upper bound)."""
    from .synthesize import load_templates, request_batch
    from .teacher import TeacherCandidate

    sy = cfg.synthesize
    calls = synthesis_requests(cfg, cycle, assume)
    sample = list(train[: min(len(train), 50)])
    requests = request_batch(sample, sy, load_templates(), 0)
    per_call_in = sum(_request_tokens(r) for r in requests) / len(requests)
    pair_chars = sum(len(r["instruction"]) + len(r["response"]) for r in sample) / len(sample)
    pair = assume.pair_tokens if assume.pair_tokens is not None else _tokens(int(pair_chars))
    answer = _tokens(int(sum(len(r["response"]) for r in sample) / len(sample)))
    instruction = "x" * int(sum(len(r["instruction"]) for r in sample) / len(sample))
    # without a study, or when it ranks no candidate, synthesize.generator writes the pairs
    generators = [
        *cfg.teacher_study.candidates,
        TeacherCandidate(name=sy.generator, provider=sy.generator, n=sy.best_of_n, max_tokens=sy.max_tokens),
    ]
    options = []
    for gen in generators:
        per_call_out = min(sy.max_tokens, (pair + 20) * sy.pairs_per_request)  # 20: the JSON around each pair
        lines = [
            _line(
                "05_synthesize",
                cycle,
                cfg,
                gen.provider,
                prices,
                calls,
                round(per_call_in * calls),
                round(per_call_out * calls),
                calls * sy.max_tokens,
                max_calls=sy.max_requests_per_cycle,
            )
        ]
        if gen.n > 1:  # best-of-N: N - 1 more answers per pair, every answer rewarded
            pairs, most = calls * sy.pairs_per_request, sy.max_requests_per_cycle * sy.pairs_per_request
            extra = (gen.n - 1) * pairs
            lines.append(
                _line(
                    "05_synthesize",
                    cycle,
                    cfg,
                    gen.provider,
                    prices,
                    extra,
                    extra * _tokens(len(instruction)),
                    extra * min(answer, gen.max_tokens),
                    extra * gen.max_tokens,
                    max_calls=(gen.n - 1) * most,
                )
            )
            rewarded = _reward_line(
                cfg, "05_synthesize", cycle, [(instruction, "y" * answer * 4)] * gen.n, prices
            )
            for r in rewarded:  # scale one pair's N rewards to all pairs
                lines.append(
                    {
                        **r,
                        **{c: r[c] * pairs for c in NUMERIC if c != "max_calls"},
                        "max_calls": r["max_calls"] * most,
                        "worst_usd": r["worst_usd"] * most,
                        "worst_tokens": r["worst_tokens"] * most,
                    }
                )
        options.append(_merge(lines))
    return max(options, key=lambda ls: sum(line["worst_usd"] for line in ls))


def _parity(cfg: RunConfig, test: Sequence[dict], prices: PriceTable) -> list[dict]:
    """06's judged parity: the served GGUF (local, free) answers the test prompts K times; the judges score
    those answers `deploy.parity_m` times and re-judge the evaluated cycle's answers as often (the repeats 04
    already made replay from the call cache)."""
    from .deploy.parity import parity_evaluate_config

    d, evaluated_m = cfg.deploy, cfg.evaluate.m
    cfg = dataclasses.replace(cfg, evaluate=parity_evaluate_config(cfg))
    if not (d.enabled and d.serve and cfg.evaluate.judges):
        return []
    m = cfg.evaluate.m
    served = _judge_lines(cfg, "06_deploy", None, test, prices, m, 1)
    # the evaluated answers' repeats below 04's M replay from the call cache; only the ones above are paid
    rejudged = (
        _judge_lines(cfg, "06_deploy", None, test, prices, m - evaluated_m, 1) if m > evaluated_m else []
    )
    return _merge(served + rejudged)


def forecast_run(
    cfg: RunConfig, layout: RunLayout | None = None, assume: Assumptions = Assumptions()
) -> pd.DataFrame:
    """One line per (stage, cycle, provider) over all `loop.max_cycles` cycles and 06; `.attrs["data"]` says
    where the rows came from."""

    prices = load_prices(cfg.prices_file)
    train, test, origin = _rows(cfg, layout, assume)
    lines: list[dict] = []
    for cycle in range(cfg.loop.max_cycles):
        lines += _judging(cfg, cycle, test, prices)
        if cycle == 0:
            lines += _baselines(cfg, test, prices, layout)
        if cycle + 1 < cfg.loop.max_cycles:
            lines += _teacher_study(cfg, cycle, train, prices)
            lines += _synthesis(cfg, cycle, train, prices, assume)
    lines += _parity(cfg, test, prices)
    table = _frame(_merge(lines))
    table.attrs["data"] = origin
    return table


def _frame(lines: list[dict]) -> pd.DataFrame:
    import pandas as pd

    table = pd.DataFrame(lines, columns=COLUMNS)
    table["cycle"] = table["cycle"].astype("Int64")  # baselines and 06 have none
    return table


def stage_lines(
    cfg: RunConfig,
    stage: str,
    cycle: int | None,
    layout: RunLayout | None = None,
    assume: Assumptions = Assumptions(),
) -> tuple[list[dict], str]:
    """(forecast lines, where the data came from) of one notebook stage: 04 = judging + Table 1's reference
    rows still to compute; 05 = teacher study + synthesis; 06 = judged parity."""
    if stage not in PAID_STAGES:
        raise ValueError(f"no forecast for {stage}: the paid stages are {list(PAID_STAGES)}")
    prices = load_prices(cfg.prices_file)
    train, test, origin = _rows(cfg, layout, assume)
    if stage == "04_evaluate":
        lines = _judging(cfg, cycle, test, prices) + _baselines(cfg, test, prices, layout)
    elif stage == "05_synthesize":
        lines = _teacher_study(cfg, cycle, train, prices) + _synthesis(cfg, cycle, train, prices, assume)
    else:
        lines = _parity(cfg, test, prices)
    return _merge(lines), origin


def forecast_stage(
    cfg: RunConfig,
    stage: str,
    cycle: int | None,
    layout: RunLayout | None = None,
    assume: Assumptions = Assumptions(),
) -> pd.DataFrame:
    """The forecast of one notebook stage (04, 05 or 06; see `stage_lines`). With `layout` it is recorded in
    the run's calls.sqlite: the ServicePool sends no paid call of a stage without it. A forecast upper bound
    above a `budget:` cap is said before the stage starts (a BudgetWarning; `.attrs["budget"]`)."""

    lines, origin = stage_lines(cfg, stage, cycle, layout, assume)
    table = _frame(lines)
    table.attrs["data"] = origin
    table.attrs["budget"] = budget_notes(cfg, lines, layout)
    for note in table.attrs["budget"]:
        warnings.warn(note, BudgetWarning, stacklevel=2)
    if layout is not None:
        with CallCache(layout.calls_db) as cache:
            cache.record_forecast(stage, cycle, lines)
    return table


def record_judging(
    cfg: RunConfig, layout: RunLayout, stage: str, cycle: int, test: Sequence[dict]
) -> pd.DataFrame:
    """Forecast and record a judging step outside the notebooks (`llamaduo validate-teachers` judges each
    candidate's trial student under ledger stage "teacher_validation"): the judges score K answers per test
    prompt M times."""
    lines = _judge_lines(cfg, stage, cycle, test, load_prices(cfg.prices_file), cfg.evaluate.m, 1)
    with CallCache(layout.calls_db) as cache:
        cache.record_forecast(stage, cycle, lines)
    return _frame(lines)


def budget_notes(cfg: RunConfig, lines: Sequence[dict], layout: RunLayout | None = None) -> list[str]:
    """Where the forecast's upper bound (worst_usd, worst_tokens) plus what the run's ledger already paid in
    that scope exceeds a `budget:` cap. Said before the stage starts; the pool's budget check still stops the
    stage cleanly before the call that would cross the cap, and --resume continues once it is raised."""
    b = cfg.budget
    paid = read_ledger(layout.calls_db) if layout is not None else []
    scopes: list[tuple[str, str, float | None, int | None, list[dict], list[dict]]] = []
    groups: dict[tuple, list[dict]] = {}
    for line in lines:
        groups.setdefault((line["stage"], line["cycle"]), []).append(line)
    for (stage, cycle), group in groups.items():
        spent = [r for r in paid if r["stage"] == stage and r["cycle"] == cycle]
        where = stage if cycle is None else f"{stage}, cycle {cycle}"
        scopes.append(("stage", where, b.stage_usd, b.stage_tokens, group, spent))
    for cycle in sorted({line["cycle"] for line in lines if line["cycle"] is not None}):
        group = [line for line in lines if line["cycle"] == cycle]
        scopes.append(
            (
                "cycle",
                f"cycle {cycle}",
                b.cycle_usd,
                b.cycle_tokens,
                group,
                [r for r in paid if r["cycle"] == cycle],
            )
        )
    scopes.append(("run", "the run", b.run_usd, b.run_tokens, list(lines), paid))
    notes = []
    for scope, where, cap_usd, cap_tokens, group, spent in scopes:
        usd = sum(line["worst_usd"] for line in group) + sum(float(r["cost_usd"]) for r in spent)
        tokens = sum(line["worst_tokens"] for line in group)
        tokens += sum(int(r["input_tokens"]) + int(r["output_tokens"]) for r in spent)
        if cap_usd is not None and usd > cap_usd:
            notes.append(
                f"budget.{scope}_usd={cap_usd:g} is below the forecast upper bound for {where}: ${usd:.4f} "
                "(already paid included); the stage stops at the budget if it gets there"
            )
        if cap_tokens is not None and tokens > cap_tokens:
            notes.append(
                f"budget.{scope}_tokens={cap_tokens} is below the forecast upper bound for {where}: {tokens} "
                "tokens (already used included); the stage stops at the budget if it gets there"
            )
    return notes


def totals(table: pd.DataFrame) -> pd.DataFrame:
    """Per stage over all cycles, plus a total line."""
    import pandas as pd

    by_stage = table.groupby("stage", sort=True)[NUMERIC].sum().reset_index()
    total = pd.DataFrame([{"stage": "total", **{c: table[c].sum() for c in NUMERIC}}])
    return pd.concat([by_stage, total], ignore_index=True)


def forecast_vs_actual(layout: RunLayout) -> pd.DataFrame:
    """Per (stage, cycle, provider): the stored forecast, what the ledger paid, and the answers reused from the
    project's shared cache (paid by an earlier run)."""
    import pandas as pd

    keys = ["stage", "cycle", "provider"]
    with CallCache(layout.calls_db) as cache:
        forecast = pd.DataFrame(cache.forecast_rows(), columns=COLUMNS)
        reused = pd.DataFrame(cache.reused_rows(), columns=[*keys, "saved_usd"])
    ledger = ledger_frame(layout.calls_db)
    actual = (
        ledger.assign(calls=1)
        .groupby(keys, sort=True)[["calls", "input_tokens", "output_tokens", "cost_usd"]]
        .sum()
        .reset_index()
        .rename(
            columns={
                "calls": "actual_calls",
                "input_tokens": "actual_input_tokens",
                "output_tokens": "actual_output_tokens",
                "cost_usd": "actual_usd",
            }
        )
    )
    forecast = forecast[[*keys, "calls", "input_tokens", "output_tokens", "usd"]].rename(
        columns={
            "calls": "forecast_calls",
            "input_tokens": "forecast_input_tokens",
            "output_tokens": "forecast_output_tokens",
            "usd": "forecast_usd",
        }
    )
    reused = (
        reused.assign(reused_calls=1)
        .groupby(keys, sort=True)[["reused_calls", "saved_usd"]]
        .sum()
        .reset_index()
        .rename(columns={"saved_usd": "reused_usd"})
    )
    for frame in (forecast, actual, reused):
        frame["cycle"] = frame["cycle"].astype("Int64")
    table = forecast.merge(actual, on=keys, how="outer").merge(reused, on=keys, how="left")
    table[["reused_calls", "reused_usd"]] = table[["reused_calls", "reused_usd"]].fillna(0)
    return table.sort_values(keys, ignore_index=True)


def markdown(table: pd.DataFrame) -> str:
    """The forecast as a Markdown table (README, CLI)."""
    import pandas as pd

    lines = [
        "| stage | cycle | provider | model | calls | input tokens | output tokens | USD | USD (batch) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in table.to_dict("records"):
        lines.append(
            f"| {r['stage']} | {'' if pd.isna(r.get('cycle')) else r['cycle']} | {r.get('provider', '')} | {r.get('model', '')} | "
            f"{int(r['calls']):,} | {int(r['input_tokens']):,} | {int(r['output_tokens']):,} | "
            f"{r['usd']:,.2f} | {r['batch_usd']:,.2f} |"
        )
    return "\n".join(lines)
