"""End to end: `llamaduo run` on a tiny config — every notebook through Papermill, real models, real server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llamaduo_nb.jsonio import read_json
from llamaduo_nb.runlayout import RunLayout

PLANTED_KEY = "sk-planted-" + "Zq9" * 12  # looks like a key; must never reach a file under outputs/

TINY = {
    "run_name": "tiny",
    "coverage": {"max_rows": 8},
    "finetune": {"max_steps": 2, "max_length": 128, "per_device_batch_size": 2, "logging_steps": 1},
    "inference": {"k": 2, "max_new_tokens": 12, "batch_size": 2},
    "evaluate": {"m": 2, "max_tokens": 48},
    "synthesize": {
        "pairs_per_request": 2,
        "target_per_cycle": 2,
        "max_requests_per_cycle": 2,
        "max_tokens": 192,
    },
    "loop": {"max_cycles": 2},
    "deploy": {
        "gguf_types": ["q8_0"],
        "serve_gguf": "q8_0",
        "greedy_prompts": 2,
        "greedy_max_new_tokens": 12,
        "parity_m": 1,
    },
}


@pytest.mark.slow
def test_cli_runs_the_whole_loop_and_keeps_secrets_out(make_params, tmp_path, project_root):
    params = make_params(TINY)
    env = dict(os.environ, OPENAI_API_KEY=PLANTED_KEY, ANTHROPIC_API_KEY=PLANTED_KEY + "a")
    proc = subprocess.run(
        [sys.executable, "-m", "llamaduo_nb", "run", str(params)],
        cwd=project_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    layout = RunLayout(tmp_path / "outputs" / "tiny")
    state = read_json(layout.state_file)
    assert state["status"] == "finished"
    assert state["done"][0] == "01_coverage" and state["done"][-1] == "06_deploy"
    assert "cycle_01/04_evaluate" in state["done"]
    assert "max_cycles=2" in state["stop_reason"] or "epsilon met" in state["stop_reason"]
    assert layout.notebook_out("02_finetune", 1).is_file() and layout.notebook_out("06_deploy").is_file()
    summary = layout.summary_file.read_text()
    assert "Stopped:" in summary and "| 0 |" in summary
    assert (layout.merged_dir / "config.json").is_file() and layout.gguf_file("q8_0").is_file()
    # secrets: nothing under the run folder holds the planted key
    leaks = [p for p in layout.root.rglob("*") if p.is_file() and PLANTED_KEY.encode() in p.read_bytes()]
    assert leaks == []
