"""The cycle loop, run state and --resume, on small stand-in notebooks that honour the stage file contract."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from llamaduo_nb import runner
from llamaduo_nb.config import ConfigError
from llamaduo_nb.jsonio import read_json, read_jsonl
from llamaduo_nb.runlayout import STAGES, RunLayout
from llamaduo_nb.runner import PROJECT_ROOT

BODY = {
    "03_batch_inference": "if (Path(run_dir) / 'FAIL').exists():\n    raise RuntimeError('deliberate failure in 03')",
    "04_evaluate": (
        "passed = (Path(run_dir) / f'pass_{cycle}').exists()\n"
        "write_json(RunLayout(Path(run_dir)).metrics_file(cycle), {'decision': {'passed': passed, 'value': 50.0 + cycle}})"
    ),
}


# Every stand-in notebook can be told, through a file in the run folder, to stop mid-cell: HOLD_<tag> makes it
# write its kernel pid to HELD and sleep (so a test can kill the runner or the kernel there), DIE_<tag> makes
# its kernel die (SIGKILL to itself). The file is removed first, so a resumed run passes through.
PRELUDE = (
    "import os, time\n"
    "from pathlib import Path\n"
    "from llamaduo_nb.jsonio import write_json\n"
    "from llamaduo_nb.runlayout import RunLayout\n"
    "for name in (f'HOLD_{tag}', f'DIE_{tag}'):\n"
    "    flag = Path(run_dir) / name\n"
    "    if flag.exists():\n"
    "        flag.unlink()\n"
    "        if name.startswith('DIE'):\n"
    "            os.kill(os.getpid(), 9)\n"
    "        (Path(run_dir) / 'HELD').write_text(str(os.getpid()))\n"
    "        time.sleep(300)\n"
)


def stand_in_notebook(stage: str, per_cycle: bool) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "llamaduo-nb", "display_name": "llamaduo-nb", "language": "python"}
    params = 'run_dir: str = "outputs/x"  # run folder\n' + ("cycle: int = 0  # cycle\n" if per_cycle else "")
    cell = nbformat.v4.new_code_cell(params)
    cell.metadata["tags"] = ["parameters"]
    tag = f"{stage}@{{cycle}}" if per_cycle else stage
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"# {stage}"),
        cell,
        nbformat.v4.new_code_cell(f"tag = f'{tag}'\n" + PRELUDE),
        nbformat.v4.new_code_cell(
            BODY.get(stage, "")
            + "\nwith open(Path(run_dir) / 'executed.log', 'a') as fh:\n    fh.write(f'{tag}\\n')"
        ),
    ]
    return nb


def stand_in_notebooks(folder: Path) -> Path:
    """A notebooks folder of stand-ins for every stage (the cycle stages take `cycle`)."""
    folder.mkdir()
    for stage in STAGES:
        nbformat.write(
            stand_in_notebook(stage, stage not in ("01_coverage", "06_deploy")), folder / f"{stage}.ipynb"
        )
    return folder


@pytest.fixture
def notebooks_dir(tmp_path):
    return stand_in_notebooks(tmp_path / "nbs")


def executed(layout: RunLayout) -> list[str]:
    return (layout.root / "executed.log").read_text().split()


def test_failure_stops_the_run_and_resume_continues(make_params, notebooks_dir, tmp_path):
    params = make_params({"loop": {"max_cycles": 3}})
    layout = RunLayout(tmp_path / "outputs" / "demo")
    layout.root.mkdir(parents=True)
    (layout.root / "FAIL").touch()
    with pytest.raises(runner.NotebookFailed) as err:
        runner.run(params, notebooks_dir=notebooks_dir, log=lambda m: None)
    assert "deliberate failure in 03" in str(err.value)
    assert err.value.notebook == layout.cycle_dir(0) / "03_batch_inference.failed.ipynb"
    assert err.value.notebook.is_file()
    state = runner.RunState.load(layout.state_file)
    assert state.status == "failed" and state.done == ["01_coverage", "cycle_00/02_finetune"]

    with pytest.raises(ConfigError, match="--resume"):
        runner.run(params, notebooks_dir=notebooks_dir, log=lambda m: None)

    (layout.root / "FAIL").unlink()
    state = runner.run(params, resume=True, notebooks_dir=notebooks_dir, log=lambda m: None)
    assert state.status == "finished"
    assert executed(layout) == [
        "01_coverage",
        "02_finetune@0",
        "03_batch_inference@0",
        "04_evaluate@0",
        "05_synthesize@0",
        "02_finetune@1",
        "03_batch_inference@1",
        "04_evaluate@1",
        "05_synthesize@1",
        "02_finetune@2",
        "03_batch_inference@2",
        "04_evaluate@2",
        "06_deploy",
    ]  # nothing finished before the failure ran twice; 05 is skipped on the last cycle
    assert "max_cycles=3" in state.stop_reason
    for step in ("01_coverage", "06_deploy"):
        assert layout.notebook_out(step).is_file()
    assert layout.notebook_out("04_evaluate", 2).is_file()
    summary = read_json(layout.summary_json)
    assert [row["cycle"] for row in summary["cycles"]] == [0, 1, 2]
    assert "max_cycles" in layout.summary_file.read_text()


def test_loop_stops_when_epsilon_is_met(make_params, notebooks_dir, tmp_path):
    params = make_params({"loop": {"max_cycles": 4}})
    layout = RunLayout(tmp_path / "outputs" / "demo")
    layout.root.mkdir(parents=True)
    (layout.root / "pass_1").touch()
    state = runner.run(params, notebooks_dir=notebooks_dir, log=lambda m: None)
    assert executed(layout)[-3:] == ["03_batch_inference@1", "04_evaluate@1", "06_deploy"]
    assert state.decisions == {"cycle_00": False, "cycle_01": True}
    assert state.stop_reason == "epsilon met in cycle 1"
    # resuming a finished run does nothing more
    runner.run(params, resume=True, notebooks_dir=notebooks_dir, log=lambda m: None)
    assert executed(layout).count("06_deploy") == 1


def test_unknown_notebook_parameter_is_an_error(notebooks_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) \['k'\]"):
        runner.execute_notebook(
            notebooks_dir / "01_coverage.ipynb", tmp_path / "o.ipynb", {"run_dir": "x", "k": 4}
        )


def test_cli_reports_config_errors(make_params, project_root):
    bad = make_params({"inference": {"k": 0}})
    proc = subprocess.run(
        [sys.executable, "-m", "llamaduo_nb", "run", str(bad)],
        capture_output=True,
        text=True,
        cwd=project_root,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "'inference.k'" in proc.stderr and "K must be >= 1" in proc.stderr


# --------------------------------------------------------------------------- robustness: kills, signals, lock

RUNNER = (
    "import sys\n"
    "from pathlib import Path\n"
    "from llamaduo_nb import runner\n"
    "runner.run(sys.argv[1], resume=sys.argv[3] == 'resume', notebooks_dir=Path(sys.argv[2]))\n"
)


def params_for(folder: Path, run_name: str, max_cycles: int = 1) -> Path:
    data = yaml.safe_load((PROJECT_ROOT / "params" / "demo.yaml").read_text())
    data.update(
        run_name=run_name,
        outputs_dir=str(folder / "outputs"),
        prices_file=str(PROJECT_ROOT / "params" / "prices.yaml"),
    )
    data["coverage"]["source"] = str(PROJECT_ROOT / "data" / "sample_coverage.jsonl")
    data["loop"]["max_cycles"] = max_cycles
    path = folder / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def start_runner(params: Path, notebooks: Path, resume: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(params), str(notebooks), "resume" if resume else "new"],
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_until_held(layout: RunLayout, proc: subprocess.Popen) -> int:
    """Wait until a stand-in notebook sits in its HOLD; returns its kernel's pid."""
    held = layout.root / "HELD"
    deadline = time.monotonic() + 180  # a guard against a hang, not a measurement
    while not (held.is_file() and held.read_text()):
        assert proc.poll() is None, f"runner exited early: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "the stand-in notebook never reached its HOLD"
        time.sleep(0.2)
    return int(held.read_text())


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def kernel_gone(pid: int) -> bool:
    """Whether process `pid` has exited (the runner shuts its kernel down when interrupted)."""
    deadline = time.monotonic() + 30  # a guard, not a measurement
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):  # exited; its new parent has not reaped it yet
            return True
        time.sleep(0.2)
    return False


def results(layout: RunLayout) -> dict:
    """What a run produced, without timings: compared between an interrupted+resumed and a clean run."""
    state = runner.RunState.load(layout.state_file)
    return {
        "executed": executed(layout),
        "state": (state.status, state.done, state.decisions, state.stop_reason),
        "metrics": {c: read_json(layout.metrics_file(c)) for c in layout.cycles()},
        "summary": read_json(layout.summary_json)["cycles"],
        "notebooks": sorted(
            str(p.relative_to(layout.root))
            for p in layout.root.rglob("*.ipynb")
            if ".interrupted." not in p.name
        ),
    }


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("nbs")
    for stage in STAGES:
        nbformat.write(
            stand_in_notebook(stage, stage not in ("01_coverage", "06_deploy")), folder / f"{stage}.ipynb"
        )
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stand_ins) -> dict:
    """An uninterrupted run (1 cycle: 01 02 03 04 06): what every interrupted run must end up with."""
    folder = tmp_path_factory.mktemp("ref")
    state = runner.run(params_for(folder, "ref"), notebooks_dir=stand_ins, log=lambda m: None)
    assert state.status == "finished"
    return results(RunLayout(folder / "outputs" / "ref"))


def assert_consistent(layout: RunLayout) -> None:
    assert runner.stray_running_notebooks(layout) == []
    assert runner.lock_holder(layout) is None


def test_sigkill_of_the_runner_mid_notebook_then_resume_gives_identical_results(
    tmp_path, stand_ins, reference
):
    params = params_for(tmp_path, "killed")
    layout = RunLayout(tmp_path / "outputs" / "killed")
    layout.root.mkdir(parents=True)
    (layout.root / "HOLD_03_batch_inference@0").touch()
    proc = start_runner(params, stand_ins)
    kernel = wait_until_held(layout, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner dies without a chance to record anything
    proc.wait()
    kill_quietly(kernel)  # (a killed runner's kernel exits on its own once it notices; don't wait for it)

    on_disk = runner.RunState.load(layout.state_file)
    assert on_disk.status == "running" and on_disk.current == "cycle_00/03_batch_inference"
    assert runner.stray_running_notebooks(layout) == [
        layout.cycle_dir(0) / ".03_batch_inference.ipynb.running.ipynb"
    ]
    table = runner.status_table(layout)  # nobody holds the lock: status tells the truth
    assert (
        "status   interrupted" in table
        and "without recording why during cycle_00/03_batch_inference" in table
    )

    state = runner.run(params, resume=True, notebooks_dir=stand_ins, log=lambda m: None)
    assert state.status == "finished"
    assert_consistent(layout)
    assert (layout.cycle_dir(0) / "03_batch_inference.interrupted.ipynb").is_file()
    assert results(layout) == reference


def test_dead_kernel_leaves_an_interrupted_state_and_resume_completes(tmp_path, stand_ins, reference):
    params = params_for(tmp_path, "dead")
    layout = RunLayout(tmp_path / "outputs" / "dead")
    layout.root.mkdir(parents=True)
    (layout.root / "DIE_04_evaluate@0").touch()
    with pytest.raises(runner.RunInterrupted, match="kernel died while executing 04_evaluate"):
        runner.run(params, notebooks_dir=stand_ins, log=lambda m: None)
    state = runner.RunState.load(layout.state_file)
    assert state.status == "interrupted" and state.current == "cycle_00/04_evaluate"
    assert "kernel died" in state.error
    assert_consistent(layout)
    assert (layout.cycle_dir(0) / "04_evaluate.interrupted.ipynb").is_file()

    runner.run(params, resume=True, notebooks_dir=stand_ins, log=lambda m: None)
    assert_consistent(layout)
    assert results(layout) == reference


@pytest.mark.parametrize(("sig", "why"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_signals_leave_an_interrupted_state_and_a_second_runner_is_refused(
    tmp_path, stand_ins, reference, sig, why
):
    params = params_for(tmp_path, "signalled")
    layout = RunLayout(tmp_path / "outputs" / "signalled")
    layout.root.mkdir(parents=True)
    (layout.root / "HOLD_02_finetune@0").touch()
    proc = start_runner(params, stand_ins)
    kernel = wait_until_held(layout, proc)
    try:
        holder = runner.lock_holder(layout)
        assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname()
        with pytest.raises(runner.RunLocked, match=rf"in use by another runner \(pid {proc.pid} on "):
            runner.run(params, resume=True, notebooks_dir=stand_ins, log=lambda m: None)
        assert "(working now)" in runner.status_table(layout)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        kill_quietly(proc.pid)
        kill_quietly(kernel)
    assert "INTERRUPTED" in stderr
    assert kernel_gone(kernel), "the interrupted runner left its kernel running"
    state = runner.RunState.load(layout.state_file)
    assert (
        state.status == "interrupted" and why in state.error and "during cycle_00/02_finetune" in state.error
    )
    assert state.done == ["01_coverage"]
    assert_consistent(layout)

    runner.run(params, resume=True, notebooks_dir=stand_ins, log=lambda m: None)
    assert results(layout) == reference


def test_resume_with_changed_params_is_refused_unless_accepted_and_recorded(tmp_path, stand_ins, capfd):
    params = params_for(tmp_path, "changed", max_cycles=1)
    layout = RunLayout(tmp_path / "outputs" / "changed")
    layout.root.mkdir(parents=True)
    (layout.root / "FAIL").touch()
    with pytest.raises(runner.NotebookFailed):
        runner.run(params, notebooks_dir=stand_ins, log=lambda m: None)
    (layout.root / "FAIL").unlink()
    more = {"loop.max_cycles": 2}
    with pytest.raises(ConfigError, match=r"loop.max_cycles: 1 -> 2.*--accept-changed-params"):
        runner.run(params, resume=True, overrides=more, notebooks_dir=stand_ins, log=lambda m: None)
    assert runner.RunState.load(layout.state_file).status == "failed"  # untouched by the refusal

    state = runner.run(
        params, resume=True, overrides=more, accept_changed_params=True, notebooks_dir=stand_ins,
        log=lambda m: None, progress=True,
    )  # fmt: skip
    assert state.status == "finished" and "max_cycles=2" in state.stop_reason
    change = {"key": "loop.max_cycles", "old": 1, "new": 2}
    assert state.param_changes[0]["changes"] == [change] and state.param_changes[0]["after_steps"] == 2
    assert read_jsonl(layout.params_changes_file)[0]["changes"] == [change]
    table = runner.status_table(layout)
    assert (
        "status   finished" in table and "params   changed at" in table and "loop.max_cycles: 1 -> 2" in table
    )
    assert "cycle_01/04_evaluate" in table and "06_deploy" in table
    # the console showed each notebook's progress, cell by cell
    assert re.search(r"cycle_00/03_batch_inference: cell 5/5 \|", capfd.readouterr().err)
