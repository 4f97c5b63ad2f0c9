"""02's speed settings change how a batch is laid out, never what the model learns from it.

Padding-free batches (`finetune.padding_free`, the default) concatenate a batch's rows into one sequence;
the per-token loss of every answer token must be the padded batch's, on the real SmolLM2 student with the
real TRL collator that `finetune.prepare` builds. On CPU the LM head runs on the learned positions only;
loss and LoRA gradients must be those of TRL's own path.
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


@pytest.mark.slow
@pytest.mark.parametrize("padding_free", [True, False], ids=["padding-free", "padded"])
def test_the_lm_head_runs_on_learned_positions_only_with_trls_loss_and_gradients(tmp_path, padding_free):
    """On CPU 02 projects only the positions whose next token is learned (`learned_positions_trainer`);
    the loss and every LoRA gradient must be those of TRL's own path, which scores every position."""
    import torch
    from trl import SFTTrainer

    layout = make_tiny_run(
        tmp_path / "tiny",
        finetune_overrides={"per_device_batch_size": 4, "lora_dropout": 0.0, "padding_free": padding_free},
    )
    plan = finetune.prepare(load_config(layout.params_file), layout, 0)
    trainer = plan.trainer
    assert isinstance(trainer, finetune.learned_positions_trainer())
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    model = trainer.model.train()
    head_rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_rows.append(args[0].shape[:-1].numel())
    )

    def loss_and_grads(compute_loss) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with trainer.compute_loss_context_manager():
            loss = compute_loss(model, dict(batch))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    ours_loss, ours_grads = loss_and_grads(trainer.compute_loss)
    ours_rows = head_rows.pop()
    trl_loss, trl_grads = loss_and_grads(lambda m, b: SFTTrainer.compute_loss(trainer, m, b))
    hook.remove()
    learned_next = (batch["labels"][:, 1:] != -100).any(dim=0)
    # the head saw the learned positions (of every row, when padded), far fewer than the batch's tokens
    assert ours_rows == int(learned_next.sum()) * batch["labels"].shape[0]
    assert ours_rows < 0.8 * batch["labels"].numel()
    assert ours_loss == pytest.approx(trl_loss, rel=1e-4)
    assert ours_grads.keys() == trl_grads.keys() and len(ours_grads) > 10
    # (lora_A gradients are 0 at the first step, B = 0: the lora_B ones carry the comparison)
    assert sum(bool(g.any()) for g in ours_grads.values()) >= len(ours_grads) // 2
    for name, grad in ours_grads.items():
        other = trl_grads[name]
        assert torch.linalg.vector_norm(grad - other) <= 1e-3 * torch.linalg.vector_norm(other) + 1e-8, name
    shutil.rmtree(plan.scratch_dir, ignore_errors=True)
