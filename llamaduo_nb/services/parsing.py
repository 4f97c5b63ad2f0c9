"""Reading a reply: the one rule that picks a reply's answer out of free text, schema checks, usable replies.

`find_json` / `json_spans` find JSON values in free text (code fences, prose, rubric brackets around them are
fine). `read_one` is THE rule every structured reply is read by — the pool's generic parse, the judge (04),
the reward judge (teacher study) and the pair generator (05) alike:

* the candidates are the JSON values the reader wants (an object with its keys, a value valid against the
  schema), found anywhere in the text;
* a quoted example or placeholder is never the answer: a value whose every text field is a hint ("<score>",
  "<integer 1-100>", "...", "1-100", "[rationale]", "your score here") is a placeholder, and (for readers that
  ask for it) a value the prose introduces as an example ("For example:", "e.g.", "an example of the
  format", "the format is", "Expected format:", "... would look like") or calls one right after it ("{...} is
  just an example") is a quote, not the reply's answer ("Here is my verdict in the requested format:" is not);
* several candidates whose readings DIFFER are a failure, never "the first" or "the last": a reply that
  quotes another object or corrects itself ("first {a} ... on reflection {b}") is ambiguous in general (the
  corrected value may come first, "{b}, not {a}", or last), and a failure is counted and kept with its raw
  text while a wrong pick becomes a wrong score; candidates that read the same (a judge repeating its
  verdict, with or without a different rationale) are one answer.

A request may carry its stage's `reader` (text -> value, ValueError when the reply is not an answer): then
`answered` / `replayed` fill `parsed` / `parse_error` with that reading — live replies, cache replays and
provider batch results alike — and the pool never picks a value by itself; without a reader, `parse_structured`
reads the one value valid against the request's schema by the same rule. A failure sets `parse_error`, it never
raises. `unusable_reason` tells an answer from an empty, truncated, refused or blocked reply (those are never
cached as answers). `answered` / `replayed` build the
`ChatResult` of a usable reply; the n completions of an n > 1 request are cached as one JSON list in the text
column (`cached_text`, read back by `replayed`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from ..callcache import CachedCall
from .types import ChatRequest, ChatResult, Choice, Reply


def json_spans(text: str, wanted: Callable[[Any], bool] | None = None) -> list[tuple[Any, int, int]]:
    """(value, start, end) of every JSON object or array in `text` that `wanted` accepts (all of them without
    `wanted`), in order.

    Scans each `{` and `[` (code fences, prose, rubric brackets around it are fine); a value that decodes
    but is not wanted is looked into, so {"result": {...wanted...}} finds the inner object; the inside of a
    wanted value is not searched again.
    """
    decoder = json.JSONDecoder()
    found: list[tuple[Any, int, int]] = []
    end = 0
    for match in re.finditer(r"[{\[]", text):
        if match.start() < end:
            continue
        try:
            value, stop = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if wanted is None or wanted(value):
            found.append((value, match.start(), stop))
            end = stop
    return found


def find_json(text: str, wanted: Callable[[Any], bool] | None = None) -> list[Any]:
    """Every JSON object or array in `text` that `wanted` accepts (all of them without `wanted`), in order
    (see `json_spans`)."""
    return [value for value, _, _ in json_spans(text, wanted)]


def extract_json(text: str, wanted: Callable[[Any], bool] | None = None) -> Any:
    """The first JSON object or array in `text` that `wanted` accepts (the first of any kind without it).

    A low-level helper, not a reading of a reply's answer (that is `read_one`). Raises ValueError when there
    is none.
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


# --------------------------------------------------------------------------- the one reading of a reply

# A text field that only says what goes there: "<score>", "<integer 1-100>", "...", "1-100", "[rationale]",
# "{score}", "your score here". `<div>`-like tags are not hints (no space and not a hint word); short words
# ("X", "?", "n/a") are not either: they are real answers too often (a pair answering "X").
_HINT_WORDS = (
    r"score|scores|integer|int|number|float|string|text|value|instruction|response|answer|question|output|"
    r"similarity|precision|quality|rationale|reason|explanation|sentence|why|here"
)
_HINT = re.compile(
    r"(?:\.\s*){2,}|…+"
    r"|(?:(?:integer|int|number|score|float)\s*)?[(\[]?\s*\d+\s*(?:-|–|—|to|\.\.)\s*\d+\s*[)\]]?"
    rf"|<\s*(?:{_HINT_WORDS})\s*>|<[^<>=\"']*(?:\s|:)[^<>=\"']*>"
    r"|\[[^\[\]\d]*[A-Za-z][^\[\]\d]*\]|\{[^{}\d]*[A-Za-z][^{}\d]*\}"
    r"|(?:your|insert|enter|put)\s+(?:\w+\s+){0,3}here",
    re.IGNORECASE,
)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def is_placeholder(value: Any) -> bool:
    """Whether a JSON value only shows a shape: it has text fields and every field is a hint ("<score>",
    "<integer 1-100>", "...", "1-100", "[rationale]", "your score here"). One real field (a number, a real
    sentence) makes it a value, so a pair whose answer happens to be "..." is still a pair."""
    leaves = _leaves(value)
    texts = [leaf for leaf in leaves if isinstance(leaf, str)]
    return bool(texts) and len(texts) == len(leaves) and all(_HINT.fullmatch(t.strip()) for t in texts)


# The clause right before a value that introduces it as an example, and the words right after one that call
# it one. "Here is my verdict in the requested format:" is NOT an example; "the format is", "Expected format:" and
# "e.g." are.
_EXAMPLE_BEFORE = re.compile(
    r"\bfor\s+(?:example|instance)\b|\beg\b"
    r"|(?:^|\b(?:an?|one|another|some|this\s+is\s+an?|here\s+is\s+an?|here's\s+an?)\s+)"
    r"(?:example|sample|illustration)s?\b"
    r"|\b(?:example|sample)\s+(?:output|reply|response|answer|judge?ment|verdict|object|format|json)\b"
    r"|\bplaceholders?\b|\bhypothetical(?:ly)?\b"
    r"|\b(?:format|template|schema|shape)\s+(?:is|was|should\s+be|would\s+be|looks\s+like|reads)\b"
    r"|\b(?:should|would|could|might|must)\s+look\s+like\b|\b(?:something|a\s+reply)\s+like\b",
    re.IGNORECASE,
)
_EXAMPLE_AFTER = re.compile(
    r"[\s`]*(?:\(\s*|(?:[—–,]|-{1,2})?\s*(?:is|was|would\s+be|being|as)\s+)(?:just\s+|only\s+|merely\s+)?"
    r"(?:an?\s+)?(?:example|illustration|sample|placeholder|template)\b",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.!?;](?:\s|$)|\n\s*\n")
_EG = re.compile(r"\be\.\s?g\.?,?", re.IGNORECASE)
_FENCE_TAIL = re.compile(r"(?:```[A-Za-z]*|<[A-Za-z_]+>|\s)+$")
EXAMPLE_WINDOW = 300  # how far back the clause introducing a value is looked for


# "Expected format:", "Output format:", "Format:" right before a value name the format, not the answer; "in the
# requested format:", "following the format:" announce the answer.
_FORMAT_LABEL = re.compile(r"\b(?:format|schema|template)\s*:?\s*$", re.IGNORECASE)
_IN_FORMAT = re.compile(
    r"\b(?:in|using|with|following|per|to|as)\b.*\b(?:format|schema|template)\b", re.IGNORECASE
)


def quoted_as_example(text: str, start: int, end: int, since: int = 0) -> bool:
    """Whether the prose introduces the JSON value at text[start:end] as an example (the clause right before
    it, after `since`, e.g. the end of the previous value) or calls it one right after it."""
    before = _FENCE_TAIL.sub("", text[max(since, start - EXAMPLE_WINDOW) : start])
    before = _EG.sub("eg", before)  # "e.g." ends no sentence
    if before and before[-1] in ".!?;":
        before = ""  # the value starts a sentence of its own
    clause = _SENTENCE_END.split(before)[-1]
    if _EXAMPLE_BEFORE.search(clause) or (_FORMAT_LABEL.search(clause) and not _IN_FORMAT.search(clause)):
        return True
    return bool(_EXAMPLE_AFTER.match(text[end : end + 40]))


def read_one(
    text: str,
    wanted: Callable[[Any], bool],
    read: Callable[[Any], Any] = lambda value: value,
    *,
    what: str = "JSON value",
    whats: str | None = None,
    examples: bool = True,
    none_found: Callable[[str], Any] | None = None,
) -> tuple[Any, Any]:
    """(reading, value): the one answer of a reply, by the module's rule; ValueError says why there is none.

    `wanted` picks the candidate values (an object with the reader's keys, a value valid against a schema),
    `read` reads one (ValueError when it is not an answer: a candidate that does not read is a failure of
    the reply, never skipped). Placeholders are never candidates; values introduced as examples are not
    either unless `examples` is False (a reader whose answer IS a set of examples — synthesis' pairs, "Here
    are three example pairs:" — says so). Several candidates whose readings differ are a failure, never the
    first or the last (why: the module docstring); equal readings are one answer (the first value is returned). When nothing is wanted, `none_found(text)` (if
    given) raises the reader's own explanation (say what is wrong with the JSON that is there).
    """
    text = text or ""
    candidates, shown_only = [], 0
    since = 0
    for value, start, end in json_spans(text, wanted):
        if is_placeholder(value) or (examples and quoted_as_example(text, start, end, since)):
            shown_only += 1
        else:
            candidates.append(value)
        since = end
    if not candidates:
        if shown_only:
            raise ValueError(
                f"the reply holds only quoted examples or placeholders ({shown_only}), no {what} of its own"
            )
        if none_found is not None:
            none_found(text)
        raise ValueError(f"no {what} found in the reply: {_snippet(text)!r}")
    readings = [read(value) for value in candidates]
    if any(reading != readings[0] for reading in readings[1:]):
        shown = "; ".join(json.dumps(v, ensure_ascii=False, default=str)[:160] for v in candidates[:4])
        raise ValueError(f"the reply holds {len(candidates)} different {whats or what + 's'}: {shown}")
    return readings[0], candidates[0]


def _snippet(text: str) -> str:
    return (text or "").strip().replace("\n", " ")[:120]


def _anything(value: Any) -> str | None:
    return None


def _schema_check(schema: dict) -> Callable[[Any], str | None]:
    """A function telling why a value does not match `schema` (None when it does)."""
    import jsonschema

    validator = jsonschema.validators.validator_for(schema)(schema)

    def problem(value: Any) -> str | None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "<root>"
        return f"reply does not match the schema at {where}: {error.message}"

    return problem


def parse_structured(text: str, schema: dict | None) -> tuple[Any | None, str | None]:
    """(parsed, parse_error): the one JSON value of `text` valid against `schema` (any JSON value without a
    schema), by `read_one`'s rule; a reply with none says what is wrong with its first JSON value."""
    import jsonschema

    if schema:
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            try:
                value = extract_json(text)
            except ValueError as no_json:
                return None, f"{no_json}: {_snippet(text)!r}"
            return value, f"the request's JSON schema is invalid, reply not checked: {exc.message}"
        problem = _schema_check(schema)
    else:
        problem = _anything

    def none_found(reply: str) -> None:
        first = _first_json(reply)
        if not first:
            raise ValueError(f"no JSON object or array found in the reply: {_snippet(reply)!r}")
        raise ValueError(problem(first[0]) or "no JSON value matches the schema")

    try:
        value, _ = read_one(text, lambda v: problem(v) is None, what="JSON value", none_found=none_found)
    except ValueError as exc:
        return None, str(exc)
    return value, None


def read_reply(request: ChatRequest, text: str) -> tuple[Any | None, str | None]:
    """(parsed, parse_error) of a usable reply to `request`: its `reader`'s reading when it has one, else the
    value valid against its `json_schema` (`parse_structured`), else nothing to read."""
    if request.reader is not None:
        try:
            return request.reader(text), None
        except ValueError as exc:
            return None, str(exc)
    if request.json_schema is not None:
        return parse_structured(text, request.json_schema)
    return None, None


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
    """A successful call's result, live, replayed or from a batch: the text read by `read_reply`."""
    parsed, parse_error = read_reply(request, text)
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
