"""What the paid stages will cost, before they run: calls, tokens and USD per stage, cycle and provider.

    table = forecast_run(cfg)                       # every cycle's 04 and 05, and 06
    table = forecast_stage(cfg, "04_evaluate", 0)   # one notebook stage, as the runner and notebooks record it

Each paid stage says the calls it will make, built with the very request builders it sends with (its
`planned_*_calls`: `plan.PlannedCalls`); the forecast only prices and sums them, one line per ledger stage its
pool writes, cycle and provider:

* 04 (`04_evaluate`): every LLM judge scores the K answers per test prompt M times; with `evaluate.pairwise`
  (`04_pairwise`) every LLM judge also compares each answer with its reference in both orders, pairwise_m
  times (a verdict is a one-word JSON object, `evaluate.PAIRWISE_REPLY_TOKENS`); Table 1's reference rows
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

* Prompts are the real ones: the stages build their requests from the run's test and train splits (or, before
  01 ran, from `coverage.source` when it is a local file, else from `Assumptions`) and from the files earlier
  stages wrote (04 judges 03's answers as written; answers not written yet are assumed as long as the
  reference); their input tokens are estimated like the ServicePool's rate limiter does (characters / 4;
  schemas count).
* Output tokens are what each stage expects of a reply (`PlannedCall.reply_tokens`): a judgment is a
  two-number JSON object (`evaluate.JUDGE_REPLY_TOKENS`), a reward one number; an answer is as long as the
  reference, capped by max_tokens; a synthesis reply holds `pairs_per_request` pairs as long as the seed rows,
  capped by `max_tokens`.
* Upper bounds: `max_calls` (synthesis: `max_requests_per_cycle`; elsewhere the calls themselves, fixed by the
  params) and `worst_usd` / `worst_tokens` (`max_calls` calls, every reply at max_tokens: what the budgets
  reserve before each call). Equal requests are paid once, so a run can pay fewer calls than forecast, never
  more (re-sent failures and unusable replies aside).
* Synthesis requests per cycle (`calls`): the target (2^t k with `growth: double`) over pairs per request and
  the share of pairs that survive the filters (`Assumptions.accept_share`), capped by `max_requests_per_cycle`
  (`synthesize.expected_requests`); with best-of-N each pair adds N - 1 answers and N x M rewards.
* A provider with `batch: true` is priced at its batch discount in `usd` and `worst_usd` (that is what it
  pays); `batch_usd` is always the batch price, to show what switching a provider to batch would save.
* Every cycle is counted (the loop may stop earlier when epsilon is met; 05 never runs on the last cycle; a
  sweep runs them all). A study of several generators is counted arm by arm (`forecast_run`'s `arm` column).
* Reasoning models think on top of this; their thinking is not forecast (the worst case includes the
  allowance). Cache hits are free and not subtracted: this is the cost of a run from an empty cache.

The forecast of a notebook stage is recorded in the run's calls.sqlite before it runs (the runner does it, so
do the notebooks' forecast cells); the ServicePool sends no paid call of a stage without it, and the ledger
can be read as forecast vs actual per stage (`forecast_vs_actual`). A `budget:` cap below the forecast's upper
bound is said before the stage starts (`BudgetWarning`, `budget_notes`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .callcache import CallCache, ledger_frame, read_ledger, retried_attempts
from .config import RunConfig
from .coverage import import_coverage
from .deploy.parity import planned_parity_calls
from .evaluate import planned_baseline_calls, planned_judging_calls, planned_pairwise_calls
from .jsonio import read_jsonl
from .plan import PlannedCall, PlannedCalls
from .prices import PriceTable, load_prices
from .runlayout import RunLayout
from .schemas import NOTEBOOK_LEDGER_STAGES
from .synthesize import planned_study_calls, planned_synthesis_calls

if TYPE_CHECKING:
    import pandas as pd

# the notebooks whose forecast is recorded before they run (the runner does it; so do their forecast cells)
PAID_STAGES = tuple(NOTEBOOK_LEDGER_STAGES)
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


def _rows(
    cfg: RunConfig, layout: RunLayout | None, assume: Assumptions
) -> tuple[list[dict], list[dict], str]:
    """(train rows, test rows, where they came from)."""
    if layout is not None and layout.train_file.is_file() and layout.test_file.is_file():
        return list(read_jsonl(layout.train_file)), list(read_jsonl(layout.test_file)), "the run's splits"
    source = Path(cfg.coverage.source)
    if source.is_file() or (Path(__file__).resolve().parents[1] / source).is_file():
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


# --------------------------------------------------------------------------- pricing what the stages plan


class _Tokens:
    """Input tokens of a request as the ServicePool's rate limiter estimates them: characters / 4, the JSON
    schema included (a schema's size is measured once)."""

    def __init__(self) -> None:
        self._schemas: dict[int, tuple[Any, int]] = {}

    def __call__(self, request: Any) -> int:
        chars = sum(len(m["content"]) for m in request.messages)
        schema = getattr(request, "json_schema", None)
        if schema is not None:
            known = self._schemas.get(id(schema))
            if known is None or known[0] is not schema:
                known = self._schemas[id(schema)] = (schema, len(json.dumps(schema)))
            chars += known[1]
        return chars // 4


def _price(cfg: RunConfig, prices: PriceTable, calls: Sequence[PlannedCall]) -> list[dict]:
    """One forecast line per (stage, cycle, provider), in the order the calls come: the expected calls with
    their expected replies (`calls`, tokens, `usd`, `batch_usd`), and the upper bound budgets reserve against:
    `max_calls` calls, every reply at max_tokens (`worst_usd`, `worst_tokens`)."""
    tokens = _Tokens()
    sums: dict[tuple, list[int]] = {}
    for call in calls:
        s = sums.setdefault((call.stage, call.cycle, call.provider), [0] * 6)
        prompt = tokens(call.request)
        s[0] += call.count
        s[1] += call.most
        s[2] += prompt * call.count
        s[3] += call.reply_tokens * call.count
        s[4] += prompt * call.most
        s[5] += call.max_tokens * call.most
    lines = []
    for (stage, cycle, provider), (n, most, inp, out, worst_in, worst_out) in sums.items():
        p = cfg.provider(provider)

        def usd(i: int, o: int, batch: bool = p.batch, p=p) -> float:
            return prices.cost(p.kind, p.model, i, o, free=p.is_free, batch=batch)

        lines.append(
            {
                "stage": stage,
                "cycle": cycle,
                "provider": provider,
                "model": p.model,
                "calls": n,
                "max_calls": most,
                "input_tokens": inp,
                "output_tokens": out,
                "usd": usd(inp, out),  # at the batch price for a `batch: true` provider (what it pays)
                "batch_usd": usd(inp, out, batch=True),
                "worst_usd": usd(worst_in, worst_out),
                "worst_tokens": worst_in + worst_out,
            }
        )
    return lines


def _chosen(cfg: RunConfig, prices: PriceTable, plan: PlannedCalls) -> list[PlannedCall]:
    """The plan's calls, and of each choice made at run time the alternative whose upper bound costs most."""
    calls = list(plan.calls)
    for alternatives in plan.choices:
        calls += max(
            alternatives, key=lambda alt: sum(line["worst_usd"] for line in _price(cfg, prices, alt))
        )
    return calls


def _plan(
    cfg: RunConfig,
    stage: str,
    cycle: int | None,
    train: Sequence[dict],
    test: Sequence[dict],
    layout: RunLayout | None,
    assume: Assumptions,
    baselines: bool = True,
) -> PlannedCalls:
    """What a paid notebook says it will send: 04 = the cycle's judging (and pairwise comparison) + Table 1's
    reference rows still to compute (`baselines`); 05 = teacher study + synthesis; 06 = judged parity."""
    if stage == "04_evaluate":
        plan = planned_judging_calls(cfg, cycle, test, layout) + planned_pairwise_calls(
            cfg, cycle, test, layout
        )
        return plan + planned_baseline_calls(cfg, test, layout) if baselines else plan
    if stage == "05_synthesize":
        synthesis = planned_synthesis_calls(cfg, cycle, train, assume.accept_share, assume.pair_tokens)
        return planned_study_calls(cfg, cycle, train) + synthesis
    if stage == "06_deploy":
        return planned_parity_calls(cfg, test)
    raise ValueError(f"no forecast for {stage}: the paid stages are {list(PAID_STAGES)}")


def _check(stage: str, calls: Sequence[PlannedCall]) -> list[PlannedCall]:
    """A notebook's plan names only the ledger stages its pools write (what the ServicePool looks up)."""
    for call in calls:
        if call.stage not in NOTEBOOK_LEDGER_STAGES[stage]:
            raise ValueError(
                f"{stage} planned a call under ledger stage {call.stage!r}; it pays under "
                f"{list(NOTEBOOK_LEDGER_STAGES[stage])}"
            )
    return list(calls)


def forecast_run(
    cfg: RunConfig, layout: RunLayout | None = None, assume: Assumptions = Assumptions()
) -> pd.DataFrame:
    """One line per (stage, cycle, provider) over all `loop.max_cycles` cycles and 06; `.attrs["data"]` says
    where the rows came from. A study of several generators (`cfg.arms`) is priced arm by arm: an `arm`
    column says "shared" for cycle 0's 04 (run once, in the study's folder) and the generator for the rest
    (05 from cycle 0 on, 04 from cycle 1 on, 06), each arm's plan built on its own run folder."""

    prices = load_prices(cfg.prices_file)
    train, test, origin = _rows(cfg, layout, assume)
    if cfg.arms:
        plan = _plan(cfg, "04_evaluate", 0, train, test, layout, assume)
        parts = [("shared", cfg, _check("04_evaluate", _chosen(cfg, prices, plan)))]
        study = layout or RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
        for arm in cfg.arms:
            arm_cfg = cfg.arm(arm, str(study.arms_dir))
            arm_layout = RunLayout(study.arm_dir(arm)) if layout is not None else None
            calls = _cycle_calls(arm_cfg, prices, train, test, arm_layout, assume, first_judged=1)
            parts.append((arm, arm_cfg, calls))
        frames = []
        for arm, part_cfg, calls in parts:
            frame = _frame(_price(part_cfg, prices, calls))
            frame.insert(0, "arm", arm)
            frames.append(frame)
        import pandas as pd

        table = pd.concat(frames, ignore_index=True)
    else:
        table = _frame(_price(cfg, prices, _cycle_calls(cfg, prices, train, test, layout, assume)))
    table.attrs["data"] = origin
    return table


def _cycle_calls(
    cfg: RunConfig,
    prices: PriceTable,
    train: Sequence[dict],
    test: Sequence[dict],
    layout: RunLayout | None,
    assume: Assumptions,
    first_judged: int = 0,
) -> list[PlannedCall]:
    """Every cycle's 04 (from `first_judged` on) and 05, then 06: one run's (or one arm's) paid notebooks."""
    calls: list[PlannedCall] = []
    for cycle in range(cfg.loop.max_cycles):
        if cycle >= first_judged:
            # Table 1's reference rows are computed once per run: by cycle 0's 04
            plan = _plan(cfg, "04_evaluate", cycle, train, test, layout, assume, baselines=cycle == 0)
            calls += _check("04_evaluate", _chosen(cfg, prices, plan))
        if cycle + 1 < cfg.loop.max_cycles:  # 05 never runs on the last cycle
            plan = _plan(cfg, "05_synthesize", cycle, train, test, layout, assume)
            calls += _check("05_synthesize", _chosen(cfg, prices, plan))
    calls += _check(
        "06_deploy", _chosen(cfg, prices, _plan(cfg, "06_deploy", None, train, test, layout, assume))
    )
    return calls


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
    calls = _chosen(cfg, prices, _plan(cfg, stage, cycle, train, test, layout, assume))
    return _price(cfg, prices, _check(stage, calls)), origin


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
    candidate's trial student under ledger stage "teacher_validation"): 04's judging plan
    (`evaluate.planned_judging_calls`, the answers in `layout` as written) under ledger stage `stage`."""
    calls = planned_judging_calls(cfg, cycle, test, layout, stage=stage).calls
    lines = _price(cfg, load_prices(cfg.prices_file), calls)
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
        ledger.assign(calls=(~retried_attempts(ledger)).astype(int))  # retried attempts are no calls
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

    arm = "arm" in table.columns  # a study of several generators: which arm pays the line
    lines = [
        ("| arm " if arm else "")
        + "| stage | cycle | provider | model | calls | input tokens | output tokens | USD | USD (batch) |",
        ("|---" if arm else "") + "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in table.to_dict("records"):
        lines.append(
            (f"| {r['arm']} " if arm else "")
            + f"| {r['stage']} | {'' if pd.isna(r.get('cycle')) else r['cycle']} | {r.get('provider', '')} | {r.get('model', '')} | "
            f"{int(r['calls']):,} | {int(r['input_tokens']):,} | {int(r['output_tokens']):,} | "
            f"{r['usd']:,.2f} | {r['batch_usd']:,.2f} |"
        )
    return "\n".join(lines)
