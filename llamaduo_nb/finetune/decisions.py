"""What 02 decides before training: precision per device, the LoRA shape (Table 5), the step count, where
a cycle starts (continual fine-tuning) and the rank its adapter stacks to, threads per process."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..config import FinetuneConfig, StudentConfig, table5_lora
from ..jsonio import (
    read_json,
)
from ..runlayout import RunLayout
from ..student import (
    cpu_has_native_bf16,
    resolve_dtype,
)

# --------------------------------------------------------------------------- decisions made before training


def training_precision(student: StudentConfig, on_cuda: bool) -> tuple[str, str]:
    """(dtype the weights are loaded in, mixed precision of the training steps: "bf16" | "fp16" | "no").

    The paper trains in bfloat16. On a GPU the weights are loaded in bf16 (fp16 without bf16 support). On a
    CPU with native bf16 (AVX512-BF16 / AMX) `auto` keeps float32 weights and runs the steps under bf16
    autocast: measured here 143 vs 70 tokens/s of LoRA forward+backward (1 thread, 4x128 tokens). Without
    native bf16 it would be emulated and slower, so float32 is kept.
    """
    dtype = resolve_dtype(student, on_cuda)
    if dtype == "bfloat16":
        return dtype, "bf16"
    if dtype == "float16":
        return dtype, "fp16"
    if student.torch_dtype == "auto" and not on_cuda and cpu_has_native_bf16():
        return dtype, "bf16"
    return dtype, "no"


def lora_shape(ft: FinetuneConfig, n_rows: int) -> tuple[int, int, str]:
    """(rank, alpha, where they came from): explicit params win, otherwise the paper's Table 5 schedule."""
    if ft.lora_r is None:
        r, alpha = table5_lora(n_rows)
        if ft.lora_alpha is not None:
            return r, ft.lora_alpha, "table5 rank, params alpha"
        return r, alpha, f"table5 ({n_rows} rows)"
    return ft.lora_r, ft.lora_alpha if ft.lora_alpha is not None else 2 * ft.lora_r, "params"


def planned_steps(ft: FinetuneConfig, n_rows: int, world_size: int = 1) -> int:
    if ft.max_steps > 0:
        return ft.max_steps
    per_step = ft.per_device_batch_size * ft.gradient_accumulation_steps * world_size
    return max(1, math.ceil(math.ceil(n_rows / per_step) * ft.num_epochs))


# --------------------------------------------------------------------------- continual fine-tuning


def previous_adapter(layout: RunLayout, cycle: int) -> Path:
    """The adapter folder of cycle `cycle - 1`, which `start_from: previous_*` builds on."""
    previous = layout.adapter_dir(cycle - 1)
    if not (previous / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"finetune.start_from needs the model of cycle {cycle - 1}, but {previous} holds no adapter; "
            f"run 02_finetune for cycle {cycle - 1} first, or set finetune.start_from: base"
        )
    return previous


def rank_chain(start_from: str, cycle: int, lora_r: int, previous: list[dict] | None) -> list[dict]:
    """The LoRAs the saved adapter of `cycle` carries: [{"cycle": created in, "rank": r}, ...], oldest first.

    `previous` is cycle t-1's chain (its finetune.json). `base` saves this cycle's LoRA alone;
    `previous_adapter` trains cycle t-1's LoRA further, so the chain stays what it was (one LoRA, the
    first cycle's rank); `previous_merged` stacks a fresh LoRA on everything before it, so the chain grows
    by one each cycle. The effective rank of the shipped update W - W_base is the sum of the chain's ranks
    (`effective_rank`; an upper bound that holds with equality unless two cycles' updates happen to
    share directions): 8 + 8 + ... + 32 + 32 + 32 = 160 for the paper configuration at 256K, where
    Table 5 says 32.
    """
    if cycle == 0 or start_from == "base":
        return [{"cycle": cycle, "rank": lora_r}]
    if previous is None:
        raise ValueError(
            f"finetune.start_from: {start_from} at cycle {cycle} needs cycle {cycle - 1}'s rank chain"
        )
    if start_from == "previous_adapter":
        return [dict(link) for link in previous]
    if start_from == "previous_merged":
        return [*(dict(link) for link in previous), {"cycle": cycle, "rank": lora_r}]
    raise ValueError(f"finetune.start_from: unknown value {start_from!r}")


def effective_rank(chain: list[dict]) -> int:
    """Rank of the saved adapter's update to the base weights: the sum of the stacked LoRAs' ranks."""
    return sum(int(link["rank"]) for link in chain)


def rank_text(chain: list[dict]) -> str:
    """The effective rank and what it sums: "24 (8 + 16)" for a chain of two LoRAs, "8" for one."""
    ranks = [str(link["rank"]) for link in chain]
    return f"{effective_rank(chain)} ({' + '.join(ranks)})" if len(ranks) > 1 else "".join(ranks)


def previous_rank_chain(layout: RunLayout, cycle: int) -> list[dict]:
    """Cycle t-1's chain from its finetune.json; a record written before chains were recorded gives its
    saved adapter's rank as one link (the sum stays right, the split per cycle is lost)."""
    record = read_json(layout.train_summary(cycle - 1)) if layout.train_summary(cycle - 1).is_file() else {}
    if "rank_chain" in record:
        return record["rank_chain"]
    config = read_json(previous_adapter(layout, cycle) / "adapter_config.json")
    return [{"cycle": cycle - 1, "rank": int(config["r"])}]


def cpu_threads_per_process(num_processes: int, cpu_threads: int | None = None) -> int:
    """torch threads for each of `num_processes` CPU training processes on this machine: the usable cores
    (or `student.cpu_threads`, the budget for the whole run) split evenly, at least 1, so two processes on
    two cores run one thread each instead of fighting over the cores with two each."""
    if cpu_threads:
        budget = cpu_threads
    elif hasattr(os, "sched_getaffinity"):
        budget = len(os.sched_getaffinity(0))
    else:
        budget = os.cpu_count() or 1
    return max(1, budget // max(1, num_processes))
