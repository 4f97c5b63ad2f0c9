"""Run configuration: `params/*.yaml` -> frozen, validated dataclasses.

Every setting of a run lives in one YAML file with one section per stage. Loading is strict: an
unknown key, a value of the wrong type or an impossible value raises `ConfigError`, which names the
file and the dotted key and shows a valid example of that section. `NON_SEMANTIC_KEYS` lists the settings a
`--resume` may change without --accept-changed-params (budgets, retries, rate limits, timeouts).

It stays one module (~930 lines): it is the params reference, one dataclass per YAML section in file order,
each with its checks beside its fields, so a reader finds every key of a run in one place.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .jsonio import atomic_write
from .prices import PriceError, load_prices


class ConfigError(ValueError):
    """A params file or a notebook parameter is wrong; the message says where and shows a right example."""


# Non-semantic settings: they change how much a run may spend, how fast it calls and how often it retries, never
# what a stage asks or what its results mean. `llamaduo run --resume` accepts a change to them without
# --accept-changed-params (e.g. a budget raised after a stage stopped at it); the change is recorded like any
# other. Every other key is semantic: changing it on --resume needs --accept-changed-params. Dotted keys as
# `runner.diff_params` names them (a provider by its name: `providers.<name>.<field>`); `*` is any name.
NON_SEMANTIC_KEYS = (
    "budget.*",  # run_usd, cycle_usd, stage_usd, run_tokens, cycle_tokens, stage_tokens
    "providers.*.max_retries",
    "providers.*.unusable_retries",
    "providers.*.timeout_s",
    "providers.*.rpm",
    "providers.*.tpm",
    "providers.*.max_concurrency",
    "providers.*.failure_window",
    "providers.*.max_failure_share",
    "providers.*.batch_poll_s",
    "providers.*.api_key_env",
)


def is_non_semantic(key: str) -> bool:
    """Whether the dotted params key `key` is listed in `NON_SEMANTIC_KEYS`."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in NON_SEMANTIC_KEYS)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ProviderConfig:
    """One service LLM endpoint. `kind` picks the SDK; `embedded` starts the offline llama.cpp server."""

    name: str
    kind: Literal["openai", "openai_compatible", "anthropic", "google", "embedded"]
    model: str
    base_url: str | None = None  # for openai_compatible (vLLM, Ollama, llama.cpp server)
    api_key_env: str | None = None  # name of the environment variable holding the key; never the key itself
    rpm: int = 60  # requests per minute
    tpm: int = 200_000  # tokens per minute (input + output estimate)
    max_concurrency: int | None = None  # hard cap on calls in flight; default: sized from rate x latency
    timeout_s: float = 120.0
    max_retries: int = 5
    json_mode: Literal["schema", "object", "none"] = "schema"  # how to ask for structured output
    # true only for an endpoint you run yourself (vLLM, Ollama, llama.cpp on your machine): its calls cost $0 and
    # its model needs no price. `embedded` is always free; every other provider needs a price in prices_file.
    free: bool = False
    # fail fast: when more than `max_failure_share` of the last `failure_window` real calls failed (errors after
    # retries, unusable replies), the stage stops; so it does when the last min(failure_window, 3) calls, or every
    # call so far, failed for a provider-side cause (rate limit, 5xx, timeouts: a dead provider, whatever the
    # stage's size); auth, quota and model-not-found errors stop it at once. max_failure_share: 1 switches off both
    failure_window: int = 20
    max_failure_share: float = 0.5
    unusable_retries: int = 1  # empty, refused or blocked replies are re-sent this often (never cached)
    # the first call goes out alone and the others wait for its outcome (a revoked key costs one call, not
    # max_concurrency). The embedded server and the llama-servers 03 and 06 start are checked by their start
    # (they answer /v1/models first) and skip it: a lone first answer of up to max_tokens held the rest back
    probe_first_call: bool = True
    # reasoning models: OpenAI o-series / gpt-5 `reasoning_effort`; Anthropic extended thinking and Gemini 2.5
    # `thinking_budget` (tokens). The answer keeps its own max_tokens: the thinking budget is added on top.
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    thinking_budget: int | None = None
    # provider batch API (OpenAI Batch, Anthropic Message Batches, Gemini batch mode): a stage's uncached calls
    # to this provider go out as one batch at the batch price (params/prices.yaml batch_discount, half price
    # today) and come back within the provider's window (up to 24 h); the stage polls every batch_poll_s seconds
    batch: bool = False
    batch_poll_s: float = 30.0

    EXAMPLE = "name: gpt4o\nkind: openai\nmodel: gpt-4o-2024-08-06\napi_key_env: OPENAI_API_KEY\nrpm: 500"

    @property
    def is_free(self) -> bool:
        """Calls cost $0: the embedded server, or a self-hosted endpoint declared `free: true`."""
        return self.kind == "embedded" or self.free

    def validate(self) -> None:
        _check(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None, "name", "letters, digits, _ . - only")
        _check(
            self.kind != "openai_compatible" or bool(self.base_url),
            "base_url",
            "required for openai_compatible",
        )
        _check(self.rpm >= 1, "rpm", "must be >= 1")
        _check(self.tpm >= 1, "tpm", "must be >= 1")
        _check(
            self.max_concurrency is None or self.max_concurrency >= 1,
            "max_concurrency",
            "must be >= 1 or null",
        )
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")
        _check(self.max_retries >= 0, "max_retries", "must be >= 0")
        _check(self.failure_window >= 1, "failure_window", "must be >= 1, e.g. 20")
        _check(0 < self.max_failure_share <= 1, "max_failure_share", "must lie in (0, 1], e.g. 0.5")
        _check(self.unusable_retries >= 0, "unusable_retries", "must be >= 0")
        _check(
            self.thinking_budget is None or self.thinking_budget >= 0,
            "thinking_budget",
            "tokens the model may think, >= 0 (0: no thinking where the model allows it), or null",
        )
        _check(
            not (self.free and self.kind in ("openai", "anthropic", "google")),
            "free",
            f"{self.kind} is a paid API; only openai_compatible endpoints you host can be free",
        )
        _check(
            not self.batch or self.kind in ("openai", "anthropic", "google"),
            "batch",
            f"only the openai, anthropic and google APIs have batch modes, not {self.kind}",
        )
        _check(self.batch_poll_s > 0, "batch_poll_s", "seconds between status checks, > 0, e.g. 30")
        if self.api_key_env is not None:
            _check(
                re.fullmatch(r"[A-Z_][A-Z0-9_]*", self.api_key_env) is not None,
                "api_key_env",
                "the NAME of an environment variable (e.g. OPENAI_API_KEY), never a key",
            )


@dataclass(frozen=True)
class GivenSplits:
    """Which split of the source dataset is the train split and which the test split."""

    train: str = "train"
    test: str = "test"

    EXAMPLE = "train: train\ntest: test"

    def validate(self) -> None:
        _check(self.train != self.test, "test", f"must differ from train ({self.train!r})")


@dataclass(frozen=True)
class CoverageConfig:
    source: str  # local path (JSONL, JSON array, CSV, Parquet, HF save_to_disk folder) or a hub name
    format: Literal["auto", "jsonl", "json", "csv", "parquet", "hf_disk", "hub"] = "auto"
    # the one split to read of a hub / save_to_disk dataset (ignored when `splits` is set); null: a dataset
    # of one split is read whole, one of several is an error naming them (never one split in silence)
    hub_split: str | None = None
    hub_subset: str | None = None
    categories: list[str] | None = None  # keep only these categories (None: all)
    train_ratio: float = 0.8  # Phi: share of rows going to the train split (unused when `splits` is set)
    stratify_by: str | None = "category"
    # Take the dataset's own train/test splits instead of re-splitting by Phi: the names of the two splits
    # of a hub / save_to_disk dataset, or the two values of `split_column` in a JSONL/CSV file.
    splits: GivenSplits | None = None
    split_column: str | None = None  # JSONL/CSV column holding each row's split (with `splits`)
    strictness: Literal["strict", "lenient"] = (
        "strict"  # strict: first bad row is an error; lenient: skip + report
    )
    max_chars: int = 16_000  # rows whose prompt+response exceed this are "over-long"
    max_rows: int | None = None  # cap after validation (tiny test configs)
    curation_file: str | None = (
        None  # decisions saved by the curation widget (default: <run>/coverage/curation.json)
    )

    EXAMPLE = (
        "source: data/sample_coverage.jsonl\ntrain_ratio: 0.8\nstratify_by: category\nstrictness: strict"
    )

    def validate(self) -> None:
        _check(0.0 < self.train_ratio < 1.0, "train_ratio", "Phi must lie strictly between 0 and 1, e.g. 0.8")
        _check(self.max_chars > 0, "max_chars", "must be > 0")
        _check(self.max_rows is None or self.max_rows >= 2, "max_rows", "must be >= 2 (one train, one test)")
        _check(bool(self.source), "source", "must name a file, folder or hub dataset")
        _check(
            self.split_column is None or self.splits is not None,
            "split_column",
            "only used with splits, e.g. splits: {train: train, test: test}",
        )


@dataclass(frozen=True)
class StudentConfig:
    model_id: str = "embedded:smollm2"  # HF hub id, local folder, or embedded:smollm2 (offline default)
    revision: str | None = None
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    # torch CPU threads for fine-tuning and inference (null: torch's default, one per core). When other work
    # keeps the cores busy, 1 can be several times faster: a 2-thread matmul waits for a preempted thread.
    cpu_threads: int | None = None
    # Chat template for a checkpoint that has none (a base model such as google/gemma-7b), or to replace
    # its own: a preset name (chatml, gemma) or a Jinja string. null: the checkpoint's template, if any.
    chat_template: str | None = None

    EXAMPLE = "model_id: google/gemma-7b\nrevision: main\ntorch_dtype: bfloat16\nchat_template: gemma"

    def validate(self) -> None:
        _check(bool(self.model_id), "model_id", "name a hub id, a local folder or embedded:smollm2")
        _check(self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads", "must be >= 1 or null")
        _check(
            self.chat_template is None
            or self.chat_template in CHAT_TEMPLATE_PRESETS
            or "{%" in self.chat_template
            or "{{" in self.chat_template,
            "chat_template",
            f"a preset ({', '.join(CHAT_TEMPLATE_PRESETS)}) or a Jinja template string, e.g. chatml",
        )


# Presets for `student.chat_template`; the templates themselves live in student.chat.CHAT_TEMPLATES.
CHAT_TEMPLATE_PRESETS = ("chatml", "gemma")
REPORT_TO = ("none", "tensorboard", "trackio", "mlflow", "wandb")


@dataclass(frozen=True)
class FinetuneConfig:
    lora_r: int | None = None  # None: Table 5 schedule by data volume
    lora_alpha: int | None = None  # None: Table 5 schedule (2 x rank)
    lora_dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    quantization: Literal["auto", "none", "4bit"] = "auto"  # auto: QLoRA 4-bit when CUDA is present
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    num_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_epochs
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    # Where cycle t >= 1 starts (eq. 1 of the paper fine-tunes pi(t) from pi(t-1)):
    #   base              a fresh LoRA on the base model each cycle, trained on all data so far (default)
    #   previous_adapter  keep training cycle t-1's adapter (its rank stays; no Table-5 rank change)
    #   previous_merged   cycle t-1's adapter merged into the base, then a fresh LoRA of this cycle's rank;
    #                     the saved adapter stacks both, so it still loads on the plain base
    start_from: Literal["base", "previous_adapter", "previous_merged"] = "base"
    report_to: list[str] | str = "none"  # experiment tracking: none, tensorboard, trackio, mlflow, wandb
    # > 1: the runner starts 02 with `accelerate launch`, DDP: one process per GPU, or without CUDA that many
    # CPU processes over gloo (the cores split between them)
    num_processes: int = 1
    accelerate_config: str | None = None  # accelerate config file (DeepSpeed ZeRO / FSDP / multi-node)
    logging_steps: int = 5
    seed: int = 42
    save_steps: int = 50  # checkpoint every N optimizer steps into cycle_NN/checkpoints/ (0: none)
    save_total_limit: int = 2  # keep the last N checkpoints (a re-run resumes from the newest)
    # Padding-free batches: a batch's rows are concatenated into one sequence (position_ids restart per
    # row, attention stays within a row), so no step computes pad tokens; same per-token loss as padding.
    padding_free: bool = True

    EXAMPLE = "lora_r: null  # Table 5 schedule\nlearning_rate: 2.0e-4\nnum_epochs: 1\nmax_length: 1024"

    def validate(self) -> None:
        _check(self.lora_r is None or self.lora_r >= 1, "lora_r", "must be >= 1 or null")
        _check(self.lora_alpha is None or self.lora_alpha >= 1, "lora_alpha", "must be >= 1 or null")
        _check(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must lie in [0, 1)")
        _check(self.learning_rate > 0, "learning_rate", "must be > 0")
        _check(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must lie in [0, 1)")
        _check(self.num_epochs > 0, "num_epochs", "must be > 0")
        _check(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "-1 (use epochs) or >= 1")
        _check(self.per_device_batch_size >= 1, "per_device_batch_size", "must be >= 1")
        _check(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        _check(self.max_length >= 16, "max_length", "must be >= 16")
        _check(self.save_steps >= 0, "save_steps", "must be >= 0 (0: no checkpoints), e.g. 50")
        _check(self.save_total_limit >= 1, "save_total_limit", "must be >= 1, e.g. 2")
        trackers = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        for name in trackers:
            _check(name in REPORT_TO, "report_to", f"{name!r} is not one of {list(REPORT_TO)}")
        _check(
            "none" not in trackers or len(trackers) == 1,
            "report_to",
            "'none' cannot be combined with trackers",
        )
        _check(
            self.num_processes >= 1,
            "num_processes",
            "must be >= 1 (training processes: one per GPU, or CPU processes; e.g. 2)",
        )


KV_CACHE_TYPES = ("q8_0", "f16")  # llama-server's KV cache types this project offers (`embedded.LlamaServer`)


@dataclass(frozen=True)
class InferenceConfig:
    # auto: vLLM when CUDA + vllm, else llama.cpp (GGUF of the merged cycle weights) when it imports,
    # else transformers
    engine: Literal["auto", "vllm", "transformers", "llamacpp"] = "auto"
    k: int = 4  # K: sampled answers per test prompt
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    batch_size: int = 4  # prompts per generate() call (each expands to K sequences)
    seed: int = 1234
    merge_adapter: bool = True  # transformers engine: fold the LoRA weights into the base first
    share_prompt_cache: bool = True  # transformers engine: prefill each prompt once, reuse it for K samples
    tensor_parallel_size: int = 1  # vLLM: GPUs one model is split across (03 and serve_vllm.sh)
    pipeline_parallel_size: int = 1  # vLLM: pipeline stages (x tensor_parallel_size GPUs; nodes via Ray)
    gpu_memory_utilization: float = 0.9  # vLLM: share of each GPU's memory it may take
    llamacpp_threads: int = 0  # llama.cpp engine: CPU threads of the server (0: all cores)
    llamacpp_parallel: int = 8  # llama.cpp engine: server slots decoded together (sampled runs; greedy: 1)
    # llama.cpp engine: the GGUF type 03 exports and answers with. q8_0 is what 06 serves by default (04 judges
    # the weights that ship) and 2-3x f16's tokens/s on CPU; f16 answers greedy prompts as transformers does
    llamacpp_gguf: Literal["q8_0", "f16"] = "q8_0"
    # llama.cpp engine: the type of the attention keys/values each slot keeps (06's served endpoint uses the
    # same). q8_0 measured 1.16-1.31x f16's tokens/s on 03's demo workload; f16 for greedy answers as
    # transformers gives them
    llamacpp_kv_cache: Literal[KV_CACHE_TYPES] = "q8_0"

    EXAMPLE = "engine: auto\nk: 4\ntemperature: 0.7\ntop_p: 0.9\nmax_new_tokens: 512"

    def validate(self) -> None:
        _check(self.k >= 1, "k", "K must be >= 1, e.g. 4")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must lie in (0, 1]")
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(self.llamacpp_parallel >= 1, "llamacpp_parallel", "must be >= 1, e.g. 8")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1, e.g. 2")
        _check(self.pipeline_parallel_size >= 1, "pipeline_parallel_size", "must be >= 1, e.g. 1")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must lie in (0, 1], e.g. 0.9")


METRIC_JUDGE_NAMES = ("rougeL", "chrF", "exact_match")  # reserved: reference-metric judges, never providers
_STATISTIC = re.compile(r"mean|coverage@\d+(\.\d+)?")


@dataclass(frozen=True)
class EvaluateConfig:
    """How 04 judges and decides.

    Two kinds of judges, declared apart so a paid one is never confused with a free one:
    `judges` are service LLMs (provider names, M calls per answer); `metric_judges` are reference metrics
    computed offline for free (rougeL, chrF, exact_match; M = 1). Both become Table-1 columns.

    The decision (paper eq. 9: synthesize again when V < epsilon or C@zeta < epsilon): for every
    statistic in `decision_statistic` and every metric of `decision_metric`, the value over
    `decision_judges` (default: all judges) must reach `epsilon`. `judge_aggregation`: `mean` averages the
    judges, `strictest` takes the lowest, `each` needs every judge to pass on its own. With
    `require_lower_bound` the lower end of the 95% cluster-bootstrap interval must reach epsilon.
    """

    judges: list[str] = field(default_factory=list)  # LLM judges: provider names (see `providers`)
    metric_judges: list[str] = field(
        default_factory=list
    )  # free reference metrics: rougeL, chrF, exact_match
    label_categories: list[str] = field(
        default_factory=lambda: ["Classification"]
    )  # categories exact_match scores (label accuracy)
    m: int = 10  # M: judgments per (prompt, sample) per LLM judge
    zetas: list[float] = field(default_factory=lambda: [50.0, 70.0])  # coverage thresholds C@zeta
    epsilon: float = 70.0  # pass threshold on the decision statistic(s)
    decision_metric: Literal["precision", "similarity", "both"] = "precision"
    decision_statistic: str | list[str] = "mean"  # "mean", "coverage@70", or a list: all must pass (eq. 9)
    decision_judges: list[str] | None = None  # judges whose scores decide (null: every judge)
    judge_aggregation: Literal["mean", "strictest", "each", "min", "all"] = (
        "mean"  # combine judges: average, lowest, or each must pass (min/all: old names)
    )
    require_lower_bound: bool = False  # pass only when the CI's lower bound reaches epsilon
    min_scored_share: float = 0.5  # a judge scoring fewer rows than this share cannot pass the model
    baselines: list[str] = field(default_factory=list)  # service LLMs answering the test prompts (Table 1)
    base_student: bool = True  # Table-1 row of the student before fine-tuning (computed once per run)
    bootstrap_samples: int = 1000  # cluster-bootstrap resamples for the 95% intervals (0: none)
    bootstrap_seed: int = 0  # seed of the bootstrap (recorded in metrics.json)
    rationale: bool = False  # ask LLM judges for a one-sentence reason (kept in judgments.jsonl)
    temperature: float = 1.0  # judge sampling temperature (M repeats only differ when > 0)
    max_tokens: int = 256
    # pairwise comparison beside the grading: every LLM judge sees the instruction and two answers (the
    # student's and the test split's reference) in both orders and names the better one or a tie; the
    # student's win rate against the reference is reported, it never decides (see evaluate.pairwise)
    pairwise: bool = False
    pairwise_m: int = 1  # comparisons per answer, order and judge (each repeat asks both orders)

    EXAMPLE = (
        "judges: [gpt4o, claude]\nmetric_judges: [rougeL]\nm: 10\nzetas: [50, 70]\nepsilon: 70\n"
        "decision_statistic: [mean, coverage@50]  # eq. 9\njudge_aggregation: mean\nbaselines: [gpt4o]\n"
        "pairwise: true  # also compare each answer with the reference, both orders"
    )

    @property
    def decision_statistics(self) -> list[str]:
        stat = self.decision_statistic
        return [stat] if isinstance(stat, str) else list(stat)

    @property
    def aggregation(self) -> str:
        """The judge aggregation under its current name (old `min` is `strictest`, `all` is `each`)."""
        return {"min": "strictest", "all": "each"}.get(self.judge_aggregation, self.judge_aggregation)

    @property
    def all_judges(self) -> list[str]:
        return [*self.judges, *self.metric_judges]

    @property
    def deciding_judges(self) -> list[str]:
        return list(self.decision_judges) if self.decision_judges is not None else self.all_judges

    def validate(self) -> None:
        _check(
            len(self.judges) + len(self.metric_judges) >= 1,
            "judges",
            "name at least one LLM judge or one metric_judges entry, e.g. judges: [gpt4o]",
        )
        for i, name in enumerate(self.metric_judges):
            _check(
                name in METRIC_JUDGE_NAMES,
                f"metric_judges[{i}]",
                f"{name!r} is not a reference metric; choose from {list(METRIC_JUDGE_NAMES)}",
            )
        _check(len(set(self.all_judges)) == len(self.all_judges), "judges", "each judge once")
        _check(self.m >= 1, "m", "M must be >= 1, e.g. 10")
        _check(all(1 <= z <= 100 for z in self.zetas) and len(self.zetas) >= 1, "zetas", "values in [1, 100]")
        stats = self.decision_statistics
        _check(len(stats) >= 1, "decision_statistic", "name at least one, e.g. [mean, coverage@50]")
        for stat in stats:
            _check(
                _STATISTIC.fullmatch(stat) is not None,
                "decision_statistic",
                f"{stat!r}: use 'mean', 'coverage@70' or a list such as [mean, coverage@50]",
            )
            if stat.startswith("coverage@"):
                z = float(stat.split("@", 1)[1])
                _check(
                    z in [float(x) for x in self.zetas],
                    "decision_statistic",
                    f"zeta {z:g} must be listed in zetas",
                )
        if self.decision_judges is not None:
            _check(len(self.decision_judges) >= 1, "decision_judges", "name at least one judge, or null")
            for name in self.decision_judges:
                _check(
                    name in self.all_judges,
                    "decision_judges",
                    f"{name!r} is neither in judges {self.judges} nor in metric_judges {self.metric_judges}",
                )
        _check(0 <= self.epsilon <= 100, "epsilon", "must lie in [0, 100]")
        _check(self.temperature >= 0, "temperature", "must be >= 0 (M repeats only differ when > 0)")
        _check(0 <= self.min_scored_share <= 1, "min_scored_share", "must lie in [0, 1], e.g. 0.5")
        _check(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        _check(self.bootstrap_samples >= 0, "bootstrap_samples", "must be >= 0, e.g. 1000")
        _check(len(set(self.baselines)) == len(self.baselines), "baselines", "each provider once")
        _check(
            not self.pairwise or len(self.judges) >= 1,
            "pairwise",
            "pairwise comparison needs an LLM judge (reference metrics cannot compare two answers), "
            "e.g. judges: [gpt4o]",
        )
        _check(self.pairwise_m >= 1, "pairwise_m", "must be >= 1, e.g. 1 (each repeat asks both orders)")


@dataclass(frozen=True)
class SynthesizeConfig:
    """Who writes the synthetic pairs and how many. One `generator`, or several `generators`: each one is an
    arm of the study (`runner`): the arms share 01, cycle 0 and the judges, then each runs its own cycles
    1..n with its own synthetic data (Fig. 2 draws one line per generator)."""

    generator: str | None = None  # provider name (or list several under `generators`)
    generators: list[str] | None = None  # several provider names: one arm per generator, in this order
    pairs_per_request: int = 5
    target_per_cycle: int = 64  # accepted rows wanted per cycle (before growth)
    # double: cycle t adds 2^t k rows (cumulative k, 3k, 7k, ...); double_total: the cumulative synthetic
    # volume doubles (k, 2k, 4k, ...: the paper's 1K ... 256K); constant: k rows each cycle
    growth: Literal["constant", "double", "double_total"] = "double"
    # The synthetic rows in training at cycles 1, 2, ..., n, listed (cumulative, increasing), e.g. the paper's
    # [1000, 2000, 4000, ..., 256000]; cycle 0 trains on the coverage train split only. When given, it replaces
    # target_per_cycle and growth (05 of cycle t asks for volumes[t] - volumes[t-1] rows) and
    # loop.max_cycles must be len(volumes) + 1.
    volumes: list[int] | None = None
    max_requests_per_cycle: int = 64
    temperature: float = 1.0
    max_tokens: int = 1024
    dedup_threshold: float = 0.7  # ROUGE-L F1 at or above which a new row duplicates an old one
    decontam_threshold: float = 0.6  # ROUGE-L F1 against a test item that counts as contamination
    max_response_chars: int = 6000  # quality rule "too_long": longer instructions or responses are rejected
    top_p: float | None = None  # nucleus sampling of the generator (None: the provider's default)
    best_of_n: int = 1  # N > 1: N responses per synthetic instruction, the highest-reward one is kept

    EXAMPLE = (
        "generator: gpt4o\npairs_per_request: 5\ntarget_per_cycle: 1000\ngrowth: double\n"
        "# or, a study of several generators over listed volumes:\n"
        "generators: [gpt4o, claude, gemini]\nvolumes: [1000, 2000, 4000]"
    )

    @property
    def generator_names(self) -> list[str]:
        """Every generator of the run: [generator], or the `generators` list (one arm each when > 1)."""
        return list(self.generators) if self.generators is not None else [self.generator]

    def validate(self) -> None:
        _check(
            (self.generator is None) != (self.generators is None),
            "generator",
            "name one generator (generator: gpt4o) or several (generators: [gpt4o, claude]), not both",
        )
        if self.generators is not None:
            _check(
                len(self.generators) >= 1, "generators", "list at least one provider, e.g. [gpt4o, claude]"
            )
            _check(
                len(set(self.generators)) == len(self.generators),
                "generators",
                f"each generator once, got {self.generators}",
            )
        if self.volumes is not None:
            _check(len(self.volumes) >= 1, "volumes", "list at least one volume, e.g. [1000, 2000, 4000]")
            _check(
                all(v >= 1 for v in self.volumes)
                and all(b > a for a, b in zip(self.volumes, self.volumes[1:], strict=False)),
                "volumes",
                f"cumulative synthetic rows must be >= 1 and increasing (each cycle trains on all the data "
                f"before it), got {self.volumes}",
            )
        _check(self.pairs_per_request >= 1, "pairs_per_request", "must be >= 1")
        _check(self.target_per_cycle >= 1, "target_per_cycle", "must be >= 1")
        _check(self.max_requests_per_cycle >= 1, "max_requests_per_cycle", "must be >= 1")
        _check(0 < self.dedup_threshold <= 1, "dedup_threshold", "must lie in (0, 1]")
        _check(0 < self.decontam_threshold <= 1, "decontam_threshold", "must lie in (0, 1]")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        _check(self.max_response_chars >= 1, "max_response_chars", "must be >= 1")
        _check(self.top_p is None or 0 < self.top_p <= 1, "top_p", "must lie in (0, 1] or be null")
        _check(1 <= self.best_of_n <= MAX_BEST_OF_N, "best_of_n", f"must lie in 1..{MAX_BEST_OF_N}")


MAX_BEST_OF_N = 16


@dataclass(frozen=True)
class TeacherCandidate:
    """One candidate response generator of the teacher study: a provider and how it samples."""

    name: str  # label in tables and lineage, e.g. gpt4o-warm
    provider: str  # a declared provider
    temperature: float = 0.7
    top_p: float = 1.0
    n: int = 1  # best-of-N: N responses per instruction, the highest-reward one is kept
    max_tokens: int = 512

    EXAMPLE = "name: gpt4o-warm\nprovider: gpt4o\ntemperature: 0.9\ntop_p: 0.95\nn: 1"

    def validate(self) -> None:
        _check(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None, "name", "letters, digits, _ . - only")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must lie in (0, 1]")
        _check(1 <= self.n <= MAX_BEST_OF_N, "n", f"must lie in 1..{MAX_BEST_OF_N}")
        _check(self.max_tokens >= 1, "max_tokens", "must be >= 1")


@dataclass(frozen=True)
class RewardConfig:
    """The reward r of the teacher study (and of best-of-N): an LLM judge or a reward model."""

    kind: Literal["judge", "reward_model"] = "judge"
    judge: str | None = None  # kind judge: a declared provider, prompted with prompts/reward.md
    m: int = 1  # kind judge: repeats per response (their mean is the reward)
    temperature: float = 0.7  # kind judge: sampling temperature (repeats only differ when > 0)
    max_tokens: int = 128  # kind judge: reply budget
    min_scored_share: float = 0.5  # a candidate with fewer responses scored than this share is not ranked
    model_id: str | None = None  # kind reward_model: AutoModelForSequenceClassification (folder or hub id)
    batch_size: int = 8  # kind reward_model: responses per forward pass
    max_length: int = 2048  # kind reward_model: longer conversations are cut (left part kept)
    trust_remote_code: bool = (
        False  # kind reward_model: models with their own code (e.g. RLHFlow/ArmoRM-Llama3-8B)
    )
    # added to every reward before CAR = r / (1 + beta L): the ratio needs r > 0 (a negative r would favour the
    # teacher the student fits worst); raw reward-model scores can be negative (Skywork's), so shift them up
    offset: float = 0.0

    EXAMPLE = "kind: judge\njudge: gpt4o\nm: 3\n# or\nkind: reward_model\nmodel_id: Skywork/Skywork-Reward-V2-Llama-3.1-8B"

    def validate(self) -> None:
        _check(
            self.kind != "reward_model" or bool(self.model_id),
            "model_id",
            "name a sequence-classification reward model for kind reward_model",
        )
        _check(self.m >= 1, "m", "must be >= 1")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        _check(0 <= self.min_scored_share <= 1, "min_scored_share", "must lie in [0, 1]")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.max_length >= 16, "max_length", "must be >= 16")


@dataclass(frozen=True)
class TeacherStudyConfig:
    """Choose the synthesis teacher by Compatibility-Adjusted Reward, CAR = r / (1 + beta * L).

    Off while `candidates` is empty. On: 05 scores every candidate on a seeded sample of train-split
    instructions and synthesizes with the highest-CAR candidate (its provider, temperature, top_p and N).
    """

    candidates: list[TeacherCandidate] = field(default_factory=list)
    sample_size: int = 32  # train-split instructions every candidate answers
    seed: int = 7  # which instructions (the same each cycle, so replies are replayed from the cache)
    beta: float = 3.0  # weight of the student's loss L (the paper uses 3)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss_batch_size: int = 4  # responses per forward pass when computing L under the student base
    validation_steps: int | None = (
        None  # `llamaduo validate-teachers`: LoRA steps per candidate (None: finetune's)
    )

    EXAMPLE = (
        "beta: 3\nsample_size: 32\nreward: {kind: judge, judge: gpt4o, m: 3}\ncandidates:\n"
        "  - {name: gpt4o, provider: gpt4o, temperature: 0.7}\n"
        "  - {name: gemini-hot, provider: gemini, temperature: 1.0, top_p: 1.0, n: 4}"
    )

    @property
    def enabled(self) -> bool:
        return bool(self.candidates)

    def validate(self) -> None:
        names = [c.name for c in self.candidates]
        _check(len(set(names)) == len(names), "candidates", f"candidate names must be unique, got {names}")
        _check(self.sample_size >= 2, "sample_size", "must be >= 2 (a ranking needs several responses)")
        _check(self.beta >= 0, "beta", "must be >= 0 (the paper uses 3)")
        _check(self.loss_batch_size >= 1, "loss_batch_size", "must be >= 1")
        _check(
            self.validation_steps is None or self.validation_steps >= 1, "validation_steps", ">= 1 or null"
        )


@dataclass(frozen=True)
class LoopConfig:
    """`mode: epsilon` (default) is the paper's loop: stop at the first cycle whose decision meets epsilon
    (eq. 9), or after `max_cycles`. `mode: sweep` is the paper's experiments: train and evaluate every cycle
    (every volume of `synthesize.volumes`) whatever epsilon says; each cycle's verdict is still recorded in
    its metrics.json, and 06 ships the cycle `deploy.select` picks."""

    max_cycles: int = 3  # stop after this many fine-tune/evaluate cycles even if epsilon is not met
    mode: Literal["epsilon", "sweep"] = "epsilon"

    EXAMPLE = "max_cycles: 5\n# or the paper's sweep, every volume trained and evaluated:\nmode: sweep\nmax_cycles: 10"

    def validate(self) -> None:
        _check(self.max_cycles >= 1, "max_cycles", "must be >= 1")
        _check(
            self.mode != "sweep" or self.max_cycles >= 2,
            "max_cycles",
            "a sweep needs at least two cycles (cycle 0 on the coverage data, then one per synthetic volume)",
        )


@dataclass(frozen=True)
class BudgetConfig:
    """Spending caps on service calls (null: no cap). A call goes out while its worst case fits under every cap
    given what was paid and what is on its way (waiting for calls on their way to settle when that makes room);
    one that could cross a cap with nothing on its way is not sent: the stage stops cleanly before it
    ("stopped" in the run state) and `llamaduo run --resume` continues after raising it (a budget is a
    non-semantic setting: no --accept-changed-params needed). USD counts what the ledger paid (cache replays
    are free); tokens count input + output."""

    run_usd: float | None = None  # the whole run, all stages and cycles
    cycle_usd: float | None = None  # one cycle (04 + 05 of cycle N)
    stage_usd: float | None = None  # one stage of one cycle (e.g. 05 of cycle 2)
    run_tokens: int | None = None
    cycle_tokens: int | None = None
    stage_tokens: int | None = None

    EXAMPLE = "run_usd: 50.0\ncycle_usd: 20.0\nstage_usd: 10.0\nstage_tokens: 5000000"

    def validate(self) -> None:
        for name in ("run_usd", "cycle_usd", "stage_usd", "run_tokens", "cycle_tokens", "stage_tokens"):
            value = getattr(self, name)
            _check(value is None or value >= 0, name, "must be >= 0 or null (no cap)")


@dataclass(frozen=True)
class CacheConfig:
    """The call cache shared by every run of the project: a request answered once is never paid again, even
    after `--fresh` or under a new run_name. Each run still keeps its own ledger (`<run>/calls.sqlite`)."""

    shared: bool = (
        True  # false: bypass the shared cache (every run pays its own calls; per-run replay still works)
    )
    path: str | None = (
        None  # null: <outputs_dir>/.callcache/calls.sqlite; relative paths: against the project root
    )

    EXAMPLE = "shared: true\npath: outputs/.callcache/calls.sqlite"

    def validate(self) -> None:
        _check(self.path is None or bool(self.path), "path", "a file path or null")


# Written directly from the merged weights by the converter:
GGUF_CONVERTED_TYPES = ("f32", "f16", "bf16", "q8_0")
# Made from the F16 file by llama.cpp's quantizer (llama_cpp.llama_model_quantize), incl. the K-quants:
GGUF_QUANTIZED_TYPES = ("q4_0", "q5_0", "q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
GGUF_TYPES = GGUF_CONVERTED_TYPES + GGUF_QUANTIZED_TYPES


@dataclass(frozen=True)
class DeployConfig:
    enabled: bool = True
    select: Literal["first_passing", "best"] = "first_passing"  # which cycle's model to ship
    gguf_types: list[str] = field(default_factory=lambda: ["f16", "q8_0", "q4_k_m"])  # see GGUF_TYPES
    serve: bool = True  # start llama.cpp's server on the exported GGUF and run the parity check
    serve_gguf: str = "q8_0"  # which exported GGUF the served endpoint (and the judged parity check) uses
    n_ctx: int = 2048  # context length of the llama.cpp server
    parity_tolerance: float = 5.0  # max allowed drop of the decision statistic (points)
    parity_m: int | None = None  # judge repeats for the parity check (None: evaluate.m)
    # LLM judges of the judged parity check (None: evaluate.judges); the reference metrics and the deciding
    # LLM judges (evaluate.decision_judges) always judge it, so the served model is decided like the cycle.
    parity_judges: list[str] | None = None
    greedy_prompts: int = 8  # test prompts for the greedy exact-match check, per GGUF type (0: skip)
    greedy_max_new_tokens: int = 64
    gguf_tokenizer_pre: str | None = (
        None  # llama.cpp pre-tokenizer name; None: the embedded GGUF's, else default
    )
    converter: Literal["auto", "builtin", "llama.cpp"] = "auto"  # auto: builtin for Llama, else llama.cpp's
    convert_script: str | None = (
        None  # a llama.cpp checkout's convert_hf_to_gguf.py (default: the one of the llama-cpp-python sdist)
    )
    hf_repo: str | None = None  # push merged weights + GGUF (token: HF_TOKEN or a cached `hf auth login`)
    hf_private: bool = True
    hf_dataset_repo: str | None = None  # also push the curated splits + synthetic data as a dataset repo
    economics_file: str = "params/economics.yaml"

    EXAMPLE = (
        "select: first_passing\ngguf_types: [f16, q8_0]\nserve: true\nserve_gguf: q8_0\nparity_tolerance: 5"
    )

    def validate(self) -> None:
        _check(len(self.gguf_types) >= 1, "gguf_types", f"list at least one of {list(GGUF_TYPES)}")
        for i, qtype in enumerate(self.gguf_types):
            _check(qtype in GGUF_TYPES, f"gguf_types[{i}]", f"{qtype!r} is not one of {list(GGUF_TYPES)}")
        _check(len(set(self.gguf_types)) == len(self.gguf_types), "gguf_types", "each type once")
        _check(
            not self.serve or self.serve_gguf in self.gguf_types,
            "serve_gguf",
            f"{self.serve_gguf!r} must be one of gguf_types {self.gguf_types}",
        )
        _check(self.n_ctx >= 256, "n_ctx", "must be >= 256")
        _check(
            self.parity_tolerance >= 0, "parity_tolerance", "must be >= 0 (points of the decision statistic)"
        )
        _check(self.parity_m is None or self.parity_m >= 1, "parity_m", "must be >= 1 or null")
        _check(self.greedy_prompts >= 0, "greedy_prompts", "must be >= 0")
        _check(self.greedy_max_new_tokens >= 1, "greedy_max_new_tokens", "must be >= 1")
        _check(
            self.hf_repo is None or re.fullmatch(r"[\w.-]+/[\w.-]+", self.hf_repo) is not None,
            "hf_repo",
            "'owner/name', e.g. my-org/smollm2-task-student",
        )
        _check(
            self.hf_dataset_repo is None
            or re.fullmatch(r"[\w.-]+/[\w.-]+", self.hf_dataset_repo) is not None,
            "hf_dataset_repo",
            "'owner/name', e.g. my-org/task-coverage-data",
        )


@dataclass(frozen=True)
class RunConfig:
    run_name: str
    coverage: CoverageConfig
    evaluate: EvaluateConfig
    synthesize: SynthesizeConfig
    providers: list[ProviderConfig]
    task: str = "LlamaDuo migration"
    seed: int = 42
    outputs_dir: str = "outputs"
    prices_file: str = "params/prices.yaml"
    student: StudentConfig = field(default_factory=StudentConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    teacher_study: TeacherStudyConfig = field(default_factory=TeacherStudyConfig)

    budget: BudgetConfig = field(default_factory=BudgetConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    EXAMPLE = "run_name: demo\ncoverage: {source: data/sample_coverage.jsonl}\nproviders: [...]\nevaluate: {judges: [local]}"

    def validate(self) -> None:
        _check(
            re.fullmatch(r"[A-Za-z0-9_.-]+", self.run_name) is not None,
            "run_name",
            "letters, digits, _ . - only",
        )
        names = [p.name for p in self.providers]
        _check(len(names) >= 1, "providers", "declare at least one provider")
        _check(len(set(names)) == len(names), "providers", f"provider names must be unique, got {names}")
        for name in names:
            _check(
                name not in METRIC_JUDGE_NAMES,
                "providers",
                f"'{name}' is reserved for a reference-metric judge {list(METRIC_JUDGE_NAMES)}; rename it",
            )
        for judge in self.evaluate.judges:
            _check(judge in names, "evaluate.judges", f"'{judge}' is not a declared provider {names}")
        if self.deploy.parity_judges is not None:
            for judge in self.deploy.parity_judges:
                _check(
                    judge in self.evaluate.judges,
                    "deploy.parity_judges",
                    f"'{judge}' is not one of evaluate.judges {self.evaluate.judges}",
                )
        for baseline in self.evaluate.baselines:
            _check(
                baseline in names, "evaluate.baselines", f"'{baseline}' is not a declared provider {names}"
            )
        sy = self.synthesize
        key = "synthesize.generator" if sy.generators is None else "synthesize.generators"
        for generator in sy.generator_names:
            _check(generator in names, key, f"'{generator}' is not a declared provider {names}")
        if sy.volumes is not None:
            _check(
                self.loop.max_cycles == len(sy.volumes) + 1,
                "loop.max_cycles",
                f"{self.loop.max_cycles}, but synthesize.volumes lists {len(sy.volumes)} volumes: cycle 0 trains on "
                f"the coverage data, then one cycle per volume; set max_cycles: {len(sy.volumes) + 1}",
            )
        if len(sy.generator_names) > 1:
            _check(
                not self.teacher_study.enabled,
                "teacher_study.candidates",
                "the teacher study chooses one generator per cycle, while synthesize.generators fixes one per "
                "arm; leave teacher_study.candidates empty, or name one generator",
            )
            _check(
                not self.deploy.enabled or self.deploy.select == "best",
                "deploy.select",
                f"'{self.deploy.select}' orders the cycles of one run; with several generators every arm ships "
                "its best cycle: set deploy.select: best (or deploy.enabled: false)",
            )
        paid = [(i, p) for i, p in enumerate(self.providers) if not p.is_free]
        if paid:
            try:
                prices = load_prices(self.prices_file, required=True)
            except PriceError as exc:
                _check(False, "prices_file", str(exc))
            for i, p in paid:
                _check(prices.lookup(p.model) is not None, f"providers[{i}].model", prices.missing_advice(p))

        for i, candidate in enumerate(self.teacher_study.candidates):
            _check(
                candidate.provider in names,
                f"teacher_study.candidates[{i}].provider",
                f"'{candidate.provider}' is not a declared provider {names}",
            )
        reward = self.teacher_study.reward
        if self.teacher_study.enabled and reward.kind == "judge":
            _check(
                reward.judge in names,
                "teacher_study.reward.judge",
                f"'{reward.judge}' is not a declared provider {names}",
            )

    @property
    def arms(self) -> list[str]:
        """The study's arms: one per generator when `synthesize.generators` lists several, else none."""
        names = self.synthesize.generator_names
        return names if len(names) > 1 else []

    def arm(self, generator: str, outputs_dir: str) -> RunConfig:
        """The run of one arm: this configuration with `generator` as its only generator, named after it,
        under `outputs_dir` (the study's arms folder), on the study's shared call cache."""
        if generator not in self.arms:
            raise ConfigError(f"'{generator}' is not an arm of this study; arms: {self.arms}")
        cache = self.cache
        if cache.path is None:  # the default is under outputs_dir: keep the study's, not the arms folder's
            cache = dataclasses.replace(
                cache, path=str(Path(self.outputs_dir) / ".callcache" / "calls.sqlite")
            )
        synthesize = dataclasses.replace(self.synthesize, generator=generator, generators=None)
        return dataclasses.replace(
            self, run_name=generator, outputs_dir=outputs_dir, synthesize=synthesize, cache=cache
        )

    def provider(self, name: str) -> ProviderConfig:
        for p in self.providers:
            if p.name == name:
                return p
        raise ConfigError(f"no provider named '{name}'; declared: {[p.name for p in self.providers]}")

    def to_dict(self) -> dict[str, Any]:
        return _strip(dataclasses.asdict(self))


# --------------------------------------------------------------------------- loading


class _Invalid(Exception):
    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise _Invalid(key, problem)


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_strip(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, example: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, example, source)
            except ConfigError as exc:
                errors.append(exc)
        raise (
            errors[-1]
            if len(errors) == 1
            else _error(source, key, f"{value!r} matches none of {_type_name(tp)}", example)
        )
    if origin is Literal:
        if value not in args:
            raise _error(source, key, f"{value!r} is not one of {list(args)}", example)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _error(source, key, f"expected a list, got {type(value).__name__} {value!r}", example)
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", example, source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _error(source, key, f"expected a mapping, got {type(value).__name__}", tp.EXAMPLE)
        return _build(tp, value, key, source)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _error(source, key, f"expected a number, got {type(value).__name__} {value!r}", example)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _error(source, key, f"expected an integer, got {type(value).__name__} {value!r}", example)
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise _error(
                source, key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}", example
            )
        return value
    if tp is type(None):
        if value is not None:
            raise _error(source, key, f"expected null, got {value!r}", example)
        return None
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _error(source: str, key: str, problem: str, example: str) -> ConfigError:
    shown = "\n".join("    " + line for line in example.splitlines())
    return ConfigError(f"{source}: '{key}': {problem}.\n  A valid example of this section:\n{shown}")


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    example = getattr(cls, "EXAMPLE", "")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise _error(source, key, f"unknown key (known keys: {', '.join(fields)})", example)
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key, example, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _error(source, key, "required key is missing", example)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except _Invalid as inv:
            key = f"{prefix}.{inv.key}" if prefix else inv.key
            raise _error(source, key, inv.problem, example) from None
    return obj


def build(cls: type, data: dict, source: str = "<params>", prefix: str = "") -> Any:
    """Build and validate dataclass `cls` from a plain mapping (used for notebook parameters too)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    return _build(cls, data, prefix, source)


def read_yaml(path: str | Path, what: str = "params file") -> Any:
    """Parse a YAML file; a missing file or bad YAML is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def merge_params(base: Any, extra: Any) -> Any:
    """`extra` over `base`: mappings merge key by key, lists of named mappings (`providers`, teacher candidates)
    merge entry by entry on `name` (a new name is appended), any other value is replaced."""
    if isinstance(base, dict) and isinstance(extra, dict):
        return {**base, **{k: merge_params(base[k], v) if k in base else v for k, v in extra.items()}}
    named = (
        isinstance(base, list)
        and isinstance(extra, list)
        and all(isinstance(item, dict) and "name" in item for item in [*base, *extra])
    )
    if named:
        merged = {item["name"]: item for item in base}
        for item in extra:
            merged[item["name"]] = (
                merge_params(merged[item["name"]], item) if item["name"] in merged else item
            )
        return list(merged.values())
    return extra


def read_params(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A params file as one mapping. `extends: other.yaml` (a path relative to the file) starts from that file
    and overrides what this one sets (`merge_params`), so a variant states only what differs."""
    path = Path(path)
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a params file is a mapping of settings, e.g. `run_name: demo`")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(
            f"{path}, key 'extends': expected a params file path, e.g. `extends: paper_gemma7b.yaml`"
        )
    parent_path = (path.parent / parent).resolve()
    if parent_path in _seen or parent_path == path.resolve():
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve(), parent_path))
        raise ConfigError(f"{path}, key 'extends': the files extend each other in a circle ({chain})")
    if not parent_path.is_file():
        raise ConfigError(f"{path}, key 'extends': {parent!r} not found (looked for {parent_path})")
    return merge_params(read_params(parent_path, (*_seen, path.resolve())), data)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a params YAML file (and the file it `extends`) into a validated RunConfig; `overrides` use dotted
    keys ("loop.max_cycles")."""
    path = Path(path)
    data = read_params(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return build(RunConfig, data, source=str(path))


def dump_config(cfg: RunConfig, path: str | Path) -> Path:

    with atomic_write(path) as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False, allow_unicode=True)
    return Path(path)


def table5_lora(n_rows: int) -> tuple[int, int]:
    """LoRA (rank, alpha) by training-set size, after the paper's Table 5.

    Table 5 lists rank 8 / alpha 16 for the volumes 1K to 16K, 16 / 32 at 32K and 32 / 64 from 64K to
    256K. A cycle trains on the coverage train split plus the synthetic volume (16K synthetic + 395
    coverage rows is still "the 16K run"), so a size takes the schedule of the nearest listed volume on a
    log scale: the boundaries are the geometric means sqrt(16K * 32K) ~ 22.6K and sqrt(32K * 64K) ~ 45.3K.
    """
    if n_rows * n_rows <= 16_000 * 32_000:
        return 8, 16
    if n_rows * n_rows <= 32_000 * 64_000:
        return 16, 32
    return 32, 64
