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

from .data import (
    COVERAGE_ORIGIN,
    LOSS_MASK_METHOD,
    TrainData,
    build_train_data,
    check_loss_mask,
    synthetic_origin,
    to_prompt_completion,
    truncate_rows,
)
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
from .stage import (
    FinetunePlan,
    finetune,
    loss_mask_table,
    main,
    plot_loss,
    prepare,
    read_summary,
    save_adapter,
    summary_table,
    train,
    training_log,
)
from .trainer import (
    TRACKER_PACKAGES,
    checkpoint_fingerprint,
    checkpoint_folder,
    checkpointing_arg,
    last_checkpoint,
    learned_positions_trainer,
    tracking_backends,
    tracking_callbacks,
)

__all__ = [
    "COVERAGE_ORIGIN",
    "LOSS_MASK_METHOD",
    "TRACKER_PACKAGES",
    "FinetunePlan",
    "TrainData",
    "build_train_data",
    "check_loss_mask",
    "checkpoint_fingerprint",
    "checkpoint_folder",
    "checkpointing_arg",
    "cpu_threads_per_process",
    "effective_rank",
    "finetune",
    "last_checkpoint",
    "learned_positions_trainer",
    "lora_shape",
    "loss_mask_table",
    "main",
    "planned_steps",
    "plot_loss",
    "prepare",
    "previous_adapter",
    "previous_rank_chain",
    "rank_chain",
    "rank_text",
    "read_summary",
    "save_adapter",
    "summary_table",
    "synthetic_origin",
    "tracking_backends",
    "to_prompt_completion",
    "tracking_callbacks",
    "train",
    "training_log",
    "training_precision",
    "truncate_rows",
]
