"""01_coverage's stage: import and validate the rows, curate, split, report, and the notebook's displays.

Validation is never silent: in `strict` mode the first bad row raises `DataFileError` (file, row, field),
in `lenient` mode it is skipped and listed in `skipped.jsonl` and the report — including lines that are
not valid UTF-8. Nor is a column: the report names the passages merged into prompts (`context_columns`,
`prompt_template`) and every column no row used (`unused_columns`); 01 prints it (`describe_import`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CoverageConfig
from ..jsonio import DataFileError, read_json, save_figure, write_json, write_jsonl
from ..review import load_review
from ..runlayout import RunLayout
from ..schemas import CONTEXT_KEYS, INSTRUCTION_KEYS
from .rows import PROMPT_TEMPLATE, RowProblem, content_id, normalize_prompt, normalize_row, prompt_key
from .sources import detect_format, iter_raw_rows, open_dataset


@dataclass
class Skipped:
    row: int
    field: str | None
    problem: str
    id: str | None = None

    def as_dict(self) -> dict:
        return {"row": self.row, "field": self.field, "problem": self.problem, "id": self.id}


@dataclass
class Imported:
    source: str
    rows: list[dict] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    n_read: int = 0
    context_columns: Counter = field(default_factory=Counter)  # passage column -> rows it was merged into
    unused_columns: Counter = field(default_factory=Counter)  # column -> non-empty values not imported
    dataset_splits: dict | None = None  # {"found": [...], "used": [...]} of a hub / save_to_disk dataset
    example: dict | None = None  # the first row with a passage: {"row", "fields", "instruction"}

    def merge(self, other: Imported) -> None:
        """Add `other`'s rows, skips and column counts (the splits of one dataset imported one by one)."""
        self.rows += other.rows
        self.skipped += other.skipped
        self.n_read += other.n_read
        self.context_columns.update(other.context_columns)
        self.unused_columns.update(other.unused_columns)
        self.example = self.example or other.example
        if other.dataset_splits:
            found = other.dataset_splits["found"]
            used = set(other.dataset_splits["used"]) | set((self.dataset_splits or {}).get("used", []))
            self.dataset_splits = {"found": found, "used": [s for s in found or sorted(used) if s in used]}


def _non_empty(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list | tuple | dict):
        return bool(value)
    return value is not None


def import_coverage(cfg: CoverageConfig) -> Imported:
    """Read and validate the coverage dataset per `cfg.strictness`."""
    fmt = detect_format(cfg.source, cfg.format)
    result = Imported(source=cfg.source)
    seen_ids: dict[str, int] = {}
    seen_prompts: dict[str, int] = {}
    wanted = set(cfg.categories) if cfg.categories else None

    def reject(row: int, fld: str | None, problem: str, row_id: str | None = None) -> None:
        if cfg.strictness == "strict":
            raise DataFileError(cfg.source, row, fld, problem)
        result.skipped.append(Skipped(row, fld, problem, row_id))

    if fmt in ("hf_disk", "hub"):
        dataset, result.dataset_splits = open_dataset(cfg.source, fmt, cfg)
        raw_rows: Iterable[tuple[int, Any]] = enumerate(dataset, start=1)
    else:
        raw_rows = iter_raw_rows(cfg.source, fmt, cfg)
    for rownum, record in raw_rows:
        result.n_read += 1
        if isinstance(record, DataFileError):
            reject(rownum, None, record.problem)
            continue
        try:
            norm = normalize_row(record)
        except RowProblem as p:
            reject(rownum, p.field, p.problem)
            continue
        row_id, instruction, response, category, system = (
            norm.id, norm.instruction, norm.response, norm.category, norm.system
        )  # fmt: skip
        if wanted is not None and category not in wanted:
            continue
        # count what the row's shape leaves out before any check can drop the row: the count is per column
        result.unused_columns.update(
            str(k)
            for k, v in record.items()
            if k not in norm.used and k != cfg.split_column and _non_empty(v)
        )
        if len(instruction) + len(response) > cfg.max_chars:
            reject(
                rownum,
                "response",
                f"over-long row: {len(instruction) + len(response)} chars > max_chars {cfg.max_chars}",
                row_id,
            )
            continue
        derived_id = row_id is None
        row_id = row_id or content_id(instruction, system)
        key = prompt_key(instruction, system)
        if derived_id and key in seen_prompts:  # an id made from the prompt repeats when the prompt does
            same = "same instruction and passage" if norm.contexts else "same"
            reject(rownum, "instruction", f"duplicate prompt ({same} as row {seen_prompts[key]})", row_id)
            continue
        if row_id in seen_ids:
            reject(rownum, "id", f"duplicate id {row_id!r} (first seen in row {seen_ids[row_id]})", row_id)
            continue
        if key in seen_prompts:
            reject(rownum, "instruction", f"duplicate prompt (same as row {seen_prompts[key]})", row_id)
            continue
        seen_ids[row_id], seen_prompts[key] = rownum, rownum
        row = {"id": row_id, "instruction": instruction, "response": response, "category": category}
        if system:
            row["system"] = system
        result.rows.append(row | {"source": f"{cfg.source}#{rownum}"})
        result.context_columns.update(norm.contexts.keys())
        if norm.contexts and result.example is None:
            fields = {
                k: record[k] for k in (*INSTRUCTION_KEYS, *CONTEXT_KEYS) if k in norm.used and k in record
            }
            result.example = {"row": rownum, "fields": fields, "instruction": instruction}
    if not result.rows:
        raise DataFileError(cfg.source, None, None, "no usable rows after validation")
    if cfg.max_rows is not None and len(result.rows) > cfg.max_rows:
        result.rows = _stratified_sample(result.rows, cfg.max_rows)
    return result


def _stratified_sample(rows: list[dict], n: int) -> list[dict]:
    """Take `n` rows round-robin over categories, in file order (deterministic)."""
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_cat[r["category"]].append(r)
    picked: list[dict] = []
    queues = [list(v) for _, v in sorted(by_cat.items())]
    while len(picked) < n:
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    order = {id(r): i for i, r in enumerate(rows)}
    return sorted(picked, key=lambda r: order[id(r)])


# --------------------------------------------------------------------------- split


def _rank(seed: int, row_id: str) -> str:
    return hashlib.sha256(f"{seed}:{row_id}".encode()).hexdigest()


def split_rows(
    rows: Iterable[dict], train_ratio: float, seed: int, stratify_by: str | None = "category"
) -> tuple[list[dict], list[dict]]:
    """Deterministic split by Phi, stratified, seeded; independent of input order.

    Within each stratum rows are ordered by sha256(seed:id) and the first round(n * Phi) go to train; a
    stratum with at least two rows always keeps one row on each side.
    """
    strata: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        strata[str(r.get(stratify_by, "")) if stratify_by else ""].append(r)
    train, test = [], []
    for key in sorted(strata):
        group = sorted(strata[key], key=lambda r: _rank(seed, r["id"]))
        n_train = round(len(group) * train_ratio)
        if len(group) >= 2:
            n_train = min(max(n_train, 1), len(group) - 1)
        train.extend(group[:n_train])
        test.extend(group[n_train:])
    by_id = lambda r: r["id"]  # noqa: E731
    return sorted(train, key=by_id), sorted(test, key=by_id)


# --------------------------------------------------------------------------- curation decisions


def load_decisions(path: Path) -> dict[str, dict]:
    """Curation decisions: {id: {"action": accept|reject|edit, "instruction"?, "response"?, "split"?}}."""
    if not path.is_file():
        return {}
    data = read_json(path)
    decisions = data.get("decisions", data) if isinstance(data, dict) else None
    if not isinstance(decisions, dict):
        raise DataFileError(path, None, "decisions", "expected an object mapping row id -> decision")
    for row_id, d in decisions.items():
        if not isinstance(d, dict) or d.get("action") not in ("accept", "reject", "edit"):
            raise DataFileError(
                path, None, f"decisions.{row_id}.action", "must be one of accept, reject, edit"
            )
        if d.get("split") not in (None, "train", "test"):
            raise DataFileError(path, None, f"decisions.{row_id}.split", "must be train, test or null")
    return decisions


def save_decisions(path: Path, decisions: dict[str, dict]) -> None:
    write_json(path, {"version": 1, "decisions": decisions})


def apply_edits(rows: list[dict], decisions: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """Drop rejected rows and apply edits; returns (rows, ids of rejected rows)."""
    out, rejected = [], []
    for r in rows:
        d = decisions.get(r["id"])
        if d is None or d["action"] == "accept":
            out.append(r)
        elif d["action"] == "reject":
            rejected.append(r["id"])
        else:
            edited = dict(r)
            for key in ("instruction", "response", "category"):
                if isinstance(d.get(key), str) and d[key].strip():
                    edited[key] = d[key].strip()
            edited["curated"] = True
            out.append(edited)
    return out, rejected


def apply_moves(
    train: list[dict], test: list[dict], decisions: dict[str, dict]
) -> tuple[list[dict], list[dict]]:
    """Move rows between splits as the curator decided."""
    rows = {r["id"]: ("train", r) for r in train} | {r["id"]: ("test", r) for r in test}
    for row_id, d in decisions.items():
        if d.get("split") and row_id in rows:
            rows[row_id] = (d["split"], rows[row_id][1])
    new_train = sorted((r for s, r in rows.values() if s == "train"), key=lambda r: r["id"])
    new_test = sorted((r for s, r in rows.values() if s == "test"), key=lambda r: r["id"])
    return new_train, new_test


def apply_review(
    train: list[dict], test: list[dict], review: dict[str, dict]
) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Apply the 04 review's reference decisions (see review.py) after the split, so no other row moves.

    A reference marked bad is replaced by the reviewer's correction when there is one (the row is marked
    `reviewed`), else its row is dropped. Ambiguous prompts stay: 04 leaves them out of its decision.
    `review_outcomes` says the same per row, for the curation view.
    """
    counts = {"references_dropped": 0, "references_edited": 0, "ambiguous": 0}

    def apply(rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            entry = review.get(row["id"], {})
            counts["ambiguous"] += bool(entry.get("ambiguous"))
            if not entry.get("bad_reference"):
                out.append(row)
            elif entry.get("reference_edit"):
                out.append({**row, "response": entry["reference_edit"].strip(), "reviewed": True})
                counts["references_edited"] += 1
            else:
                counts["references_dropped"] += 1
        return out

    return apply(train), apply(test), counts


def review_outcomes(train: list[dict], test: list[dict], review: dict[str, dict]) -> dict[str, dict]:
    """What the 04 review did to each row it decided on: row id -> {state, split, category, cycle, reason}.

    state: "dropped" (reference marked bad, no correction), "corrected" (reference replaced) or "ambiguous"
    (kept; 04 leaves it out of its decision). `split` is the split the row was in; `cycle` whose review it was.
    """
    out: dict[str, dict] = {}
    for split, rows in (("train", train), ("test", test)):
        for row in rows:
            entry = review.get(row["id"])
            if not entry or not (entry.get("bad_reference") or entry.get("ambiguous")):
                continue
            cycle = entry.get("cycle")
            where = f"cycle {cycle}'s review" if cycle is not None else "the review"
            if entry.get("bad_reference") and entry.get("reference_edit"):
                state, reason = "corrected", f"reference corrected in {where}"
            elif entry.get("bad_reference"):
                state, reason = "dropped", f"reference marked bad in {where}"
            else:
                state, reason = "ambiguous", f"prompt marked ambiguous in {where}: left out of 04's decision"
            out[row["id"]] = {
                "state": state,
                "split": split,
                "category": row.get("category"),
                "cycle": cycle,
                "reason": reason,
            }
    return out


# --------------------------------------------------------------------------- the stage


@dataclass
class CoverageResult:
    train: list[dict]
    test: list[dict]
    report: dict
    example: dict | None = None  # the first imported row with a passage (`Imported.example`), for 01
    reviewed: dict[str, dict] = field(default_factory=dict)  # `review_outcomes`: what 04's review did


def check_disjoint(train: list[dict], test: list[dict]) -> None:
    train_prompts = {normalize_prompt(r["instruction"]) for r in train}
    leaked = [r["id"] for r in test if normalize_prompt(r["instruction"]) in train_prompts]
    if leaked:
        raise ValueError(f"prompts present in both splits (after curation edits): {leaked[:5]}")
    if not train or not test:
        raise ValueError(
            f"a split is empty (train={len(train)}, test={len(test)}); add rows or change train_ratio"
        )


# --------------------------------------------------------------------------- splits as given by the dataset


def import_given_splits(cfg: CoverageConfig) -> tuple[Imported, dict[str, str]]:
    """Read a dataset whose train/test splits are given (`coverage.splits`), keeping them as they are.

    Hub and save_to_disk datasets: each named split is imported on its own (same validation, category
    filter and `max_rows` per split). JSONL/CSV: the file is imported once and each row goes to the split
    named in its `split_column`; a row with another value is an error naming file, row and field (skipped
    in lenient mode). Returns the imported rows and {row id: "train" | "test"}.

    A test prompt that also appears in the train split would leak the answer: in lenient mode the train
    copy is dropped and reported, in strict mode it is an error. (Within one file the importer's own
    duplicate-prompt check sees both splits at once and keeps the first copy.)
    """
    assert cfg.splits is not None
    names = {"train": cfg.splits.train, "test": cfg.splits.test}
    fmt = detect_format(cfg.source, cfg.format)
    if fmt in ("hub", "hf_disk"):
        if cfg.split_column is not None:
            raise DataFileError(
                cfg.source, None, "split_column", "only for JSONL/CSV files; datasets have splits"
            )
        parts = {}
        for role, name in names.items():
            _check_split_exists(cfg, fmt, name)
            part = import_coverage(dataclasses.replace(cfg, hub_split=name, splits=None))
            for row in part.rows:
                row["source"] = row["source"].replace(f"{cfg.source}#", f"{cfg.source}[{name}]#", 1)
            for skipped in part.skipped:
                skipped.problem = f"[{name}] {skipped.problem}"
            parts[role] = part
        imported = Imported(source=cfg.source)
        imported.merge(parts["test"])
        imported.merge(parts["train"])
        given = {r["id"]: "test" for r in parts["test"].rows}
        train_rows = parts["train"].rows
    else:
        if cfg.split_column is None:
            raise DataFileError(
                cfg.source, None, "split_column", "name the column holding each row's split, e.g. split"
            )
        imported = import_coverage(dataclasses.replace(cfg, splits=None))
        split_of_line = {
            rownum: record.get(cfg.split_column) if isinstance(record, dict) else None
            for rownum, record in iter_raw_rows(cfg.source, fmt, cfg)
        }
        role_of = {name: role for role, name in names.items()}
        given, train_rows = {}, []
        for row in imported.rows:
            rownum = int(row["source"].rsplit("#", 1)[1])
            value = split_of_line.get(rownum)
            if value not in role_of:
                problem = f"{value!r} is neither {names['train']!r} (train) nor {names['test']!r} (test)"
                if cfg.strictness == "strict":
                    raise DataFileError(cfg.source, rownum, cfg.split_column, problem)
                imported.skipped.append(Skipped(rownum, cfg.split_column, problem, row["id"]))
                continue
            if role_of[value] == "test":
                given[row["id"]] = "test"
            else:
                train_rows.append(row)
    test_rows = [r for r in imported.rows if given.get(r["id"]) == "test"]
    test_prompts = {normalize_prompt(r["instruction"]) for r in test_rows}
    kept_train = []
    for row in train_rows:
        if normalize_prompt(row["instruction"]) in test_prompts or row["id"] in given:
            what = "prompt" if normalize_prompt(row["instruction"]) in test_prompts else "id"
            problem = f"duplicate {what}: the test split holds the same {what} (the train copy would leak it)"
            rownum = int(row["source"].rsplit("#", 1)[1])
            if cfg.strictness == "strict":
                raise DataFileError(row["source"].rsplit("#", 1)[0], rownum, "instruction", problem)
            imported.skipped.append(Skipped(rownum, "instruction", problem, row["id"]))
            continue
        given[row["id"]] = "train"
        kept_train.append(row)
    imported.rows = test_rows + kept_train
    return imported, given


def _check_split_exists(cfg: CoverageConfig, fmt: str, name: str) -> None:
    if fmt != "hf_disk":
        return  # the hub names its splits in load_dataset's own error
    import datasets

    ds = datasets.load_from_disk(cfg.source)
    available = list(ds) if isinstance(ds, datasets.DatasetDict) else []
    if name not in available:
        raise DataFileError(
            cfg.source, None, "splits", f"no split named {name!r}; the dataset has {available}"
        )


def split_as_given(rows: Iterable[dict], given: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """(train, test) by each row's given split, sorted by id like `split_rows`."""
    rows = list(rows)
    train = sorted((r for r in rows if given.get(r["id"]) == "train"), key=lambda r: r["id"])
    test = sorted((r for r in rows if given.get(r["id"]) == "test"), key=lambda r: r["id"])
    return train, test


def build_coverage(
    cfg: CoverageConfig,
    seed: int,
    decisions: dict[str, dict] | None = None,
    review: dict[str, dict] | None = None,
) -> CoverageResult:
    given: dict[str, str] | None = None
    if cfg.splits is not None:
        imported, given = import_given_splits(cfg)
    else:
        imported = import_coverage(cfg)
    decisions = decisions or {}
    rows, rejected = apply_edits(imported.rows, decisions)
    if given is not None:
        train, test = split_as_given(rows, given)
    else:
        train, test = split_rows(rows, cfg.train_ratio, seed, cfg.stratify_by)
    train, test = apply_moves(train, test, decisions)
    outcomes = review_outcomes(train, test, review or {})
    rejected_ids = set(rejected)
    train, test, reviewed = apply_review(train, test, review or {})
    check_disjoint(train, test)
    per_cat = {
        split: dict(sorted(Counter(r["category"] for r in rs).items()))
        for split, rs in (("train", train), ("test", test))
    }
    report = {
        "source": cfg.source,
        "rows_read": imported.n_read,
        "rows_valid": len(imported.rows),
        "skipped": len(imported.skipped),
        "skipped_by_problem": dict(Counter(_problem_kind(s.problem) for s in imported.skipped)),
        "curation": {
            "rejected": len(rejected),
            "edited": sum(1 for d in decisions.values() if d["action"] == "edit"),
            "moved": sum(1 for d in decisions.values() if d.get("split")),
        },
        "review": reviewed,
        # rows that left the splits, and why, per category (01's split table shows them)
        "left_by_category": {
            "rejected in curation": dict(
                sorted(Counter(r["category"] for r in imported.rows if r["id"] in rejected_ids).items())
            ),
            "dropped by review": dict(
                sorted(Counter(o["category"] for o in outcomes.values() if o["state"] == "dropped").items())
            ),
        },
        "reviewed_rows": outcomes,
        "train_ratio": cfg.train_ratio if given is None else None,
        "split": "as given" if given is not None else "by train_ratio",
        "seed": seed,
        "train": len(train),
        "test": len(test),
        "per_category": per_cat,
        # what became of every column: passages merged into prompts, and columns no row used (never silent)
        "prompt_template": PROMPT_TEMPLATE if imported.context_columns else None,
        "context_columns": dict(sorted(imported.context_columns.items())),
        "unused_columns": dict(sorted(imported.unused_columns.items())),
        "dataset_splits": imported.dataset_splits,
        "skipped_rows": [s.as_dict() for s in imported.skipped],
    }
    return CoverageResult(train, test, report, imported.example, outcomes)


def _problem_kind(problem: str) -> str:
    for kind in (
        "duplicate id",
        "duplicate prompt",
        "multi-turn",
        "over-long",
        "UTF-8",
        "empty",
        "missing",
        "invalid JSON",
    ):
        if kind in problem:
            return kind
    return "other"


def write_coverage(result: CoverageResult, layout: RunLayout) -> dict[str, Path]:
    """Write the declared 01 outputs; the split files are written last so their presence means done."""
    write_jsonl(layout.skipped_file, result.report["skipped_rows"])
    write_json(layout.coverage_report, {k: v for k, v in result.report.items() if k != "skipped_rows"})
    write_jsonl(layout.test_file, result.test)
    write_jsonl(layout.train_file, result.train)
    return {"train": layout.train_file, "test": layout.test_file, "report": layout.coverage_report}


def curation_rows(cfg: CoverageConfig) -> list[dict]:
    """Every imported row before curation (those of both given splits when `splits` is set), for the view."""
    return (import_given_splits(cfg)[0] if cfg.splits is not None else import_coverage(cfg)).rows


def curation_path(cfg: CoverageConfig, layout: RunLayout) -> Path:
    return Path(cfg.curation_file) if cfg.curation_file else layout.curation_file


def run_coverage(cfg: CoverageConfig, seed: int, layout: RunLayout) -> CoverageResult:
    """Import, validate, apply saved curation and review decisions, split and write — the non-interactive path."""
    result = build_coverage(
        cfg, seed, load_decisions(curation_path(cfg, layout)), load_review(layout.review_file)
    )
    write_coverage(result, layout)
    return result


def split_table(result: CoverageResult):
    """Rows per category and split, as a DataFrame (for display and the bar plot); when rows left the splits,
    one more column per reason (rejected in curation, dropped by review) says how many."""
    import pandas as pd

    frame = pd.DataFrame(result.report["per_category"]).fillna(0).astype(int)
    frame["total"] = frame.sum(axis=1)
    for reason, per_category in result.report.get("left_by_category", {}).items():
        if per_category:
            frame[f"left: {reason}"] = pd.Series(per_category).reindex(frame.index).fillna(0).astype(int)
    return frame


def describe_left(result: CoverageResult) -> str:
    """One line: how many rows left the splits and why (curation, review: which cycle's), or that none did."""
    left = result.report.get("left_by_category", {})
    parts = [f"{sum(per.values())} {reason}" for reason, per in left.items() if per]
    cycles = sorted({o["cycle"] for o in result.reviewed.values() if o["cycle"] is not None})
    edited = result.report.get("review", {}).get("references_edited", 0)
    line = f"{len(result.train)} train / {len(result.test)} test rows"
    line += f"; left the splits: {', '.join(parts)}" if parts else "; no row left the splits"
    if edited:
        line += f"; {edited} reference(s) corrected by review"
    if cycles and (edited or left.get("dropped by review")):
        line += f" (review of cycle {', '.join(map(str, cycles))})"
    return line


def plot_split(result: CoverageResult, path: Path | None = None):
    """Bar plot of rows per category per split, and prompt/response length histograms."""
    import matplotlib.pyplot as plt

    table = split_table(result)[["train", "test"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    table.plot.bar(ax=ax1, rot=20)
    ax1.set_title("Rows per category and split")
    ax1.set_ylabel("rows")
    ax1.set_ylim(0, table.to_numpy().max() * 1.3)  # head room: the legend sits above the bars
    ax1.legend(loc="upper center", ncols=2, frameon=False)
    for split, rows in (("train", result.train), ("test", result.test)):
        ax2.hist(
            [len(r["instruction"].split()) + len(r["response"].split()) for r in rows],
            bins=15,
            alpha=0.6,
            label=split,
        )
    ax2.set_title("Words per pair (prompt + response)")
    ax2.legend()
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def split_of(result: CoverageResult) -> dict[str, str]:
    """Row id -> "train" | "test", for the curation view."""
    return {r["id"]: "train" for r in result.train} | {r["id"]: "test" for r in result.test}


def preview(rows: list[dict], n: int = 5):
    import pandas as pd

    frame = pd.DataFrame(rows[:n])[["id", "category", "instruction", "response"]]
    return frame.assign(
        instruction=frame.instruction.str.slice(0, 120), response=frame.response.str.slice(0, 120)
    )


def skipped_table(result: CoverageResult):
    import pandas as pd

    return pd.DataFrame(result.report["skipped_rows"], columns=["row", "field", "problem", "id"])


def _clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[:n] + "…"


def describe_import(result: CoverageResult) -> str:
    """What 01 made of the source's columns: the prompt template with one example, and what it left out."""
    report, example = result.report, result.example
    if example is not None:
        merged = ", ".join(f"{k} ({n} rows)" for k, n in report["context_columns"].items())
        lines = [f"Passages merged into the prompt: {merged}. Template: instruction, blank line, passage:"]
        lines += [f"  row {example['row']}, {k}: {_clip(v)!r}" for k, v in example["fields"].items()]
        lines.append(f"  -> instruction: {_clip(example['instruction'], 320)!r}")
    else:
        lines = [
            f"No passage column ({', '.join(c for c in CONTEXT_KEYS)}): each prompt is its instruction as is "
            "(a row with one would read: instruction, blank line, passage)."
        ]
    unused = report["unused_columns"]
    lines.append(
        "Columns not imported (non-empty values): " + ", ".join(f"{k} ({n})" for k, n in unused.items())
        if unused
        else "Every non-empty column went into the rows."
    )
    if report["dataset_splits"]:
        found, used = report["dataset_splits"]["found"], report["dataset_splits"]["used"]
        left = [s for s in found or [] if s not in used]
        lines.append(f"Dataset splits read: {used}" + (f"; not read: {left}" if left else ""))
    return "\n".join(lines)
