"""06 step 4: an Ollama Modelfile and launch scripts for the llama.cpp and vLLM servers."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import RunConfig
from ..embedded import EMBEDDED_PREFIX, NEUTRAL_SAMPLING_ARGS, kv_cache_args, resolve_model_path
from ..jsonio import atomic_write, read_json
from ..runlayout import RunLayout
from .select import CycleChoice


def _relative(path: Path, start: Path) -> str:
    """`path` relative to `start` (the launcher's folder), so a run folder can be moved or copied."""
    return os.path.relpath(path.resolve(), start.resolve())


def vllm_script_text(
    served_name: str,
    base_model: str,
    adapter_rel: str,
    max_model_len: int,
    lora_rank: int = 16,
    *,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
) -> str:
    """A bash launcher for `vllm serve` (GPU machines): merged weights by default, base + LoRA with MODE=lora.

    Paths of the run (merged folder, adapter) are relative to the script's folder; parallelism and memory
    come from the run's `inference.*` settings and can be overridden per launch (TP=4 ./serve_vllm.sh).
    """
    return f"""#!/usr/bin/env bash
# OpenAI-compatible endpoint for this run's student with vLLM (needs CUDA GPUs and `pip install vllm`).
#   ./serve_vllm.sh                      serves the merged weights in ./merged
#   MODE=lora ./serve_vllm.sh            serves the base model with the cycle's LoRA adapter attached
#   TP=4 ./serve_vllm.sh                 tensor parallel over 4 GPUs of this node
#   TP=8 PP=2 ./serve_vllm.sh            16 GPUs on 2 nodes: start a Ray cluster first (ray start --head on
#                                        one node, ray start --address=HEAD:6379 on the other), run this on the head
#   GPU_MEM=0.8 ./serve_vllm.sh          leave 20% of each GPU's memory to other processes
# Then point any OpenAI client at http://$HOST:$PORT/v1 with model "{served_name}".
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
MODE="${{MODE:-merged}}"
HOST="${{HOST:-127.0.0.1}}"
PORT="${{PORT:-8000}}"
TP="${{TP:-{tensor_parallel_size}}}"
PP="${{PP:-{pipeline_parallel_size}}}"
GPU_MEM="${{GPU_MEM:-{gpu_memory_utilization:g}}}"
BASE_MODEL="${{BASE_MODEL:-{base_model}}}"
command -v nvidia-smi >/dev/null || {{ echo "vLLM needs an NVIDIA GPU (nvidia-smi not found)" >&2; exit 1; }}
python -c "import vllm" 2>/dev/null || {{ echo "vLLM is not installed: pip install vllm" >&2; exit 1; }}
COMMON=(--max-model-len {max_model_len} --tensor-parallel-size "$TP" --pipeline-parallel-size "$PP"
        --gpu-memory-utilization "$GPU_MEM" --host "$HOST" --port "$PORT")
if [ "$MODE" = "lora" ]; then
  exec vllm serve "$BASE_MODEL" --served-model-name "{served_name}-base" \\
    --enable-lora --max-lora-rank {max(lora_rank, 8)} --lora-modules "{served_name}=$HERE/{adapter_rel}" \\
    "${{COMMON[@]}}"
else
  exec vllm serve "$HERE/merged" --served-model-name "{served_name}" "${{COMMON[@]}}"
fi
"""


def write_vllm_script(cfg: RunConfig, layout: RunLayout, choice: CycleChoice) -> Path:
    """deploy/serve_vllm.sh (generated for GPU users; not run here)."""
    base = (
        resolve_model_path(cfg.student.model_id)
        if cfg.student.model_id.startswith(EMBEDDED_PREFIX)
        else cfg.student.model_id
    )
    adapter = layout.adapter_dir(choice.cycle)
    rank = int(read_json(adapter / "adapter_config.json").get("r", 16))
    inf = cfg.inference
    text = vllm_script_text(
        cfg.run_name,
        base,
        _relative(adapter, layout.vllm_launch.parent),
        cfg.deploy.n_ctx,
        rank,
        tensor_parallel_size=inf.tensor_parallel_size,
        pipeline_parallel_size=inf.pipeline_parallel_size,
        gpu_memory_utilization=inf.gpu_memory_utilization,
    )
    with atomic_write(layout.vllm_launch) as fh:
        fh.write(text)
    os.chmod(layout.vllm_launch, 0o755)
    return layout.vllm_launch


def llamacpp_script_text(served_name: str, gguf_rel: str, n_ctx: int, kv_cache: str = "f16") -> str:
    """A bash launcher for llama.cpp's server exactly as 06 ran it for the parity check: llama-server with
    OpenAI's sampling semantics (`embedded.NEUTRAL_SAMPLING_ARGS`), parallel slots, the KV cache type 03 answered
    with (`inference.llamacpp_kv_cache`), on a GGUF of this run."""
    import shlex

    neutral = " ".join(shlex.quote(a) for a in [*NEUTRAL_SAMPLING_ARGS, *kv_cache_args(kv_cache)])
    return f"""#!/usr/bin/env bash
# OpenAI-compatible endpoint for this run's student on CPU (or a CUDA/Metal build of llama.cpp), the server
# 06's parity check talked to:
#   ./serve_llamacpp.sh                           serves ./{gguf_rel}
#   GGUF=gguf/model-q4_k_m.gguf ./serve_llamacpp.sh   another export of this run
#   PORT=8081 HOST=0.0.0.0 THREADS=8 SLOTS=16 ./serve_llamacpp.sh
# Then point any OpenAI client at http://$HOST:$PORT/v1 with model "{served_name}".
# The server: $LLAMA_SERVER, else `llama-server` on PATH (llama.cpp releases, brew, your own build), else the
# one llamaduo_nb built from llama-cpp-python's sources (`llamaduo prepare`). Sampling follows OpenAI's API
# (temperature and top_p only): llama.cpp's own defaults (top_k 40, min_p 0.05, ...) are switched off.
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
GGUF="${{GGUF:-{gguf_rel}}}"
HOST="${{HOST:-127.0.0.1}}"
PORT="${{PORT:-8080}}"
SLOTS="${{SLOTS:-4}}"
PYTHON="${{PYTHON:-python}}"
if [ -z "${{LLAMA_SERVER:-}}" ]; then
  if command -v llama-server >/dev/null 2>&1; then
    LLAMA_SERVER="$(command -v llama-server)"
  else
    LLAMA_SERVER="$("$PYTHON" -c 'from llamaduo_nb.llamacpp import ensure_llama_server; print(ensure_llama_server())')"
  fi
fi
ARGS=(--model "$HERE/$GGUF" --alias "{served_name}" --host "$HOST" --port "$PORT"
      --ctx-size "$(( {n_ctx} * SLOTS ))" --parallel "$SLOTS" --no-kv-unified --no-webui --jinja
      --reasoning-format none {neutral})
if [ -n "${{THREADS:-}}" ]; then ARGS+=(--threads "$THREADS" --threads-batch "$THREADS"); fi
exec "$LLAMA_SERVER" "${{ARGS[@]}}"
"""


def write_llamacpp_script(cfg: RunConfig, layout: RunLayout, gguf_path: Path) -> Path:
    """deploy/serve_llamacpp.sh for the served GGUF (`deploy.serve_gguf`)."""
    text = llamacpp_script_text(
        cfg.run_name,
        _relative(gguf_path, layout.deploy_dir),
        cfg.deploy.n_ctx,
        cfg.inference.llamacpp_kv_cache,
    )
    with atomic_write(layout.llamacpp_launch) as fh:
        fh.write(text)
    os.chmod(layout.llamacpp_launch, 0o755)
    return layout.llamacpp_launch
