"""params/paper_gemma7b.yaml is the paper's setup: No Robots' own splits, the 1K ... 256K synthetic schedule,
the Table-5 LoRA ranks and continual fine-tuning. Checked offline on a No-Robots-shaped dataset saved to disk.
"""

from __future__ import annotations

import json

import pytest

from llamaduo_nb import finetune, synthesize
from llamaduo_nb.config import CoverageConfig, GivenSplits, load_config
from llamaduo_nb.coverage import build_coverage
from llamaduo_nb.jsonio import DataFileError
from llamaduo_nb.runner import PROJECT_ROOT

PAPER = PROJECT_ROOT / "params" / "paper_gemma7b.yaml"
# No Robots' rows per category and split, as the paper uses them (Table 3): train, test.
NO_ROBOTS = {"Summarize": (395, 25), "Classify": (334, 16), "Coding": (334, 16), "Closed QA": (245, 15)}


def _row(split: str, category: str, i: int) -> dict:
    prompt = f"{category} task {split} {i}: tiny text."
    return {
        "prompt": prompt,
        "prompt_id": f"{split}-{category}-{i}",
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"answer {i}"}],
        "category": category,
    }


@pytest.fixture(scope="module")
def no_robots_on_disk(tmp_path_factory):
    """A DatasetDict shaped like HuggingFaceH4/no_robots: train/test splits, its schema and categories,
    plus rows of other categories and a multi-turn chat (which lenient import skips and reports)."""
    from datasets import Dataset, DatasetDict

    splits = {}
    for split, index in (("train", 0), ("test", 1)):
        rows = [_row(split, c, i) for c, sizes in NO_ROBOTS.items() for i in range(sizes[index])]
        rows += [_row(split, "Generation", i) for i in range(7)]
        chat = _row(split, "Chat", 0)
        chat["messages"] = chat["messages"] * 2
        splits[split] = Dataset.from_list(rows + [chat])
    folder = tmp_path_factory.mktemp("no_robots") / "no_robots"
    DatasetDict(splits).save_to_disk(str(folder))
    return folder


def _paper_coverage(source, categories: list[str]) -> CoverageConfig:
    overrides = {
        "coverage.source": str(source),
        "coverage.format": "hf_disk",
        "coverage.categories": categories,
    }
    return load_config(PAPER, overrides).coverage


def test_paper_configuration_keeps_no_robots_own_split_per_category(no_robots_on_disk):
    cfg = load_config(PAPER)
    assert cfg.coverage.splits == GivenSplits(train="train", test="test")
    assert cfg.coverage.categories == ["Summarize"]

    for category, (n_train, n_test) in NO_ROBOTS.items():
        result = build_coverage(_paper_coverage(no_robots_on_disk, [category]), seed=cfg.seed)
        assert (len(result.train), len(result.test)) == (n_train, n_test), category
        assert {r["id"].split("-", 1)[0] for r in result.train} == {"train"}
        assert {r["id"].split("-", 1)[0] for r in result.test} == {"test"}
        assert result.report["split"] == "as given"
        assert result.report["skipped_by_problem"] == {"multi-turn": 2}  # one chat row per split

    together = build_coverage(_paper_coverage(no_robots_on_disk, list(NO_ROBOTS)), seed=cfg.seed)
    assert together.report["per_category"] == {
        "train": {c: sizes[0] for c, sizes in sorted(NO_ROBOTS.items())},
        "test": {c: sizes[1] for c, sizes in sorted(NO_ROBOTS.items())},
    }


def test_paper_schedule_reaches_1k_to_256k_with_table5_ranks():
    cfg = load_config(PAPER)
    cycles = range(cfg.loop.max_cycles)
    added = [synthesize.target_rows(cfg.synthesize, t) for t in cycles]
    # The synthetic rows cycle t trains on were made in cycles 0..t-1 (05 does not run in the last cycle).
    volumes = [sum(added[:t]) for t in cycles]
    assert volumes == [0] + [1000 * 2**n for n in range(9)]  # 1K, 2K, 4K, ..., 256K
    ranks = [finetune.lora_shape(cfg.finetune, 395 + v)[:2] for v in volumes]
    # Table 5: rank / alpha 8 / 16 for 1K-16K, 16 / 32 at 32K, 32 / 64 for 64K-256K
    assert ranks == [(8, 16)] * 6 + [(16, 32)] + [(32, 64)] * 3
    assert cfg.finetune.start_from == "previous_merged"
    assert cfg.student.chat_template == "gemma"
    # the paper's experiment: every volume, whatever epsilon says, one arm per generator (Fig. 2's lines)
    assert cfg.synthesize.volumes == volumes[1:]
    assert cfg.loop.mode == "sweep" and cfg.arms == ["gpt4o", "claude", "gemini"]
    assert cfg.deploy.select == "best"


def test_the_paper_study_is_forecast_arm_by_arm():
    from llamaduo_nb import forecast

    cfg = load_config(PAPER)
    table = forecast.forecast_run(cfg)
    shared = table[table.arm == "shared"]
    assert set(shared.stage) == {"04_evaluate", "baselines"} and set(shared.cycle.dropna()) == {0}
    for arm in cfg.arms:
        lines = table[table.arm == arm]
        assert sorted(set(lines[lines.stage == "05_synthesize"].cycle)) == list(range(9))
        assert set(lines[lines.stage == "05_synthesize"].provider) == {arm}  # each arm's own generator
        assert sorted(set(lines[lines.stage == "04_evaluate"].cycle)) == list(range(1, 10))
        assert lines.usd.sum() > 0


def test_a_file_gives_its_split_in_a_column(tmp_path):
    path = tmp_path / "coverage.jsonl"
    rows = [{**_row("train", "Coding", i), "split": "train"} for i in range(3)]
    rows += [{**_row("test", "Coding", 0), "split": "test"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = CoverageConfig(source=str(path), splits=GivenSplits(), split_column="split")
    result = build_coverage(cfg, seed=1)
    assert [r["id"] for r in result.test] == ["test-Coding-0"] and len(result.train) == 3

    rows[1]["split"] = "validation"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataFileError) as err:
        build_coverage(cfg, seed=1)
    assert (err.value.row, err.value.field) == (2, "split")
    assert "'validation' is neither 'train' (train) nor 'test' (test)" in str(err.value)


def test_a_train_row_repeating_a_test_prompt_is_dropped_and_reported(tmp_path):
    from datasets import Dataset, DatasetDict

    leak = {**_row("test", "Coding", 0), "prompt_id": "leaky"}
    train, test = [_row("train", "Coding", 0), leak], [_row("test", "Coding", 0)]
    folder = tmp_path / "leaky"
    DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)}).save_to_disk(
        str(folder)
    )
    lenient = CoverageConfig(source=str(folder), splits=GivenSplits(), strictness="lenient")
    result = build_coverage(lenient, seed=1)
    assert [r["id"] for r in result.train] == ["train-Coding-0"]
    assert [r["id"] for r in result.test] == ["test-Coding-0"]
    assert [(s["id"], s["row"]) for s in result.report["skipped_rows"]] == [("leaky", 2)]
    with pytest.raises(DataFileError, match="duplicate prompt"):
        build_coverage(CoverageConfig(source=str(folder), splits=GivenSplits()), seed=1)
    with pytest.raises(DataFileError, match="no split named 'validation'"):
        build_coverage(CoverageConfig(source=str(folder), splits=GivenSplits(test="validation")), seed=1)


def test_the_current_models_configuration_is_the_paper_one_with_two_models_replaced():
    """`params/paper_gemma7b_current.yaml` extends the paper configuration: the retired Claude 3 Sonnet and
    Gemini 1.5 Flash replaced by models a user can call today, every other setting the paper configuration's."""
    from llamaduo_nb import forecast

    paper, current = load_config(PAPER), load_config(PROJECT_ROOT / "params" / "paper_gemma7b_current.yaml")
    paper_dict, current_dict = paper.to_dict(), current.to_dict()
    assert {k for k in paper_dict if paper_dict[k] != current_dict[k]} == {"run_name", "providers"}
    models = {p.name: p.model for p in current.providers}
    assert models == {
        "gpt4o": "gpt-4o-2024-08-06",
        "claude": "claude-sonnet-4-5",
        "gemini": "gemini-2.5-flash",
    }
    for before, after in zip(paper.providers, current.providers, strict=True):  # rates, keys, kinds: kept
        assert (before.kind, before.rpm, before.api_key_env) == (after.kind, after.rpm, after.api_key_env)
    assert current.provider("gemini").thinking_budget == 0
    costs = forecast.forecast_run(current).groupby("provider").usd.sum()
    assert costs["claude"] > 0 and costs["gemini"] > 0  # priced: no model at $0 by accident
