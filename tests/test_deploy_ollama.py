"""06's Ollama Modelfile: the Go-template evaluator on Ollama's own test vectors, and the written template
rendered through Ollama's semantics token for token against the student's HF chat template.

There is no Go toolchain or Ollama binary here; `gotemplate` is checked against expected outputs taken
from ollama/ollama `template/template_test.go` (TestExecuteWithMessages, TestParse) and Go's documented
trim-marker rules.
"""

from __future__ import annotations

import pytest

from llamaduo_nb.deploy import gotemplate, ollama

HELLO = [
    {"role": "user", "content": "Hello friend!"},
    {"role": "assistant", "content": "Hello human!"},
    {"role": "user", "content": "What is your name?"},
]
MISTRAL_MESSAGES = (
    "[INST] {{ if .System }}{{ .System }}\n\n{{ end }}\n{{- range .Messages }}\n"
    '{{- if eq .Role "user" }}{{ .Content }}[/INST] {{ else if eq .Role "assistant" }}{{ .Content }}[INST] '
    "{{ end }}\n{{- end }}"
)


def test_ollama_mistral_vectors_with_and_without_system():
    assert (
        gotemplate.ollama_render(MISTRAL_MESSAGES, HELLO)
        == "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] "
    )
    with_system = [{"role": "system", "content": "You are a helpful assistant!"}, *HELLO]
    assert (
        gotemplate.ollama_render(MISTRAL_MESSAGES, with_system)
        == "[INST] You are a helpful assistant!\n\nHello friend![/INST] Hello human![INST] What is your name?[/INST] "
    )


def test_ollama_vectors_with_range_variables_and_a_trailing_assistant_turn():
    template = (
        '\n{{- range $i, $m := .Messages }}\n{{- if eq .Role "user" }}[INST] {{ .Content }}[/INST] '
        '{{ else if eq .Role "assistant" }}{{ .Content }}{{ end }}\n{{- end }}'
    )
    messages = [*HELLO, {"role": "assistant", "content": "My name is Ollama and I"}]
    assert (
        gotemplate.ollama_render(template, messages)
        == "[INST] Hello friend![/INST] Hello human![INST] What is your name?[/INST] My name is Ollama and I"
    )
    chatml = (
        "\n{{- range $index, $_ := .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
    )
    assert gotemplate.ollama_render(chatml, [{"role": "system", "content": "S"}, *HELLO]) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHello friend!<|im_end|>\n"
        "<|im_start|>assistant\nHello human!<|im_end|>\n<|im_start|>user\nWhat is your name?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_vars_match_ollamas_parse_test():
    template = (
        "{{- if .Messages }}\n{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n{{ else -}}\n{{ if .System }}<|im_start|>system\n{{ .System }}"
        "<|im_end|>\n{{ end }}{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n{{- end -}}"
    )
    assert sorted(gotemplate.identifiers(gotemplate.parse(template))) == [
        "content",
        "messages",
        "prompt",
        "response",
        "role",
        "system",
    ]


def test_go_builtins_variables_and_truthiness():
    template = (
        "{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}"
        "{{ .Role }}{{ if $last }}!{{ end }};{{ end }}"
        '{{ $x := 1 }}{{ $x = 2 }}{{ $x }} {{ or "" "b" }} {{ and 1 0 }} {{ not .Tools }} '
        '{{ (index .Messages 0).Role | print "r=" }} {{ len .Messages | eq 3 }} {{ .Missing }}'
    )
    assert (
        gotemplate.ollama_render(template, HELLO) == "user;assistant;user!;2 b 0 true r=user true <no value>"
    )


def test_ollama_merges_consecutive_turns_and_keeps_system_in_messages():
    system, collated = gotemplate.collate(
        [gotemplate._message(m) for m in [{"role": "system", "content": "A"}, *HELLO[:1], *HELLO[:1]]]
    )
    assert system == "A"
    assert [m["Role"] for m in collated] == ["system", "user"]
    assert collated[1]["Content"] == "Hello friend!\n\nHello friend!"


def test_unsupported_syntax_is_an_error_not_a_guess():
    with pytest.raises(gotemplate.GoTemplateError, match="define"):
        gotemplate.parse('{{ define "x" }}y{{ end }}')
    with pytest.raises(gotemplate.GoTemplateError, match="unclosed"):
        gotemplate.parse("{{ if .System }}x")
    with pytest.raises(gotemplate.GoTemplateError, match="Messages"):
        gotemplate.ollama_render("{{ .Prompt }}", HELLO)


# --------------------------------------------------------------------------- the student's template


@pytest.fixture(scope="module")
def student():
    from llamaduo_nb.embedded import student_base_dir

    folder = student_base_dir()
    return folder, ollama.chat_template_parts(folder)


def test_modelfile_template_renders_the_hf_chat_template_token_for_token(student):
    folder, parts = student
    assert parts["chatml"] and parts["default_system"].startswith("You are a helpful AI assistant")
    check = ollama.check_modelfile_template(folder, ollama.OLLAMA_CHATML, parts["default_system"])
    assert check == {"conversations": 4, "mismatches": [], "ok": True}
    # The probes cover a conversation with and one without a system turn.
    assert any(c[0]["role"] == "system" for c in ollama.PROBE_CONVERSATIONS)
    assert any(c[0]["role"] != "system" for c in ollama.PROBE_CONVERSATIONS)


def test_the_old_template_showed_the_system_prompt_twice(student):
    folder, parts = student
    old = (
        "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n"
    )
    rendered = gotemplate.ollama_render(
        old, [{"role": "user", "content": "Hi"}], system=parts["default_system"]
    )
    assert rendered.count("<|im_start|>system") == 2
    check = ollama.check_modelfile_template(folder, old, parts["default_system"])
    assert not check["ok"] and len(check["mismatches"]) == 4


def test_written_modelfile_reads_back_as_ollama_create_would(student, tmp_path):
    folder, parts = student
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "model-f16.gguf").write_bytes(b"GGUF")
    path = tmp_path / "Modelfile"
    path.write_text(ollama.modelfile_text("model-f16.gguf", parts, temperature=0.7, top_p=0.9, num_ctx=2048))
    commands = ollama.read_modelfile(path)
    assert commands["FROM_PATH"] == (tmp_path / "gguf" / "model-f16.gguf").resolve()
    assert commands["FROM_PATH"].is_file()
    assert commands["TEMPLATE"] == ollama.OLLAMA_CHATML
    assert commands["SYSTEM"] == parts["default_system"]
    params = dict(commands["PARAMETER"])
    assert params["top_k"] == "0" and params["repeat_penalty"] == "1" and params["min_p"] == "0"
    assert ("stop", "<|im_end|>") in commands["PARAMETER"]
