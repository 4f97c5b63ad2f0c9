"""Rows in: the text fields of a row in any schema 01_coverage accepts, and `RowError` for a row that cannot
be read (it names the input, "pool" | "against" | "test", and the 0-based row).

The instruction/response key names are `schemas.INSTRUCTION_KEYS` / `schemas.RESPONSE_KEYS`, the same
01_coverage reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..schemas import INSTRUCTION_KEYS, RESPONSE_KEYS

FIELDS = ("instruction", "response")


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content parts
        return "\n".join(
            str(part.get("text", "")) if isinstance(part, Mapping) else str(part) for part in content
        )
    raise ValueError(f"message content must be a string, got {type(content).__name__}")


def _string_field(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def row_text(row: Mapping[str, Any]) -> tuple[str, str]:
    """Return ``(instruction, response)`` of a row in any schema 01_coverage accepts.

    Chat format ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``:
    the instruction is the first user turn, the response the first assistant turn after it. Otherwise
    the first present of ``instruction | prompt | question | input`` and of ``response | completion |
    output | answer``; a missing response counts as empty.
    """
    if row.get("messages") is not None:
        return _chat_text(row["messages"])
    instruction_key = next((key for key in INSTRUCTION_KEYS if key in row), None)
    response_key = next((key for key in RESPONSE_KEYS if key in row), None)
    if instruction_key is None and response_key is None:
        raise ValueError(
            "row has no instruction/response fields and no 'messages'; expected e.g. "
            '{"instruction": "Summarize ...", "response": "..."} '
            f"(instruction keys: {', '.join(INSTRUCTION_KEYS)}; response keys: {', '.join(RESPONSE_KEYS)})"
        )
    return (
        _string_field(row, instruction_key) if instruction_key else "",
        _string_field(row, response_key) if response_key else "",
    )


def _chat_text(messages: Any) -> tuple[str, str]:
    if not isinstance(messages, list):
        raise ValueError('\'messages\' must be a list of {"role", "content"} objects')
    instruction: str | None = None
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError(f"each message must be an object with role and content, got {message!r:.60}")
        if instruction is None:
            if message.get("role") == "user":
                instruction = _content_text(message.get("content"))
        elif message.get("role") == "assistant":
            return instruction, _content_text(message.get("content"))
    if instruction is None:
        raise ValueError(
            "'messages' has no user turn; expected e.g. "
            '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
        )
    return instruction, ""


def _row_fields(row: Mapping[str, Any], text_fields: Sequence[str]) -> tuple[str, ...]:
    if not isinstance(row, Mapping):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    if text_fields == FIELDS:
        instruction, response = row.get("instruction"), row.get("response")
        if type(instruction) is str and type(response) is str and "messages" not in row:
            return instruction, response  # the common case, checked cheaply
        return row_text(row)
    pair = row_text(row) if any(name in FIELDS for name in text_fields) else ("", "")
    return tuple(
        pair[FIELDS.index(name)] if name in FIELDS else _string_field(row, name) for name in text_fields
    )


class RowError(ValueError):
    """A row cannot be read; ``source`` names the input ("pool", "against", "test"), ``index`` is 0-based."""

    def __init__(self, source: str, index: int, row: Any, problem: str):
        self.source, self.index, self.problem = source, index, problem
        row_id = row.get("id") if isinstance(row, Mapping) else None
        label = f"{source} row {index}" + (f" (id={row_id!r})" if row_id is not None else "")
        super().__init__(f"{label}: {problem}")


def _fields_of(
    rows: Sequence[Mapping[str, Any]], text_fields: Sequence[str], source: str
) -> list[tuple[str, ...]]:
    text_fields = tuple(text_fields)
    out = []
    for index, row in enumerate(rows):
        try:
            out.append(_row_fields(row, text_fields))
        except ValueError as exc:
            raise RowError(source, index, row, str(exc)) from None
    return out
