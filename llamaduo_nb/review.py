"""Side-by-side review of a cycle's answers (04) and the run-level review decisions file.

The review puts each test prompt's instruction beside its reference and every candidate answer — the
student's K samples and, when present, the service baselines' answers — with each judge's scores: the mean
of the M repeats, their spread, and the judge's rationale when it gave one.

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

import html
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

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

    def score(self, metric: str) -> float | None:
        """Mean over judges of each judge's mean over its repeats (None when no judge scored it)."""
        means = [s[metric].mean for s in self.scores.values() if metric in s and s[metric].mean is not None]
        return statistics.fmean(means) if means else None

    def disagreement(self, metric: str) -> float:
        """The larger of the gap between judges' means and the widest range of one judge's M repeats."""
        spreads = [s[metric] for s in self.scores.values() if metric in s and s[metric].scores]
        if not spreads:
            return 0.0
        means = [s.mean for s in spreads]
        return max(max(means) - min(means), max(s.range for s in spreads))


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

    def score(self, metric: str, model: str | None = STUDENT) -> float | None:
        scores = [s for c in self.shown(model) if (s := c.score(metric)) is not None]
        return statistics.fmean(scores) if scores else None

    def disagreement(self, metric: str, model: str | None = None) -> float:
        return max((c.disagreement(metric) for c in self.shown(model)), default=0.0)

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


def filter_items(
    items: Sequence[ReviewItem],
    *,
    metric: str = "precision",
    below: float | None = None,
    disagreement: float | None = None,
    category: str | None = None,
    model: str | None = None,
    query: str = "",
) -> list[ReviewItem]:
    """Items passing every given filter.

    below ζ: the shown model's mean score (over its samples and judges) is under ζ (unscored items drop out);
    disagreement: some shown answer's judges differ, or one judge's repeats spread, by at least that much.
    """
    needle = query.strip().casefold()
    out = []
    for item in items:
        if category is not None and item.category != category:
            continue
        if model is not None and not item.shown(model):
            continue
        if below is not None:
            score = item.score(metric, model)
            if score is None or score >= below:
                continue
        if disagreement is not None and item.disagreement(metric, model) < disagreement:
            continue
        if needle and needle not in item.text():
            continue
        out.append(item)
    return out


# --------------------------------------------------------------------------- rendering


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def _block(text: str) -> str:
    return f'<div style="white-space:pre-wrap;max-height:22em;overflow:auto">{html.escape(text)}</div>'


def render_scores(candidate: Candidate) -> str:
    if not candidate.scores:
        return "<i>not judged yet</i>"
    lines = []
    for judge, per_metric in candidate.scores.items():
        cells = []
        for metric in METRICS:
            spread = per_metric[metric]
            cells.append(
                f"{metric} <b>{_fmt(spread.mean)}</b>"
                + (
                    f" <span title='min–max of the M repeats'>({_fmt(min(spread.scores))}–"
                    f"{_fmt(max(spread.scores))}, sd {spread.sd:.1f}, n={len(spread.scores)})</span>"
                    if spread.scores
                    else ""
                )
            )
        failed = next(iter(per_metric.values())).failures
        if failed:
            cells.append(f"<span style='color:#b00'>{failed} failed</span>")
        line = f"<code>{html.escape(judge)}</code>: " + " · ".join(cells)
        for rationale in candidate.rationales.get(judge, [])[:3]:
            line += f"<br><i>“{html.escape(rationale)}”</i>"
        lines.append(line)
    return "<br>".join(lines)


def render_item(
    item: ReviewItem, decision: dict | None = None, model: str | None = None, zeta: float | None = None
) -> str:
    """instruction | reference | each candidate with its scores, as one HTML block."""
    decision = decision or {}
    flags = []
    if decision.get("bad_reference"):
        edited = " (corrected)" if decision.get("reference_edit") else " (01 drops it)"
        flags.append(f"<span style='color:#b00'><b>reference marked bad{edited}</b></span>")
    if decision.get("ambiguous"):
        flags.append("<span style='color:#a60'><b>ambiguous: left out of the decision</b></span>")
    if str(decision.get("note", "")).strip():
        flags.append(f"note: <i>{html.escape(decision['note'])}</i>")
    cards = []
    for c in item.shown(model):
        score = c.score("precision")
        low = zeta is not None and score is not None and score < zeta
        border = "#b00" if low else "#ccc"
        cut = " · <span style='color:#a60'>cut at max tokens</span>" if c.finish_reason == "length" else ""
        cards.append(
            f"<div class='llamaduo-candidate' style='border:1px solid {border};padding:4px;margin:4px 0'>"
            f"<b>{html.escape(c.model)}</b> · sample {c.sample_index}{cut}{_block(c.text)}"
            f"<div style='font-size:90%;margin-top:4px'>{render_scores(c)}</div></div>"
        )
    column = "vertical-align:top;width:33%;padding:4px"
    return (
        f"<div class='llamaduo-review-item'><div><code>{html.escape(item.prompt_id)}</code> · "
        f"{html.escape(item.category)} · cycle {item.cycle}"
        + ("".join(f" · {f}" for f in flags))
        + "</div><table style='width:100%;table-layout:fixed'><tr>"
        f"<th style='{column}'>instruction</th><th style='{column}'>reference</th>"
        f"<th style='{column}'>candidates</th></tr><tr>"
        f"<td style='{column}'>{_block(item.instruction)}</td>"
        f"<td style='{column}'>{_block(item.reference)}"
        + (
            f"<div style='color:#060'><b>corrected:</b>{_block(decision['reference_edit'])}</div>"
            if decision.get("reference_edit")
            else ""
        )
        + f"</td><td style='{column}'>{''.join(cards) or '<i>no answers for this model</i>'}</td>"
        "</tr></table></div>"
    )


def decisions_table(prompts: dict[str, dict]):
    """The saved review decisions as a DataFrame (one row per prompt with a decision)."""
    import pandas as pd

    columns = ["prompt_id", "cycle", "bad_reference", "reference_edit", "ambiguous", "note", "updated"]
    return pd.DataFrame(
        [{"prompt_id": pid, **{c: e.get(c) for c in columns[1:]}} for pid, e in sorted(prompts.items())],
        columns=columns,
    )
