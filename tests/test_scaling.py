"""Scaling out: the runner starts 02 through `accelerate launch` when finetune.num_processes > 1 (the
command and the hardware check here; the launch itself runs on CPU in test_ddp_cpu.py, on GPUs nowhere),
and vLLM gets tensor/pipeline parallel sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from llamaduo_nb.config import ConfigError, load_config
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.runner import (
    Step,
    check_distributed_hardware,
    finetune_launch_command,
    launch_distributed_finetune,
)

ROOT = Path(__file__).resolve().parent.parent


def _cfg(tmp_path: Path, **finetune):
    params = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    params["finetune"].update(finetune)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return load_config(path)


def test_accelerate_command_runs_02s_cli_on_every_process(tmp_path):
    cfg = _cfg(tmp_path, num_processes=4)
    layout = RunLayout(tmp_path / "run")
    cmd = finetune_launch_command(cfg, layout, 1)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd
    assert (
        cmd[cmd.index("--main_process_port") + 1] == "0"
    )  # accelerate picks a free port: runs never collide
    assert cmd[-5:] == ["-m", "llamaduo_nb.finetune", str(layout.root), "--cycle", "1"]


def test_an_accelerate_config_file_replaces_the_multi_gpu_flag(tmp_path):
    config_file = tmp_path / "zero3.yaml"
    config_file.write_text("distributed_type: DEEPSPEED\n")
    cfg = _cfg(tmp_path, num_processes=8, accelerate_config=str(config_file))
    cmd = finetune_launch_command(cfg, RunLayout(tmp_path / "run"), 0)
    assert cmd[cmd.index("--config_file") + 1] == str(config_file.resolve()) and "--multi_gpu" not in cmd


def test_one_process_keeps_the_notebook_path(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.finetune.num_processes == 1
    assert launch_distributed_finetune(cfg, RunLayout(tmp_path / "run"), Step("02_finetune", 0)) is False


def test_without_gpus_several_processes_train_on_cpu_with_the_cores_split(tmp_path):
    cfg = _cfg(tmp_path, num_processes=2)
    assert check_distributed_hardware(cfg, gpus=0).startswith("2 CPU processes (DDP over gloo)")


def test_fewer_gpus_than_processes_stop_before_launching(tmp_path):
    cfg = _cfg(tmp_path, num_processes=4)
    assert check_distributed_hardware(cfg, gpus=4) == "4 CUDA GPUs"
    with pytest.raises(ConfigError, match="one process per CUDA GPU, and this machine has 2"):
        check_distributed_hardware(cfg, gpus=2)


def test_an_accelerate_config_for_gpus_stops_before_launching_on_a_machine_without(tmp_path):
    import torch

    if torch.cuda.device_count() > 0:
        pytest.skip("this machine has GPUs: the launch would really run")
    config_file = tmp_path / "zero3.yaml"
    config_file.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\n")
    cfg = _cfg(tmp_path, num_processes=2, accelerate_config=str(config_file))
    with pytest.raises(ConfigError, match="distributed_type DEEPSPEED, which needs CUDA GPUs"):
        launch_distributed_finetune(cfg, RunLayout(tmp_path / "run"), Step("02_finetune", 0))
    assert not (tmp_path / "run" / "logs").exists()


def test_accelerate_launch_accepts_the_command(tmp_path):
    """accelerate's own parser reads the arguments the runner builds (no process is started)."""
    from accelerate.commands.launch import launch_command_parser

    cfg = _cfg(tmp_path, num_processes=4)
    cmd = finetune_launch_command(cfg, RunLayout(tmp_path / "run"), 0)
    args = launch_command_parser().parse_args(cmd[3:])
    assert args.num_processes == 4 and args.multi_gpu and args.module
    assert args.training_script == "llamaduo_nb.finetune"


@pytest.mark.skipif("not __import__('torch').cuda.device_count() >= 2", reason="needs 2+ CUDA GPUs")
def test_accelerate_launch_trains_a_cycle_on_two_gpus():  # pragma: no cover - GPU machines only
    pytest.skip(
        "run `llamaduo run params/X.yaml --set finetune.num_processes=2` on a GPU machine "
        "(the same launch on CPU processes: test_ddp_cpu.py)"
    )


def test_bad_scaling_values_are_rejected_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match="num_processes"):
        _cfg(tmp_path, num_processes=0)
    params = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    params["inference"]["gpu_memory_utilization"] = 1.5
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        load_config(tmp_path / "p.yaml")
