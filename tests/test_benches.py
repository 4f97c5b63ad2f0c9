"""`make bench`'s harness end to end: `python -m benches --quick` on one real bench (the data-quality engine, ~10 s).

Speed itself is shown by `make bench`, never asserted here; this catches a bench or the table writer that no
longer runs (the scheduler bench once broke on a changed signature and only a full `make bench` showed it)
and a table that stops naming its machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benches.common import COLUMNS, cpu_features

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_quick_bench_run_writes_its_rows_with_the_machine_they_were_measured_on(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "benches", "--quick", "--only", "dataquality", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    machine = summary["run"]["machine"]
    assert machine["cores"] == os.cpu_count() and machine["features"] == cpu_features() and machine["cpu"]
    assert summary["run"]["load_start"] and summary["run"]["load_end"] and summary["run"]["seconds"] > 0
    lines = summary["lines"]
    assert len(lines) >= 3 and not [line["path"] for line in lines if "FAILED" in line["path"]]
    for line in lines:
        assert f"{os.cpu_count()} cores" in line["machine"] and "load " in line["machine"], line
        assert line["ours"] and line["alternative"] and line["goal"] is not None
    compared = [line for line in lines if line["ratio"] is not None]
    assert compared and all(line["ratio"] > 0 for line in compared)
    table = (out / "summary.md").read_text()
    assert "Machine: " in table and "CPU flags that matter" in table
    assert "| " + " | ".join(COLUMNS) + " |" in table
    assert all(line["path"] in table for line in lines)
    assert not (out / "summary.partial.md").read_text().count("FAILED")
