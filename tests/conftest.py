"""Shared fixtures: the project root and a builder for tiny params files (outputs under tmp_path)."""

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
