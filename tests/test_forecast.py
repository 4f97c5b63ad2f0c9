"""The forecast of the paid stages: calls from the params, tokens from the real prompts, USD from the price table."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml
from tinyrun import TEST, make_tiny_run

from llamaduo_nb import forecast
from llamaduo_nb.callcache import CallCache, LedgerRow, load_prices
from llamaduo_nb.cli import main
from llamaduo_nb.config import RunConfig, build
from llamaduo_nb.evaluate import judge_requests, judge_template
from llamaduo_nb.runlayout import RunLayout

ROOT = Path(__file__).resolve().parent.parent


def paid_config(layout: RunLayout) -> RunConfig:
    """The tiny run's params with the paper's three paid providers as judges and GPT-4o as generator."""
    data = yaml.safe_load(layout.params_file.read_text())
    paper = yaml.safe_load((ROOT / "params" / "paper_gemma7b.yaml").read_text())
    data.update(providers=paper["providers"], prices_file=str(ROOT / "params" / "prices.yaml"))
    data["evaluate"].update(judges=["gpt4o", "claude", "gemini"], m=3, baselines=[])
    data.pop("teacher_study", None)  # the demo's study samples the embedded model, not declared here
    data["synthesize"].update(generator="gpt4o", target_per_cycle=10, max_requests_per_cycle=50)
    data["loop"] = {"max_cycles": 3}
    return build(RunConfig, data, source="tests")


def test_the_forecast_counts_the_calls_each_stage_makes_and_prices_them(tmp_path):
    layout = make_tiny_run(tmp_path / "run")
    cfg = paid_config(layout)
    table = forecast.forecast_run(cfg, layout)
    assert table.attrs["data"] == "the run's splits"
    judging = table[table.stage == "04_evaluate"]
    assert sorted(set(judging.cycle)) == [0, 1, 2] and set(judging.provider) == {"gpt4o", "claude", "gemini"}
    assert set(judging.calls) == {len(TEST) * cfg.inference.k * cfg.evaluate.m}
    synthesis = table[table.stage == "05_synthesize"]
    assert list(synthesis.cycle) == [0, 1]  # 05 never runs on the last cycle
    pairs = cfg.synthesize.pairs_per_request
    assert list(synthesis.calls) == [math.ceil(10 / (pairs * 0.7)), math.ceil(20 / (pairs * 0.7))]  # doubling

    # input tokens are those of the real judge prompts (characters / 4, schema included)
    rows = [{"instruction": r[0], "reference": r[1], "candidate": r[1]} for r in TEST]
    one_each = judge_requests(rows, dataclasses.replace(cfg.evaluate, m=1), judge_template())
    prompt_tokens = sum(
        (sum(len(m["content"]) for m in r.messages) + len(json.dumps(r.json_schema))) // 4 for r in one_each
    )
    gpt = judging[(judging.provider == "gpt4o") & (judging.cycle == 0)].iloc[0]
    assert gpt.input_tokens == prompt_tokens * cfg.inference.k * cfg.evaluate.m
    prices = load_prices(cfg.prices_file)
    for line in table.itertuples():
        p = cfg.provider(line.provider)
        assert line.usd == pytest.approx(prices.cost(p.kind, p.model, line.input_tokens, line.output_tokens))
        assert line.usd > 0 and line.batch_usd == pytest.approx(line.usd / 2) and line.worst_usd >= line.usd
    claude = judging[judging.provider == "claude"].iloc[0]
    assert claude.usd > gpt.usd  # Claude 3 Sonnet ($3/$15) costs more than GPT-4o ($2.50/$10), never $0


def test_a_stage_forecast_is_kept_and_shown_next_to_the_ledger(tmp_path):
    layout = make_tiny_run(tmp_path / "run")
    cfg = paid_config(layout)
    shown = forecast.forecast_stage(cfg, "05_synthesize", 0, layout)
    assert list(shown.provider) == ["gpt4o"]
    with CallCache(layout.calls_db) as cache:
        cache.record(LedgerRow(stage="05_synthesize", cycle=0, provider="gpt4o", kind="openai", model="gpt-4o",
                               input_tokens=700, output_tokens=900, latency_s=1.0, cost_usd=0.011, ok=True,
                               error=None, attempts=1, cache_key="k"))  # fmt: skip
        cache.record_reuse("05_synthesize", 0, "gpt4o", "gpt-4o", "k2", 0.012)  # paid by an earlier run
    table = forecast.forecast_vs_actual(layout)
    (row,) = table.to_dict("records")
    assert (row["stage"], row["cycle"], row["provider"]) == ("05_synthesize", 0, "gpt4o")
    assert row["forecast_calls"] == shown.calls[0] and row["actual_calls"] == 1
    assert row["forecast_usd"] == pytest.approx(shown.usd[0]) and row["actual_usd"] == pytest.approx(0.011)
    assert row["reused_calls"] == 1 and row["reused_usd"] == pytest.approx(0.012)
    with pytest.raises(ValueError, match="paid stages"):
        forecast.forecast_stage(cfg, "02_finetune", 0)


def test_cli_forecasts_the_paper_configuration_without_its_data(capsys):
    assert main(["forecast", str(ROOT / "params" / "paper_gemma7b.yaml"), "--set", "loop.max_cycles=2"]) == 0
    out = capsys.readouterr().out
    assert "assumptions (no splits and no local coverage source)" in out
    assert "| 04_evaluate | 0 | claude | claude-3-sonnet-20240229 | 1,000 |" in out  # 25 test x K=4 x M=10
    assert "| total |" in out
