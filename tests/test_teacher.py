"""05's teacher study (CAR, second reference paper): the arithmetic, the student's loss L exactly as 02 trains,
PPL and IFD, Spearman's rho, best-of-N, the reward-model path, and the choice reaching the synthetic lineage."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.stats
import yaml

from llamaduo_nb import synthesize, validation
from llamaduo_nb.config import ConfigError, RewardConfig, RunConfig, TeacherCandidate, build, load_config
from llamaduo_nb.jsonio import read_json, read_jsonl, write_jsonl
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.services import ServicePool
from llamaduo_nb.synthesize import teacher

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- the arithmetic


def test_car_is_reward_over_one_plus_beta_times_loss():
    assert teacher.car(80.0, 1.0, 3.0) == pytest.approx(20.0)
    assert teacher.car(80.0, 0.0, 3.0) == 80.0  # a perfectly compatible response keeps its reward
    assert teacher.car(60.0, 0.5, 0.0) == 60.0  # beta 0: reward alone
    # a higher reward can lose to a lower one the student finds easier to learn
    assert teacher.car(90.0, 2.0, 3.0) < teacher.car(70.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="cannot be negative"):
        teacher.car(50.0, -0.1, 3.0)


def test_perplexity_and_ifd_definitions():
    assert teacher.perplexity(math.log(4.0) * 3, 3) == pytest.approx(4.0)  # mean NLL ln 4 -> PPL 4
    assert teacher.ifd(2.0, 4.0) == 0.5  # the instruction halves the answer's perplexity
    with pytest.raises(ValueError):
        teacher.perplexity(1.0, 0)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]),
        ([3, 1, 2, 2], [10, 30, 20, 20]),  # ties on both sides
        ([1, 1, 2, 3], [4, 3, 2, 1]),
        ([0.2, 0.5, 0.5, 0.9, 0.1], [1.0, 0.0, 0.5, 0.5, 2.0]),
    ],
)
def test_spearman_rho_equals_scipy_including_ties(a, b):
    expected = scipy.stats.spearmanr(a, b).statistic
    assert teacher.spearman_rho(a, b) == pytest.approx(expected, abs=1e-12)


def test_spearman_rho_is_undefined_for_constant_or_too_few_values():
    assert teacher.spearman_rho([1, 1, 1], [1, 2, 3]) is None
    assert teacher.spearman_rho([1], [2]) is None
    assert teacher.spearman_rho([1, None, 3, 2], [1, 5, 3, 2]) == pytest.approx(1.0)  # None pairs dropped


def test_ranks_put_the_highest_value_first_and_share_ties():
    assert teacher.rank_descending([10.0, 30.0, 20.0, 20.0, None]) == [4.0, 1.0, 2.5, 2.5, None]


def test_best_of_n_keeps_the_argmax_and_records_every_reward():
    best = teacher.pick_best(
        [["a", "b", "c"], ["d", None, "f"], [None, None], ["g", "h"]],
        [[10.0, 70.0, 30.0], [5.0, None, 5.0], [None, None], [None, None]],
    )
    assert best.kept == ["b", "d", None, "g"]  # argmax; first on a tie; nothing; unscored -> first answer
    assert [r["kept_index"] for r in best.records] == [1, 0, None, 0]
    assert best.records[0] == {"n": 3, "rewards": [10.0, 70.0, 30.0], "kept_index": 1}


def test_candidate_summary_excludes_unscored_rows_and_refuses_a_minority():
    rows = [
        {"reward": 80.0, "loss": 1.0, "tokens": 10, "ppl": 2.7, "ifd": 0.5},
        {"reward": 60.0, "loss": 2.0, "tokens": 30, "ppl": 7.4, "ifd": 0.9},
        {"reward": None, "loss": 1.5, "tokens": 20, "ppl": 4.5, "ifd": 0.7},  # judge failed: left out
    ]
    entry = teacher.summarize_candidate(rows, beta=3.0, min_scored_share=0.5)
    assert entry["rows_scored"] == 2 and entry["reward"] == 70.0 and entry["loss"] == 1.5
    assert entry["car"] == pytest.approx(70.0 / 5.5)
    assert entry["length"] == 20.0
    refused = teacher.summarize_candidate(rows, beta=3.0, min_scored_share=0.9)
    assert refused["car"] is None and "not ranked" in refused["note"]


def test_negative_rewards_are_never_ranked_backwards_and_an_offset_ranks_them():
    """Raw reward-model scores can be negative; r / (1 + beta L) would then favour the teacher the student
    fits worse. Such a candidate is not ranked unless `reward.offset` makes its rewards positive."""
    fits = [{"reward": -2.0, "loss": 0.5, "tokens": 10, "ppl": 1.6, "ifd": 0.5}]  # the student fits it well
    misfits = [{"reward": -2.0, "loss": 3.0, "tokens": 10, "ppl": 20.0, "ifd": 0.5}]
    with pytest.raises(ValueError, match="positive rewards only"):
        teacher.car(-2.0, 0.5, 3.0)
    raw = {
        name: teacher.summarize_candidate(rows, 3.0, 0.5)
        for name, rows in [("fits", fits), ("misfits", misfits)]
    }
    assert all(c["car"] is None and "offset" in c["note"] for c in raw.values())
    chosen, why = teacher.choose(raw, 3.0)
    assert chosen is None and "could be ranked" in why and "offset" in why
    shifted = {
        name: teacher.summarize_candidate(rows, 3.0, 0.5, offset=10.0)
        for name, rows in [("fits", fits), ("misfits", misfits)]
    }
    assert shifted["fits"]["car"] == pytest.approx(8.0 / 2.5) and shifted["fits"]["reward"] == -2.0
    chosen, why = teacher.choose(shifted, 3.0)
    assert chosen == "fits" and "(-2.00 + 10)" in why


def test_choice_is_the_highest_car_and_says_when_reward_alone_disagrees():
    candidates = {
        "big": {"reward": 90.0, "loss": 2.0, "car": teacher.car(90, 2.0, 3)},
        "small": {"reward": 70.0, "loss": 0.5, "car": teacher.car(70, 0.5, 3)},
        "broken": {"reward": None, "loss": None, "car": None},
    }
    chosen, why = teacher.choose(candidates, 3.0)
    assert chosen == "small"
    assert "28.00" in why and "by reward alone big would have been chosen" in why
    assert teacher.choose({"x": {"car": None}}, 3.0)[0] is None
    table = teacher.study_table({name: {**c, "rows": 4, "rows_scored": 4} for name, c in candidates.items()})
    assert list(table["candidate"]) == ["small", "big", "broken"]
    assert list(table["rank CAR"][:2]) == [1.0, 2.0]


def test_correlation_table_has_one_rho_per_metric():
    candidates = {
        "a": {"car": 3.0, "reward": 50.0, "length": 10.0, "ppl": 3.0, "ifd": 0.9},
        "b": {"car": 2.0, "reward": 60.0, "length": 30.0, "ppl": 2.0, "ifd": 0.8},
        "c": {"car": 1.0, "reward": 40.0, "length": 20.0, "ppl": 1.0, "ifd": 0.7},
    }
    table = validation.correlation_table(candidates, {"a": 30.0, "b": 20.0, "c": 10.0})
    rho = dict(zip(table["metric"], table["spearman_rho"], strict=True))
    assert rho["CAR"] == pytest.approx(1.0)
    assert rho["reward r"] == pytest.approx(scipy.stats.spearmanr([50, 60, 40], [30, 20, 10]).statistic)


def test_study_params_are_checked_with_an_example():
    base = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    base["teacher_study"] = {
        "candidates": [{"name": "a", "provider": "nobody"}],
        "reward": {"kind": "judge", "judge": "smollm2-service"},
    }
    with pytest.raises(ConfigError, match=r"teacher_study.candidates\[0\].provider"):
        build(RunConfig, base, source="t")
    base["teacher_study"]["candidates"] = [{"name": "a", "provider": "smollm2-service", "n": 0}]
    with pytest.raises(ConfigError, match="n': must lie in 1..16"):
        build(RunConfig, base, source="t")
    with pytest.raises(ConfigError, match="model_id"):
        build(RewardConfig, {"kind": "reward_model"}, source="t")
    base["teacher_study"] = {
        "candidates": [{"name": "a", "provider": "smollm2-service"}]
    }  # no reward judge named
    with pytest.raises(ConfigError, match="teacher_study.reward.judge"):
        build(RunConfig, base, source="t")


def test_a_run_without_a_study_survives_the_params_round_trip(tmp_path):
    from llamaduo_nb.config import dump_config

    base = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    base.pop("teacher_study")
    cfg = build(RunConfig, base, source="t")
    dump_config(cfg, tmp_path / "params.yaml")  # what the runner writes and every notebook reloads
    assert load_config(tmp_path / "params.yaml") == cfg


# --------------------------------------------------------------------------- L under the student, for real


PAIRS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Classify the sentiment: I love this song.", "Positive"),
    ("Write a Python expression that doubles x.", "x * 2"),
]


@pytest.fixture(scope="module")
def student():
    cfg = load_config(ROOT / "params" / "demo.yaml")
    return teacher.StudentScorer.load(cfg)


@pytest.mark.slow
def test_loss_tokens_and_mask_are_exactly_what_02_trains_on(tmp_path):
    from tinyrun import make_tiny_run

    from llamaduo_nb import finetune

    layout = make_tiny_run(tmp_path / "run")
    cfg = load_config(layout.params_file)
    plan = finetune.prepare(cfg, layout, 0)
    try:
        dataset = plan.trainer.train_dataset
        rows = read_jsonl(layout.train_file)
        for i, row in enumerate(rows):
            encoded = teacher.encode_for_loss(plan.tokenizer, row["instruction"], row["response"], 128)
            assert encoded.input_ids == list(dataset[i]["input_ids"])
            assert encoded.labels == list(dataset[i]["labels"])
    finally:
        import shutil

        shutil.rmtree(plan.scratch_dir, ignore_errors=True)


@pytest.mark.slow
def test_batched_loss_equals_an_independent_per_token_nll(student):
    import torch

    encoded = [teacher.encode_for_loss(student.tokenizer, q, a, 1024) for q, a in PAIRS]
    batched = teacher.nll_sums(student.model, encoded, batch_size=3)
    for enc, (nll_sum, n) in zip(encoded, batched, strict=True):
        ids = torch.tensor([enc.input_ids])
        labels = torch.tensor([enc.labels])
        with torch.inference_mode():
            # transformers' own shifted cross-entropy, averaged over the labels that are not -100
            reference = student.model(input_ids=ids, labels=labels).loss.item()
        assert n == enc.n_scored > 0
        assert nll_sum / n == pytest.approx(reference, rel=1e-4)


@pytest.mark.slow
def test_ppl_and_ifd_per_response(student):
    rows = student.losses(PAIRS)
    for row in rows:
        assert row["ppl"] == pytest.approx(math.exp(row["loss"]))
        assert row["ifd"] == pytest.approx(row["ppl"] / row["ppl_alone"])
    # the instruction makes its own answer more likely than the answer after an empty turn
    assert rows[0]["ifd"] < 1.0


@pytest.mark.slow
def test_reward_model_path_on_a_tiny_model_built_from_the_student_config(student, tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(student.model.config._name_or_path)
    config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_labels": 1})  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(tmp_path / "rm")
    student.tokenizer.save_pretrained(tmp_path / "rm")
    reward = teacher.make_reward(
        RewardConfig(kind="reward_model", model_id=str(tmp_path / "rm"), batch_size=2), None
    )
    scores = reward.score(PAIRS)
    assert len(scores.values) == 3 and all(isinstance(v, float) for v in scores.values)
    # batching and padding do not change a score: each pair alone gives the same value
    for pair, value in zip(PAIRS, scores.values, strict=True):
        assert reward.score([pair]).values[0] == pytest.approx(value, abs=1e-4)
    assert len(set(np.round(scores.values, 5))) == 3


# --------------------------------------------------------------------------- the study against a local provider


class TeacherServer:
    """An OpenAI-compatible provider on 127.0.0.1 whose answers depend on the sampling settings.

    Answers: temperature < 0.5 -> a short answer; otherwise a long one, with the request number in it so
    the N samples of best-of-N differ. Reward prompts -> {"quality": the number of words of the answer}.
    Synthesis prompts -> one JSON pair.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                with server.lock:
                    server.requests.append(body)
                    n = len(server.requests)
                data = json.dumps(server.reply(body, n)).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def text_of(body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        if "### Answer" in prompt:  # the reward prompt
            answer = prompt.split("### Answer", 1)[1]  # the row's own text comes last
            return json.dumps({"quality": min(100, len(answer.split()))})
        if '"pairs"' in prompt:
            return json.dumps({"pairs": [{"instruction": "Name a primary colour.", "response": "Red."}]})
        if body.get("temperature", 1.0) < 0.5:
            return "Paris."
        return "The answer, explained at length: " + " ".join(["word"] * (body.get("_n", 0) % 7 + 5))

    def reply(self, body: dict, n: int) -> dict:
        body = {**body, "_n": n}
        return {
            "id": f"c{n}", "object": "chat.completion", "created": 0, "model": body.get("model", ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text_of(body)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30},
        }  # fmt: skip

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def teacher_server():
    server = TeacherServer()
    yield server
    server.close()


def study_run(tmp_path: Path, url: str, candidates: list[dict]) -> tuple[RunConfig, RunLayout]:
    from tinyrun import TEST, TRAIN, coverage_rows

    provider = {
        "name": "svc",
        "kind": "openai_compatible",
        "model": "test-model",
        "base_url": url,
        "free": True,
    }
    data = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    data.update(run_name="study", outputs_dir=str(tmp_path), prices_file=str(ROOT / "params" / "prices.yaml"))
    data["providers"] = [provider]
    data["evaluate"] = {"judges": ["svc"], "m": 1}
    data["synthesize"] = {"generator": "svc", "pairs_per_request": 1, "target_per_cycle": 2,
                          "max_requests_per_cycle": 2}  # fmt: skip
    data["teacher_study"] = {"candidates": candidates, "sample_size": 4, "beta": 3.0,
                             "reward": {"kind": "judge", "judge": "svc", "m": 2}}  # fmt: skip
    cfg = build(RunConfig, data, source="test")
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    write_jsonl(layout.train_file, coverage_rows(TRAIN, "train-"))
    write_jsonl(layout.test_file, coverage_rows(TEST, "test-"))
    return cfg, layout


@pytest.mark.slow
def test_study_chooses_by_car_and_the_choice_reaches_the_lineage(tmp_path, teacher_server, student):
    candidates = [
        {"name": "cool", "provider": "svc", "temperature": 0.2},
        {"name": "warm-best-of-3", "provider": "svc", "temperature": 0.9, "n": 3},
    ]
    cfg, layout = study_run(tmp_path, teacher_server.url, candidates)
    with ServicePool(cfg, layout, teacher.STAGE, 0, providers=["svc"]) as pool:
        result = teacher.run_study(cfg, layout, pool, scorer=student)
    teacher.write_study(result, layout, 0)

    rows = read_jsonl(layout.teacher_responses_file(0))
    assert len(rows) == 2 * 4
    for row in rows:
        # reward = mean of M=2 repeats of the word count; the kept answer has the highest of the N rewards
        assert row["reward"] == max(r for r in row["rewards"] if r is not None)
        assert len(row["rewards"]) == (3 if row["candidate"] == "warm-best-of-3" else 1)
        assert row["response"] == row["samples"][row["kept_index"]]
        assert row["reward"] == len(row["response"].split())
    # CAR recomputed from the per-response file
    for name, entry in result.candidates.items():
        mine = [r for r in rows if r["candidate"] == name]
        r_mean = np.mean([r["reward"] for r in mine])
        l_mean = np.mean([r["loss"] for r in mine])
        assert entry["car"] == pytest.approx(r_mean / (1 + 3.0 * l_mean))
    best = max(result.candidates, key=lambda n: result.candidates[n]["car"])
    assert result.chosen == best and read_json(layout.teacher_study_file(0))["chosen"] == best
    assert layout.teacher_plot(0).stat().st_size > 0 and layout.teacher_table_csv(0).is_file()
    ledger = {row["stage"] for row in _ledger(layout)}
    assert ledger == {"teacher_study"}

    # 05 then synthesizes with the chosen candidate, and every row's lineage names it
    chosen = synthesize.generator_of(cfg, layout, 0)
    assert chosen.name == best
    with ServicePool(cfg, layout, "05_synthesize", 0, providers=["svc"]) as pool:
        reward = teacher.make_reward(cfg.teacher_study.reward, pool)
        synth = synthesize.synthesize_cycle(cfg, layout, 0, pool, chosen, reward)
    written = synth.accepted + synth.rejected
    assert written
    for row in written:
        generator = row["lineage"]["generator"]
        assert generator["candidate"] == best
        assert generator["params"]["temperature"] == chosen.temperature
        assert generator["params"]["best_of_n"] == chosen.n
        if chosen.n > 1:
            record = row["lineage"]["best_of_n"]
            assert record["n"] == chosen.n and len(record["rewards"]) == chosen.n
            assert record["rewards"][record["kept_index"]] == max(
                r for r in record["rewards"] if r is not None
            )


def _ledger(layout: RunLayout) -> list[dict]:
    from llamaduo_nb.callcache import read_ledger

    return read_ledger(layout.calls_db)


def test_without_candidates_05_uses_the_configured_generator(tmp_path):
    cfg, layout = study_run(tmp_path, "http://127.0.0.1:9/v1", [{"name": "x", "provider": "svc"}])
    cfg = build(RunConfig, {**cfg.to_dict(), "teacher_study": {}}, source="test")
    generator = synthesize.generator_of(cfg, layout, 0)
    assert (generator.provider, generator.temperature, generator.n) == ("svc", cfg.synthesize.temperature, 1)
    assert generator.name == "svc"
    assert isinstance(generator, TeacherCandidate)
