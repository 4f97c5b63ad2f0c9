"""Run configuration: `params/*.yaml` -> frozen, validated dataclasses.

Every setting of a run lives in one YAML file with one section per stage. Loading is strict: an
unknown key, a value of the wrong type or an impossible value raises `ConfigError`, which names the
file and the dotted key and shows a valid example of that section.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A params file or a notebook parameter is wrong; the message says where and shows a right example."""


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
    max_concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 5
    json_mode: Literal["schema", "object", "none"] = "schema"  # how to ask for structured output

    EXAMPLE = "name: gpt4o\nkind: openai\nmodel: gpt-4o-2024-08-06\napi_key_env: OPENAI_API_KEY\nrpm: 500"

    def validate(self) -> None:
        _check(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None, "name", "letters, digits, _ . - only")
        _check(
            self.kind != "openai_compatible" or bool(self.base_url),
            "base_url",
            "required for openai_compatible",
        )
        _check(self.rpm >= 1, "rpm", "must be >= 1")
        _check(self.tpm >= 1, "tpm", "must be >= 1")
        _check(self.max_concurrency >= 1, "max_concurrency", "must be >= 1")
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")
        _check(self.max_retries >= 0, "max_retries", "must be >= 0")
        if self.api_key_env is not None:
            _check(
                re.fullmatch(r"[A-Z_][A-Z0-9_]*", self.api_key_env) is not None,
                "api_key_env",
                "the NAME of an environment variable (e.g. OPENAI_API_KEY), never a key",
            )


@dataclass(frozen=True)
class CoverageConfig:
    source: str  # local path (JSONL, CSV, HF dataset saved to disk) or a hub dataset name
    format: Literal["auto", "jsonl", "csv", "hf_disk", "hub"] = "auto"
    hub_split: str = "train"  # split to read when format is hub
    hub_subset: str | None = None
    categories: list[str] | None = None  # keep only these categories (None: all)
    train_ratio: float = 0.8  # Phi: share of rows going to the train split
    stratify_by: str | None = "category"
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


@dataclass(frozen=True)
class StudentConfig:
    model_id: str = "embedded:smollm2"  # HF hub id, local folder, or embedded:smollm2 (offline default)
    revision: str | None = None
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    # torch CPU threads for fine-tuning and inference (null: torch's default, one per core). When other work
    # keeps the cores busy, 1 can be several times faster: a 2-thread matmul waits for a preempted thread.
    cpu_threads: int | None = None

    EXAMPLE = "model_id: google/gemma-7b\nrevision: main\ntorch_dtype: bfloat16"

    def validate(self) -> None:
        _check(bool(self.model_id), "model_id", "name a hub id, a local folder or embedded:smollm2")
        _check(self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads", "must be >= 1 or null")


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
    continue_from_previous: bool = False  # paper: retrain from the base each cycle on the grown data
    logging_steps: int = 5
    seed: int = 42
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


@dataclass(frozen=True)
class InferenceConfig:
    # auto: vLLM when CUDA + vllm, else llama.cpp (GGUF F16 of the merged cycle weights) when it imports,
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
    llamacpp_threads: int = 0  # llama.cpp engine: CPU threads of the server (0: all cores)

    EXAMPLE = "engine: auto\nk: 4\ntemperature: 0.7\ntop_p: 0.9\nmax_new_tokens: 512"

    def validate(self) -> None:
        _check(self.k >= 1, "k", "K must be >= 1, e.g. 4")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must lie in (0, 1]")
        _check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")


@dataclass(frozen=True)
class EvaluateConfig:
    judges: list[str]  # provider names (see `providers`)
    m: int = 10  # M: judgments per (prompt, sample) per judge
    zetas: list[float] = field(default_factory=lambda: [50.0, 70.0])  # coverage thresholds C@zeta
    epsilon: float = 70.0  # pass threshold on the decision statistic
    decision_metric: Literal["precision", "similarity", "both"] = "precision"
    decision_statistic: str = "mean"  # "mean" or "coverage@<zeta>" (a share in percent, e.g. coverage@70)
    judge_aggregation: Literal["mean", "min", "all"] = (
        "mean"  # combine judges: average, worst, or all must pass
    )
    temperature: float = 1.0  # judge sampling temperature (M repeats only differ when > 0)
    max_tokens: int = 256
    min_scored_share: float = 0.5  # a judge scoring fewer rows than this share cannot pass the model

    EXAMPLE = "judges: [gpt4o, claude]\nm: 10\nzetas: [50, 70]\nepsilon: 70\ndecision_statistic: mean"

    def validate(self) -> None:
        _check(len(self.judges) >= 1, "judges", "name at least one provider")
        _check(self.m >= 1, "m", "M must be >= 1, e.g. 10")
        _check(all(1 <= z <= 100 for z in self.zetas) and len(self.zetas) >= 1, "zetas", "values in [1, 100]")
        _check(
            re.fullmatch(r"mean|coverage@\d+(\.\d+)?", self.decision_statistic) is not None,
            "decision_statistic",
            "'mean' or 'coverage@70'",
        )
        if self.decision_statistic.startswith("coverage@"):
            z = float(self.decision_statistic.split("@", 1)[1])
            _check(
                z in [float(x) for x in self.zetas],
                "decision_statistic",
                f"zeta {z:g} must be listed in zetas",
            )
        _check(0 <= self.epsilon <= 100, "epsilon", "must lie in [0, 100]")
        _check(self.temperature >= 0, "temperature", "must be >= 0 (M repeats only differ when > 0)")
        _check(0 <= self.min_scored_share <= 1, "min_scored_share", "must lie in [0, 1], e.g. 0.5")
        _check(self.max_tokens >= 1, "max_tokens", "must be >= 1")


@dataclass(frozen=True)
class SynthesizeConfig:
    generator: str  # provider name
    pairs_per_request: int = 5
    target_per_cycle: int = 64  # accepted rows wanted per cycle (before growth)
    growth: Literal["constant", "double"] = "double"  # paper: data grows as 2^n k
    max_requests_per_cycle: int = 64
    temperature: float = 1.0
    max_tokens: int = 1024
    dedup_threshold: float = 0.7  # ROUGE-L F1 at or above which a new row duplicates an old one
    decontam_threshold: float = 0.6  # ROUGE-L F1 against a test item that counts as contamination
    max_response_chars: int = 6000  # quality rule "too_long": longer instructions or responses are rejected

    EXAMPLE = "generator: gpt4o\npairs_per_request: 5\ntarget_per_cycle: 1000\ngrowth: double"

    def validate(self) -> None:
        _check(self.pairs_per_request >= 1, "pairs_per_request", "must be >= 1")
        _check(self.target_per_cycle >= 1, "target_per_cycle", "must be >= 1")
        _check(self.max_requests_per_cycle >= 1, "max_requests_per_cycle", "must be >= 1")
        _check(0 < self.dedup_threshold <= 1, "dedup_threshold", "must lie in (0, 1]")
        _check(0 < self.decontam_threshold <= 1, "decontam_threshold", "must lie in (0, 1]")
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        _check(self.max_response_chars >= 1, "max_response_chars", "must be >= 1")


@dataclass(frozen=True)
class LoopConfig:
    max_cycles: int = 3  # stop after this many fine-tune/evaluate cycles even if epsilon is not met

    EXAMPLE = "max_cycles: 5"

    def validate(self) -> None:
        _check(self.max_cycles >= 1, "max_cycles", "must be >= 1")


GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class DeployConfig:
    enabled: bool = True
    select: Literal["first_passing", "best"] = "first_passing"  # which cycle's model to ship
    gguf_types: list[str] = field(default_factory=lambda: ["f16", "q8_0"])  # any of f32, f16, bf16, q8_0
    serve: bool = True  # start llama.cpp's server on the exported GGUF and run the parity check
    serve_gguf: str = "q8_0"  # which exported GGUF the served endpoint (and the judged parity check) uses
    n_ctx: int = 2048  # context length of the llama.cpp server
    parity_tolerance: float = 5.0  # max allowed drop of the decision statistic (points)
    parity_m: int | None = None  # judge repeats for the parity check (None: evaluate.m)
    greedy_prompts: int = 8  # test prompts for the greedy exact-match check, per GGUF type (0: skip)
    greedy_max_new_tokens: int = 64
    gguf_tokenizer_pre: str | None = (
        None  # llama.cpp pre-tokenizer name; None: the embedded GGUF's, else default
    )
    convert_script: str | None = (
        None  # llama.cpp convert_hf_to_gguf.py, for students the built-in exporter lacks
    )
    hf_repo: str | None = None  # push merged weights when HF_TOKEN is set
    hf_private: bool = True
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
        for judge in self.evaluate.judges:
            _check(judge in names, "evaluate.judges", f"'{judge}' is not a declared provider {names}")
        _check(
            self.synthesize.generator in names,
            "synthesize.generator",
            f"'{self.synthesize.generator}' is not a declared provider {names}",
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


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a params YAML file into a validated RunConfig; `overrides` use dotted keys ("loop.max_cycles")."""
    path = Path(path)
    data = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return build(RunConfig, data, source=str(path))


def dump_config(cfg: RunConfig, path: str | Path) -> Path:
    from .jsonio import atomic_write

    with atomic_write(path) as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False, allow_unicode=True)
    return Path(path)


def table5_lora(n_rows: int) -> tuple[int, int]:
    """LoRA (rank, alpha) by training-set size, after the paper's Table 5.

    Table 5 lists rank 8 / alpha 16 up to 16K rows, 16 / 32 at 32K and 32 / 64 from 64K to 256K. Sizes
    between the listed points take the schedule of the next listed point at or above them.
    """
    if n_rows <= 16_000:
        return 8, 16
    if n_rows <= 32_000:
        return 16, 32
    return 32, 64
