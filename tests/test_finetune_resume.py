"""Crash-safe fine-tuning: 02 checkpoints into cycle_NN/checkpoints/ and a re-run after a kill continues
from the newest complete checkpoint (real SmolLM2 student, 4 optimizer steps)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tinyrun import make_tiny_run

from llamaduo_nb import finetune
from llamaduo_nb.config import load_config
from llamaduo_nb.jsonio import read_json, read_jsonl, write_json
from llamaduo_nb.runner import PROJECT_ROOT, execute_notebook

# 02's own functions in a subprocess; a callback parks the trainer right after checkpoint `argv[2]` is on
# disk, so the test can SIGKILL it there (the kill point is chosen; everything else is the real 02 path).
TRAIN_UNTIL_KILLED = """
import sys, time
from pathlib import Path
from transformers import TrainerCallback
from llamaduo_nb import finetune
from llamaduo_nb.config import load_config
from llamaduo_nb.runlayout import RunLayout

layout = RunLayout(Path(sys.argv[1]))
cfg = load_config(layout.params_file)
plan = finetune.prepare(cfg, layout, 0)

class ParkAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[2]):
            (layout.root / "SAVED").write_text(str(state.global_step))
            time.sleep(600)

plan.trainer.add_callback(ParkAfterSave())
finetune.train(cfg, layout, plan)
"""

TINY = {"max_steps": 4, "save_steps": 1, "save_total_limit": 2, "logging_steps": 1}


@pytest.mark.slow
def test_sigkill_inside_02_resumes_from_the_last_checkpoint(tmp_path):
    layout = make_tiny_run(tmp_path / "tiny", finetune_overrides=TINY)
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN_UNTIL_KILLED, str(layout.root), "2"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600  # a guard against a hang, not a measurement
        while not (layout.root / "SAVED").is_file():
            assert proc.poll() is None, f"02 ended before the kill point: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "02 never reached checkpoint 2"
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    checkpoints = layout.checkpoints_dir(0)
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not layout.adapter_dir(0).exists()  # no half-finished adapter
    # a kill in the middle of writing checkpoint 3 would leave it without trainer_state.json
    (checkpoints / "checkpoint-3").mkdir()
    (checkpoints / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"\0" * 64)

    execute_notebook(
        PROJECT_ROOT / "notebooks" / "02_finetune.ipynb",
        layout.notebook_out("02_finetune", 0),
        {"run_dir": str(layout.root), "cycle": 0},
    )
    summary = read_json(layout.train_summary(0))
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert [row["step"] for row in read_jsonl(layout.train_log(0))] == [1, 2, 3, 4]
    assert not checkpoints.exists()  # the finished adapter replaces the checkpoints

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(summary["base_model"]["path"])
    model = PeftModel.from_pretrained(base, layout.adapter_dir(0))
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_checkpoints_of_other_data_or_settings_are_not_resumed(tmp_path):
    layout = make_tiny_run(tmp_path / "tiny", finetune_overrides=TINY)
    cfg = load_config(layout.params_file)
    data = finetune.build_train_data(layout, 0).path
    folder = layout.checkpoints_dir(0)
    for step in (1, 2):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        write_json(folder / f"checkpoint-{step}" / "trainer_state.json", {"global_step": step})
    (folder / "checkpoint-3").mkdir()
    (folder / "checkpoint-3" / "trainer_state.json").write_text('{"global_st')  # cut short by a kill
    write_json(folder / "fingerprint.json", {"fingerprint": finetune.checkpoint_fingerprint(cfg, data)})

    assert finetune.checkpoint_folder(cfg, layout, 0, data) == (folder, str(folder / "checkpoint-2"))
    # the same checkpoints after the data changed: discarded, training starts over
    data.write_text(data.read_text() + json.dumps({"id": "new", "instruction": "a", "response": "b"}) + "\n")
    assert finetune.checkpoint_folder(cfg, layout, 0, data) == (folder, None)
    assert not list(folder.glob("checkpoint-*"))
