"""06 step 5: does the served GGUF answer like the evaluated model (greedy, and judged)?

The judged check's paid calls (the judges; the served GGUF is local and free) as the forecast prices them:
`planned_parity_calls`, built with 04's request builders like the check itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import evaluate
from ..config import RunConfig
from ..embedded import LlamaServer, local_server_provider
from ..jsonio import read_jsonl, save_figure, sha256_file, write_json, write_jsonl
from ..plan import PlannedCalls
from ..runlayout import RunLayout
from ..schemas import LEDGER_PARITY, read_metrics
from ..services import ChatRequest, ServicePool
from ..student import GGUFExport, prompt_token_ids, stop_token_ids, student_messages, tensor_types
from .select import CycleChoice, DeployError

# 06's served answers are sent with repeat = PARITY_REPEAT_OFFSET + j: never one of 03's keys (repeat j < K)
PARITY_REPEAT_OFFSET = 1_000_000


def test_rows(layout: RunLayout, limit: int | None = None) -> list[dict]:
    path = layout.test_file
    if not path.is_file():
        raise DeployError(f"{path} not found: 01_coverage writes the test split the parity check re-asks")
    rows = sorted(read_jsonl(path), key=lambda r: str(r["id"]))
    return rows if limit is None else rows[:limit]


@dataclass(frozen=True)
class GreedyAnswer:
    text: str
    prompt_ids: list[int]
    answer_ids: list[int]


def greedy_transformers(
    model_dir: str | Path,
    instructions: Sequence[str],
    max_new_tokens: int,
    systems: Sequence[str | None] | None = None,
) -> list[GreedyAnswer]:
    """Greedy answers of the merged model in-process, one prompt at a time (no padding to perturb them).

    Prompts and stop tokens are built by the student's functions, as 03's engines build them, so this is
    the evaluated model's behaviour.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    model.eval()
    stops = stop_token_ids(model, tok)
    answers = []
    prompts = list(zip(instructions, systems or [None] * len(instructions), strict=True))
    for instruction, system in tqdm(prompts, desc="greedy (transformers)", unit="prompt"):
        prompt = prompt_token_ids(tok, instruction, system)
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, len(prompt) :].tolist()
        answers.append(GreedyAnswer(tok.decode(new, skip_special_tokens=True), prompt, new))
    return answers


def token_agreement(
    gguf_path: str | Path, answers: Sequence[GreedyAnswer], n_ctx: int = 2048, timing: dict | None = None
) -> list[float]:
    """Teacher-forced top-1 agreement: llama.cpp reads each transformers greedy answer token by token and
    predicts the next one; the share of positions where its most likely token is the one transformers chose.

    Unlike exact match, one near-tie flip does not spoil the rest of the answer, so this isolates how much
    the GGUF's numbers (F16 rounding, Q8_0 blocks) move the model's choices. Each answer token is one
    single-token forward pass, as in generation: `timing` (if given) receives `tokens` and `seconds` of
    those passes, i.e. this CPU's decode speed for the file.
    """
    import llama_cpp
    from tqdm.auto import tqdm

    llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, verbose=False)
    try:
        shares = []
        for answer in tqdm(answers, desc=f"token agreement ({Path(gguf_path).name})", unit="prompt"):
            if not answer.answer_ids:
                shares.append(1.0)
                continue
            llm.reset()
            llm.eval(answer.prompt_ids)
            hits = 0
            t0 = time.perf_counter()
            for token in answer.answer_ids:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
                hits += int(np.argmax(logits) == token)
                llm.eval([token])
            if timing is not None:
                timing["seconds"] = timing.get("seconds", 0.0) + time.perf_counter() - t0
                timing["tokens"] = timing.get("tokens", 0) + len(answer.answer_ids)
            shares.append(hits / len(answer.answer_ids))
    finally:
        llm.close()
    return shares


def served_provider(cfg: RunConfig, gguf_path: Path, base_url: str, qtype: str) -> tuple[RunConfig, str]:
    """`cfg` plus an OpenAI-compatible provider for the served GGUF; the model name carries the file's hash
    so the call cache never replays answers of an older export."""
    taken = {p.name for p in cfg.providers}
    name = next(
        n
        for n in (f"deployed_{qtype}", f"deployed_{qtype}_gguf", f"deployed_{qtype}_{os.getpid()}")
        if n not in taken
    )
    model = f"{cfg.run_name}-{qtype}-{sha256_file(gguf_path)[:12]}"
    provider = local_server_provider(name, model, base_url, slots=cfg.inference.llamacpp_parallel)
    return dataclasses.replace(cfg, providers=[*cfg.providers, provider]), name


@contextlib.contextmanager
def _local_prices_are_zero():
    """The served student costs nothing per token; keep the price table's 'no price' warning quiet for it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no price for model")
        yield


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def greedy_parity(
    cfg: RunConfig, layout: RunLayout, exports: Sequence[GGUFExport], merged_dir: str | Path | None = None
) -> pd.DataFrame:
    """Greedy answers of the merged model (transformers) vs each exported GGUF served by llama.cpp.

    One row per (GGUF type, prompt): whether the served greedy answer is exactly the transformers one
    (whitespace stripped), how many leading characters agree, and the teacher-forced token agreement
    (`token_agreement`). Written to deploy/greedy_parity.jsonl.
    """
    n = cfg.deploy.greedy_prompts
    if n == 0 or not exports or not cfg.deploy.serve:
        return pd.DataFrame()
    rows = test_rows(layout, n)
    reference = greedy_transformers(
        merged_dir or layout.merged_dir,
        [r["instruction"] for r in rows],
        cfg.deploy.greedy_max_new_tokens,
        systems=[r.get("system") for r in rows],
    )
    requests = [
        ChatRequest(
            messages=student_messages(r["instruction"], r.get("system")),
            temperature=0.0,
            max_tokens=cfg.deploy.greedy_max_new_tokens,
            allow_truncated=True,  # greedy parity compares the first max_new_tokens of both engines
        )
        for r in rows
    ]
    records = []
    for export in exports:
        # exact: greedy parity checks weights, tokenizer and template token for token
        with LlamaServer(
            export.path, n_ctx=cfg.deploy.n_ctx, log_file=layout.server_log(export.qtype), exact=True
        ) as server:
            run_cfg, name = served_provider(cfg, export.path, server.base_url, export.qtype)
            with (
                _local_prices_are_zero(),
                ServicePool(run_cfg, layout, LEDGER_PARITY, providers=[name]) as pool,
            ):
                results = pool.complete_many(name, requests, desc=f"greedy ({export.qtype} GGUF)")
        timing: dict = {}
        agreement = token_agreement(export.path, reference, cfg.deploy.n_ctx, timing)
        speed = timing.get("tokens", 0) / timing["seconds"] if timing.get("seconds") else None
        for row, ref, result, share in zip(rows, reference, results, agreement, strict=True):
            served = result.text if not result.error else ""
            records.append(
                {
                    "qtype": export.qtype,
                    "prompt_id": row["id"],
                    "category": row.get("category", ""),
                    "exact_match": ref.text.strip() == served.strip(),
                    "prefix_chars": _common_prefix(ref.text.strip(), served.strip()),
                    "token_agreement": share,
                    "decode_tokens_per_s": speed,
                    "answer_tokens": len(ref.answer_ids),
                    "transformers_chars": len(ref.text.strip()),
                    "served_chars": len(served.strip()),
                    "transformers": ref.text,
                    "served": served,
                    "error": result.error,
                }
            )
    write_jsonl(layout.greedy_parity_file, records)
    return pd.DataFrame(records)


def greedy_summary(greedy: pd.DataFrame) -> pd.DataFrame:
    """Per GGUF type: prompts, exact-match rate, mean share of leading characters that agree, the
    mean teacher-forced token agreement and llama.cpp's decode speed on this machine."""
    columns = ["qtype", "prompts", "exact_match_rate", "prefix_agreement", "token_agreement", "tokens_per_s"]
    if greedy.empty:
        return pd.DataFrame(columns=columns)
    if "decode_tokens_per_s" not in greedy:
        greedy = greedy.assign(decode_tokens_per_s=np.nan)
    longest = greedy[["transformers_chars", "served_chars"]].max(axis=1).clip(lower=1)
    frame = greedy.assign(prefix_share=greedy["prefix_chars"] / longest)
    return (
        frame.groupby("qtype", sort=False)
        .agg(
            prompts=("prompt_id", "size"),
            exact_match_rate=("exact_match", "mean"),
            prefix_agreement=("prefix_share", "mean"),
            token_agreement=("token_agreement", "mean"),
            tokens_per_s=("decode_tokens_per_s", "first"),
        )
        .reset_index()
    )


def quant_table(exports: Sequence[GGUFExport], greedy: pd.DataFrame) -> pd.DataFrame:
    """One row per exported GGUF: size, what its tensors hold, decode tokens/s on this CPU, and greedy
    agreement with the merged model (exact answers and teacher-forced token agreement)."""
    summary = greedy_summary(greedy).set_index("qtype") if not greedy.empty else pd.DataFrame()
    records = []
    for export in exports:
        types = tensor_types(export.path)
        row = summary.loc[export.qtype] if export.qtype in summary.index else None
        records.append(
            {
                "type": export.qtype,
                "MiB": round(export.mib, 1),
                "tensor types": ", ".join(
                    f"{k}:{v}" for k, v in sorted(types.items(), key=lambda kv: -kv[1])
                ),
                "tokens/s": None
                if row is None or pd.isna(row["tokens_per_s"])
                else round(row["tokens_per_s"], 1),
                "greedy exact": None if row is None else round(float(row["exact_match_rate"]), 3),
                "token agreement": None if row is None else round(float(row["token_agreement"]), 3),
            }
        )
    return pd.DataFrame(records)


# --------------------------------------------------------------------------- what differs: sampler or judge?


def _repeat_share(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one in the same answer (0: none; loops push it to 1)."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def answer_profile(rows: Sequence[dict], max_new_tokens: int) -> pd.DataFrame:
    """Per answer: tokens generated, characters, whether it hit the token limit, repeated trigram share."""
    return pd.DataFrame(
        [
            {
                "prompt_id": r["prompt_id"],
                "sample_index": r["sample_index"],
                "tokens": r.get("output_tokens"),
                "chars": len(r.get("candidate") or ""),
                "hit_limit": (r.get("output_tokens") or 0) >= max_new_tokens,
                "repeat_share": _repeat_share(r.get("candidate") or ""),
                "empty": not (r.get("candidate") or "").strip(),
            }
            for r in rows
            if not r.get("error")
        ]
    )


def _paired(a: pd.Series, b: pd.Series, seed: int = 0) -> dict:
    """b - a over the prompts both have: mean difference, 95% bootstrap CI (prompts resampled), n."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1).dropna()
    diff = (both["b"] - both["a"]).astype(float).to_numpy()
    if diff.size == 0:
        return {"mean_diff": None, "ci95": None, "n": 0}
    ci = evaluate.bootstrap_ci(diff, seed=seed)
    return {"mean_diff": float(diff.mean()), "ci95": list(ci) if ci else None, "n": int(diff.size)}


def sampler_comparison(
    evaluated: Sequence[dict], served: Sequence[dict], max_new_tokens: int
) -> pd.DataFrame:
    """The sampled answers of 03 (transformers) and of the served GGUF (llama.cpp) at the same temperature,
    top_p and token limit, side by side: per measure the mean of each engine and the paired difference per
    prompt (llama.cpp - transformers) with its 95% bootstrap CI. A CI away from 0 is a sampler effect."""
    a, b = answer_profile(evaluated, max_new_tokens), answer_profile(served, max_new_tokens)
    records = []
    for measure in ("tokens", "chars", "hit_limit", "repeat_share", "empty"):
        if a.empty or b.empty or a[measure].isna().all() or b[measure].isna().all():
            continue
        per_a = a.groupby("prompt_id")[measure].mean().astype(float)
        per_b = b.groupby("prompt_id")[measure].mean().astype(float)
        paired = _paired(per_a, per_b)
        records.append(
            {
                "measure": measure,
                "transformers": float(a[measure].astype(float).mean()),
                "llama.cpp": float(b[measure].astype(float).mean()),
                "paired_diff": paired["mean_diff"],
                "ci95": paired["ci95"],
                "prompts": paired["n"],
            }
        )
    return pd.DataFrame(records)


def _prompt_scores(judgments: Sequence[dict], judge: str, metric: str, repeats: Sequence[int] | None = None):
    frame = pd.DataFrame([j for j in judgments if j.get("judge") == judge and j.get("ok")])
    if frame.empty or metric not in frame:
        return pd.Series(dtype=float)
    if repeats is not None:
        frame = frame[frame["repeat"].isin(list(repeats))]
    return frame.groupby("prompt_id")[metric].mean().astype(float)


def judge_attribution(
    cycle_judgments: Sequence[dict],
    rejudged: Sequence[dict],
    served_judgments: Sequence[dict],
    judges: Sequence[str],
    metric: str,
    m: int,
) -> pd.DataFrame:
    """Sampler effect vs judge noise, paired on the same prompts, per judge.

    * judge noise: the same evaluated answers judged twice (04's repeat 1 vs repeat 0) — how far the
      judge alone moves a per-prompt mean;
    * served - evaluated: the served answers vs the evaluated answers, both judged by the same judge with
      the same M (`rejudged` = the evaluated answers judged in 06 like the served ones; the call cache
      answers repeats 04 already made).
    A served-minus-evaluated CI that excludes 0 while the judge-noise CI covers it is an engine effect.
    """
    records = []
    for judge in judges:
        noise = _paired(
            _prompt_scores(cycle_judgments, judge, metric, [0]),
            _prompt_scores(cycle_judgments, judge, metric, [1]),
        )
        served = _paired(
            _prompt_scores(rejudged, judge, metric, range(m)),
            _prompt_scores(served_judgments, judge, metric, range(m)),
        )
        for label, stats in (
            ("judge noise (repeat 1 - repeat 0, same answers)", noise),
            ("served - evaluated (same judge, M)", served),
        ):
            records.append({"judge": judge, "metric": metric, "comparison": label, **stats})
    return pd.DataFrame(records)


def served_answers(
    pool: Any, provider: str, rows: Sequence[dict], cfg: RunConfig, gguf_name: str
) -> list[dict]:
    """K answers per test prompt from the served GGUF, each a fresh call: sent with repeats from
    PARITY_REPEAT_OFFSET, so no request is the same as one of 03's (repeats 0..K-1) and the call cache cannot
    answer parity with 03's samples; served-vs-evaluated stays an independent check."""
    return evaluate.answer_with_provider(
        pool,
        provider,
        rows,
        cfg.inference.k,
        cfg.inference,
        model_id=f"gguf:{gguf_name}",
        repeat_offset=PARITY_REPEAT_OFFSET,
    )


def parity_evaluate_config(cfg: RunConfig):
    """04's evaluate settings as the judged parity check uses them: `deploy.parity_m` repeats, the LLM
    judges of `deploy.parity_judges` (default: all of 04's) plus every deciding LLM judge."""
    d, ev = cfg.deploy, cfg.evaluate
    wanted = set(d.parity_judges if d.parity_judges is not None else ev.judges) | set(ev.deciding_judges)
    judges = [j for j in ev.judges if j in wanted]  # the deciding ones always: decided like the cycle
    return dataclasses.replace(ev, m=d.parity_m or ev.m, judges=judges)


def planned_parity_calls(cfg: RunConfig, test_rows: Sequence[dict]) -> PlannedCalls:
    """The judged parity check's paid calls (`judged_parity`, ledger stage "06_deploy"): the judges of
    `parity_evaluate_config` score the served GGUF's K answers per test prompt (assumed as long as the
    reference) `deploy.parity_m` times, and re-judge the evaluated cycle's answers as often, where only the
    repeats above 04's M are paid (04's replay from the call cache). The served GGUF answers locally, free."""
    eval_cfg = parity_evaluate_config(cfg)
    if not (cfg.deploy.enabled and cfg.deploy.serve and eval_cfg.judges):
        return PlannedCalls()
    answers = evaluate.assumed_answers(test_rows, cfg.inference.k, cfg.inference.max_new_tokens)
    served = evaluate.planned_judge_calls(LEDGER_PARITY, None, answers, eval_cfg)
    rejudged = evaluate.planned_judge_calls(LEDGER_PARITY, None, answers, eval_cfg, min_repeat=cfg.evaluate.m)
    return PlannedCalls(served + rejudged)


def parity_judgments(
    pool: Any, served: str, rows: Sequence[dict], evaluated: Sequence[dict], cfg: RunConfig, gguf_name: str
) -> tuple[list[dict], list[dict], list[dict]]:
    """The judged check's calls through `pool` (the served model `served` + the judges): 04's answer-and-judge
    path. The served GGUF answers every test prompt K times like a service LLM, judged like the cycle
    (`parity_evaluate_config`); the evaluated answers are judged exactly the same way (same judges, M, prompt):
    the paired baseline, whose repeats 04 already made come from the call cache at no cost. `planned_parity_calls`
    plans the paid part. Returns (responses, judgments, rejudged)."""
    eval_cfg = parity_evaluate_config(cfg)
    responses = served_answers(pool, served, rows, cfg, gguf_name)
    judgments = evaluate.judge_rows(pool, responses, eval_cfg)
    rejudged = evaluate.judge_rows(pool, evaluated, eval_cfg) if evaluated else []
    return responses, judgments, rejudged


def judged_parity(cfg: RunConfig, layout: RunLayout, choice: CycleChoice, export: GGUFExport) -> dict:
    """Re-answer the test prompts with the served GGUF, judge them like 04 did, compare with the cycle.

    The decision statistic of the served model is computed with 04's `decide`; a drop of more than
    `deploy.parity_tolerance` points against the evaluated cycle is flagged. Writes
    deploy/parity_responses.jsonl, parity_judgments.jsonl and parity.json.
    """
    if not cfg.deploy.serve:
        report = {"skipped": "deploy.serve is false: no endpoint was started, no parity check ran"}
        write_json(layout.parity_report, report)
        return report
    eval_cfg = parity_evaluate_config(cfg)
    rows = test_rows(layout)
    responses_file = layout.responses_file(choice.cycle)
    evaluated = (
        [r for r in read_jsonl(responses_file) if not r.get("error")] if responses_file.is_file() else []
    )
    t0 = time.monotonic()
    with LlamaServer(
        export.path,
        n_ctx=cfg.deploy.n_ctx,
        log_file=layout.server_log(export.qtype),
        parallel=cfg.inference.llamacpp_parallel,
        kv_cache=cfg.inference.llamacpp_kv_cache,  # as 03 answered: 04 judged this setting
    ) as server:
        run_cfg, name = served_provider(cfg, export.path, server.base_url, export.qtype)
        providers = [name, *dict.fromkeys(eval_cfg.judges)]
        with (
            _local_prices_are_zero(),
            ServicePool(run_cfg, layout, LEDGER_PARITY, providers=providers) as pool,
        ):
            responses, judgments, rejudged = parity_judgments(
                pool, name, rows, evaluated, cfg, export.path.name
            )
    answered = [r for r in responses if not r["error"]]
    seconds = time.monotonic() - t0
    write_jsonl(layout.parity_responses_file, responses)
    write_jsonl(layout.parity_judgments_file, judgments)
    write_jsonl(layout.parity_rejudged_file, rejudged)

    served_metrics = evaluate.compute_metrics(judgments, eval_cfg, choice.cycle)
    cycle_metrics = read_metrics(layout, choice.cycle, required=True)
    cycle_judgments = (
        evaluate.load_judgments(layout.judgments_file(choice.cycle))
        if layout.judgments_file(choice.cycle).is_file()
        else []
    )
    table = evaluate.comparison({"evaluated": cycle_judgments, "served": judgments}, cfg.evaluate)
    if not table.empty:
        table["delta"] = [
            None if e is None or v is None or pd.isna(e) or pd.isna(v) else v - e
            for e, v in zip(table["evaluated"], table["served"], strict=True)
        ]
    evaluated_value = cycle_metrics.get("decision", {}).get("value")
    served_value = served_metrics["decision"]["value"]
    rejudged_value = (
        evaluate.compute_metrics(rejudged, eval_cfg, choice.cycle)["decision"]["value"] if rejudged else None
    )
    drop = None if evaluated_value is None or served_value is None else evaluated_value - served_value
    samplers = sampler_comparison(evaluated, answered, cfg.inference.max_new_tokens)
    attribution = judge_attribution(
        cycle_judgments,
        rejudged,
        judgments,
        evaluate.judge_names(cfg.evaluate),
        cfg.evaluate.decision_metric,
        eval_cfg.m,
    )
    paired = attribution[attribution["comparison"].str.startswith("served")]
    significant = any(ci is not None and ci[1] < 0 for ci in paired["ci95"])
    # A drop beyond the tolerance is flagged only when the paired comparison (same prompts, same judge and
    # M) says the served answers are worse; otherwise it is within what the judge's noise produces.
    flagged = served_value is None or (
        drop is not None and drop > cfg.deploy.parity_tolerance and significant
    )
    if served_value is None:
        message = "the served model could not be scored (no successful judgments): treat as broken"
    elif drop is None:
        message = (
            f"served model: {served_value:.2f}; the evaluated cycle has no decision value to compare with"
        )
    else:
        beyond = drop > cfg.deploy.parity_tolerance
        message = (
            f"{cfg.evaluate.decision_statistic}({cfg.evaluate.decision_metric}): evaluated cycle "
            f"{evaluated_value:.2f} (04, M={cycle_metrics.get('m')}), the same answers re-judged here "
            f"{'n/a' if rejudged_value is None else f'{rejudged_value:.2f}'} (M={eval_cfg.m}), served "
            f"{export.qtype} GGUF {served_value:.2f}; drop {drop:+.2f} "
            f"{'exceeds' if beyond else 'is within'} the tolerance {cfg.deploy.parity_tolerance:g}"
        )
        if flagged:
            message += (
                "; the paired comparison confirms it (chat template or quantisation are the usual causes)"
            )
        elif beyond:
            message += "; not flagged: the paired comparison on the same prompts does not separate it from 0"
    report = {
        "cycle": choice.cycle,
        "served_gguf": export.path.name,
        "qtype": export.qtype,
        "k": cfg.inference.k,
        "m": eval_cfg.m,
        "m_evaluated": cycle_metrics.get("m"),
        "prompts": len(rows),
        "answers": len(responses),
        "generation_failures": len(responses) - len(answered),
        "seconds": round(seconds, 1),
        "decision": {
            "evaluated": evaluated_value,
            "served": served_value,
            "drop": drop,
            "tolerance": cfg.deploy.parity_tolerance,
            "flagged": bool(flagged),
            "message": message,
        },
        "comparison": json.loads(table.to_json(orient="records")),
        "rejudged_evaluated": rejudged_value,
        "sampler_comparison": json.loads(samplers.to_json(orient="records")),
        "attribution": json.loads(attribution.to_json(orient="records")),
        "served_metrics": served_metrics,
    }
    write_json(layout.parity_report, report)
    return report


def served_export(cfg: RunConfig, exports: Sequence[GGUFExport]) -> GGUFExport:
    """The export the endpoint serves (`deploy.serve_gguf`)."""
    for export in exports:
        if export.qtype == cfg.deploy.serve_gguf:
            return export
    raise DeployError(
        f"deploy.serve_gguf = {cfg.deploy.serve_gguf!r} was not exported (gguf_types: {cfg.deploy.gguf_types})"
    )


def parity_verdict(report: dict) -> str:
    """One line: the judged-parity outcome, or why it did not run."""
    if "skipped" in report:
        return report["skipped"]
    flag = "PARITY DROP FLAGGED: " if report["decision"]["flagged"] else "parity ok: "
    return flag + report["decision"]["message"]


def parity_table(report: dict) -> pd.DataFrame:
    """The comparison of `judged_parity` as a readable table (value [CI low, high])."""

    def cell(value: Any, ci: Any) -> str:
        if value is None:
            return "n/a"
        return f"{value:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")

    frame = pd.DataFrame(report.get("comparison", []))
    if frame.empty:
        return frame
    return pd.DataFrame(
        {
            "judge": frame["judge"],
            "metric": frame["metric"],
            "statistic": frame["statistic"],
            "evaluated cycle": [
                cell(v, c) for v, c in zip(frame["evaluated"], frame["evaluated_ci95"], strict=True)
            ],
            f"served {report['qtype']}": [
                cell(v, c) for v, c in zip(frame["served"], frame["served_ci95"], strict=True)
            ],
            "delta": [None if d is None or pd.isna(d) else round(float(d), 2) for d in frame["delta"]],
        }
    )


def parity_points(report: dict) -> pd.DataFrame:
    """The judged comparison as plotted: rows with both an evaluated and a served value (a judge that did not
    judge the served answers has nothing to compare), one metric per reference metric (precision = similarity).
    Columns: judge, metric, statistic, label, evaluated, served and their interval ends."""
    frame = pd.DataFrame(report.get("comparison", []))
    if frame.empty:
        return pd.DataFrame(columns=["judge", "metric", "statistic", "label", "evaluated", "served"])
    frame = frame[frame["evaluated"].notna() & frame["served"].notna()]
    frame = frame[~(frame["judge"].isin(evaluate.METRIC_JUDGES) & (frame["metric"] == "similarity"))]
    frame = frame.reset_index(drop=True)
    frame["label"] = [
        f"{j}{'' if j in evaluate.METRIC_JUDGES else ' ' + m} · {'V' if s == 'mean' else s.replace('c@', 'C@')}"
        for j, m, s in zip(frame["judge"], frame["metric"], frame["statistic"], strict=True)
    ]
    return frame


def plot_parity(report: dict, greedy: pd.DataFrame, path: str | Path):
    """Left: a dot-and-interval plot by judge, evaluated cycle vs served GGUF (V and C@zeta, 95% CIs), only
    what both sides have. Right: greedy exact-match rate and token agreement per GGUF type."""
    import matplotlib.pyplot as plt

    frame = parity_points(report)
    rows = max(len(frame), 1)
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(11, 1.2 + 0.32 * rows), gridspec_kw={"width_ratios": [3, 1.2]}
    )
    if not frame.empty:
        y = np.arange(len(frame))[::-1].astype(float)
        for offset, column, label, marker, colour in (
            (0.14, "evaluated", f"cycle {report.get('cycle')} (evaluated)", "o", "#1f77b4"),
            (-0.14, "served", f"served {report['qtype']}", "D", "#ff7f0e"),
        ):
            values = frame[column].astype(float).to_numpy()
            for yy, ci in zip(y + offset, frame[f"{column}_ci95"], strict=True):
                if isinstance(ci, list):
                    ax.plot(ci, [yy, yy], color=colour, lw=1.6, alpha=0.7)
            ax.plot(values, y + offset, marker, color=colour, ms=5, label=label, ls="none")
        ax.set_yticks(y, frame["label"], fontsize=8)
        judges = frame["judge"].tolist()
        for k in range(1, len(judges)):
            if judges[k] != judges[k - 1]:
                ax.axhline(y[k] + 0.5, color="#cccccc", lw=0.8)
        ax.set_ylim(-0.7, len(frame) - 0.3)
        ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no judge scored both sides", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlim(0, 101)
    ax.grid(axis="x", color="#eeeeee", lw=0.6)
    ax.set_xlabel("score (V) / % of rows (C@zeta), 95% bootstrap CIs", fontsize=9)
    ax.set_title("Judged parity", fontsize=10, pad=22)
    summary = greedy_summary(greedy)
    x2 = np.arange(len(summary))
    ax2.bar(x2 - 0.2, 100 * summary["exact_match_rate"].astype(float), width=0.4, label="exact answers")
    ax2.bar(x2 + 0.2, 100 * summary["token_agreement"].astype(float), width=0.4, label="token agreement")
    ax2.set_xticks(x2, summary["qtype"])
    ax2.set_ylim(0, 105)
    ax2.set_ylabel("%", fontsize=9)
    ax2.set_title("Greedy: transformers vs GGUF", fontsize=10, pad=22)
    ax2.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, fontsize=7, frameon=False)
    fig.tight_layout()
    save_figure(fig, path)
    return fig
