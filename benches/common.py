"""The one table format of `make bench`: path | ours | alternative | ratio | goal | machine.

Every bench module under `benches/` exposes `lines(args) -> list[BenchLine]` (see `benches/__main__.py`);
each line compares our hot path with the alternative a user would otherwise use, both measured in the
same process and run, so the ratio is taken under the same machine load. Every row names its machine
(`machine()`): the CPU model, the instruction-set features that decide which path is fast (`cpu_features`:
AVX2, AVX-512, AVX-512 BF16, AMX — native BF16 makes TRL's bf16 defaults cheap, its absence makes them slow;
llama.cpp and oneDNN pick kernels by them), the core count and the load average at the time of the
measurement: a ratio is only meaningful next to the machine and load it was measured under. `machine_info()`
is the same as a record, written with the table.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = ("path", "ours", "alternative", "ratio", "goal", "machine")


# /proc/cpuinfo flag -> the name a reader knows; the features that change which kernels are fast on CPU
CPU_FEATURES = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX-512 BF16",
    "amx_bf16": "AMX",
}


def _cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, flags) from /proc/cpuinfo (Linux); the platform's processor name and no flags elsewhere."""
    model, flags = "", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model or platform.processor() or platform.machine(), flags


def cpu_features() -> list[str]:
    """The CPU features of `CPU_FEATURES` this machine has, e.g. ['AVX2', 'AVX-512', 'AVX-512 BF16', 'AMX']."""
    flags = _cpuinfo()[1]
    return [name for flag, name in CPU_FEATURES.items() if flag in flags]


def cpu_label() -> str:
    """'Intel(R) Xeon(R) Processor (AVX2, AVX-512, AVX-512 BF16, AMX), 2 cores': what a row was measured on."""
    model, _ = _cpuinfo()
    features = cpu_features()
    return f"{model} ({', '.join(features) or 'no AVX2'}), {os.cpu_count()} cores"


def load() -> str:
    """The load averages (1, 5, 15 min) right now, e.g. '1.52/1.10/0.80'."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    """The machine and its load right now, e.g. 'Intel Xeon (AVX2, AVX-512), 2 cores, load 1.52/1.10/0.80'."""
    return f"{cpu_label()}, load {load()}"


def machine_info() -> dict[str, Any]:
    """The machine as a record (written with the table): CPU model, features, cores, platform, load now."""
    model, flags = _cpuinfo()
    return {
        "cpu": model,
        "features": cpu_features(),
        # every AVX-512 / AMX / VNNI / FP16 flag: the kernels of torch (oneDNN) and llama.cpp choose by them
        "flags": sorted(
            f for f in flags if f in CPU_FEATURES or f.startswith(("avx512", "amx", "avx_vnni", "f16c"))
        ),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "load": load(),
    }


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


def write(
    lines: list[BenchLine], stem: str | Path, preamble: str = "", run: dict[str, Any] | None = None
) -> str:
    """`stem`.md (the table, with `preamble` above it) and `stem`.json ({"machine": the run's machine, load at
    start and end..., "lines": every line with its details})."""
    from llamaduo_nb.jsonio import atomic_write, write_json

    table = markdown(lines)
    with atomic_write(f"{stem}.md") as fh:
        fh.write((preamble + "\n\n" if preamble else "") + table + "\n")
    write_json(
        f"{stem}.json", {"run": run or {"machine": machine_info()}, "lines": [asdict(line) for line in lines]}
    )
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


def matmul_peak(dtype: str, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 5) -> dict[str, Any]:
    """This machine's own torch.matmul peak in `dtype` ("float32" | "bfloat16"): the best FLOP/s of `repeats`
    square n x n products per size (2 n^3 FLOP each), on torch's default threads (all cores), after a warm-up.

    The ceiling a CPU workload of that dtype is measured against ("share of peak" travels across machines:
    a bf16 matmul runs on AMX / AVX-512 BF16 where the CPU has them, and is emulated where it has not)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    best: dict[int, float] = {}
    with torch.inference_mode():
        for n in sizes:
            a = torch.randn(n, n).to(torch_dtype)
            b = torch.randn(n, n).to(torch_dtype)
            torch.matmul(a, b)  # warm-up: oneDNN / BLAS pick and cache their kernels
            fastest = min(timed(lambda a=a, b=b: torch.matmul(a, b))[1] for _ in range(repeats))
            best[n] = 2 * n**3 / fastest
    size = max(best, key=best.get)
    return {
        "dtype": dtype,
        "flops_per_s": best[size],
        "size": size,
        "by_size": {str(n): round(f / 1e9, 1) for n, f in best.items()},
        "threads": torch.get_num_threads(),
    }
