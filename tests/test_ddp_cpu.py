"""02 on two CPU processes: the runner's `accelerate launch` path executed for real (DDP over gloo).

One tiny cycle (6 rows, 3 optimizer steps = one epoch, max_length 128) is trained twice on the embedded
SmolLM2 student: in this process at batch 2, and by `llamaduo run` with `finetune.num_processes: 2` as two
processes at batch 1 each (`runner.run` with stand-in notebooks for every stage but 02, which the runner
hands to `launch_distributed_finetune`). Same seed, same global batch, gradient accumulation 1 in both,
LoRA dropout 0.

Why the two runs see the same rows at every step: the Trainer's RandomSampler becomes accelerate's
seedable sampler (one permutation from `data_seed`, identical in every process), and each process takes
every second batch of it (accelerate's batch-sampler shard): with one row per process, step t trains on
rows P[2t] and P[2t+1], exactly the single process's batch t. And why the same loss: with
`average_tokens_across_devices` (the Trainer's default) each process divides its summed token losses by the
token count of the *global* batch and DDP averages the gradients, so loss and gradient are those of the
single process's batch, which divides by the same count.

The weights stay float32 (`student.torch_dtype: float32`): on a CPU with native bf16, 02's default bf16
autocast rounds differently when a batch is split, which moves the losses by ~1% and would hide a real
mismatch. In float32 what remains is summation order (two halves all-reduced by gloo vs one backward over
both rows) and the thread count of each process: ~1e-6 relative per step, so a 1e-3 relative tolerance
leaves three orders of magnitude of headroom while a different row order (the per-row losses here range
from ~1 to ~4) or per-process loss averaging (the rows differ in length) would miss it by far.
"""

from __future__ import annotations

import math

import pytest
from test_runner import stand_in_notebook
from tinyrun import TEST, make_tiny_run

from llamaduo_nb import finetune, runner, student
from llamaduo_nb.config import load_config
from llamaduo_nb.jsonio import read_json, read_jsonl
from llamaduo_nb.runlayout import STAGES

pytestmark = pytest.mark.slow

REL_TOL = 1e-3  # see the module docstring

COMMON = {"max_steps": 3, "lora_dropout": 0.0, "save_steps": 0, "logging_steps": 1, "max_length": 128}
FLOAT32 = {"torch_dtype": "float32"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the launch would train one process per GPU")
    root = tmp_path_factory.mktemp("ddp")
    one = make_tiny_run(root / "one", {**COMMON, "per_device_batch_size": 2}, student_overrides=FLOAT32)
    two = make_tiny_run(
        root / "two", {**COMMON, "per_device_batch_size": 1, "num_processes": 2}, student_overrides=FLOAT32
    )
    finetune.finetune(load_config(one.params_file), one, 0)

    import nbformat

    notebooks = root / "stand-ins"
    notebooks.mkdir()
    for stage in STAGES:
        nb = stand_in_notebook(stage, stage not in ("01_coverage", "06_deploy"))
        nbformat.write(nb, notebooks / f"{stage}.ipynb")
    lines: list[str] = []
    state = runner.run(
        two.params_file, overrides={"loop.max_cycles": 1}, notebooks_dir=notebooks, log=lines.append
    )
    assert state.status == "finished" and "cycle_00/02_finetune" in state.done
    # 02 ran through accelerate, not as the (stand-in) notebook; the others ran as notebooks
    assert (two.root / "executed.log").read_text().split() == [
        "01_coverage",
        "03_batch_inference@0",
        "04_evaluate@0",
        "06_deploy",
    ]
    return one, two, lines


def test_two_cpu_processes_train_the_steps_of_one_process_at_the_same_global_batch(runs):
    one, two, lines = runs
    assert any("02 on 2 CPU processes (DDP over gloo)" in line for line in lines)
    alone, split = read_json(one.train_summary(0)), read_json(two.train_summary(0))
    assert (alone["num_processes"], alone["batch_size"], alone["global_batch_size"]) == (1, 2, 2)
    assert (split["num_processes"], split["batch_size"], split["global_batch_size"]) == (2, 1, 2)
    assert split["device"] == "cpu x2 (gloo)"
    assert split["torch_threads"] == finetune.cpu_threads_per_process(2)  # the cores split between them

    log_alone, log_split = read_jsonl(one.train_log(0)), read_jsonl(two.train_log(0))
    assert [row["step"] for row in log_split] == [row["step"] for row in log_alone] == [1, 2, 3]
    # every step counted the same tokens (gathered over both processes): the same rows, split in two
    assert [row["num_input_tokens_seen"] for row in log_split] == [
        row["num_input_tokens_seen"] for row in log_alone
    ]
    losses = [row["loss"] for row in log_alone]
    assert max(losses) - min(losses) > 0.1  # the steps' batches differ, so a wrong order would show
    for a, b in zip(log_alone, log_split, strict=True):
        assert math.isclose(b["loss"], a["loss"], rel_tol=REL_TOL), (a["step"], a["loss"], b["loss"])
        assert math.isclose(b["grad_norm"], a["grad_norm"], rel_tol=REL_TOL), (a["step"], a, b)


def test_rank_0_alone_saves_the_adapter_and_it_loads_on_the_base_and_answers(runs):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    one, two, _ = runs
    launch_log = (two.logs_dir / "accelerate_cycle_00.log").read_text()
    assert launch_log.count("adapter: ") == 1  # only rank 0 reports a saved adapter
    cycle_dir = two.cycle_dir(0)
    assert not two.checkpoints_dir(0).exists()
    assert not [p.name for p in cycle_dir.iterdir() if p.name.startswith(".")]  # no half-written folder
    adapter = two.adapter_dir(0)

    split = load_file(adapter / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in split.items() if "lora_B" in k)  # the steps were taken

    summary = read_json(two.train_summary(0))
    base = AutoModelForCausalLM.from_pretrained(summary["base_model"]["path"], dtype=torch.float32)
    with student.quiet_peft_deprecations():
        model = PeftModel.from_pretrained(base, adapter, adapter_name="split").eval()
        model.load_adapter(one.adapter_dir(0), adapter_name="alone")
    tokenizer = AutoTokenizer.from_pretrained(adapter)

    # The model the two processes trained is the single process's: next-token log-probabilities agree to
    # float32 summation noise (measured ~5e-5 nats; the weights themselves differ more, up to ~0.2% of a
    # tensor's norm, where Adam's first steps divide near-zero gradient entries by their own size), while
    # training moved them from the base by far more.
    for instruction, _, _ in TEST:
        ids = torch.tensor([student.prompt_token_ids(tokenizer, instruction)])
        logprobs = {}
        for name in ("split", "alone"):
            model.set_adapter(name)
            with torch.no_grad():
                logprobs[name] = torch.log_softmax(model(ids).logits[0, -1], dim=-1)
        with torch.no_grad(), model.disable_adapter():
            logprobs["base"] = torch.log_softmax(model(ids).logits[0, -1], dim=-1)
        assert (logprobs["split"] - logprobs["alone"]).abs().max() < 1e-3, instruction
        assert (logprobs["split"] - logprobs["base"]).abs().max() > 1e-2, instruction

    model.set_adapter("split")  # and it answers
    ids = torch.tensor([student.prompt_token_ids(tokenizer, TEST[0][0])])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert answer.strip(), "the adapter trained by two processes produced no answer"
