"""The record schemas of every file a stage writes — the contract between notebooks, in one place.

All tabular files are JSON Lines (UTF-8, one object per line), written atomically by `jsonio`. Paths come
from `runlayout.RunLayout`. `validate_rows(path, rows, schema)` checks rows against these field lists, so a
stage fails with file, row and field when an upstream file is not what it declares. `read_metrics(layout,
cycle)` is the one reader of a cycle's metrics.json (the runner, 06, the summary and the plots use it).

01_coverage
  coverage/train.jsonl, coverage/test.jsonl          COVERAGE_ROW + optional system (the row's system prompt,
      from a chat system turn or a `system` field; put before the user turn in training, inference and
      serving by student.student_messages)
  coverage/skipped.jsonl                             {row, field, problem, id}
  coverage/report.json                               counts: rows_read, rows_valid, skipped, train, test, per_category;
      token_statistics {tokenizer, splits: {train|test: {prompt|response|pair: {count, min, max, mean, std}}}}
      (or {error}) once 01's token cell ran
  coverage/token_lengths.png                         token counts per split (prompt, response)
  coverage/curation.json                             {"version": 1, "decisions": {id: {action, instruction?, response?, split?}}}

02_finetune (cycle t)
  cycle_NN/train_data.jsonl                          COVERAGE_ROW (+ lineage for synthetic rows) + {origin}: the data
      of cycle t; origin is "coverage" or "synthetic/cycle_NN" (train split ∪ synthetic.jsonl of cycles < t)
  cycle_NN/adapter/                                  PEFT adapter + tokenizer (save_pretrained)
  cycle_NN/train_log.jsonl                           {step, loss, learning_rate, grad_norm, mean_token_accuracy,
      num_input_tokens_seen, epoch, elapsed_s} per logging step
  cycle_NN/finetune.json                             {cycle, base_model, init_from, rows, rows_by_origin,
      tokenized_rows, rows_dropped_prompt_too_long, rows_cut_at_max_length, loss_mask, lora {r, alpha, source,
      dropout, target_modules}, quantization ("none" | "4bit"), device, dtype, mixed_precision, steps, epochs,
      tokens, wall_time_s, cpu_time_s, tokens_per_s, first_loss, final_loss, torch_threads, versions, ...}
  cycle_NN/loss.png                                  loss and learning rate per logging step

03_batch_inference
  cycle_NN/responses.jsonl                           RESPONSE_ROW, one per (prompt, sample):
      {prompt_id, instruction, reference, candidate, sample_index (0..K-1), category, model_id, model_revision,
       adapter (relative to the run folder), output_tokens, finish_reason ("stop" | "length"),
       generation {engine, k, temperature, top_p, do_sample, max_new_tokens, seed, batch_size, gguf_type,
                  kv_cache, sample_seed}}
  cycle_NN/inference.json                            {engine, prompts, k, rows, tokens_generated, prompt_tokens,
      prompt_tokens_computed, load_time_s, wall_time_s, cpu_time_s, tokens_per_s, finish_reasons, ...}
  cycle_NN/output_lengths.png                        histogram of generated tokens per answer
  cycle_NN/model-<type>.gguf, model-<type>.json      llama.cpp engine: the cycle's merged weights as GGUF
      (<type> = inference.llamacpp_gguf) and {adapter, adapter_sha256, merge_seconds, gguf, gguf_sha256, qtype,
      exported_from, export_seconds}; the merged HF folder was scratch (removed); 06 links this file when current

04_evaluate
  cycle_NN/judgments.jsonl                           JUDGMENT_ROW, one per (prompt, sample, judge, repeat):
      {prompt_id, sample_index, category, judge, repeat, similarity, precision, ok, error, cached,
       cache_key, raw}; a failure has ok=false, similarity/precision null, error "<kind>: <text>" with kind
       request | parse | range, and raw = the start of the reply (null for successes and request errors)
  cycle_NN/metrics.json                              METRICS (the runner reads decision.passed):
      {cycle, n_rows, m, zetas, per_judge: {judge: {precision|similarity: {mean, mean_ci95, c@<zeta>...,
       n_rows_scored}, n_rows, rows_unscored, judgments, failures, failure_rate, failure_kinds}},
       decision: {passed, metric, statistic, value, epsilon, aggregation, per_judge, reason}}
  cycle_NN/precision_vs_similarity.png               per-row mean precision vs similarity, one panel per judge
  cycle_NN/pairwise.jsonl                            with evaluate.pairwise: one per (prompt, sample, judge, repeat,
      order): {prompt_id, sample_index, category, judge, repeat, order ("student_first" | "student_second"),
       verdict ("A" | "B" | "tie" | null), student ("win" | "loss" | "tie" | null), ok, error, cached,
       cache_key, raw, identical (the answer is the reference: a tie without a call)}; metrics.json then holds
       `pairwise`: {opponent, rule, m, bootstrap, per_judge: {judge: {pairs, wins, losses, ties,
       position_flips, identical, first_slot_both, second_slot_both, failures, prompts, win_rate,
       win_rate_ci95}}}
  cycle_NN/pairwise.png                              win / tie / loss shares and the win rate per judge

05_synthesize
  cycle_NN/synthetic.jsonl                           COVERAGE_ROW (source "synthetic", category of the seed) +
      lineage {seed_id, cycle, generator: {provider, model, params: {temperature, max_tokens,
      pairs_per_request, repeat}}}
  cycle_NN/synthetic_rejected.jsonl                  candidate rows + {reason, detail, matched_id, score};
      reason is one of synthesize.FILTERS
  cycle_NN/synth_report.json                         counts per filter, request/parse failures, target,
                                                     seeds used, request_log (one entry per request)
  cycle_NN/synth_counts.png                          bar plot of those counts

06_deploy
  deploy/merged/                                     HF folder (safetensors, tokenizer + chat_template.jinja,
                                                     generation_config.json) + README.md model card
  deploy/gguf/model-<type>.gguf                      llama.cpp files, <type> in config.GGUF_TYPES (K-quants from F16;
                                                     inference.llamacpp_gguf's a hard link of 03's when current)
  deploy/Modelfile, deploy/serve_llamacpp.sh        Ollama recipe; llama.cpp server launcher (relative paths)
  deploy/serve_vllm.sh                               vLLM launcher (merged, or MODE=lora; TP/PP/GPU_MEM)
  deploy/greedy_parity.jsonl                         one per (qtype, prompt): {qtype, prompt_id, category,
      exact_match, prefix_chars, token_agreement, answer_tokens, transformers_chars, served_chars,
      transformers, served, error}
  deploy/parity_responses.jsonl                      RESPONSE_ROW of the served GGUF (model_id "gguf:<file>",
                                                     + error), K per test prompt
  deploy/parity_judgments.jsonl                      JUDGMENT_ROW of those answers (M = deploy.parity_m)
  deploy/parity_rejudged.jsonl                       JUDGMENT_ROW of the cycle's answers judged the same way
  deploy/parity.json                                 {cycle, served_gguf, qtype, k, m, m_evaluated, prompts,
      answers, generation_failures, seconds, decision: {evaluated, served, drop, tolerance, flagged, message},
      comparison: [{judge, metric, statistic, evaluated, evaluated_ci95, served, served_ci95, delta,
      evaluated_rows, served_rows}], rejudged_evaluated, sampler_comparison: [{measure, transformers,
      llama.cpp, paired_diff, ci95, prompts}], attribution: [{judge, metric, comparison, mean_diff, ci95, n}],
      served_metrics: METRICS}  (or {skipped} when deploy.serve is false)
  deploy/economics.json                              {source, ledger: {by_provider, by_stage, by_cycle, total},
      migration_spend_usd, params, service_usd_per_day, service_usd_per_month, table2, crossovers}
  deploy/deploy.json                                 {choice, merge, exports, quants, greedy, parity, modelfile,
                                                     llamacpp_launch, vllm_launch, hub: [{pushed, url, reason}]}
  deploy/{cycles,parity,ledger_costs,breakeven}.png, logs/llama_server_<type>.log

Run level: params.yaml (resolved config), state.json (runner), calls.sqlite (cache + ledger),
ledger.csv, summary.md / summary.json.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .jsonio import DataFileError, iter_jsonl, read_json
from .runlayout import RunLayout

# The keys a flat input row may name its instruction and response by, in order of preference (01_coverage reads
# them; dataquality reads rows of any schema 01 accepts)
INSTRUCTION_KEYS = ("instruction", "prompt", "question", "input")
RESPONSE_KEYS = ("response", "completion", "output", "answer")
# The keys of a passage that belongs to the prompt (Alpaca `input`, Dolly and SQuAD `context`, BoolQ `passage`):
# 01_coverage appends each non-empty one to the instruction after a blank line (`coverage.with_context`)
CONTEXT_KEYS = ("input", "context", "passage")

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

# What a ledger row's `stage` says (calls.sqlite, ledger.csv): the paying notebook's name, or the part of a
# notebook paid and cached apart. One home: stages open their ServicePool with these, the forecast prices them,
# the summary, economics and `--retry-failed` read them.
LEDGER_INFERENCE = (
    "03_batch_inference"  # 03 through a service provider (an OpenAI-compatible student endpoint)
)
LEDGER_JUDGING = "04_evaluate"  # 04: the cycle's answers judged M times
LEDGER_PAIRWISE = "04_pairwise"  # 04: the cycle's answers compared with the reference, both orders
LEDGER_BASELINES = "baselines"  # 04, once per run: Table 1's reference rows (service answers, base student)
LEDGER_TEACHER_STUDY = "teacher_study"  # 05: candidate teachers answer and are rewarded (CAR)
LEDGER_SYNTHESIS = "05_synthesize"  # 05: the chosen teacher writes the cycle's pairs
LEDGER_PARITY = "06_deploy"  # 06: the served model's answers judged against the evaluated ones
LEDGER_TEACHER_VALIDATION = "teacher_validation"  # `llamaduo validate-teachers`: each trial student judged
# the ledger stages each paid notebook pays under (the runner forecasts a notebook before it runs)
NOTEBOOK_LEDGER_STAGES = {
    "04_evaluate": (LEDGER_JUDGING, LEDGER_PAIRWISE, LEDGER_BASELINES),
    "05_synthesize": (LEDGER_TEACHER_STUDY, LEDGER_SYNTHESIS),
    "06_deploy": (LEDGER_PARITY,),
}


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


def read_metrics(layout: RunLayout, cycle: int, *, required: bool = False) -> dict[str, Any] | None:
    """Cycle `cycle`'s metrics.json as 04_evaluate wrote it, or None while the cycle has none (with `required`,
    a DataFileError instead). The file must hold a JSON object whose METRICS fields have their types; a field
    may be absent (a hand-written or partial file carrying only `decision` still reads)."""
    path = layout.metrics_file(cycle)
    if not path.is_file():
        if required:
            raise DataFileError(path, None, None, "missing: run 04_evaluate for this cycle first")
        return None
    metrics = read_json(path)
    if not isinstance(metrics, dict):
        raise DataFileError(path, None, None, f"expected a JSON object, got {type(metrics).__name__}")
    for field, tp in METRICS.items():
        value = metrics.get(field)
        if field in metrics and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
            raise DataFileError(path, None, field, f"expected {tp.__name__}, got {type(value).__name__}")
    return metrics


def evaluated_cycles(layout: RunLayout) -> Iterator[tuple[int, dict[str, Any], int | None]]:
    """(cycle, metrics, training rows) of every cycle that has a metrics.json, in order: what the summary's
    cycles table and Fig. 2 read (the rows from 02's finetune.json, None without it)."""
    for cycle in layout.cycles():
        metrics = read_metrics(layout, cycle)
        if metrics is None:
            continue
        train = layout.train_summary(cycle)
        yield cycle, metrics, (read_json(train).get("rows") if train.is_file() else None)


def load_test_rows(path: str | Path) -> list[dict]:
    """The test split (03 answers it, 04 answers it for Table 1's reference rows): every row needs a string
    id, a non-empty instruction and a reference response."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run 01_coverage first")
    rows, seen = [], {}
    for i, row in enumerate(iter_jsonl(path), start=1):
        for key in ("id", "instruction", "response"):
            value = row.get(key)
            if not isinstance(value, str) or (key != "response" and not value.strip()):
                raise DataFileError(path, i, key, f"expected a non-empty string, got {value!r}")
        if row["id"] in seen:
            raise DataFileError(path, i, "id", f"duplicate of row {seen[row['id']]}")
        seen[row["id"]] = i
        rows.append(row)
    if not rows:
        raise DataFileError(path, None, None, "the test split is empty")
    return rows
