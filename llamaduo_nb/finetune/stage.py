"""02 as the notebook and `python -m llamaduo_nb.finetune` run it: prepare (data, student, LoRA, trainer), train,
save, log, plot and summarise one cycle."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import ConfigError, RunConfig, load_config
from ..jsonio import (
    atomic_dir,
    read_json,
    save_figure,
    write_json,
    write_jsonl,
)
from ..runlayout import RunLayout
from ..student import (
    chat_template_source,
    cuda_available,
    load_student,
    quiet_peft_deprecations,
    resolve_quantization,
    stack_adapters,
)

# --------------------------------------------------------------------------- the training run
from .data import TrainData, build_train_data, check_loss_mask, to_prompt_completion, truncate_rows
from .decisions import (
    cpu_threads_per_process,
    effective_rank,
    lora_shape,
    planned_steps,
    previous_adapter,
    previous_rank_chain,
    rank_chain,
    rank_text,
    training_precision,
)
from .trainer import (
    checkpoint_folder,
    checkpointing_arg,
    learned_positions_trainer,
    tracking_backends,
    tracking_callbacks,
)


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
            **checkpointing_arg(gradient_checkpointing),
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
