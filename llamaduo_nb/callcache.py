"""Persistent call cache and cost ledger for service-LLM calls: one SQLite file per run (`<run>/calls.sqlite`).

Two tables live in that file:

* `calls`  — the cache. Key: SHA-256 of the canonical JSON of the full request (provider kind, model,
  endpoint, messages, sampling parameters, JSON schema, repeat index). Re-running a stage after a
  crash replays finished calls for free, and the M repeats of one judgment never collapse into one
  answer because the repeat index is part of the key. Only usable replies are cached.
* `ledger` — one row per HTTP attempt of a real call (cache hits add nothing): when, which stage and cycle,
  which provider and model, tokens, latency, cost in USD from `params/prices.yaml`, ok/error, and `attempts`:
  the attempt's number within its call, so a call's last row (its answer or its final failure) holds how many
  attempts the call took, and an attempt that was retried has a row of its own whose error starts with
  `RETRIED` (429s, 5xx, dropped connections: the ledger explains the time spent). Paid replies that are not
  usable (empty, truncated, refused, blocked) have a row with ok=0, and timed-out attempts one with their
  estimated cost (input estimate + max_tokens): the provider may have billed them.
* `failed_replies` — the raw text and finish reason of every unusable reply (never replayed as an answer).
* `reused` — answers this run took from the project's shared cache (`cache.path`): paid by an earlier run.

The same schema serves the project's shared cache (`<outputs_dir>/.callcache/calls.sqlite` by default), in
which only `calls` is used: a usable answer is stored in both, so `--fresh` or a new run_name never pays twice.

Nothing here ever sees an API key: requests are stored as the JSON the caller built, never with
headers or client settings. The database runs in WAL mode with a busy timeout; each thread gets its
own connection, so threads of one process and several processes may write at the same time.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .jsonio import atomic_write

RETRIED = "retried: "  # how the error of a ledger row for an attempt that was retried starts


def is_retried_attempt(row: Mapping[str, Any]) -> bool:
    """Whether a ledger row is an attempt that was retried (not the outcome of its call)."""
    return not row["ok"] and str(row.get("error") or "").startswith(RETRIED)


LEDGER_COLUMNS = (
    "id",
    "ts",
    "stage",
    "cycle",
    "provider",
    "kind",
    "model",
    "input_tokens",
    "output_tokens",
    "latency_s",
    "cost_usd",
    "ok",
    "error",
    "attempts",
    "cache_key",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    cache_key     TEXT PRIMARY KEY,
    created_at    TEXT NOT NULL,
    kind          TEXT NOT NULL,
    model         TEXT NOT NULL,
    request_json  TEXT NOT NULL,
    text          TEXT NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    latency_s     REAL NOT NULL,
    cost_usd      REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    ts            TEXT NOT NULL,
    stage         TEXT NOT NULL,
    cycle         INTEGER,
    provider      TEXT NOT NULL,
    kind          TEXT NOT NULL,
    model         TEXT NOT NULL,
    input_tokens  INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    latency_s     REAL NOT NULL,
    cost_usd      REAL NOT NULL,
    ok            INTEGER NOT NULL,
    error         TEXT,
    attempts      INTEGER NOT NULL,
    cache_key     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_stage_cycle ON ledger (stage, cycle);
CREATE TABLE IF NOT EXISTS failed_replies (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    ts            TEXT NOT NULL,
    stage         TEXT NOT NULL,
    cycle         INTEGER,
    provider      TEXT NOT NULL,
    model         TEXT NOT NULL,
    cache_key     TEXT NOT NULL,
    request_json  TEXT NOT NULL,
    text          TEXT NOT NULL,
    finish_reason TEXT,
    reason        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS forecasts (
    stage         TEXT NOT NULL,
    cycle         INTEGER NOT NULL,
    ts            TEXT NOT NULL,
    lines_json    TEXT NOT NULL,
    PRIMARY KEY (stage, cycle)
);
CREATE TABLE IF NOT EXISTS reused (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    ts            TEXT NOT NULL,
    stage         TEXT NOT NULL,
    cycle         INTEGER,
    provider      TEXT NOT NULL,
    model         TEXT NOT NULL,
    cache_key     TEXT NOT NULL,
    saved_usd     REAL NOT NULL
);
"""


def canonical_json(obj: Any) -> str:
    """One spelling per value: sorted keys, no spaces, UTF-8 kept; the basis of the cache key."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def request_key(request: Mapping[str, Any]) -> str:
    """SHA-256 hex digest of the canonical JSON of a full request description."""
    return hashlib.sha256(canonical_json(request).encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class CachedCall:
    cache_key: str
    text: str
    input_tokens: int
    output_tokens: int
    latency_s: float
    cost_usd: float


@dataclass(frozen=True)
class LedgerRow:
    stage: str
    cycle: int | None
    provider: str
    kind: str
    model: str
    input_tokens: int
    output_tokens: int
    latency_s: float
    cost_usd: float
    ok: bool
    error: str | None
    attempts: int
    cache_key: str
    ts: str = field(default_factory=_now)


class CallCache:
    """The cache + ledger of one run. Use as a context manager or call `close()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        with conn:
            conn.executescript(_SCHEMA)

    # ---- connections: one per thread, all closed together
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> CallCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- cache
    def get(self, cache_key: str) -> CachedCall | None:
        row = (
            self._conn()
            .execute(
                "SELECT cache_key, text, input_tokens, output_tokens, latency_s, cost_usd FROM calls WHERE cache_key = ?",
                (cache_key,),
            )
            .fetchone()
        )
        return CachedCall(**dict(row)) if row is not None else None

    def put(
        self,
        cache_key: str,
        request: Mapping[str, Any],
        text: str,
        input_tokens: int,
        output_tokens: int,
        latency_s: float,
        cost_usd: float,
    ) -> None:
        """Store a finished call; a second put for the same key keeps the first answer."""
        conn = self._conn()
        with conn:
            conn.execute(
                "INSERT OR IGNORE INTO calls (cache_key, created_at, kind, model, request_json, text,"
                " input_tokens, output_tokens, latency_s, cost_usd) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    cache_key,
                    _now(),
                    str(request.get("kind", "")),
                    str(request.get("model", "")),
                    canonical_json(dict(request)),
                    text,
                    int(input_tokens),
                    int(output_tokens),
                    float(latency_s),
                    float(cost_usd),
                ),
            )

    def n_cached(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM calls").fetchone()[0])

    # ---- ledger
    def record(self, row: LedgerRow) -> None:
        conn = self._conn()
        with conn:
            conn.execute(
                "INSERT INTO ledger (ts, stage, cycle, provider, kind, model, input_tokens, output_tokens,"
                " latency_s, cost_usd, ok, error, attempts, cache_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    row.ts,
                    row.stage,
                    row.cycle,
                    row.provider,
                    row.kind,
                    row.model,
                    int(row.input_tokens),
                    int(row.output_tokens),
                    float(row.latency_s),
                    float(row.cost_usd),
                    1 if row.ok else 0,
                    row.error,
                    int(row.attempts),
                    row.cache_key,
                ),
            )

    def record_failed_reply(
        self,
        stage: str,
        cycle: int | None,
        provider: str,
        model: str,
        cache_key: str,
        request: Mapping[str, Any],
        text: str,
        finish_reason: str | None,
        reason: str,
    ) -> None:
        """Keep a paid reply that was not usable (empty, truncated, refused, blocked) with its raw text."""
        conn = self._conn()
        with conn:
            conn.execute(
                "INSERT INTO failed_replies (ts, stage, cycle, provider, model, cache_key, request_json, text,"
                " finish_reason, reason) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    _now(),
                    stage,
                    cycle,
                    provider,
                    model,
                    cache_key,
                    canonical_json(dict(request)),
                    text,
                    finish_reason,
                    reason,
                ),
            )

    def failed_replies(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn().execute("SELECT * FROM failed_replies ORDER BY id")]

    def record_reuse(
        self, stage: str, cycle: int | None, provider: str, model: str, cache_key: str, saved_usd: float
    ) -> None:
        """Note an answer taken from the project's shared cache (paid by an earlier run, free for this one)."""
        conn = self._conn()
        with conn:
            conn.execute(
                "INSERT INTO reused (ts, stage, cycle, provider, model, cache_key, saved_usd)"
                " VALUES (?,?,?,?,?,?,?)",
                (_now(), stage, cycle, provider, model, cache_key, float(saved_usd)),
            )

    def record_forecast(self, stage: str, cycle: int | None, lines: list[dict[str, Any]]) -> None:
        """Keep the forecast a notebook stage made before it ran (the latest one per stage and cycle; 06, which
        has no cycle, is stored under cycle -1). Its lines name the ledger stages they forecast."""
        conn = self._conn()
        with conn:
            conn.execute(
                "INSERT OR REPLACE INTO forecasts (stage, cycle, ts, lines_json) VALUES (?,?,?,?)",
                (stage, -1 if cycle is None else int(cycle), _now(), canonical_json(lines)),
            )

    def forecast_rows(self) -> list[dict[str, Any]]:
        rows = self._conn().execute("SELECT lines_json FROM forecasts ORDER BY stage, cycle")
        return [line for (text,) in rows for line in json.loads(text)]

    def has_forecast(self, stage: str, cycle: int | None) -> bool:
        """Whether a recorded forecast has a line for ledger stage `stage` in `cycle` (what the ServicePool
        asks before a stage's first paid call)."""
        return any(r["stage"] == stage and r["cycle"] == cycle for r in self.forecast_rows())

    def reused_rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._conn().execute("SELECT * FROM reused ORDER BY id")]

    def ledger_rows(self, stage: str | None = None, cycle: int | None = None) -> list[dict[str, Any]]:
        """Ledger rows as dicts in call order, optionally only one stage and/or cycle."""
        sql, args = f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger", []
        where = []
        if stage is not None:
            where.append("stage = ?")
            args.append(stage)
        if cycle is not None:
            where.append("cycle = ?")
            args.append(cycle)
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = [dict(r) for r in self._conn().execute(sql + " ORDER BY id", args)]
        for r in rows:
            r["ok"] = bool(r["ok"])
        return rows


def read_ledger(
    db_path: str | Path, stage: str | None = None, cycle: int | None = None
) -> list[dict[str, Any]]:
    """Ledger rows of a run's calls.sqlite (empty when the run never called a service LLM)."""
    if not Path(db_path).is_file():
        return []
    with CallCache(db_path) as cache:
        return cache.ledger_rows(stage=stage, cycle=cycle)


def unanswered_failures(db_path: str | Path, stage: str, cycle: int | None) -> list[dict[str, Any]]:
    """Ledger rows of `stage`/`cycle` that failed and whose request has no answer in the run's cache since
    (one per key; answered by a later call of any stage counts as answered)."""
    rows = read_ledger(db_path, stage=stage, cycle=cycle)
    answered = {r["cache_key"] for r in rows if r["ok"]}
    latest = {r["cache_key"]: r for r in rows if not r["ok"] and r["cache_key"] not in answered}
    if not latest:
        return []
    with CallCache(db_path) as cache:
        return [row for key, row in latest.items() if cache.get(key) is None]


def ledger_frame(db_path: str | Path, stage: str | None = None, cycle: int | None = None):
    """The ledger as a pandas DataFrame with the columns of LEDGER_COLUMNS (possibly zero rows)."""
    import pandas as pd

    return pd.DataFrame(read_ledger(db_path, stage=stage, cycle=cycle), columns=list(LEDGER_COLUMNS))


def retried_attempts(frame: Any) -> Any:
    """Boolean Series over a `ledger_frame`: the rows of attempts that were retried (not calls of their own)."""
    return ~frame["ok"].astype(bool) & frame["error"].fillna("").astype(str).str.startswith(RETRIED)


def export_ledger_csv(db_path: str | Path, csv_path: str | Path) -> int:
    """Write the whole ledger to CSV atomically (e.g. `RunLayout.ledger_csv`); returns the number of rows."""
    rows = read_ledger(db_path)
    with atomic_write(csv_path) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(LEDGER_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)
