"""ipywidgets views. Callbacks only record decisions or call one package function; computing happens in the
stage modules (coverage/, review.py).

`CurationView` (01) browses the coverage pairs: accept / reject / edit a pair or move it between splits, with
a category filter, search and a warning before an unsaved edit is lost. Every click is saved at once
(atomically) to the curation file, which `coverage.run_coverage` applies on the next run.

`ReviewView` (04) shows one test prompt at a time as review.render_item's grid (instruction and reference on
top, one column per model, one row per sample, score chips per answer), with the decision buttons (bad
reference, corrected reference, ambiguous, note) above it. Filters: below ζ and judge disagreement on the
judge chosen in the judge box (default: the deciding judges), category, model, cycle, search; sort by prompt,
score or disagreement. Paging: buttons, or the keys j / → (next) and k / ← (previous) while the pointer is
over the answers (not the decision bar, where you type); b marks the reference bad, a marks the prompt
ambiguous. Decisions go at once to `<run>/review.json`.

A callback that raises shows its traceback inside the view (the `errors` area), never only in a log.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from . import review
from .coverage import load_decisions, save_decisions
from .runlayout import RunLayout

ALL = "(all)"
STATES = ("in its split", "rejected in curation", "dropped by review", "corrected by review")
NEXT_KEYS = ("j", "n", "ArrowRight", "ArrowDown")
PREV_KEYS = ("k", "p", "ArrowLeft", "ArrowUp")


class _View:
    """What both views share: a status line, an error area, callbacks that never lose an exception."""

    def _init_feedback(self) -> None:
        self.status = widgets.HTML()
        self.errors = widgets.Output(layout=widgets.Layout(max_height="240px", overflow="auto"))

    def guarded(self, callback: Callable[..., Any]) -> Callable[..., None]:
        def run(*args: Any) -> None:
            try:
                callback(*args)
            except Exception as exc:  # shown to the user inside the widget; the view stays usable
                self.errors.append_stderr(traceback.format_exc())
                self.status.value = (
                    f"<span style='color:#b00' class='llamaduo-error'><b>error:</b> "
                    f"{type(exc).__name__}: {_escape(str(exc))} (traceback below)</span>"
                )

        return run

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


def _escape(text: str) -> str:
    import html

    return html.escape(text)


def _key_events(source: widgets.DOMWidget, handler: Callable[[dict], None]) -> Any:
    """Keyboard shortcuts over `source` (ipyevents); None where ipyevents is not installed."""
    try:
        from ipyevents import Event
    except ImportError:
        return None
    event = Event(source=source, watched_events=["keydown"], prevent_default_action=True)
    event.on_dom_event(handler)
    return event


# --------------------------------------------------------------------------- 01: curation


class CurationView(_View):
    """`reviewed`: `coverage.review_outcomes` of the last split (CoverageResult.reviewed): rows 04's review
    dropped, corrected or marked ambiguous show as such, with the reason and the cycle whose review it was."""

    def __init__(
        self,
        rows: list[dict],
        splits: dict[str, str],
        decisions_path: str | Path,
        reviewed: dict[str, dict] | None = None,
    ):
        if not rows:
            raise ValueError("nothing to curate: no rows")
        self.rows = rows
        self.splits = splits
        self.reviewed = reviewed or {}
        self.path = Path(decisions_path)
        self.decisions: dict[str, dict] = load_decisions(self.path)
        self.visible: list[int] = list(range(len(rows)))
        self.index = 0
        self._warned_for: int | None = None
        self._init_feedback()

        categories = sorted({r.get("category", "") for r in rows})
        self.category = widgets.Dropdown(options=[ALL, *categories], description="category")
        self.state_box = widgets.Dropdown(
            options=[ALL, *STATES], description="state", layout=widgets.Layout(width="260px")
        )
        self.search = widgets.Text(placeholder="search prompt or response", description="search")
        self.header = widgets.HTML()
        self.left = widgets.HTML()
        self.position = widgets.IntSlider(
            min=0, max=len(rows) - 1, description="row", continuous_update=False
        )
        self.instruction = widgets.Textarea(
            description="prompt", layout=widgets.Layout(width="98%", height="140px")
        )
        self.response = widgets.Textarea(
            description="response", layout=widgets.Layout(width="98%", height="140px")
        )
        self.unsaved = widgets.HTML()
        self.split = widgets.ToggleButtons(options=["train", "test"], description="split")
        self.accept_button = widgets.Button(description="Accept", button_style="success", icon="check")
        self.reject_button = widgets.Button(description="Reject", button_style="danger", icon="times")
        self.edit_button = widgets.Button(description="Save edit", button_style="info", icon="save")
        self.prev_button = widgets.Button(description="◀ prev")
        self.next_button = widgets.Button(description="next ▶")

        self.position.observe(self.guarded(lambda change: self._go(change["new"])), names="value")
        self.prev_button.on_click(self.guarded(lambda _: self._step(-1)))
        self.next_button.on_click(self.guarded(lambda _: self._step(+1)))
        self.accept_button.on_click(self.guarded(lambda _: self.decide("accept")))
        self.reject_button.on_click(self.guarded(lambda _: self.decide("reject")))
        self.edit_button.on_click(self.guarded(lambda _: self.decide("edit")))
        self.split.observe(self.guarded(self._on_split), names="value")
        self.category.observe(self.guarded(lambda _: self.refilter()), names="value")
        self.state_box.observe(self.guarded(lambda _: self.refilter()), names="value")
        self.search.observe(self.guarded(lambda _: self.refilter()), names="value")
        for box in (self.instruction, self.response):
            box.observe(self.guarded(lambda _: self._show_unsaved()), names="value")
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.category, self.state_box, self.search]),
                self.left,
                self.header,
                widgets.HBox([self.prev_button, self.position, self.next_button]),
                self.instruction,
                self.response,
                self.unsaved,
                self.split,
                widgets.HBox([self.accept_button, self.reject_button, self.edit_button]),
                self.status,
                self.errors,
            ]
        )
        self.widget.add_class("llamaduo-curation")
        self._showing = False
        self.show(0)

    # ---- display
    @property
    def row(self) -> dict:
        return self.rows[self.index]

    def _saved_text(self) -> tuple[str, str]:
        decision = self.decisions.get(self.row["id"], {})
        return (
            decision.get("instruction", self.row["instruction"]),
            decision.get("response", self.row["response"]),
        )

    def dirty(self) -> bool:
        """The prompt or response boxes hold text that is not saved."""
        return (self.instruction.value, self.response.value) != self._saved_text()

    def _show_unsaved(self) -> None:
        self.unsaved.value = (
            "<span style='color:#a60' class='llamaduo-unsaved'><b>● unsaved edit</b> — press Save edit</span>"
            if not self._showing and self.dirty()
            else ""
        )

    def _show_left(self) -> None:
        """One line: how many rows are out of the splits, and why (curation, which cycle's review)."""
        counts = {state: 0 for state in STATES}
        for row in self.rows:
            counts[self.state(row)] += 1
        cycles = sorted({o["cycle"] for o in self.reviewed.values() if o.get("cycle") is not None})
        parts = [f"{n} {state}" for state, n in counts.items() if n]
        self.left.value = (
            f"<span class='llamaduo-left'>{len(self.rows)} rows: {', '.join(parts)}"
            + (f" (review of cycle {', '.join(map(str, cycles))})" if cycles else "")
            + "</span>"
        )

    def state(self, row: dict) -> str:
        """Where a row stands after the last split: in its split, rejected, or what 04's review did to it."""
        outcome = self.reviewed.get(row["id"])
        if self.decisions.get(row["id"], {}).get("action") == "reject":
            return "rejected in curation"
        if outcome and outcome["state"] in ("dropped", "corrected"):
            return f"{outcome['state']} by review"
        return "in its split"

    def refilter(self) -> None:
        """Rows matching the category, state and search boxes; shows the first of them."""
        needle = self.search.value.strip().casefold()
        category = None if self.category.value == ALL else self.category.value
        state = None if self.state_box.value == ALL else self.state_box.value
        visible = [
            i
            for i, r in enumerate(self.rows)
            if (category is None or r.get("category") == category)
            and (state is None or self.state(r) == state)
            and (not needle or needle in f"{r['id']}\n{r['instruction']}\n{r['response']}".casefold())
        ]
        if not visible:
            self.status.value = "no row matches these filters"
            return
        if not self._leave_ok():
            return
        self.visible = visible
        self._showing = True
        self.position.max = max(len(visible) - 1, 0)
        self._showing = False
        self.show(0)

    def show(self, position: int) -> None:
        self._showing = True
        try:
            position = min(max(position, 0), len(self.visible) - 1)
            self.index = self.visible[position]
            self._warned_for = None
            row = self.row
            decision = self.decisions.get(row["id"], {})
            self.position.value = position
            self.instruction.value, self.response.value = self._saved_text()
            outcome = self.reviewed.get(row["id"])
            split = (outcome or {}).get("split") or self.splits.get(row["id"])
            self.split.value = decision.get("split") or split or "train"
            self.split.disabled = outcome is not None and outcome["state"] == "dropped"
            state = self.state(row)
            if outcome is not None:
                colour = "#a40e26" if outcome["state"] == "dropped" else "#9a6700"
                was = f"; was in {outcome['split']}" if outcome["state"] == "dropped" else ""
                review_line = (
                    f" · <span class='llamaduo-review-state' style='color:{colour}'>"
                    f"{_escape(outcome['reason'])}{was}</span>"
                )
            elif split is None and decision.get("action") != "reject":
                review_line = " · <span style='color:#57606a'>in no split (not in the last run)</span>"
            else:
                review_line = ""
            self.header.value = (
                f"<b>{position + 1}/{len(self.visible)}</b>"
                + (f" (of {len(self.rows)})" if len(self.visible) != len(self.rows) else "")
                + f" · <code>{row['id']}</code> · {row.get('category', '')} · "
                f"state: <b class='llamaduo-state'>{state}</b> · "
                f"decision: <b class='llamaduo-decision'>{decision.get('action', 'none')}</b>" + review_line
            )
        finally:
            self._showing = False
        self._show_left()
        self._show_unsaved()

    def _leave_ok(self) -> bool:
        """Moving away from an unsaved edit is refused once, with a warning; a second move discards it."""
        if self.dirty() and self._warned_for != self.index:
            self._warned_for = self.index
            self.status.value = (
                "<span style='color:#a60' class='llamaduo-warning'><b>unsaved edit</b> on "
                f"<code>{self.row['id']}</code>: press Save edit, or move again to discard it</span>"
            )
            return False
        return True

    def _go(self, position: int) -> None:
        if self._showing:
            return
        if position != self.visible.index(self.index) and not self._leave_ok():
            self._showing = True
            self.position.value = self.visible.index(self.index)
            self._showing = False
            return
        self.show(position)

    def _step(self, delta: int) -> None:
        here = self.visible.index(self.index)
        target = min(max(here + delta, 0), len(self.visible) - 1)
        if target != here and self._leave_ok():
            self.show(target)

    def _on_split(self, change: dict) -> None:
        if self._showing:
            return
        entry = self.decisions.setdefault(self.row["id"], {"action": "accept"})
        entry["split"] = change["new"] if change["new"] != self.splits.get(self.row["id"]) else None
        self._save(f"split → {change['new']}")

    # ---- decisions
    def decide(self, action: str) -> None:
        entry = {"action": action}
        previous = self.decisions.get(self.row["id"], {})
        if previous.get("split"):
            entry["split"] = previous["split"]
        if action == "edit":
            entry["instruction"] = self.instruction.value
            entry["response"] = self.response.value
        self.decisions[self.row["id"]] = entry
        self._save(action)
        self.show(self.visible.index(self.index))

    def _save(self, what: str) -> None:
        save_decisions(self.path, self.decisions)
        self.status.value = f"saved <code>{what}</code> for {self.row['id']} to <code>{self.path}</code>"


# --------------------------------------------------------------------------- 04: side-by-side review


DECIDING = "deciding judges"
ALL_JUDGES = "every judge"

# the pressed state of a decision toggle, unmistakable: filled, bold, a check mark (ipywidgets adds mod-active)
REVIEW_CSS = """<style>
.llamaduo-review .widget-toggle-button.mod-active{box-shadow:inset 0 0 0 2px rgba(0,0,0,.45);font-weight:700}
.llamaduo-review .widget-toggle-button:not(.mod-active){background:#fff;border:1px solid #8c959f;color:#24292f}
.llamaduo-review .llamaduo-decisions{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-bottom:2px}
.llamaduo-review .llamaduo-decisions textarea{font-size:12px;resize:vertical}
.llamaduo-review .llamaduo-toolbar{gap:2px 8px}
</style>"""


def _narrow(width: str) -> widgets.Layout:
    return widgets.Layout(width=width)


COMPACT = {"description_width": "initial"}


class ReviewView(_View):
    """Review one cycle's answers beside their references; decisions go to `layout.review_file` at once.

    `deciding`: the judges whose scores decide (evaluate.decision_judges); the judge box defaults to them,
    and colours, ζ and disagreement filters and sorting use the judge(s) chosen there.
    """

    def __init__(
        self,
        layout: RunLayout,
        cycle: int,
        zeta: float = 70.0,
        metric: str = "precision",
        deciding: Sequence[str] | None = None,
    ):
        self.layout = layout
        self.metric = metric if metric in review.METRICS else "precision"  # decision_metric "both": precision
        self.cycle = cycle
        self.deciding = list(deciding) if deciding else None
        self.items: list[review.ReviewItem] = []
        self.visible: list[review.ReviewItem] = []
        self.position = 0
        self._showing = False
        self._init_feedback()

        cycles = review.reviewable_cycles(layout) or [cycle]
        self.cycle_box = widgets.Dropdown(
            options=cycles, value=cycle, description="cycle", style=COMPACT, layout=_narrow("90px")
        )
        self.model_box = widgets.Dropdown(
            options=[ALL], description="model", style=COMPACT, layout=_narrow("180px")
        )
        self.category_box = widgets.Dropdown(
            options=[ALL], description="category", style=COMPACT, layout=_narrow("200px")
        )
        self.judge_box = widgets.Dropdown(
            options=[DECIDING], description="judge", style=COMPACT, layout=_narrow("250px")
        )
        self.sort_box = widgets.Dropdown(
            options=list(review.SORTS), description="sort", style=COMPACT, layout=_narrow("210px")
        )
        self.below_box = widgets.Checkbox(
            value=False, description="below ζ", indent=False, layout=_narrow("80px")
        )
        self.zeta_box = widgets.FloatText(value=zeta, description="ζ", style=COMPACT, layout=_narrow("80px"))
        self.disagree_box = widgets.Checkbox(
            value=False, description="judges disagree by ≥", indent=False, layout=_narrow("170px")
        )
        self.disagree_min = widgets.FloatText(value=20.0, layout=_narrow("60px"))
        self.search = widgets.Text(placeholder="search prompts, references, answers", layout=_narrow("230px"))
        self.prev_button = widgets.Button(description="◀ prev (k)", layout=_narrow("100px"))
        self.next_button = widgets.Button(description="next ▶ (j)", layout=_narrow("100px"))
        self.counter = widgets.HTML()
        self.card = widgets.HTML(layout=widgets.Layout(width="100%"))

        self.bad_button = widgets.ToggleButton(
            description="reference is bad (b)", icon="ban", layout=_narrow("auto"), tooltip="01 drops it"
        )
        self.ambiguous_button = widgets.ToggleButton(
            description="prompt is ambiguous (a)",
            icon="question",
            layout=_narrow("auto"),
            tooltip="04 leaves it out of the decision",
        )
        self.reference_edit = widgets.Textarea(
            placeholder="corrected reference (else 01 drops it)",
            rows=1,
            layout=widgets.Layout(flex="3 1 0%", min_width="160px", width="auto", height="30px"),
        )
        self.save_reference_button = widgets.Button(
            description="Save correction",
            icon="save",
            layout=_narrow("auto"),
            tooltip="save the corrected reference",
        )
        self.note = widgets.Textarea(
            placeholder="note",
            rows=1,
            layout=widgets.Layout(flex="2 1 0%", min_width="120px", width="auto", height="30px"),
        )
        self.save_note_button = widgets.Button(description="Save note", icon="save", layout=_narrow("auto"))
        self.decision_bar = widgets.HBox(
            [
                self.bad_button,
                self.ambiguous_button,
                self.reference_edit,
                self.save_reference_button,
                self.note,
                self.save_note_button,
            ],
            layout=widgets.Layout(flex_flow="row wrap", align_items="center", width="100%"),
        )
        self.decision_bar.add_class("llamaduo-decisions")
        # keys act over the answers only: typing a note or a correction in the decision bar is never a shortcut
        self.answers_box = widgets.Box([self.card], layout=widgets.Layout(width="100%"))
        self.card_box = widgets.VBox(
            [self.decision_bar, self.answers_box],
            layout=widgets.Layout(border="1px solid #d0d7de", padding="4px", width="100%"),
        )
        self.card_box.add_class("llamaduo-review-card")
        self.counts = widgets.HTML()

        for box in (self.model_box, self.category_box, self.below_box, self.zeta_box, self.judge_box):
            box.observe(self.guarded(lambda _: self.refilter()), names="value")
        for box in (self.disagree_box, self.disagree_min, self.search, self.sort_box):
            box.observe(self.guarded(lambda _: self.refilter()), names="value")
        self.cycle_box.observe(self.guarded(lambda change: self.load(change["new"])), names="value")
        self.prev_button.on_click(self.guarded(lambda _: self.step(-1)))
        self.next_button.on_click(self.guarded(lambda _: self.step(+1)))
        self.bad_button.observe(self.guarded(self._on_flag("bad_reference")), names="value")
        self.ambiguous_button.observe(self.guarded(self._on_flag("ambiguous")), names="value")
        self.save_reference_button.on_click(
            self.guarded(lambda _: self.decide(reference_edit=self.reference_edit.value))
        )
        self.save_note_button.on_click(self.guarded(lambda _: self.decide(note=self.note.value)))
        self.keys = _key_events(self.answers_box, self.guarded(self.on_key))

        self.hint = (
            "keys over the answers: j/k next/previous · b bad · a ambiguous"
            if self.keys is not None
            else "keyboard paging needs the ipyevents package"
        )
        row = widgets.Layout(flex_flow="row wrap", align_items="center", width="100%")
        toolbars = [
            widgets.HBox(
                [self.cycle_box, self.model_box, self.category_box, self.judge_box, self.sort_box], layout=row
            ),
            widgets.HBox(
                [
                    self.below_box,
                    self.zeta_box,
                    self.disagree_box,
                    self.disagree_min,
                    self.search,
                    self.prev_button,
                    self.counter,
                    self.next_button,
                ],
                layout=row,
            ),
        ]
        for bar in toolbars:
            bar.add_class("llamaduo-toolbar")
        style = widgets.HTML(REVIEW_CSS, layout=widgets.Layout(height="0px", margin="0"))
        self.widget = widgets.VBox(
            [style, *toolbars, self.card_box, self.counts, self.status, self.errors],
            layout=widgets.Layout(width="100%", overflow="hidden"),
        )
        self.widget.add_class("llamaduo-review")
        self.load(cycle)

    # ---- data
    @property
    def item(self) -> review.ReviewItem | None:
        return self.visible[self.position] if self.visible else None

    def decisions(self) -> dict[str, dict]:
        return review.load_review(self.layout.review_file)

    def judges(self) -> list[str] | None:
        """The judges chosen in the judge box (None: every judge)."""
        value = self.judge_box.value
        if value == DECIDING:
            return self.deciding
        return None if value == ALL_JUDGES else [value]

    def load(self, cycle: int) -> None:
        """Read one cycle's responses and judgments (the only computing step: review.load_items)."""
        self.cycle = cycle
        self.items = review.load_items(self.layout, cycle)
        models = sorted(
            {m for item in self.items for m in item.models()}, key=lambda m: (m != review.STUDENT, m)
        )
        categories = sorted({item.category for item in self.items})
        judges = sorted({j for item in self.items for j in item.judges()})
        deciding = [j for j in self.deciding or [] if j in judges]
        judge_options = ([(f"{DECIDING} ({', '.join(deciding)})", DECIDING)] if deciding else []) + [
            (ALL_JUDGES, ALL_JUDGES),
            *((j, j) for j in judges),
        ]
        self._showing = True
        self.model_box.options = [ALL, *models]
        self.category_box.options = [ALL, *categories]
        current = self.judge_box.value
        self.judge_box.options = judge_options
        self.judge_box.value = current if current in dict(judge_options).values() else judge_options[0][1]
        self._showing = False
        self.refilter()

    def filters(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "below": self.zeta_box.value if self.below_box.value else None,
            "disagreement": self.disagree_min.value if self.disagree_box.value else None,
            "category": None if self.category_box.value == ALL else self.category_box.value,
            "model": None if self.model_box.value == ALL else self.model_box.value,
            "query": self.search.value,
            "judges": self.judges(),
            "sort": self.sort_box.value,
        }

    def refilter(self) -> None:
        if self._showing:
            return
        current = self.item.prompt_id if self.item else None
        self.visible = review.filter_items(self.items, **self.filters())
        ids = [i.prompt_id for i in self.visible]
        self.position = ids.index(current) if current in ids else 0
        self.show()

    # ---- display
    def show(self) -> None:
        decisions = self.decisions()
        filters = self.filters()
        self.counter.value = (
            f"<b class='llamaduo-position'>{self.position + 1 if self.visible else 0}/{len(self.visible)}</b>"
            f" shown (of {len(self.items)} prompts in cycle {self.cycle})"
        )
        item = self.item
        self._showing = True
        try:
            if item is None:
                self.card.value = "<i>no prompt matches these filters</i>"
                decision: dict = {}
            else:
                decision = decisions.get(item.prompt_id, {})
                self.card.value = review.render_item(
                    item, decision, filters["model"], self.zeta_box.value, filters["judges"], self.metric
                )
            self.bad_button.value = bool(decision.get("bad_reference"))
            self.ambiguous_button.value = bool(decision.get("ambiguous"))
            self.reference_edit.value = decision.get("reference_edit") or ""
            self.note.value = decision.get("note", "")
        finally:
            self._showing = False
        self._paint()
        counts = review.review_counts(decisions)
        self.counts.value = (
            f"<span class='llamaduo-counts'>review decisions: {counts['bad_references']} bad references "
            f"({counts['edited_references']} corrected), {counts['ambiguous']} ambiguous prompts "
            f"(left out of the decision), {counts['notes']} notes — <code>{self.layout.review_file}</code></span>"
            f"<br><small style='color:#57606a'>{self.hint}</small>"
        )

    def _paint(self) -> None:
        """Pressed toggles look pressed: filled colour and a check mark, not a slightly darker grey."""
        for button, style, text in (
            (self.bad_button, "danger", "reference is bad (b)"),
            (self.ambiguous_button, "warning", "prompt is ambiguous (a)"),
        ):
            button.button_style = style if button.value else ""
            button.description = f"✔ {text}" if button.value else text

    def step(self, delta: int) -> None:
        if self.visible:
            self.position = min(max(self.position + delta, 0), len(self.visible) - 1)
        self.show()

    def on_key(self, event: dict) -> None:
        key = event.get("key")
        if key in NEXT_KEYS:
            self.step(+1)
        elif key in PREV_KEYS:
            self.step(-1)
        elif key == "b" and self.item is not None:
            self.bad_button.value = not self.bad_button.value
        elif key == "a" and self.item is not None:
            self.ambiguous_button.value = not self.ambiguous_button.value

    # ---- decisions
    def _on_flag(self, name: str) -> Callable[[dict], None]:
        def flag(change: dict) -> None:
            if not self._showing:
                self.decide(**{name: bool(change["new"])})

        return flag

    def decide(self, **changes: Any) -> None:
        """Save one decision about the shown prompt at once (review.record_decision writes atomically)."""
        item = self.item
        if item is None:
            raise ValueError("no prompt is shown: clear the filters first")
        if changes.get("bad_reference") is False:
            changes["reference_edit"] = None
        review.record_decision(self.layout.review_file, item.prompt_id, self.cycle, **changes)
        self.show()
        self.status.value = (
            f"saved {', '.join(sorted(changes))} for <code>{item.prompt_id}</code> "
            f"to <code>{self.layout.review_file}</code>"
        )
