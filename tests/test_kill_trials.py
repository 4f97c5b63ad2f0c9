"""Kill trials: SIGKILL judging (04) and synthesis (05) at seeded random points, resume, compare.

Each chain runs the stage as the notebook does (tests/killchild.py) in a subprocess against a service
that outlives the client - the local test server or the real llama.cpp server - kills it at seeded
points (once 1-2 more calls are in the ledger, plus 0-0.3 s, so calls are in flight),
starts it again, and so on until a run finishes. Then, against an uninterrupted run on the same
server:

- no finished call is paid twice: the ledger holds exactly one row per distinct call, as many as the
  uninterrupted run;
- only calls in flight at a kill are sent again: after each kill, the calls the server saw but the
  ledger did not record are at most those the server was still answering (or had answered in the
  last IN_FLIGHT_GRACE_S) when the kill came; every extra answer at the server is one of those;
- no result is lost and the final files and metrics are identical (the `cached` flags aside).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from tinyrun import TEST, TRAIN, coverage_rows

from llamaduo_nb.callcache import read_ledger
from llamaduo_nb.jsonio import read_json, read_jsonl, write_jsonl
from llamaduo_nb.runlayout import RunLayout
from llamaduo_nb.testing import Behaviour, TestLLMServer

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "killchild.py"
# an answer the server sent this shortly before the kill may not be stored yet: the client writes each result
# to sqlite (two fsynced transactions) and lags seconds behind on a loaded 2-core machine
IN_FLIGHT_GRACE_S = 3.0


def make_run(
    root: Path,
    provider: dict,
    evaluate: dict | None = None,
    synthesize: dict | None = None,
    samples: int = 10,
) -> RunLayout:
    data = yaml.safe_load((ROOT / "params" / "demo.yaml").read_text())
    data.update(
        run_name=root.name, outputs_dir=str(root.parent), prices_file=str(ROOT / "params" / "prices.yaml")
    )
    data["providers"] = [{"name": "svc", "model": "test-model", "free": True, "max_retries": 2, **provider}]
    data["evaluate"] = {**data["evaluate"], "judges": ["svc"], "baselines": [], **(evaluate or {})}
    data.pop("teacher_study", None)  # the demo's study samples the embedded model, not declared here
    # the uninterrupted and the killed run sit side by side: without this the killed run would replay the
    # other run's answers from the project-wide cache, and the trial would prove nothing about its own ledger
    data["cache"] = {"shared": False}
    data["synthesize"] = {**data["synthesize"], "generator": "svc", **(synthesize or {})}
    layout = RunLayout(root)
    layout.params_file.parent.mkdir(parents=True, exist_ok=True)
    layout.params_file.write_text(yaml.safe_dump(data, sort_keys=False))
    write_jsonl(layout.train_file, coverage_rows(TRAIN, "train-"))
    write_jsonl(layout.test_file, coverage_rows(TEST, "test-"))
    responses = [
        {"prompt_id": f"test-{p}", "instruction": q, "reference": a, "category": c, "sample_index": k,
         "candidate": f"{a} (sample {k})" if k % 2 else f"I think: {a.lower()} {k}"}
        for k in range(samples) for p, (q, a, c) in enumerate(TEST)
    ]  # fmt: skip
    write_jsonl(layout.responses_file(0), responses)
    return layout


def start(stage: str, layout: RunLayout) -> subprocess.Popen:
    """The stage in a child process of its own session (a kill takes everything it started with it)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    log = layout.root / "child.log"
    with open(log, "ab") as err:  # a file, not a pipe: tqdm's bars must never block the child
        return subprocess.Popen(
            [sys.executable, str(CHILD), stage, str(layout.root), "0"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
        )  # fmt: skip


def finish(proc: subprocess.Popen, layout: RunLayout) -> None:
    proc.wait(timeout=600)
    assert proc.returncode == 0, (layout.root / "child.log").read_text()[-3000:]


def ok_ledger(layout: RunLayout) -> list[dict]:
    return [r for r in read_ledger(layout.calls_db) if r["ok"]]


def recorded_calls(layout: RunLayout) -> int:
    """Successful calls in the ledger so far (read while the child writes: WAL readers do not block it)."""
    if not layout.calls_db.is_file():
        return 0
    with closing(sqlite3.connect(f"file:{layout.calls_db}?mode=ro", uri=True, timeout=5)) as db:
        try:
            return db.execute("SELECT COUNT(*) FROM ledger WHERE ok = 1").fetchone()[0]
        except sqlite3.OperationalError:  # the child has not created the table yet
            return 0


@dataclass
class Chain:
    kills: int = 0
    resent: int = 0  # calls the server saw that the ledger did not record, summed over kills
    per_kill: list[dict] = field(default_factory=list)


def run_with_kills(
    stage: str, layout: RunLayout, rng: random.Random, kills: int, server: TestLLMServer | None, step: int
) -> Chain:
    """Start, SIGKILL at `kills` seeded points (1-`step` more ledger rows, then 0-0.3 s), again; until done."""
    chain = Chain()
    recorded = 0
    while True:
        seen_before = len(server.entries()) if server else 0
        proc = start(stage, layout)
        if chain.kills >= kills:
            finish(proc, layout)
            return chain
        target, delay = recorded + rng.randint(1, step), rng.uniform(0.0, 0.3)
        while proc.poll() is None and recorded_calls(layout) < target:
            time.sleep(0.01)
        time.sleep(delay)
        if proc.poll() is not None:  # finished before the kill point: no kill this time
            finish(proc, layout)
            return chain
        os.killpg(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait()
        chain.kills += 1
        now_recorded = recorded_calls(layout)
        kill = {"kill": chain.kills, "recorded": now_recorded - recorded}
        if server is not None:
            time.sleep(
                server.behaviour.latency_s + server.behaviour.latency_jitter_s + 0.1
            )  # let handlers end
            segment = server.entries()[seen_before:]
            in_flight = sum(
                1 for e in segment if e.finished is None or e.finished > killed_at - IN_FLIGHT_GRACE_S
            )
            lost = len(segment) - kill["recorded"]
            kill.update(sent=len(segment), lost=lost, in_flight=in_flight)
            assert 0 <= lost <= in_flight, f"kill {chain.kills}: {kill}"
            chain.resent += lost
        chain.per_kill.append(kill)
        recorded = now_recorded


def comparable(layout: RunLayout, stage: str) -> dict:
    """The stage's final files, minus the flags that say whether a call was replayed from the cache."""
    if stage == "04_evaluate":
        judgments = [
            {k: v for k, v in j.items() if k != "cached"} for j in read_jsonl(layout.judgments_file(0))
        ]
        return {"judgments": judgments, "metrics": read_json(layout.metrics_file(0))}
    report = read_json(layout.synth_report(0))
    report.pop("requests_cached")
    for entry in report["request_log"]:
        entry.pop("cached")
    return {
        "synthetic": read_jsonl(layout.synthetic_file(0)),
        "rejected": read_jsonl(layout.synthetic_rejected_file(0)),
        "report": report,
    }


def trial(
    tmp_path: Path,
    stage: str,
    provider: dict,
    server: TestLLMServer | None,
    kills: int,
    seed: int,
    step: int = 2,
    **cfg,
):
    reference = make_run(tmp_path / "uninterrupted", provider, **cfg)
    finish(start(stage, reference), reference)
    answered_once = server.answered() if server else Counter()
    if server:
        server.reset_log()

    killed = make_run(tmp_path / "killed", provider, **cfg)
    chain = run_with_kills(stage, killed, random.Random(seed), kills, server, step)

    assert chain.kills >= kills
    rows, reference_rows = ok_ledger(killed), ok_ledger(reference)
    assert len({r["cache_key"] for r in rows}) == len(rows) == len(reference_rows), (
        "a finished call was paid twice"
    )
    assert comparable(killed, stage) == comparable(reference, stage), "the resumed run differs"
    if server:
        extra = server.answered() - answered_once
        assert set(server.answered()) == set(answered_once)  # no call the uninterrupted run did not make
        assert sum(extra.values()) == chain.resent  # every extra answer was a call in flight at a kill
    return chain, len(reference_rows)


def report(name: str, chain: Chain, calls: int, server: TestLLMServer | None) -> None:
    resent = f"{chain.resent} re-sent" if server else "re-sent not observable (no request log)"
    print(f"\n{name}: {chain.kills} kills, {calls} calls, {resent}; {json.dumps(chain.per_kill)}")


@pytest.mark.slow
def test_judging_survives_sigkill_at_ten_random_points(tmp_path):
    with TestLLMServer(Behaviour(latency_s=0.25, latency_jitter_s=0.1)) as server:
        provider = {"kind": "openai_compatible", "base_url": server.base_url, "rpm": 150}
        chain, calls = trial(
            tmp_path, "04_evaluate", provider, server, kills=10, seed=11, evaluate={"m": 2}, samples=15
        )
    report("judging x test server", chain, calls, server)


@pytest.mark.slow
def test_synthesis_survives_sigkill_at_ten_random_points(tmp_path):
    with TestLLMServer(Behaviour(latency_s=0.25, latency_jitter_s=0.1)) as server:
        provider = {"kind": "openai_compatible", "base_url": server.base_url, "rpm": 150}
        synth = {"target_per_cycle": 60, "pairs_per_request": 2, "max_requests_per_cycle": 60}
        chain, calls = trial(tmp_path, "05_synthesize", provider, server, kills=10, seed=12, synthesize=synth)
    report("synthesis x test server", chain, calls, server)


@pytest.mark.slow
def test_judging_against_the_real_llama_cpp_server_survives_sigkill(tmp_path):
    pytest.importorskip("llama_cpp")
    from llamaduo_nb.embedded import LlamaServer, embedded_gguf_path

    # greedy decoding, one call at a time: the server's answers repeat, so a re-sent call gets the same
    # reply. 3 kills over 4 calls: a judge call takes seconds on a 2-core CPU (13 s on a loaded one)
    with LlamaServer(embedded_gguf_path(), n_ctx=4096) as llama:
        provider = {"kind": "openai_compatible", "base_url": llama.base_url, "max_concurrency": 1,
                    "model": llama.model_alias, "json_mode": "schema"}  # fmt: skip
        # no rationale (the demo asks for one): the 32-token verdict must fit its budget
        judge = {"m": 1, "temperature": 0.0, "max_tokens": 32, "rationale": False}
        chain, calls = trial(
            tmp_path, "04_evaluate", provider, None, 3, 13, step=1, evaluate=judge, samples=2
        )
    report("judging x llama.cpp", chain, calls, None)
