"""The Papermill cycle loop: 01 once; per cycle 02 -> 03 -> 04 -> (05 if below epsilon); 06 at the end.

Run state lives in `<run>/state.json` (written atomically after every notebook), so `--resume` restarts
at the first notebook that did not finish. A failing notebook stops the run with the notebook's path and
the failing cell's error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import papermill as pm

from .config import ConfigError, RunConfig, dump_config, load_config
from .jsonio import read_json, write_json
from .runlayout import RunLayout
from .summary import write_summary

KERNEL_NAME = "llamaduo-nb"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"


class NotebookFailed(RuntimeError):
    """A notebook raised; carries the executed notebook's path and the failing cell's error."""

    def __init__(self, notebook: Path, ename: str, evalue: str, cell_index: int | None):
        self.notebook, self.ename, self.evalue, self.cell_index = notebook, ename, evalue, cell_index
        cell = f" (cell {cell_index})" if cell_index is not None else ""
        super().__init__(f"{notebook}{cell} failed: {ename}: {evalue}")


def declared_parameters(notebook: str | Path) -> dict[str, dict[str, Any]]:
    """The parameters a notebook declares in its `parameters` cell (name -> papermill's inferred info)."""
    return pm.inspect_notebook(str(notebook))


def execute_notebook(
    src: str | Path,
    dst: str | Path,
    parameters: dict[str, Any],
    *,
    kernel_name: str = KERNEL_NAME,
    cwd: str | Path = PROJECT_ROOT,
    progress: bool = False,
) -> Path:
    """Execute `src` with papermill into `dst`; unknown parameters are an error, not papermill's warning."""
    src, dst = Path(src), Path(dst)
    declared = declared_parameters(src)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ConfigError(f"{src.name}: unknown parameter(s) {unknown}; it declares {sorted(declared)}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.running.ipynb")
    try:
        pm.execute_notebook(
            str(src),
            str(tmp),
            parameters=parameters,
            kernel_name=kernel_name,
            cwd=str(cwd),
            progress_bar=progress,
            log_output=False,
            request_save_on_cell_execute=True,
            # the kernel app's own start-up chatter (transport warnings) is noise on the runner's console;
            # errors still show, and cell outputs are unaffected
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except pm.PapermillExecutionError as exc:
        failed = dst.with_name(dst.stem + ".failed.ipynb")
        if tmp.exists():
            os.replace(tmp, failed)
        raise NotebookFailed(failed, exc.ename, exc.evalue, exc.cell_index) from None
    os.replace(tmp, dst)
    return dst


# --------------------------------------------------------------------------- run state


@dataclass
class RunState:
    """What the runner has finished. Steps are named like "01_coverage" or "cycle_00/02_finetune"."""

    done: list[str] = field(default_factory=list)
    decisions: dict[str, bool] = field(default_factory=dict)  # "cycle_00" -> passed epsilon?
    timings: dict[str, float] = field(default_factory=dict)
    status: str = "new"  # new | running | failed | finished
    stop_reason: str | None = None
    error: str | None = None

    @classmethod
    def load(cls, path: Path) -> RunState:
        if not path.is_file():
            return cls()
        data = read_json(path)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, path: Path) -> None:
        write_json(path, self.__dict__)


def step_name(stage: str, cycle: int | None) -> str:
    return stage if cycle is None else f"cycle_{cycle:02d}/{stage}"


@dataclass(frozen=True)
class Step:
    stage: str
    cycle: int | None

    @property
    def name(self) -> str:
        return step_name(self.stage, self.cycle)


def read_decision(layout: RunLayout, cycle: int) -> bool:
    """Whether cycle `cycle` met epsilon, as 04_evaluate wrote it in metrics.json."""
    path = layout.metrics_file(cycle)
    if not path.is_file():
        raise RuntimeError(f"04_evaluate finished but {path} is missing")
    metrics = read_json(path)
    try:
        return bool(metrics["decision"]["passed"])
    except (KeyError, TypeError) as exc:
        raise RuntimeError(f"{path}: no decision.passed field") from exc


def plan_next(cfg: RunConfig, state: RunState, layout: RunLayout) -> Step | None:
    """The next notebook to run given what is done; None when the run is complete.

    The loop logic in one place: 01 once; for cycle t: 02, 03, 04; if 04 says passed -> 06; otherwise
    05 and cycle t+1, unless t+1 == max_cycles -> 06 (05 is skipped on the last cycle: its data would
    never be used).
    """
    done = set(state.done)
    if "01_coverage" not in done:
        return Step("01_coverage", None)
    for cycle in range(cfg.loop.max_cycles):
        for stage in ("02_finetune", "03_batch_inference", "04_evaluate"):
            if step_name(stage, cycle) not in done:
                return Step(stage, cycle)
        key = f"cycle_{cycle:02d}"
        if key not in state.decisions:
            state.decisions[key] = read_decision(layout, cycle)
        if state.decisions[key]:
            state.stop_reason = f"epsilon met in cycle {cycle}"
            break
        if cycle + 1 >= cfg.loop.max_cycles:
            state.stop_reason = f"max_cycles={cfg.loop.max_cycles} reached without meeting epsilon"
            break
        if step_name("05_synthesize", cycle) not in done:
            return Step("05_synthesize", cycle)
    if cfg.deploy.enabled and "06_deploy" not in done:
        return Step("06_deploy", None)
    return None


def notebook_source(stage: str, notebooks_dir: Path = NOTEBOOKS_DIR) -> Path:
    path = notebooks_dir / f"{stage}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"notebook for stage {stage} not found: {path}")
    return path


def stage_parameters(step: Step, layout: RunLayout, notebook: Path) -> dict[str, Any]:
    """Parameters passed to a stage notebook: the run folder and, per cycle, the cycle number."""
    params: dict[str, Any] = {"run_dir": str(layout.root)}
    if step.cycle is not None:
        params["cycle"] = step.cycle
    declared = declared_parameters(notebook)
    return {k: v for k, v in params.items() if k in declared}


def finetune_launch_command(cfg: RunConfig, layout: RunLayout, cycle: int) -> list[str]:
    """`accelerate launch` of 02's CLI (`python -m llamaduo_nb.finetune <run> --cycle N`) on
    `finetune.num_processes` processes; `finetune.accelerate_config` (DeepSpeed ZeRO, FSDP, several
    machines) is passed as accelerate's --config_file. Each rank trains on its shard; rank 0 writes the
    adapter, train log and finetune.json that 03 reads, exactly as the notebook would."""
    ft = cfg.finetune
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(ft.num_processes)]
    if ft.accelerate_config:
        cmd += ["--config_file", str(Path(ft.accelerate_config).resolve())]
    else:
        cmd += ["--multi_gpu"] if ft.num_processes > 1 else []
    return [*cmd, "-m", "llamaduo_nb.finetune", str(layout.root), "--cycle", str(cycle)]


def launch_distributed_finetune(
    cfg: RunConfig, layout: RunLayout, step: Step, log: Callable[[str], None] = print
) -> bool:
    """Run 02 of a cycle through `accelerate launch` when `finetune.num_processes > 1` (True when it did).

    The step is recorded done only when the launch exits cleanly, so `--resume` relaunches an
    interrupted cycle instead of retraining it in one process. The 02 notebook is not executed in this mode
    (its training would run again in one process); the launch log is `logs/accelerate_cycle_NN.log`.
    """
    import subprocess

    if step.stage != "02_finetune" or cfg.finetune.num_processes <= 1:
        return False
    import torch

    gpus = torch.cuda.device_count()
    if not cfg.finetune.accelerate_config and gpus < cfg.finetune.num_processes:
        raise ConfigError(
            f"finetune.num_processes = {cfg.finetune.num_processes} needs as many CUDA GPUs on this machine "
            f"(found {gpus}); set it to 1, or name an accelerate config file for several machines in "
            "finetune.accelerate_config"
        )
    cmd = finetune_launch_command(cfg, layout, step.cycle)
    log_path = layout.logs_dir / f"accelerate_cycle_{step.cycle:02d}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"[llamaduo] {' '.join(cmd)}  (log: {log_path})")
    with open(log_path, "ab") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT).returncode
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise NotebookFailed(log_path, "accelerate launch", f"exit code {code}; last lines:\n{tail}", None)
    return True


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(
    params_file: str | Path,
    *,
    resume: bool = False,
    fresh: bool = False,
    overrides: dict[str, Any] | None = None,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    log: Callable[[str], None] = _log,
) -> RunState:
    """Execute a whole LlamaDuo run (continue one with `resume=True`; start over with `fresh=True`)."""
    cfg = load_config(params_file, overrides)
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    if fresh and layout.root.exists():
        if not (layout.params_file.exists() or layout.state_file.exists()):
            raise ConfigError(f"--fresh refuses to delete {layout.root}: it does not look like a run folder")
        shutil.rmtree(layout.root)
    if layout.state_file.exists() and not resume:
        state = RunState.load(layout.state_file)
        if state.done:
            raise ConfigError(
                f"{layout.root} already holds a run ({len(state.done)} notebooks done, status {state.status}); "
                "pass --resume to continue it, or choose another run_name / delete the folder"
            )
    layout.root.mkdir(parents=True, exist_ok=True)
    if resume and layout.params_file.is_file():
        previous = load_config(layout.params_file)
        if previous.to_dict() != cfg.to_dict():
            log(
                f"[llamaduo] note: {params_file} differs from {layout.params_file}; resuming with the new settings"
            )
    dump_config(cfg, layout.params_file)
    state = RunState.load(layout.state_file) if resume else RunState()
    state.status, state.error = "running", None
    state.save(layout.state_file)
    started = time.monotonic()
    while (step := plan_next(cfg, state, layout)) is not None:
        src = notebook_source(step.stage, notebooks_dir)
        dst = layout.notebook_out(step.stage, step.cycle)
        where = f"cycle {step.cycle}" if step.cycle is not None else "run"
        log(f"[llamaduo] {time.monotonic() - started:7.1f}s  {where}: {step.stage} -> {dst}")
        t0 = time.monotonic()
        try:
            if not launch_distributed_finetune(cfg, layout, step, log):
                execute_notebook(src, dst, stage_parameters(step, layout, src))
        except NotebookFailed as exc:
            state.status, state.error = "failed", str(exc)
            state.save(layout.state_file)
            log(f"[llamaduo] FAILED {step.name}: {exc}")
            raise
        state.done.append(step.name)
        state.timings[step.name] = round(time.monotonic() - t0, 2)
        state.save(layout.state_file)
    state.status = "finished"
    state.timings["total"] = round(sum(v for k, v in state.timings.items() if k != "total"), 2)
    state.save(layout.state_file)
    summary = write_summary(cfg, layout, state)
    log(summary)
    log(f"[llamaduo] finished in {time.monotonic() - started:.1f}s: {state.stop_reason}")
    return state


def describe_state(layout: RunLayout) -> str:
    return json.dumps(RunState.load(layout.state_file).__dict__, indent=2)
