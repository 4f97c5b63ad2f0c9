"""Sweeps, studies of several generators and `llamaduo compare`: the settings and their checks, the loop on
stand-in notebooks, and one real tiny study (params/sweep_tiny.yaml) combined with a run of another student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_runner import stand_in_notebooks
from tinyrun import tiny_templateless_llama

from llamaduo_nb import runner, study, synthesize
from llamaduo_nb.config import ConfigError, load_config
from llamaduo_nb.jsonio import read_json, write_json, write_jsonl
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.runner import PROJECT_ROOT

SWEEP_TINY = PROJECT_ROOT / "params" / "sweep_tiny.yaml"
ALT = {"name": "smollm2-alt", "kind": "embedded", "model": "smollm2-135m-instruct-q4_1"}
TWO_GENERATORS = {
    "synthesize": {"generator": None, "generators": ["smollm2-service", "smollm2-alt"]},
    "teacher_study": {"candidates": []},
    "deploy": {"select": "best"},
}


def _providers(make_params, extra: dict) -> dict:
    demo = yaml.safe_load((PROJECT_ROOT / "params" / "demo.yaml").read_text())
    return {"providers": [*demo["providers"], ALT], **extra}


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("extra", "key", "says"),
    [
        ({"synthesize": {"generators": ["smollm2-service"]}}, "synthesize.generator", "not both"),
        ({"synthesize": {"volumes": [4, 2]}, "loop": {"max_cycles": 3}}, "synthesize.volumes", "increasing"),
        ({"synthesize": {"volumes": [2, 4]}, "loop": {"max_cycles": 4}}, "loop.max_cycles", "set max_cycles: 3"),
        ({"loop": {"mode": "sweep", "max_cycles": 1}}, "loop.max_cycles", "at least two cycles"),
        ({**TWO_GENERATORS, "deploy": {"select": "first_passing"}}, "deploy.select", "set deploy.select: best"),
        ({**TWO_GENERATORS, "teacher_study": {}}, "teacher_study.candidates", "one generator per cycle"),
        ({**TWO_GENERATORS, "synthesize": {"generator": None, "generators": ["nope"]}}, "synthesize.generators",
         "'nope' is not a declared provider"),
    ],
)  # fmt: skip
def test_sweep_and_study_settings_are_checked(make_params, extra, key, says):
    if "teacher_study" in extra and not extra["teacher_study"]:
        extra = {k: v for k, v in extra.items() if k != "teacher_study"}  # keep demo.yaml's candidates
    with pytest.raises(ConfigError) as err:
        load_config(make_params(_providers(make_params, extra)))
    assert f"'{key}'" in str(err.value) and says in str(err.value)


def test_listed_volumes_set_each_cycles_synthesis_target():
    cfg = load_config(SWEEP_TINY)
    assert cfg.loop.mode == "sweep" and cfg.arms == ["gen-a", "gen-b"]
    arm = cfg.arm("gen-b", "outputs/sweep-tiny/arms")
    assert arm.synthesize.generator == "gen-b" and arm.arms == [] and arm.run_name == "gen-b"
    assert arm.cache.path == str(Path("outputs") / ".callcache" / "calls.sqlite")  # the study's shared cache
    targets = [synthesize.target_rows(arm.synthesize, t) for t in range(arm.loop.max_cycles)]
    assert targets == [2, 2, 0]  # 05 of cycle t writes what cycle t + 1 adds; the last 05 never runs
    assert [sum(targets[:t]) for t in range(1, 3)] == cfg.synthesize.volumes


# --------------------------------------------------------------------------- the loop, on stand-in notebooks


@pytest.fixture
def stand_ins(tmp_path) -> Path:
    return stand_in_notebooks(tmp_path / "nbs")


def _executed(folder: Path) -> list[str]:
    return (folder / "executed.log").read_text().split()


def test_a_sweep_trains_every_cycle_although_epsilon_is_met(make_params, stand_ins, tmp_path):
    params = make_params({"loop": {"mode": "sweep", "max_cycles": 3}})
    layout = RunLayout(tmp_path / "outputs" / "demo")
    layout.root.mkdir(parents=True)
    for cycle in range(3):
        (layout.root / f"pass_{cycle}").touch()  # the stand-in 04 passes every cycle
    state = runner.run(params, notebooks_dir=stand_ins, log=lambda m: None)
    assert _executed(layout.root)[-5:] == [
        "05_synthesize@1", "02_finetune@2", "03_batch_inference@2", "04_evaluate@2", "06_deploy"
    ]  # fmt: skip
    assert state.decisions == {"cycle_00": True, "cycle_01": True, "cycle_02": True}
    assert state.stop_reason.startswith("sweep: all 3 cycles") and "[0, 1, 2]" in state.stop_reason
    assert "a sweep records it and trains every volume anyway" in layout.summary_file.read_text()


def test_a_study_shares_01_and_cycle_0_and_runs_each_arm_as_a_run(make_params, stand_ins, tmp_path):
    extra = {**TWO_GENERATORS, "loop": {"mode": "sweep", "max_cycles": 2}, "deploy": {"select": "best",
             "enabled": False}}  # fmt: skip
    params = make_params(_providers(make_params, extra))
    layout = RunLayout(tmp_path / "outputs" / "demo")
    layout.root.mkdir(parents=True)
    (layout.root / "pass_0").touch()
    state = runner.run(params, notebooks_dir=stand_ins, log=lambda m: None)
    assert state.status == "finished" and state.done == [*runner.SHARED_STEPS, "arms/smollm2-service",
                                                         "arms/smollm2-alt"]  # fmt: skip
    assert _executed(layout.root) == ["01_coverage", "02_finetune@0", "03_batch_inference@0", "04_evaluate@0"]
    for arm in ("smollm2-service", "smollm2-alt"):
        arm_layout = RunLayout(layout.arm_dir(arm))
        # cycle 0 is never recomputed: the arm's notebooks start at cycle 0's 05, its 04 file is the study's
        assert _executed(arm_layout.root) == ["05_synthesize@0", "02_finetune@1", "03_batch_inference@1",
                                              "04_evaluate@1"]  # fmt: skip
        assert arm_layout.metrics_file(0).stat().st_ino == layout.metrics_file(0).stat().st_ino
        arm_state = runner.RunState.load(arm_layout.state_file)
        assert arm_state.status == "finished" and arm_state.shared_from == str(layout.root)
        assert arm_state.decisions == {"cycle_00": True, "cycle_01": False}
        assert load_config(arm_layout.params_file).synthesize.generator == arm
        assert "linked from the study" in runner.status_table(arm_layout)
    assert "arms     smollm2-alt, smollm2-service" in runner.status_table(layout)
    # `llamaduo compare` given a study's folder compares its arms
    assert [line.label for line in study.run_lines([layout.root])] == [
        "demo/smollm2-alt",
        "demo/smollm2-service",
    ]
    # resuming a finished study runs nothing again
    runner.run(params, resume=True, notebooks_dir=stand_ins, log=lambda m: None)
    assert len(_executed(layout.root)) == 4 and len(_executed(layout.arm_dir("smollm2-alt"))) == 4


# --------------------------------------------------------------------------- compare refuses what differs


def _finished_run(make_params, tmp_path: Path, name: str, test_rows: list[dict], extra: dict | None = None):
    cfg = load_config(make_params({"run_name": name, **(extra or {})}, name=f"{name}.yaml"))
    layout = RunLayout(tmp_path / "outputs" / name)
    from llamaduo_nb.config import dump_config

    dump_config(cfg, layout.params_file)
    write_jsonl(layout.test_file, test_rows)
    write_json(layout.state_file, {"status": "finished"})
    return layout


def test_compare_refuses_runs_judged_on_other_prompts_or_by_other_judges(make_params, tmp_path):
    rows = [{"id": "t0", "instruction": "Say hi.", "response": "Hi.", "category": "Closed QA"}]
    a = _finished_run(make_params, tmp_path, "a", rows)
    b = _finished_run(make_params, tmp_path, "b", [{**rows[0], "response": "Hello."}])
    with pytest.raises(study.StudyError, match=r"test split \(SHA-256 of coverage/test.jsonl\)"):
        study.compare([a.root, b.root], tmp_path / "cmp")
    c = _finished_run(make_params, tmp_path, "c", rows, {"evaluate": {"metric_judges": ["rougeL"]}})
    with pytest.raises(study.StudyError, match=r"differ in their judges"):
        study.compare([a.root, c.root], tmp_path / "cmp")
    with pytest.raises(study.StudyError, match="has both an adapter"):  # comparable, but nothing evaluated
        study.compare([a.root, a.root], tmp_path / "cmp")
    write_json(c.state_file, {"status": "failed"})
    with pytest.raises(study.StudyError, match="not finished"):
        study.compare([a.root, c.root], tmp_path / "cmp")
    from llamaduo_nb.cli import main

    assert main(["compare", str(a.root), str(b.root), "--out", str(tmp_path / "cmp")]) == 2


# --------------------------------------------------------------------------- the real thing, tiny


def other_student(folder: Path) -> Path:
    """A second student: a tiny random Llama with the embedded SmolLM2 tokenizer and no chat template (the
    one test_finetune uses), trained here with `student.chat_template: chatml`."""
    return tiny_templateless_llama(folder)


def _llamaduo(*args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "llamaduo_nb", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_a_tiny_sweep_of_two_generators_then_compare_with_another_student(tmp_path):
    """params/sweep_tiny.yaml through `llamaduo run`: 01 and cycle 0 once, then two arms of two volumes each,
    none stopping although every cycle meets epsilon; Fig. 2 has one line per generator over volume. Then
    `llamaduo compare` builds one Table 1 from an arm and a finished run of another student."""
    from llamaduo_nb.testing import Behaviour, TestLLMServer

    data = yaml.safe_load(SWEEP_TINY.read_text())
    data["outputs_dir"] = str(tmp_path / "outputs")
    data["coverage"]["source"] = str(PROJECT_ROOT / "data" / "sample_coverage.jsonl")
    data["cache"] = {"path": str(tmp_path / "callcache.sqlite")}
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    with TestLLMServer(Behaviour()) as server:
        for provider in data["providers"]:
            provider["base_url"] = server.base_url
        params = tmp_path / "sweep_tiny.yaml"
        params.write_text(yaml.safe_dump(data, sort_keys=False))
        t0 = time.monotonic()
        _llamaduo("run", str(params), "--no-progress", env=env)
        print(f"sweep of 2 generators x 3 volumes: {time.monotonic() - t0:.0f} s")
        root = RunLayout(tmp_path / "outputs" / "sweep-tiny")

        # the study: shared steps once, every volume of every arm trained and evaluated although epsilon is met
        state = read_json(root.state_file)
        assert state["status"] == "finished"
        assert state["done"] == [*runner.SHARED_STEPS, "arms/gen-a", "arms/gen-b"]
        assert read_json(root.metrics_file(0))["decision"]["passed"] is True  # epsilon 0: met at once
        synthetic = {}
        for arm in ("gen-a", "gen-b"):
            layout = RunLayout(root.arm_dir(arm))
            arm_state = read_json(layout.state_file)
            assert arm_state["status"] == "finished" and arm_state["stop_reason"].startswith("sweep: all 3")
            assert arm_state["decisions"] == {"cycle_00": True, "cycle_01": True, "cycle_02": True}
            assert "cycle_02/04_evaluate" in arm_state["done"] and "cycle_00/02_finetune" not in [
                s for s in arm_state["done"] if s in arm_state["timings"]
            ]  # cycle 0 was linked, not run again
            assert layout.adapter_dir(0).joinpath("adapter_config.json").stat().st_ino == (
                root.adapter_dir(0).joinpath("adapter_config.json").stat().st_ino
            )
            lineage = {
                r["lineage"]["generator"]["model"] for r in map(json.loads, open(layout.synthetic_file(0)))
            }
            assert lineage == {f"fake-generator-{arm[-1]}"}
            synthetic[arm] = [
                sum(
                    n
                    for o, n in read_json(layout.train_summary(c))["rows_by_origin"].items()
                    if o != "coverage"
                )
                for c in (1, 2)
            ]
            assert synthetic[arm] == [2, 4]  # the listed volumes, exactly (surplus rows set aside)

        # Fig. 2 over volume: one line per generator, at the volumes 02 trained on, with the rows behind it
        import matplotlib.pyplot as plt
        import pandas as pd

        frame = pd.read_csv(root.volumes_csv)
        assert set(frame["line"]) == {"gen-a", "gen-b"}
        mean = frame[(frame.judge == "rougeL") & (frame.statistic == "mean")]
        for arm in ("gen-a", "gen-b"):
            points = mean[mean.line == arm].sort_values("cycle")
            assert points["cycle"].tolist() == [0, 1, 2]
            assert points["synthetic_rows"].tolist() == [0, *synthetic[arm]]
            assert points["passed"].all()
        fig = study.plot_volumes(frame, tmp_path / "fig.png", epsilon=0.0)
        judges = list(dict.fromkeys(frame["judge"]))
        ax = fig.axes[judges.index("rougeL")]  # first row: the mean
        assert ax.get_xscale() == "log"
        drawn = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
        for arm in ("gen-a", "gen-b"):
            line = drawn[f"{arm} precision"]
            assert list(line.get_xdata()) == synthetic[arm]
            want = mean[(mean.line == arm) & (mean.cycle > 0)].sort_values("cycle")["value"].tolist()
            assert list(line.get_ydata()) == pytest.approx(want)
        plt.close(fig)
        summary = root.summary_file.read_text()
        assert "](fig2_volumes.png)" in summary and root.volumes_plot.is_file()
        table = pd.read_csv(root.volumes_table_csv)
        assert table.groupby("line")["cycle"].apply(list).to_dict() == {
            "gen-a": [0, 1, 2],
            "gen-b": [0, 1, 2],
        }
        assert set(table["epsilon"]) == {"met"} and (table["shipped"] == "yes").sum() == 2
        study_table1 = pd.read_csv(root.study_table1_csv)
        assert study_table1.drop_duplicates("model")["kind"].tolist()[:2] == ["base", "local"]
        assert "service" in set(study_table1["model"])

        # a second student on the same test split and judges, then one Table 1 across the two students
        student = other_student(tmp_path / "student")
        other = {**data, "run_name": "other-student", "student": {"model_id": str(student),
                 "chat_template": "chatml"}, "loop": {"max_cycles": 1}}  # fmt: skip
        other["synthesize"] = {
            **data["synthesize"],
            "generator": "gen-a",
            "generators": None,
            "volumes": None,
        }
        other_params = tmp_path / "other.yaml"
        other_params.write_text(yaml.safe_dump(other, sort_keys=False))
        t0 = time.monotonic()
        _llamaduo("run", str(other_params), "--no-progress", env=env)
        print(f"run of the other student: {time.monotonic() - t0:.0f} s")
    out = tmp_path / "compare"
    _llamaduo("compare", str(root.arm_dir("gen-a")), str(tmp_path / "outputs" / "other-student"),
              "--out", str(out), env=env)  # fmt: skip
    compared = RunLayout(out)
    long = pd.read_csv(compared.study_table1_csv)
    models = long.drop_duplicates("model").set_index("model")["kind"].to_dict()
    assert (
        models["sweep-tiny/gen-a: base student"] == "base" and models["other-student: base student"] == "base"
    )
    assert models["other-student: cycle 0"] == "local" and models["service"] == "service"
    assert [m for m, k in models.items() if k == "local" and m.startswith("sweep-tiny/gen-a: cycle")]
    assert set(long["judge"]) == {"judge", "rougeL"}
    report = read_json(compared.study_file)
    assert [line["student"] for line in report["lines"]] == ["embedded:smollm2", str(student)]
    assert "P-Match" in compared.study_table1_md.read_text() and compared.volumes_plot.is_file()
    # the study's folder stands for its arms; their shared base student (one file, hard-linked) is one row
    study.compare([root.root, tmp_path / "outputs" / "other-student"], tmp_path / "compare-study")
    long = pd.read_csv(RunLayout(tmp_path / "compare-study").study_table1_csv).drop_duplicates("model")
    assert [m for m in long.model if "base student" in m] == ["sweep-tiny/gen-a: base student",
                                                             "other-student: base student"]  # fmt: skip
    assert (
        len([m for m in long.model if m.startswith(("sweep-tiny/gen-a: cycle", "sweep-tiny/gen-b: cycle"))])
        == 2
    )


def test_a_listed_volume_is_trained_on_exactly(tmp_path):
    """05 keeps what the next volume adds and sets the surplus of its last round aside as `over_target`."""
    from tinyrun import make_tiny_run

    from llamaduo_nb import forecast
    from llamaduo_nb.config import RunConfig, build
    from llamaduo_nb.schemas import LEDGER_SYNTHESIS
    from llamaduo_nb.services import ServicePool
    from llamaduo_nb.testing import Behaviour, TestLLMServer

    layout = make_tiny_run(tmp_path / "run")
    data = yaml.safe_load(layout.params_file.read_text())
    with TestLLMServer(Behaviour()) as server:
        gen = {"name": "gen", "kind": "openai_compatible", "base_url": server.base_url, "model": "fake-gen",
               "free": True}  # fmt: skip
        data.update(providers=[*data["providers"], gen], teacher_study={"candidates": []})
        data["synthesize"].update(
            generator="gen", volumes=[1, 3], pairs_per_request=3, max_requests_per_cycle=4
        )
        data["loop"] = {"max_cycles": 3}
        cfg = build(RunConfig, data, source="tests")
        forecast.forecast_stage(cfg, "05_synthesize", 0, layout)
        with ServicePool(cfg, layout, LEDGER_SYNTHESIS, 0, providers=["gen"]) as pool:
            result = synthesize.synthesize_cycle(cfg, layout, 0, pool)
    over = [r for r in result.rejected if r["reason"] == "over_target"]
    assert len(result.accepted) == 1 and result.report["accepted"] == 1 and result.report["target"] == 1
    assert len(over) == result.report["rejected"]["over_target"] >= 1  # the fake wrote more than one pair
    assert "synthesize.volumes" in over[0]["detail"]
