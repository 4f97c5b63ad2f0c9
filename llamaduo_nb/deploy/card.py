"""06 step 2: the model card of the merged folder (the merge itself is `student.merge_adapter`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..config import RunConfig
from ..jsonio import atomic_write, markdown_table, sha256_file
from ..runlayout import RunLayout
from ..schemas import read_metrics
from ..student import MergeResult, base_licence
from .select import CycleChoice, DeployError, cycle_table


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
