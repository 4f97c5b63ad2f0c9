"""The student's answers: K sampled answers per prompt through one of three engines, and `answer_prompts`,
the one answer path used by 03 (the cycle's student) and by 04's Table 1 base-student row (no adapter).

Three engines, chosen by `inference.engine` (`auto`: vLLM when CUDA and `vllm` are importable, else
llama.cpp on a machine without CUDA when `llama_cpp` imports, else transformers):

* **vLLM** (written for GPU users; not executable on the CPU-only development machine): one `generate`
  call over all prompts, each with `SamplingParams(n=K, seed=…)` so the prompt is prefilled once and
  K continuations share its KV blocks; the cycle's adapter is served through a `LoRARequest`.
* **llama.cpp** (CPU default): the cycle's adapter is merged into the base (`merge_adapter`) and
  exported once per adapter as GGUF of type `inference.llamacpp_gguf` (`export_gguf`), to
  `cycle_NN/model-q8_0.gguf` by default (`gguf.cycle_gguf`): Q8_0 is what 06 serves by default, so 04 judges
  the weights that ship, and on CPU it answers 2-3x faster than F16 (half the bytes per weight; int8 AMX
  tiles where the CPU has them). llama.cpp's OpenAI-compatible server (`embedded.LlamaServer`, on
  127.0.0.1) answers through the ServicePool like every other model, so answers are cached and ledgered
  ($0). The server (llama-server) has `inference.llamacpp_parallel` slots (at least K): that many sequences
  are decoded together in one batch (continuous batching), which is where a CPU gets its throughput. The K
  samples of a prompt are ONE request with `n` = K (llama-server's `n_cmpl`): the prompt is prefilled once
  in one slot, its KV cache copied to K-1 more, and the K continuations decoded side by side; the call
  cache keeps the K answers of that request together and replays them together. The sampler chain
  is transformers': temperature and top-p only (`LLAMACPP_SAMPLER`: top_k 0, min_p 0, repeat_penalty 1).
  With `llamacpp_gguf: f16` and `llamacpp_kv_cache: f16`, greedy answers are token-for-token the
  transformers engine's (tested on every prompt of the test run); with the Q8_0 defaults they are the served
  model's, close but not equal. Sampled ones follow the same distribution but not the same random stream:
  llama.cpp draws its own seeds, so a re-run samples anew (the call cache key holds the server's URL, whose
  port changes per start, so it does not replay them either).
* **transformers**: prompts are batched with LEFT padding and `num_return_sequences=K`.
  Hugging Face's `generate` repeats every prompt K times *before* the prefill (checked in transformers
  5.23, `_expand_inputs_for_generation`), so a long prompt is computed K times. With
  `share_prompt_cache: true` the batch's prompts (all but their last token) are run once, the resulting
  KV cache is repeated K times (`DynamicCache.batch_repeat_interleave`) and `generate` continues from it,
  computing only the last prompt token per sequence. Measured on the 2-core development machine (4
  prompts of up to 163 tokens, K=4, 24 new tokens): the same tokens as the plain path, in 59.5 s instead
  of 73.8 s (near-greedy) and 74 s instead of 91 s (sampling, same seed). The saving grows with prompt
  length and K. The LoRA adapter is merged into the base weights first (`merge_adapter`), so decoding
  pays nothing for it. Throughput is set mostly by the number of decoding steps: one batch holding all
  prompts (`batch_size` >= number of test prompts) is the fastest on CPU — for 10 demo prompts, K=2,
  96 new tokens: 36 tokens/s with batch_size 10 against 21-25 with batch_size 4.

Answers are extracted from token ids: the generated part is everything after the (padded) prompt length
of the batch, cut after the first stop token and decoded with `skip_special_tokens=True` — never found
by splitting decoded strings. Sampling is seeded: batch b of the transformers engine uses seed
`inference.seed + b` (batches are formed after sorting prompts by length, so the same test split,
seed and batch size give the same answers); vLLM uses `inference.seed + prompt index` per request.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, InferenceConfig, RunConfig
from ..embedded import LlamaServer, local_server_provider, resolve_model_path
from ..jsonio import read_json
from ..runlayout import RunLayout
from ..schemas import LEDGER_BASELINES, LEDGER_INFERENCE
from ..services import ChatRequest, Choice, ServicePool
from .chat import apply_chat_template_setting, prompt_token_ids, stop_token_ids, student_messages
from .gguf import base_gguf, cycle_gguf
from .loading import load_model, model_revision


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_engine(setting: str) -> str:
    """'vllm', 'llamacpp' or 'transformers' for the `inference.engine` setting.

    `auto` is vLLM exactly when CUDA is present and `vllm` imports; on a machine without CUDA it is
    llama.cpp when `llama_cpp` imports (measured in `make bench`: several times transformers' tokens/s on
    CPU), else transformers.
    """
    import torch

    has_cuda = torch.cuda.is_available()
    if setting == "transformers":
        return setting
    if setting == "llamacpp":
        if not _importable("llama_cpp"):
            raise ConfigError(
                "inference.engine: 'llamacpp' needs llama-cpp-python (pip install llama-cpp-python); "
                "use engine: auto or transformers"
            )
        return setting
    has_vllm = has_cuda and _importable("vllm")
    if setting == "vllm" and not has_vllm:
        missing = "a CUDA GPU" if not has_cuda else "the vllm package (pip install 'llamaduo-nb[gpu]')"
        raise ConfigError(f"inference.engine: 'vllm' needs {missing}; use engine: auto or transformers")
    if has_vllm:
        return "vllm"
    return "llamacpp" if not has_cuda and _importable("llama_cpp") else "transformers"


# --------------------------------------------------------------------------- transformers engine


@dataclass
class BatchOutput:
    """One `generate` call: B prompts x K samples."""

    prompt_ids: Any  # LongTensor [B, L], left padded
    attention_mask: Any  # [B, L]
    sequences: Any  # LongTensor [B*K, L + T]; rows b*K .. b*K+K-1 belong to prompt b
    candidates: list[list[str]]  # [B][K]
    output_tokens: list[list[int]]  # generated tokens up to and including the stop token
    finish_reasons: list[list[str]]  # "stop" or "length"

    @property
    def prompt_length(self) -> int:
        return int(self.prompt_ids.shape[1])


def sample_batch(
    model: Any,
    tokenizer: Any,
    instructions: list[str],
    *,
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    share_prompt_cache: bool = True,
    systems: list[str | None] | None = None,
) -> BatchOutput:
    """K answers to each instruction from one left-padded batch; temperature 0 means greedy (K equal copies)."""
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    encoded = tokenizer.pad(
        {
            "input_ids": [
                prompt_token_ids(tokenizer, text, system)
                for text, system in zip(instructions, systems or [None] * len(instructions), strict=True)
            ]
        },
        padding=True,
        return_tensors="pt",
    )
    ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    greedy = temperature == 0
    n_return = 1 if greedy else k
    stops = stop_token_ids(model, tokenizer)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "num_return_sequences": n_return,
        "eos_token_id": stops,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if greedy:
        kwargs["do_sample"] = False
    else:
        # top_k=0 switches off transformers' default top-k of 50, so the sampling is what the params say
        # (and what vLLM, whose default has no top-k, does).
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    torch.manual_seed(seed)
    with torch.inference_mode():
        if share_prompt_cache and ids.shape[1] > 1:
            cache = DynamicCache(config=model.config)
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            model(
                input_ids=ids[:, :-1],
                attention_mask=mask[:, :-1],
                position_ids=positions[:, :-1],
                cache=cache,
                use_cache=True,
            )
            if n_return > 1:
                cache.batch_repeat_interleave(n_return)
            kwargs["cache"] = cache
        sequences = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    if greedy and k > 1:
        sequences = sequences.repeat_interleave(k, dim=0)
    candidates, lengths, reasons = decode_samples(tokenizer, sequences, ids.shape[1], k, stops)
    return BatchOutput(ids, mask, sequences, candidates, lengths, reasons)


def decode_samples(
    tokenizer: Any, sequences: Any, prompt_length: int, k: int, stops: list[int]
) -> tuple[list[list[str]], list[list[int]], list[list[str]]]:
    """Slice every sequence after the prompt, cut after the first stop token, decode without special tokens."""
    stop_set = set(stops)
    candidates, lengths, reasons = [], [], []
    for row in range(0, sequences.shape[0], k):
        texts, ns, why = [], [], []
        for seq in sequences[row : row + k]:
            generated = seq[prompt_length:].tolist()
            cut = next((i for i, token in enumerate(generated) if token in stop_set), None)
            n = len(generated) if cut is None else cut + 1
            texts.append(tokenizer.decode(generated[:n], skip_special_tokens=True).strip())
            ns.append(n)
            why.append("length" if cut is None else "stop")
        candidates.append(texts)
        lengths.append(ns)
        reasons.append(why)
    return candidates, lengths, reasons


@dataclass
class Sample:
    text: str
    output_tokens: int
    finish_reason: str
    seed: int


def _generate_transformers(
    inf: InferenceConfig, model: Any, tokenizer: Any, rows: list[dict], progress: bool = True
) -> tuple[list[list[Sample]], dict[str, Any]]:
    from tqdm.auto import tqdm

    prompt_lengths = [len(prompt_token_ids(tokenizer, row["instruction"], row.get("system"))) for row in rows]
    # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows up at once.
    order = sorted(range(len(rows)), key=lambda i: (-prompt_lengths[i], i))
    batches = [order[i : i + inf.batch_size] for i in range(0, len(order), inf.batch_size)]
    samples: list[list[Sample]] = [[] for _ in rows]
    padded_prompt_tokens = 0
    bar = tqdm(
        batches, desc=f"generate ({len(rows)} prompts x K={inf.k})", unit="batch", disable=not progress
    )
    for b, batch in enumerate(bar):
        seed = inf.seed + b
        out = sample_batch(
            model,
            tokenizer,
            [rows[i]["instruction"] for i in batch],
            systems=[rows[i].get("system") for i in batch],
            k=inf.k,
            temperature=inf.temperature,
            top_p=inf.top_p,
            max_new_tokens=inf.max_new_tokens,
            seed=seed,
            share_prompt_cache=inf.share_prompt_cache,
        )
        padded_prompt_tokens += out.prompt_length * len(batch)
        for j, i in enumerate(batch):
            samples[i] = [
                Sample(text, n, why, seed)
                for text, n, why in zip(
                    out.candidates[j], out.output_tokens[j], out.finish_reasons[j], strict=True
                )
            ]
        bar.set_postfix(tokens=sum(s.output_tokens for group in samples for s in group))
    prompt_tokens = sum(prompt_lengths)
    prefill_factor = 1 if inf.share_prompt_cache or inf.temperature == 0 else inf.k
    info = {
        "batches": len(batches),
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_computed": prompt_tokens * prefill_factor,
        "padded_prompt_tokens": padded_prompt_tokens,
    }
    return samples, info


# --------------------------------------------------------------------------- vLLM engine (GPU users)


def _vllm_max_lora_rank(adapter_dir: Path) -> int:
    rank = int(read_json(adapter_dir / "adapter_config.json").get("r", 8))
    return next(size for size in (8, 16, 32, 64, 128, 256, 320, 512) if size >= rank)


def _generate_vllm(
    cfg: RunConfig, rows: list[dict], model_path: str, adapter_dir: Path | None, label: str
) -> tuple[list[list[Sample]], dict[str, Any]]:
    """All prompts in one vLLM call; n=K per request so each prompt is prefilled once. Without an adapter
    (Table 1's base student) the base model answers with the tokenizer 02 would train it with."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    inf = cfg.inference
    if adapter_dir is not None:
        tokenizer_path = str(adapter_dir)
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    else:
        tokenizer_path = model_path
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=cfg.student.revision)
        apply_chat_template_setting(tokenizer, cfg.student, model_path)
    lora = {"enable_lora": True, "max_lora_rank": _vllm_max_lora_rank(adapter_dir)} if adapter_dir else {}
    llm = LLM(
        model=model_path,
        tokenizer=tokenizer_path,
        revision=cfg.student.revision,
        trust_remote_code=cfg.student.trust_remote_code,
        seed=inf.seed,
        **lora,
        tensor_parallel_size=inf.tensor_parallel_size,
        pipeline_parallel_size=inf.pipeline_parallel_size,
        gpu_memory_utilization=inf.gpu_memory_utilization,
    )
    greedy = inf.temperature == 0
    prompts = [
        {"prompt_token_ids": prompt_token_ids(tokenizer, row["instruction"], row.get("system"))}
        for row in rows
    ]
    params = [
        SamplingParams(
            n=1 if greedy else inf.k,
            temperature=inf.temperature,
            top_p=inf.top_p,
            max_tokens=inf.max_new_tokens,
            seed=inf.seed + i,
        )
        for i in range(len(rows))
    ]
    lora_request = LoRARequest(label, 1, str(adapter_dir)) if adapter_dir is not None else None
    outputs = llm.generate(prompts, params, lora_request=lora_request)
    samples = []
    for i, output in enumerate(outputs):
        group = [
            Sample(
                tokenizer.decode(list(c.token_ids), skip_special_tokens=True).strip(),
                len(c.token_ids),
                "stop" if c.finish_reason == "stop" else "length",
                inf.seed + i,
            )
            for c in output.outputs
        ]
        samples.append(group * inf.k if greedy else group)
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    return samples, {"batches": 1, "prompt_tokens": prompt_tokens, "prompt_tokens_computed": prompt_tokens}


# --------------------------------------------------------------------------- llama.cpp engine (CPU)


# The sampler chain every llama.cpp request gets: only temperature and top-p act, as in transformers with
# `top_k=0` (what `sample_batch` passes) and vLLM's defaults. llama.cpp would otherwise add top_k 40 and
# min_p 0.05 (`embedded.NEUTRAL_SAMPLING_ARGS` starts the server with these neutral values).
LLAMACPP_SAMPLER = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


def llamacpp_requests(inf: InferenceConfig, rows: Sequence[dict]) -> list[Any]:
    """03's requests to the llama.cpp server: one per prompt, asking for its K samples at once (`n` = K, one
    prefill); greedy: one answer per prompt (copied K times by the caller)."""
    greedy = inf.temperature == 0
    return [
        ChatRequest(
            messages=student_messages(row["instruction"], row.get("system")),
            temperature=inf.temperature,
            top_p=None if greedy else inf.top_p,
            max_tokens=inf.max_new_tokens,
            allow_truncated=True,  # an answer cut at max_new_tokens is kept, as transformers' is
            n=1 if greedy else inf.k,
        )
        for row in rows
    ]


def _generate_llamacpp(
    cfg: RunConfig,
    layout: RunLayout,
    rows: list[dict],
    gguf: Path,
    marker: Path,
    label: str,
    cycle: int | None,
    progress: bool = True,
) -> tuple[list[list[Sample]], dict[str, Any]]:
    """K answers per prompt from llama.cpp's server on 127.0.0.1, through the ServicePool (cache + ledger).

    Sampled: one request per prompt with `n` = K. llama-server prefills the prompt once in one slot, copies
    its KV cache to K-1 free slots and decodes the K continuations there, together with the other requests'
    sequences (so the server has at least K slots, and slots // K requests are in flight). The K answers come
    back, are cached and replay as one call; each sample keeps its own token count and stop reason.
    Greedy: one request per prompt on an `exact` one-slot server. The served model's name carries the GGUF's
    hash, so the ledger tells exports apart.
    """
    inf = cfg.inference
    greedy = inf.temperature == 0
    n_per_prompt = 1 if greedy else inf.k
    threads = inf.llamacpp_threads or os.cpu_count() or 1
    # greedy output is promised to equal transformers' token for token: the server runs `exact` (one slot);
    # sampled: llama-server refuses n_cmpl above its slot count
    wanted = min(inf.llamacpp_parallel, len(rows) * n_per_prompt)
    slots = 1 if greedy else max(n_per_prompt, wanted)
    in_flight = max(1, slots // n_per_prompt)  # requests, each holding n_per_prompt slots
    gguf_sha = read_json(marker)["gguf_sha256"]
    requests = llamacpp_requests(inf, rows)
    stage = LEDGER_INFERENCE if cycle is not None else LEDGER_BASELINES
    n_ctx = max(2048, inf.max_new_tokens + 1024)
    if not greedy:
        # each slot holds one prompt and its answer: a prompt has at most as many tokens as UTF-8 bytes (every
        # token but a special one is at least a byte), the chat template adds fewer than 512; so many slots
        # fit in memory (the KV cache is ~23 KB a token for a 135M model)
        longest = max(sum(len(m["content"].encode()) for m in r.messages) for r in requests)
        n_ctx = min(n_ctx, -(-(longest + 512 + inf.max_new_tokens) // 256) * 256)
    server_started = time.monotonic()
    with LlamaServer(
        gguf,
        n_ctx=n_ctx,
        n_threads=threads,
        parallel=slots,
        exact=greedy,
        log_file=layout.logs_dir / f"llama_server_03_{label}.log",
        model_alias=gguf.stem,
        kv_cache=inf.llamacpp_kv_cache,
    ) as server:
        server_start_s = time.monotonic() - server_started  # loading the model, like transformers' load
        model = f"{cfg.run_name}-{label}-{inf.llamacpp_gguf}-kv_{inf.llamacpp_kv_cache}-{gguf_sha[:12]}"
        provider = local_server_provider("student_llamacpp", model, server.base_url, slots=in_flight)
        run_cfg = dataclasses.replace(cfg, providers=[*cfg.providers, provider])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="no price for model")  # the local student costs $0
            with ServicePool(run_cfg, layout, stage, cycle, providers=[provider.name]) as pool:
                results = pool.complete_many(
                    provider.name, requests, desc=f"generate, llama.cpp ({len(rows)} prompts x K={inf.k})"
                )
    # an empty answer is a (poor) sample like any other, as it is from transformers; anything else stops 03
    failed = [
        (i, r.error) for i, r in enumerate(results) if r.error and not r.error.startswith("empty reply")
    ]
    if failed:
        i, error = failed[0]
        raise RuntimeError(
            f"llama.cpp answered {len(failed)} of {len(results)} requests with an error (first: prompt "
            f"{rows[i]['id']}: {error}); server log: {layout.logs_dir}"
        )
    samples: list[list[Sample]] = []
    for result in results:
        # one completion per request when greedy (or K = 1), else the request's K choices
        completions = result.choices or [Choice(result.text, result.output_tokens, result.finish_reason)]
        if len(completions) != n_per_prompt:
            raise RuntimeError(
                f"llama.cpp returned {len(completions)} answers for one prompt, not {n_per_prompt}"
            )
        group = []
        for c in completions:
            # llama-server counts the stop token it ended on, as transformers' rows do; a reply replayed from
            # an older cache has no finish reason, and one that stopped before the limit did so on a stop token
            if c.finish_reason is not None:
                stopped = c.finish_reason == "stop"
            else:
                stopped = c.output_tokens < inf.max_new_tokens
            group.append(
                Sample(
                    c.text.strip(),
                    c.output_tokens,
                    "stop" if stopped else "length",
                    -1,  # llama.cpp seeds its sampler itself (recorded as sample_seed None)
                )
            )
        samples.append(group * inf.k if greedy else group)
    prompt_tokens = sum(r.input_tokens for r in results)
    return samples, {
        "batches": len(requests),
        "prompt_tokens": prompt_tokens,
        # one prefill per prompt (less the prefix a slot still holds from its last prompt)
        "prompt_tokens_computed": prompt_tokens,
        "completions_per_request": n_per_prompt,
        "cached_calls": sum(r.cached for r in results),
        "llamacpp_threads": threads,
        "llamacpp_parallel": slots,
        "gguf": str(gguf),
        "gguf_type": inf.llamacpp_gguf,
        "kv_cache": inf.llamacpp_kv_cache,
        "server_start_s": round(server_start_s, 2),
    }


# --------------------------------------------------------------------------- the answer path


def generation_params(inf: InferenceConfig, engine: str) -> dict[str, Any]:
    """The sampler settings (and llama.cpp's GGUF and KV-cache types) recorded with every answer; every engine
    samples with temperature and top-p only (top_k 0, min_p 0, no repetition penalty)."""
    return {
        "engine": engine,
        "k": inf.k,
        "temperature": inf.temperature,
        "top_p": inf.top_p,
        "do_sample": inf.temperature > 0,
        "max_new_tokens": inf.max_new_tokens,
        "seed": inf.seed,
        "batch_size": inf.batch_size if engine == "transformers" else None,
        # the llama.cpp engine answers with quantized weights and KV cache; the others with the model's dtype
        "gguf_type": inf.llamacpp_gguf if engine == "llamacpp" else None,
        "kv_cache": inf.llamacpp_kv_cache if engine == "llamacpp" else None,
        **LLAMACPP_SAMPLER,
    }


def answer_prompts(
    cfg: RunConfig, layout: RunLayout, rows: list[dict], cycle: int | None, progress: bool = True
) -> tuple[list[dict], dict[str, Any]]:
    """K answers per prompt from the student of `cycle` (its adapter), or before fine-tuning when `cycle`
    is None (Table 1's base-student row), through 03's engine: (response rows, summary). The one answer
    path of the student, so the base row and the cycles' rows come from the same engine and sampler."""
    import torch

    inf = cfg.inference
    adapter_dir = layout.adapter_dir(cycle) if cycle is not None else None
    label = f"cycle_{cycle:02d}" if cycle is not None else "base_student"
    engine = resolve_engine(inf.engine)
    started = time.monotonic()
    if engine == "vllm":
        model_path = resolve_model_path(cfg.student.model_id)
        load_s = 0.0
        gen_started, cpu_started = time.monotonic(), time.process_time()
        samples, info = _generate_vllm(cfg, rows, model_path, adapter_dir, label)
        merged = False
    elif engine == "llamacpp":
        model_path = resolve_model_path(cfg.student.model_id)
        if cycle is not None:
            gguf, built = cycle_gguf(cfg, layout, cycle, progress)
            marker = layout.cycle_gguf_marker(cycle, inf.llamacpp_gguf)
        else:
            gguf, marker = base_gguf(cfg, layout)
            built = None
        load_s = time.monotonic() - started
        gen_started, cpu_started = time.monotonic(), time.process_time()
        samples, info = _generate_llamacpp(cfg, layout, rows, gguf, marker, label, cycle, progress)
        info["gguf_built_now"] = built
        merged = cycle is not None
    else:
        model, tokenizer, model_path = load_model(cfg, adapter_dir, merge=inf.merge_adapter)
        load_s = time.monotonic() - started
        gen_started, cpu_started = time.monotonic(), time.process_time()
        samples, info = _generate_transformers(inf, model, tokenizer, rows, progress)
        merged = inf.merge_adapter and adapter_dir is not None
    gen_s = time.monotonic() - gen_started
    cpu_s = time.process_time() - cpu_started
    if engine == "llamacpp":  # the server's start loads the model: load time, as transformers' load is
        load_s += info["server_start_s"]
        gen_s -= info["server_start_s"]
    revision = model_revision(cfg.student, model_path)
    adapter = _relative(adapter_dir, layout.root) if adapter_dir is not None else None
    base_params = generation_params(inf, engine)
    responses = []
    for row, group in zip(rows, samples, strict=True):
        for index, sample in enumerate(group):
            responses.append(
                {
                    "prompt_id": row["id"],
                    "instruction": row["instruction"],
                    "reference": row["response"],
                    "candidate": sample.text,
                    "sample_index": index,
                    "category": row.get("category") or "",
                    "model_id": cfg.student.model_id,
                    "model_revision": revision,
                    "adapter": adapter,
                    "output_tokens": sample.output_tokens,
                    "finish_reason": sample.finish_reason,
                    "generation": {
                        **base_params,
                        "sample_seed": sample.seed if sample.seed >= 0 else None,
                    },
                }
            )
    tokens = sum(r["output_tokens"] for r in responses)
    summary = {
        "cycle": cycle,
        "engine": engine,
        "model_id": cfg.student.model_id,
        "model_path": model_path,
        "model_revision": revision,
        "adapter": adapter,
        "adapter_merged": merged,
        "share_prompt_cache": inf.share_prompt_cache if engine == "transformers" else True,
        "prompts": len(rows),
        "k": inf.k,
        "rows": len(responses),
        "tokens_generated": tokens,
        **info,
        "finish_reasons": dict(Counter(r["finish_reason"] for r in responses)),
        "load_time_s": round(load_s, 2),
        "wall_time_s": round(gen_s, 2),
        "cpu_time_s": round(cpu_s, 2),
        "tokens_per_s": round(tokens / gen_s, 2) if gen_s > 0 else None,
        "torch_threads": torch.get_num_threads(),
        "generation": base_params,
    }
    return responses, summary


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)
