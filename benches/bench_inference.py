"""03's hot path on this machine: the demo's batch inference, by engine, and K-sampling against a naive loop.

Both comparisons run in one process on the same prompts, adapter and settings:

* **llama.cpp vs transformers** for the demo's 03 (its test split from `params/demo.yaml`'s coverage data,
  K, temperature, top-p and max_new_tokens): `generate_responses` with `inference.engine: llamacpp` (the
  cycle's merged weights as GGUF of type `inference.llamacpp_gguf`, Q8_0 by default, served by llama.cpp
  through the ServicePool) against `engine:
  transformers` (one left-padded batch, shared prompt cache). tokens/s = generated tokens / generation
  wall time, loading excluded on both sides (transformers' model load; llama-server's start, which loads the
  GGUF); the one-off merge + GGUF export is reported apart (06 reuses the file).
* **K-sampling, transformers**: `sample_batch` (all prompts in one batch, each prompt prefilled once and
  its KV cache shared by K samples) against the loop a user would write: one `generate` call per prompt
  and sample.

The adapter is a fresh (untrained) LoRA adapter: speed does not depend on its values. The transformers
engine runs first, then llama.cpp, then transformers again, and the ratio uses the median of the
transformers runs, so a change in machine load hits both sides.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benches.common import BenchLine, demo_run, timed

K_LOOP_PROMPTS = 4
K_LOOP_K = 4
K_LOOP_TOKENS = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inference")
    group.add_argument("--inf-prompts", type=int, help="test prompts for the engine comparison (default all)")


def run_engine(layout: Any, engine: str, parallel: int | None = None, **overrides: Any) -> dict[str, Any]:
    import dataclasses

    from llamaduo_nb.config import dump_config, load_config
    from llamaduo_nb.inference import generate_responses

    cfg = load_config(layout.params_file)
    inf = dataclasses.replace(cfg.inference, engine=engine, **overrides)
    if parallel is not None:
        inf = dataclasses.replace(inf, llamacpp_parallel=parallel)
    cfg = dataclasses.replace(cfg, inference=inf)
    dump_config(cfg, layout.params_file)
    layout.calls_db.unlink(missing_ok=True)  # no replay from the call cache: every answer is generated
    return generate_responses(cfg, layout, 0, progress=False)


def naive_k_loop(model: Any, tokenizer: Any, instructions: list[str], k: int, max_new_tokens: int) -> int:
    """What a user would otherwise write: one `generate` per prompt and sample. Returns tokens generated."""
    import torch

    from llamaduo_nb.student import prompt_token_ids, stop_token_ids

    stops = stop_token_ids(model, tokenizer)
    tokens = 0
    for p, text in enumerate(instructions):
        ids = torch.tensor([prompt_token_ids(tokenizer, text)])
        for s in range(k):
            torch.manual_seed(1000 * p + s)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=0.7,
                    top_p=0.9,
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stops,
                    pad_token_id=tokenizer.pad_token_id,
                )
            generated = out[0, ids.shape[1] :].tolist()
            cut = next((i for i, t in enumerate(generated) if t in stops), None)
            tokens += len(generated) if cut is None else cut + 1
    return tokens


def lines(args: argparse.Namespace) -> list[BenchLine]:
    from llamaduo_nb.config import load_config
    from llamaduo_nb.schemas import load_test_rows
    from llamaduo_nb.student import load_model, sample_batch

    prompts = args.inf_prompts or (4 if args.quick else None)
    rows: list[BenchLine] = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        cfg, layout = demo_run(Path(tmp) / "bench", prompts, "transformers")
        inf = cfg.inference
        print("03, transformers engine ...", flush=True)
        tf_runs = [run_engine(layout, "transformers")]
        gguf_type = inf.llamacpp_gguf.upper()
        print(f"03, llama.cpp engine (first run: merge + GGUF {gguf_type} export) ...", flush=True)
        export_started = time.monotonic()
        cpp = run_engine(layout, "llamacpp")
        export_s = cpp["load_time_s"] - cpp["server_start_s"]  # load time = merge + export + server start
        print("03, llama.cpp engine again (GGUF reused) ...", flush=True)
        cpp_runs = [cpp, run_engine(layout, "llamacpp")]
        print("03, llama.cpp engine on GGUF F16 with an F16 KV cache ...", flush=True)
        cpp_f16 = run_engine(layout, "llamacpp", llamacpp_gguf="f16", llamacpp_kv_cache="f16")
        print("03, llama.cpp engine with the fewest slots (one request at a time) ...", flush=True)
        cpp_one = run_engine(layout, "llamacpp", parallel=1)
        print("03, transformers engine again ...", flush=True)
        tf_runs.append(run_engine(layout, "transformers"))
        del export_started
        tf_rate = statistics.median(r["tokens_per_s"] for r in tf_runs)
        cpp_rate = statistics.median(r["tokens_per_s"] for r in cpp_runs)
        ratio = cpp_rate / tf_rate
        setting = (
            f"{cpp['prompts']} prompts x K={inf.k}, T={inf.temperature}, <= {inf.max_new_tokens} new tokens"
        )
        rows.append(
            BenchLine(
                f"03 on CPU, demo settings ({setting}): llama.cpp vs transformers",
                f"{cpp_rate:.1f} tok/s (llama-server, GGUF {gguf_type}, {cfg.inference.llamacpp_parallel} slots; runs {[r['tokens_per_s'] for r in cpp_runs]})",
                f"{tf_rate:.1f} tok/s (transformers, one batch, shared prompt cache; runs "
                f"{[r['tokens_per_s'] for r in tf_runs]})",
                ratio,
                ">= 3x",
                ratio >= 3,
                details={
                    "transformers": tf_runs,
                    "llamacpp": cpp_runs,
                    "merge_and_export_s": export_s,
                },
            )
        )
        rows.append(
            BenchLine(
                f"03 llama.cpp engine: GGUF {gguf_type} + {inf.llamacpp_kv_cache.upper()} KV cache (the default, "
                "what 06 serves) vs F16 + F16 KV cache",
                f"{cpp_rate:.1f} tok/s",
                f"{cpp_f16['tokens_per_s']:.1f} tok/s (F16 export {cpp_f16['load_time_s'] - cpp_f16['server_start_s']:.1f} s)",
                cpp_rate / cpp_f16["tokens_per_s"],
                "",
                details={"f16": cpp_f16},
            )
        )
        slots, fewest = cpp["llamacpp_parallel"], cpp_one["llamacpp_parallel"]
        # K completions of one prompt need K slots (llama-server's n_cmpl): the fewest a sampled run can have
        alone = "one request at a time, its K completions decoded together" if fewest > 1 else "1 slot"
        rows.append(
            BenchLine(
                f"03 llama.cpp engine: {slots} parallel slots (continuous batching) vs {fewest}",
                f"{cpp_rate:.1f} tok/s ({slots} slots)",
                f"{cpp_one['tokens_per_s']:.1f} tok/s ({fewest} slots: {alone})",
                cpp_rate / cpp_one["tokens_per_s"],
                "",
                details={"one_slot": cpp_one},
            )
        )
        rows.append(
            BenchLine(
                f"03 llama.cpp engine: one-off merge + GGUF {gguf_type} export per cycle",
                f"{export_s:.1f} s",
                f"transformers engine model load {statistics.median(r['load_time_s'] for r in tf_runs):.1f} s",
                None,
                "",
            )
        )

        print(
            f"K-sampling: {K_LOOP_PROMPTS} prompts x K={K_LOOP_K}, shared batch vs naive loop ...", flush=True
        )
        model, tokenizer, _ = load_model(load_config(layout.params_file), layout.adapter_dir(0))
        instructions = [r["instruction"] for r in load_test_rows(layout.test_file)][:K_LOOP_PROMPTS]

        def ours() -> int:
            out = sample_batch(
                model,
                tokenizer,
                instructions,
                k=K_LOOP_K,
                temperature=0.7,
                top_p=0.9,
                max_new_tokens=K_LOOP_TOKENS,
                seed=0,
            )
            return sum(sum(group) for group in out.output_tokens)

        ours_tokens, ours_s, _ = timed(ours)
        naive_tokens, naive_s, _ = timed(
            lambda: naive_k_loop(model, tokenizer, instructions, K_LOOP_K, K_LOOP_TOKENS)
        )
        ours_again, ours_s2, _ = timed(ours)
        ours_rate = statistics.median([ours_tokens / ours_s, ours_again / ours_s2])
        naive_rate = naive_tokens / naive_s
        ratio = ours_rate / naive_rate
        rows.append(
            BenchLine(
                f"K-sampling, transformers ({len(instructions)} prompts x K={K_LOOP_K}, "
                f"<= {K_LOOP_TOKENS} new tokens): one batch vs naive loop",
                f"{ours_rate:.1f} tok/s (sample_batch: one batch, prompt prefilled once per K)",
                f"{naive_rate:.1f} tok/s ({len(instructions) * K_LOOP_K} separate generate calls)",
                ratio,
                ">= 2x",
                ratio >= 2,
                details={
                    "ours": {"tokens": [ours_tokens, ours_again], "seconds": [ours_s, ours_s2]},
                    "naive": {"tokens": naive_tokens, "seconds": naive_s},
                },
            )
        )
    return rows
