"""ipywidgets views. Callbacks only record decisions; computing happens in the stage modules.

`CurationView` browses the coverage pairs; accept / reject / edit a pair or move it between splits. Every
click is saved at once (atomically) to the curation file, which `coverage.run_coverage` applies on the
next (also non-interactive, Papermill) run.
"""

from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets

from .coverage import load_decisions, save_decisions


class CurationView:
    def __init__(self, rows: list[dict], splits: dict[str, str], decisions_path: str | Path):
        if not rows:
            raise ValueError("nothing to curate: no rows")
        self.rows = rows
        self.splits = splits
        self.path = Path(decisions_path)
        self.decisions: dict[str, dict] = load_decisions(self.path)
        self.index = 0

        self.header = widgets.HTML()
        self.position = widgets.IntSlider(
            min=0, max=len(rows) - 1, description="row", continuous_update=False
        )
        self.instruction = widgets.Textarea(
            description="prompt", layout=widgets.Layout(width="98%", height="140px")
        )
        self.response = widgets.Textarea(
            description="response", layout=widgets.Layout(width="98%", height="140px")
        )
        self.split = widgets.ToggleButtons(options=["train", "test"], description="split")
        self.accept_button = widgets.Button(description="Accept", button_style="success", icon="check")
        self.reject_button = widgets.Button(description="Reject", button_style="danger", icon="times")
        self.edit_button = widgets.Button(description="Save edit", button_style="info", icon="save")
        self.prev_button = widgets.Button(description="◀ prev")
        self.next_button = widgets.Button(description="next ▶")
        self.status = widgets.HTML()

        self.position.observe(lambda change: self.show(change["new"]), names="value")
        self.prev_button.on_click(lambda _: self._step(-1))
        self.next_button.on_click(lambda _: self._step(+1))
        self.accept_button.on_click(lambda _: self.decide("accept"))
        self.reject_button.on_click(lambda _: self.decide("reject"))
        self.edit_button.on_click(lambda _: self.decide("edit"))
        self.split.observe(self._on_split, names="value")
        self.widget = widgets.VBox(
            [
                self.header,
                widgets.HBox([self.prev_button, self.position, self.next_button]),
                self.instruction,
                self.response,
                self.split,
                widgets.HBox([self.accept_button, self.reject_button, self.edit_button]),
                self.status,
            ]
        )
        self._showing = False
        self.show(0)

    # ---- display
    @property
    def row(self) -> dict:
        return self.rows[self.index]

    def show(self, index: int) -> None:
        self._showing = True
        self.index = index
        row = self.row
        decision = self.decisions.get(row["id"], {})
        self.position.value = index
        self.instruction.value = decision.get("instruction", row["instruction"])
        self.response.value = decision.get("response", row["response"])
        self.split.value = decision.get("split") or self.splits.get(row["id"], "train")
        self.header.value = (
            f"<b>{index + 1}/{len(self.rows)}</b> · <code>{row['id']}</code> · {row.get('category', '')} · "
            f"decision: <b>{decision.get('action', 'none')}</b>"
        )
        self._showing = False

    def _step(self, delta: int) -> None:
        self.show(min(max(self.index + delta, 0), len(self.rows) - 1))

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
        self.show(self.index)

    def _save(self, what: str) -> None:
        save_decisions(self.path, self.decisions)
        self.status.value = f"saved <code>{what}</code> for {self.row['id']} to <code>{self.path}</code>"

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
