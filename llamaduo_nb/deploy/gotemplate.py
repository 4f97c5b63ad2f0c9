"""A small evaluator for the subset of Go's text/template that Ollama chat templates use.

Ollama renders prompts with Go's `text/template`; there is no Go toolchain or Ollama binary on the
machines this project is built on, so 06 checks its Modelfile TEMPLATE with this evaluator instead.
It covers what chat templates are written with:

* text and actions `{{ … }}` with Go's trim markers (`{{- ` eats the whitespace before, ` -}}` after);
* `if` / `else if` / `else` / `end`, `range` (with `$i, $m :=` or `$m :=`, and `else`), `with`;
* fields `.A.B`, `$`, `$var.Field`, variables declared with `:=` and set with `=` (scoped like Go);
* literals (strings, raw strings, numbers, true/false/nil), parenthesised pipelines, `|` pipes;
* the builtins `and or not eq ne lt le gt ge len index slice print println` and Ollama's `json`.

Truthiness and printing follow Go: empty strings, zero, nil, false and empty lists are false; nil
prints as `<no value>`. `ollama_render` adds what Ollama itself does around the template (the
Modelfile SYSTEM prepended when a conversation has no system message, `collate` merging consecutive
turns of one role, `.System` joining every system message while `.Messages` still holds them), as read
from ollama/ollama `server/routes.go` and `template/template.go`. Anything outside the subset raises
`GoTemplateError` rather than guessing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class GoTemplateError(ValueError):
    """The template uses syntax outside the supported subset, or is malformed."""


# --------------------------------------------------------------------------- lexing

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<raw>`[^`]*`)
      | (?P<num>-?\d+(?:\.\d+)?)
      | (?P<decl>:=)
      | (?P<assign>=)
      | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
      | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<punct>[(),|])
    )""",
    re.X,
)


def _split(source: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with Go's whitespace trimming applied."""
    parts: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(source):
        text = source[pos : m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        if text:
            parts.append(("text", text))
        body = m.group(2).strip()
        if not (body.startswith("/*") and body.endswith("*/")):
            parts.append(("action", body))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = source[pos:]
    if trim_next:
        text = text.lstrip(" \t\r\n")
    if text:
        parts.append(("text", text))
    return parts


def _tokens(body: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(body):
        if body[pos:].strip() == "":
            break
        m = _TOKEN.match(body, pos)
        if not m or m.end() == pos:
            raise GoTemplateError(f"cannot read {body[pos:]!r} in action {{{{ {body} }}}}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


# --------------------------------------------------------------------------- parsing


@dataclass
class _Pipeline:
    decl: list[str]  # variables declared (:=) or assigned (=)
    assign: bool
    commands: list[list[Any]]  # each command: list of args (("field", ".A"), ("pipe", _Pipeline), …)


@dataclass
class _Node:
    kind: str  # text | action | if | range | with
    text: str = ""
    pipe: _Pipeline | None = None
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


def _parse_args(tokens: list[tuple[str, str]], i: int, closing: bool) -> tuple[_Pipeline, int]:
    decl, assign = [], False
    # `$a :=`, `$a, $b :=`, `$a =`
    j = i
    names = []
    while j < len(tokens) and tokens[j][0] == "var":
        names.append(tokens[j][1])
        if j + 1 < len(tokens) and tokens[j + 1] == ("punct", ","):
            j += 2
            continue
        j += 1
        break
    if names and j < len(tokens) and tokens[j][0] in ("decl", "assign"):
        decl, assign, i = names, tokens[j][0] == "assign", j + 1
    commands: list[list[Any]] = [[]]
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "punct" and value == ")":
            if not closing:
                raise GoTemplateError("unexpected ')'")
            break
        if kind == "punct" and value == "|":
            commands.append([])
            i += 1
            continue
        if kind == "punct" and value == "(":
            inner, i = _parse_args(tokens, i + 1, closing=True)
            i += 1  # the ')'
            arg: Any = ("pipe", inner)
            if i < len(tokens) and tokens[i][0] == "field" and tokens[i][1] != ".":
                arg = ("chain", inner, tokens[i][1])
                i += 1
            commands[-1].append(arg)
            continue
        if kind in ("str", "raw", "num", "var", "field", "ident"):
            commands[-1].append((kind, value))
            i += 1
            continue
        raise GoTemplateError(f"unexpected {value!r}")
    if any(not c for c in commands):
        raise GoTemplateError("empty command in pipeline")
    return _Pipeline(decl, assign, commands), i


def _pipeline(body: str) -> _Pipeline:
    pipe, _ = _parse_args(_tokens(body), 0, closing=False)
    return pipe


def parse(source: str) -> list[_Node]:
    """The template as a node tree; raises GoTemplateError on unsupported or unbalanced syntax."""
    root: list[_Node] = []
    stack: list[tuple[_Node, str]] = []  # (node, which list we fill: body|orelse)

    def target() -> list[_Node]:
        if not stack:
            return root
        node, where = stack[-1]
        return node.body if where == "body" else node.orelse

    for kind, value in _split(source):
        if kind == "text":
            target().append(_Node("text", text=value))
            continue
        word = value.split(None, 1)[0] if value else ""
        rest = value[len(word) :].strip()
        if word in ("if", "range", "with"):
            node = _Node(word, pipe=_pipeline(rest))
            target().append(node)
            stack.append((node, "body"))
        elif word == "else":
            if not stack:
                raise GoTemplateError("{{ else }} outside if/range/with")
            node, _ = stack.pop()
            if rest.startswith("if ") or rest.startswith("with "):
                sub_word, sub_rest = rest.split(None, 1)
                chained = _Node(sub_word, pipe=_pipeline(sub_rest))
                node.orelse.append(chained)
                # the chained branch shares the outer {{ end }}
                stack.append((node, "chain"))
                stack.append((chained, "body"))
            else:
                stack.append((node, "orelse"))
        elif word == "end":
            if not stack:
                raise GoTemplateError("{{ end }} without an open block")
            stack.pop()
            while stack and stack[-1][1] == "chain":
                stack.pop()
        elif word in ("define", "template", "block", "break", "continue"):
            raise GoTemplateError(f"{{{{ {word} }}}} is outside the supported subset")
        else:
            target().append(_Node("action", pipe=_pipeline(value)))
    if stack:
        raise GoTemplateError(f"unclosed {{{{ {stack[-1][0].kind} }}}}")
    return root


# --------------------------------------------------------------------------- evaluation


def truth(value: Any) -> bool:
    """Go's notion of true for `if`, `with`, `and`, `or`, `not`."""
    if value is None or value is False:
        return False
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, str | list | tuple | dict):
        return len(value) > 0
    return True


def show(value: Any) -> str:
    """How Go's text/template prints a value."""
    if value is None:
        return "<no value>"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + " ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{show(v)}" for k, v in sorted(value.items())) + "]"
    return str(value)


def _field(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        return value.get(name)  # Ollama parses with missingkey=zero
    if value is None:
        raise GoTemplateError(f"nil pointer evaluating .{name}")
    if hasattr(value, name):
        return getattr(value, name)
    raise GoTemplateError(f"can't evaluate field {name} in {type(value).__name__}")


def _fields(value: Any, chain: str) -> Any:
    for name in [n for n in chain.split(".") if n]:
        value = _field(value, name)
    return value


def _eq(a: Any, *others: Any) -> bool:
    return any(a == b for b in others)


def _index(value: Any, *keys: Any) -> Any:
    for key in keys:
        try:
            value = value[key]
        except (IndexError, KeyError, TypeError) as exc:
            raise GoTemplateError(f"index of {show(value)} with {key!r}: {exc}") from exc
    return value


def _slice(value: Any, *bounds: int) -> Any:
    if len(bounds) == 0:
        return value
    if len(bounds) == 1:
        return value[bounds[0] :]
    return value[bounds[0] : bounds[1]]


FUNCS = {
    "not": lambda v: not truth(v),
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "len": len,
    "index": _index,
    "slice": _slice,
    "print": lambda *a: "".join(show(v) for v in a),
    "println": lambda *a: " ".join(show(v) for v in a) + "\n",
    "json": lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False),
}


class _Scope:
    def __init__(self, root: Any):
        self.frames: list[dict[str, Any]] = [{"$": root}]

    def get(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        raise GoTemplateError(f"undefined variable {name}")

    def declare(self, name: str, value: Any) -> None:
        self.frames[-1][name] = value

    def assign(self, name: str, value: Any) -> None:
        for frame in reversed(self.frames):
            if name in frame:
                frame[name] = value
                return
        raise GoTemplateError(f"undefined variable {name}")


def _arg(arg: Any, dot: Any, scope: _Scope) -> Any:
    kind = arg[0]
    if kind == "str":
        return json.loads(arg[1])
    if kind == "raw":
        return arg[1][1:-1]
    if kind == "num":
        return float(arg[1]) if "." in arg[1] else int(arg[1])
    if kind == "field":
        return dot if arg[1] == "." else _fields(dot, arg[1])
    if kind == "var":
        name, _, chain = arg[1].partition(".")
        return _fields(scope.get(name), chain)
    if kind == "pipe":
        return _run_pipeline(arg[1], dot, scope, declare=False)
    if kind == "chain":
        return _fields(_run_pipeline(arg[1], dot, scope, declare=False), arg[2])
    if kind == "ident":
        if arg[1] in ("true", "false"):
            return arg[1] == "true"
        if arg[1] == "nil":
            return None
        return _call(arg[1], [], dot, scope)
    raise GoTemplateError(f"unsupported argument {arg!r}")


def _call(name: str, args: list[Any], dot: Any, scope: _Scope, piped: tuple = ()) -> Any:
    if name in ("and", "or"):  # short-circuit, returning the deciding argument like Go
        values = [*args, *[("value", p) for p in piped]]
        result = None
        for a in values:
            result = a[1] if a[0] == "value" else _arg(a, dot, scope)
            if (name == "and") != truth(result):
                return result
        return result
    if name not in FUNCS:
        raise GoTemplateError(f'function "{name}" is outside the supported subset')
    return FUNCS[name](*[_arg(a, dot, scope) for a in args], *piped)


def _run_pipeline(pipe: _Pipeline, dot: Any, scope: _Scope, declare: bool = True) -> Any:
    value: Any = None
    for n, command in enumerate(pipe.commands):
        piped = (value,) if n > 0 else ()
        head = command[0]
        if head[0] == "ident" and head[1] not in ("true", "false", "nil"):
            value = _call(head[1], command[1:], dot, scope, piped)
        elif len(command) == 1 and not piped:
            value = _arg(head, dot, scope)
        else:
            raise GoTemplateError(f"cannot give arguments to a non-function {head[1]!r}")
    if declare and pipe.decl:
        if pipe.assign:
            scope.assign(pipe.decl[0], value)
        else:
            scope.declare(pipe.decl[-1], value)
    return value


def _execute(nodes: Sequence[_Node], dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "action":
            value = _run_pipeline(node.pipe, dot, scope)
            if not node.pipe.decl:
                out.append(show(value))
        elif node.kind in ("if", "with"):
            scope.frames.append({})
            value = _run_pipeline(node.pipe, dot, scope)
            if truth(value):
                _execute(node.body, value if node.kind == "with" else dot, scope, out)
            else:
                _execute(node.orelse, dot, scope, out)
            scope.frames.pop()
        elif node.kind == "range":
            pipe = node.pipe
            plain = _Pipeline([], False, pipe.commands)
            items = _run_pipeline(plain, dot, scope)
            pairs = list(items.items()) if isinstance(items, dict) else list(enumerate(items or []))
            if not pairs:
                _execute(node.orelse, dot, scope, out)
            for key, item in pairs:
                scope.frames.append({})
                if len(pipe.decl) == 2:
                    scope.declare(pipe.decl[0], key)
                    scope.declare(pipe.decl[1], item)
                elif len(pipe.decl) == 1:
                    scope.declare(pipe.decl[0], item)
                _execute(node.body, item, scope, out)
                scope.frames.pop()


def identifiers(nodes: Sequence[_Node]) -> set[str]:
    """Field and variable names a template mentions, lower-cased (Ollama's `Template.Vars`)."""
    names: set[str] = set()

    def from_pipe(pipe: _Pipeline | None) -> None:
        if pipe is None:
            return
        for command in pipe.commands:
            for arg in command:
                if arg[0] in ("field", "var"):
                    names.update(n.lower() for n in arg[1].lstrip("$").split(".") if n)
                elif arg[0] in ("pipe", "chain"):
                    from_pipe(arg[1])
                    if arg[0] == "chain":
                        names.update(n.lower() for n in arg[2].split(".") if n)

    for node in nodes:
        from_pipe(node.pipe)
        names |= identifiers(node.body) | identifiers(node.orelse)
    return names


def render(source: str, data: Any) -> str:
    """Execute a Go template on `data` (dicts play Go's maps and structs)."""
    out: list[str] = []
    _execute(parse(source), data, _Scope(data), out)
    return "".join(out)


# --------------------------------------------------------------------------- what Ollama does around it


def _message(msg: dict) -> dict:
    """An api.Message as a template sees it (Go field names, zero values for what a turn lacks)."""
    return {
        "Role": msg["role"],
        "Content": msg.get("content", ""),
        "Thinking": "",
        "Images": None,
        "ToolCalls": None,
        "ToolName": "",
    }


def collate(messages: Sequence[dict]) -> tuple[str, list[dict]]:
    """Ollama's `collate`: all system contents joined by a blank line, consecutive same-role turns merged
    (tool turns excepted); the system messages stay in the list."""
    system, collated = [], []
    for msg in messages:
        if msg["Role"] == "system":
            system.append(msg["Content"])
        if collated and collated[-1]["Role"] == msg["Role"] and msg["Role"] != "tool":
            collated[-1] = {**collated[-1], "Content": collated[-1]["Content"] + "\n\n" + msg["Content"]}
        else:
            collated.append(dict(msg))
    return "\n\n".join(system), collated


def ollama_render(template: str, messages: Sequence[dict], system: str | None = None) -> str:
    """The prompt Ollama's /api/chat builds for `messages` from a Modelfile's TEMPLATE and SYSTEM.

    Follows ChatHandler (the Modelfile SYSTEM is prepended as a system message unless the request's first
    message is a system message) and Template.Execute for templates that use `.Messages` (the only kind
    06 writes); the context-window truncation of `chatPrompt` is not modelled (conversations must fit).
    """
    nodes = parse(template)
    if "messages" not in identifiers(nodes):
        raise GoTemplateError(
            "only templates that range over .Messages are modelled (Ollama's legacy path differs)"
        )
    msgs = [_message(m) for m in messages]
    if system and (not msgs or msgs[0]["Role"] != "system"):
        msgs.insert(0, _message({"role": "system", "content": system}))
    joined, collated = collate(msgs)
    data = {
        "System": joined,
        "Messages": collated,
        "Tools": None,
        "Response": "",
        "Think": False,
        "IsThinkSet": False,
        "Query": "",
        "Document": "",
        "Instruction": "",
    }
    out: list[str] = []
    _execute(nodes, data, _Scope(data), out)
    return "".join(out)
