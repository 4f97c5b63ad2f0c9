"""One record of the coverage source -> one row (id, instruction, response, category, system prompt).

Row shapes (auto-detected per row):
  * instruction/response pairs: {"instruction"|"prompt"|"question", "response"|"completion"|"output"|"answer",
    optional id, category, system}
  * a passage that belongs to the prompt (`schemas.CONTEXT_KEYS`): Alpaca {"instruction", "input", "output"},
    Dolly-15k {"instruction", "context", "response", "category"}, SQuAD-like {"context", "question", "answer"},
    BoolQ-like `passage`. ONE template for all of them (`with_context`):

        {instruction}

        {context}

    the instruction, a blank line, the passage — the order of Dolly's own training prompt (instruction, then
    its input) and of Alpaca's (the project kept Alpaca this way before). Rows without a passage keep their
    instruction as is, so their ids (a hash of the prompt, `content_id`) do not change; a row with a passage
    gets its id from the whole prompt, so Dolly's generic "Summarize this paragraph" over different passages
    is several rows, and the same instruction over the same passage is still a duplicate.
  * OpenAI chat: {"messages": [{role, content}, ...]} with an optional system turn (kept as the row's
    `system` prompt), and the No Robots schema {"prompt", "prompt_id", "messages", "category"}
  * ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}
`normalize_row` also says which of the record's keys it used, so the importer can name every column no row
used (a SQuAD `title`, a second prompt key, a `split` column without `coverage.splits`) in the report's
`unused_columns` with its count of non-empty values: no text is dropped in silence.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..schemas import CONTEXT_KEYS, INSTRUCTION_KEYS, RESPONSE_KEYS

ID_KEYS = ("id", "prompt_id")
# ShareGPT speaker names -> chat roles
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
PROMPT_TEMPLATE = "{instruction}\n\n{context}"  # what `with_context` builds (shown in 01)


class RowProblem(Exception):
    def __init__(self, field: str | None, problem: str):
        self.field, self.problem = field, problem


def _text(value: Any, name: str) -> str:
    if value is None:
        raise RowProblem(name, "missing")
    if not isinstance(value, str):
        raise RowProblem(name, f"expected text, got {type(value).__name__}")
    if "\ufffd" in value:
        raise RowProblem(name, "contains U+FFFD replacement characters (text was not valid UTF-8 upstream)")
    if not value.strip():
        raise RowProblem(name, "empty")
    return value.strip()


def _from_messages(messages: Any, name: str = "messages") -> tuple[str | None, str, str]:
    """(system prompt or None, user turn, assistant turn) of a single-turn chat."""
    if not isinstance(messages, list) or not messages:
        raise RowProblem(name, "expected a non-empty list of {role, content} turns")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowProblem(f"{name}[{i}]", "expected an object with 'role' and 'content'")
        turns.append(m)
    systems = [m for m in turns if m["role"] == "system"]
    if len(systems) > 1 or (systems and turns[0] is not systems[0]):
        raise RowProblem(name, "a system turn must come first, and only once")
    system = _text(systems[0]["content"], f"{name}[system].content") if systems else None
    dialogue = [m for m in turns if m["role"] != "system"]
    roles = [m["role"] for m in dialogue]
    if roles.count("user") > 1 or roles.count("assistant") > 1:
        raise RowProblem(
            name, f"multi-turn conversation ({len(dialogue)} turns); only single-turn pairs are used"
        )
    if roles != ["user", "assistant"]:
        raise RowProblem(name, f"expected a user turn followed by an assistant turn, got roles {roles}")
    return (
        system,
        _text(dialogue[0]["content"], f"{name}[user].content"),
        _text(dialogue[1]["content"], f"{name}[assistant].content"),
    )


def _sharegpt_messages(conversations: Any) -> list[dict]:
    """ShareGPT turns {"from", "value"} as chat messages {"role", "content"}."""
    if not isinstance(conversations, list) or not conversations:
        raise RowProblem("conversations", 'expected a non-empty list of {"from", "value"} turns')
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowProblem(f"conversations[{i}]", "expected an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).strip().lower())
        if role is None:
            raise RowProblem(
                f"conversations[{i}].from",
                f"unknown speaker {turn['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}",
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _optional_text(record: dict, key: str) -> str | None:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _text(value, key)


def with_context(instruction: str, contexts: Iterable[str]) -> str:
    """The prompt of a row whose passage belongs to it: instruction, blank line, passage (`PROMPT_TEMPLATE`).

    The one combining rule of every shape (Alpaca `input`, Dolly / SQuAD `context`, `passage`); with no
    non-empty passage the instruction comes back unchanged, so the row's id does not change either.
    """
    return "\n\n".join([instruction, *(c for c in contexts if c)])


@dataclass
class Normalized:
    id: str | None
    instruction: str
    response: str
    category: str
    system: str | None
    used: set[str]  # the record's keys whose text is in the row (or that only name its id/category/shape)
    contexts: dict[str, str]  # passage key -> text merged into the instruction


def normalize_row(record: Any) -> Normalized:
    """The row of one record (see the module docstring for the shapes), or raise RowProblem."""
    if not isinstance(record, dict):
        raise RowProblem(None, f"expected an object, got {type(record).__name__}")
    system = _optional_text(record, "system")
    used = {"system", "category"}
    contexts: dict[str, str] = {}
    if record.get("messages") is not None or record.get("conversations") is not None:
        if record.get("messages") is not None:
            chat_system, instruction, response = _from_messages(record["messages"])
            used.add("messages")
        else:
            messages = _sharegpt_messages(record["conversations"])
            chat_system, instruction, response = _from_messages(messages, "conversations")
            used.add("conversations")
        if chat_system and system and chat_system != system:
            raise RowProblem("system", "differs from the system turn of the conversation")
        system = chat_system or system
        prompt = record.get("prompt")
        if isinstance(prompt, str) and prompt.strip() and prompt.strip() != instruction:
            raise RowProblem("prompt", "differs from the user turn in 'messages'")
        used.add("prompt")
    else:
        ikey = next((k for k in INSTRUCTION_KEYS if k in record), None)
        rkey = next((k for k in RESPONSE_KEYS if k in record), None)
        if ikey is None:
            raise RowProblem(
                "instruction", f"missing (expected one of {INSTRUCTION_KEYS}, 'messages' or 'conversations')"
            )
        if rkey is None:
            raise RowProblem(
                "response", f"missing (expected one of {RESPONSE_KEYS}, 'messages' or 'conversations')"
            )
        instruction, response = _text(record[ikey], ikey), _text(record[rkey], rkey)
        used |= {ikey, rkey}
        for key in CONTEXT_KEYS:  # Alpaca input, Dolly / SQuAD context: part of the prompt
            if key != ikey and key in record:
                used.add(key)
                if text := _optional_text(record, key):
                    contexts[key] = text
        instruction = with_context(instruction, contexts.values())
    id_key = next((k for k in ID_KEYS if record.get(k) not in (None, "")), None)
    row_id = None if id_key is None else str(record[id_key]).strip()
    used.add(id_key or ID_KEYS[0])
    category = record.get("category") or "uncategorized"
    if not isinstance(category, str):
        raise RowProblem("category", f"expected text, got {type(category).__name__}")
    return Normalized(row_id, instruction, response, category.strip(), system, used, contexts)


def normalize_prompt(text: str) -> str:
    """Key under which two prompts count as the same prompt (case, unicode form and whitespace ignored)."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()


def content_id(instruction: str, system: str | None = None) -> str:
    return "cov-" + hashlib.sha256(prompt_key(instruction, system).encode()).hexdigest()[:12]


def prompt_key(instruction: str, system: str | None = None) -> str:
    """Two rows are the same prompt when instruction and system prompt match (normalised)."""
    key = normalize_prompt(instruction)
    return key if not system else f"{normalize_prompt(system)}\n{key}"
