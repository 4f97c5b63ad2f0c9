"""The one table format of `make bench`: path | ours | alternative | ratio | goal | machine.

Every bench module under `benches/` exposes `lines(args) -> list[BenchLine]` (see `benches/__main__.py`);
each line compares our hot path with the alternative a user would otherwise use, both measured in the
same process and run, so the ratio is taken under the same machine load. `machine()` records the cores,
CPU and the load average (`uptime`) at the time of the measurement: the development machine is shared,
and a ratio is only meaningful next to the load it was measured under.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = ("path", "ours", "alternative", "ratio", "goal", "machine")


def machine() -> str:
    """'2 cores, x86_64, load 1.52/1.10/0.80': the machine and its load averages (1, 5, 15 min) right now."""
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, load {load}"


@dataclass
class BenchLine:
    """One side-by-side measurement. `ratio` is ours / alternative for rates ("higher is better") and
    alternative / ours for times, so > 1 always means ours is better; `goal` is the ratio (or absolute
    bound) the issue asks for, `met` whether it was reached."""

    path: str  # the hot path, e.g. "03 inference, CPU: llama.cpp vs transformers"
    ours: str  # our figure with its unit, e.g. "61.2 tok/s (llama.cpp F16, 4 slots)"
    alternative: str  # the alternative's figure, e.g. "11.4 tok/s (transformers generate)"
    ratio: float | None
    goal: str  # e.g. ">= 3x"
    met: bool | None = None
    machine: str = field(default_factory=machine)
    details: dict[str, Any] = field(default_factory=dict)  # raw numbers for outputs/bench/*.json

    def row(self) -> list[str]:
        ratio = "n/a" if self.ratio is None else f"{self.ratio:.2f}x"
        if self.met is not None:
            ratio += " (goal met)" if self.met else " (goal missed)"
        return [self.path, self.ours, self.alternative, ratio, self.goal, self.machine]


def markdown(lines: list[BenchLine]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for line in lines:
        out.append("| " + " | ".join(cell.replace("|", "/") for cell in line.row()) + " |")
    return "\n".join(out)


def timed(fn: Any) -> tuple[Any, float, float]:
    """Result, wall seconds, CPU seconds of this process (all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def write(lines: list[BenchLine], stem: str | Path, preamble: str = "") -> str:
    """`stem`.md (the table, with `preamble` above it) and `stem`.json (every line with its details)."""
    from llamaduo_nb.jsonio import atomic_write, write_json

    table = markdown(lines)
    with atomic_write(f"{stem}.md") as fh:
        fh.write((preamble + "\n\n" if preamble else "") + table + "\n")
    write_json(f"{stem}.json", [asdict(line) for line in lines])
    return table


def rate(value: float, unit: str, what: str = "") -> str:
    text = f"{value:,.1f} {unit}" if value < 1000 else f"{value:,.0f} {unit}"
    return f"{text} ({what})" if what else text


def demo_run(
    root: Path, prompts: int | None = None, engine: str = "transformers", adapter: bool = True
) -> Any:
    """A run folder like the demo's after 01 and 02: demo params, the demo test split, a LoRA adapter."""
    import dataclasses

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llamaduo_nb.config import dump_config, load_config
    from llamaduo_nb.coverage import run_coverage
    from llamaduo_nb.embedded import resolve_model_path
    from llamaduo_nb.jsonio import read_jsonl, write_jsonl
    from llamaduo_nb.runlayout import RunLayout, project_file
    from llamaduo_nb.student import quiet_peft_deprecations

    cfg = load_config(project_file("params/demo.yaml"))
    cfg = dataclasses.replace(
        cfg,
        run_name=root.name,
        outputs_dir=str(root.parent),
        inference=dataclasses.replace(cfg.inference, engine=engine),
    )
    layout = RunLayout(root)
    dump_config(cfg, layout.params_file)
    run_coverage(cfg.coverage, cfg.seed, layout)
    if prompts:
        write_jsonl(layout.test_file, read_jsonl(layout.test_file)[:prompts])
    if not adapter:
        return cfg, layout
    path = resolve_model_path(cfg.student.model_id)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    with quiet_peft_deprecations():
        model = get_peft_model(base, lora)
    model.save_pretrained(layout.adapter_dir(0))
    AutoTokenizer.from_pretrained(path).save_pretrained(layout.adapter_dir(0))
    return cfg, layout
