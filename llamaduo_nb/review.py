"""Side-by-side review of a cycle's answers (04) and the run-level review decisions file.

The review shows each test prompt as a grid a person reads in one screen: the instruction and reference on
top (Markdown, code highlighted), then one column per model (the student, the base student, each service
baseline) and one row per sample, each cell the answer (short answers with the words that differ from the
reference marked) and compact score chips: the chosen judges' (by default the deciding ones) coloured
against ζ, a reference metric's one score (its precision equals its similarity), the spread only where
M > 1, the rationale folded under its chip, the other judges one click away. `filter_items` narrows and
sorts on the chosen judges' scores.

Input shapes (read defensively; extra fields are ignored):
  responses.jsonl  rows with prompt_id, instruction, reference, candidate, sample_index, category and an
                   optional `model` (a baseline's name); rows without `model` are the student's.
  judgments.jsonl  rows with prompt_id, sample_index, judge, repeat, ok, similarity, precision, optional
                   `model` (same key as the response it judges) and optional `rationale`.

What a reviewer decides is saved at once (atomically) to `<run>/review.json`:
    {"version": 1, "prompts": {prompt_id: {"bad_reference": bool, "reference_edit": str | null,
                                            "ambiguous": bool, "note": str, "cycle": int, "updated": iso}}}
01_coverage applies the reference decisions on its next run (`coverage.apply_review`: a bad reference is
dropped, or replaced by `reference_edit`); 04 leaves the prompts of `ambiguous_prompt_ids` out of the decision.
"""

from __future__ import annotations

import difflib
import html
import statistics
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt
from pygments import highlight as pygments_highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

from .config import METRIC_JUDGE_NAMES
from .jsonio import DataFileError, read_json, read_jsonl, write_json
from .runlayout import RunLayout

STUDENT = "student"
METRICS = ("precision", "similarity")
DECISION_FIELDS = {"bad_reference": bool, "reference_edit": (str, type(None)), "ambiguous": bool, "note": str}


# --------------------------------------------------------------------------- the decisions file


def load_review(path: str | Path) -> dict[str, dict]:
    """Review decisions by prompt id ({} when nothing was decided yet); a malformed file names the field."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = read_json(path)
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(prompts, dict):
        raise DataFileError(path, None, "prompts", 'expected {"version": 1, "prompts": {prompt_id: {...}}}')
    for prompt_id, entry in prompts.items():
        if not isinstance(entry, dict):
            raise DataFileError(path, None, f"prompts.{prompt_id}", "expected an object")
        for name, kind in DECISION_FIELDS.items():
            if name in entry and not isinstance(entry[name], kind):
                raise DataFileError(
                    path, None, f"prompts.{prompt_id}.{name}", f"wrong type {type(entry[name]).__name__}"
                )
    return prompts


def save_review(path: str | Path, prompts: dict[str, dict]) -> Path:
    return write_json(path, {"version": 1, "prompts": dict(sorted(prompts.items()))})


def record_decision(path: str | Path, prompt_id: str, cycle: int | None = None, **changes: Any) -> dict:
    """Apply `changes` (bad_reference, reference_edit, ambiguous, note) to one prompt and save at once.

    The file is re-read first, so two open views do not overwrite each other's other prompts. An entry
    left with nothing decided is removed. Returns the prompt's entry ({} when removed).
    """
    unknown = sorted(set(changes) - set(DECISION_FIELDS))
    if unknown:
        raise ValueError(f"unknown review decision field(s) {unknown}; known: {sorted(DECISION_FIELDS)}")
    prompts = load_review(path)
    entry = {"bad_reference": False, "reference_edit": None, "ambiguous": False, "note": ""}
    entry.update(prompts.get(prompt_id, {}))
    entry.update(changes)
    if isinstance(entry.get("reference_edit"), str) and not entry["reference_edit"].strip():
        entry["reference_edit"] = None
    if entry["reference_edit"] is not None:
        entry["bad_reference"] = True
    if entry["bad_reference"] or entry["ambiguous"] or entry["note"].strip():
        entry["cycle"] = cycle if cycle is not None else entry.get("cycle")
        entry["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        prompts[prompt_id] = entry
    else:
        prompts.pop(prompt_id, None)
        entry = {}
    save_review(path, prompts)
    return entry


def ambiguous_prompt_ids(layout: RunLayout) -> set[str]:
    """Test prompts a reviewer marked ambiguous: 04 leaves them out of the ε decision (and counts them)."""
    return {pid for pid, entry in load_review(layout.review_file).items() if entry.get("ambiguous")}


def review_counts(prompts: dict[str, dict]) -> dict[str, int]:
    entries = list(prompts.values())
    return {
        "bad_references": sum(bool(e.get("bad_reference")) for e in entries),
        "edited_references": sum(e.get("reference_edit") is not None for e in entries),
        "ambiguous": sum(bool(e.get("ambiguous")) for e in entries),
        "notes": sum(bool(str(e.get("note", "")).strip()) for e in entries),
    }


# --------------------------------------------------------------------------- review items


@dataclass(frozen=True)
class Spread:
    """The M repeats of one judge on one answer and one metric."""

    scores: tuple[float, ...]
    failures: int

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.scores) if self.scores else None

    @property
    def range(self) -> float:
        return max(self.scores) - min(self.scores) if self.scores else 0.0

    @property
    def sd(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0


@dataclass
class Candidate:
    model: str
    sample_index: int
    text: str
    finish_reason: str | None = None
    scores: dict[str, dict[str, Spread]] = field(default_factory=dict)  # judge -> metric -> repeats
    rationales: dict[str, list[str]] = field(default_factory=dict)  # judge -> one per repeat that gave one

    def score(self, metric: str, judges: Collection[str] | None = None) -> float | None:
        """Mean over `judges` (None: every judge) of each judge's mean over its repeats (None: unscored)."""
        means = [
            s[metric].mean
            for judge, s in self.scores.items()
            if (judges is None or judge in judges) and metric in s and s[metric].mean is not None
        ]
        return statistics.fmean(means) if means else None

    def disagreement(self, metric: str, judges: Collection[str] | None = None) -> float:
        """How far the chosen `judges` (None: every judge) are from the others and from themselves: the
        largest gap between a chosen judge's mean and any other judge's mean, or the widest range of a
        chosen judge's M repeats, whichever is larger."""
        spreads = {j: s[metric] for j, s in self.scores.items() if metric in s and s[metric].scores}
        chosen = [j for j in spreads if judges is None or j in judges]
        if not chosen:
            return 0.0
        gaps = [abs(spreads[a].mean - spreads[b].mean) for a in chosen for b in spreads if b != a]
        return max(max(gaps, default=0.0), max(spreads[j].range for j in chosen))


@dataclass
class ReviewItem:
    prompt_id: str
    cycle: int | None
    instruction: str
    reference: str
    category: str
    candidates: list[Candidate] = field(default_factory=list)

    def shown(self, model: str | None = None) -> list[Candidate]:
        return [c for c in self.candidates if model is None or c.model == model]

    def score(
        self, metric: str, model: str | None = STUDENT, judges: Collection[str] | None = None
    ) -> float | None:
        scores = [s for c in self.shown(model) if (s := c.score(metric, judges)) is not None]
        return statistics.fmean(scores) if scores else None

    def disagreement(
        self, metric: str, model: str | None = None, judges: Collection[str] | None = None
    ) -> float:
        return max((c.disagreement(metric, judges) for c in self.shown(model)), default=0.0)

    def judges(self) -> list[str]:
        return sorted({j for c in self.candidates for j in c.scores})

    def models(self) -> list[str]:
        return sorted({c.model for c in self.candidates}, key=lambda m: (m != STUDENT, m))

    def text(self) -> str:
        parts = [self.prompt_id, self.instruction, self.reference, self.category]
        parts += [c.text for c in self.candidates]
        parts += [r for c in self.candidates for rs in c.rationales.values() for r in rs]
        return "\n".join(parts).casefold()


def model_of(row: dict) -> str:
    """A response or judgment row's model: its `model` field (a baseline) or the student."""
    model = row.get("model")
    return str(model) if model not in (None, "") else STUDENT


def _sample(row: dict) -> int:
    value = row.get("sample_index", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def build_items(
    responses: Iterable[dict], judgments: Iterable[dict], cycle: int | None = None
) -> list[ReviewItem]:
    """Group responses by prompt and attach every judge's repeats; rows without a prompt_id are skipped."""
    items: dict[str, ReviewItem] = {}
    candidates: dict[tuple[str, str, int], Candidate] = {}
    for row in responses:
        prompt_id = row.get("prompt_id")
        if not isinstance(prompt_id, str):
            continue
        item = items.get(prompt_id)
        if item is None:
            item = items[prompt_id] = ReviewItem(
                prompt_id,
                cycle,
                str(row.get("instruction", "")),
                str(row.get("reference", "")),
                str(row.get("category") or "uncategorized"),
            )
        key = (prompt_id, model_of(row), _sample(row))
        if key not in candidates:
            candidate = Candidate(key[1], key[2], str(row.get("candidate", "")), row.get("finish_reason"))
            candidates[key] = candidate
            item.candidates.append(candidate)
    collected: dict[tuple, dict[str, dict[str, list[float]]]] = {}
    failures: dict[tuple, dict[str, int]] = {}
    for j in judgments:
        key = (j.get("prompt_id"), model_of(j), _sample(j))
        candidate = candidates.get(key)
        if candidate is None:
            continue
        judge = str(j.get("judge", "judge"))
        per_metric = collected.setdefault(key, {}).setdefault(judge, {m: [] for m in METRICS})
        if j.get("ok") and all(isinstance(j.get(m), int | float) for m in METRICS):
            for m in METRICS:
                per_metric[m].append(float(j[m]))
        else:
            failures.setdefault(key, {}).setdefault(judge, 0)
            failures[key][judge] += 1
        rationale = j.get("rationale")
        if isinstance(rationale, str) and rationale.strip():
            candidate.rationales.setdefault(judge, []).append(rationale.strip())
    for key, by_judge in collected.items():
        failed = failures.get(key, {})
        candidates[key].scores = {
            judge: {m: Spread(tuple(values[m]), failed.get(judge, 0)) for m in METRICS}
            for judge, values in sorted(by_judge.items())
        }
    for item in items.values():
        item.candidates.sort(key=lambda c: (c.model != STUDENT, c.model, c.sample_index))
    return sorted(items.values(), key=lambda i: i.prompt_id)


def load_items(layout: RunLayout, cycle: int) -> list[ReviewItem]:
    """The review items of one cycle: its responses.jsonl (required) and judgments.jsonl (if judged yet)."""
    responses_path = layout.responses_file(cycle)
    if not responses_path.is_file():
        raise FileNotFoundError(f"{responses_path} not found: run 03_batch_inference for cycle {cycle} first")
    judgments_path = layout.judgments_file(cycle)
    judgments = read_jsonl(judgments_path) if judgments_path.is_file() else []
    responses = read_jsonl(responses_path)
    extra_responses, extra_judgments = reference_answers(layout)
    return build_items(responses + extra_responses, judgments + extra_judgments, cycle)


def reference_answers(layout: RunLayout) -> tuple[list[dict], list[dict]]:
    """The run-level reference rows of Table 1 that 04 computed once (the student before fine-tuning and
    each service baseline, under `<run>/baselines/<model>/`), labelled with their model."""
    responses: list[dict] = []
    judgments: list[dict] = []
    if not layout.baselines_dir.is_dir():
        return responses, judgments
    for folder in sorted(p for p in layout.baselines_dir.iterdir() if p.is_dir()):
        model = "base student" if folder.name == "base_student" else folder.name
        answers = layout.baseline_responses_file(folder.name)
        scores = layout.baseline_judgments_file(folder.name)
        if answers.is_file():
            responses += [{**row, "model": model} for row in read_jsonl(answers)]
        if scores.is_file():
            judgments += [{**row, "model": model} for row in read_jsonl(scores)]
    return responses, judgments


def reviewable_cycles(layout: RunLayout) -> list[int]:
    return [c for c in layout.cycles() if layout.responses_file(c).is_file()]


SORTS = {
    "prompt id": "prompt id",
    "score ↑ (worst first)": "score",
    "disagreement ↓": "disagreement",
}


def filter_items(
    items: Sequence[ReviewItem],
    *,
    metric: str = "precision",
    below: float | None = None,
    disagreement: float | None = None,
    category: str | None = None,
    model: str | None = None,
    query: str = "",
    judges: Collection[str] | None = None,
    sort: str = "prompt id",
) -> list[ReviewItem]:
    """Items passing every given filter, in the `sort` order ("prompt id", "score", "disagreement").

    Scores are those of `judges` (None: every judge; the view's default is the judges that decide).
    below ζ: the shown model's mean score (over its samples and the judges) is under ζ (unscored items drop
    out); disagreement: on some shown answer a chosen judge differs from another judge, or its own M repeats
    spread, by at least that much.
    """
    needle = query.strip().casefold()
    out = []
    for item in items:
        if category is not None and item.category != category:
            continue
        if model is not None and not item.shown(model):
            continue
        if below is not None:
            score = item.score(metric, model, judges)
            if score is None or score >= below:
                continue
        if disagreement is not None and item.disagreement(metric, model, judges) < disagreement:
            continue
        if needle and needle not in item.text():
            continue
        out.append(item)
    sort = SORTS.get(sort, sort)
    if sort == "score":
        # worst first; unscored items last
        scores = {id(i): i.score(metric, model, judges) for i in out}
        out.sort(key=lambda i: (scores[id(i)] is None, scores[id(i)] or 0.0))
    elif sort == "disagreement":
        out.sort(key=lambda i: -i.disagreement(metric, model, judges))
    elif sort != "prompt id":
        raise ValueError(f"unknown sort {sort!r}; known: {sorted(set(SORTS.values()))}")
    return out


# --------------------------------------------------------------------------- rendering

_MARKDOWN = MarkdownIt("commonmark", {"html": False, "breaks": True})
SHORT_WORDS = 12  # answers and references this short get a word diff against the reference

CSS = """<style>
.llamaduo-review-item{font-size:13px;line-height:1.35}
.llamaduo-review-item .ld-head{margin:0 0 4px 0;color:#444}
.llamaduo-review-item .ld-top{display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);gap:8px}
.llamaduo-review-item .ld-box{border:1px solid #d0d7de;border-radius:4px;padding:3px 6px;background:#f6f8fa}
.llamaduo-review-item .ld-label{font-size:11px;font-weight:600;color:#57606a;text-transform:uppercase;
  letter-spacing:.03em}
.llamaduo-review-item .ld-md{max-height:11em;overflow:auto}
.llamaduo-review-item .ld-md p,.llamaduo-review-item .ld-md pre,.llamaduo-review-item .ld-md ul,
.llamaduo-review-item .ld-md ol{margin:2px 0}
.llamaduo-review-item .ld-md pre{padding:3px 5px;border-radius:3px;background:#f6f8fa;font-size:12px;
  white-space:pre-wrap;word-break:break-word}
.llamaduo-review-item .ld-grid{display:grid;gap:6px;margin-top:6px}
.llamaduo-review-item .ld-col{font-weight:600;border-bottom:2px solid #d0d7de;padding:0 2px}
.llamaduo-review-item .llamaduo-candidate{border:1px solid #d0d7de;border-left:4px solid #d0d7de;
  border-radius:4px;padding:3px 6px;min-width:0}
.llamaduo-review-item .llamaduo-candidate.ld-low{border-left-color:#cf222e}
.llamaduo-review-item .llamaduo-candidate.ld-ok{border-left-color:#1a7f37}
.llamaduo-review-item .ld-answer{max-height:9em}
.llamaduo-review-item .ld-sample{font-size:11px;color:#57606a}
.llamaduo-review-item .ld-chips{margin-top:3px;display:flex;flex-wrap:wrap;gap:3px;align-items:flex-start}
.llamaduo-review-item .llamaduo-chip{display:inline-block;border-radius:10px;padding:0 7px;font-size:12px;
  background:#eaeef2;color:#24292f;border:1px solid #d0d7de;white-space:nowrap}
.llamaduo-review-item .llamaduo-chip.ld-ok{background:#dafbe1;color:#116329;border-color:#4ac26b}
.llamaduo-review-item .llamaduo-chip.ld-low{background:#ffebe9;color:#a40e26;border-color:#ff8182}
.llamaduo-review-item details{display:inline-block;max-width:100%}
.llamaduo-review-item details>summary{cursor:pointer;list-style:none}
.llamaduo-review-item details>summary::-webkit-details-marker{display:none}
.llamaduo-review-item details[open]{display:block}
.llamaduo-review-item .ld-rationale{font-size:12px;font-style:italic;color:#444;margin:2px 0 2px 8px;
  white-space:pre-wrap}
.llamaduo-review-item .ld-more>summary{font-size:12px;color:#0969da}
.llamaduo-review-item mark.ld-diff{background:#fff1b8;padding:0 1px}
.llamaduo-review-item .ld-flag-bad{color:#a40e26;font-weight:600}
.llamaduo-review-item .ld-flag-amb{color:#9a6700;font-weight:600}
</style>"""


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _highlight(code: str, lang: str, _attrs: Any) -> str:
    """Pygments colours for a fenced code block (inline styles: nothing to install in the page)."""
    try:
        lexer = get_lexer_by_name(lang) if lang else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return ""  # markdown-it escapes the block itself
    formatter = HtmlFormatter(noclasses=True, nowrap=True, style="default")
    return f"<pre><code>{pygments_highlight(code, lexer, formatter)}</code></pre>"


_MARKDOWN.options["highlight"] = _highlight


def render_markdown(text: str) -> str:
    """Markdown as HTML: raw HTML in the text is escaped, never rendered; fenced code is highlighted."""
    return _MARKDOWN.render(text)


def _words(text: str) -> list[str]:
    return text.split()


def _norm(word: str) -> str:
    return word.strip(".,;:!?\"'()[]").casefold()


def word_diff(answer: str, reference: str) -> str | None:
    """The answer with the words that differ from the reference marked, for short answers (labels, phrases);
    None when either text is long or holds code (a diff would not help there)."""
    words, ref = _words(answer), _words(reference)
    if not words or len(words) > SHORT_WORDS or len(ref) > SHORT_WORDS or "```" in answer + reference:
        return None
    matcher = difflib.SequenceMatcher(a=[_norm(w) for w in ref], b=[_norm(w) for w in words], autojunk=False)
    out = []
    for tag, _i1, _i2, j1, j2 in matcher.get_opcodes():
        chunk = html.escape(" ".join(words[j1:j2]))
        if not chunk:
            continue
        out.append(
            chunk if tag == "equal" else f"<mark class='ld-diff' title='not in the reference'>{chunk}</mark>"
        )
    return "<p>" + " ".join(out) + "</p>"


def is_reference_metric(judge: str) -> bool:
    """A reference metric (ROUGE-L, chrF, exact match) scores precision = similarity: one score is shown."""
    return judge in METRIC_JUDGE_NAMES


def _chip(judge: str, per_metric: dict[str, Spread], metric: str, zeta: float | None, deciding: bool) -> str:
    """One judge's score on one answer: the mean (both metrics for an LLM judge, one for a reference
    metric), the spread only where M > 1, failures; coloured against ζ when the judge decides."""
    main = per_metric[metric]
    single = is_reference_metric(judge)
    shown = [metric] if single else [metric, *(m for m in METRICS if m != metric)]
    parts = [f"{'' if single else m[0].upper() + ' '}<b>{_fmt(per_metric[m].mean)}</b>" for m in shown]
    n = len(main.scores)
    title = f"{judge}: " + ", ".join(f"{m} {_fmt(per_metric[m].mean)}" for m in shown)
    if single:
        title += " (a reference metric: precision = similarity)"
    if n > 1:
        parts.append(f"±{main.sd:.0f}")
        title += f"; {metric} over M = {n} repeats: {_fmt(min(main.scores))}–{_fmt(max(main.scores))}"
        title += f", sd {main.sd:.1f}"
    if main.failures:
        parts.append(f"<span style='color:#a40e26'>{main.failures}✗</span>")
        title += f"; {main.failures} failed repeat(s)"
    state = ""
    if deciding and zeta is not None and main.mean is not None:
        state = " ld-ok" if main.mean >= zeta else " ld-low"
        title += f"; {'at or above' if main.mean >= zeta else 'below'} ζ = {zeta:g}"
    return (
        f"<span class='llamaduo-chip{state}' data-judge='{html.escape(judge)}' title='{html.escape(title)}'>"
        f"{html.escape(judge)} {' '.join(parts)}</span>"
    )


def render_scores(
    candidate: Candidate,
    judges: Collection[str] | None = None,
    zeta: float | None = None,
    metric: str = "precision",
) -> str:
    """Score chips: the chosen `judges` (None: every judge) first, coloured against ζ, each with its
    rationale folded under it; the other judges one click away."""
    if not candidate.scores:
        return "<div class='ld-chips'><i>not judged yet</i></div>"

    def chip(judge: str, deciding: bool) -> str:
        text = _chip(judge, candidate.scores[judge], metric, zeta, deciding)
        rationales = candidate.rationales.get(judge, [])
        if not rationales:
            return text
        said = "".join(f"<div class='ld-rationale'>“{html.escape(r)}”</div>" for r in rationales[:3])
        return (
            f"<details class='ld-why'><summary title='show the rationale'>{text} ▸</summary>{said}</details>"
        )

    chosen = [j for j in candidate.scores if judges is None or j in judges]
    others = [j for j in candidate.scores if j not in chosen]
    out = "".join(chip(j, True) for j in chosen) or "<i>not scored by the chosen judge</i>"
    if others:
        out += (
            f"<details class='ld-more'><summary>+{len(others)} other judge{'s' if len(others) > 1 else ''}"
            f"</summary>{''.join(chip(j, False) for j in others)}</details>"
        )
    return f"<div class='ld-chips'>{out}</div>"


def _flags(decision: dict) -> list[str]:
    flags = []
    if decision.get("bad_reference"):
        edited = " (corrected)" if decision.get("reference_edit") else " (01 drops it)"
        flags.append(f"<span class='ld-flag-bad'>reference marked bad{edited}</span>")
    if decision.get("ambiguous"):
        flags.append("<span class='ld-flag-amb'>ambiguous: left out of the decision</span>")
    if str(decision.get("note", "")).strip():
        flags.append(f"note: <i>{html.escape(decision['note'])}</i>")
    return flags


def render_item(
    item: ReviewItem,
    decision: dict | None = None,
    model: str | None = None,
    zeta: float | None = None,
    judges: Collection[str] | None = None,
    metric: str = "precision",
) -> str:
    """One prompt as a grid: instruction and reference on top (Markdown), then one column per model and
    one row per sample, each cell the answer with its score chips."""
    decision = decision or {}
    shown = item.shown(model)
    models = sorted({c.model for c in shown}, key=lambda m: (m != STUDENT, m))
    samples = sorted({c.sample_index for c in shown})
    by_cell = {(c.model, c.sample_index): c for c in shown}
    reference = render_markdown(item.reference)
    if decision.get("reference_edit"):
        reference += (
            f"<div style='color:#116329'><b>corrected:</b>{render_markdown(decision['reference_edit'])}</div>"
        )
    cells = []
    for m in models:
        score = item.score(metric, m, judges)
        cells.append(
            f"<div class='ld-col' title='mean {metric} of the chosen judges over its samples'>"
            f"{html.escape(m)} <span class='ld-sample'>· mean {_fmt(score)}</span></div>"
        )
    for k in samples:
        for m in models:
            c = by_cell.get((m, k))
            if c is None:
                cells.append("<div></div>")
                continue
            score = c.score(metric, judges)
            state = "" if zeta is None or score is None else (" ld-ok" if score >= zeta else " ld-low")
            cut = (
                " · <span style='color:#9a6700'>cut at max tokens</span>"
                if c.finish_reason == "length"
                else ""
            )
            answer = word_diff(c.text, item.reference) or render_markdown(c.text)
            cells.append(
                f"<div class='llamaduo-candidate{state}' data-model='{html.escape(m)}'>"
                f"<div class='ld-sample'>sample {c.sample_index}{cut}</div>"
                f"<div class='ld-md ld-answer'>{answer}</div>"
                f"{render_scores(c, judges, zeta, metric)}</div>"
            )
    columns = f"grid-template-columns:repeat({max(len(models), 1)},minmax(0,1fr))"
    grid = (
        f"<div class='ld-grid' style='{columns}'>{''.join(cells)}</div>"
        if shown
        else "<i>no answers for this model</i>"
    )
    return (
        f"{CSS}<div class='llamaduo-review-item'><div class='ld-head'><code>{html.escape(item.prompt_id)}"
        f"</code> · {html.escape(item.category)} · cycle {item.cycle}"
        + "".join(f" · {f}" for f in _flags(decision))
        + "</div><div class='ld-top'>"
        f"<div class='ld-box'><div class='ld-label'>instruction</div>"
        f"<div class='ld-md'>{render_markdown(item.instruction)}</div></div>"
        f"<div class='ld-box'><div class='ld-label'>reference</div><div class='ld-md'>{reference}</div></div>"
        f"</div>{grid}</div>"
    )


def decisions_table(prompts: dict[str, dict]):
    """The saved review decisions as a DataFrame (one row per prompt with a decision)."""
    import pandas as pd

    columns = ["prompt_id", "cycle", "bad_reference", "reference_edit", "ambiguous", "note", "updated"]
    return pd.DataFrame(
        [{"prompt_id": pid, **{c: e.get(c) for c in columns[1:]}} for pid, e in sorted(prompts.items())],
        columns=columns,
    )
