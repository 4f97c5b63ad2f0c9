"""The call cache, the cost ledger and the price table behind every service-LLM call."""

from __future__ import annotations

import csv
import sqlite3
import threading
import warnings
from pathlib import Path

import pytest

from llamaduo_nb.callcache import (
    LEDGER_COLUMNS,
    CallCache,
    LedgerRow,
    PriceError,
    PriceTable,
    export_ledger_csv,
    ledger_frame,
    load_prices,
    read_ledger,
    request_key,
)

ROOT = Path(__file__).resolve().parent.parent


def _row(i: int = 0, **over) -> LedgerRow:
    fields = dict(
        stage="04_evaluate",
        cycle=0,
        provider="judge",
        kind="openai",
        model="gpt-4o-mini",
        input_tokens=100 + i,
        output_tokens=10,
        latency_s=0.5,
        cost_usd=0.001,
        ok=True,
        error=None,
        attempts=1,
        cache_key=f"k{i}",
    )
    fields.update(over)
    return LedgerRow(**fields)


def test_request_key_ignores_key_order_but_sees_the_repeat_index():
    a = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "repeat": 0}
    b = {"repeat": 0, "messages": [{"content": "hi", "role": "user"}], "model": "m"}
    assert request_key(a) == request_key(b)
    assert request_key(a) != request_key({**a, "repeat": 1})
    assert len(request_key(a)) == 64


def test_cache_round_trip_survives_reopening_and_keeps_the_first_answer(tmp_path):
    db = tmp_path / "calls.sqlite"
    with CallCache(db) as cache:
        assert cache.get("abc") is None
        cache.put("abc", {"kind": "openai", "model": "m"}, "first", 12, 3, 0.2, 0.5)
        cache.put("abc", {"kind": "openai", "model": "m"}, "second", 99, 99, 9.9, 9.9)
    with CallCache(db) as cache:  # a new process after a crash sees the finished call
        hit = cache.get("abc")
        assert (hit.text, hit.input_tokens, hit.output_tokens, hit.cost_usd) == ("first", 12, 3, 0.5)
        assert cache.n_cached() == 1
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_ledger_rows_filter_by_stage_and_cycle(tmp_path):
    db = tmp_path / "calls.sqlite"
    with CallCache(db) as cache:
        cache.record(_row(0))
        cache.record(_row(1, stage="05_synthesize", cycle=1, ok=False, error="HTTP 500", cost_usd=0.0))
    rows = read_ledger(db)
    assert [r["stage"] for r in rows] == ["04_evaluate", "05_synthesize"]
    assert rows[1]["ok"] is False and rows[1]["error"] == "HTTP 500"
    assert [r["cache_key"] for r in read_ledger(db, stage="05_synthesize", cycle=1)] == ["k1"]
    assert read_ledger(db, cycle=7) == []
    assert read_ledger(tmp_path / "never_created.sqlite") == []


def test_concurrent_writers_from_threads_and_two_handles_lose_nothing(tmp_path):
    db = tmp_path / "calls.sqlite"
    first, second = CallCache(db), CallCache(db)  # two handles stand in for two processes
    errors: list[BaseException] = []

    def write(cache: CallCache, offset: int) -> None:
        try:
            for i in range(40):
                cache.record(_row(offset + i))
                cache.put(f"key-{offset + i}", {"kind": "openai", "model": "m"}, "t", 1, 1, 0.1, 0.0)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(c, n * 1000)) for n, c in enumerate([first, second] * 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first.close()
    second.close()
    assert errors == []
    rows = read_ledger(db)
    assert len(rows) == 6 * 40
    with CallCache(db) as cache:
        assert cache.n_cached() == 6 * 40


def test_ledger_exports_to_csv_and_dataframe(tmp_path):
    db = tmp_path / "calls.sqlite"
    with CallCache(db) as cache:
        for i in range(3):
            cache.record(_row(i))
    out = tmp_path / "ledger.csv"
    assert export_ledger_csv(db, out) == 3
    with open(out, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(LEDGER_COLUMNS)
    assert [int(r["input_tokens"]) for r in rows] == [100, 101, 102]
    assert not list(tmp_path.glob(".ledger.csv.*"))  # no temp file left behind
    frame = ledger_frame(db)
    assert list(frame.columns) == list(LEDGER_COLUMNS) and len(frame) == 3
    assert frame["cost_usd"].sum() == pytest.approx(0.003)
    assert len(ledger_frame(tmp_path / "empty.sqlite")) == 0


def test_shipped_price_table_covers_the_paper_providers():
    prices = load_prices(ROOT / "params" / "prices.yaml")
    for model in ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "claude-sonnet-4", "claude-3-haiku",
                  "gemini-1.5-flash", "gemini-2.0-flash"):  # fmt: skip
        assert prices.lookup(model) is not None, model
    # the paper's Aug-2024 GPT-4o price: $5 / $15 per 1M tokens -> 10M in + 1M out = $65
    assert prices.cost("openai", "gpt-4o-2024-05-13", 10_000_000, 1_000_000) == pytest.approx(65.0)
    # a dated id takes the longest matching name: gpt-4o-mini, not gpt-4o
    assert prices.cost("openai", "gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert prices.cost("anthropic", "claude-3-5-sonnet-20241022", 1_000_000, 0) == pytest.approx(3.0)
    assert prices.cost("embedded", "gpt-4o", 1_000_000, 1_000_000) == 0.0  # local is free whatever its label


def test_unknown_model_costs_nothing_and_warns_once(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text("models:\n  known: {input: 1.0, output: 2.0}\ndefault: null\n")
    prices = PriceTable.load(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prices.cost("openai_compatible", "mystery-model", 1000, 1000) == 0.0
        assert prices.cost("openai_compatible", "mystery-model", 1000, 1000) == 0.0
    assert len(caught) == 1 and "mystery-model" in str(caught[0].message)
    path.write_text("models: {}\ndefault: {input: 2.0, output: 4.0}\n")
    assert PriceTable.load(path).cost("openai", "mystery-model", 1_000_000, 500_000) == pytest.approx(4.0)


@pytest.mark.parametrize(
    "text, key",
    [
        ("models:\n  gpt-4o: {input: 2.5}\n", "models.gpt-4o"),
        ("models:\n  gpt-4o: {input: -1, output: 2}\n", "models.gpt-4o.input"),
        ("modles: {}\n", "modles"),
    ],
)
def test_malformed_price_table_names_the_entry(tmp_path, text, key):
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(PriceError, match=key.replace(".", r"\.")) as info:
        PriceTable.load(path)
    assert str(path) in str(info.value)
