"""06 step 2: the cycle's LoRA adapter merged into the base weights, and the model card."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import RunConfig
from ..jsonio import atomic_dir, atomic_write, markdown_table, sha256_file
from ..runlayout import RunLayout
from ..schemas import read_metrics
from .select import CycleChoice, DeployError, cycle_table


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

    The model is built exactly as 03 built it for the evaluated answers (`inference.load_model`: base in
    full precision, never 4-bit even after QLoRA training, adapter merged with peft's `merge_and_unload`,
    the adapter folder's tokenizer and chat template when 02 saved them), so what ships is what was judged.
    """
    from ..inference import load_model

    t0 = time.monotonic()
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DeployError(f"{adapter_dir} holds no adapter_config.json: not a PEFT adapter folder")
    merged, tokenizer, base_path = load_model(cfg, adapter_dir, merge=True)
    if not tokenizer.chat_template:
        raise DeployError(
            f"the student tokenizer ({adapter_dir} or {base_path}) has no chat template; the served model "
            "would not see prompts the way it was trained"
        )
    tokenizer.padding_side = "right"  # load_model pads left for batched generation; ship the library default
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return MergeResult(
        path=out_dir,
        base_model=cfg.student.model_id,
        base_path=str(base_path),
        adapter_dir=adapter_dir,
        n_parameters=int(sum(p.numel() for p in merged.parameters())),
        dtype=str(next(merged.parameters()).dtype).replace("torch.", ""),
        seconds=time.monotonic() - t0,
    )


# What the card says about licences we know; anything else tells the reader to check.
BASE_LICENCES: dict[str, tuple[str, str, str]] = {
    # model id prefix: (licence id, upstream model, note)
    "embedded:smollm2": (
        "apache-2.0",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "SmolLM2 is released by Hugging Face under the Apache License 2.0.",
    ),
    "HuggingFaceTB/SmolLM2": ("apache-2.0", "", "SmolLM2 is released under the Apache License 2.0."),
    "google/gemma": (
        "gemma",
        "",
        "Gemma weights are under Google's Gemma Terms of Use, which carry over to "
        "derivatives (including this merged model).",
    ),
    "meta-llama/": (
        "llama3",
        "",
        "Llama weights are under Meta's Llama Community License, which carries over "
        "to derivatives; check its naming and acceptable-use terms.",
    ),
    "mistralai/": (
        "apache-2.0",
        "",
        "Check the Mistral model's own card; most open Mistral weights are Apache-2.0.",
    ),
}


def base_licence(model_id: str) -> tuple[str, str, str]:
    """(licence id, upstream model id, note) for the card; unknown bases say so instead of guessing."""
    for prefix, (licence, upstream, note) in BASE_LICENCES.items():
        if model_id.startswith(prefix):
            return licence, upstream or model_id, note
    return (
        "other",
        model_id,
        f"The licence of the base model {model_id} was not recognised: check its model card.",
    )


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_(none)_"
    cells = frame.astype(object).where(frame.notna(), "")
    return markdown_table(cells.columns, cells.itertuples(index=False))


def _vc_table(layout: RunLayout) -> pd.DataFrame:
    """Per cycle and judge: `mean / C@zeta…` of precision and similarity, from each cycle's metrics.json."""
    records = []
    for cycle in layout.cycles():
        metrics = read_metrics(layout, cycle)
        if metrics is None:
            continue
        zetas = metrics.get("zetas", [])
        for judge, entry in metrics.get("per_judge", {}).items():
            record = {"cycle": cycle, "judge": judge}
            for metric in ("precision", "similarity"):
                stats = entry.get(metric, {})
                if stats.get("mean") is None:
                    record[metric] = "n/a"
                    continue
                parts = [f"{stats['mean']:.1f}"] + [
                    f"{stats.get(f'c@{float(z):g}', float('nan')):.0f}%" for z in zetas
                ]
                record[metric] = " / ".join(parts)
            record["passed"] = metrics.get("decision", {}).get("passed")
            records.append(record)
    return pd.DataFrame(records)


def dataset_lineage(cfg: RunConfig, layout: RunLayout, cycle: int) -> pd.DataFrame:
    """What the shipped cycle was trained and tested on: the coverage source, its splits, and the synthetic
    data of every cycle up to `cycle` (rows, producer, sha256 prefix), so a reader can trace each file."""
    records = [
        {"data": "coverage source", "file": str(cfg.coverage.source), "rows": None, "made by": "run owner"},
        {
            "data": "train split",
            "file": "coverage/train.jsonl",
            "rows": _count(layout.train_file),
            "made by": "01",
        },
        {
            "data": "test split",
            "file": "coverage/test.jsonl",
            "rows": _count(layout.test_file),
            "made by": "01",
        },
    ]
    generator = cfg.provider(cfg.synthesize.generator)
    for c in range(cycle):
        path = layout.synthetic_file(c)
        if path.is_file():
            records.append(
                {
                    "data": f"synthetic, cycle {c}",
                    "file": str(path.relative_to(layout.root)),
                    "rows": _count(path),
                    "made by": f"05: {generator.name} (`{generator.model}`)",
                }
            )
    for record in records:
        path = Path(record["file"]) if record["data"] == "coverage source" else layout.root / record["file"]
        record["sha256"] = sha256_file(path)[:16] if path.is_file() else None
    return pd.DataFrame(records)


def _count(path: Path) -> int | None:
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def eval_results(cfg: RunConfig, layout: RunLayout, cycle: int) -> list:
    """model-index results of the shipped cycle (huggingface_hub `EvalResult`s): per judge, the mean and
    C@zeta of precision and similarity on the run's test split, as 04 computed them."""
    from huggingface_hub import EvalResult

    metrics = read_metrics(layout, cycle)
    if metrics is None:
        return []
    results = []
    for judge, entry in metrics.get("per_judge", {}).items():
        model = cfg.provider(judge).model if judge in {p.name for p in cfg.providers} else judge
        for metric in ("precision", "similarity"):
            stats = entry.get(metric, {})
            for key, label in [
                ("mean", "mean"),
                *[(f"c@{float(z):g}", f"C@{z:g}") for z in metrics.get("zetas", [])],
            ]:
                value = stats.get(key)
                if value is None:
                    continue
                results.append(
                    EvalResult(
                        task_type="text-generation",
                        task_name=cfg.task,
                        dataset_type="llamaduo-test-split",
                        dataset_name=f"{cfg.run_name} test split",
                        dataset_split="test",
                        metric_type=f"llm-judge-{metric}-{label.lower()}",
                        metric_name=f"{metric} {label} (judge {judge}: {model}, M={metrics.get('m', cfg.evaluate.m)})",
                        metric_value=round(float(value), 2),
                        verified=False,
                    )
                )
    return results


def card_data(cfg: RunConfig, layout: RunLayout, choice: CycleChoice):
    """The card's front matter as huggingface_hub `ModelCardData` (licence, base model, tags, datasets,
    model-index with the shipped cycle's judged results)."""
    from huggingface_hub import ModelCardData

    licence, upstream, _ = base_licence(cfg.student.model_id)
    return ModelCardData(
        model_name=f"{cfg.run_name}-cycle{choice.cycle:02d}",
        license=licence,
        base_model=upstream,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["llamaduo", "lora", "merged", "text-generation", "gguf"],
        datasets=[cfg.deploy.hf_dataset_repo] if cfg.deploy.hf_dataset_repo else None,
        eval_results=eval_results(cfg, layout, choice.cycle) or None,
    )


def model_card(
    cfg: RunConfig, layout: RunLayout, choice: CycleChoice, merge: MergeResult | None = None
) -> str:
    """The README.md of the merged folder: what the model is, how it was made and measured, licences."""
    licence, upstream, licence_note = base_licence(cfg.student.model_id)
    judges = [
        f"{name} ({cfg.provider(name).kind}: `{cfg.provider(name).model}`)" for name in cfg.evaluate.judges
    ]
    teacher = cfg.provider(cfg.synthesize.generator)
    volumes = cycle_table(layout)[["cycle", "train_rows", "synthetic_rows", "value", "passed"]]
    zetas = "/".join(f"C@{z:g}" for z in cfg.evaluate.zetas)
    size = f"{merge.n_parameters / 1e6:.0f}M parameters, {merge.dtype}" if merge else ""
    body = f"""
# {cfg.run_name}: {cfg.task}

A small local model that took over this task from service LLMs with the LlamaDuo method: LoRA
fine-tuning on a coverage dataset, judged by service LLMs, grown with synthetic data until the judges'
score met the threshold or the cycle budget ran out. This folder holds the LoRA adapter of
**cycle {choice.cycle}** merged into the base weights ({size}).

- Base model: `{cfg.student.model_id}` (upstream: `{upstream}`)
- Why this cycle: {choice.reason} (selection rule `{choice.select}`)
- Decision: {cfg.evaluate.decision_statistic} of {cfg.evaluate.decision_metric}, aggregated by
  {cfg.evaluate.judge_aggregation} over judges, against epsilon = {cfg.evaluate.epsilon:g};
  this cycle {"passed" if choice.passed else "did not pass"}.
- Judges: {", ".join(judges)}; M = {cfg.evaluate.m} judgments per answer, K = {cfg.inference.k} answers per
  test prompt, zeta = {", ".join(f"{z:g}" for z in cfg.evaluate.zetas)}.
- Teacher (synthetic data): {teacher.name} ({teacher.kind}: `{teacher.model}`).

## Data per cycle

{_md_table(volumes)}

## Data lineage of this cycle

{_md_table(dataset_lineage(cfg, layout, choice.cycle))}

## Judged quality per cycle (mean / {zetas})

{_md_table(_vc_table(layout))}

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("path/to/merged")
model = AutoModelForCausalLM.from_pretrained("path/to/merged")
prompt = tok.apply_chat_template([{{"role": "user", "content": "..."}}], add_generation_prompt=True,
                                 return_dict=True, return_tensors="pt")
print(tok.decode(model.generate(**prompt, max_new_tokens=256)[0], skip_special_tokens=True))
```

GGUF files for llama.cpp and Ollama sit in `../gguf/`, with an Ollama `Modelfile` and a vLLM launch script
(`serve_vllm.sh`) beside this folder.

## Licences

- Base model licence: **{licence}**. {licence_note}
- The LoRA adapter and the merged weights are a derivative of the base model and follow its licence.
- Training data: the coverage dataset supplied by the run's owner plus synthetic pairs written by
  `{teacher.model}`; the service's terms of use apply to what it generated (several providers restrict
  using outputs to build competing models; check yours before publishing).
"""
    return f"---\n{card_data(cfg, layout, choice).to_yaml()}\n---\n" + body


def write_model_card(
    cfg: RunConfig, layout: RunLayout, choice: CycleChoice, merge: MergeResult | None = None
) -> Path:
    """merged/README.md, checked by parsing it back with huggingface_hub (`ModelCard`: front matter,
    model-index -> EvalResults) before it is written."""
    from huggingface_hub import ModelCard

    text = model_card(cfg, layout, choice, merge)
    card = ModelCard(text)  # raises on malformed YAML / model-index
    if card.data.to_dict().get("base_model") is None:
        raise DeployError("the model card has no base_model in its front matter")
    with atomic_write(layout.model_card) as fh:
        fh.write(text)
    return layout.model_card
