"""The student and its weights, shared by the stages (layer 5 of the package): how it is spoken to
(`chat`), loaded (`loading`), merged with its adapters (`merge`), exported to GGUF and cached per cycle
(`gguf`, licence facts in `licence`), and how it answers (`generate`: the engines and `answer_prompts`).

02 (`finetune`) trains it, 03 (`inference`) writes its answers, 04 (`evaluate`) answers Table 1's
base-student row with it and sends judges student-shaped requests, 06 (`deploy`) ships it. This package
imports none of them: only services, infrastructure and foundation modules.
"""

from __future__ import annotations

from .chat import (
    CHAT_TEMPLATES,
    apply_chat_template_setting,
    chat_template_source,
    prompt_token_ids,
    stop_token_ids,
    student_messages,
)
from .generate import (
    LLAMACPP_SAMPLER,
    BatchOutput,
    Sample,
    answer_prompts,
    decode_samples,
    generation_params,
    llamacpp_requests,
    resolve_engine,
    sample_batch,
)
from .gguf import (
    LLAMA_ARCHITECTURES,
    PROBE_TEXTS,
    GGUFExport,
    GGUFExportError,
    base_gguf,
    check_gguf_tokenizer,
    current_cycle_gguf,
    cycle_gguf,
    export_gguf,
    gguf_string,
    tensor_types,
    tokenizer_pre_for,
)
from .licence import BASE_LICENCES, base_licence
from .loading import (
    StudentError,
    cpu_has_native_bf16,
    cuda_available,
    load_model,
    load_student,
    load_tokenizer,
    model_revision,
    quiet_peft_deprecations,
    resolve_dtype,
    resolve_quantization,
)
from .merge import MergeResult, merge_adapter, stack_adapters

__all__ = [
    "CHAT_TEMPLATES",
    "apply_chat_template_setting",
    "chat_template_source",
    "prompt_token_ids",
    "stop_token_ids",
    "student_messages",
    "LLAMACPP_SAMPLER",
    "BatchOutput",
    "Sample",
    "answer_prompts",
    "decode_samples",
    "generation_params",
    "llamacpp_requests",
    "resolve_engine",
    "sample_batch",
    "LLAMA_ARCHITECTURES",
    "PROBE_TEXTS",
    "GGUFExport",
    "GGUFExportError",
    "base_gguf",
    "check_gguf_tokenizer",
    "current_cycle_gguf",
    "cycle_gguf",
    "export_gguf",
    "gguf_string",
    "tensor_types",
    "tokenizer_pre_for",
    "BASE_LICENCES",
    "base_licence",
    "StudentError",
    "cpu_has_native_bf16",
    "cuda_available",
    "load_model",
    "load_student",
    "load_tokenizer",
    "model_revision",
    "quiet_peft_deprecations",
    "resolve_dtype",
    "resolve_quantization",
    "MergeResult",
    "merge_adapter",
    "stack_adapters",
]
