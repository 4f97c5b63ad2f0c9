"""LoRA adapters folded into weights: a cycle's adapter merged into the base and saved as a plain Hugging
Face folder (`merge_adapter`: what 06 ships and what the per-cycle GGUF is made from), and two adapters
stacked into one (`stack_adapters`: how 02's `start_from: previous_merged` saves its model)."""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..jsonio import atomic_dir, read_json, write_json
from .loading import StudentError, load_model, save_model_folder


@dataclass(frozen=True)
class MergeResult:
    path: Path
    base_model: str
    base_path: str
    adapter_dir: Path
    n_parameters: int
    dtype: str
    seconds: float


def merge_adapter(cfg: RunConfig, adapter_dir: str | Path, out_dir: str | Path) -> MergeResult:
    """Merge a cycle's LoRA adapter into the student base and save a standard HF folder at `out_dir`.

    The model is built exactly as 03 built it for the evaluated answers (`load_model`: base in
    full precision, never 4-bit even after QLoRA training, adapter merged with peft's `merge_and_unload`,
    the adapter folder's tokenizer and chat template when 02 saved them), so what ships is what was judged.
    """
    t0 = time.monotonic()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise StudentError(f"{adapter_dir} holds no adapter_config.json: not a PEFT adapter folder")
    merged, tokenizer, base_path = load_model(cfg, adapter_dir, merge=True)
    if not tokenizer.chat_template:
        raise StudentError(
            f"the student tokenizer ({adapter_dir} or {base_path}) has no chat template; the served model "
            "would not see prompts the way it was trained"
        )
    tokenizer.padding_side = "right"  # load_model pads left for batched generation; ship the library default
    save_model_folder(merged, tokenizer, out_dir, "the merged model")
    return MergeResult(
        path=out_dir,
        base_model=cfg.student.model_id,
        base_path=str(base_path),
        adapter_dir=adapter_dir,
        n_parameters=int(sum(p.numel() for p in merged.parameters())),
        dtype=str(next(merged.parameters()).dtype).replace("torch.", ""),
        seconds=time.monotonic() - t0,
    )


def stack_adapters(lower: Path, upper: Path, target: Path) -> dict[str, Any]:
    """Write at `target` one LoRA adapter equal to `lower` followed by `upper` (trained on lower merged).

    Two LoRA updates add up: s1 B1 A1 + s2 B2 A2 = [s1 B1 | s2 B2] [A1 ; A2], a single LoRA of rank
    r1 + r2 with scaling 1 (alpha = rank). So the model of a `previous_merged` cycle, which is the base
    with the previous adapter merged plus a fresh adapter, is saved as one adapter on the plain base:
    inference, deploy and vLLM load it like any other. Modules adapted by only one side get zeros from
    the other. `upper`'s tokenizer and the rest of its folder are kept. Returns {r, alpha, ranks}.
    """
    import torch
    from safetensors.torch import load_file, save_file

    configs = [read_json(folder / "adapter_config.json") for folder in (lower, upper)]
    for folder, config in zip((lower, upper), configs, strict=True):
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise ValueError(f"{folder}: adapters with rank_pattern / alpha_pattern cannot be stacked")
    weights = [load_file(folder / "adapter_model.safetensors") for folder in (lower, upper)]
    ranks = [int(config["r"]) for config in configs]
    scales = [
        float(config["lora_alpha"]) / (math.sqrt(r) if config.get("use_rslora") else r)
        for config, r in zip(configs, ranks, strict=True)
    ]
    modules = sorted({key.rsplit(".lora_", 1)[0] for w in weights for key in w if ".lora_" in key})
    stacked: dict[str, Any] = {}
    for module in modules:
        a_parts, b_parts = [], []
        for w, r, scale in zip(weights, ranks, scales, strict=True):
            a, b = w.get(f"{module}.lora_A.weight"), w.get(f"{module}.lora_B.weight")
            if a is None or b is None:
                other = next(x for x in weights if f"{module}.lora_A.weight" in x)
                a_like, b_like = other[f"{module}.lora_A.weight"], other[f"{module}.lora_B.weight"]
                a = a_like.new_zeros((r, a_like.shape[1]))
                b = b_like.new_zeros((b_like.shape[0], r))
            a_parts.append(a.float())
            b_parts.append(b.float() * scale)
        dtype = next(iter(weights[1].values())).dtype
        stacked[f"{module}.lora_A.weight"] = torch.cat(a_parts, dim=0).to(dtype).contiguous()
        stacked[f"{module}.lora_B.weight"] = torch.cat(b_parts, dim=1).to(dtype).contiguous()
    total = sum(ranks)
    config = dict(configs[1])
    config.update(r=total, lora_alpha=total, use_rslora=False)
    targets = [set(c["target_modules"]) if isinstance(c["target_modules"], list) else None for c in configs]
    if all(t is not None for t in targets):
        config["target_modules"] = sorted(targets[0] | targets[1])
    with atomic_dir(target) as tmp:
        shutil.copytree(upper, tmp, dirs_exist_ok=True)
        save_file(stacked, str(Path(tmp) / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(Path(tmp) / "adapter_config.json", config)
    return {"r": total, "alpha": total, "ranks": ranks}
