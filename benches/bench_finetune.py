"""02's hot path: LoRA fine-tuning tokens/s and final loss, ours against TRL's SFTTrainer defaults.

Same data (the demo's cycle-0 train split), same steps, batch size, learning rate, max length and LoRA
shape (rank, alpha, dropout, target modules) on both sides, in one process:

* **ours**: `finetune.prepare` + `finetune.train`, exactly what 02 runs (padding-free batches, bf16
  autocast on CPUs with native bf16, no gradient checkpointing on CPU, completion-only loss);
* **TRL defaults**: `SFTTrainer(model, args=SFTConfig(<the shared settings>), peft_config=<same LoRA>)`,
  every other setting left at TRL's default (padded batches, TRL's precision and checkpointing defaults);
* **ours, padded**: ours with `finetune.padding_free: false`, to show what padding-free batching adds.

tokens/s counts non-padding input tokens (`include_num_input_tokens_seen="non_padding"` on every side)
over the trainer's own runtime; the final loss is the mean training loss of the last logging window.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benches.common import BenchLine, demo_run, timed

# Not the demo's 12 steps: on this CPU (AVX2, no native bf16) TRL 1.16's defaults ran ~15x slower than
# ours (2 steps, load ~4.5: 2.1 vs 31.1 tok/s, ~150 s a step), so 12 steps would take the TRL side alone
# ~10-30 min. What costs the time (2 steps each, load 3-6): TRL defaults with bf16=False 2.4 tok/s (loss
# 1.755, ours 1.756), with gradient_checkpointing=False 1.8 tok/s, with both off ~30 tok/s (11 s a step,
# like ours): bf16 autocast (emulated) and activation checkpointing are each enough to make TRL's step
# ~13x slower here, through TRL's fused (chunked) LM-head loss, which runs on every path. The fused
# AdamW and linear schedule do not matter. 4 steps keep this bench near 5-7 min on a quiet 2-core
# machine and still give two logged losses per side.
BENCH_STEPS = 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("finetune")
    group.add_argument("--ft-steps", type=int, help=f"training steps (default {BENCH_STEPS}; 2 with --quick)")


def run_ours(cfg: Any, layout: Any) -> dict[str, Any]:
    from llamaduo_nb import finetune

    plan = finetune.prepare(cfg, layout, 0)
    summary = finetune.train(cfg, layout, plan)
    return {
        "tokens": summary["tokens"],
        "seconds": summary["train_runtime_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "final_loss": summary["final_loss"],
        "losses": [row["loss"] for row in finetune.training_log(plan.trainer.state.log_history)],
        "lora": summary["lora"],
        "mixed_precision": summary["mixed_precision"],
        "padding_free": summary["padding_free"],
    }


def run_trl_defaults(
    cfg: Any, layout: Any, lora: dict[str, Any], overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """TRL's SFTTrainer with its defaults; only the settings that define the experiment are shared
    (``overrides``: settings changed on top, to find out which default costs the time)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from llamaduo_nb.finetune import build_train_data, to_prompt_completion, training_log
    from llamaduo_nb.student import load_student, quiet_peft_deprecations

    ft = cfg.finetune
    set_seed(ft.seed)
    model, tokenizer, _ = load_student(cfg.student, "none", "float32")
    out = Path(tempfile.mkdtemp(prefix="bench-trl-"))
    try:
        args = SFTConfig(
            output_dir=str(out),
            max_steps=ft.max_steps,
            per_device_train_batch_size=ft.per_device_batch_size,
            learning_rate=ft.learning_rate,
            max_length=ft.max_length,
            logging_steps=ft.logging_steps,
            save_strategy="no",
            report_to="none",
            seed=ft.seed,
            use_cpu=True,
            include_num_input_tokens_seen="non_padding",
            **(overrides or {}),
        )
        peft_config = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            task_type="CAUSAL_LM",
        )
        data = build_train_data(layout, 0)
        with quiet_peft_deprecations():
            trainer = SFTTrainer(
                model=model,
                args=args,
                train_dataset=Dataset.from_list(to_prompt_completion(data.rows)),
                processing_class=tokenizer,
                peft_config=peft_config,
            )
        result, wall, _ = timed(trainer.train)
        runtime = float(result.metrics.get("train_runtime", wall))
        tokens = int(trainer.state.num_input_tokens_seen or 0)
        losses = [row["loss"] for row in training_log(trainer.state.log_history)]
        return {
            "tokens": tokens,
            "seconds": round(runtime, 2),
            "tokens_per_s": round(tokens / runtime, 2),
            "final_loss": losses[-1] if losses else None,
            "losses": losses,
            "settings": {
                k: getattr(args, k)
                for k in ("bf16", "fp16", "padding_free", "packing", "gradient_checkpointing", "optim")
                if hasattr(args, k)
            },
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def lines(args: argparse.Namespace) -> list[BenchLine]:
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        cfg, layout = demo_run(Path(tmp) / "bench", adapter=False)
        steps = args.ft_steps or (2 if args.quick else BENCH_STEPS)
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, max_steps=steps))
        print(f"fine-tuning, ours ({steps} steps) ...", flush=True)
        ours = run_ours(cfg, layout)
        print("fine-tuning, TRL SFTTrainer defaults ...", flush=True)
        trl = run_trl_defaults(cfg, layout, ours["lora"])
        print("fine-tuning, ours with padded batches ...", flush=True)
        padded_cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, padding_free=False))
        padded = run_ours(padded_cfg, layout)
    ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
    loss_gap = abs(ours["final_loss"] - trl["final_loss"])
    equal = loss_gap <= 0.05 * max(abs(trl["final_loss"]), 1e-9)
    setting = f"demo train split, {steps} steps x batch {cfg.finetune.per_device_batch_size}"
    trl_settings = ", ".join(f"{k}={v}" for k, v in trl["settings"].items())
    return [
        BenchLine(
            f"02 fine-tuning ({setting}, LoRA r={ours['lora']['r']}): ours vs TRL SFTTrainer defaults",
            f"{ours['tokens_per_s']:.1f} tok/s, final loss {ours['final_loss']:.3f} "
            f"({ours['mixed_precision']} autocast, padding-free)",
            f"{trl['tokens_per_s']:.1f} tok/s, final loss {trl['final_loss']:.3f} ({trl_settings})",
            ratio,
            ">= 1.5x at equal loss (within 5 %)",
            ratio >= 1.5 and equal,
            details={"ours": ours, "trl_defaults": trl},
        ),
        BenchLine(
            f"02 fine-tuning ({setting}): padding-free vs padded batches (both ours otherwise)",
            f"{ours['tokens_per_s']:.1f} tok/s, final loss {ours['final_loss']:.3f}",
            f"{padded['tokens_per_s']:.1f} tok/s, final loss {padded['final_loss']:.3f}",
            ours["tokens_per_s"] / padded["tokens_per_s"],
            "> 1x, same losses",
            ours["tokens_per_s"] > padded["tokens_per_s"],
            details={"padded": padded},
        ),
    ]
