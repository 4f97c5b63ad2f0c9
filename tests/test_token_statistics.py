"""Token statistics per split (the paper's appendix Table 4 layout) on the sample coverage rows under the real
embedded SmolLM2 tokenizer, checked against a direct count row by row; 01's report.json, the plot, the summary's
table with a cycle's synthetic data, and a tokenizer that cannot be loaded."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import pytest
from tinyrun import make_tiny_run

from llamaduo_nb import coverage, dataquality, summary
from llamaduo_nb.config import load_config
from llamaduo_nb.jsonio import read_json, read_jsonl, write_jsonl
from llamaduo_nb.student import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(load_config(ROOT / "params" / "demo.yaml").student)


def direct(texts: list[str], tokenizer) -> dict:
    counts = [len(tokenizer.encode(text, add_special_tokens=False)) for text in texts]
    return {"count": len(counts), "min": min(counts), "max": max(counts), "mean": statistics.fmean(counts),
            "std": statistics.pstdev(counts)}  # fmt: skip


def test_statistics_match_a_direct_count_of_every_row(tokenizer):
    cfg = load_config(ROOT / "params" / "demo.yaml").coverage
    rows = coverage.import_coverage(dataclasses.replace(cfg, source=str(ROOT / cfg.source))).rows  # 01's rows
    splits = {"train": rows[::2], "test": rows[1::2][:7]}
    stats = dataquality.token_statistics(splits, tokenizer, "embedded:smollm2", batch_size=5)
    got = stats.summary()
    assert got["tokenizer"] == "embedded:smollm2" and list(got["splits"]) == ["train", "test"]
    for split, split_rows in splits.items():
        prompts = [r["instruction"] for r in split_rows]
        responses = [r["response"] for r in split_rows]
        for part, want in (
            ("prompt", direct(prompts, tokenizer)),
            ("response", direct(responses, tokenizer)),
        ):
            assert got["splits"][split][part] == pytest.approx(want), (split, part)
        pair = [
            p + r for p, r in zip(stats.counts[split]["prompt"], stats.counts[split]["response"], strict=True)
        ]
        assert stats.counts[split]["pair"] == pair and got["splits"][split]["pair"]["max"] == max(pair)
    # the tokenizer's own tokens, not words: a sub-word tokenizer counts more tokens than words here
    words = sum(len(r["instruction"].split()) for r in splits["train"])
    assert sum(stats.counts["train"]["prompt"]) > words
    # the paper's rows: one category of one split, counted directly
    closed = [r for r in splits["train"] if r["category"] == "Closed QA"]
    assert closed and got["by_category"]["Closed QA"]["train"]["response"] == pytest.approx(
        direct([r["response"] for r in closed], tokenizer)
    )
    assert stats.table(by_category=True).loc[("Closed QA", "train", "prompt"), "count"] == len(closed)
    table = stats.table()
    assert list(table.columns) == ["count", "min", "max", "mean", "std"]
    assert table.loc[("test", "response"), "count"] == 7
    with pytest.raises(ValueError, match="test row 1"):
        dataquality.token_statistics({"test": [rows[0], {"instruction": 3, "response": "x"}]}, tokenizer)
    # a raw No-Robots row (chat messages) reads like the row 01 made of it
    raw = read_jsonl(ROOT / cfg.source)[0]
    assert dataquality.token_statistics({"raw": [raw]}, tokenizer).counts["raw"]["response"] == [
        len(tokenizer.encode(raw["messages"][-1]["content"], add_special_tokens=False))
    ]


def test_01_writes_the_statistics_into_its_report_and_the_summary_adds_synthetic_data(tmp_path, tokenizer):
    layout = make_tiny_run(tmp_path / "run")
    cfg = load_config(layout.params_file)
    cfg = dataclasses.replace(
        cfg, coverage=dataclasses.replace(cfg.coverage, source=str(ROOT / "data" / "sample_coverage.jsonl"))
    )
    result = coverage.run_coverage(cfg.coverage, cfg.seed, layout)
    stats = coverage.write_token_statistics(cfg, layout, result)
    report = read_json(layout.coverage_report)[coverage.TOKEN_KEY]
    assert stats.error is None and report == stats.summary() == result.report[coverage.TOKEN_KEY]
    assert report["splits"]["train"]["prompt"]["count"] == len(result.train)
    assert report["splits"]["test"]["response"] == pytest.approx(
        direct([r["response"] for r in result.test], tokenizer)
    )
    fig = coverage.plot_token_lengths(stats, layout.token_plot)
    assert layout.token_plot.stat().st_size > 0
    import matplotlib.pyplot as plt

    plt.close(fig)

    # the summary's table: train, test and cycle 0's synthetic rows, counted the same way
    synthetic = [{"id": "s1", "instruction": "Summarize: the cat sat on the mat.", "response": "A cat sat.",
                  "category": "Summarization"}]  # fmt: skip
    write_jsonl(layout.synthetic_file(0), synthetic)
    lines = summary.token_lines(cfg, layout)
    assert lines[0].startswith("Tokens per row under `embedded:smollm2`")
    body = "\n".join(lines)
    pair = direct([synthetic[0]["instruction"]], tokenizer)["max"] + direct(["A cat sat."], tokenizer)["max"]
    assert f"| synthetic cycle_00 | pair | 1 | {pair} | {pair} |" in body
    assert f"| train | prompt | {len(result.train)} |" in body


def test_a_tokenizer_that_cannot_be_loaded_is_said_not_raised(tmp_path):
    layout = make_tiny_run(tmp_path / "run")
    cfg = load_config(layout.params_file)
    missing = tmp_path / "no-such-model"
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, model_id=str(missing)))
    result = coverage.run_coverage(
        dataclasses.replace(cfg.coverage, source=str(ROOT / "data" / "sample_coverage.jsonl")),
        cfg.seed,
        layout,
    )
    stats = coverage.write_token_statistics(cfg, layout, result)
    assert stats.error.startswith(f"the student's tokenizer ({missing}) could not be loaded")
    assert read_json(layout.coverage_report)[coverage.TOKEN_KEY]["error"] == stats.error
    assert stats.table().empty
    assert summary.token_lines(cfg, layout)[0].startswith("(token statistics could not be computed")
