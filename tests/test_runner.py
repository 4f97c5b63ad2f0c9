"""The cycle loop, run state and --resume, on small stand-in notebooks that honour the stage file contract."""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from llamaduo_nb import runner
from llamaduo_nb.config import ConfigError
from llamaduo_nb.jsonio import read_json
from llamaduo_nb.runlayout import STAGES, RunLayout

BODY = {
    "03_batch_inference": "if (Path(run_dir) / 'FAIL').exists():\n    raise RuntimeError('deliberate failure in 03')",
    "04_evaluate": (
        "passed = (Path(run_dir) / f'pass_{cycle}').exists()\n"
        "write_json(RunLayout(Path(run_dir)).metrics_file(cycle), {'decision': {'passed': passed, 'value': 50.0 + cycle}})"
    ),
}


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
        nbformat.v4.new_code_cell(
            "from pathlib import Path\nfrom llamaduo_nb.jsonio import write_json\nfrom llamaduo_nb.runlayout import RunLayout\n"
            + BODY.get(stage, "")
            + f"\nwith open(Path(run_dir) / 'executed.log', 'a') as fh:\n    fh.write(f'{tag}\\n')"
        ),
    ]
    return nb


@pytest.fixture
def notebooks_dir(tmp_path):
    folder = tmp_path / "nbs"
    folder.mkdir()
    for stage in STAGES:
        nbformat.write(
            stand_in_notebook(stage, stage not in ("01_coverage", "06_deploy")), folder / f"{stage}.ipynb"
        )
    return folder


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
