"""02's speed settings change how a batch is laid out, never what the model learns from it.

Padding-free batches (`finetune.padding_free`, the default) concatenate a batch's rows into one sequence;
the per-token loss of every answer token must be the padded batch's, on the real SmolLM2 student with the
real TRL collator that `finetune.prepare` builds.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from tinyrun import make_tiny_run

from llamaduo_nb import finetune
from llamaduo_nb.config import load_config


def per_token_losses(plan: finetune.FinetunePlan, n_rows: int) -> list[float]:
    """Cross-entropy of every learned token of the first `n_rows` rows, in row order, in float32."""
    import torch

    trainer = plan.trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n_rows)])
    model = trainer.model.eval()
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    labels = batch["labels"]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="none"
    )
    keep = labels[:, 1:].reshape(-1) != -100
    return losses[keep].tolist()


@pytest.mark.slow
def test_padding_free_batches_give_the_padded_per_token_loss(tmp_path):
    layout = make_tiny_run(tmp_path / "tiny", finetune_overrides={"per_device_batch_size": 4})
    cfg = load_config(layout.params_file)
    plans = {}
    for padding_free in (False, True):
        run_cfg = dataclasses.replace(
            cfg, finetune=dataclasses.replace(cfg.finetune, padding_free=padding_free)
        )
        plans[padding_free] = finetune.prepare(run_cfg, layout, 0)
    padded_batch = plans[False].trainer.data_collator(
        [plans[False].trainer.train_dataset[i] for i in range(4)]
    )
    flat_batch = plans[True].trainer.data_collator([plans[True].trainer.train_dataset[i] for i in range(4)])
    # the layouts really differ: padded rows vs one concatenated row without a single pad token
    assert padded_batch["input_ids"].shape[0] == 4 and flat_batch["input_ids"].shape[0] == 1
    assert flat_batch["input_ids"].shape[1] == int(padded_batch["attention_mask"].sum())
    padded, flat = per_token_losses(plans[False], 4), per_token_losses(plans[True], 4)
    assert len(padded) == len(flat) > 10
    assert flat == pytest.approx(padded, abs=2e-4)
    for plan in plans.values():
        shutil.rmtree(plan.scratch_dir, ignore_errors=True)
