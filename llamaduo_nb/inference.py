"""03 · Batch inference: K sampled answers of the fine-tuned student to every test prompt.

Reads `coverage/test.jsonl` and `cycle_NN/adapter/`; writes `cycle_NN/responses.jsonl` (one row per
(prompt, sample), schema in `schemas.py`) and `cycle_NN/inference.json` (rows, tokens, wall time,
tokens/s, engine), and the views the notebook shows (summary, examples, answer lengths).

The answers come from `student.answer_prompts`, the student's one answer path (the same one 04 uses for
Table 1's base-student row); the engines (vLLM, llama.cpp, transformers), their sampler and seeds are
described in `student.generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .config import RunConfig
from .jsonio import read_jsonl, save_figure, write_json, write_jsonl
from .runlayout import RunLayout
from .schemas import load_test_rows
from .student import answer_prompts

# --------------------------------------------------------------------------- the stage


def generate_responses(
    cfg: RunConfig, layout: RunLayout, cycle: int, progress: bool = True
) -> dict[str, Any]:
    """03's work: K answers per test prompt -> responses.jsonl + inference.json; returns the summary."""
    rows = load_test_rows(layout.test_file)
    adapter_dir = layout.adapter_dir(cycle)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} holds no adapter_config.json: run 02_finetune for cycle {cycle} first"
        )
    responses, summary = answer_prompts(cfg, layout, rows, cycle, progress)
    write_jsonl(layout.responses_file(cycle), responses)
    write_json(layout.inference_summary(cycle), summary)
    return summary


# --------------------------------------------------------------------------- views


def summary_table(summary: dict[str, Any]) -> pd.DataFrame:
    keys = [
        "engine", "prompts", "k", "rows", "tokens_generated", "prompt_tokens", "prompt_tokens_computed",
        "load_time_s", "wall_time_s", "cpu_time_s", "tokens_per_s", "torch_threads", "finish_reasons",
        "adapter_merged", "share_prompt_cache",
    ]  # fmt: skip
    return pd.DataFrame([(key, str(summary.get(key))) for key in keys], columns=["metric", "value"])


def _short(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def examples_table(layout: RunLayout, cycle: int, n_prompts: int = 3, width: int = 90) -> pd.DataFrame:
    """The first `n_prompts` prompts with their reference and every sampled answer, shortened for reading."""
    rows = read_jsonl(layout.responses_file(cycle))
    keep = list(dict.fromkeys(row["prompt_id"] for row in rows))[:n_prompts]
    return pd.DataFrame(
        [
            {
                "prompt_id": row["prompt_id"],
                "sample": row["sample_index"],
                "instruction": _short(row["instruction"], width),
                "reference": _short(row["reference"], width),
                "candidate": _short(row["candidate"], width),
                "tokens": row.get("output_tokens"),
                "finish": row.get("finish_reason"),
            }
            for row in rows
            if row["prompt_id"] in keep
        ]
    )


def plot_output_lengths(layout: RunLayout, cycle: int, max_new_tokens: int) -> Path:
    """Histogram of generated tokens per answer; answers at the limit were cut, not finished."""
    from matplotlib.figure import Figure

    rows = read_jsonl(layout.responses_file(cycle))
    lengths = [row["output_tokens"] for row in rows]
    fig = Figure(figsize=(6.4, 3.4))
    ax = fig.add_subplot()
    ax.hist(lengths, bins=min(30, max(5, len(set(lengths)))), color="tab:blue", alpha=0.8)
    ax.axvline(max_new_tokens, color="tab:red", ls="--", label=f"max_new_tokens = {max_new_tokens}")
    cut = sum(1 for row in rows if row.get("finish_reason") == "length")
    ax.set(
        xlabel="generated tokens per answer",
        ylabel="answers",
        title=f"cycle {cycle}: {len(rows)} answers, {cut} cut at the limit",
    )
    ax.legend()
    fig.tight_layout()
    path = layout.output_lengths_plot(cycle)
    save_figure(fig, path)
    return path
