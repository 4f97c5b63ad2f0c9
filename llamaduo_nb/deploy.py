"""06_deploy: ship the student of one cycle as files and an endpoint people already know how to use.

Steps, each a function the notebook calls:

1. `select_cycle` — the first cycle whose decision met epsilon, or the best one by the decision value.
2. `merge_adapter` — the cycle's LoRA adapter merged into the base weights (peft `merge_and_unload`),
   saved as a plain Hugging Face folder (safetensors, tokenizer, chat template, generation config), with a
   model card written from the run (`write_model_card`).
3. `export_gguf` — GGUF files for llama.cpp / Ollama. The built-in exporter covers llama-architecture
   students with a byte-level BPE tokenizer (the embedded SmolLM2; Llama-3-style models with
   `deploy.gguf_tokenizer_pre: llama-bpe`): it writes the tensors with the `gguf` package (`GGUFWriter`,
   `TensorNameMap`, `SpecialVocab`, `quants`) after undoing the Hugging Face rotary permutation of the q/k
   projections. For the embedded student its F16 and Q8_0 tensors were checked byte for byte against
   llama.cpp's own `convert_hf_to_gguf.py` (llama-cpp-python 0.3.36 sdist): identical. Other students
   (e.g. Gemma) are converted by that script when `deploy.convert_script` names it. Every export is
   checked: llama.cpp must tokenize probe texts exactly like the Hugging Face tokenizer.
4. `write_modelfile` (Ollama) and `write_vllm_script` (GPU users; generated, not run here).
5. Parity: `greedy_parity` compares greedy answers of the in-process merged model with the served GGUF
   (exact-match rate per GGUF type, plus teacher-forced token agreement, which tells a single quantisation
   near-tie flip from a broken export); `judged_parity` re-answers the test prompts through the served
   endpoint, judges them with 04's judge functions and compares V and C@zeta (bootstrap CIs) with the
   evaluated cycle, flagging a drop of the decision statistic beyond `deploy.parity_tolerance`.
6. `push_to_hub` — optional upload when HF_TOKEN is set.

The served endpoint is reached through `ServicePool` like every other model, so its calls land in the
run's cache and ledger (at $0).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import RunConfig
from .embedded import EMBEDDED_PREFIX, LlamaServer, embedded_gguf_path, resolve_model_path
from .finetune import student_messages  # one definition of how a prompt is put to the student
from .jsonio import atomic_dir, atomic_write, read_json, read_jsonl, save_figure, write_json, write_jsonl
from .runlayout import RunLayout


class DeployError(RuntimeError):
    """06 cannot go on; the message says which file or setting and what to do."""


# --------------------------------------------------------------------------- 1. which cycle to ship


@dataclass(frozen=True)
class CycleChoice:
    cycle: int
    select: str
    reason: str
    value: float | None
    passed: bool


def _count_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def cycle_table(layout: RunLayout) -> pd.DataFrame:
    """One line per cycle folder: training rows, synthetic rows, decision value and verdict, adapter present."""
    records = []
    for cycle in layout.cycles():
        metrics_path = layout.metrics_file(cycle)
        decision = read_json(metrics_path).get("decision", {}) if metrics_path.is_file() else {}
        records.append(
            {
                "cycle": cycle,
                "train_rows": _count_lines(layout.train_data_file(cycle)),
                "synthetic_rows": _count_lines(layout.synthetic_file(cycle)),
                "statistic": f"{decision.get('statistic', '')}({decision.get('metric', '')})"
                if decision
                else "",
                "value": decision.get("value"),
                "epsilon": decision.get("epsilon"),
                "passed": bool(decision.get("passed", False)),
                "has_metrics": metrics_path.is_file(),
                "has_adapter": (layout.adapter_dir(cycle) / "adapter_config.json").is_file(),
            }
        )
    columns = [
        "cycle",
        "train_rows",
        "synthetic_rows",
        "statistic",
        "value",
        "epsilon",
        "passed",
        "has_metrics",
        "has_adapter",
    ]
    return pd.DataFrame(records, columns=columns)


def select_cycle(layout: RunLayout, select: str) -> CycleChoice:
    """The cycle to ship: `first_passing` (earliest that met epsilon, else the best) or `best` by value."""
    table = cycle_table(layout)
    usable = table[table["has_metrics"] & table["has_adapter"]]
    if usable.empty:
        raise DeployError(
            f"no cycle under {layout.root} has both an adapter (cycle_NN/adapter/adapter_config.json) and "
            "a metrics.json; run 02_finetune, 03_batch_inference and 04_evaluate for at least one cycle first"
        )
    if select not in ("first_passing", "best"):
        raise DeployError(f"deploy.select must be 'first_passing' or 'best', got {select!r}")
    if select == "first_passing":
        passing = usable[usable["passed"]]
        if not passing.empty:
            row = passing.iloc[0]
            return CycleChoice(
                int(row["cycle"]),
                select,
                f"cycle {int(row['cycle'])} is the first to meet epsilon "
                f"({row['value']:.2f} >= {row['epsilon']:g})",
                _num(row["value"]),
                True,
            )
    scored = usable.assign(sort_value=usable["value"].astype(float).fillna(-np.inf))
    best = scored.sort_values(["sort_value", "cycle"], ascending=[False, True]).iloc[0]
    value = _num(best["value"])
    shown = "n/a" if value is None else f"{value:.2f}"
    reason = f"cycle {int(best['cycle'])} has the best decision value ({shown})"
    if select == "first_passing":
        reason = f"no cycle met epsilon; shipping the best instead: {reason}"
    return CycleChoice(int(best["cycle"]), select, reason, value, bool(best["passed"]))


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else value


def plot_cycles(table: pd.DataFrame, choice: CycleChoice, path: str | Path):
    """Decision value per cycle, epsilon as a line, the shipped cycle highlighted; saved as PNG."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    values = table["value"].astype(float).fillna(0.0)
    colours = ["tab:orange" if c == choice.cycle else "tab:blue" for c in table["cycle"]]
    ax.bar(table["cycle"].astype(str), values, color=colours)
    epsilons = table["epsilon"].dropna()
    if not epsilons.empty:
        ax.axhline(
            float(epsilons.iloc[-1]), color="grey", ls="--", lw=1, label=f"epsilon = {epsilons.iloc[-1]:g}"
        )
        ax.legend(loc="lower right")
    ax.set(
        xlabel="cycle",
        ylabel=str(table["statistic"].iloc[0]) if len(table) else "value",
        ylim=(0, 100),
        title=f"Decision value per cycle (shipping cycle {choice.cycle})",
    )
    fig.tight_layout()
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- 2. merge + model card


@dataclass(frozen=True)
class MergeResult:
    path: Path
    base_model: str
    base_path: str
    adapter_dir: Path
    n_parameters: int
    dtype: str
    seconds: float


def merge_adapter(cfg: RunConfig, adapter_dir: str | Path, out_dir: str | Path) -> MergeResult:
    """Merge a cycle's LoRA adapter into the student base and save a standard HF folder at `out_dir`.

    The model is built exactly as 03 built it for the evaluated answers (`inference.load_model`: base in
    full precision, never 4-bit even after QLoRA training, adapter merged with peft's `merge_and_unload`,
    the adapter folder's tokenizer and chat template when 02 saved them), so what ships is what was judged.
    """
    from .inference import load_model

    t0 = time.monotonic()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DeployError(f"{adapter_dir} holds no adapter_config.json: not a PEFT adapter folder")
    merged, tokenizer, base_path = load_model(cfg, adapter_dir, merge=True)
    if not tokenizer.chat_template:
        raise DeployError(
            f"the student tokenizer ({adapter_dir} or {base_path}) has no chat template; the served model "
            "would not see prompts the way it was trained"
        )
    tokenizer.padding_side = "right"  # load_model pads left for batched generation; ship the library default
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return MergeResult(
        path=out_dir,
        base_model=cfg.student.model_id,
        base_path=str(base_path),
        adapter_dir=adapter_dir,
        n_parameters=int(sum(p.numel() for p in merged.parameters())),
        dtype=str(next(merged.parameters()).dtype).replace("torch.", ""),
        seconds=time.monotonic() - t0,
    )


# What the card says about licences we know; anything else tells the reader to check.
BASE_LICENCES: dict[str, tuple[str, str, str]] = {
    # model id prefix: (licence id, upstream model, note)
    "embedded:smollm2": (
        "apache-2.0",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2 is released by Hugging Face under the Apache License 2.0.",
    ),
    "HuggingFaceTB/SmolLM2": ("apache-2.0", "", "SmolLM2 is released under the Apache License 2.0."),
    "google/gemma": (
        "gemma",
        "",
        "Gemma weights are under Google's Gemma Terms of Use, which carry over to "
        "derivatives (including this merged model).",
    ),
    "meta-llama/": (
        "llama3",
        "",
        "Llama weights are under Meta's Llama Community License, which carries over "
        "to derivatives; check its naming and acceptable-use terms.",
    ),
    "mistralai/": (
        "apache-2.0",
        "",
        "Check the Mistral model's own card; most open Mistral weights are Apache-2.0.",
    ),
}


def base_licence(model_id: str) -> tuple[str, str, str]:
    """(licence id, upstream model id, note) for the card; unknown bases say so instead of guessing."""
    for prefix, (licence, upstream, note) in BASE_LICENCES.items():
        if model_id.startswith(prefix):
            return licence, upstream or model_id, note
    return (
        "other",
        model_id,
        f"The licence of the base model {model_id} was not recognised: check its model card.",
    )


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_(none)_"
    cells = frame.astype(object).where(frame.notna(), "")
    header = "| " + " | ".join(str(c) for c in cells.columns) + " |"
    rule = "|" + "|".join("---" for _ in cells.columns) + "|"
    rows = [
        "| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |"
        for row in cells.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows])


def _vc_table(layout: RunLayout) -> pd.DataFrame:
    """Per cycle and judge: `mean / C@zeta…` of precision and similarity, from each cycle's metrics.json."""
    records = []
    for cycle in layout.cycles():
        path = layout.metrics_file(cycle)
        if not path.is_file():
            continue
        metrics = read_json(path)
        zetas = metrics.get("zetas", [])
        for judge, entry in metrics.get("per_judge", {}).items():
            record = {"cycle": cycle, "judge": judge}
            for metric in ("precision", "similarity"):
                stats = entry.get(metric, {})
                if stats.get("mean") is None:
                    record[metric] = "n/a"
                    continue
                parts = [f"{stats['mean']:.1f}"] + [
                    f"{stats.get(f'c@{float(z):g}', float('nan')):.0f}%" for z in zetas
                ]
                record[metric] = " / ".join(parts)
            record["passed"] = metrics.get("decision", {}).get("passed")
            records.append(record)
    return pd.DataFrame(records)


def model_card(
    cfg: RunConfig, layout: RunLayout, choice: CycleChoice, merge: MergeResult | None = None
) -> str:
    """The README.md of the merged folder: what the model is, how it was made and measured, licences."""
    licence, upstream, licence_note = base_licence(cfg.student.model_id)
    judges = [
        f"{name} ({cfg.provider(name).kind}: `{cfg.provider(name).model}`)" for name in cfg.evaluate.judges
    ]
    teacher = cfg.provider(cfg.synthesize.generator)
    volumes = cycle_table(layout)[["cycle", "train_rows", "synthetic_rows", "value", "passed"]]
    zetas = "/".join(f"C@{z:g}" for z in cfg.evaluate.zetas)
    tags = ["llamaduo", "lora", "merged", "text-generation"]
    front = [
        "---",
        f"license: {licence}",
        f"base_model: {upstream}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        *[f"  - {t}" for t in tags],
        "---",
    ]
    size = f"{merge.n_parameters / 1e6:.0f}M parameters, {merge.dtype}" if merge else ""
    body = f"""
# {cfg.run_name}: {cfg.task}

A small local model that took over this task from service LLMs with the LlamaDuo method: LoRA
fine-tuning on a coverage dataset, judged by service LLMs, grown with synthetic data until the judges'
score met the threshold or the cycle budget ran out. This folder holds the LoRA adapter of
**cycle {choice.cycle}** merged into the base weights ({size}).

- Base model: `{cfg.student.model_id}` (upstream: `{upstream}`)
- Why this cycle: {choice.reason} (selection rule `{choice.select}`)
- Decision: {cfg.evaluate.decision_statistic} of {cfg.evaluate.decision_metric}, aggregated by
  {cfg.evaluate.judge_aggregation} over judges, against epsilon = {cfg.evaluate.epsilon:g};
  this cycle {"passed" if choice.passed else "did not pass"}.
- Judges: {", ".join(judges)}; M = {cfg.evaluate.m} judgments per answer, K = {cfg.inference.k} answers per
  test prompt, zeta = {", ".join(f"{z:g}" for z in cfg.evaluate.zetas)}.
- Teacher (synthetic data): {teacher.name} ({teacher.kind}: `{teacher.model}`).

## Data per cycle

{_md_table(volumes)}

## Judged quality per cycle (mean / {zetas})

{_md_table(_vc_table(layout))}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("path/to/merged")
model = AutoModelForCausalLM.from_pretrained("path/to/merged")
prompt = tok.apply_chat_template([{{"role": "user", "content": "..."}}], add_generation_prompt=True,
                                 return_dict=True, return_tensors="pt")
print(tok.decode(model.generate(**prompt, max_new_tokens=256)[0], skip_special_tokens=True))
```

GGUF files for llama.cpp and Ollama sit in `../gguf/`, with an Ollama `Modelfile` and a vLLM launch script
(`serve_vllm.sh`) beside this folder.

## Licences

- Base model licence: **{licence}**. {licence_note}
- The LoRA adapter and the merged weights are a derivative of the base model and follow its licence.
- Training data: the coverage dataset supplied by the run's owner plus synthetic pairs written by
  `{teacher.model}`; the service's terms of use apply to what it generated (several providers restrict
  using outputs to build competing models; check yours before publishing).
"""
    return "\n".join(front) + "\n" + body


def write_model_card(
    cfg: RunConfig, layout: RunLayout, choice: CycleChoice, merge: MergeResult | None = None
) -> Path:
    with atomic_write(layout.model_card) as fh:
        fh.write(model_card(cfg, layout, choice, merge))
    return layout.model_card


# --------------------------------------------------------------------------- 3. GGUF export


class GGUFExportError(DeployError):
    """The built-in exporter cannot convert this model; the message says what to use instead."""


# HF architecture names whose tensors map 1:1 onto llama.cpp's "llama" architecture.
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
PROBE_TEXTS = (
    "Summarize the following passage in one sentence.",
    "In 2024, 12345 apples cost $3.50 — that's 0.28¢ each!",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\ttabs",
    "naïve café, Straße, 東京, привет, 🙂🚀",
    "<|im_start|>user\nWhat's up?<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces and trailing   ",
    "I'm sure they'll've done it; 'RE you?",
)


@dataclass(frozen=True)
class GGUFExport:
    qtype: str
    path: Path
    bytes: int
    seconds: float
    exporter: str
    n_tensors: int | None = None

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def _gguf_types() -> dict[str, tuple[Any, Any]]:
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {
        "f32": (q.F32, f.ALL_F32),
        "f16": (q.F16, f.MOSTLY_F16),
        "bf16": (q.BF16, f.MOSTLY_BF16),
        "q8_0": (q.Q8_0, f.MOSTLY_Q8_0),
    }


def gguf_string(path: str | Path, key: str) -> str | None:
    """A string metadata value of a GGUF file (None when absent)."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get(key)
    return None if field is None else str(field.contents())


def tokenizer_pre_for(cfg: RunConfig) -> str:
    """llama.cpp's pre-tokenizer name to write: the setting, else the embedded GGUF's, else "default"."""
    if cfg.deploy.gguf_tokenizer_pre:
        return cfg.deploy.gguf_tokenizer_pre
    if cfg.student.model_id.startswith(EMBEDDED_PREFIX):
        return gguf_string(embedded_gguf_path(), "tokenizer.ggml.pre") or "default"
    return "default"


def _permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows in rotate-half order; llama.cpp wants them interleaved per head."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _encode_tensor(data: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw ggml type or None): 1-D tensors stay F32, the rest take `qtype` where it fits."""
    import gguf

    if data.ndim <= 1 or qtype == "f32":
        return data.astype(np.float32), None
    if qtype == "f16":
        return data.astype(np.float16), None
    ggml_type = _gguf_types()[qtype][0]
    if qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[ggml_type][0] != 0:
        return data.astype(np.float16), None  # rows that do not split into Q8_0 blocks stay F16
    return gguf.quants.quantize(data.astype(np.float32), ggml_type), ggml_type


def _add_vocab(writer: Any, model_dir: Path, vocab_size: int, tokenizer_pre: str) -> None:
    import gguf
    from tokenizers import Tokenizer

    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise GGUFExportError(
            f"{model_dir} has no tokenizer.json; the built-in exporter needs a fast tokenizer"
        )
    spec = read_json(tok_file)
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise GGUFExportError(
            f"{tok_file}: the built-in exporter handles byte-level BPE tokenizers only; set deploy.convert_script "
            "to llama.cpp's convert_hf_to_gguf.py for this model"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, idx in spec["model"]["vocab"].items():
        if idx < vocab_size:
            tokens[idx], types[idx] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        idx = added["id"]
        if idx < vocab_size:
            tokens[idx] = added["content"]
            types[idx] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    # Whether BOS/EOS are added is read off the tokenizer itself, so llama.cpp adds exactly what HF adds.
    probe = Tokenizer.from_file(str(tok_file)).encode("probe", add_special_tokens=True).ids
    bos, eos = special.special_token_ids.get("bos"), special.special_token_ids.get("eos")
    special.add_special_token["bos"] = bos is not None and probe[:1] == [bos]
    special.add_special_token["eos"] = eos is not None and probe[-1:] == [eos]
    if special.chat_template is None:
        raise GGUFExportError(
            f"{model_dir}: no chat template found (tokenizer_config.json / chat_template.jinja)"
        )
    special.add_to_gguf(writer, quiet=True)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / name for name in read_json(index)["weight_map"].values()})
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise GGUFExportError(
        f"{model_dir} holds no model.safetensors (or index): save the model with safetensors"
    )


def export_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    qtype: str,
    *,
    tokenizer_pre: str = "default",
    name: str | None = None,
    licence: str | None = None,
) -> GGUFExport:
    """Write a llama-architecture HF folder as one GGUF file of type `qtype` (f32, f16, bf16, q8_0).

    Norm vectors stay F32 (as llama.cpp's converter does); for Q8_0, matrices whose rows do not split
    into 32-value blocks fall back to F16. A tied lm_head is not written: llama.cpp reuses token_embd.
    """
    import gguf
    import torch
    from safetensors import safe_open
    from tqdm.auto import tqdm

    t0 = time.monotonic()
    model_dir, out_path = Path(model_dir), Path(out_path)
    if qtype not in _gguf_types():
        raise GGUFExportError(f"unknown GGUF type {qtype!r}; use one of {list(_gguf_types())}")
    config = read_json(model_dir / "config.json")
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in LLAMA_ARCHITECTURES:
        raise GGUFExportError(
            f"{model_dir}: architecture {arch} is not supported by the built-in GGUF exporter (it handles "
            f"{', '.join(LLAMA_ARCHITECTURES)}); set deploy.convert_script to llama.cpp's convert_hf_to_gguf.py"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ("default", "linear"):
        raise GGUFExportError(
            f"{model_dir}: rope type {rope_type!r} needs llama.cpp's converter (deploy.convert_script)"
        )
    n_head, n_kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]),
    )
    hidden, n_layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    tied = bool(config.get("tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    _, file_type = _gguf_types()[qtype]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_name(name or model_dir.name)
        if licence:
            writer.add_license(licence)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(hidden)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
        writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10_000.0))))
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(vocab)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        if rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        _add_vocab(writer, model_dir, vocab, tokenizer_pre)

        n_tensors = 0
        files = _safetensors_files(model_dir)
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in tqdm(
                    list(f.keys()), desc=f"GGUF {qtype}: {file.name}", unit="tensor", leave=False
                ):
                    if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
                        continue
                    new_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                    if new_name is None:
                        raise GGUFExportError(
                            f"{file}: tensor {key} has no llama.cpp name; use deploy.convert_script"
                        )
                    data = f.get_tensor(key).to(torch.float32).numpy()
                    if key.endswith("self_attn.q_proj.weight"):
                        data = _permute_rotary(data, n_head)
                    elif key.endswith("self_attn.k_proj.weight"):
                        data = _permute_rotary(data, n_kv)
                    array, raw_type = _encode_tensor(data, qtype)
                    writer.add_tensor(new_name, array, raw_dtype=raw_type)
                    n_tensors += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return GGUFExport(qtype, out_path, out_path.stat().st_size, time.monotonic() - t0, "builtin", n_tensors)


def convert_with_llama_cpp(
    script: str | Path, model_dir: str | Path, out_path: str | Path, qtype: str
) -> GGUFExport:
    """Run llama.cpp's `convert_hf_to_gguf.py` (from a llama.cpp checkout or sdist) for one GGUF type."""
    import subprocess
    import sys

    t0 = time.monotonic()
    script, out_path = Path(script), Path(out_path)
    if not script.is_file():
        raise GGUFExportError(f"deploy.convert_script: {script} does not exist")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(tmp), "--outtype", qtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-20:])
        raise GGUFExportError(f"{' '.join(cmd)} failed with code {proc.returncode}:\n{tail}")
    os.replace(tmp, out_path)
    return GGUFExport(
        qtype, out_path, out_path.stat().st_size, time.monotonic() - t0, f"llama.cpp:{script.name}"
    )


def check_gguf_tokenizer(
    gguf_path: str | Path, model_dir: str | Path, texts: Sequence[str] = PROBE_TEXTS
) -> dict:
    """Does llama.cpp tokenize like the HF tokenizer? A wrong pre-tokenizer or vocab shows up here."""
    from llama_cpp import Llama
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        mismatches = []
        for text in texts:
            expected = hf.encode(text, add_special_tokens=False).ids
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if list(got) != list(expected):
                mismatches.append({"text": text, "hf": expected[:40], "llama_cpp": list(got)[:40]})
    finally:
        llm.close()
    return {"probes": len(texts), "mismatches": mismatches, "ok": not mismatches}


def export_all(cfg: RunConfig, layout: RunLayout, merged_dir: str | Path | None = None) -> list[GGUFExport]:
    """Every `deploy.gguf_types` file of the merged model, each checked for tokenizer agreement."""
    merged_dir = Path(merged_dir or layout.merged_dir)
    licence, upstream, _ = base_licence(cfg.student.model_id)
    pre = tokenizer_pre_for(cfg) if not cfg.deploy.convert_script else ""
    exports = []
    for qtype in cfg.deploy.gguf_types:
        out = layout.gguf_file(qtype)
        if cfg.deploy.convert_script:
            result = convert_with_llama_cpp(cfg.deploy.convert_script, merged_dir, out, qtype)
        else:
            result = export_gguf(
                merged_dir,
                out,
                qtype,
                tokenizer_pre=pre,
                name=f"{cfg.run_name} ({upstream})",
                licence=licence,
            )
        check = check_gguf_tokenizer(result.path, merged_dir)
        if not check["ok"]:
            raise GGUFExportError(
                f"{result.path}: llama.cpp tokenizes {len(check['mismatches'])} of {check['probes']} probe texts "
                f"differently from the HF tokenizer (first: {check['mismatches'][0]}); the pre-tokenizer "
                f"'{pre}' is probably wrong: set deploy.gguf_tokenizer_pre or deploy.convert_script"
            )
        exports.append(result)
    return exports


def exports_table(exports: Sequence[GGUFExport]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "type": e.qtype,
                "file": e.path.name,
                "MiB": round(e.mib, 1),
                "seconds": round(e.seconds, 1),
                "tensors": e.n_tensors,
                "exporter": e.exporter,
            }
            for e in exports
        ]
    )


# --------------------------------------------------------------------------- 4. Ollama + vLLM


def chat_template_parts(merged_dir: str | Path) -> dict:
    """Render the merged tokenizer's chat template once to learn its shape (ChatML?) and default system."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    marker = "\x00USER\x00"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
    )
    chatml = (
        rendered.endswith("<|im_start|>assistant\n") and f"<|im_start|>user\n{marker}<|im_end|>\n" in rendered
    )
    system = None
    head = rendered.split("<|im_start|>user\n", 1)[0]
    if chatml and head.startswith("<|im_start|>system\n") and head.endswith("<|im_end|>\n"):
        system = head[len("<|im_start|>system\n") : -len("<|im_end|>\n")]
    stops = (
        [t for t in ("<|im_end|>", "<|endoftext|>") if t in tok.get_vocab()] if chatml else [tok.eos_token]
    )
    return {"chatml": chatml, "default_system": system, "stops": stops, "eos": tok.eos_token}


OLLAMA_CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)


def modelfile_text(gguf_name: str, parts: dict, *, temperature: float, top_p: float, num_ctx: int) -> str:
    """An Ollama Modelfile for `./gguf/<gguf_name>`: ChatML template + the default system prompt + stops."""
    lines = [
        "# Ollama: ollama create <name> -f Modelfile && ollama run <name>",
        f"FROM ./gguf/{gguf_name}",
        "",
    ]
    if parts["chatml"]:
        lines += [f'TEMPLATE """{OLLAMA_CHATML}"""', ""]
        if parts["default_system"]:
            # The HF template inserts this system turn when a conversation has none; Ollama needs it spelled out.
            lines += [f'SYSTEM """{parts["default_system"]}"""', ""]
    else:
        lines += ["# not a ChatML model: Ollama reads the chat template stored in the GGUF", ""]
    lines += [f'PARAMETER stop "{stop}"' for stop in parts["stops"]]
    lines += [
        f"PARAMETER temperature {temperature:g}",
        f"PARAMETER top_p {top_p:g}",
        "PARAMETER repeat_penalty 1.0",
        f"PARAMETER num_ctx {num_ctx}",
        "",
    ]
    return "\n".join(lines)


def write_modelfile(
    cfg: RunConfig, layout: RunLayout, gguf_name: str, merged_dir: str | Path | None = None
) -> Path:
    parts = chat_template_parts(merged_dir or layout.merged_dir)
    text = modelfile_text(
        gguf_name,
        parts,
        temperature=cfg.inference.temperature,
        top_p=cfg.inference.top_p,
        num_ctx=cfg.deploy.n_ctx,
    )
    with atomic_write(layout.modelfile) as fh:
        fh.write(text)
    return layout.modelfile


def vllm_script_text(
    served_name: str, base_model: str, adapter_dir: str, max_model_len: int, lora_rank: int = 16
) -> str:
    """A bash launcher for `vllm serve` (GPU machines): merged weights by default, base + LoRA with MODE=lora."""
    return f"""#!/usr/bin/env bash
# OpenAI-compatible endpoint for this run's student with vLLM (needs a CUDA GPU and `pip install vllm`).
#   ./serve_vllm.sh               serves the merged weights in ./merged
#   MODE=lora ./serve_vllm.sh     serves the base model with the cycle's LoRA adapter attached
# Then point any OpenAI client at http://$HOST:$PORT/v1 with model "{served_name}".
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
MODE="${{MODE:-merged}}"
HOST="${{HOST:-127.0.0.1}}"
PORT="${{PORT:-8000}}"
command -v nvidia-smi >/dev/null || {{ echo "vLLM needs an NVIDIA GPU (nvidia-smi not found)" >&2; exit 1; }}
python -c "import vllm" 2>/dev/null || {{ echo "vLLM is not installed: pip install vllm" >&2; exit 1; }}
if [ "$MODE" = "lora" ]; then
  exec vllm serve "{base_model}" --served-model-name "{served_name}-base" \\
    --enable-lora --max-lora-rank {max(lora_rank, 8)} --lora-modules "{served_name}={adapter_dir}" \\
    --max-model-len {max_model_len} --host "$HOST" --port "$PORT"
else
  exec vllm serve "$HERE/merged" --served-model-name "{served_name}" \\
    --max-model-len {max_model_len} --host "$HOST" --port "$PORT"
fi
"""


def write_vllm_script(cfg: RunConfig, layout: RunLayout, choice: CycleChoice) -> Path:
    base = (
        resolve_model_path(cfg.student.model_id)
        if cfg.student.model_id.startswith(EMBEDDED_PREFIX)
        else cfg.student.model_id
    )
    adapter = layout.adapter_dir(choice.cycle)
    rank = int(read_json(adapter / "adapter_config.json").get("r", 16))
    text = vllm_script_text(cfg.run_name, base, str(adapter.resolve()), cfg.deploy.n_ctx, rank)
    with atomic_write(layout.vllm_launch) as fh:
        fh.write(text)
    os.chmod(layout.vllm_launch, 0o755)
    return layout.vllm_launch


# --------------------------------------------------------------------------- 5. parity


def test_rows(layout: RunLayout, limit: int | None = None) -> list[dict]:
    path = layout.test_file
    if not path.is_file():
        raise DeployError(f"{path} not found: 01_coverage writes the test split the parity check re-asks")
    rows = sorted(read_jsonl(path), key=lambda r: str(r["id"]))
    return rows if limit is None else rows[:limit]


@dataclass(frozen=True)
class GreedyAnswer:
    text: str
    prompt_ids: list[int]
    answer_ids: list[int]


def greedy_transformers(
    model_dir: str | Path,
    instructions: Sequence[str],
    max_new_tokens: int,
    systems: Sequence[str | None] | None = None,
) -> list[GreedyAnswer]:
    """Greedy answers of the merged model in-process, one prompt at a time (no padding to perturb them).

    Prompts and stop tokens are built by 03's functions, so this is the evaluated model's behaviour.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .inference import prompt_token_ids, stop_token_ids

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    model.eval()
    stops = stop_token_ids(model, tok)
    answers = []
    prompts = list(zip(instructions, systems or [None] * len(instructions), strict=True))
    for instruction, system in tqdm(prompts, desc="greedy (transformers)", unit="prompt"):
        prompt = prompt_token_ids(tok, instruction, system)
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, len(prompt) :].tolist()
        answers.append(GreedyAnswer(tok.decode(new, skip_special_tokens=True), prompt, new))
    return answers


def token_agreement(gguf_path: str | Path, answers: Sequence[GreedyAnswer], n_ctx: int = 2048) -> list[float]:
    """Teacher-forced top-1 agreement: llama.cpp reads each transformers greedy answer token by token and
    predicts the next one; the share of positions where its most likely token is the one transformers chose.

    Unlike exact match, one near-tie flip does not spoil the rest of the answer, so this isolates how much
    the GGUF's numbers (F16 rounding, Q8_0 blocks) move the model's choices.
    """
    import llama_cpp
    from tqdm.auto import tqdm

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, verbose=False)
    try:
        shares = []
        for answer in tqdm(answers, desc=f"token agreement ({Path(gguf_path).name})", unit="prompt"):
            if not answer.answer_ids:
                shares.append(1.0)
                continue
            llm.reset()
            llm.eval(answer.prompt_ids)
            hits = 0
            for token in answer.answer_ids:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
                hits += int(np.argmax(logits) == token)
                llm.eval([token])
            shares.append(hits / len(answer.answer_ids))
    finally:
        llm.close()
    return shares


def _file_digest(path: Path, n: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:n]


def served_provider(cfg: RunConfig, gguf_path: Path, base_url: str, qtype: str) -> tuple[RunConfig, str]:
    """`cfg` plus an OpenAI-compatible provider for the served GGUF; the model name carries the file's hash
    so the call cache never replays answers of an older export."""
    from .config import ProviderConfig

    taken = {p.name for p in cfg.providers}
    name = next(
        n
        for n in (f"deployed_{qtype}", f"deployed_{qtype}_gguf", f"deployed_{qtype}_{os.getpid()}")
        if n not in taken
    )
    provider = ProviderConfig(
        name=name,
        kind="openai_compatible",
        model=f"{cfg.run_name}-{qtype}-{_file_digest(gguf_path)}",
        base_url=base_url,
        rpm=100_000,
        tpm=100_000_000,
        max_concurrency=2,
        timeout_s=600.0,
        max_retries=2,
        json_mode="none",
    )
    return dataclasses.replace(cfg, providers=[*cfg.providers, provider]), name


@contextlib.contextmanager
def _local_prices_are_zero():
    """The served student costs nothing per token; keep the price table's 'no price' warning quiet for it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no price for model")
        yield


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def greedy_parity(
    cfg: RunConfig, layout: RunLayout, exports: Sequence[GGUFExport], merged_dir: str | Path | None = None
) -> pd.DataFrame:
    """Greedy answers of the merged model (transformers) vs each exported GGUF served by llama.cpp.

    One row per (GGUF type, prompt): whether the served greedy answer is exactly the transformers one
    (whitespace stripped), how many leading characters agree, and the teacher-forced token agreement
    (`token_agreement`). Written to deploy/greedy_parity.jsonl.
    """
    from .services import ChatRequest, ServicePool

    n = cfg.deploy.greedy_prompts
    if n == 0 or not exports or not cfg.deploy.serve:
        return pd.DataFrame()
    rows = test_rows(layout, n)
    reference = greedy_transformers(
        merged_dir or layout.merged_dir,
        [r["instruction"] for r in rows],
        cfg.deploy.greedy_max_new_tokens,
        systems=[r.get("system") for r in rows],
    )
    requests = [
        ChatRequest(
            messages=student_messages(r["instruction"], r.get("system")),
            temperature=0.0,
            max_tokens=cfg.deploy.greedy_max_new_tokens,
        )
        for r in rows
    ]
    records = []
    for export in exports:
        with LlamaServer(
            export.path, n_ctx=cfg.deploy.n_ctx, log_file=layout.server_log(export.qtype)
        ) as server:
            run_cfg, name = served_provider(cfg, export.path, server.base_url, export.qtype)
            with (
                _local_prices_are_zero(),
                ServicePool(run_cfg, layout, "06_deploy", providers=[name]) as pool,
            ):
                results = pool.complete_many(name, requests, desc=f"greedy ({export.qtype} GGUF)")
        agreement = token_agreement(export.path, reference, cfg.deploy.n_ctx)
        for row, ref, result, share in zip(rows, reference, results, agreement, strict=True):
            served = result.text if not result.error else ""
            records.append(
                {
                    "qtype": export.qtype,
                    "prompt_id": row["id"],
                    "category": row.get("category", ""),
                    "exact_match": ref.text.strip() == served.strip(),
                    "prefix_chars": _common_prefix(ref.text.strip(), served.strip()),
                    "token_agreement": share,
                    "answer_tokens": len(ref.answer_ids),
                    "transformers_chars": len(ref.text.strip()),
                    "served_chars": len(served.strip()),
                    "transformers": ref.text,
                    "served": served,
                    "error": result.error,
                }
            )
    write_jsonl(layout.greedy_parity_file, records)
    return pd.DataFrame(records)


def greedy_summary(greedy: pd.DataFrame) -> pd.DataFrame:
    """Per GGUF type: prompts, exact-match rate, mean share of leading characters that agree, and the
    mean teacher-forced token agreement."""
    if greedy.empty:
        return pd.DataFrame(
            columns=["qtype", "prompts", "exact_match_rate", "prefix_agreement", "token_agreement"]
        )
    longest = greedy[["transformers_chars", "served_chars"]].max(axis=1).clip(lower=1)
    frame = greedy.assign(prefix_share=greedy["prefix_chars"] / longest)
    return (
        frame.groupby("qtype", sort=False)
        .agg(
            prompts=("prompt_id", "size"),
            exact_match_rate=("exact_match", "mean"),
            prefix_agreement=("prefix_share", "mean"),
            token_agreement=("token_agreement", "mean"),
        )
        .reset_index()
    )


def served_responses(
    pool: Any, provider: str, rows: Sequence[dict], cfg: RunConfig, gguf_path: Path
) -> list[dict]:
    """K sampled answers per test prompt from the served model, in 03's responses.jsonl shape."""
    from .services import ChatRequest

    inf = cfg.inference
    generation = {
        "temperature": inf.temperature,
        "top_p": inf.top_p,
        "max_new_tokens": inf.max_new_tokens,
        "engine": "llama.cpp-server",
    }
    requests = [
        ChatRequest(
            messages=student_messages(r["instruction"], r.get("system")),
            temperature=inf.temperature,
            top_p=inf.top_p,
            max_tokens=inf.max_new_tokens,
            repeat=k,
        )
        for r in rows
        for k in range(inf.k)
    ]
    results = pool.complete_many(provider, requests, desc=f"served answers ({len(rows)} prompts x K={inf.k})")
    out = []
    for i, result in enumerate(results):
        row = rows[i // inf.k]
        out.append(
            {
                "prompt_id": row["id"],
                "instruction": row["instruction"],
                "reference": row["response"],
                "candidate": result.text or "",
                "sample_index": i % inf.k,
                "category": row.get("category", ""),
                "model_id": f"gguf:{gguf_path.name}",
                "model_revision": None,
                "adapter": None,
                "generation": generation,
                "error": result.error,
            }
        )
    return out


def _row_means(judgments: Sequence[dict], judge: str, metric: str) -> list[float]:
    from .evaluate import score_table

    table = score_table(judgments)
    values = table[(table["judge"] == judge)][metric].astype(float)
    return [v for v in values.tolist() if not np.isnan(v)]


def _stat_with_ci(
    values: Sequence[float], zeta: float | None, seed: int = 0
) -> tuple[float | None, list | None]:
    from .evaluate import bootstrap_ci

    if not values:
        return None, None
    data = np.asarray(values, dtype=float)
    if zeta is None:
        ci = bootstrap_ci(data, seed=seed)
        return float(data.mean()), list(ci) if ci else None
    ci = bootstrap_ci(data, statistic=lambda a: 100.0 * float(np.mean(a >= zeta)), seed=seed)
    return float(100.0 * np.mean(data >= zeta)), list(ci) if ci else None


def comparison_table(
    cycle_judgments: Sequence[dict],
    served_judgments: Sequence[dict],
    judges: Sequence[str],
    zetas: Sequence[float],
) -> pd.DataFrame:
    """V and C@zeta with 95% bootstrap CIs, evaluated cycle vs served model, per judge and metric."""
    from .evaluate import METRICS, zeta_key

    records = []
    for judge in judges:
        for metric in METRICS:
            before = _row_means(cycle_judgments, judge, metric)
            after = _row_means(served_judgments, judge, metric)
            for zeta in [None, *zetas]:
                v0, ci0 = _stat_with_ci(before, zeta)
                v1, ci1 = _stat_with_ci(after, zeta)
                records.append(
                    {
                        "judge": judge,
                        "metric": metric,
                        "statistic": "mean" if zeta is None else zeta_key(zeta),
                        "evaluated": v0,
                        "evaluated_ci95": ci0,
                        "served": v1,
                        "served_ci95": ci1,
                        "delta": None if v0 is None or v1 is None else v1 - v0,
                        "rows_evaluated": len(before),
                        "rows_served": len(after),
                    }
                )
    return pd.DataFrame(records)


def judged_parity(cfg: RunConfig, layout: RunLayout, choice: CycleChoice, export: GGUFExport) -> dict:
    """Re-answer the test prompts with the served GGUF, judge them like 04 did, compare with the cycle.

    The decision statistic of the served model is computed with 04's `decide`; a drop of more than
    `deploy.parity_tolerance` points against the evaluated cycle is flagged. Writes
    deploy/parity_responses.jsonl, parity_judgments.jsonl and parity.json.
    """
    from .evaluate import compute_metrics, judge_responses, load_judgments
    from .services import ServicePool

    if not cfg.deploy.serve:
        report = {"skipped": "deploy.serve is false: no endpoint was started, no parity check ran"}
        write_json(layout.parity_report, report)
        return report
    eval_cfg = dataclasses.replace(cfg.evaluate, m=cfg.deploy.parity_m or cfg.evaluate.m)
    rows = test_rows(layout)
    t0 = time.monotonic()
    with LlamaServer(export.path, n_ctx=cfg.deploy.n_ctx, log_file=layout.server_log(export.qtype)) as server:
        run_cfg, name = served_provider(cfg, export.path, server.base_url, export.qtype)
        providers = [name, *dict.fromkeys(cfg.evaluate.judges)]
        with _local_prices_are_zero(), ServicePool(run_cfg, layout, "06_deploy", providers=providers) as pool:
            responses = served_responses(pool, name, rows, cfg, export.path)
            answered = [r for r in responses if not r["error"]]
            judgments = judge_responses(pool, answered, eval_cfg) if answered else []
    seconds = time.monotonic() - t0
    write_jsonl(layout.parity_responses_file, responses)
    write_jsonl(layout.parity_judgments_file, judgments)

    served_metrics = compute_metrics(judgments, eval_cfg, choice.cycle)
    cycle_metrics = read_json(layout.metrics_file(choice.cycle))
    cycle_judgments = (
        load_judgments(layout.judgments_file(choice.cycle))
        if layout.judgments_file(choice.cycle).is_file()
        else []
    )
    table = comparison_table(cycle_judgments, judgments, cfg.evaluate.judges, cfg.evaluate.zetas)
    evaluated_value = cycle_metrics.get("decision", {}).get("value")
    served_value = served_metrics["decision"]["value"]
    drop = None if evaluated_value is None or served_value is None else evaluated_value - served_value
    flagged = served_value is None or (drop is not None and drop > cfg.deploy.parity_tolerance)
    if served_value is None:
        message = "the served model could not be scored (no successful judgments): treat as broken"
    elif drop is None:
        message = (
            f"served model: {served_value:.2f}; the evaluated cycle has no decision value to compare with"
        )
    else:
        verdict = "exceeds" if flagged else "is within"
        message = (
            f"{cfg.evaluate.decision_statistic}({cfg.evaluate.decision_metric}): evaluated cycle "
            f"{evaluated_value:.2f}, served {export.qtype} GGUF {served_value:.2f}; drop {drop:+.2f} "
            f"{verdict} the tolerance {cfg.deploy.parity_tolerance:g}"
        )
        if flagged:
            message += " (chat-template or quantisation breakage is the usual cause)"
    report = {
        "cycle": choice.cycle,
        "served_gguf": export.path.name,
        "qtype": export.qtype,
        "k": cfg.inference.k,
        "m": eval_cfg.m,
        "m_evaluated": cycle_metrics.get("m"),
        "prompts": len(rows),
        "answers": len(responses),
        "generation_failures": len(responses) - len(answered),
        "seconds": round(seconds, 1),
        "decision": {
            "evaluated": evaluated_value,
            "served": served_value,
            "drop": drop,
            "tolerance": cfg.deploy.parity_tolerance,
            "flagged": bool(flagged),
            "message": message,
        },
        "comparison": json.loads(table.to_json(orient="records")),
        "served_metrics": served_metrics,
    }
    write_json(layout.parity_report, report)
    return report


def served_export(cfg: RunConfig, exports: Sequence[GGUFExport]) -> GGUFExport:
    """The export the endpoint serves (`deploy.serve_gguf`)."""
    for export in exports:
        if export.qtype == cfg.deploy.serve_gguf:
            return export
    raise DeployError(
        f"deploy.serve_gguf = {cfg.deploy.serve_gguf!r} was not exported (gguf_types: {cfg.deploy.gguf_types})"
    )


def parity_verdict(report: dict) -> str:
    """One line: the judged-parity outcome, or why it did not run."""
    if "skipped" in report:
        return report["skipped"]
    flag = "PARITY DROP FLAGGED: " if report["decision"]["flagged"] else "parity ok: "
    return flag + report["decision"]["message"]


def parity_table(report: dict) -> pd.DataFrame:
    """The comparison of `judged_parity` as a readable table (value [CI low, high])."""

    def cell(value: Any, ci: Any) -> str:
        if value is None:
            return "n/a"
        return f"{value:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")

    frame = pd.DataFrame(report.get("comparison", []))
    if frame.empty:
        return frame
    return pd.DataFrame(
        {
            "judge": frame["judge"],
            "metric": frame["metric"],
            "statistic": frame["statistic"],
            "evaluated cycle": [
                cell(v, c) for v, c in zip(frame["evaluated"], frame["evaluated_ci95"], strict=True)
            ],
            f"served {report['qtype']}": [
                cell(v, c) for v, c in zip(frame["served"], frame["served_ci95"], strict=True)
            ],
            "delta": [None if d is None or pd.isna(d) else round(float(d), 2) for d in frame["delta"]],
        }
    )


def plot_parity(report: dict, greedy: pd.DataFrame, path: str | Path):
    """Left: V and C@zeta with 95% CIs, evaluated vs served. Right: greedy exact-match rate per GGUF type."""
    import matplotlib.pyplot as plt

    frame = pd.DataFrame(report.get("comparison", []))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    if not frame.empty:
        labels = [
            f"{j}\n{m[:4]} {s}"
            for j, m, s in zip(frame["judge"], frame["metric"], frame["statistic"], strict=True)
        ]
        x = np.arange(len(frame))
        for offset, column, label in (
            (-0.2, "evaluated", f"cycle {report.get('cycle')}"),
            (0.2, "served", f"served {report['qtype']}"),
        ):
            values = frame[column].astype(float).fillna(0.0).to_numpy()
            cis = frame[f"{column}_ci95"]
            low = [v - c[0] if isinstance(c, list) else 0.0 for v, c in zip(values, cis, strict=True)]
            high = [c[1] - v if isinstance(c, list) else 0.0 for v, c in zip(values, cis, strict=True)]
            ax.bar(x + offset, values, width=0.4, label=label, yerr=[low, high], capsize=3)
        ax.legend(loc="upper right", fontsize=8)
        ax.set_xticks(x, labels, fontsize=8)
    ax.set(ylim=(0, 105), ylabel="score / % of rows", title="Judged parity (95% bootstrap CIs)")
    summary = greedy_summary(greedy)
    x2 = np.arange(len(summary))
    ax2.bar(x2 - 0.2, 100 * summary["exact_match_rate"].astype(float), width=0.4, label="exact answers")
    ax2.bar(x2 + 0.2, 100 * summary["token_agreement"].astype(float), width=0.4, label="token agreement")
    ax2.set_xticks(x2, summary["qtype"])
    ax2.set(ylim=(0, 105), ylabel="%", title="Greedy: transformers vs GGUF")
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- 6. optional push


def push_to_hub(
    merged_dir: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    token_env: str = "HF_TOKEN",
    extra_files: Sequence[str | Path] = (),
) -> str | None:
    """Upload the merged folder (and e.g. GGUF files under gguf/) to a Hugging Face model repo.

    Returns the repo URL, or None when the token variable is unset (nothing is uploaded then).
    """
    token = os.environ.get(token_env, "").strip()
    if not token:
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(merged_dir), commit_message="LlamaDuo: merged student")
    for path in extra_files:
        path = Path(path)
        api.upload_file(
            path_or_fileobj=str(path),
            path_in_repo=f"gguf/{path.name}",
            repo_id=repo_id,
            commit_message=f"LlamaDuo: {path.name}",
        )
    return f"https://huggingface.co/{repo_id}"


def push_if_configured(cfg: RunConfig, layout: RunLayout, exports: Sequence[GGUFExport]) -> str | None:
    """`push_to_hub` of the merged folder and the GGUF files when `deploy.hf_repo` is set (and HF_TOKEN)."""
    if not cfg.deploy.hf_repo:
        return None
    return push_to_hub(
        layout.merged_dir,
        cfg.deploy.hf_repo,
        private=cfg.deploy.hf_private,
        extra_files=[e.path for e in exports],
    )


# --------------------------------------------------------------------------- the stage report


def write_report(layout: RunLayout, **parts: Any) -> dict:
    """deploy/deploy.json: what was shipped, where, how big, how long, and whether parity held."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
        if isinstance(value, pd.DataFrame):
            return json.loads(value.to_json(orient="records"))
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    report = {k: plain(v) for k, v in parts.items()}
    write_json(layout.deploy_report, report)
    return report
