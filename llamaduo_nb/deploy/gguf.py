"""06 step 3: GGUF files for llama.cpp and Ollama, each checked for tokenizer agreement."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import RunConfig
from ..embedded import EMBEDDED_PREFIX, embedded_gguf_path
from ..jsonio import read_json
from ..runlayout import RunLayout
from .merge import base_licence
from .select import DeployError


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


# Runs convert_hf_to_gguf.py unchanged, except that a byte-level BPE tokenizer whose pre-tokenizer the
# script does not recognise (it identifies them by hashing the real vocab's output on a probe text) gets
# the name the user gave in deploy.gguf_tokenizer_pre; check_gguf_tokenizer then verifies the choice.
_CONVERT_WITH_PRE = """
import runpy, sys
from pathlib import Path
script, pre = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
sys.path[:0] = [str(Path(script).parent), str(Path(script).parent / "gguf-py")]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(script, run_name="__main__")
"""


def convert_with_llama_cpp(
    script: str | Path,
    model_dir: str | Path,
    out_path: str | Path,
    qtype: str,
    *,
    tokenizer_pre: str | None = None,
) -> GGUFExport:
    """Run llama.cpp's `convert_hf_to_gguf.py` (llama-cpp-python's sdist or a checkout) for one GGUF type.

    `tokenizer_pre` names llama.cpp's pre-tokenizer for BPE vocabularies the script does not recognise.
    """
    import subprocess
    import sys

    t0 = time.monotonic()
    script, out_path = Path(script), Path(out_path)
    if not script.is_file():
        raise GGUFExportError(f"deploy.convert_script: {script} does not exist")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    args = [str(model_dir), "--outfile", str(tmp), "--outtype", qtype]
    if tokenizer_pre:
        cmd = [sys.executable, "-c", _CONVERT_WITH_PRE, str(script), tokenizer_pre, *args]
    else:
        cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-20:])
        raise GGUFExportError(f"{script} {' '.join(args)} failed with code {proc.returncode}:\n{tail}")
    os.replace(tmp, out_path)
    return GGUFExport(
        qtype, out_path, out_path.stat().st_size, time.monotonic() - t0, f"llama.cpp:{script.name}"
    )


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


def _llama_ftype(qtype: str) -> int:
    import llama_cpp

    return int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}"))


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each ggml type a GGUF file holds ({"Q4_K": 120, "F32": 61, ...})."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        name = tensor.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
    return counts


def quantize_gguf(source: str | Path, out_path: str | Path, qtype: str, *, threads: int = 0) -> GGUFExport:
    """`qtype` (e.g. q4_k_m, q5_k_m) from an F16/BF16/F32 GGUF with llama.cpp's own quantizer
    (`llama_cpp.llama_model_quantize`, the library behind `llama-quantize`), written atomically.

    llama.cpp keeps its mixture rules (Q4_K_M: Q6_K for half of attn_v/ffn_down and the output tensor) and
    falls back to a legacy type for rows that do not split into 256-value K-blocks (Q4_K -> Q5_0, Q5_K ->
    Q5_1, Q6_K -> Q8_0); `tensor_types` shows what a file ended up holding.
    """
    import ctypes

    import llama_cpp

    from ..config import GGUF_QUANTIZED_TYPES

    t0 = time.monotonic()
    source, out_path = Path(source), Path(out_path)
    if qtype not in GGUF_QUANTIZED_TYPES:
        raise GGUFExportError(
            f"{qtype!r} is not a llama.cpp quantization type; use one of {GGUF_QUANTIZED_TYPES}"
        )
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _llama_ftype(qtype)
    params.nthread = threads
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if code != 0:
            raise GGUFExportError(f"llama_model_quantize({source} -> {qtype}) failed with code {code}")
        os.replace(tmp, out_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return GGUFExport(
        qtype,
        out_path,
        out_path.stat().st_size,
        time.monotonic() - t0,
        f"llama_model_quantize({source.name})",
        sum(tensor_types(out_path).values()),
    )


# --------------------------------------------------------------------------- llama.cpp's converter


def converter_home() -> Path:
    """Where llama.cpp's convert_hf_to_gguf.py (+ its `conversion/` and `gguf-py/`) is kept, per version
    of llama-cpp-python (the sdist vendors the llama.cpp it was built from)."""
    from importlib.metadata import version

    from ..runlayout import cache_home

    return cache_home() / f"llama.cpp-convert-{version('llama-cpp-python')}"


def ensure_llama_cpp_converter(quiet: bool = False) -> Path:
    """convert_hf_to_gguf.py of the llama.cpp that the installed llama-cpp-python vendors.

    Taken from the llama-cpp-python source distribution on PyPI (`pip download --no-binary`), the same
    file pip built the installed wheel from (pip's cache usually serves it without a download); kept under
    `converter_home()`. `llamaduo prepare` (make install) calls this once.
    """
    import tempfile

    from ..llamacpp import LlamaCppBuildError, extract_vendored, fetch_sdist

    home = converter_home()
    script = home / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
    with tempfile.TemporaryDirectory(prefix="llamaduo-sdist-") as tmp:
        try:
            archive = fetch_sdist(tmp)
        except LlamaCppBuildError as exc:
            raise GGUFExportError(
                f"{exc}\nalternatively set deploy.convert_script to a llama.cpp checkout's convert_hf_to_gguf.py"
            ) from exc
        staging = home.with_name(home.name + f".tmp-{os.getpid()}")
        extract_vendored(archive, staging, wanted)
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise GGUFExportError(f"{archive.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        os.replace(staging, home)
    if not quiet:
        print(f"llama.cpp converter: {script}")
    return script


def _use_builtin(model_dir: Path) -> bool:
    """The built-in exporter handles Llama-architecture folders with a byte-level BPE tokenizer."""
    config = read_json(model_dir / "config.json")
    arch = (config.get("architectures") or ["?"])[0]
    tok_file = model_dir / "tokenizer.json"
    if arch not in LLAMA_ARCHITECTURES or not tok_file.is_file():
        return False
    spec = read_json(tok_file)
    return spec.get("model", {}).get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))


def export_all(cfg: RunConfig, layout: RunLayout, merged_dir: str | Path | None = None) -> list[GGUFExport]:
    """Every `deploy.gguf_types` file of the merged model, each checked for tokenizer agreement.

    f32/f16/bf16/q8_0 come from the converter (`deploy.converter`: the built-in one for Llama-architecture
    students, llama.cpp's convert_hf_to_gguf.py for the rest); the K-quants and q4_0/q5_0 are made from the
    F16 file by llama.cpp's quantizer (an F16 file is written for it when f16 is not listed, then removed).
    """
    from ..config import GGUF_QUANTIZED_TYPES

    merged_dir = Path(merged_dir or layout.merged_dir)
    licence, upstream, _ = base_licence(cfg.student.model_id)
    dep = cfg.deploy
    builtin = dep.converter == "builtin" or (
        dep.converter == "auto" and not dep.convert_script and _use_builtin(merged_dir)
    )
    pre = tokenizer_pre_for(cfg) if builtin else ""
    quantized = [q for q in dep.gguf_types if q in GGUF_QUANTIZED_TYPES]
    converted = [q for q in dep.gguf_types if q not in GGUF_QUANTIZED_TYPES]
    temporary_f16 = bool(quantized) and "f16" not in converted
    exports: dict[str, GGUFExport] = {}
    for qtype in converted + (["f16"] if temporary_f16 else []):
        out = layout.gguf_file(qtype)
        if builtin:
            result = export_gguf(
                merged_dir,
                out,
                qtype,
                tokenizer_pre=pre,
                name=f"{cfg.run_name} ({upstream})",
                licence=licence,
            )
        else:
            script = dep.convert_script or ensure_llama_cpp_converter(quiet=True)
            result = convert_with_llama_cpp(
                script, merged_dir, out, qtype, tokenizer_pre=dep.gguf_tokenizer_pre
            )
        exports[qtype] = result
    for qtype in quantized:
        exports[qtype] = quantize_gguf(exports["f16"].path, layout.gguf_file(qtype), qtype)
    if temporary_f16:
        exports.pop("f16").path.unlink()
    for result in exports.values():
        check = check_gguf_tokenizer(result.path, merged_dir)
        if not check["ok"]:
            raise GGUFExportError(
                f"{result.path}: llama.cpp tokenizes {len(check['mismatches'])} of {check['probes']} probe texts "
                f"differently from the HF tokenizer (first: {check['mismatches'][0]}); the pre-tokenizer "
                f"'{pre}' is probably wrong: set deploy.gguf_tokenizer_pre or deploy.converter: llama.cpp"
            )
    return [exports[q] for q in dep.gguf_types]


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
