"""The student's weights as GGUF, for llama.cpp: the built-in exporter, the tokenizer check every export
passes, readers of a GGUF's metadata, and the per-cycle / base-student GGUF F16 cache.

The built-in exporter covers llama-architecture students with a byte-level BPE tokenizer (the embedded
SmolLM2; Llama-3-style models with `deploy.gguf_tokenizer_pre: llama-bpe`): it writes the tensors with the
`gguf` package (`GGUFWriter`, `TensorNameMap`, `SpecialVocab`, `quants`) after undoing the Hugging Face
rotary permutation of the q/k projections. For the embedded student its F16 and Q8_0 tensors were checked
byte for byte against llama.cpp's own `convert_hf_to_gguf.py`: identical. 06 adds the rest of what it ships
(llama.cpp's converter for other architectures, K-quants: `deploy.gguf`).

The cache: 03's llama.cpp engine answers with the cycle's adapter merged into the base and exported as GGUF
of type `inference.llamacpp_gguf` (`cycle_gguf`, once per adapter content, at `cycle_NN/model-q8_0.gguf` by
default), and Table 1's base-student row with the base as 02 loads it (`base_gguf`, once per run). 06 merges
the cycle it ships anew into `deploy/merged/` (the shipped folder) and links 03's GGUF of that cycle into
`deploy/gguf/` when it is current (`current_cycle_gguf`); its other types it exports with `export_gguf`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, RunConfig
from ..embedded import EMBEDDED_PREFIX, embedded_gguf_path
from ..jsonio import read_json, sha256_file, write_json
from ..runlayout import RunLayout
from .licence import base_licence
from .loading import StudentError, cuda_available, load_student, resolve_dtype, save_model_folder
from .merge import merge_adapter


class GGUFExportError(StudentError):
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


def check_gguf_tokenizer(
    gguf_path: str | Path, model_dir: str | Path, texts: Sequence[str] = PROBE_TEXTS
) -> dict:
    """Does llama.cpp tokenize like the HF tokenizer? A wrong pre-tokenizer or vocab shows up here."""
    from llama_cpp import Llama

    tok_file = Path(model_dir) / "tokenizer.json"
    if tok_file.is_file():  # the fast tokenizer's own definition, as written next to the weights
        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(tok_file))

        def encode(text: str) -> list[int]:
            return fast.encode(text, add_special_tokens=False).ids
    else:
        from transformers import AutoTokenizer

        auto = AutoTokenizer.from_pretrained(model_dir)

        def encode(text: str) -> list[int]:
            return auto(text, add_special_tokens=False)["input_ids"]

    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        mismatches = []
        for text in texts:
            expected = encode(text)
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if list(got) != list(expected):
                mismatches.append({"text": text, "hf": expected[:40], "llama_cpp": list(got)[:40]})
    finally:
        llm.close()
    return {"probes": len(texts), "mismatches": mismatches, "ok": not mismatches}


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds ({"Q4_K": 120, "F32": 61, ...})."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        name = tensor.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
    return counts


# --------------------------------------------------------------------------- per-cycle GGUF cache (03, 06)


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        sha256_file(path, digest)
    return digest.hexdigest()


def _adapter_digest(adapter_dir: Path) -> str:
    return _digest(
        sorted(p for p in adapter_dir.iterdir() if p.suffix in (".safetensors", ".json", ".jinja"))
    )


def current_cycle_gguf(
    layout: RunLayout, cycle: int, qtype: str, adapter_sha: str | None = None
) -> Path | None:
    """03's GGUF of `cycle` in type `qtype` when it was built from the cycle's adapter as it is now, else
    None. 06 links it into `deploy/gguf/` instead of exporting the same tensors again."""
    path, marker = layout.cycle_gguf(cycle, qtype), layout.cycle_gguf_marker(cycle, qtype)
    if not (path.is_file() and marker.is_file() and layout.adapter_dir(cycle).is_dir()):
        return None
    if read_json(marker).get("adapter_sha256") != (adapter_sha or _adapter_digest(layout.adapter_dir(cycle))):
        return None
    return path


def cycle_gguf(cfg: RunConfig, layout: RunLayout, cycle: int, progress: bool = True) -> tuple[Path, bool]:
    """(path, built now): the cycle's merged weights as GGUF of type `inference.llamacpp_gguf` at
    `layout.cycle_gguf(cycle, qtype)`.

    Built once per adapter: the merge is `merge_adapter` (what 06 ships, the model exactly as 03's
    transformers engine builds it) into `layout.cycle_merged_dir(cycle)`, the export `export_gguf` with
    the tokenizer check 06 runs. The merged folder is scratch, removed once the GGUF is written (success or
    not): full-precision weights per cycle were most of a run's disk (the demo's 3.0 GB), and only 06's
    shipped cycle needs them, which 06 writes into `deploy/merged/`. `layout.cycle_gguf_marker(cycle, qtype)`
    records the adapter's content hash, so a retrained adapter is re-exported.
    """
    adapter_dir = layout.adapter_dir(cycle)
    adapter_sha = _adapter_digest(adapter_dir)
    qtype = cfg.inference.llamacpp_gguf
    path, marker = layout.cycle_gguf(cycle, qtype), layout.cycle_gguf_marker(cycle, qtype)
    if current_cycle_gguf(layout, cycle, qtype, adapter_sha) is not None:
        return path, False
    scratch = layout.cycle_merged_dir(cycle)
    try:
        merged = merge_adapter(cfg, adapter_dir, scratch)
        record = {
            "adapter": str(adapter_dir),
            "adapter_sha256": adapter_sha,
            "merge_seconds": round(merged.seconds, 2),
        }
        _export(cfg, merged.path, path, marker, f"cycle {cycle}", record)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path, True


def base_gguf(cfg: RunConfig, layout: RunLayout) -> tuple[Path, Path]:
    """(GGUF, its marker): the student before fine-tuning as GGUF (`inference.llamacpp_gguf`), for Table 1's
    base-student row when
    03 answers through llama.cpp (the cycles' engine). The model is saved as 02 loads it
    (`load_student`, with the params' chat template) into scratch `<run>/baselines/base_student/model/`,
    removed after the export like `cycle_gguf`'s merged folder."""
    folder = layout.baseline_dir("base_student")
    qtype = cfg.inference.llamacpp_gguf
    path, marker = folder / f"model-{qtype}.gguf", folder / f"model-{qtype}.json"
    student = cfg.student
    source = {
        "student": student.model_id,
        "revision": student.revision,
        "chat_template": student.chat_template,
    }
    if path.is_file() and marker.is_file() and read_json(marker).get("source") == source:
        return path, marker
    model, tokenizer, _ = load_student(student, "none", resolve_dtype(student, cuda_available()))
    scratch = folder / "model"
    try:
        save_model_folder(model, tokenizer, scratch, "the base student's weights (GGUF source)")
        del model
        _export(cfg, scratch, path, marker, "base student", {"source": source})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path, marker


def _export(cfg: RunConfig, model_dir: Path, path: Path, marker: Path, what: str, record: dict) -> None:
    """The GGUF export (`inference.llamacpp_gguf`) of `model_dir` to `path` plus its tokenizer check; `marker`
    records `record`."""
    licence, upstream, _ = base_licence(cfg.student.model_id)
    qtype = cfg.inference.llamacpp_gguf
    export = export_gguf(
        model_dir,
        path,
        qtype,
        tokenizer_pre=tokenizer_pre_for(cfg),
        name=f"{cfg.run_name} {what} ({upstream or cfg.student.model_id})",
        licence=licence,
    )
    check = check_gguf_tokenizer(export.path, model_dir)
    if not check["ok"]:
        path.unlink()
        raise ConfigError(
            f"{path}: llama.cpp tokenizes {len(check['mismatches'])} of {check['probes']} probe texts "
            f"differently from the HF tokenizer (first: {check['mismatches'][0]}); use inference.engine: "
            "transformers, or set deploy.gguf_tokenizer_pre"
        )
    write_json(
        marker,
        {
            **record,
            "gguf": path.name,
            "gguf_sha256": _digest([path]),
            "qtype": qtype,
            "exported_from": f"{model_dir} (removed after the export)",
            "export_seconds": round(export.seconds, 2),
        },
    )
