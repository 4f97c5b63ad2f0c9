"""A tiny run folder as 01_coverage would leave it, shared by the 02 and 03 tests."""

from __future__ import annotations

from pathlib import Path

import yaml

from llamaduo_nb.config import RunConfig, build, dump_config
from llamaduo_nb.jsonio import write_jsonl
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.runner import PROJECT_ROOT

TRAIN = [
    ("What is the capital of France?", "Paris.", "Closed QA"),
    ("Classify the sentiment: I love this song.", "Positive", "Classification"),
    ("Write a Python expression that doubles x.", "x * 2", "Coding"),
    (
        "Summarize: The meeting moved to Friday because the room was booked.",
        "The meeting is on Friday.",
        "Summarization",
    ),
    ("What colour is the sky on a clear day?", "Blue.", "Closed QA"),
    ("Classify the sentiment: The food was cold and bland.", "Negative", "Classification"),
]
TEST = [
    ("What is the capital of Italy?", "Rome.", "Closed QA"),
    ("Classify the sentiment: What a wonderful day!", "Positive", "Classification"),
]


def coverage_rows(items: list[tuple[str, str, str]], prefix: str) -> list[dict]:
    return [
        {"id": f"{prefix}{i}", "instruction": q, "response": a, "category": c, "source": "tests"}
        for i, (q, a, c) in enumerate(items)
    ]


def make_tiny_run(
    root: Path,
    finetune_overrides: dict | None = None,
    inference_overrides: dict | None = None,
    student_overrides: dict | None = None,
) -> RunLayout:
    """A run folder as 01_coverage would leave it: params.yaml (demo params, tiny sizes) + train/test splits."""
    data = yaml.safe_load((PROJECT_ROOT / "params" / "demo.yaml").read_text())
    data["student"] = {**data["student"], **(student_overrides or {})}
    data["run_name"] = root.name
    data["outputs_dir"] = str(root.parent)
    data["finetune"] = {"max_steps": 2, "max_length": 128, "per_device_batch_size": 2, "logging_steps": 1,
                        **(finetune_overrides or {})}  # fmt: skip
    data["inference"] = {"k": 2, "max_new_tokens": 16, "batch_size": 2, "temperature": 0.7, "top_p": 0.9,
                         **(inference_overrides or {})}  # fmt: skip
    layout = RunLayout(root)
    dump_config(build(RunConfig, data, source="tests"), layout.params_file)
    write_jsonl(layout.train_file, coverage_rows(TRAIN, "train-"))
    write_jsonl(layout.test_file, coverage_rows(TEST, "test-"))
    return layout


def tiny_templateless_llama(folder: Path) -> Path:
    """A tiny random Llama (1 layer, hidden 32) with the embedded SmolLM2 tokenizer, saved without any chat
    template (as a base checkpoint such as google/gemma-7b may come): a second, cheap student for tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llamaduo_nb.embedded import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2"))
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
