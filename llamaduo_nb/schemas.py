"""The record schemas of every file a stage writes — the contract between notebooks, in one place.

All tabular files are JSON Lines (UTF-8, one object per line), written atomically by `jsonio`. Paths come
from `runlayout.RunLayout`. `validate_rows(path, rows, schema)` checks rows against these field lists, so a
stage fails with file, row and field when an upstream file is not what it declares.

01_coverage
  coverage/train.jsonl, coverage/test.jsonl          COVERAGE_ROW
  coverage/skipped.jsonl                             {row, field, problem, id}
  coverage/report.json                               counts: rows_read, rows_valid, skipped, train, test, per_category
  coverage/curation.json                             {"version": 1, "decisions": {id: {action, instruction?, response?, split?}}}

02_finetune (cycle t)
  cycle_NN/train_data.jsonl                          COVERAGE_ROW (+ lineage for synthetic rows): the data of cycle t
  cycle_NN/adapter/                                  PEFT adapter + tokenizer (save_pretrained)
  cycle_NN/train_log.jsonl                           {step, loss, learning_rate, epoch, ...} per logging step
  cycle_NN/finetune.json                             rows, tokens, steps, wall time, tokens/s, lora r/alpha, quantization

03_batch_inference
  cycle_NN/responses.jsonl                           RESPONSE_ROW, one per (prompt, sample)
  cycle_NN/inference.json                            engine, rows, tokens generated, wall time

04_evaluate
  cycle_NN/judgments.jsonl                           JUDGMENT_ROW, one per (prompt, sample, judge, repeat)
  cycle_NN/metrics.json                              METRICS (the runner reads decision.passed)

05_synthesize
  cycle_NN/synthetic.jsonl                           COVERAGE_ROW + lineage {seed_id, cycle, generator}
  cycle_NN/synthetic_rejected.jsonl                  rejected rows with {reason, detail}
  cycle_NN/synth_report.json                         counts per filter

06_deploy
  deploy/merged/, deploy/gguf/*.gguf, deploy/Modelfile, deploy/serve_vllm.sh
  deploy/parity.json, deploy/economics.json, deploy/deploy.json

Run level: params.yaml (resolved config), state.json (runner), calls.sqlite (cache + ledger),
ledger.csv, summary.md / summary.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .jsonio import DataFileError

COVERAGE_ROW = {"id": str, "instruction": str, "response": str, "category": str}
RESPONSE_ROW = {
    "prompt_id": str,
    "instruction": str,
    "reference": str,
    "candidate": str,
    "sample_index": int,
    "category": str,
    "model_id": str,
    "generation": dict,
}
JUDGMENT_ROW = {"prompt_id": str, "sample_index": int, "judge": str, "repeat": int, "ok": bool}
METRICS = {"cycle": int, "per_judge": dict, "decision": dict}


def validate_rows(path: str | Path, rows: Iterable[dict], schema: dict[str, type]) -> list[dict]:
    """Return the rows as a list, or raise DataFileError naming the first missing / ill-typed field."""
    out = []
    for i, row in enumerate(rows, start=1):
        for field, tp in schema.items():
            if field not in row:
                raise DataFileError(path, i, field, "missing")
            value = row[field]
            if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
                raise DataFileError(path, i, field, f"expected {tp.__name__}, got {type(value).__name__}")
        out.append(row)
    return out
