"""How the student is spoken to: its chat turns, its chat template and the token ids of a prompt.

One home for what training (02), inference (03), the judges' student-shaped requests (04), the teacher
study (05) and serving (06) must agree on: `student_messages` (one user turn after the row's system prompt),
the `student.chat_template` presets and how a tokenizer gets them, and the prompt / stop token ids the
generation engines use.
"""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, StudentConfig


def student_messages(instruction: str, system: str | None = None) -> list[dict[str, str]]:
    """How an instruction is put to the student, in training, inference and serving: one user turn, after
    the row's system prompt when it has one."""
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": instruction}]


# `student.chat_template` presets: (Jinja template, the token that ends an assistant turn). Both render the
# prompt as a prefix of the whole conversation, which the prompt-completion loss mask relies on.
CHAT_TEMPLATES: dict[str, tuple[str, str]] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "<|im_end|>",
    ),
    # Gemma's turn format: the assistant's role is called "model"; no system role.
    "gemma": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ raise_exception('gemma: no system role') }}{% endif %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
        "<end_of_turn>",
    ),
}


def apply_chat_template_setting(tokenizer: Any, student: StudentConfig, path: str) -> str:
    """Give the tokenizer the chat template the params ask for; returns where its template came from.

    A preset also makes its end-of-turn token the tokenizer's EOS, so training learns to stop there and
    generation stops there; the token must already be in the vocabulary (a new token would need new,
    untrained embeddings). A checkpoint with no template and none in the params is refused.
    """
    setting = student.chat_template
    if setting is None:
        if not tokenizer.chat_template:
            raise ConfigError(
                f"student.model_id: {student.model_id} ({path}) has no chat template. LlamaDuo fine-tunes a "
                "chat format: use an -Instruct / -it checkpoint, or give one in params, e.g. "
                "student.chat_template: gemma (presets: " + ", ".join(CHAT_TEMPLATES) + ") or a Jinja string"
            )
        return "checkpoint"
    if setting in CHAT_TEMPLATES:
        template, end_of_turn = CHAT_TEMPLATES[setting]
        token_id = tokenizer.convert_tokens_to_ids(end_of_turn)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ConfigError(
                f"student.chat_template: preset {setting!r} ends turns with {end_of_turn}, which is not a token "
                f"of {student.model_id}'s vocabulary; pick the preset of its family or give a Jinja template "
                f"that ends turns with its EOS token {tokenizer.eos_token!r}"
            )
        tokenizer.chat_template = template
        tokenizer.eos_token = end_of_turn
        return f"params preset {setting}"
    tokenizer.chat_template = setting
    return "params (Jinja string)"


def chat_template_source(student: StudentConfig) -> str:
    setting = student.chat_template
    if setting is None:
        return "the checkpoint's own"
    return f"params preset {setting}" if setting in CHAT_TEMPLATES else "params (Jinja string)"


def prompt_token_ids(tokenizer: Any, instruction: str, system: str | None = None) -> list[int]:
    """The student's chat-template prompt for `instruction` (after the row's system prompt, if any),
    ending with the assistant generation prompt."""
    out = tokenizer.apply_chat_template(
        student_messages(instruction, system), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids generation stops at: the model's generation-config EOS ids plus the tokenizer's EOS (a chat
    template preset made its end-of-turn token the EOS)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids
