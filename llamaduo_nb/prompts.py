"""Prompt templates in `prompts/`: load them and fill their `$name` placeholders strictly.

A template is a text file (`prompts/judge.md`, `prompts/synthesize_*.md`) using `string.Template`
placeholders (`$instruction`, `${topic}`); a literal dollar sign is written `$$`. A leading HTML comment
(`<!-- ... -->`) documents the template for people and is not sent to the model.

Rendering is strict in both directions: a placeholder without a value and a value without a placeholder
are both errors, so a renamed placeholder cannot silently produce a prompt with a hole in it.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"

_LEADING_COMMENT = re.compile(r"\A\s*<!--.*?-->\s*", re.DOTALL)


class TemplateError(ValueError):
    """A prompt template is malformed or was rendered with missing/extra values."""


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    path: Path
    text: str  # the body sent to the model (without the leading comment)

    @property
    def placeholders(self) -> frozenset[str]:
        return frozenset(string.Template(self.text).get_identifiers())

    def render(self, **values: str) -> str:
        """Fill every placeholder; missing or unexpected values raise TemplateError."""
        expected = self.placeholders
        missing = sorted(expected - set(values))
        extra = sorted(set(values) - expected)
        if missing or extra:
            problems = []
            if missing:
                problems.append(f"no value for placeholder(s) {missing}")
            if extra:
                problems.append(f"value(s) {extra} have no placeholder")
            raise TemplateError(
                f"{self.path}: {'; '.join(problems)}; the template declares {sorted(expected)}"
            )
        for key, value in values.items():
            if not isinstance(value, str):
                raise TemplateError(
                    f"{self.path}: value for ${key} must be a str, got {type(value).__name__}"
                )
        return string.Template(self.text).substitute(values)


def load_template(
    name: str, prompts_dir: str | Path = PROMPTS_DIR, required: set[str] | None = None
) -> PromptTemplate:
    """Read `prompts/<name>.md` (or `.txt`); `required` lists the placeholders the caller will fill."""
    folder = Path(prompts_dir)
    candidates = [folder / f"{name}.md", folder / f"{name}.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise TemplateError(
            f"prompt template '{name}' not found (looked for {', '.join(map(str, candidates))})"
        )
    text = _LEADING_COMMENT.sub("", path.read_text(encoding="utf-8"), count=1).strip() + "\n"
    template = string.Template(text)
    if not template.is_valid():
        bad = re.findall(r"\$(?![A-Za-z_{$])\S?", text)
        raise TemplateError(
            f"{path}: invalid placeholder syntax near {bad[:3]}; use $name or ${{name}}, and $$ for a literal $"
        )
    loaded = PromptTemplate(name=name, path=path, text=text)
    if required is not None and loaded.placeholders != set(required):
        raise TemplateError(
            f"{path}: placeholders {sorted(loaded.placeholders)} differ from the expected {sorted(required)}"
        )
    return loaded
