"""02 · Fine-tune: LoRA supervised fine-tuning of the student on the data of one LlamaDuo cycle.

Cycle t trains on the coverage train split plus every synthetic row accepted in cycles 0..t-1 (paper
§3.2), written first to `cycle_NN/train_data.jsonl` with one count per origin.

Where cycle t starts (`finetune.start_from`). The paper's eq. 1 fine-tunes pi(t) from pi(t-1) and raises
the LoRA rank with the data volume (Table 5). `previous_merged` does both: cycle t-1's adapter is merged
into the base, a fresh LoRA of the Table-5 rank for this cycle's volume is trained on top, and the saved
adapter stacks the two (`student.stack_adapters`: one LoRA of rank r1 + r2 that loads on the plain base,
so 03, 06 and vLLM need nothing else). `previous_adapter` keeps training cycle t-1's adapter at its rank.
`base` (the default) trains a fresh LoRA on the base each cycle on all data so far: every cycle then
sees the same number of steps from the same start, so the difference between cycles is the data alone,
which is what the small demo can show; the paper configuration uses `previous_merged`.

Chat template: a base checkpoint without one (google/gemma-7b) gets `student.chat_template` (a preset
or a Jinja string) instead of a refusal. Experiment tracking: `finetune.report_to` (tensorboard,
trackio, mlflow, wandb; TensorBoard event files go to `cycle_NN/runs/`).

How the loss sees a row. Every row becomes a conversational prompt-completion pair: the prompt is one
user turn (`student_messages`), the completion the assistant turn. TRL tokenizes the prompt with the
chat template's generation prompt and the pair as a whole, and with `completion_only_loss=True` the
prompt positions get the label -100: only the answer and its end-of-turn token are learned. This was
chosen over `assistant_only_loss=True` after checking both on SmolLM2: the masks are identical, but
`assistant_only_loss` needs a chat template with `{% generation %}` markers, which SmolLM2's ChatML
template (like most) lacks and TRL can only patch for the families it knows, while prompt-completion
works for every template that renders the prompt as a prefix of the full conversation (TRL warns when
one does not). `prepare` re-checks the tokenized rows (all of them, or 2000 evenly spaced ones of a
large set) and refuses to train when a prompt token would be learned.

Precision: on a GPU the weights load in bfloat16 (the paper's data type; float16 without bf16 support).
On a CPU with native bf16 the weights stay float32 and the steps run under bf16 autocast (about 1.5-2x
faster here, same losses to two decimals); other CPUs train in float32.

Batches are padding-free (`finetune.padding_free`, on by default): TRL's collator concatenates a batch's
rows into one sequence with position_ids restarting at every row, and transformers derives a
block-diagonal causal mask from them (sdpa/eager; flash-attention uses the boundaries directly), so no
pad token is computed and the per-token loss is the padded batch's (tested in `test_finetune.py`).
On CPU the LM head projects only the positions whose next token is learned (`learned_positions_trainer`:
1.37x a step on the demo's batches, same loss and gradients as TRL's path, tested). Measured against TRL's
SFTTrainer, defaults and configured as ours, in `make bench` (`benches/bench_finetune.py`).

LoRA rank/alpha follow the paper's Table 5 by data volume (`config.table5_lora`) unless set; dropout
0.05, cosine schedule, max length 1024 by default. `quantization: auto` picks QLoRA (4-bit NF4 through
bitsandbytes) when CUDA is present and plain LoRA otherwise; the choice is recorded in `finetune.json`.

Several processes (`finetune.num_processes > 1`): the runner starts this module's CLI under
`accelerate launch`, one process per GPU, or on a machine without CUDA that many CPU processes joined over
gloo (`runner.finetune_launch_command`; by hand, after 01:

    accelerate launch --multi_gpu --num_processes 2 --main_process_port 0 -m llamaduo_nb.finetune outputs/<run> --cycle 0

where `--multi_gpu` only selects accelerate's local multi-process launcher). Each process trains on its
share of every global batch (DDP; the loss is normalised by the tokens of the whole global batch, so the
steps are those of one process at the same global batch); on CPU the cores are split between the
processes (`cpu_threads_per_process`). Only rank 0 writes the adapter, the training log, the loss plot and
`finetune.json`. Executed on CPU by `tests/test_ddp_cpu.py`; on several GPUs (`--multi_gpu`, DeepSpeed or
FSDP through `finetune.accelerate_config`) it is written but was never run here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .config import ConfigError, FinetuneConfig, RunConfig, StudentConfig, load_config, table5_lora
from .jsonio import (
    DataFileError,
    atomic_dir,
    iter_jsonl,
    read_json,
    save_figure,
    sha256_file,
    write_json,
    write_jsonl,
)
from .runlayout import RunLayout
from .student import (
    chat_template_source,
    cpu_has_native_bf16,
    cuda_available,
    load_student,
    quiet_peft_deprecations,
    resolve_dtype,
    resolve_quantization,
    stack_adapters,
    student_messages,
)

COVERAGE_ORIGIN = "coverage"
LOSS_MASK_METHOD = "prompt-completion, completion_only_loss (prompt tokens labelled -100)"


# --------------------------------------------------------------------------- the data of a cycle


def synthetic_origin(cycle: int) -> str:
    return f"synthetic/cycle_{cycle:02d}"


def _checked_rows(path: Path, origin: str) -> list[dict]:
    rows = []
    for i, row in enumerate(iter_jsonl(path), start=1):
        for key in ("instruction", "response"):
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DataFileError(path, i, key, f"expected a non-empty string, got {value!r}")
        rows.append({**row, "origin": origin})
    return rows


@dataclass(frozen=True)
class TrainData:
    """The rows of one cycle and where they came from."""

    path: Path
    rows: list[dict]
    by_origin: dict[str, int]
    missing_synthetic: list[int] = field(default_factory=list)  # earlier cycles without a synthetic file

    def table(self) -> pd.DataFrame:
        frame = pd.DataFrame(
            [{"origin": origin, "rows": n} for origin, n in self.by_origin.items()],
            columns=["origin", "rows"],
        )
        return pd.concat(
            [frame, pd.DataFrame([{"origin": "total", "rows": len(self.rows)}])], ignore_index=True
        )


def build_train_data(layout: RunLayout, cycle: int, write: bool = True) -> TrainData:
    """Write `train_data.jsonl` of `cycle`: coverage train split ∪ synthetic rows accepted in cycles < `cycle`.

    Every row keeps its fields and gains `origin` ("coverage" or "synthetic/cycle_NN"). `write=False`
    (the other processes of a multi-process launch, after rank 0 wrote it) only reads.
    """
    if not layout.train_file.is_file():
        raise FileNotFoundError(f"{layout.train_file} not found: run 01_coverage first")
    rows = _checked_rows(layout.train_file, COVERAGE_ORIGIN)
    if not rows:
        raise DataFileError(layout.train_file, None, None, "the coverage train split is empty")
    missing = []
    for previous in range(cycle):
        path = layout.synthetic_file(previous)
        if path.is_file():
            rows.extend(_checked_rows(path, synthetic_origin(previous)))
        else:
            missing.append(previous)
    out = layout.train_data_file(cycle)
    if write:
        write_jsonl(out, rows)
    counts = Counter(row["origin"] for row in rows)
    by_origin = {COVERAGE_ORIGIN: counts.pop(COVERAGE_ORIGIN, 0), **dict(sorted(counts.items()))}
    return TrainData(out, rows, by_origin, missing)


def to_prompt_completion(rows: list[dict]) -> list[dict]:
    """Coverage rows -> TRL's conversational prompt-completion format."""
    return [
        {
            "prompt": student_messages(row["instruction"], row.get("system")),
            "completion": [{"role": "assistant", "content": row["response"]}],
        }
        for row in rows
    ]


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


# --------------------------------------------------------------------------- the training run


@dataclass
class FinetunePlan:
    """Everything decided before the first step; `train` runs it and `summary` describes it."""

    cycle: int
    data: TrainData
    trainer: Any  # trl.SFTTrainer
    tokenizer: Any
    model_path: str
    quantization: str
    device: str
    dtype: str
    mixed_precision: str
    lora_r: int
    lora_alpha: int
    lora_source: str
    init_from: str
    steps: int
    logging_steps: int
    gradient_checkpointing: bool
    loss_mask: dict[str, Any]
    tokenized_rows: int
    truncated_rows: int
    scratch_dir: Path  # the Trainer's output_dir = cycle_NN/checkpoints/, removed once the adapter is saved
    resume_from: str | None = None  # the checkpoint a re-run after a crash continues from
    start_from: str = "base"
    stacked_on: Path | None = None  # previous_merged: the adapter this cycle's LoRA is stacked on when saved
    chat_template_source: str = "checkpoint"
    report_to: list[str] = field(default_factory=list)
    rank_chain: list[dict] = field(default_factory=list)  # the LoRAs the saved adapter carries (`rank_chain`)

    def table(self) -> pd.DataFrame:
        rows = {
            "training rows": len(self.data.rows),
            "rows dropped (prompt >= max_length)": len(self.data.rows) - self.tokenized_rows,
            "rows cut at max_length": self.truncated_rows,
            "initialised from": self.init_from,
            "LoRA rank / alpha": f"{self.lora_r} / {self.lora_alpha} ({self.lora_source})",
            "saved adapter's effective rank": rank_text(self.rank_chain),
            "chat template": self.chat_template_source,
            "experiment tracking": ", ".join(self.report_to) or "none",
            "quantization": "QLoRA 4-bit NF4" if self.quantization == "4bit" else "none (plain LoRA)",
            "device / weights / mixed precision": f"{self.device} / {self.dtype} / {self.mixed_precision}",
            "optimizer steps": self.steps,
            "gradient checkpointing": self.gradient_checkpointing,
            "loss mask": self.loss_mask["method"],
        }
        return pd.DataFrame({"setting": list(rows), "value": [str(v) for v in rows.values()]})


def check_loss_mask(dataset: Any, tokenizer: Any, limit: int = 2000) -> dict[str, Any]:
    """Verify that the prompt is labelled -100 and the completion is learned, on every row (at most `limit`
    evenly spaced rows of a large dataset).

    The prompt is re-tokenized independently (chat template + generation prompt); its tokens must be a
    prefix of the row's input ids and all masked, and every later token must carry its own id as label.
    """
    prompt_tokens = trained_tokens = 0
    step = max(1, math.ceil(len(dataset) / limit))
    checked = range(0, len(dataset), step)
    for i in checked:
        example = dataset[i]
        ids, labels = example["input_ids"], example["labels"]
        prompt_ids = _prompt_ids(tokenizer, example["prompt"])
        n = len(prompt_ids)
        if list(ids[:n]) != list(prompt_ids)[: len(ids[:n])]:
            raise RuntimeError(f"training row {i}: the tokenized prompt is not a prefix of the tokenized row")
        if any(label != -100 for label in labels[:n]):
            raise RuntimeError(f"training row {i}: a prompt token would be learned (label != -100)")
        if list(labels[n:]) != list(ids[n:]):
            raise RuntimeError(f"training row {i}: a completion token is masked out of the loss")
        prompt_tokens += min(n, len(ids))
        trained_tokens += max(0, len(ids) - n)
    return {
        "method": LOSS_MASK_METHOD,
        "rows_checked": len(checked),
        "prompt_tokens_masked": prompt_tokens,
        "completion_tokens_trained": trained_tokens,
    }


def _prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def loss_mask_table(plan: FinetunePlan, row: int = 0, max_tokens: int = 80) -> pd.DataFrame:
    """Token by token for one training row: the token, its label, and whether the loss sees it."""
    example = plan.trainer.train_dataset[row]
    tokens = plan.tokenizer.convert_ids_to_tokens(example["input_ids"])
    frame = pd.DataFrame(
        {
            "token": tokens,
            "label": example["labels"],
            "in loss": [label != -100 for label in example["labels"]],
        }
    )
    if len(frame) <= max_tokens:
        return frame
    # The interesting part is where the prompt ends and the answer starts.
    start = max(0, int((~frame["in loss"]).sum()) - max_tokens // 2)
    return frame.iloc[start : start + max_tokens]


def prepare(cfg: RunConfig, layout: RunLayout, cycle: int) -> FinetunePlan:
    """Build the cycle's data, load the student, attach LoRA and tokenize: everything but the steps."""
    import torch
    from accelerate import PartialState
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    ft = cfg.finetune
    on_cuda = cuda_available()
    # Without CUDA, processes started by `accelerate launch` join over gloo (cpu=True); alone, nothing changes.
    state = PartialState(cpu=not on_cuda)
    main = state.is_main_process
    with state.main_process_first():
        data = build_train_data(layout, cycle, write=main)
    quantization = resolve_quantization(ft.quantization)
    dtype, mixed_precision = training_precision(cfg.student, on_cuda)
    student_cfg = cfg.student
    if state.num_processes > 1 and not on_cuda:  # split the cores: N processes x all cores would thrash
        local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        student_cfg = dataclasses.replace(
            student_cfg, cpu_threads=cpu_threads_per_process(local, cfg.student.cpu_threads)
        )
    set_seed(ft.seed)  # LoRA's A matrices are initialised randomly
    model, tokenizer, model_path = load_student(student_cfg, quantization, dtype)
    gradient_checkpointing = on_cuda  # saves GPU memory; on CPU it only costs time

    peft_config = None
    stacked_on: Path | None = None
    start_from = ft.start_from if cycle > 0 else "base"
    if start_from != "base":
        previous = previous_adapter(layout, cycle)
    if start_from == "previous_adapter":
        if quantization == "4bit":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        with quiet_peft_deprecations():
            model = PeftModel.from_pretrained(model, previous, is_trainable=True)
        lora = model.peft_config["default"]
        lora_r, lora_alpha, lora_source = lora.r, lora.lora_alpha, f"previous adapter (cycle {cycle - 1})"
        init_from = f"adapter of cycle {cycle - 1}, trained further"
    else:
        if start_from == "previous_merged":
            with quiet_peft_deprecations():
                model = PeftModel.from_pretrained(model, previous).merge_and_unload()
            stacked_on = previous
            init_from = f"model of cycle {cycle - 1} (its adapter merged into the base), fresh LoRA"
        else:
            init_from = f"base {cfg.student.model_id}"
        if quantization == "4bit":
            # After a merge: peft folded the previous adapter into the 4-bit weights (dequantise, add, requantise).
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        lora_r, lora_alpha, lora_source = lora_shape(ft, len(data.rows))
        peft_config = LoraConfig(
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=ft.lora_dropout,
            target_modules=ft.target_modules,
            task_type="CAUSAL_LM",
        )

    chain = rank_chain(
        start_from, cycle, lora_r, previous_rank_chain(layout, cycle) if start_from != "base" else None
    )
    report_to = tracking_backends(ft.report_to)
    trainer_report_to, callbacks = tracking_callbacks(report_to, layout.tracking_dir(cycle), main)
    steps = planned_steps(ft, len(data.rows), state.num_processes)
    logging_steps = max(1, min(ft.logging_steps, steps))
    with state.main_process_first():  # rank 0 alone clears stale checkpoints; the others find its folder
        output_dir, resume_from = checkpoint_folder(cfg, layout, cycle, data.path, main)
    try:
        args = SFTConfig(
            output_dir=str(output_dir),
            max_steps=ft.max_steps,
            num_train_epochs=ft.num_epochs,
            per_device_train_batch_size=ft.per_device_batch_size,
            gradient_accumulation_steps=ft.gradient_accumulation_steps,
            learning_rate=ft.learning_rate,
            lr_scheduler_type=ft.lr_scheduler,
            # Rounded down, so a run of a few steps does not spend its first one at learning rate 0.
            warmup_steps=int(ft.warmup_ratio * steps),
            # TRL does not truncate padding-free batches (it refuses max_length with padding_free and no
            # packing); `truncate_rows` below cuts the rows as TRL would (keep_start).
            max_length=None if ft.padding_free else ft.max_length,
            completion_only_loss=True,
            logging_steps=logging_steps,
            logging_first_step=True,
            # crash safety: a re-run of 02 resumes from the newest complete checkpoint (see checkpoint_folder)
            save_strategy="steps" if ft.save_steps > 0 else "no",
            save_steps=max(ft.save_steps, 1),
            save_total_limit=ft.save_total_limit,
            report_to=trainer_report_to or "none",
            run_name=f"{cfg.run_name}-cycle_{cycle:02d}",
            seed=ft.seed,
            data_seed=ft.seed,
            bf16=mixed_precision == "bf16",
            fp16=mixed_precision == "fp16",
            use_cpu=not on_cuda,
            **_checkpointing_arg(gradient_checkpointing),
            include_num_input_tokens_seen="non_padding",
            padding_free=ft.padding_free,
            optim="adamw_torch_fused" if on_cuda else "adamw_torch",
            ddp_find_unused_parameters=False,  # every LoRA weight takes part in every forward pass
            dataloader_num_workers=0,
        )
        dataset = Dataset.from_list(to_prompt_completion(data.rows))
        trainer_class = SFTTrainer if on_cuda else learned_positions_trainer()
        with quiet_peft_deprecations():
            trainer = trainer_class(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=peft_config,
                callbacks=callbacks,
            )
        if ft.padding_free:
            trainer.train_dataset = truncate_rows(trainer.train_dataset, ft.max_length)
        train_dataset = trainer.train_dataset
        if len(train_dataset) == 0:
            raise ConfigError(
                f"finetune.max_length: all {len(data.rows)} rows of {data.path} lost their whole answer to truncation "
                f"at max_length={ft.max_length} tokens (the prompt alone is that long); raise max_length, e.g. 1024"
            )
        loss_mask = check_loss_mask(train_dataset, tokenizer)
        truncated = sum(1 for ids in train_dataset["input_ids"] if len(ids) >= ft.max_length)
    except BaseException:
        if resume_from is None and main:  # never throw away checkpoints of an earlier, crashed attempt
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    device = "cuda" if on_cuda else "cpu"
    if state.num_processes > 1:
        device = f"{device} x{state.num_processes} ({torch.distributed.get_backend()})"
    return FinetunePlan(
        cycle=cycle,
        data=data,
        trainer=trainer,
        tokenizer=tokenizer,
        model_path=model_path,
        quantization=quantization,
        device=device,
        dtype=dtype,
        mixed_precision=mixed_precision,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_source=lora_source,
        init_from=init_from,
        steps=steps,
        logging_steps=logging_steps,
        gradient_checkpointing=gradient_checkpointing,
        loss_mask=loss_mask,
        tokenized_rows=len(train_dataset),
        truncated_rows=truncated,
        scratch_dir=output_dir,
        resume_from=resume_from,
        start_from=start_from,
        stacked_on=stacked_on,
        chat_template_source=chat_template_source(cfg.student),
        report_to=report_to,
        rank_chain=chain,
    )


# Trainer integration name -> the package it needs (what `pip install` wants).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "mlflow": "mlflow", "wandb": "wandb"}


def tracking_backends(setting: list[str] | str) -> list[str]:
    """The Trainer's `report_to` list for `finetune.report_to`; a tracker whose package is missing is an
    error naming it (credentials such as WANDB_API_KEY come from the environment, never from params)."""
    import importlib.util

    names = [setting] if isinstance(setting, str) else list(setting)
    names = [name for name in names if name != "none"]
    for name in names:
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"finetune.report_to: {name} needs the package {package!r}, which is not installed: "
                f"pip install {package}  (or remove {name} from report_to)"
            )
    return names


def tracking_callbacks(report_to: list[str], folder: Path, main: bool = True) -> tuple[list[str], list[Any]]:
    """(report_to for the Trainer, extra callbacks): TensorBoard writes its event files into the run folder
    (`folder`; the Trainer's own output_dir is scratch), through a writer given to its callback rather
    than the TENSORBOARD_LOGGING_DIR environment variable; only the main process opens one (`main`)."""
    if "tensorboard" not in report_to:
        return report_to, []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    others = [name for name in report_to if name != "tensorboard"]
    if not main:
        return others, []
    folder.mkdir(parents=True, exist_ok=True)
    return others, [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder)))]


def checkpoint_fingerprint(cfg: RunConfig, train_data: Path) -> str:
    """What a checkpoint is only valid for: the cycle's data, the student and the training settings."""
    settings = dataclasses.asdict(cfg.finetune)
    for key in ("save_steps", "save_total_limit", "logging_steps"):  # changing these does not change training
        settings.pop(key, None)
    digest = hashlib.sha256()
    sha256_file(train_data, digest)
    digest.update(
        json.dumps([settings, dataclasses.asdict(cfg.student)], sort_keys=True, default=str).encode()
    )
    return digest.hexdigest()[:16]


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete `checkpoint-<step>` in `folder` (trainer_state.json is written last, so a
    checkpoint cut short by a kill has none, or a broken one, and is skipped)."""
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(p.name.split("-")[1]), p)
        for p in folder.glob("checkpoint-[0-9]*")
        if p.name.split("-")[1].isdigit()
    )
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return path
    return None


def checkpoint_folder(
    cfg: RunConfig, layout: RunLayout, cycle: int, train_data: Path, main: bool = True
) -> tuple[Path, str | None]:
    """(the Trainer's output_dir, the checkpoint to resume from or None).

    Checkpoints of an earlier attempt are reused only when they were made from the same data and
    settings; otherwise they are deleted and training starts over. The other processes of a
    multi-process launch (`main=False`) find the folder rank 0 prepared and only look.
    """
    folder = layout.checkpoints_dir(cycle)
    if not main:
        resume = last_checkpoint(folder)
        return folder, None if resume is None else str(resume)
    fingerprint = checkpoint_fingerprint(cfg, train_data)
    marker = folder / "fingerprint.json"
    if folder.exists():
        previous = read_json(marker).get("fingerprint") if marker.is_file() else None
        if previous != fingerprint:
            if last_checkpoint(folder) is not None:
                print(f"02: discarding checkpoints in {folder}: made from other data or settings")
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"fingerprint": fingerprint})
    resume = last_checkpoint(folder)
    if resume is not None:
        print(f"02: resuming from {resume.name} (an earlier attempt stopped there)")
    return folder, None if resume is None else str(resume)


def truncate_rows(dataset: Any, max_length: int) -> Any:
    """TRL's truncation (keep the first `max_length` tokens of input_ids and labels) and its filter (drop
    rows left without a learned token), for padding-free training, where TRL leaves rows untruncated."""
    cut = dataset.map(
        lambda row: {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]},
        desc="Truncating train dataset",
    )
    return cut.filter(
        lambda row: any(label != -100 for label in row["labels"]), desc="Dropping fully masked examples"
    )


@functools.cache
def learned_positions_trainer() -> type:
    """TRL's `SFTTrainer` whose loss runs the LM head only where a token is learned (02 on CPU).

    The LM head of a small student is a large part of its step: SmolLM2-135M projects every position onto
    49,152 vocabulary entries (28M of its 135M weights), and with the completion-only loss most positions are
    prompt tokens whose logits are thrown away. TRL 1.16's fused LM head skips them only on Triton (CUDA)
    devices; on CPU it scores every position, then computes entropy and top-1 for the metrics on all of them.
    Here the model's own forward is asked for the logits of the learned positions alone
    (`logits_to_keep`, through the PEFT and DDP wrappers, so gradients still synchronise) and the loss,
    token accuracy and entropy are computed on those: the same per-token cross-entropy summed over the
    learned tokens and divided by their count (`num_items_in_batch` across accumulation steps and ranks, as
    TRL does). Measured on the demo's train split (4 padding-free batches of 4 rows, bf16 autocast, Intel
    Xeon with AVX-512 BF16/AMX, 2 cores, load ~2): 6.7 s -> 4.9 s a step-set (1.37x), loss 1.58872 vs
    1.58871 (`tests/test_finetune_speed.py` checks loss and LoRA gradients against TRL's path).

    Used on CPU only: on CUDA, TRL's fused head already compacts the positions and scores them in tiles,
    which keeps a (learned tokens x vocabulary) logits tensor of a long-answer, large-vocabulary run out of
    GPU memory; models TRL treats specially (MoE router loss, label smoothing, a custom loss) keep TRL's path.
    """
    import torch
    from trl import SFTTrainer

    class LearnedPositionsSFTTrainer(SFTTrainer):
        def _learned_positions_path(self, return_outputs: bool) -> bool:
            return (
                not return_outputs
                and self.model.training
                and not self.aux_loss_enabled
                and self.compute_loss_func is None
                and self.label_smoother is None
                and self.args.loss_type == "nll"
            )

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self._learned_positions_path(return_outputs):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            targets = labels[:, 1:]
            # positions whose NEXT token is learned, in any row of the batch (one row when padding-free)
            keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)
            outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
            logits = outputs.logits.float()
            targets = targets[:, keep]
            learned = targets != -100
            log_probs = torch.log_softmax(logits, dim=-1)
            picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            count = learned.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -(picked * learned).sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            self._record_metrics(inputs, log_probs.detach(), targets, learned)
            return loss

        def _record_metrics(self, inputs: dict, log_probs: Any, targets: Any, learned: Any) -> None:
            """TRL's training metrics (entropy, token accuracy, tokens seen) from the learned positions."""
            gather = self.accelerator.gather_for_metrics
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            correct = (log_probs.argmax(-1) == targets) & learned
            num_valid = gather(learned.sum()).sum()
            entropy_sum = gather((entropy * learned).sum()).sum()
            num_correct = gather(correct.sum()).sum()
            metrics = self._metrics["train"]
            metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
            metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
            if "attention_mask" in inputs:
                seen = gather(inputs["attention_mask"].sum()).sum().item()
            else:
                ids = inputs["position_ids"]
                seen = gather(torch.tensor(ids.size(1), device=ids.device)).sum().item()
            self._total_train_tokens += seen // self._tp_size
            metrics["num_tokens"] = [self._total_train_tokens]

    return LearnedPositionsSFTTrainer


def _checkpointing_arg(enabled: bool) -> dict[str, bool]:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns)."""
    from trl import SFTConfig

    names = {f.name for f in dataclasses.fields(SFTConfig)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: enabled}


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def train(cfg: RunConfig, layout: RunLayout, plan: FinetunePlan) -> dict[str, Any]:
    """Run the planned steps; save adapter + tokenizer, the training log, the loss plot and `finetune.json`.

    Under `accelerate launch` every process trains; rank 0 alone writes, the others return {}."""
    import peft
    import torch
    import transformers
    import trl

    cycle, trainer = plan.cycle, plan.trainer
    started, cpu_started = time.monotonic(), time.process_time()
    # a crash leaves cycle_NN/checkpoints/ in place: the next run of 02 continues from the newest one
    result = trainer.train(resume_from_checkpoint=plan.resume_from)
    wall, cpu = time.monotonic() - started, time.process_time() - cpu_started
    if not trainer.is_world_process_zero():
        return {}
    stacked = None
    if plan.stacked_on is None:
        save_adapter(trainer, plan.tokenizer, layout.adapter_dir(cycle))
    else:
        with tempfile.TemporaryDirectory(prefix=".new-adapter-", dir=layout.cycle_dir(cycle)) as fresh:
            save_adapter(trainer, plan.tokenizer, Path(fresh) / "adapter")
            stacked = stack_adapters(plan.stacked_on, Path(fresh) / "adapter", layout.adapter_dir(cycle))
    shutil.rmtree(plan.scratch_dir, ignore_errors=True)  # the finished adapter replaces the checkpoints
    log = training_log(trainer.state.log_history)
    write_jsonl(layout.train_log(cycle), log)
    plot_loss(log, layout.loss_plot(cycle), title=f"cycle {cycle}: training loss")
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    runtime = float(result.metrics.get("train_runtime", wall))
    losses = [row["loss"] for row in log]
    ft = cfg.finetune
    summary = {
        "cycle": cycle,
        "base_model": {
            "model_id": cfg.student.model_id,
            "path": plan.model_path,
            "revision": cfg.student.revision,
        },
        "init_from": plan.init_from,
        "resumed_from_step": _checkpoint_step(plan.resume_from),
        "start_from": plan.start_from,
        "chat_template": plan.chat_template_source,
        "report_to": plan.report_to,
        "tracking_dir": str(layout.tracking_dir(cycle)) if "tensorboard" in plan.report_to else None,
        "rows": len(plan.data.rows),
        "rows_by_origin": plan.data.by_origin,
        "earlier_cycles_without_synthetic_file": plan.data.missing_synthetic,
        "tokenized_rows": plan.tokenized_rows,
        "rows_dropped_prompt_too_long": len(plan.data.rows) - plan.tokenized_rows,
        "rows_cut_at_max_length": plan.truncated_rows,
        "loss_mask": plan.loss_mask,
        "lora": {
            "r": plan.lora_r,
            "alpha": plan.lora_alpha,
            "source": plan.lora_source,
            "dropout": ft.lora_dropout,
            "target_modules": ft.target_modules,
            # previous_merged: the saved adapter stacks cycle t-1's (rank r1) and this cycle's (rank r)
            "saved": stacked or {"r": plan.lora_r, "alpha": plan.lora_alpha, "ranks": [plan.lora_r]},
        },
        # The protocol made visible: this cycle's LoRA rank, and the rank of what the saved adapter adds to
        # the base (previous_merged: the sum over every cycle's LoRA; see `rank_chain`).
        "lora_rank": plan.lora_r,
        "effective_rank": effective_rank(plan.rank_chain),
        "rank_chain": plan.rank_chain,
        "quantization": plan.quantization,
        "quantization_setting": ft.quantization,
        "device": plan.device,
        "dtype": plan.dtype,
        "mixed_precision": plan.mixed_precision,
        "steps": int(trainer.state.global_step),
        "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "batch_size": ft.per_device_batch_size,
        "gradient_accumulation_steps": ft.gradient_accumulation_steps,
        "num_processes": trainer.args.world_size,  # DDP: each process trains on its share of a global batch
        "global_batch_size": ft.per_device_batch_size
        * ft.gradient_accumulation_steps
        * trainer.args.world_size,
        "learning_rate": ft.learning_rate,
        "lr_scheduler": ft.lr_scheduler,
        "max_length": ft.max_length,
        "seed": ft.seed,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "padding_free": ft.padding_free,
        "tokens": tokens,
        "wall_time_s": round(wall, 2),
        "train_runtime_s": round(runtime, 2),
        "cpu_time_s": round(cpu, 2),  # far below wall time x threads: other processes held the cores
        "tokens_per_s": round(tokens / runtime, 2) if runtime > 0 else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "torch_threads": torch.get_num_threads(),
        "adapter_dir": str(layout.adapter_dir(cycle)),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "peft": peft.__version__,
        },
    }
    write_json(layout.train_summary(cycle), summary)
    return summary


def finetune(cfg: RunConfig, layout: RunLayout, cycle: int) -> dict[str, Any]:
    """prepare + train in one call (the CLI / `accelerate launch` entry point)."""
    return train(cfg, layout, prepare(cfg, layout, cycle))


def _checkpoint_step(checkpoint: str | None) -> int | None:
    return None if checkpoint is None else int(Path(checkpoint).name.split("-")[1])


def save_adapter(trainer: Any, tokenizer: Any, target: Path) -> Path:
    """PEFT adapter + tokenizer into `target`, written to a temp folder first and renamed into place."""
    with atomic_dir(target) as tmp:
        trainer.model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


# --------------------------------------------------------------------------- log and plot


_LOG_FIELDS = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "num_input_tokens_seen", "epoch")


def training_log(log_history: list[dict]) -> list[dict]:
    """One row per logging step that reported a loss: {step, loss, learning_rate, ...}."""
    rows = []
    for entry in log_history:
        if "loss" not in entry:
            continue
        row = {"step": int(entry["step"])}
        row.update({key: float(entry[key]) for key in _LOG_FIELDS if entry.get(key) is not None})
        if "train_runtime" in entry:
            row["elapsed_s"] = round(float(entry["train_runtime"]), 2)
        rows.append(row)
    return rows


def plot_loss(log: list[dict], path: str | Path, title: str = "training loss") -> Path:
    """Loss (and learning rate) per logged step, saved as PNG (the notebook shows the file)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    steps = [row["step"] for row in log]
    ax.plot(steps, [row["loss"] for row in log], marker="o", color="tab:blue")
    ax.set(xlabel="optimizer step", ylabel="loss (answer tokens only)", title=title)
    ax.grid(alpha=0.3)
    if any("learning_rate" in row for row in log):
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [row.get("learning_rate") for row in log], color="tab:gray", ls="--")
        lr_ax.set_ylabel("learning rate (dashed)", color="tab:gray")
    fig.tight_layout()
    save_figure(fig, path)
    return Path(path)


def summary_table(summary: dict[str, Any]) -> pd.DataFrame:
    keys = [
        "rows", "tokenized_rows", "steps", "epochs", "tokens", "wall_time_s", "cpu_time_s", "tokens_per_s",
        "first_loss", "final_loss", "quantization", "device", "dtype", "mixed_precision",
        "torch_threads",
    ]  # fmt: skip
    rows = [(key, summary.get(key)) for key in keys]
    rows.insert(3, ("lora r / alpha", f"{summary['lora']['r']} / {summary['lora']['alpha']}"))
    if summary.get("rank_chain"):
        rows.insert(4, ("saved adapter rank (effective)", rank_text(summary["rank_chain"])))
    if summary.get("num_processes", 1) > 1:
        rows.append(
            ("processes (global batch)", f"{summary['num_processes']} ({summary['global_batch_size']})")
        )
    return pd.DataFrame(rows, columns=["metric", "value"]).astype({"value": str})


def read_summary(layout: RunLayout, cycle: int) -> dict[str, Any]:
    return read_json(layout.train_summary(cycle))


# --------------------------------------------------------------------------- CLI (accelerate launch)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m llamaduo_nb.finetune",
        description="Fine-tune one LlamaDuo cycle (use under `accelerate launch` for several GPUs).",
    )
    parser.add_argument("run_dir", help="outputs/<run>, holding params.yaml and coverage/")
    parser.add_argument("--cycle", type=int, required=True)
    args = parser.parse_args(argv)
    layout = RunLayout(Path(args.run_dir))
    if not layout.params_file.is_file():
        raise SystemExit(
            f"{layout.params_file} not found: start the run with `llamaduo run params/<run>.yaml`"
        )
    summary = finetune(load_config(layout.params_file), layout, args.cycle)
    _leave_process_group()  # after a failure the launcher stops the other processes
    if summary:  # rank 0
        print(
            f"adapter: {summary['adapter_dir']}  steps: {summary['steps']}  tokens/s: {summary['tokens_per_s']}"
        )
    return 0


def _leave_process_group() -> None:
    """Under `accelerate launch`: wait until rank 0 has written the cycle's files, then leave the group
    (torch warns about a process group left open at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
