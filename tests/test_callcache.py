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
    export_ledger_csv,
    ledger_frame,
    read_ledger,
    request_key,
)
from llamaduo_nb.prices import PriceError, PriceTable, load_prices

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


def test_shipped_price_table_resolves_snapshots_explicitly_and_never_by_prefix():
    prices = load_prices(ROOT / "params" / "prices.yaml")
    # the paper's Aug-2024 GPT-4o price: $5 / $15 per 1M tokens -> 10M in + 1M out = $65
    assert prices.cost("openai", "gpt-4o-2024-05-13", 10_000_000, 1_000_000) == pytest.approx(65.0)
    assert prices.cost("openai", "gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000) == pytest.approx(0.75)
    assert prices.cost("anthropic", "claude-3-5-sonnet-20241022", 1_000_000, 0) == pytest.approx(3.0)
    # the models the old prefix lookup mispriced or priced at $0
    assert prices.cost("anthropic", "claude-3-sonnet-20240229", 1_000_000, 1_000_000) == pytest.approx(18.0)
    assert prices.cost("google", "gemini-2.5-flash-lite", 1_000_000, 1_000_000) == pytest.approx(0.50)
    assert prices.cost("anthropic", "claude-opus-4-5", 1_000_000, 1_000_000) == pytest.approx(30.0)
    assert prices.cost("openai", "gpt-5", 1_000_000, 1_000_000) == pytest.approx(11.25)
    assert prices.cost("openai", "o3", 1_000_000, 1_000_000) == pytest.approx(10.0)
    # an unlisted snapshot is unknown, not "the longest prefix"
    assert prices.lookup("gpt-4o-2099-01-01") is None and prices.lookup("claude-opus-4-9") is None
    assert prices.cost("embedded", "gpt-4o", 1_000_000, 1_000_000) == 0.0  # local is free whatever its label
    assert prices.cost("openai_compatible", "gpt-4o", 1_000_000, 0, free=True) == 0.0


def test_cached_input_and_batch_discounts_are_priced():
    prices = load_prices(ROOT / "params" / "prices.yaml")
    # gpt-4o: $2.50 input, $1.25 cached input, $10 output; 1M input of which 600K served from the prompt cache
    full = prices.cost("openai", "gpt-4o-2024-08-06", 1_000_000, 100_000)
    cached = prices.cost("openai", "gpt-4o-2024-08-06", 1_000_000, 100_000, cached_input_tokens=600_000)
    assert full == pytest.approx(3.50) and cached == pytest.approx(0.4 * 2.50 + 0.6 * 1.25 + 1.0)
    assert prices.cost("anthropic", "claude-haiku-4-5", 2_000_000, 0, batch=True) == pytest.approx(1.0)
    # a model without a cached price bills cached tokens at the input price
    assert prices.cost("google", "gemini-2.5-pro", 1_000_000, 0, cached_input_tokens=1_000_000) == 1.25


def test_every_model_in_a_shipped_params_file_has_a_price():
    from llamaduo_nb.config import load_config

    shipped = sorted((ROOT / "params").glob("*.yaml"))
    checked = []
    for path in shipped:
        if path.name in ("prices.yaml", "economics.yaml"):
            continue
        cfg = load_config(path)  # a paid provider without a price is a ConfigError here
        prices = load_prices(ROOT / cfg.prices_file)
        for p in cfg.providers:
            assert p.is_free or prices.lookup(p.model) is not None, (path.name, p.model)
            checked.append(p.model)
    assert {"gpt-4o-2024-08-06", "claude-3-sonnet-20240229", "gemini-1.5-flash"} <= set(checked)


def test_a_paid_model_without_a_price_is_a_config_error_with_the_line_to_add(tmp_path):
    from llamaduo_nb.config import ConfigError, RunConfig, build

    def config(provider: dict) -> RunConfig:
        data = {"run_name": "p", "prices_file": str(ROOT / "params" / "prices.yaml"),
                "coverage": {"source": "x.jsonl"}, "evaluate": {"judges": ["j"]},
                "synthesize": {"generator": "j"}, "providers": [{"name": "j", **provider}]}  # fmt: skip
        return build(RunConfig, data, source="run.yaml")

    with pytest.raises(ConfigError) as info:
        config({"kind": "anthropic", "model": "claude-sonnet-4-5-20990101"})
    message = str(info.value)
    assert "run.yaml" in message and "providers[0].model" in message
    assert "`  claude-sonnet-4-5-20990101: {input: <USD per 1M input tokens>" in message
    assert "`  claude-sonnet-4-5-20990101: claude-sonnet-4-5`" in message  # the alias line for a snapshot
    with pytest.raises(ConfigError, match="openai_compatible"):  # a paid API cannot declare itself free
        config({"kind": "openai", "model": "my-model", "free": True})
    assert config({"kind": "openai_compatible", "model": "my-vllm", "base_url": "http://127.0.0.1:8000/v1",
                   "free": True}).providers[0].is_free  # fmt: skip
    assert config({"kind": "embedded", "model": "smollm2"}).providers[0].is_free


def test_unknown_model_at_call_time_costs_nothing_and_warns_once(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text("models:\n  known: {input: 1.0, output: 2.0}\n")
    prices = PriceTable.load(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert prices.cost("openai_compatible", "mystery-model", 1000, 1000) == 0.0
        assert prices.cost("openai_compatible", "mystery-model", 1000, 1000) == 0.0
    assert len(caught) == 1 and "mystery-model" in str(caught[0].message)


@pytest.mark.parametrize(
    "text, key",
    [
        ("models:\n  gpt-4o: {input: 2.5}\n", "models.gpt-4o"),
        ("models:\n  gpt-4o: {input: -1, output: 2}\n", "models.gpt-4o.input"),
        ("modles: {}\n", "modles"),
        ("models: {a: {input: 1, output: 2}}\naliases: {a-2024: b}\n", "aliases.a-2024"),
    ],
)
def test_malformed_price_table_names_the_entry(tmp_path, text, key):
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(PriceError, match=key.replace(".", r"\.")) as info:
        PriceTable.load(path)
    assert str(path) in str(info.value)
