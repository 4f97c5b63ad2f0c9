"""Reading a reply: lenient JSON extraction, schema checks, and whether a reply is usable as an answer.

`find_json` / `extract_json` find JSON values in free text (code fences, prose, rubric brackets around them are
fine); `parse_structured` checks the value against the request's schema (a failure sets `parse_error`, it never
raises); `unusable_reason` tells an answer from an empty, truncated, refused or blocked reply (those are never
cached as answers). `answered` / `replayed` build the `ChatResult` of a usable reply, live or from the cache; the n completions of an
n > 1 request are cached as one JSON list in the text column (`cached_text`, read back by `replayed`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from ..callcache import CachedCall
from .types import ChatRequest, ChatResult, Choice, Reply


def find_json(text: str, wanted: Callable[[Any], bool] | None = None) -> list[Any]:
    """Every JSON object or array in `text` that `wanted` accepts (all of them without `wanted`), in order.

    Scans each `{` and `[` (code fences, prose, rubric brackets around it are fine); a value that decodes
    but is not wanted is looked into, so {"result": {...wanted...}} finds the inner object; the inside of a
    wanted value is not searched again.
    """
    decoder = json.JSONDecoder()
    found: list[Any] = []
    end = 0
    for match in re.finditer(r"[{\[]", text):
        if match.start() < end:
            continue
        try:
            value, stop = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if wanted is None or wanted(value):
            found.append(value)
            end = stop
    return found


def extract_json(text: str, wanted: Callable[[Any], bool] | None = None) -> Any:
    """The first JSON object or array in `text` that `wanted` accepts (the first of any kind without it).

    So "rubric [1] ... {json}" yields the object when `wanted` asks for its keys. Raises ValueError when
    there is none.
    """
    found = find_json(text, wanted) if wanted is not None else _first_json(text)
    if not found:
        what = "JSON object with the expected keys" if wanted is not None else "JSON object or array"
        raise ValueError(f"no {what} found in the reply")
    return found[0]


def _first_json(text: str) -> list[Any]:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            return [decoder.raw_decode(text, match.start())[0]]
        except json.JSONDecodeError:
            continue
    return []


def parse_structured(text: str, schema: dict | None) -> tuple[Any | None, str | None]:
    """(parsed, parse_error): lenient JSON extraction, then validation against `schema` when given."""
    try:
        value = extract_json(text)
    except ValueError as exc:
        snippet = text.strip().replace("\n", " ")[:120]
        return None, f"{exc}: {snippet!r}"
    if schema:
        import jsonschema

        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "<root>"
            return None, f"reply does not match the schema at {where}: {exc.message}"
        except jsonschema.SchemaError as exc:
            return value, f"the request's JSON schema is invalid, reply not checked: {exc.message}"
    return value, None


# --------------------------------------------------------------------------- usable replies


_LENGTH_STOPS = frozenset({"length", "max_tokens", "MAX_TOKENS"})
_BLOCKED_STOPS = frozenset(
    {
        "content_filter",
        "refusal",
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "LANGUAGE",
        "OTHER",
    }
)


def unusable_reason(reply: Reply, max_tokens: int, allow_truncated: bool = False) -> tuple[str, bool] | None:
    """(why the reply cannot be used as an answer, whether re-sending may help) or None for a usable reply.

    Usable replies are the only ones cached as answers; the others are ledgered (they were paid), kept with
    their raw text in the failed-replies table, and re-sent under the provider's `unusable_retries`. A reply
    with n completions is usable when each of them is (the first unusable one gives the reason).
    """
    for choice in reply.choices:
        one = Reply(choice.text, reply.input_tokens, choice.output_tokens, choice.finish_reason)
        if (why := unusable_reason(one, max_tokens, allow_truncated)) is not None:
            return why
    if reply.choices:
        return None
    finish = reply.finish_reason or ""
    empty = not reply.text.strip()
    if finish in _LENGTH_STOPS:
        if empty:
            return (
                f"empty reply with a length stop (finish_reason {finish}): the model spent all max_tokens="
                f"{max_tokens} before answering, e.g. on thinking; raise max_tokens or lower the provider's "
                "reasoning_effort / thinking_budget",
                False,
            )
        if allow_truncated:
            return None
        return f"truncated reply (finish_reason {finish} at max_tokens={max_tokens})", False
    if finish in _BLOCKED_STOPS or reply.text.startswith("[refusal]"):
        return f"refused or blocked reply (finish_reason {finish or 'refusal'})", True
    if empty:
        return f"empty reply (finish_reason {finish or 'none'})", True
    return None


# --------------------------------------------------------------------------- results of usable replies


def answered(
    request: ChatRequest,
    text: str,
    input_tokens: int,
    output_tokens: int,
    latency_s: float,
    cost_usd: float,
    cached: bool,
    attempts: int,
    cache_key: str,
    finish_reason: str | None = None,
    choices: list[Choice] | None = None,
) -> ChatResult:
    """A successful call's result, live or replayed: the text parsed against the request's schema, if any."""
    parsed, parse_error = (
        parse_structured(text, request.json_schema) if request.json_schema is not None else (None, None)
    )
    return ChatResult(
        text=text,
        parsed=parsed,
        parse_error=parse_error,
        error=None,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        latency_s=latency_s,
        cost_usd=cost_usd,
        cached=cached,
        attempts=attempts,
        cache_key=cache_key,
        finish_reason=finish_reason,
        choices=list(choices or []),
    )


def cached_text(reply: Reply) -> str:
    """What the cache keeps of a usable reply: its text, or for n completions a JSON list of
    {"text", "output_tokens", "finish_reason"} (so one cached request replays all of them)."""
    if not reply.choices:
        return reply.text
    return json.dumps(
        [
            {"text": c.text, "output_tokens": c.output_tokens, "finish_reason": c.finish_reason}
            for c in reply.choices
        ],
        ensure_ascii=False,
    )


def replayed(hit: CachedCall, request: ChatRequest) -> ChatResult:
    """The result of a cached answer: free, no attempts (an n > 1 request gets its n completions back)."""
    choices = [Choice(**c) for c in json.loads(hit.text)] if request.n > 1 else []
    text = choices[0].text if choices else hit.text
    return answered(
        request, text, hit.input_tokens, hit.output_tokens, 0.0, 0.0, True, 0, hit.cache_key, choices=choices
    )
