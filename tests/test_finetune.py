"""02_finetune: the cycle's data, the loss mask and the notebook, on the real embedded SmolLM2 student.

One tiny run (6 short rows, 2 optimizer steps, max_length 128) is trained once through Papermill; the
tests read what it wrote.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
from tinyrun import TEST, TRAIN, coverage_rows, make_tiny_run, tiny_templateless_llama

from llamaduo_nb import finetune, student
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


@pytest.mark.parametrize(
    ("start_from", "effective", "last_chain"),
    [
        # a fresh LoRA on the base each cycle: the shipped adapter has this cycle's Table-5 rank
        ("base", [8, 16, 32], [{"cycle": 2, "rank": 32}]),
        # cycle 0's LoRA trained further: its rank stays whatever Table 5 says for later volumes
        ("previous_adapter", [8, 8, 8], [{"cycle": 0, "rank": 8}]),
        # eq. 1 with a fresh LoRA per cycle on the merged model: the ranks add up
        (
            "previous_merged",
            [8, 24, 56],
            [{"cycle": 0, "rank": 8}, {"cycle": 1, "rank": 16}, {"cycle": 2, "rank": 32}],
        ),
    ],
)
def test_effective_rank_over_a_three_cycle_chain(start_from, effective, last_chain):
    chain, ranks = None, []
    for cycle, table5_rank in enumerate([8, 16, 32]):
        chain = finetune.rank_chain(start_from, cycle, table5_rank, chain)
        ranks.append(finetune.effective_rank(chain))
    assert ranks == effective and chain == last_chain


def test_the_paper_configurations_stacked_rank_at_256k_is_160_where_table_5_says_32():
    """previous_merged over the paper's loop: cycle 0 on the 395 coverage rows, cycles 1..9 adding 1K ... 256K."""
    from llamaduo_nb.config import table5_lora

    chain = None
    for cycle in range(10):
        rows = 395 + (1000 * 2 ** (cycle - 1) if cycle else 0)
        chain = finetune.rank_chain("previous_merged", cycle, table5_lora(rows)[0], chain)
    assert table5_lora(395 + 256_000)[0] == 32
    assert finetune.effective_rank(chain) == 160 and len(chain) == 10
    assert finetune.rank_text(chain).startswith("160 (8 + 8 + ")


def test_a_chain_needs_the_previous_cycles_chain():
    with pytest.raises(ValueError, match="needs cycle 1's rank chain"):
        finetune.rank_chain("previous_merged", 2, 8, None)


def test_quantization_auto_is_plain_lora_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert student.resolve_quantization("auto") == "none"
    with pytest.raises(ValueError, match="CUDA"):
        student.resolve_quantization("4bit")


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
    with student.quiet_peft_deprecations():
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
    assert (summary["lora_rank"], summary["effective_rank"]) == (8, 8)
    assert summary["rank_chain"] == [{"cycle": 0, "rank": 8}]
    assert (summary["num_processes"], summary["global_batch_size"]) == (1, 2)
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


def _with_finetune(layout: RunLayout, **changes):
    import dataclasses

    from llamaduo_nb.config import load_config

    cfg = load_config(layout.params_file)
    return dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, **changes))


@pytest.mark.slow
def test_start_from_previous_adapter_trains_the_last_cycles_adapter_further(trained):
    import torch
    from safetensors.torch import load_file

    plan = finetune.prepare(_with_finetune(trained, start_from="previous_adapter"), trained, 1)
    shutil.rmtree(plan.scratch_dir, ignore_errors=True)
    assert plan.init_from == "adapter of cycle 0, trained further"
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


MODULE = "model.layers.0.self_attn.q_proj"


def _lora_delta(adapter_dir, module: str = MODULE):
    """scaling * B @ A of one module of a saved adapter."""
    from safetensors.torch import load_file

    config = read_json(adapter_dir / "adapter_config.json")
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    a = weights[f"base_model.model.{module}.lora_A.weight"].float()
    b = weights[f"base_model.model.{module}.lora_B.weight"].float()
    return (config["lora_alpha"] / config["r"]) * b @ a, config


@pytest.mark.slow
def test_start_from_previous_merged_builds_on_the_last_cycles_model_with_a_new_rank(trained):
    """Eq. 1 with the Table-5 rank change: cycle 1 starts from cycle 0's model (adapter merged into the
    base) with a fresh LoRA of another rank, and saves one adapter that reproduces what it trained."""
    import torch
    from safetensors.torch import load_file

    cfg = _with_finetune(trained, start_from="previous_merged", lora_r=4, lora_alpha=8, max_steps=1)
    base_path = read_json(trained.train_summary(0))["base_model"]["path"]
    base = load_file(f"{base_path}/model.safetensors")[f"{MODULE}.weight"].float()
    delta0, config0 = _lora_delta(trained.adapter_dir(0))
    assert config0["r"] == 8 and delta0.abs().sum() > 0

    plan = finetune.prepare(cfg, trained, 1)
    assert plan.stacked_on == trained.adapter_dir(0) and (plan.lora_r, plan.lora_alpha) == (4, 8)
    layer = plan.trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    # The base weights now hold cycle 0's model; the new LoRA starts as a no-op (B = 0) of rank 4.
    torch.testing.assert_close(layer.base_layer.weight.detach().float(), base + delta0, rtol=0, atol=1e-6)
    assert layer.lora_A["default"].weight.shape[0] == 4
    assert layer.lora_B["default"].weight.abs().sum() == 0

    summary = finetune.train(cfg, trained, plan)
    trained_weight = (
        layer.base_layer.weight.detach().float()
        + layer.scaling["default"]
        * layer.lora_B["default"].weight.detach().float()
        @ layer.lora_A["default"].weight.detach().float()
    )
    delta1, config1 = _lora_delta(trained.adapter_dir(1))
    assert (config1["r"], config1["lora_alpha"]) == (12, 12)  # 8 (cycle 0) stacked with 4 (cycle 1)
    assert summary["lora"]["saved"] == {"r": 12, "alpha": 12, "ranks": [8, 4]}
    assert (summary["lora_rank"], summary["effective_rank"]) == (4, 12)
    assert summary["rank_chain"] == [{"cycle": 0, "rank": 8}, {"cycle": 1, "rank": 4}]
    assert summary["start_from"] == "previous_merged"
    # The saved adapter on the plain base is the model that was trained, and it moved past cycle 0.
    torch.testing.assert_close(base + delta1, trained_weight, rtol=0, atol=1e-5)
    assert not torch.allclose(delta1, delta0, atol=1e-7)


def test_stacking_two_adapters_adds_their_updates(tmp_path):
    import torch
    from safetensors.torch import save_file

    from llamaduo_nb.jsonio import write_json

    torch.manual_seed(0)
    key = "base_model.model.layer.q"
    folders = []
    for name, r, alpha, rslora in (("low", 2, 4, False), ("up", 3, 9, True)):
        folder = tmp_path / name
        folder.mkdir()
        save_file(
            {f"{key}.lora_A.weight": torch.randn(r, 5), f"{key}.lora_B.weight": torch.randn(7, r)},
            str(folder / "adapter_model.safetensors"),
        )
        write_json(
            folder / "adapter_config.json",
            {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": ["q"], "peft_type": "LORA"},
        )
        folders.append(folder)
    out = tmp_path / "stacked"
    assert student.stack_adapters(folders[0], folders[1], out) == {"r": 5, "alpha": 5, "ranks": [2, 3]}

    def delta(folder):
        from safetensors.torch import load_file

        config = read_json(folder / "adapter_config.json")
        w = load_file(folder / "adapter_model.safetensors")
        scale = config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])
        return scale * w[f"{key}.lora_B.weight"] @ w[f"{key}.lora_A.weight"]

    torch.testing.assert_close(delta(out), delta(folders[0]) + delta(folders[1]))


# --------------------------------------------------------------------------- chat template and tracking


@pytest.fixture(scope="module")
def templateless_student(tmp_path_factory):
    """A tiny random Llama with the embedded SmolLM2 tokenizer, saved without any chat template (as a
    base checkpoint such as google/gemma-7b may come)."""
    from transformers import AutoTokenizer

    folder = tiny_templateless_llama(tmp_path_factory.mktemp("templateless") / "student")
    assert not AutoTokenizer.from_pretrained(folder).chat_template
    return folder


def test_a_checkpoint_without_chat_template_is_refused_unless_params_give_one(templateless_student):
    from llamaduo_nb.config import ConfigError, StudentConfig

    with pytest.raises(ConfigError, match="student.chat_template: gemma"):
        student.load_student(StudentConfig(model_id=str(templateless_student)))
    # Gemma's end-of-turn token is not in this vocabulary: the preset is refused rather than half-applied.
    with pytest.raises(ConfigError, match="<end_of_turn>"):
        student.load_student(StudentConfig(model_id=str(templateless_student), chat_template="gemma"))

    _, tokenizer, _ = student.load_student(
        StudentConfig(model_id=str(templateless_student), chat_template="chatml")
    )
    messages = [{"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.eos_token == "<|im_end|>"

    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    _, tokenizer, _ = student.load_student(
        StudentConfig(model_id=str(templateless_student), chat_template=jinja)
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "[user] Hi\n"


def test_params_template_trains_and_ships_with_the_adapter_and_tensorboard_logs_the_run(
    templateless_student, tmp_path
):
    from transformers import AutoTokenizer

    pytest.importorskip("tensorboard", reason="finetune.report_to: tensorboard needs the tensorboard package")
    layout = make_tiny_run(
        tmp_path / "templ",
        finetune_overrides={"max_steps": 2, "report_to": ["tensorboard"]},
        student_overrides={"model_id": str(templateless_student), "chat_template": "chatml"},
    )
    from llamaduo_nb.config import load_config

    cfg = load_config(layout.params_file)
    plan = finetune.prepare(cfg, layout, 0)
    assert plan.loss_mask["rows_checked"] == len(TRAIN)  # prompt masked, answer + <|im_end|> learned
    summary = finetune.train(cfg, layout, plan)
    assert summary["chat_template"] == "params preset chatml" and summary["report_to"] == ["tensorboard"]
    shipped = AutoTokenizer.from_pretrained(layout.adapter_dir(0))
    assert shipped.chat_template == student.CHAT_TEMPLATES["chatml"][0]
    assert shipped.eos_token == "<|im_end|>"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(layout.tracking_dir(0).rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {layout.tracking_dir(0)}"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    assert [event.step for event in losses] == [1, 2]


def test_a_tracker_that_is_not_installed_is_named(monkeypatch):
    import importlib.util

    from llamaduo_nb.config import ConfigError, FinetuneConfig, build

    missing = [
        name
        for name, package in finetune.TRACKER_PACKAGES.items()
        if importlib.util.find_spec(package) is None
    ]
    if not missing:
        pytest.skip("every tracker package is installed here")
    with pytest.raises(ConfigError, match=f"pip install {finetune.TRACKER_PACKAGES[missing[0]]}"):
        finetune.tracking_backends([missing[0]])
    with pytest.raises(ConfigError, match="'neptune' is not one of"):
        build(FinetuneConfig, {"report_to": ["neptune"]})
    assert finetune.tracking_backends("none") == []
