"""06 step 4a: an Ollama Modelfile whose TEMPLATE renders exactly the prompt the student was trained on.

Ollama builds a chat prompt in three steps (ollama/ollama `server/routes.go`, `template/template.go`):
the Modelfile's SYSTEM is prepended as a system message unless the request starts with one; `collate`
merges consecutive turns of one role and joins every system message into `.System`, *while `.Messages`
still holds the system messages*; the Go template then runs. A template that prints `.System` and also
ranges over `.Messages` therefore shows the system prompt twice. The template written here only ranges
over `.Messages`; the student's default system prompt (what its HF chat template inserts when a
conversation has none) becomes the Modelfile's SYSTEM, so Ollama inserts it in the same cases.

`check_modelfile_template` renders conversations through Ollama's semantics (`gotemplate.ollama_render`)
and through the HF chat template and compares the token ids; 06 refuses to write a Modelfile that differs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..config import RunConfig
from ..jsonio import atomic_write
from ..runlayout import RunLayout
from .gotemplate import ollama_render
from .select import DeployError

# Tools-free chat in ChatML; the system turn comes from .Messages only (never also from .System).
OLLAMA_CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"

# Conversations the template must render like the HF chat template: with and without a system turn,
# single and multi-turn, and content that looks like template syntax or carries odd whitespace.
PROBE_CONVERSATIONS: tuple[tuple[dict, ...], ...] = (
    ({"role": "user", "content": "Summarize: the cat sat on the mat."},),
    (
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
    ),
    (
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Write {{ .Prompt }} literally,\n\n  with spaces  "},
    ),
    (
        {"role": "system", "content": "Be brief.\nUse lists."},
        {"role": "user", "content": "Two fruits?"},
        {"role": "assistant", "content": "- apple\n- pear"},
        {"role": "user", "content": "Two more, in 東京 style 🙂"},
    ),
)


def chat_template_parts(merged_dir: str | Path) -> dict:
    """Render the merged tokenizer's chat template once to learn its shape (ChatML?) and default system."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    marker = "\x00USER\x00"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
    )
    chatml = (
        rendered.endswith("<|im_start|>assistant\n") and f"<|im_start|>user\n{marker}<|im_end|>\n" in rendered
    )
    system = None
    head = rendered.split("<|im_start|>user\n", 1)[0]
    if chatml and head.startswith("<|im_start|>system\n") and head.endswith("<|im_end|>\n"):
        system = head[len("<|im_start|>system\n") : -len("<|im_end|>\n")]
    stops = (
        [t for t in ("<|im_end|>", "<|endoftext|>") if t in tok.get_vocab()] if chatml else [tok.eos_token]
    )
    return {"chatml": chatml, "default_system": system, "stops": stops, "eos": tok.eos_token}


def check_modelfile_template(
    merged_dir: str | Path,
    template: str,
    system: str | None,
    conversations: Sequence[Sequence[dict]] = PROBE_CONVERSATIONS,
) -> dict:
    """Token-for-token: Ollama's rendering of `template` (+ SYSTEM) vs the HF chat template, per conversation.

    Both prompts are tokenized by the merged model's tokenizer with special tokens parsed (as Ollama's
    llama.cpp runner does); the HF side is `apply_chat_template(..., add_generation_prompt=True)`.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    mismatches = []
    for conversation in conversations:
        messages = [dict(m) for m in conversation]
        hf_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        hf_ids = tok(hf_text, add_special_tokens=False)["input_ids"]
        ollama_text = ollama_render(template, messages, system=system)
        ollama_ids = tok(ollama_text, add_special_tokens=False)["input_ids"]
        if hf_ids != ollama_ids:
            mismatches.append({"messages": messages, "hf": hf_text, "ollama": ollama_text})
    return {"conversations": len(conversations), "mismatches": mismatches, "ok": not mismatches}


def modelfile_text(gguf_name: str, parts: dict, *, temperature: float, top_p: float, num_ctx: int) -> str:
    """An Ollama Modelfile for `./gguf/<gguf_name>`: ChatML template + the default system prompt + stops."""
    lines = [
        "# Ollama, from this folder:  ollama create <name> -f Modelfile && ollama run <name>",
        "# TEMPLATE ranges over .Messages only: Ollama keeps system turns in .Messages, so printing .System",
        "# as well would show the system prompt twice. SYSTEM is the default system prompt of the student's",
        "# chat template; Ollama adds it when a conversation does not start with its own system message.",
        f"FROM ./gguf/{gguf_name}",
        "",
    ]
    if parts["chatml"]:
        lines += [f'TEMPLATE """{OLLAMA_CHATML}"""', ""]
        if parts["default_system"]:
            lines += [f'SYSTEM """{parts["default_system"]}"""', ""]
    else:
        lines += ["# not a ChatML model: Ollama reads the chat template stored in the GGUF", ""]
    lines += [f'PARAMETER stop "{stop}"' for stop in parts["stops"]]
    # Ollama's sampler defaults (top_k 40, repeat_penalty 1.1, min_p 0) differ from how 03 sampled the
    # evaluated answers (transformers: temperature and top_p only); switch the extras off.
    lines += [
        f"PARAMETER temperature {temperature:g}",
        f"PARAMETER top_p {top_p:g}",
        "PARAMETER top_k 0",
        "PARAMETER min_p 0",
        "PARAMETER repeat_penalty 1",
        f"PARAMETER num_ctx {num_ctx}",
        "",
    ]
    return "\n".join(lines)


def write_modelfile(
    cfg: RunConfig, layout: RunLayout, gguf_name: str, merged_dir: str | Path | None = None
) -> Path:
    """deploy/Modelfile, after checking its template renders like the HF chat template (else DeployError)."""
    merged_dir = merged_dir or layout.merged_dir
    parts = chat_template_parts(merged_dir)
    if parts["chatml"]:
        check = check_modelfile_template(merged_dir, OLLAMA_CHATML, parts["default_system"])
        if not check["ok"]:
            first = check["mismatches"][0]
            raise DeployError(
                f"the Ollama template renders {len(check['mismatches'])} probe conversations differently from "
                f"{merged_dir}'s chat template; first: HF {first['hf']!r} vs Ollama {first['ollama']!r}"
            )
    text = modelfile_text(
        gguf_name,
        parts,
        temperature=cfg.inference.temperature,
        top_p=cfg.inference.top_p,
        num_ctx=cfg.deploy.n_ctx,
    )
    with atomic_write(layout.modelfile) as fh:
        fh.write(text)
    return layout.modelfile


def read_modelfile(path: str | Path) -> dict:
    """The commands of a Modelfile as Ollama's parser reads them (FROM, TEMPLATE, SYSTEM, PARAMETER …;
    `\"\"\"` multi-line values, `#` comments), with FROM resolved against the Modelfile's folder like
    `ollama create -f` does. Lets a test check what `ollama create` would be given without Ollama."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    commands: dict = {"PARAMETER": []}
    i = 0
    lines = text.split("\n")
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word, rest = word.upper(), rest.strip()
        if rest.startswith('"""'):
            body = rest[3:]
            while '"""' not in body:
                if i >= len(lines):
                    raise DeployError(f'{path}: unterminated """ value of {word}')
                body += "\n" + lines[i]
                i += 1
            rest = body[: body.index('"""')]
        elif rest.startswith('"') and rest.endswith('"') and len(rest) > 1:
            rest = rest[1:-1]
        if word == "PARAMETER":
            key, _, value = rest.partition(" ")
            value = value.strip()
            commands["PARAMETER"].append((key, value[1:-1] if value.startswith('"') else value))
        elif word in ("FROM", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE"):
            commands[word] = rest
        else:
            raise DeployError(f"{path}: unknown Modelfile command {word}")
    if "FROM" not in commands:
        raise DeployError(f"{path}: no FROM line")
    commands["FROM_PATH"] = (path.parent / commands["FROM"]).resolve()
    return commands
