"""02's hot path: LoRA fine-tuning tokens/s and final loss, ours against TRL's SFTTrainer, measured against
the machine's own matmul peak.

Same data (the demo's cycle-0 train split), same steps, batch size, learning rate, max length and LoRA
shape (rank, alpha, dropout, target modules) on every side, in one process:

* **ours**: `finetune.prepare` + `finetune.train`, exactly what 02 runs: precision chosen per CPU (bf16
  autocast where the CPU has native BF16 — AVX-512 BF16 / AMX, `student.cpu_has_native_bf16` — float32
  where bf16 would be emulated), no gradient checkpointing on CPU, padding-free batches, completion-only loss
  with the LM head run on the learned positions only (`finetune.learned_positions_trainer`);
* **TRL defaults**: `SFTTrainer(model, args=SFTConfig(<the shared settings>), peft_config=<same LoRA>)`,
  every other setting left at TRL's default (padded batches, TRL's precision and checkpointing defaults);
* **TRL configured as ours**: TRL defaults plus our precision, no checkpointing and padding-free batches:
  what is left of the gap is our code (TRL 1.16 scores every position in its LM head on CPU), not our settings;
* **ours, the other precision**: ours with the precision this CPU did NOT get (float32 where bf16 is native,
  bf16 autocast where it is not): the gain of choosing per CPU;
* **ours, padded**: ours with `finetune.padding_free: false`, to show what padding-free batching adds.

tokens/s counts non-padding input tokens (`include_num_input_tokens_seen="non_padding"` on every side)
over the trainer's own runtime; the final loss is the mean training loss of the last logging window.
Achieved FLOP/s = 4 x the base model's parameters x tokens/s (LoRA: the forward pass and the backward pass
to the activations each cost ~2 FLOP per weight and token; the adapters' and attention's own FLOPs are left
out), shown as a share of this machine's torch.matmul peak in the dtype the run computed in (bf16 under
bf16 autocast, else fp32), both peaks measured in the same run (`common.matmul_peak`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benches.common import BenchLine, cpu_label, demo_run, matmul_peak, timed

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


def run_ours(cfg: Any, layout: Any, native_bf16: bool | None = None) -> dict[str, Any]:
    """02's training; `native_bf16` overrides the CPU's answer to "has native BF16?" (the other precision)."""
    from unittest import mock

    from llamaduo_nb import finetune

    patch = (
        mock.patch.object(finetune.decisions, "cpu_has_native_bf16", lambda: native_bf16)
        if native_bf16 is not None
        else contextlib.nullcontext()
    )
    with patch:
        plan = finetune.prepare(cfg, layout, 0)
    summary = finetune.train(cfg, layout, plan)
    return {
        "parameters": _base_parameters(plan.trainer.model),
        "tokens": summary["tokens"],
        "seconds": summary["train_runtime_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "final_loss": summary["final_loss"],
        "losses": [row["loss"] for row in finetune.training_log(plan.trainer.state.log_history)],
        "lora": summary["lora"],
        "mixed_precision": summary["mixed_precision"],
        "padding_free": summary["padding_free"],
        "gradient_checkpointing": summary.get("gradient_checkpointing"),
    }


def _base_parameters(model: Any) -> int:
    """The base model's weights (tied embeddings once: they are the LM head's matmul), LoRA's left out."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if "lora_" in name or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


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
        settings: dict[str, Any] = dict(
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
        )
        settings.update(overrides or {})
        args = SFTConfig(**settings)
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
            "parameters": _base_parameters(trainer.model),
            "tokens": tokens,
            "seconds": round(runtime, 2),
            "tokens_per_s": round(tokens / runtime, 2),
            "final_loss": losses[-1] if losses else None,
            "losses": losses,
            "settings": {
                k: getattr(args, k)
                for k in (
                    "bf16",
                    "fp16",
                    "padding_free",
                    "packing",
                    "gradient_checkpointing",
                    "activation_checkpointing",
                    "optim",
                )
                if hasattr(args, k)
            },
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def flops_share(run: dict[str, Any], bf16: bool, peaks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Achieved FLOP/s of a training run (4 x base parameters x tokens/s) and its share of the matmul peak
    of the dtype it computed in."""
    achieved = 4 * run["parameters"] * run["tokens_per_s"]
    peak = peaks["bfloat16" if bf16 else "float32"]
    return {
        "achieved_flops_per_s": achieved,
        "peak_dtype": peak["dtype"],
        "share_of_peak": achieved / peak["flops_per_s"],
    }


def _describe(run: dict[str, Any]) -> str:
    share = run["flops"]
    return (
        f"{run['tokens_per_s']:.1f} tok/s, final loss {run['final_loss']:.3f}, "
        f"{share['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * share['share_of_peak']:.1f} % of the "
        f"{'bf16' if share['peak_dtype'] == 'bfloat16' else 'fp32'} peak"
    )


def _equal_loss(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return abs(a["final_loss"] - b["final_loss"]) <= 0.05 * max(abs(b["final_loss"]), 1e-9)


def lines(args: argparse.Namespace) -> list[BenchLine]:
    from llamaduo_nb.finetune import checkpointing_arg
    from llamaduo_nb.student import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    print("torch.matmul peak, fp32 and bf16 ...", flush=True)
    peaks = {dtype: matmul_peak(dtype) for dtype in ("float32", "bfloat16")}
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        cfg, layout = demo_run(Path(tmp) / "bench", adapter=False)
        steps = args.ft_steps or (2 if args.quick else BENCH_STEPS)
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, max_steps=steps))
        print(f"fine-tuning, ours ({steps} steps) ...", flush=True)
        ours = run_ours(cfg, layout)
        print("fine-tuning, TRL SFTTrainer defaults ...", flush=True)
        trl = run_trl_defaults(cfg, layout, ours["lora"])
        print("fine-tuning, TRL SFTTrainer configured as ours ...", flush=True)
        as_ours = {
            "bf16": ours["mixed_precision"] == "bf16",
            **checkpointing_arg(False),
            "padding_free": True,
            "max_length": None,  # TRL refuses max_length with padding_free (ours truncates rows itself)
        }
        trl_ours = run_trl_defaults(cfg, layout, ours["lora"], as_ours)
        print("fine-tuning, ours with the precision this CPU did not get ...", flush=True)
        other = run_ours(cfg, layout, native_bf16=not native)
        print("fine-tuning, ours with padded batches ...", flush=True)
        padded_cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, padding_free=False))
        padded = run_ours(padded_cfg, layout)
    for run in (ours, other, padded):
        run["flops"] = flops_share(run, run["mixed_precision"] == "bf16", peaks)
    for run in (trl, trl_ours):
        run["flops"] = flops_share(run, bool(run["settings"].get("bf16")), peaks)
    setting = f"demo train split, {steps} steps x batch {cfg.finetune.per_device_batch_size}"
    chosen = f"{ours['mixed_precision']} autocast" if ours["mixed_precision"] != "no" else "float32"
    other_name = f"{other['mixed_precision']} autocast" if other["mixed_precision"] != "no" else "float32"
    why = "native BF16" if native else "no native BF16: bf16 would be emulated"

    def trl_text(run: dict[str, Any]) -> str:
        return _describe(run) + " (" + ", ".join(f"{k}={v}" for k, v in run["settings"].items()) + ")"

    fp32, bf16 = (peaks[d] for d in ("float32", "bfloat16"))
    ratio = ours["tokens_per_s"] / trl["tokens_per_s"]
    return [
        BenchLine(
            "machine: torch.matmul peak (square products, all cores), the ceiling of the fine-tuning rows",
            f"bf16 {bf16['flops_per_s'] / 1e9:.0f} GFLOP/s (n={bf16['size']})",
            f"fp32 {fp32['flops_per_s'] / 1e9:.0f} GFLOP/s (n={fp32['size']})",
            bf16["flops_per_s"] / fp32["flops_per_s"],
            "",
            details={"peaks": peaks, "cpu": cpu_label(), "native_bf16": native},
        ),
        BenchLine(
            f"02 fine-tuning ({setting}, LoRA r={ours['lora']['r']}): ours vs TRL SFTTrainer defaults",
            f"{_describe(ours)} ({chosen}: {why}; no checkpointing, padding-free)",
            trl_text(trl),
            ratio,
            ">= 1.5x at equal loss (within 5 %)",
            ratio >= 1.5 and _equal_loss(ours, trl),
            details={"ours": ours, "trl_defaults": trl},
        ),
        BenchLine(
            f"02 fine-tuning ({setting}): ours vs TRL configured as ours (same precision, no checkpointing, "
            "padding-free)",
            _describe(ours),
            trl_text(trl_ours),
            ours["tokens_per_s"] / trl_ours["tokens_per_s"],
            "",
            details={"trl_as_ours": trl_ours},
        ),
        BenchLine(
            f"02 fine-tuning ({setting}): precision chosen for this CPU ({chosen}) vs the other ({other_name})",
            _describe(ours),
            _describe(other),
            ours["tokens_per_s"] / other["tokens_per_s"],
            "> 1x (the choice is the faster one)",
            ours["tokens_per_s"] > other["tokens_per_s"],
            details={"other_precision": other},
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
