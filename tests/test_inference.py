"""03_batch_inference on the real embedded SmolLM2 student with a real (untrained) LoRA adapter.

The adapter is made with PEFT directly rather than by training, which 02's tests already cover; the
notebook is executed through Papermill once and the tests read what it wrote.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from tinyrun import TEST, make_tiny_run

from llamaduo_nb import inference, student
from llamaduo_nb.config import load_config
from llamaduo_nb.jsonio import DataFileError, read_json, read_jsonl, write_jsonl
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.runner import PROJECT_ROOT, execute_notebook
from llamaduo_nb.schemas import load_test_rows

K = 2


def save_untrained_adapter(layout: RunLayout, cycle: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamaduo_nb.embedded import resolve_model_path
    from llamaduo_nb.student import quiet_peft_deprecations

    path = resolve_model_path(load_config(layout.params_file).student.model_id)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    with quiet_peft_deprecations():
        model = get_peft_model(base, lora)
    model.save_pretrained(layout.adapter_dir(cycle))
    AutoTokenizer.from_pretrained(path).save_pretrained(layout.adapter_dir(cycle))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    layout = make_tiny_run(
        tmp_path_factory.mktemp("inf") / "tiny",
        inference_overrides={"k": K, "max_new_tokens": 16, "engine": "transformers"},
    )
    save_untrained_adapter(layout, 0)
    execute_notebook(
        PROJECT_ROOT / "notebooks" / "03_batch_inference.ipynb",
        layout.notebook_out("03_batch_inference", 0),
        {"run_dir": str(layout.root), "cycle": 0},
    )
    return layout, read_jsonl(layout.responses_file(0))


@pytest.fixture(scope="module")
def model_and_tokenizer(run):
    layout, _ = run
    model, tokenizer, _ = student.load_model(load_config(layout.params_file), layout.adapter_dir(0))
    return model, tokenizer


@pytest.mark.slow
def test_k_rows_per_test_prompt_with_distinct_sample_index(run):
    layout, rows = run
    by_prompt = defaultdict(list)
    for row in rows:
        by_prompt[row["prompt_id"]].append(row["sample_index"])
    assert set(by_prompt) == {f"test-{i}" for i in range(len(TEST))}
    assert all(sorted(indices) == list(range(K)) for indices in by_prompt.values())
    first = rows[0]
    assert (first["instruction"], first["reference"], first["category"]) == TEST[0]
    assert first["model_id"] == "embedded:smollm2" and first["adapter"] == "cycle_00/adapter"
    assert first["generation"]["seed"] == 1234 and first["generation"]["temperature"] == 0.7
    assert first["generation"]["k"] == K and first["generation"]["engine"] == "transformers"
    assert all(isinstance(row["candidate"], str) and 1 <= row["output_tokens"] <= 16 for row in rows)

    summary = read_json(layout.inference_summary(0))
    assert summary["rows"] == len(TEST) * K
    assert summary["tokens_generated"] == sum(row["output_tokens"] for row in rows)
    assert summary["engine"] == "transformers" and summary["tokens_per_s"] > 0
    assert layout.output_lengths_plot(0).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_same_seed_gives_the_same_answers(run):
    layout, notebook_rows = run
    inference.generate_responses(load_config(layout.params_file), layout, 0, progress=False)
    again = read_jsonl(layout.responses_file(0))
    assert [r["candidate"] for r in again] == [r["candidate"] for r in notebook_rows]


@pytest.mark.slow
def test_candidates_are_the_decoded_token_ids_after_the_prompt(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    instructions = ["Say hi.", "Name three colours of the rainbow, separated by commas."]
    out = student.sample_batch(
        model, tokenizer, instructions, k=K, temperature=0.7, top_p=0.9, max_new_tokens=12, seed=7
    )
    length = out.prompt_length
    short = student.prompt_token_ids(tokenizer, instructions[0])
    assert length == len(student.prompt_token_ids(tokenizer, instructions[1])) > len(short)
    # left padding: the shorter prompt ends where the longer one does, right before the answers
    assert out.prompt_ids[0, length - len(short) :].tolist() == short
    assert out.attention_mask[0, : length - len(short)].sum() == 0
    stops = set(student.stop_token_ids(model, tokenizer))
    for b in range(len(instructions)):
        for j in range(K):
            seq = out.sequences[b * K + j]
            assert seq[:length].tolist() == out.prompt_ids[b].tolist()
            n = out.output_tokens[b][j]
            generated = seq[length : length + n].tolist()
            assert out.candidates[b][j] == tokenizer.decode(generated, skip_special_tokens=True).strip()
            assert (generated[-1] in stops) == (out.finish_reasons[b][j] == "stop")
            assert "<|im_start|>" not in out.candidates[b][j] and "<|im_end|>" not in out.candidates[b][j]


@pytest.mark.slow
def test_shared_prompt_cache_gives_the_same_tokens_as_repeating_the_prompt(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    instructions = [
        "What is the capital of Spain?",
        "Classify the sentiment: the film was dull and too long.",
    ]
    # A near-zero temperature samples the argmax whatever the random draw: any difference would come from
    # the copied KV cache, not from the sampler.
    common = {"k": K, "temperature": 1e-3, "top_p": 1.0, "max_new_tokens": 10, "seed": 3}
    shared = student.sample_batch(model, tokenizer, instructions, share_prompt_cache=True, **common)
    repeated = student.sample_batch(model, tokenizer, instructions, share_prompt_cache=False, **common)
    assert shared.sequences.tolist() == repeated.sequences.tolist()
    assert shared.candidates == repeated.candidates


@pytest.mark.slow
def test_temperature_zero_gives_k_identical_greedy_answers(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    out = student.sample_batch(
        model, tokenizer, ["Say hello."], k=3, temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0
    )
    assert len(out.candidates[0]) == 3 and len(set(out.candidates[0])) == 1


def test_a_test_row_without_instruction_is_reported_with_file_row_and_field(tmp_path):
    path = tmp_path / "test.jsonl"
    write_jsonl(path, [{"id": "a", "instruction": "Hi", "response": "Hello"}, {"id": "b", "response": "x"}])
    with pytest.raises(DataFileError) as err:
        load_test_rows(path)
    assert (err.value.row, err.value.field) == (2, "instruction")


def test_engine_auto_is_llamacpp_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert student.resolve_engine("auto") == "llamacpp"
    assert student.resolve_engine("transformers") == "transformers"
    with pytest.raises(ValueError, match="vllm|CUDA"):
        student.resolve_engine("vllm")


# --------------------------------------------------------------------------- the llama.cpp engine


def perturbed_adapter(layout: RunLayout, cycle: int) -> None:
    """An adapter whose merge changes the model (B != 0), so the GGUF must carry the merged weights."""
    import torch

    save_untrained_adapter(layout, cycle)
    from safetensors.torch import load_file, save_file

    path = layout.adapter_dir(cycle) / "adapter_model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in tensors.items():
        if "lora_B" in name:
            tensors[name] = torch.randn(tensor.shape, generator=generator) * 0.02
    save_file(tensors, path)


def _generate(layout: RunLayout, engine: str, **overrides) -> tuple[dict, list[dict]]:
    import dataclasses

    cfg = load_config(layout.params_file)
    cfg = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, engine=engine, **overrides))
    summary = inference.generate_responses(cfg, layout, 0, progress=False)
    return summary, read_jsonl(layout.responses_file(0))


@pytest.fixture(scope="module")
def llamacpp_run(tmp_path_factory):
    layout = make_tiny_run(
        tmp_path_factory.mktemp("infcpp") / "tiny", inference_overrides={"k": K, "max_new_tokens": 24}
    )
    perturbed_adapter(layout, 0)
    return layout


@pytest.mark.slow
def test_llamacpp_greedy_answers_are_the_transformers_answers(llamacpp_run):
    """With the GGUF and the KV cache in F16 (the defaults, Q8_0, are the served model's; not exact)."""
    layout = llamacpp_run
    _, torch_rows = _generate(layout, "transformers", temperature=0.0)
    summary, cpp_rows = _generate(
        layout, "llamacpp", temperature=0.0, llamacpp_gguf="f16", llamacpp_kv_cache="f16"
    )
    assert summary["engine"] == "llamacpp" and summary["adapter_merged"] is True
    assert summary["gguf_type"] == "f16" and summary["gguf"].endswith("model-f16.gguf")
    # the merged full-precision weights were scratch for the export: only the GGUF stays in the cycle
    assert not layout.cycle_merged_dir(0).exists() and not list(
        layout.cycle_dir(0).glob("**/model.safetensors")
    )
    assert [(r["prompt_id"], r["sample_index"]) for r in cpp_rows] == [
        (r["prompt_id"], r["sample_index"]) for r in torch_rows
    ]
    assert [r["candidate"] for r in cpp_rows] == [r["candidate"] for r in torch_rows]
    assert [(r["output_tokens"], r["finish_reason"]) for r in cpp_rows] == [
        (r["output_tokens"], r["finish_reason"]) for r in torch_rows
    ]
    assert any(r["candidate"] for r in cpp_rows)


@pytest.mark.slow
def test_llamacpp_returns_k_samples_per_prompt_with_the_transformers_schema(llamacpp_run):
    layout = llamacpp_run
    _, torch_rows = _generate(layout, "transformers")
    summary, rows = _generate(layout, "llamacpp")
    assert set(rows[0]) == set(torch_rows[0])
    assert set(rows[0]["generation"]) == set(torch_rows[0]["generation"])
    assert {(r["generation"]["gguf_type"], r["generation"]["kv_cache"]) for r in rows} == {("q8_0", "q8_0")}
    assert {(r["generation"]["gguf_type"], r["generation"]["kv_cache"]) for r in torch_rows} == {(None, None)}
    by_prompt = defaultdict(list)
    for row in rows:
        by_prompt[row["prompt_id"]].append(row["sample_index"])
    assert by_prompt == {f"test-{i}": list(range(K)) for i in range(len(TEST))}
    generation = rows[0]["generation"]
    assert generation["engine"] == "llamacpp" and generation["temperature"] == 0.7
    assert (generation["top_p"], generation["top_k"], generation["min_p"], generation["repeat_penalty"]) == (
        0.9, 0, 0.0, 1.0,
    )  # fmt: skip
    assert all(isinstance(r["candidate"], str) and 1 <= r["output_tokens"] <= 24 for r in rows)
    assert summary["rows"] == len(TEST) * K and summary["tokens_per_s"] > 0
    # the export is the default type (Q8_0, what 06 serves), made once per adapter and reused by the next run
    assert summary["gguf_type"] == "q8_0" and summary["kv_cache"] == "q8_0"
    marker = read_json(layout.cycle_gguf_marker(0, "q8_0"))
    assert layout.cycle_gguf(0, "q8_0").is_file() and marker["qtype"] == "q8_0"
    again_summary, again = _generate(layout, "llamacpp")
    assert again_summary["gguf_built_now"] is False and len(again) == len(rows)


def test_notebook_is_committed_without_outputs():
    book = json.loads((PROJECT_ROOT / "notebooks" / "03_batch_inference.ipynb").read_text())
    assert book["metadata"]["kernelspec"]["name"] == "llamaduo-nb"
    for cell in book["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
