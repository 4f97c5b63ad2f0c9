"""The training machinery of 02: experiment trackers, crash-safe checkpoints and the TRL trainer whose LM head
runs on the learned positions only (CPU)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig
from ..jsonio import (
    read_json,
    sha256_file,
    write_json,
)
from ..runlayout import RunLayout

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


def checkpointing_arg(enabled: bool) -> dict[str, bool]:
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name warns)."""
    from trl import SFTConfig

    names = {f.name for f in dataclasses.fields(SFTConfig)}
    name = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {name: enabled}
