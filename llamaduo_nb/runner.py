"""The Papermill cycle loop: 01 once; per cycle 02 -> 03 -> 04 -> (05 if below epsilon); 06 at the end.

`loop.mode: sweep` runs every cycle whatever epsilon says (each verdict stays recorded). A study of several
generators (`synthesize.generators`) runs 01 and cycle 0's 02 -> 03 -> 04 once in the study folder, then each
generator as an arm: a run folder under `arms/<generator>/` whose 01, cycle 0 and Table 1's reference rows are
linked from the study's (never recomputed), going on from cycle 0's 05 with its own state, lock, forecasts and
call ledger; at the end `study.write_study` draws Fig. 2 with one line per generator into the study folder.

Run state lives in `<run>/state.json` (written atomically before and after every notebook), so `--resume`
restarts at the first notebook that did not finish. A failing notebook stops the run with the notebook's
path and the failing cell's error. Ctrl-C, SIGTERM/SIGHUP and a dead kernel leave the state "interrupted"
(the half-executed notebook is kept as `<stage>.interrupted.ipynb`, never as a stray `.running` file); a
runner killed outright (SIGKILL, power loss) is recognised on the next start because it no longer holds the
run folder's lock. One runner per run folder: `runner.lock` is held with fcntl while a runner works.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import papermill as pm
import yaml

from . import forecast, study
from .config import ConfigError, RunConfig, dump_config, is_non_semantic, load_config
from .finetune import cpu_threads_per_process
from .jsonio import read_json, read_jsonl, write_json, write_jsonl
from .runlayout import RunLayout
from .schemas import read_metrics
from .summary import write_summary

KERNEL_NAME = "llamaduo-nb"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"


STAGE_STOPPED = "StageStopped"  # services.StageStopped's name, as papermill reports it (ename)


class NotebookFailed(RuntimeError):
    """A notebook raised; carries the executed notebook's path and the failing cell's error."""

    def __init__(self, notebook: Path, ename: str, evalue: str, cell_index: int | None):
        self.notebook, self.ename, self.evalue, self.cell_index = notebook, ename, evalue, cell_index
        cell = f" (cell {cell_index})" if cell_index is not None else ""
        super().__init__(f"{notebook}{cell} failed: {ename}: {evalue}")

    @property
    def stopped(self) -> bool:
        """The stage stopped itself to stop spending (failing provider, budget): resumable, not a crash."""
        return self.ename == STAGE_STOPPED


class RunInterrupted(Exception):
    """The run stopped mid-notebook without a notebook error: a signal, or the kernel died. Resumable."""


class RunLocked(ConfigError):
    """Another runner holds this run folder."""


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
    progress: bool | str = False,
) -> Path:
    """Execute `src` with papermill into `dst`; unknown parameters are an error, not papermill's warning."""
    src, dst = Path(src), Path(dst)
    declared = declared_parameters(src)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ConfigError(f"{src.name}: unknown parameter(s) {unknown}; it declares {sorted(declared)}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = running_copy(dst)
    try:
        pm.execute_notebook(
            str(src),
            str(tmp),
            parameters=parameters,
            kernel_name=kernel_name,
            cwd=str(cwd),
            progress_bar=_progress_bar(progress),
            log_output=False,
            request_save_on_cell_execute=True,
            # the kernel app's own start-up chatter (transport warnings) is noise on the runner's console;
            # errors still show, and cell outputs are unaffected
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except pm.PapermillExecutionError as exc:
        if exc.ename == "KeyboardInterrupt":  # Ctrl-C reached the kernel too (same process group)
            _set_aside(tmp, dst, "interrupted")
            raise RunInterrupted(f"interrupted (KeyboardInterrupt in cell {exc.cell_index})") from None
        failed = _set_aside(tmp, dst, "failed")
        raise NotebookFailed(failed, exc.ename, exc.evalue, exc.cell_index) from None
    except RunInterrupted:  # SIGTERM / SIGHUP, raised by the runner's handler while papermill waited
        _set_aside(tmp, dst, "interrupted")
        raise
    except DeadKernelError as exc:
        kept = _set_aside(tmp, dst, "interrupted")
        raise RunInterrupted(
            f"the kernel died while executing {src.name} (killed, or out of memory); partial notebook: {kept}"
        ) from exc
    except Exception as exc:  # the kernel did not start, a cell timed out, ...
        failed = _set_aside(tmp, dst, "failed")
        raise NotebookFailed(failed, type(exc).__name__, str(exc), None) from exc
    except BaseException:  # KeyboardInterrupt, RunInterrupted from a signal handler, SystemExit
        _set_aside(tmp, dst, "interrupted")
        raise
    os.replace(tmp, dst)
    return dst


try:  # nbclient is papermill's engine; the import path is stable across nbclient 0.5-0.10
    from nbclient.exceptions import DeadKernelError
except ImportError:  # pragma: no cover

    class DeadKernelError(RuntimeError):  # type: ignore[no-redef]
        pass


def running_copy(dst: Path) -> Path:
    """Where a notebook is written while it executes (renamed to `dst` only when it finished)."""
    return dst.with_name(f".{dst.name}.running.ipynb")


def _set_aside(tmp: Path, dst: Path, kind: str) -> Path:
    """Keep a half-executed notebook as `<stage>.<kind>.ipynb` (kind: failed | interrupted)."""
    kept = dst.with_name(f"{dst.stem}.{kind}.ipynb")
    if tmp.exists():
        os.replace(tmp, kept)
    return kept


def _progress_bar(progress: bool | str) -> bool | dict:
    """Papermill's per-notebook tqdm bar: `<label>: cell k/n [elapsed<remaining]`."""
    if not progress:
        return False
    label = progress if isinstance(progress, str) else "notebook"
    return {
        "desc": label,
        "unit": "cell",
        "bar_format": "{desc}: cell {n_fmt}/{total_fmt} |{bar:20}| {elapsed} elapsed, {rate_fmt}",
        "file": sys.stderr,
    }


# --------------------------------------------------------------------------- run state


# Every value RunState.status can take, with what it means for the user. Add new ones here (and only here);
# `llamaduo status` prints the explanation. Every status can be continued with `--resume`.
STATUSES: dict[str, str] = {
    "new": "nothing has run yet",
    "running": "a runner is executing a notebook",
    "interrupted": "Ctrl-C, SIGTERM, a dead kernel or a killed runner stopped it mid-notebook; --resume continues",
    "failed": "a notebook raised an error; fix the cause, then --resume re-runs that notebook",
    "stopped": "a stage stopped on purpose (failing provider, budget); --resume continues once resolved",
    "finished": "the loop ended (epsilon met, max_cycles reached, or every volume of a sweep) and every planned "
    "notebook ran",
}

SHARED_STEPS = ("01_coverage", "cycle_00/02_finetune", "cycle_00/03_batch_inference", "cycle_00/04_evaluate")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class RunState:
    """What the runner has finished. Steps are named like "01_coverage" or "cycle_00/02_finetune".

    `status` is one of STATUSES. `current` is the step executing (or the one that failed / was
    interrupted), `error` says why the run is not running any more, `runner` who ran it last.
    """

    done: list[str] = field(default_factory=list)
    decisions: dict[str, bool] = field(default_factory=dict)  # "cycle_00" -> passed epsilon?
    timings: dict[str, float] = field(default_factory=dict)
    status: str = "new"  # one of STATUSES
    stop_reason: str | None = None
    error: str | None = None
    current: str | None = None
    started_at: str | None = None
    updated_at: str | None = None
    runner: dict[str, Any] | None = None  # {pid, host} of the runner that wrote this state last
    param_changes: list[dict[str, Any]] = field(default_factory=list)  # accepted on --resume
    shared_from: str | None = None  # an arm of a study: the study folder its SHARED_STEPS were linked from

    @classmethod
    def load(cls, path: Path) -> RunState:
        if not path.is_file():
            return cls()
        data = read_json(path)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, path: Path) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown run status {self.status!r}; statuses are {list(STATUSES)}")
        self.updated_at = _now()
        write_json(path, self.__dict__)


# --------------------------------------------------------------------------- one runner per run folder


def _holder_text(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


def lock_holder(layout: RunLayout) -> dict[str, Any] | None:
    """The runner holding `layout`'s lock ({pid, host, since}), or None when no runner works on it."""
    if not layout.lock_file.is_file():
        return None
    with open(layout.lock_file, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                return json.loads(fh.read() or "{}")
            except json.JSONDecodeError:
                return {}
        fcntl.flock(fh, fcntl.LOCK_UN)
        return None


@contextlib.contextmanager
def run_lock(layout: RunLayout) -> Iterator[None]:
    """Hold the run folder's lock (fcntl.flock) for the duration; a second runner fails at once.

    The OS releases the lock when the holder dies however it dies, so a stale lock file never blocks.
    (flock is advisory and local: two hosts sharing the folder over NFS are not guaranteed to exclude.)
    """
    layout.root.mkdir(parents=True, exist_ok=True)
    fh = open(layout.lock_file, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        try:
            holder = json.loads(fh.read() or "{}")
        except json.JSONDecodeError:
            holder = {}
        fh.close()
        raise RunLocked(
            f"{layout.root} is in use by another runner ({_holder_text(holder)}); two runners on one run "
            "folder would overwrite each other's files. Wait for it (`llamaduo status "
            f"{layout.root}`), stop it (kill -TERM {holder.get('pid', '<pid>')}), or use another run_name"
        ) from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}) + "\n")
        fh.flush()
        yield
    finally:
        fh.seek(0)
        fh.truncate()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise RunInterrupted in the main thread (Ctrl-C already raises KeyboardInterrupt)."""
    if not threading_main():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise RunInterrupted(f"interrupted by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While the runner records an interruption, a second Ctrl-C / SIGTERM must not cut the write short."""
    if not threading_main():
        yield
        return
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stray_running_notebooks(layout: RunLayout) -> list[Path]:
    return sorted(layout.root.rglob(".*.running.ipynb")) if layout.root.is_dir() else []


def _recover_after_kill(layout: RunLayout, state: RunState, log: Callable[[str], None]) -> None:
    """A state left "running" by a runner that no longer holds the lock: it was killed (SIGKILL, power)."""
    for tmp in stray_running_notebooks(layout):
        dst = tmp.with_name(tmp.name[1 : -len(".running.ipynb")])
        kept = _set_aside(tmp, dst, "interrupted")
        log(f"[llamaduo] a killed runner left {tmp.name}; kept as {kept}")
    if state.status == "running":
        state.status = "interrupted"
        state.error = (
            f"the runner ({_holder_text(state.runner)}) ended without recording why"
            f"{f' during {state.current}' if state.current else ''} (killed?)"
        )
        log(f"[llamaduo] {state.error}")


# --------------------------------------------------------------------------- params diff


def diff_params(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """Changed settings as [{key: "loop.max_cycles", old: 2, new: 3}, ...] (dotted keys, sorted).

    A list of named sections (`providers`) whose names are unchanged is compared item by item, so a provider's
    field is named `providers.<name>.<field>`."""
    changes = []
    for key in sorted(set(old) | set(new)):
        dotted = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += diff_params(a, b, dotted + ".")
        elif _named(a) and _named(b) and [x["name"] for x in a] == [x["name"] for x in b]:
            for x, y in zip(a, b, strict=True):
                changes += diff_params(x, y, f"{dotted}.{x['name']}.")
        elif a != b:
            changes.append({"key": dotted, "old": a, "new": b})
    return changes


def _named(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, dict) and "name" in x for x in value)


def _format_changes(changes: list[dict[str, Any]]) -> str:
    return "; ".join(f"{c['key']}: {c['old']!r} -> {c['new']!r}" for c in changes)


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
    metrics = read_metrics(layout, cycle)
    if metrics is None:
        raise RuntimeError(f"04_evaluate finished but {layout.metrics_file(cycle)} is missing")
    try:
        return bool(metrics["decision"]["passed"])
    except (KeyError, TypeError) as exc:
        raise RuntimeError(f"{layout.metrics_file(cycle)}: no decision.passed field") from exc


def plan_next(
    cfg: RunConfig, state: RunState, layout: RunLayout, *, shared_only: bool = False
) -> Step | None:
    """The next notebook to run given what is done; None when the run is complete.

    The loop logic in one place: 01 once; for cycle t: 02, 03, 04; if 04 says passed -> 06; otherwise
    05 and cycle t+1, unless t+1 == max_cycles -> 06 (05 is skipped on the last cycle: its data would
    never be used). `loop.mode: sweep` reads and records every decision but never stops on one: every cycle
    runs. `shared_only` (a study's own folder): 01 and cycle 0's 02, 03, 04, nothing else.
    """
    done = set(state.done)
    if "01_coverage" not in done:
        return Step("01_coverage", None)
    sweep = cfg.loop.mode == "sweep"
    for cycle in range(cfg.loop.max_cycles):
        for stage in ("02_finetune", "03_batch_inference", "04_evaluate"):
            if step_name(stage, cycle) not in done:
                return Step(stage, cycle)
        key = f"cycle_{cycle:02d}"
        if key not in state.decisions:
            state.decisions[key] = read_decision(layout, cycle)
        if shared_only:
            state.stop_reason = "01 and cycle 0 done (shared by the arms)"
            return None
        if state.decisions[key] and not sweep:
            state.stop_reason = f"epsilon met in cycle {cycle}"
            break
        if cycle + 1 >= cfg.loop.max_cycles:
            if sweep:
                passed = [int(k.split("_")[1]) for k, v in sorted(state.decisions.items()) if v]
                state.stop_reason = (
                    f"sweep: all {cfg.loop.max_cycles} cycles trained and evaluated; epsilon met in cycles "
                    f"{passed or 'none'} (recorded, not acted on)"
                )
            else:
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


# accelerate config files whose processes need one CUDA GPU each
GPU_DISTRIBUTED_TYPES = ("MULTI_GPU", "DEEPSPEED", "FSDP", "MEGATRON_LM")


def finetune_launch_command(cfg: RunConfig, layout: RunLayout, cycle: int) -> list[str]:
    """`accelerate launch` of 02's CLI (`python -m llamaduo_nb.finetune <run> --cycle N`) on
    `finetune.num_processes` processes of this machine: one per GPU, or on a machine without CUDA that many
    CPU processes joined over gloo. `--multi_gpu` is the name of accelerate's local multi-process
    (torchrun) launcher, the only one that starts several processes without MPI; on CPU the processes find
    no GPU and `finetune.prepare` sets them up for CPU. Port 0: accelerate picks a free rendezvous port, so
    two runs on one machine do not collide. `finetune.accelerate_config` (DeepSpeed ZeRO, FSDP, several
    machines) replaces all of that and is passed as accelerate's --config_file. Each rank trains on its
    share of every global batch; rank 0 writes the adapter, train log and finetune.json that 03 reads,
    exactly as the notebook would."""
    ft = cfg.finetune
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(ft.num_processes)]
    if ft.accelerate_config:
        cmd += ["--config_file", str(Path(ft.accelerate_config).resolve())]
    elif ft.num_processes > 1:
        cmd += ["--multi_gpu", "--num_machines", "1", "--main_process_port", "0"]
        # precision is 02's decision (finetune.training_precision); these only silence accelerate's notice
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*cmd, "-m", "llamaduo_nb.finetune", str(layout.root), "--cycle", str(cycle)]


def check_distributed_hardware(cfg: RunConfig, gpus: int) -> str:
    """What the launch will run on ("2 CUDA GPUs", "2 CPU processes (gloo), 1 thread each"), or a
    ConfigError where the settings really need GPUs this machine lacks."""
    ft = cfg.finetune
    if ft.accelerate_config:
        path = Path(ft.accelerate_config)
        if not path.is_file():
            raise ConfigError(f"finetune.accelerate_config: {path} not found")
        try:
            settings = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"finetune.accelerate_config: {path} is not YAML/JSON: {exc}") from None
        kind = str(settings.get("distributed_type", "")).upper() if isinstance(settings, dict) else ""
        if gpus == 0 and kind in GPU_DISTRIBUTED_TYPES and not settings.get("use_cpu"):
            raise ConfigError(
                f"finetune.accelerate_config: {path} asks for distributed_type {kind}, which needs CUDA GPUs; "
                f"this machine has none. For {ft.num_processes} CPU processes (DDP over gloo) remove "
                "finetune.accelerate_config"
            )
        return f"{ft.num_processes} processes as {path.name} says ({kind or 'distributed_type not set'})"
    if gpus == 0:
        threads = cpu_threads_per_process(ft.num_processes, cfg.student.cpu_threads)
        return f"{ft.num_processes} CPU processes (DDP over gloo), {threads} thread(s) each"
    if gpus < ft.num_processes:
        raise ConfigError(
            f"finetune.num_processes = {ft.num_processes} starts one process per CUDA GPU, and this machine "
            f"has {gpus}; set it to {gpus} or fewer, hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on "
            "CPU processes instead, or name an accelerate config file for several machines in "
            "finetune.accelerate_config"
        )
    return f"{ft.num_processes} CUDA GPUs"


def launch_distributed_finetune(
    cfg: RunConfig, layout: RunLayout, step: Step, log: Callable[[str], None] = print
) -> bool:
    """Run 02 of a cycle through `accelerate launch` when `finetune.num_processes > 1` (True when it did).

    The step is recorded done only when the launch exits cleanly, so `--resume` relaunches an
    interrupted cycle instead of retraining it in one process (checkpoints made by the launch are resumed as
    in one process). The 02 notebook is not executed in this mode (its training would run again in one
    process); the launch log is `logs/accelerate_cycle_NN.log`. On CPU each process gets its share of the
    cores (OMP_NUM_THREADS, unless set).
    """
    import subprocess

    if step.stage != "02_finetune" or cfg.finetune.num_processes <= 1:
        return False
    import torch

    gpus = torch.cuda.device_count()
    hardware = check_distributed_hardware(cfg, gpus)
    cmd = finetune_launch_command(cfg, layout, step.cycle)
    env = dict(os.environ)
    if gpus == 0:
        threads = cpu_threads_per_process(cfg.finetune.num_processes, cfg.student.cpu_threads)
        env.setdefault("OMP_NUM_THREADS", str(threads))  # torchrun would set 1 whatever the cores
    log_path = layout.logs_dir / f"accelerate_cycle_{step.cycle:02d}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"[llamaduo] 02 on {hardware}: {' '.join(cmd)}  (log: {log_path})")
    with open(log_path, "ab") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, env=env).returncode
    if code != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise NotebookFailed(log_path, "accelerate launch", f"exit code {code}; last lines:\n{tail}", None)
    return True


def record_forecast(
    cfg: RunConfig, layout: RunLayout, step: Step, log: Callable[[str], None] = print
) -> None:
    """Before a paid notebook (04, 05, 06): record its forecast in the run's calls.sqlite (the ServicePool sends
    no paid call without it) and log its calls, USD and upper bound, and any budget it may cross."""
    import warnings

    if step.stage not in forecast.PAID_STAGES:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", forecast.BudgetWarning)  # logged below instead
        table = forecast.forecast_stage(cfg, step.stage, step.cycle, layout)
    log(
        f"[llamaduo] forecast {step.name}: {int(table.calls.sum())} service calls, ${table.usd.sum():.4f} "
        f"(upper bound ${table.worst_usd.sum():.4f}; `llamaduo forecast` shows the lines)"
    )
    for note in table.attrs["budget"]:
        log(f"[llamaduo] WARNING {step.name}: {note}")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(
    params_file: str | Path,
    *,
    resume: bool = False,
    fresh: bool = False,
    accept_changed_params: bool = False,
    overrides: dict[str, Any] | None = None,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    log: Callable[[str], None] = _log,
    progress: bool = False,
) -> RunState:
    """Execute a whole LlamaDuo run (continue one with `resume=True`; start over with `fresh=True`).

    `--resume` with settings that differ from the run's params.yaml is an error unless
    `accept_changed_params`, or unless every change is to a non-semantic key (`config.NON_SEMANTIC_KEYS`:
    budgets, retries, rate limits, timeouts); accepted changes are recorded in state.json and
    params_changes.jsonl.
    `progress` shows a per-notebook bar (cell k/n, elapsed) on stderr.
    """
    cfg = load_config(params_file, overrides)
    layout = RunLayout.for_run(cfg.outputs_dir, cfg.run_name)
    if fresh and layout.root.exists() and not (layout.params_file.exists() or layout.state_file.exists()):
        raise ConfigError(f"--fresh refuses to delete {layout.root}: it does not look like a run folder")
    with run_lock(layout), _signals_interrupt():
        if fresh:
            for item in layout.root.iterdir():
                if item != layout.lock_file:
                    shutil.rmtree(item) if item.is_dir() else item.unlink()
        state = _open_state(cfg, params_file, layout, resume, accept_changed_params, log)
        if cfg.arms:
            return _run_study_locked(
                cfg, params_file, layout, state, notebooks_dir, log, progress, accept_changed_params
            )
        return _run_locked(cfg, layout, state, notebooks_dir, log, progress)


# --------------------------------------------------------------------------- a study of several generators


def seed_arm(study: RunLayout, arm: RunLayout, arm_cfg: RunConfig, decisions: dict[str, bool]) -> None:
    """Give an arm the study's shared steps: its coverage/, cycle_00/, baselines/ and review.json as hard links
    (copies where the file system refuses links; every stage writes by temp file + rename, so an arm's later
    write replaces its link and never touches the study's file), its params.yaml, and a state.json marking
    SHARED_STEPS done (written last: an arm without one is seeded again)."""
    folders = [(study.coverage_dir, arm.coverage_dir), (study.cycle_dir(0), arm.cycle_dir(0))]
    folders.append((study.baselines_dir, arm.baselines_dir))
    for src_dir, dst_dir in folders:
        if not src_dir.is_dir():
            continue
        for src in sorted(src_dir.rglob("*")):
            if not src.is_file() or src.name.endswith(".running.ipynb"):
                continue
            _link(src, dst_dir / src.relative_to(src_dir))
    if study.review_file.is_file():
        _link(study.review_file, arm.review_file)
    dump_config(arm_cfg, arm.params_file)
    state = RunState(done=list(SHARED_STEPS), decisions=dict(decisions), shared_from=str(study.root))
    state.save(arm.state_file)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _run_study_locked(
    cfg: RunConfig,
    params_file: str | Path,
    layout: RunLayout,
    state: RunState,
    notebooks_dir: Path,
    log: Callable[[str], None],
    progress: bool,
    accept_changed_params: bool,
) -> RunState:
    """The study's shared steps here, then every arm (its own run folder, lock and state; a resumed study
    resumes each arm with the study's current settings), then Fig. 2 over the arms and the summary."""
    started = time.monotonic()
    state = _run_locked(cfg, layout, state, notebooks_dir, log, progress, shared_only=True)
    try:
        for arm in cfg.arms:
            step = f"arms/{arm}"
            if step in state.done:
                continue
            state.current = step
            state.save(layout.state_file)
            arm_layout = RunLayout(layout.arm_dir(arm))
            arm_cfg = cfg.arm(arm, str(layout.arms_dir))
            if not arm_layout.state_file.is_file():
                seed_arm(layout, arm_layout, arm_cfg, state.decisions)
                log(f"[llamaduo] arm {arm}: {arm_layout.root} (01 and cycle 0 linked from the study)")
            with run_lock(arm_layout):
                arm_state = _open_state(arm_cfg, params_file, arm_layout, True, accept_changed_params, log)
                arm_state = _run_locked(arm_cfg, arm_layout, arm_state, notebooks_dir, log, progress)
            state.done.append(step)
            state.timings[step] = arm_state.timings.get("total", 0.0)
            state.current = None
            state.save(layout.state_file)
    except NotebookFailed as exc:
        state.status = "stopped" if exc.stopped else "failed"
        state.error = f"{state.current}: {exc}"
        state.save(layout.state_file)
        raise
    except (KeyboardInterrupt, RunInterrupted) as exc:
        with _signals_ignored():
            state.status = "interrupted"
            state.error = f"{exc or 'interrupted by Ctrl-C (SIGINT)'} during {state.current}"
            state.save(layout.state_file)
        raise RunInterrupted(state.error) from None
    state.status = "finished"
    state.stop_reason = f"study of {len(cfg.arms)} generators finished: " + "; ".join(
        f"{arm}: {RunState.load(RunLayout(layout.arm_dir(arm)).state_file).stop_reason}" for arm in cfg.arms
    )
    state.timings["total"] = round(sum(v for k, v in state.timings.items() if k != "total"), 2)
    state.save(layout.state_file)
    _finish(cfg, layout, state, log, started)
    return state


def _finish(
    cfg: RunConfig, layout: RunLayout, state: RunState, log: Callable[[str], None], started: float
) -> None:
    """The run's last words: a sweep's or study's Fig. 2 over volumes, then summary.md."""
    extra: list[str] = []
    if cfg.arms or cfg.loop.mode == "sweep":
        try:
            extra = study.write_study(cfg, layout)
        except Exception as exc:  # a figure must never cost the run its summary
            extra = [f"(Fig. 2 over volumes could not be drawn: {type(exc).__name__}: {exc})"]
    summary = write_summary(cfg, layout, state, extra=extra)
    log(summary)
    log(f"[llamaduo] finished in {time.monotonic() - started:.1f}s: {state.stop_reason}")


def _open_state(
    cfg: RunConfig,
    params_file: str | Path,
    layout: RunLayout,
    resume: bool,
    accept_changed_params: bool,
    log: Callable[[str], None],
) -> RunState:
    """The state to continue from (after checks), with params.yaml written; called holding the lock."""
    previous_state = RunState.load(layout.state_file)
    _recover_after_kill(layout, previous_state, log)
    if not resume and previous_state.done:
        raise ConfigError(
            f"{layout.root} already holds a run ({len(previous_state.done)} notebooks done, status "
            f"{previous_state.status}); pass --resume to continue it, or choose another run_name / delete the folder"
        )
    state = previous_state if resume else RunState()
    if resume and layout.params_file.is_file():
        changes = diff_params(load_config(layout.params_file).to_dict(), cfg.to_dict())
        semantic = [c for c in changes if not is_non_semantic(c["key"])]
        if semantic and not accept_changed_params:
            raise ConfigError(
                f"{params_file} differs from the run's {layout.params_file}: {_format_changes(semantic)}. "
                "Resuming would mix results made under different settings; pass --accept-changed-params to "
                "resume with the new settings anyway (the change is recorded), or resume with the same params "
                "(budgets, retries, rate limits and timeouts may change freely: config.NON_SEMANTIC_KEYS)"
            )
        if changes:
            accepted = "--accept-changed-params" if semantic else "non-semantic settings only"
            entry = {"at": _now(), "after_steps": len(state.done), "changes": changes, "accepted": accepted}
            state.param_changes.append(entry)
            history = read_jsonl(layout.params_changes_file) if layout.params_changes_file.is_file() else []
            write_jsonl(layout.params_changes_file, [*history, entry])
            what = "changed settings" if semantic else "changed non-semantic settings"
            log(f"[llamaduo] resuming with {what} (recorded): {_format_changes(changes)}")
    dump_config(cfg, layout.params_file)
    return state


def _run_locked(
    cfg: RunConfig,
    layout: RunLayout,
    state: RunState,
    notebooks_dir: Path,
    log: Callable[[str], None],
    progress: bool,
    shared_only: bool = False,
) -> RunState:
    """Execute the planned notebooks of one run folder (held locked); `shared_only`: a study's shared steps,
    leaving the state "running" for the arms that follow."""
    state.status, state.error, state.current = "running", None, None
    state.started_at = state.started_at or _now()
    state.runner = {"pid": os.getpid(), "host": socket.gethostname()}
    state.save(layout.state_file)
    started = time.monotonic()
    t0 = started
    try:
        while (step := plan_next(cfg, state, layout, shared_only=shared_only)) is not None:
            src = notebook_source(step.stage, notebooks_dir)
            dst = layout.notebook_out(step.stage, step.cycle)
            where = f"cycle {step.cycle}" if step.cycle is not None else "run"
            log(f"[llamaduo] {time.monotonic() - started:7.1f}s  {where}: {step.stage} -> {dst}")
            state.current = step.name
            state.save(layout.state_file)
            t0 = time.monotonic()
            try:
                record_forecast(cfg, layout, step, log)
                if not launch_distributed_finetune(cfg, layout, step, log):
                    execute_notebook(
                        src,
                        dst,
                        stage_parameters(step, layout, src),
                        progress=step.name if progress else False,
                    )
            except NotebookFailed as exc:
                state.status = "stopped" if exc.stopped else "failed"
                state.error = str(exc)
                if exc.stopped:
                    state.stop_reason = f"{step.name} stopped: {exc.evalue}"
                state.save(layout.state_file)
                log(f"[llamaduo] {state.status.upper()} {step.name}: {exc}")
                raise
            state.done.append(step.name)
            state.timings[step.name] = round(time.monotonic() - t0, 2)
            state.current = None
            state.save(layout.state_file)
            log(
                f"[llamaduo] {time.monotonic() - started:7.1f}s  done {step.name} in {state.timings[step.name]:.1f}s"
            )
    except (KeyboardInterrupt, RunInterrupted) as exc:
        with _signals_ignored():
            why = str(exc) if isinstance(exc, RunInterrupted) else "interrupted by Ctrl-C (SIGINT)"
            state.status = "interrupted"
            state.error = f"{why}" + (
                f" during {state.current} after {time.monotonic() - t0:.1f}s" if state.current else ""
            )
            state.save(layout.state_file)
            log(f"[llamaduo] INTERRUPTED: {state.error}; `llamaduo run <params> --resume` continues")
        raise RunInterrupted(state.error) from None
    if shared_only:
        return state
    state.status = "finished"
    state.timings["total"] = round(sum(v for k, v in state.timings.items() if k != "total"), 2)
    state.save(layout.state_file)
    _finish(cfg, layout, state, log, started)
    return state


def describe_state(layout: RunLayout) -> str:
    """state.json as JSON, with the status a reader should believe (a dead runner's "running" is interrupted)."""
    return json.dumps(effective_state(layout).__dict__, indent=2)


def effective_state(layout: RunLayout) -> RunState:
    state = RunState.load(layout.state_file)
    if state.status == "running" and lock_holder(layout) is None:
        state.status = "interrupted"
        state.error = (
            f"the runner ({_holder_text(state.runner)}) is gone without recording why"
            f"{f' during {state.current}' if state.current else ''} (killed?)"
        )
    return state


def status_table(layout: RunLayout) -> str:
    """`llamaduo status`: the run's status and why, then one line per step (done / current) with seconds."""
    if not layout.state_file.is_file():
        return f"{layout.root}: no state.json (not a run folder, or the run never started)"
    state = effective_state(layout)
    holder = lock_holder(layout)
    lines = [
        f"run      {layout.root}",
        f"status   {state.status}: {STATUSES.get(state.status, '?')}",
    ]
    if state.error:
        lines.append(f"reason   {state.error}")
    if state.stop_reason:
        lines.append(f"loop     {state.stop_reason}")
    if state.shared_from:
        lines.append(f"shared   {', '.join(SHARED_STEPS)} linked from the study {state.shared_from}")
    arms = layout.arms()
    if arms:
        lines.append(f"arms     {', '.join(arms)} (`llamaduo status {layout.arms_dir}/<arm>` shows one)")
    lines.append(f"runner   {_holder_text(holder) + ' (working now)' if holder else 'none working now'}")
    if state.started_at:
        lines.append(f"started  {state.started_at}, last update {state.updated_at}")
    for entry in state.param_changes:
        lines.append(f"params   changed at {entry['at']}: {_format_changes(entry['changes'])}")
    rows = [
        (name, "done", f"{state.timings[name]:.1f}" if name in state.timings else "") for name in state.done
    ]
    if state.current and state.current not in state.done:
        rows.append((state.current, state.status, ""))
    width = max([len("step"), *(len(r[0]) for r in rows)])
    lines += [
        "",
        f"{'step':<{width}}  {'status':<11}  {'seconds':>8}",
        f"{'-' * width}  {'-' * 11}  {'-' * 8}",
    ]
    lines += [f"{name:<{width}}  {st:<11}  {sec:>8}" for name, st, sec in rows]
    total = sum(state.timings.get(n, 0.0) for n in state.done)
    lines.append(f"{'total':<{width}}  {len(state.done):>3} done     {total:>8.1f}")
    return "\n".join(lines)
