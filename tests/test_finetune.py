"""02_finetune: the cycle's data, the loss mask and the notebook, on the real embedded SmolLM2 student.

One tiny run (6 short rows, 2 optimizer steps, max_length 128) is trained once through Papermill; the
tests read what it wrote.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
from tinyrun import TEST, TRAIN, coverage_rows, make_tiny_run

from llamaduo_nb import finetune
from llamaduo_nb.jsonio import DataFileError, read_json, read_jsonl, write_jsonl
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.runner import PROJECT_ROOT, execute_notebook


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> RunLayout:
    layout = make_tiny_run(tmp_path_factory.mktemp("ft") / "tiny")
    execute_notebook(
        PROJECT_ROOT / "notebooks" / "02_finetune.ipynb",
        layout.notebook_out("02_finetune", 0),
        {"run_dir": str(layout.root), "cycle": 0},
    )
    return layout


# --------------------------------------------------------------------------- the data of a cycle (no model)


def test_cycle_data_is_train_split_plus_synthetic_rows_of_earlier_cycles(tmp_path):
    layout = RunLayout(tmp_path / "run")
    write_jsonl(layout.train_file, coverage_rows(TRAIN, "train-"))
    synthetic = [{**row, "source": "synthetic", "lineage": {"seed_id": "train-0", "cycle": 0}}
                 for row in coverage_rows(TEST, "syn0-")]  # fmt: skip
    write_jsonl(layout.synthetic_file(0), synthetic)
    write_jsonl(
        layout.synthetic_file(2), coverage_rows(TRAIN[:1], "syn2-")
    )  # a later cycle: not used by cycle 2

    data = finetune.build_train_data(layout, 2)

    assert data.by_origin == {"coverage": len(TRAIN), "synthetic/cycle_00": len(TEST)}
    assert data.missing_synthetic == [1]
    written = read_jsonl(layout.train_data_file(2))
    assert [row["id"] for row in written] == [f"train-{i}" for i in range(len(TRAIN))] + ["syn0-0", "syn0-1"]
    assert written[-1]["lineage"] == {"seed_id": "train-0", "cycle": 0}
    assert finetune.build_train_data(layout, 0).by_origin == {"coverage": len(TRAIN)}


def test_a_row_without_response_is_reported_with_file_row_and_field(tmp_path):
    layout = RunLayout(tmp_path / "run")
    rows = coverage_rows(TRAIN, "train-")
    rows[3]["response"] = "  "
    write_jsonl(layout.train_file, rows)
    with pytest.raises(DataFileError) as err:
        finetune.build_train_data(layout, 0)
    assert (err.value.path, err.value.row, err.value.field) == (str(layout.train_file), 4, "response")


def test_lora_shape_follows_table5_unless_set():
    from llamaduo_nb.config import FinetuneConfig

    assert finetune.lora_shape(FinetuneConfig(), 200)[:2] == (8, 16)
    assert finetune.lora_shape(FinetuneConfig(), 30_000)[:2] == (16, 32)
    assert finetune.lora_shape(FinetuneConfig(), 100_000)[:2] == (32, 64)
    assert finetune.lora_shape(FinetuneConfig(lora_r=4), 100_000)[:2] == (4, 8)
    assert finetune.lora_shape(FinetuneConfig(lora_r=4, lora_alpha=32), 10)[:2] == (4, 32)


def test_quantization_auto_is_plain_lora_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert finetune.resolve_quantization("auto") == "none"
    with pytest.raises(ValueError, match="CUDA"):
        finetune.resolve_quantization("4bit")


# --------------------------------------------------------------------------- the notebook run


@pytest.mark.slow
def test_notebook_saves_an_adapter_that_loads_on_the_base(trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = trained.adapter_dir(0)
    config = read_json(adapter / "adapter_config.json")
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    assert (adapter / "tokenizer_config.json").is_file()
    assert trained.notebook_out("02_finetune", 0).is_file()

    summary = read_json(trained.train_summary(0))
    base = AutoModelForCausalLM.from_pretrained(summary["base_model"]["path"], dtype=torch.float32)
    with finetune.quiet_peft_deprecations():
        model = PeftModel.from_pretrained(base, adapter)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b, "no LoRA weights were loaded"
    # LoRA's B matrices start at zero: any non-zero entry means the two optimizer steps were taken and saved.
    assert any(p.abs().sum() > 0 for p in lora_b)


@pytest.mark.slow
def test_training_log_loss_plot_and_summary(trained):
    log = read_jsonl(trained.train_log(0))
    assert [row["step"] for row in log] == [1, 2]
    assert all(math.isfinite(row["loss"]) and row["loss"] > 0 for row in log)
    assert trained.loss_plot(0).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = read_json(trained.train_summary(0))
    assert summary["rows"] == len(TRAIN) and summary["rows_by_origin"] == {"coverage": len(TRAIN)}
    assert summary["steps"] == 2
    assert summary["tokens"] > 0 and summary["tokens_per_s"] > 0 and summary["wall_time_s"] > 0
    assert (summary["lora"]["r"], summary["lora"]["alpha"]) == (8, 16)
    assert summary["quantization"] in ("none", "4bit") and summary["device"]
    assert summary["loss_mask"]["rows_checked"] == len(TRAIN)
    assert len(read_jsonl(trained.train_data_file(0))) == len(TRAIN)


@pytest.mark.slow
def test_prompt_tokens_are_labelled_minus_100_and_answers_are_learned(trained):
    from llamaduo_nb.config import load_config

    plan = finetune.prepare(load_config(trained.params_file), trained, 0)
    shutil.rmtree(plan.scratch_dir, ignore_errors=True)
    tokenizer = plan.tokenizer
    dataset = plan.trainer.train_dataset
    assert len(dataset) == len(TRAIN)
    for i, (question, answer, _) in enumerate(TRAIN):
        example = dataset[i]
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )["input_ids"]
        ids, labels = example["input_ids"], example["labels"]
        assert ids[: len(prompt)] == list(prompt)
        assert set(labels[: len(prompt)]) == {-100}, f"row {i}: a prompt token is in the loss"
        learned = labels[len(prompt) :]
        assert learned == ids[len(prompt) :]
        assert tokenizer.decode(learned, skip_special_tokens=True).strip() == answer
        assert tokenizer.eos_token_id in learned, (
            "the end-of-turn token must be learned, or the model never stops"
        )


def test_notebook_is_committed_without_outputs():
    book = json.loads((PROJECT_ROOT / "notebooks" / "02_finetune.ipynb").read_text())
    assert book["metadata"]["kernelspec"]["name"] == "llamaduo-nb"
    for cell in book["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    tagged = [c for c in book["cells"] if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1


@pytest.mark.slow
def test_continue_from_previous_starts_from_the_last_cycles_adapter(trained):
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from llamaduo_nb.config import load_config

    cfg = load_config(trained.params_file)
    cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, continue_from_previous=True))
    plan = finetune.prepare(cfg, trained, 1)
    shutil.rmtree(plan.scratch_dir, ignore_errors=True)
    assert plan.init_from == "adapter of cycle 0"
    saved = {
        k: v
        for k, v in load_file(trained.adapter_dir(0) / "adapter_model.safetensors").items()
        if "lora_B" in k
    }
    current = {
        name.replace(".default", ""): p
        for name, p in plan.trainer.model.named_parameters()
        if "lora_B" in name
    }
    assert saved and set(saved) == set(current)
    assert all(p.requires_grad for p in current.values())
    for name, tensor in saved.items():  # cycle 1 starts from exactly the weights cycle 0 saved
        assert torch.equal(current[name].detach().cpu(), tensor), name
