"""Shared fixtures (the project root, a builder for tiny params files with outputs under tmp_path) and the order
in which pytest-xdist hands out the tests (longest files first)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture
def project_root() -> Path:
    return ROOT


@pytest.fixture
def make_params(tmp_path):
    """make_params({"loop": {"max_cycles": 1}}) -> path of a params file based on params/demo.yaml.

    Outputs go to tmp_path/outputs; relative paths in the file still resolve against the project root
    (papermill runs notebooks there).
    """

    def make(extra: dict | None = None, name: str = "params.yaml") -> Path:
        base = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
        base["outputs_dir"] = str(tmp_path / "outputs")
        base["coverage"]["source"] = str(ROOT / "data" / "sample_coverage.jsonl")
        base["prices_file"] = str(ROOT / "params" / "prices.yaml")
        data = _merge(base, extra or {})
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return make


# --------------------------------------------------------------------------- running under pytest-xdist
# `make test` runs the suite on every core (pytest-xdist, --dist worksteal). Two things make that pay on a small
# machine: the long tests start first (else the last one to start sets the wall clock while the other workers
# idle), and the workers share the cores instead of each using all of them.

# Files in the order of their time in the last serial run (quiet 2-core machine), longest first: a worker takes
# them from the front, the others steal from the back, so the 3-4 minute end-to-end test starts at once. Only
# the order changes, never what runs; a file not named here follows, in its usual order.
LONGEST_FIRST = (
    "test_pipeline.py",  # `llamaduo run`, two cycles, every notebook (~3.5 min)
    "test_study.py",  # `llamaduo run` of a two-generator sweep + `llamaduo compare` (~3-5 min, its last test)
    "test_deploy.py",
    "test_kill_trials.py",
    "test_evaluate.py",
    "test_synthesize.py",
    "test_teacher.py",
    "test_ddp_cpu.py",
    "test_failfast.py",
    "test_runner.py",
    "test_inference.py",
    "test_finetune.py",
    "test_dead_provider_and_budgets.py",
    "test_finetune_resume.py",
    "test_browser.py",
    "test_batches.py",
    "test_scheduler.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # stable: the tests of one file stay together and in order (a module fixture is built once per worker)
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
