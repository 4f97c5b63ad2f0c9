"""The forecast of the paid stages: calls from the params, tokens from the real prompts, USD from the price table."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tinyrun import TEST, make_tiny_run

from llamaduo_nb import forecast
from llamaduo_nb.callcache import CallCache, LedgerRow, read_ledger
from llamaduo_nb.cli import main
from llamaduo_nb.config import RunConfig, build, dump_config
from llamaduo_nb.evaluate import judge_requests, judge_template
from llamaduo_nb.evaluate.stage import BASE_DIR, answers_meta
from llamaduo_nb.jsonio import write_json, write_jsonl
from llamaduo_nb.prices import load_prices
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.schemas import load_test_rows
from llamaduo_nb.testing import Behaviour, TestLLMServer
from llamaduo_nb.testing import server as testserver

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
    paper = str(ROOT / "params" / "paper_gemma7b.yaml")
    assert main(["forecast", paper, "--set", "loop.max_cycles=2", "--set", "synthesize.volumes=[1000]"]) == 0
    out = capsys.readouterr().out
    assert "assumptions (no splits and no local coverage source)" in out
    # cycle 0's judging runs once for the study (25 test x K=4 x M=10); every arm pays its own 05 and cycle 1
    assert "| shared | 04_evaluate | 0 | claude | claude-3-sonnet-20240229 | 1,000 |" in out
    for arm in ("gpt4o", "claude", "gemini"):
        assert f"| {arm} | 05_synthesize | 0 | {arm} |" in out
        assert f"| {arm} | 04_evaluate | 1 | claude | claude-3-sonnet-20240229 | 1,000 |" in out
    assert "| total |" in out


# --------------------------------------------------------------------------- forecast vs what a run pays


def priced_run(tmp_path: Path, server_url: str) -> tuple[RunConfig, RunLayout]:
    """The tiny run with one paid openai_compatible provider (priced in a temp prices file) on a local test
    server doing every paid job: judge (M=2), Table-1 baseline, teacher candidate (best-of-2), reward judge
    (M=2), generator, and 06's judges (M'=3); 03's answers of cycle 0 and the base student's Table-1 answers
    are written (the local student answers for free; its answers only need judging)."""
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
    data["deploy"].update(enabled=True, serve=True, parity_m=3, parity_judges=None)
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
    # Table 1's base-student row: answered (free, local), not judged yet
    write_jsonl(
        layout.baseline_responses_file(BASE_DIR),
        [
            {"prompt_id": f"test-{i}", "instruction": q, "reference": a, "candidate": f"base: {a} ({j})",
             "sample_index": j, "category": c, "model_id": "base", "generation": {}}
            for i, (q, a, c) in enumerate(TEST)
            for j in range(cfg.inference.k)
        ],
    )  # fmt: skip
    test_rows = load_test_rows(layout.test_file)
    write_json(layout.baseline_meta_file(BASE_DIR), {"answers": answers_meta(cfg, test_rows, BASE_DIR)})
    return cfg, layout


def actual_calls(layout: RunLayout, paid_only: bool = False) -> dict[tuple, int]:
    """Real calls per (stage, cycle) in the run's ledger (cache replays are not in it); `paid_only`: per
    (stage, cycle, provider), calls of priced providers only."""
    calls: dict[tuple, int] = {}
    for row in read_ledger(layout.calls_db):
        if paid_only and row["provider"] != "svc":
            continue
        key = (row["stage"], row["cycle"], row["provider"]) if paid_only else (row["stage"], row["cycle"])
        calls[key] = calls.get(key, 0) + 1
    return calls


def distinct_replies(monkeypatch) -> None:
    """The test server answers equal HTTP bodies alike, so K samples of one prompt (whose `repeat` is not sent)
    would get one answer and their judgments be paid once; give every reply its own draw (still valid JSON for
    a schema), so that every call a stage makes is a call paid and the counts can be compared exactly."""
    drawn = itertools.count()
    answer = testserver.reply_text
    monkeypatch.setattr(testserver, "reply_text", lambda body: answer({**body, "draw": next(drawn)}))


@pytest.mark.slow
def test_the_forecast_bounds_every_paid_call_of_a_small_run(tmp_path, monkeypatch):
    """Every paid stage against a paid-priced local server: 04 (judging + Table 1's baseline answers and the
    judging of base student and baseline), 05 (teacher study: candidate answers and reward judging; synthesis
    with best-of-N) and 06 (judged parity). The forecast's calls equal the ledger's where the count is fixed by
    the params and the data, its max_calls bound synthesis, and 05 sends the requests the plan built."""
    from llamaduo_nb import evaluate, synthesize
    from llamaduo_nb.deploy.parity import parity_judgments, served_provider
    from llamaduo_nb.notebook import Stage
    from llamaduo_nb.services import ServicePool, StageStopped
    from llamaduo_nb.synthesize import teacher

    distinct_replies(monkeypatch)
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
        synthesized = synthesize.run_synthesis(synthesis)

        # 06: the served GGUF is played by the test server too (a free provider); the judges are paid
        parity = forecast.forecast_stage(cfg, "06_deploy", None, layout)
        gguf = tmp_path / "model-f16.gguf"
        gguf.write_bytes(b"GGUF")
        served_cfg, served = served_provider(cfg, gguf, server.base_url, "f16")
        with ServicePool(served_cfg, layout, "06_deploy", providers=[served, "svc"]) as pool:
            parity_judgments(pool, served, load_test_rows(layout.test_file), responses, cfg, gguf.name)
        shown = pd.concat([shown, parity])

    forecast_calls = {(r.stage, None if pd.isna(r.cycle) else r.cycle): r for r in shown.itertuples()}
    paid = actual_calls(layout)
    k, m, n_test = cfg.inference.k, cfg.evaluate.m, len(TEST)
    assert forecast_calls["04_evaluate", 0].calls == paid["04_evaluate", 0] == n_test * k * m
    # the baseline answers K times, then the judges score base student + baseline
    assert forecast_calls["baselines", None].calls == n_test * k + 2 * n_test * k * m
    assert n_test * k < paid["baselines", None] <= forecast_calls["baselines", None].calls
    # 3 instructions x best-of-2 answers, each answer rewarded M=2 times
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

    # every call each stage planned is a call paid, where the count is fixed (replies all distinct here)
    paid_svc = actual_calls(layout, paid_only=True)
    for stage, cycle in [("04_evaluate", 0), ("baselines", None), ("teacher_study", 0), ("06_deploy", None)]:
        assert forecast_calls[stage, cycle].calls == paid_svc[stage, cycle, "svc"], (stage, cycle)
    # 06: the served answers judged M'=3 times; the evaluated answers re-judged, their first M=2 replayed
    assert forecast_calls["06_deploy", None].calls == n_test * k * 3 + n_test * k * 1
    # 05's synthesis: the requests sent are the plan's, in its order; with best-of-N each kept pair costs the
    # plan's calls per pair (N - 1 answers and N x M rewards), at most pairs_per_request pairs a reply
    generator = synthesize.generator_of(cfg, layout, 0)
    train = synthesize.load_split(layout.train_file, "train")
    plan = synthesize.planned_synthesis_calls(cfg, 0, train)
    (alternatives,) = plan.choices
    names = [c.name for c in cfg.teacher_study.candidates]
    chosen = alternatives[names.index(generator.name) if generator.name in names else -1]  # -1: the default
    requests = [c.request for c in chosen if c.request.json_schema is synthesize.PAIRS_SCHEMA]
    sent = synthesized.requests
    assert [r.repeat for r in requests][: len(sent)] == [r["repeat"] for r in sent]
    by_id = {row["id"]: row for row in train}
    templates = synthesize.load_templates()
    for request, entry in zip(requests, sent, strict=False):
        assert request.messages == synthesize.synthesis_messages(
            by_id[entry["seed_id"]], cfg.synthesize, templates
        )
    per_pair = sum(c.most for c in chosen if c.request.json_schema is not synthesize.PAIRS_SCHEMA)
    per_pair //= cfg.synthesize.max_requests_per_cycle * cfg.synthesize.pairs_per_request
    assert per_pair == (
        (generator.n - 1) + generator.n * cfg.teacher_study.reward.m if generator.n > 1 else 0
    )
    pairs = sum(r["pairs"] for r in sent)
    assert all(r["pairs"] <= cfg.synthesize.pairs_per_request for r in sent)
    assert paid_svc["05_synthesize", 0, "svc"] == len(sent) + pairs * per_pair


class _WordyPool:
    """Stands in for the ServicePool: a generator that writes 5 pairs where 2 were asked for, then answers."""

    def __init__(self) -> None:
        self.requests: list = []

    def complete_many(self, provider: str, requests: list, desc: str = "") -> list:
        from llamaduo_nb.services import ChatResult

        self.requests += requests
        results = []
        for r in requests:
            if r.json_schema is not None:  # a synthesis request
                pairs = [
                    {
                        "instruction": f"Question {r.repeat}.{i}: name a colour.",
                        "response": f"Colour {r.repeat}.{i}.",
                    }
                    for i in range(5)
                ]
                text = json.dumps({"pairs": pairs})
            else:
                text = f"Another answer, number {len(self.requests)}."
            results.append(ChatResult(text, None, None, None, 10, 10, 0.0, 0.0, False))
        return results


class _CountingReward:
    name = "counting"

    def __init__(self) -> None:
        self.items = 0

    def score(self, items, tag=""):
        from llamaduo_nb.synthesize.teacher import RewardScores

        self.items += len(items)
        return RewardScores([50.0] * len(items))


def test_best_of_n_stays_within_the_forecast_bound_when_the_generator_writes_more_pairs_than_asked(tmp_path):
    """Every synthetic pair costs best-of-N answers and rewards: a reply with more pairs than
    pairs_per_request would make 05 pay beyond the forecast's upper bound, so only that many are kept."""
    from llamaduo_nb import synthesize

    layout = make_tiny_run(tmp_path / "run")
    data = yaml.safe_load(layout.params_file.read_text())
    data["providers"].append(
        {"name": "svc", "kind": "openai_compatible", "model": "m", "base_url": "http://x", "free": True}
    )
    data["synthesize"].update(
        generator="svc", pairs_per_request=2, target_per_cycle=100, max_requests_per_cycle=3, best_of_n=2
    )
    data["teacher_study"] = {"candidates": [], "reward": {"kind": "judge", "judge": "svc", "m": 2}}
    cfg = build(RunConfig, data, source="tests")
    pool, reward = _WordyPool(), _CountingReward()
    result = synthesize.synthesize_cycle(cfg, layout, 0, pool, synthesize.default_generator(cfg), reward)
    assert [(r["pairs"], r["surplus"]) for r in result.requests] == [(2, 3)] * 3
    assert result.report["surplus_pairs"] == 9

    plan = synthesize.planned_synthesis_calls(cfg, 0, synthesize.load_split(layout.train_file, "train"))
    rewarded = [c for c in plan.calls if c.provider == "svc" and c.request.json_schema is not None]
    rewarded = [c for c in rewarded if c.request.json_schema is not synthesize.PAIRS_SCHEMA]
    answered = [c for c in plan.calls if c not in rewarded]
    assert (
        len(pool.requests) == 3 + 3 * 2 * (2 - 1) == sum(c.most for c in answered)
    )  # requests + extra answers
    assert reward.items * cfg.teacher_study.reward.m == 3 * 2 * 2 * 2 == sum(c.most for c in rewarded)


def test_table1_rows_already_computed_are_not_planned_and_written_answers_are_judged_as_they_are(tmp_path):
    """One decision (`reference_todo`) says which of Table 1's reference rows still need computing, for 04 and
    for the forecast: a stored row costs nothing; stored answers whose judging is missing are judged as written."""
    from llamaduo_nb import evaluate
    from llamaduo_nb.evaluate.stage import judges_meta

    layout = make_tiny_run(tmp_path / "run")
    cfg = paid_config(layout)
    cfg = dataclasses.replace(
        cfg,
        evaluate=dataclasses.replace(cfg.evaluate, judges=["gpt4o"], baselines=["claude"], base_student=True),
    )
    test_rows = load_test_rows(layout.test_file)
    k, m = cfg.inference.k, cfg.evaluate.m
    fresh = evaluate.planned_baseline_calls(cfg, test_rows, layout).calls
    assert [(c.provider, c.stage) for c in fresh].count(("claude", "baselines")) == len(TEST) * k
    assert [c.provider for c in fresh].count("gpt4o") == 2 * len(TEST) * k * m  # base student + claude judged

    base = [
        {"prompt_id": r["id"], "instruction": r["instruction"], "reference": r["response"], "candidate": f"base {j}",
         "sample_index": j, "category": r["category"]}
        for r in test_rows
        for j in range(k)
    ]  # fmt: skip
    write_jsonl(layout.baseline_responses_file(BASE_DIR), base)
    write_json(layout.baseline_meta_file(BASE_DIR), {"answers": answers_meta(cfg, test_rows, BASE_DIR)})
    write_jsonl(layout.baseline_responses_file("claude"), base)
    write_json(
        layout.baseline_meta_file("claude"),
        {"answers": answers_meta(cfg, test_rows, "claude"), "judges": judges_meta(cfg)},
    )
    models, answers, judging = evaluate.reference_todo(cfg, layout, test_rows)
    assert (models, answers, judging) == ([BASE_DIR, "claude"], [], [BASE_DIR])
    planned = evaluate.planned_baseline_calls(cfg, test_rows, layout).calls
    assert {c.provider for c in planned} == {"gpt4o"} and len(planned) == len(TEST) * k * m
    expected = judge_requests(base, cfg.evaluate, judge_template())
    assert [c.request.messages for c in planned] == [r.messages for r in expected]
    lines = forecast.forecast_stage(cfg, "04_evaluate", 0, layout)
    assert list(lines[lines.stage == "baselines"].calls) == [len(TEST) * k * m]
