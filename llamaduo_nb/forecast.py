"""What the paid stages will cost, before they run: calls, tokens and USD per stage, cycle and provider.

    table = forecast_run(cfg)                       # every cycle's 04 (judging) and 05 (synthesis)
    table = forecast_stage(cfg, "04_evaluate", 0)   # one stage, as the notebooks show it before calling

The numbers come from the params (K, M, judges, targets, growth, caps, max_tokens), the data and the price
table (params/prices.yaml):

* Prompts are the real ones: the judge and synthesis requests are built by evaluate.py / synthesize.py from
  the run's test and train splits (or, before 01 ran, from `coverage.source` when it is a local file, else
  from `Assumptions`), and their input tokens are estimated like the ServicePool's rate limiter does
  (characters / 4; JSON schemas count).
* Output tokens: a judgment is a two-number JSON object (`JUDGE_REPLY_TOKENS`); a synthesis reply holds
  `pairs_per_request` pairs as long as the seed rows, capped by `max_tokens`. `worst_usd` assumes every reply
  uses all of max_tokens (what the budgets reserve before each call).
* Synthesis requests per cycle: the target (2^t k with `growth: double`) over pairs per request and the share
  of pairs that survive the filters (`Assumptions.accept_share`), capped by `max_requests_per_cycle`.
* A provider with `batch: true` is priced at its batch discount in `usd` and `worst_usd` (that is what it
  pays); `batch_usd` is always the batch price, to show what switching a provider to batch would save.
* Every cycle is counted (the loop may stop earlier when epsilon is met; 05 never runs on the last cycle).
* Reasoning models think on top of this; their thinking is not forecast (the worst case includes the
  allowance). Cache hits are free and not subtracted: this is the cost of a run from an empty cache.

The forecast of a stage is stored in the run's calls.sqlite when the notebook shows it, so the ledger can
be read as forecast vs actual per stage (`forecast_vs_actual`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .callcache import CallCache, PriceTable, ledger_frame, load_prices
from .config import RunConfig
from .runlayout import RunLayout

if TYPE_CHECKING:
    import pandas as pd

JUDGE_REPLY_TOKENS = 25  # {"similarity": 80, "precision": 75} plus the provider's framing
PAID_STAGES = ("04_evaluate", "05_synthesize")
COLUMNS = [
    "stage",
    "cycle",
    "provider",
    "model",
    "calls",
    "input_tokens",
    "output_tokens",
    "usd",
    "batch_usd",
    "worst_usd",
]


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
    cycle: int,
    cfg: RunConfig,
    provider: str,
    prices: PriceTable,
    calls: int,
    input_tokens: int,
    output_tokens: int,
    worst_output_tokens: int,
) -> dict:
    p = cfg.provider(provider)

    def usd(out: int, batch: bool = p.batch) -> float:
        return prices.cost(p.kind, p.model, input_tokens, out, free=p.is_free, batch=batch)

    return {
        "stage": stage,
        "cycle": cycle,
        "provider": provider,
        "model": p.model,
        "calls": calls,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "usd": usd(output_tokens),  # at the batch price for a `batch: true` provider (what it will pay)
        "batch_usd": usd(output_tokens, batch=True),
        "worst_usd": usd(worst_output_tokens),
    }


def _judging(cfg: RunConfig, cycle: int, test: Sequence[dict], prices: PriceTable) -> list[dict]:
    from .evaluate import judge_requests, judge_template

    ev, k = cfg.evaluate, cfg.inference.k
    # the student's answer: as long as the reference, at most max_new_tokens
    rows = [
        {
            "instruction": r["instruction"],
            "reference": r["response"],
            "candidate": r["response"][: cfg.inference.max_new_tokens * 4],
        }
        for r in test
    ]
    one_each = judge_requests(rows, dataclasses.replace(ev, m=1), judge_template())
    per_sample = sum(_request_tokens(r) for r in one_each)  # one judgment of each test prompt's sample
    calls = len(test) * k * ev.m
    lines = []
    for judge in ev.judges:
        reply = min(JUDGE_REPLY_TOKENS, ev.max_tokens)
        lines.append(
            _line(
                "04_evaluate",
                cycle,
                cfg,
                judge,
                prices,
                calls,
                per_sample * k * ev.m,
                calls * reply,
                calls * ev.max_tokens,
            )
        )
    return lines


def synthesis_requests(cfg: RunConfig, cycle: int, assume: Assumptions) -> int:
    """Requests 05 sends in `cycle` when a share `accept_share` of the pairs is kept."""
    from .synthesize import target_rows

    sy = cfg.synthesize
    wanted = math.ceil(target_rows(sy, cycle) / (sy.pairs_per_request * assume.accept_share))
    return min(wanted, sy.max_requests_per_cycle)


def _synthesis(
    cfg: RunConfig, cycle: int, train: Sequence[dict], prices: PriceTable, assume: Assumptions
) -> dict:
    from .synthesize import load_templates, request_batch

    sy = cfg.synthesize
    calls = synthesis_requests(cfg, cycle, assume)
    sample = list(train[: min(len(train), 50)])
    requests = request_batch(sample, sy, load_templates(), 0)
    per_call_in = sum(_request_tokens(r) for r in requests) / len(requests)
    pair_chars = sum(len(r["instruction"]) + len(r["response"]) for r in sample) / len(sample)
    pair = assume.pair_tokens if assume.pair_tokens is not None else _tokens(int(pair_chars))
    per_call_out = min(sy.max_tokens, (pair + 20) * sy.pairs_per_request)  # 20: the JSON around each pair
    return _line(
        "05_synthesize",
        cycle,
        cfg,
        sy.generator,
        prices,
        calls,
        round(per_call_in * calls),
        round(per_call_out * calls),
        calls * sy.max_tokens,
    )


def forecast_run(
    cfg: RunConfig, layout: RunLayout | None = None, assume: Assumptions = Assumptions()
) -> pd.DataFrame:
    """One line per (stage, cycle, provider) over all `loop.max_cycles` cycles; `.attrs["data"]` says where the
    rows came from."""
    import pandas as pd

    prices = load_prices(cfg.prices_file)
    train, test, origin = _rows(cfg, layout, assume)
    lines: list[dict] = []
    for cycle in range(cfg.loop.max_cycles):
        lines += _judging(cfg, cycle, test, prices)
        if cycle + 1 < cfg.loop.max_cycles:
            lines.append(_synthesis(cfg, cycle, train, prices, assume))
    table = pd.DataFrame(lines, columns=COLUMNS)
    table.attrs["data"] = origin
    return table


def forecast_stage(
    cfg: RunConfig,
    stage: str,
    cycle: int,
    layout: RunLayout | None = None,
    assume: Assumptions = Assumptions(),
) -> pd.DataFrame:
    """The forecast of one stage of one cycle (04 or 05); stored in the run's calls.sqlite when `layout` is given."""
    import pandas as pd

    if stage not in PAID_STAGES:
        raise ValueError(f"no forecast for {stage}: the paid stages are {list(PAID_STAGES)}")
    prices = load_prices(cfg.prices_file)
    train, test, origin = _rows(cfg, layout, assume)
    lines = (
        _judging(cfg, cycle, test, prices)
        if stage == "04_evaluate"
        else [_synthesis(cfg, cycle, train, prices, assume)]
    )
    table = pd.DataFrame(lines, columns=COLUMNS)
    table.attrs["data"] = origin
    if layout is not None:
        with CallCache(layout.calls_db) as cache:
            cache.record_forecast(stage, cycle, table.to_dict("records"))
    return table


def totals(table: pd.DataFrame) -> pd.DataFrame:
    """Per stage over all cycles, plus a total line."""
    import pandas as pd

    numeric = ["calls", "input_tokens", "output_tokens", "usd", "batch_usd", "worst_usd"]
    by_stage = table.groupby("stage", sort=True)[numeric].sum().reset_index()
    total = pd.DataFrame([{"stage": "total", **{c: table[c].sum() for c in numeric}}])
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
    lines = [
        "| stage | cycle | provider | model | calls | input tokens | output tokens | USD | USD (batch) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in table.to_dict("records"):
        lines.append(
            f"| {r['stage']} | {r.get('cycle', '')} | {r.get('provider', '')} | {r.get('model', '')} | "
            f"{int(r['calls']):,} | {int(r['input_tokens']):,} | {int(r['output_tokens']):,} | "
            f"{r['usd']:,.2f} | {r['batch_usd']:,.2f} |"
        )
    return "\n".join(lines)
