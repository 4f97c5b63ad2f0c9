"""The forecast of the paid stages: calls from the params, tokens from the real prompts, USD from the price table."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tinyrun import TEST, make_tiny_run

from llamaduo_nb import forecast
from llamaduo_nb.callcache import CallCache, LedgerRow, load_prices, read_ledger
from llamaduo_nb.cli import main
from llamaduo_nb.config import RunConfig, build, dump_config
from llamaduo_nb.evaluate import judge_requests, judge_template
from llamaduo_nb.jsonio import write_jsonl
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.testserver import Behaviour, TestLLMServer

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


def test_06_forecasts_judged_parity_and_a_budget_below_the_upper_bound_is_said_before_the_stage(tmp_path):
    layout = make_tiny_run(tmp_path / "run")
    cfg = paid_config(layout)
    k, m, n_test = cfg.inference.k, cfg.evaluate.m, len(TEST)
    metrics_only = dataclasses.replace(cfg, deploy=dataclasses.replace(cfg.deploy, parity_judges=[]))
    # reference metrics are free
    assert forecast.forecast_stage(metrics_only, "06_deploy", None, layout).empty
    cfg = dataclasses.replace(cfg, deploy=dataclasses.replace(cfg.deploy, parity_m=m + 1, parity_judges=None))
    table = forecast.forecast_stage(cfg, "06_deploy", None, layout)
    # served answers judged M'=m+1 times; the evaluated answers re-judged as often, their first m repeats replayed
    assert set(table.calls) == {n_test * k * (m + 1) + n_test * k * 1} and len(table) == len(
        cfg.evaluate.judges
    )
    with CallCache(layout.calls_db) as cache:
        assert cache.has_forecast("06_deploy", None) and not cache.has_forecast("04_evaluate", 0)

    tight = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, stage_usd=0.0001))
    with pytest.warns(
        forecast.BudgetWarning, match=r"budget\.stage_usd=0\.0001 is below the forecast upper bound"
    ):
        shown = forecast.forecast_stage(tight, "04_evaluate", 0, layout)
    assert any("04_evaluate, cycle 0" in note for note in shown.attrs["budget"])
    roomy = dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, stage_usd=1000.0))
    assert forecast.forecast_stage(roomy, "04_evaluate", 0, layout).attrs["budget"] == []


def test_cli_forecasts_the_paper_configuration_without_its_data(capsys):
    assert main(["forecast", str(ROOT / "params" / "paper_gemma7b.yaml"), "--set", "loop.max_cycles=2"]) == 0
    out = capsys.readouterr().out
    assert "assumptions (no splits and no local coverage source)" in out
    assert "| 04_evaluate | 0 | claude | claude-3-sonnet-20240229 | 1,000 |" in out  # 25 test x K=4 x M=10
    assert "| total |" in out


# --------------------------------------------------------------------------- forecast vs what a run pays


def priced_run(tmp_path: Path, server_url: str) -> tuple[RunConfig, RunLayout]:
    """The tiny run with one paid openai_compatible provider (priced in a temp prices file) on a local test
    server doing every paid job: judge (M=2), Table-1 baseline, teacher candidate (best-of-2), reward judge
    (M=2) and generator."""
    layout = make_tiny_run(tmp_path / "run")
    prices = tmp_path / "prices.yaml"
    prices.write_text(yaml.safe_dump({"models": {"paid-test-model": {"input": 1.0, "output": 4.0}}}))
    data = yaml.safe_load(layout.params_file.read_text())
    data.update(prices_file=str(prices))
    data["providers"] = [
        {"name": "svc", "kind": "openai_compatible", "model": "paid-test-model", "base_url": server_url,
         "rpm": 100_000, "tpm": 100_000_000}
    ]  # fmt: skip
    data["evaluate"].update(judges=["svc"], m=2, baselines=["svc"], base_student=True)
    data["synthesize"].update(
        generator="svc", pairs_per_request=2, target_per_cycle=2, max_requests_per_cycle=3
    )
    data["teacher_study"] = {
        "candidates": [{"name": "warm", "provider": "svc", "temperature": 0.9, "n": 2, "max_tokens": 64}],
        "sample_size": 3,
        "reward": {"kind": "judge", "judge": "svc", "m": 2, "max_tokens": 32},
    }
    cfg = build(RunConfig, data, source="tests")
    dump_config(cfg, layout.params_file)
    # 03's output: K answers per test prompt
    write_jsonl(
        layout.responses_file(0),
        [
            {"prompt_id": f"test-{i}", "instruction": q, "reference": a, "candidate": f"{a} ({j})", "sample_index": j,
             "category": c}
            for i, (q, a, c) in enumerate(TEST)
            for j in range(cfg.inference.k)
        ],
    )  # fmt: skip
    return cfg, layout


def actual_calls(layout: RunLayout) -> dict[tuple, int]:
    """Real calls per (stage, cycle) in the run's ledger (cache replays are not in it)."""
    calls: dict[tuple, int] = {}
    for row in read_ledger(layout.calls_db):
        calls[row["stage"], row["cycle"]] = calls.get((row["stage"], row["cycle"]), 0) + 1
    return calls


@pytest.mark.slow
def test_the_forecast_bounds_every_paid_call_of_a_small_run(tmp_path, monkeypatch):
    """04 (judging + Table 1's baseline answers and the judging of base student and baseline) and 05 (teacher
    study: candidate answers and reward judging; synthesis) against a paid-priced local server: the forecast's
    calls equal the ledger's where the count is fixed by the params, and its max_calls bound synthesis."""
    from llamaduo_nb import evaluate, synthesize
    from llamaduo_nb.synthesize import teacher
    from llamaduo_nb.notebook import Stage
    from llamaduo_nb.services import StageStopped

    with TestLLMServer(Behaviour()) as server:
        cfg, layout = priced_run(tmp_path, server.base_url)
        judging = Stage("04_evaluate", cfg, layout, 0)
        responses = evaluate.load_responses(layout.responses_file(0))
        with pytest.raises(StageStopped, match=r"no forecast recorded for 04_evaluate \(cycle 0\)"):
            evaluate.run_judges(judging, responses)  # a notebook run that skipped the forecast cell
        assert server.entries() == [] and read_ledger(layout.calls_db) == []

        shown = pd.concat(
            [
                forecast.forecast_stage(cfg, "04_evaluate", 0, layout),
                forecast.forecast_stage(cfg, "05_synthesize", 0, layout),
            ]
        )
        evaluate.run_judges(judging, responses)
        evaluate.reference_rows(cfg, layout, log=lambda msg: None)
        synthesis = Stage("05_synthesize", cfg, layout, 0)
        teacher.run_teacher_study(synthesis)
        synthesize.run_synthesis(synthesis)

    forecast_calls = {(r.stage, None if pd.isna(r.cycle) else r.cycle): r for r in shown.itertuples()}
    paid = actual_calls(layout)
    k, m, n_test = cfg.inference.k, cfg.evaluate.m, len(TEST)
    assert forecast_calls["04_evaluate", 0].calls == paid["04_evaluate", 0] == n_test * k * m
    # the baseline answers K times, then the judges score base student + baseline; equal answers (the test
    # server answers a prompt the same way each time) make equal judge requests, paid once: fewer calls
    assert forecast_calls["baselines", None].calls == n_test * k + 2 * n_test * k * m
    assert n_test * k < paid["baselines", None] <= forecast_calls["baselines", None].calls
    # 3 instructions x best-of-2 answers, each answer rewarded M=2 times (equal answers: one reward paid)
    assert forecast_calls["teacher_study", 0].calls == 3 * 2 + 3 * 2 * 2
    assert 3 * 2 < paid["teacher_study", 0] <= forecast_calls["teacher_study", 0].calls
    line = forecast_calls["05_synthesize", 0]
    assert (
        0 < paid["05_synthesize", 0] <= line.max_calls
    )  # margin: max_requests_per_cycle, best-of-N included
    assert set(paid) == set(forecast_calls)  # no paid call outside the forecast
    for key, row in forecast_calls.items():
        spent = sum(r["cost_usd"] for r in read_ledger(layout.calls_db) if (r["stage"], r["cycle"]) == key)
        assert 0 < spent <= row.worst_usd  # the upper bound holds in USD too
