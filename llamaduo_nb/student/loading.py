"""The student's weights in memory: device, dtype and quantization decisions, the base checkpoint with its
chat template (`load_student`; its tokenizer alone: `load_tokenizer`), and the base with a cycle's LoRA
adapter, merged or not (`load_model`).

02 trains what `load_student` returns; 03's transformers engine, 06's merge and the per-cycle GGUF cache
build the fine-tuned model with `load_model`, so every stage sees the same weights and tokenizer.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig, StudentConfig
from ..embedded import resolve_model_path
from ..jsonio import atomic_dir, read_json
from .chat import apply_chat_template_setting


class StudentError(RuntimeError):
    """The student's weights or tokenizer are not what a step needs; the message says which folder."""


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_quantization(setting: str) -> str:
    """'4bit' (QLoRA) or 'none' (plain LoRA). `auto` means 4-bit exactly when CUDA and bitsandbytes exist."""
    has_cuda = cuda_available()
    if setting == "auto":
        if not has_cuda:
            return "none"
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return "none"
        return "4bit"
    if setting == "4bit":
        if not has_cuda:
            raise ConfigError(
                "finetune.quantization: '4bit' (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no "
                "CUDA device. Use quantization: auto (plain LoRA on CPU) or none."
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "finetune.quantization: '4bit' needs bitsandbytes: pip install 'llamaduo-nb[gpu]'"
            ) from exc
    return setting


def resolve_dtype(student: StudentConfig, on_cuda: bool) -> str:
    """The torch dtype name to load the student in: `auto` is bfloat16 on a GPU that has it, else float32."""
    if student.torch_dtype != "auto":
        return student.torch_dtype
    if on_cuda:
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def cpu_has_native_bf16() -> bool:
    import torch

    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


@contextlib.contextmanager
def quiet_peft_deprecations() -> Iterator[None]:
    """peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5.2x deprecates: a warning the
    user can do nothing about in every notebook; silenced here and nowhere else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_tokenizer(student: StudentConfig) -> Any:
    """The student base's tokenizer alone (no weights), with the chat template of `student.chat_template`:
    what `load_student` gives 02, for counting tokens (01's token statistics). The embedded default loads
    offline from its dequantised folder."""
    from transformers import AutoTokenizer

    path = resolve_model_path(student.model_id)
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=student.revision, trust_remote_code=student.trust_remote_code
    )
    apply_chat_template_setting(tokenizer, student, str(path))
    return tokenizer


def load_student(student: StudentConfig, quantization: str = "none", dtype: str | None = None):
    """(model, tokenizer, model_path) for the student base; 4-bit NF4 when `quantization == '4bit'`.

    The tokenizer carries the chat template of `student.chat_template` when the params give one.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(student.model_id)
    if student.cpu_threads is not None:
        torch.set_num_threads(student.cpu_threads)
    on_cuda = cuda_available()
    dtype = dtype or resolve_dtype(student, on_cuda)
    kwargs: dict[str, Any] = {
        "revision": student.revision,
        "trust_remote_code": student.trust_remote_code,
        "dtype": getattr(torch, dtype),
    }
    if quantization == "4bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, dtype),
        )
        # One full copy per process: under `accelerate launch` each rank holds the model on its own GPU.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    tokenizer = load_tokenizer(student)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer, path


def load_model(cfg: RunConfig, adapter_dir: Path | None, merge: bool = True) -> tuple[Any, Any, str]:
    """(model, tokenizer, base model path): base + the cycle's LoRA adapter, merged into it if `merge`;
    with `adapter_dir` None the student before fine-tuning (Table 1's base-student row)."""
    if adapter_dir is not None and not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} holds no adapter_config.json: run 02_finetune for this cycle first"
        )
    dtype = resolve_dtype(cfg.student, cuda_available())
    model, tokenizer, path = load_student(cfg.student, "none", dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        if (adapter_dir / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        with quiet_peft_deprecations():
            model = PeftModel.from_pretrained(model, adapter_dir)
        if merge:
            model = model.merge_and_unload()
    if cuda_available():
        model = model.to("cuda")
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, path


def model_revision(student: StudentConfig, model_path: str) -> str | None:
    """The configured revision, or for the embedded model the GGUF it was converted from."""
    if student.revision:
        return student.revision
    marker = Path(model_path) / "llamaduo_source.json"
    if marker.is_file():
        sha = read_json(marker).get("gguf_sha256")
        if sha:
            return f"gguf-sha256:{sha[:16]}"
    return None


def save_model_folder(model: Any, tokenizer: Any, out_dir: str | Path, what: str) -> Path:
    """`model` and `tokenizer` as a standard HF folder at `out_dir`, written whole (`atomic_dir`) and refused
    up front when the disk cannot hold the weights (their bytes in memory, what safetensors writes)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with atomic_dir(out_dir, need_bytes=weights, what=what) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
