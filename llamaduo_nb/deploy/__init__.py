"""06_deploy: ship the student of one cycle as files and an endpoint people already know how to use.

Steps, each a function the notebook calls:

1. `select_cycle` — the first cycle whose decision met epsilon, or the best one by the decision value.
2. `student.merge_adapter` — the cycle's LoRA adapter merged into the base weights (peft
   `merge_and_unload`), saved as a plain Hugging Face folder (safetensors, tokenizer, chat template,
   generation config), with a model card written from the run (`write_model_card`).
3. `export_all` — GGUF files for llama.cpp / Ollama. The built-in exporter (`student.export_gguf`) covers
   llama-architecture students with a byte-level BPE tokenizer (the embedded SmolLM2; Llama-3-style models
   with `deploy.gguf_tokenizer_pre: llama-bpe`); for the embedded student its F16 and Q8_0 tensors were
   checked byte for byte against llama.cpp's own `convert_hf_to_gguf.py` (llama-cpp-python 0.3.36 sdist):
   identical. Other students (e.g. Gemma) are converted by that script when `deploy.convert_script` names
   it; K-quants come from llama.cpp's quantizer. Every export is checked: llama.cpp must tokenize probe
   texts exactly like the Hugging Face tokenizer (`student.check_gguf_tokenizer`).
4. `write_modelfile` (Ollama) and `write_vllm_script` (GPU users; generated, not run here).
5. Parity: `greedy_parity` compares greedy answers of the in-process merged model with the served GGUF
   (exact-match rate per GGUF type, plus teacher-forced token agreement, which tells a single quantisation
   near-tie flip from a broken export); `judged_parity` re-answers the test prompts through the served
   endpoint, judges them with 04's judge functions and compares V and C@zeta (bootstrap CIs) with the
   evaluated cycle, flagging a drop of the decision statistic beyond `deploy.parity_tolerance`
   (`planned_parity_calls`: its paid judge calls, as the forecast prices them).
6. `push_to_hub` — optional upload when HF_TOKEN is set.

The served endpoint is reached through `ServicePool` like every other model, so its calls land in the
run's cache and ledger (at $0).
"""

from __future__ import annotations

from .card import card_data, dataset_lineage, eval_results, model_card, write_model_card
from .gguf import (
    convert_with_llama_cpp,
    ensure_llama_cpp_converter,
    export_all,
    exports_table,
    quantize_gguf,
)
from .hub import PushResult, hub_token, push_datasets, push_if_configured, push_to_hub
from .launchers import llamacpp_script_text, vllm_script_text, write_llamacpp_script, write_vllm_script
from .ollama import (
    OLLAMA_CHATML,
    chat_template_parts,
    check_modelfile_template,
    modelfile_text,
    read_modelfile,
    write_modelfile,
)
from .parity import (
    GreedyAnswer,
    answer_profile,
    greedy_parity,
    greedy_summary,
    greedy_transformers,
    judge_attribution,
    judged_parity,
    parity_judgments,
    parity_table,
    parity_verdict,
    planned_parity_calls,
    plot_parity,
    quant_table,
    sampler_comparison,
    served_export,
    served_provider,
    test_rows,
    token_agreement,
)
from .report import write_report
from .select import CycleChoice, DeployError, cycle_table, plot_cycles, select_cycle

__all__ = [
    "DeployError",
    "CycleChoice",
    "cycle_table",
    "select_cycle",
    "plot_cycles",
    "model_card",
    "write_model_card",
    "card_data",
    "dataset_lineage",
    "eval_results",
    "ensure_llama_cpp_converter",
    "quantize_gguf",
    "convert_with_llama_cpp",
    "export_all",
    "exports_table",
    "chat_template_parts",
    "OLLAMA_CHATML",
    "modelfile_text",
    "write_modelfile",
    "check_modelfile_template",
    "read_modelfile",
    "vllm_script_text",
    "write_vllm_script",
    "llamacpp_script_text",
    "write_llamacpp_script",
    "test_rows",
    "GreedyAnswer",
    "greedy_transformers",
    "token_agreement",
    "served_provider",
    "greedy_parity",
    "greedy_summary",
    "judged_parity",
    "parity_judgments",
    "planned_parity_calls",
    "served_export",
    "parity_verdict",
    "parity_table",
    "plot_parity",
    "answer_profile",
    "judge_attribution",
    "sampler_comparison",
    "quant_table",
    "push_to_hub",
    "push_datasets",
    "hub_token",
    "PushResult",
    "push_if_configured",
    "write_report",
]
