"""01_coverage: import, validate, curate and split the coverage dataset.

Row shapes (auto-detected per row):
  * instruction/response pairs: {"instruction"|"prompt"|"question", "response"|"completion"|"output"|"answer",
    optional id, category, system}
  * a passage that belongs to the prompt (`schemas.CONTEXT_KEYS`): Alpaca {"instruction", "input", "output"},
    Dolly-15k {"instruction", "context", "response", "category"}, SQuAD-like {"context", "question", "answer"},
    BoolQ-like `passage`. ONE template for all of them (`with_context`):

        {instruction}

        {context}

    the instruction, a blank line, the passage — the order of Dolly's own training prompt (instruction, then
    its input) and of Alpaca's (the project kept Alpaca this way before). Rows without a passage keep their
    instruction as is, so their ids (a hash of the prompt, `content_id`) do not change; a row with a passage
    gets its id from the whole prompt, so Dolly's generic "Summarize this paragraph" over different passages
    is several rows, and the same instruction over the same passage is still a duplicate.
  * OpenAI chat: {"messages": [{role, content}, ...]} with an optional system turn (kept as the row's
    `system` prompt), and the No Robots schema {"prompt", "prompt_id", "messages", "category"}
  * ShareGPT: {"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}
No text is dropped in silence: a column the row's shape does not use (a SQuAD `title`, a second prompt key,
a `split` column without `coverage.splits`) is listed in the report's `unused_columns` with its count of
non-empty values, next to `context_columns` (the passages merged into prompts).

Sources: JSON Lines (a UTF-8 BOM is fine), a JSON array (`.json`; also {"data": [...]}), CSV/TSV, Parquet,
a Hugging Face dataset saved with `save_to_disk`, or a hub dataset name (loaded with
`datasets.load_dataset`; needs network, so it is exercised here only on local files).

A dataset with several splits (a `DatasetDict`: train and test, say) is never read one split in silence.
With `coverage.splits` its splits are kept as given; with `coverage.hub_split` that one split is read and
the report's `dataset_splits` names the ones left out; with neither, a dataset holding one split is read
whole and one holding several is an error naming the splits found and the params line to add. We do not
guess: "keep the dataset's own test split" and "split its train split by Phi" are both what a user means,
the two give different test sets (what 04 judges every cycle), and the params cannot say which was meant
(train_ratio has a default). One line, once, settles it for good and is written down in params.yaml.

Validation is never silent: in `strict` mode the first bad row raises `DataFileError` (file, row, field),
in `lenient` mode it is skipped and listed in `skipped.jsonl` and the report — including lines that are
not valid UTF-8. Rows are 1-based lines for JSONL/CSV, element numbers for JSON arrays and Parquet.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import CoverageConfig
from .jsonio import DataFileError, read_json, save_figure, write_json, write_jsonl
from .runlayout import RunLayout
from .schemas import CONTEXT_KEYS, INSTRUCTION_KEYS, RESPONSE_KEYS

ID_KEYS = ("id", "prompt_id")
# ShareGPT speaker names -> chat roles
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
ARRAY_KEYS = ("data", "rows", "examples", "train")  # {"data": [...]}: the rows of a .json file
PROMPT_TEMPLATE = "{instruction}\n\n{context}"  # what `with_context` builds (shown in 01)


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


# --------------------------------------------------------------------------- reading


def detect_format(source: str, fmt: str = "auto") -> str:
    if fmt != "auto":
        return fmt
    path = Path(source)
    if path.is_dir():
        return "hf_disk"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return "hub"
    if not path.exists():
        raise FileNotFoundError(
            f"coverage source not found: {source} (a file, a folder, or a hub name owner/name)"
        )
    raise DataFileError(
        source,
        None,
        None,
        "unknown format; use .jsonl, .json, .csv, .parquet, a save_to_disk folder, or set coverage.format",
    )


def _decode_lines(path: Path) -> Iterator[tuple[int, str | DataFileError]]:
    """(line number, text) per line; a line that is not UTF-8 comes as a DataFileError to skip or raise.

    A UTF-8 byte-order mark at the start of the file is dropped (Windows editors write one).
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield (
                    lineno,
                    DataFileError(path, lineno, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"),
                )


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    for lineno, line in _decode_lines(path):
        if isinstance(line, DataFileError):
            yield lineno, line
            continue
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            yield lineno, DataFileError(path, lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})")


def _json_array_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """The elements of a JSON array file (or of {"data": [...]}); a .json file holding JSON Lines is read so."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataFileError(path, line, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON values one after another: JSON Lines named .json
            yield from _jsonl_rows(path)
            return
        raise DataFileError(
            path,
            None,
            None,
            f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg} (a .json file must hold one "
            'JSON array of rows, e.g. [{"instruction": "...", "output": "..."}], or JSON Lines)',
        ) from exc
    if isinstance(data, dict):
        lists = [k for k in ARRAY_KEYS if isinstance(data.get(k), list)]
        if not lists:
            raise DataFileError(
                path,
                None,
                None,
                f"a JSON object with keys {sorted(data)[:8]}; expected an array of rows, or an object holding "
                f"one under {list(ARRAY_KEYS)}",
            )
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataFileError(path, None, None, f"expected a JSON array of rows, got {type(data).__name__}")
    yield from enumerate(data, start=1)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataFileError(path, None, None, f"not a readable Parquet file: {exc}") from exc
    row = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _csv_rows(path: Path, lenient: bool) -> Iterator[tuple[int, Any]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if not lenient:
            line = raw[: exc.start].count(b"\n") + 1
            raise DataFileError(path, line, None, f"not valid UTF-8 ({exc.reason})") from exc
        # lenient: undecodable bytes become U+FFFD, and the rows holding them are skipped (field named)
        text = raw.decode("utf-8-sig", errors="replace")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    for record in reader:
        yield reader.line_num, record


def iter_raw_rows(source: str, fmt: str, cfg: CoverageConfig) -> Iterator[tuple[int, Any]]:
    """Yield (row number, raw record or the DataFileError of an unreadable row).

    Row numbers are 1-based lines for JSONL/CSV, element numbers for JSON arrays, Parquet and datasets.
    """
    path = Path(source)
    if fmt == "jsonl":
        yield from _jsonl_rows(path)
    elif fmt == "json":
        yield from _json_array_rows(path)
    elif fmt == "csv":
        yield from _csv_rows(path, cfg.strictness == "lenient")
    elif fmt == "parquet":
        yield from _parquet_rows(path)
    elif fmt in ("hf_disk", "hub"):
        yield from enumerate(open_dataset(source, fmt, cfg)[0], start=1)
    else:
        raise ValueError(f"unknown coverage format {fmt!r}")


def open_dataset(source: str, fmt: str, cfg: CoverageConfig) -> tuple[Any, dict | None]:
    """The split to read of a hub / save_to_disk dataset, and {"found": splits, "used": [split]} (None: no splits).

    `cfg.hub_split` names it; without one a dataset of one split is read whole and one of several is a
    `DataFileError` naming the splits found and the params lines that choose (see the module docstring).
    """
    import datasets

    if fmt == "hf_disk":
        ds = datasets.load_from_disk(source)
    else:
        ds = datasets.load_dataset(source, cfg.hub_subset, split=cfg.hub_split)
    if not isinstance(ds, datasets.DatasetDict):
        return ds, None if cfg.hub_split is None else {"found": None, "used": [cfg.hub_split]}
    found = list(ds)
    if cfg.hub_split is not None and cfg.hub_split not in ds:
        raise DataFileError(
            source, None, "hub_split", f"no split named {cfg.hub_split!r}; the dataset has {found}"
        )
    if cfg.hub_split is None and len(found) > 1:
        train = "train" if "train" in found else found[0]
        test = next((n for n in ("test", "validation") if n in found), next(n for n in found if n != train))
        raise DataFileError(
            source,
            None,
            "splits",
            f"the dataset has {len(found)} splits {found}; reading one would drop the others' rows. Add under "
            f'coverage: in the params "splits: {{train: {train}, test: {test}}}" (keeps them as given) or '
            f'"hub_split: {train}" (reads that split alone and splits it by train_ratio)',
        )
    name = cfg.hub_split or found[0]
    return ds[name], {"found": found, "used": [name]}


# --------------------------------------------------------------------------- normalising one row


class RowProblem(Exception):
    def __init__(self, field: str | None, problem: str):
        self.field, self.problem = field, problem


def _text(value: Any, name: str) -> str:
    if value is None:
        raise RowProblem(name, "missing")
    if not isinstance(value, str):
        raise RowProblem(name, f"expected text, got {type(value).__name__}")
    if "\ufffd" in value:
        raise RowProblem(name, "contains U+FFFD replacement characters (text was not valid UTF-8 upstream)")
    if not value.strip():
        raise RowProblem(name, "empty")
    return value.strip()


def _from_messages(messages: Any, name: str = "messages") -> tuple[str | None, str, str]:
    """(system prompt or None, user turn, assistant turn) of a single-turn chat."""
    if not isinstance(messages, list) or not messages:
        raise RowProblem(name, "expected a non-empty list of {role, content} turns")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowProblem(f"{name}[{i}]", "expected an object with 'role' and 'content'")
        turns.append(m)
    systems = [m for m in turns if m["role"] == "system"]
    if len(systems) > 1 or (systems and turns[0] is not systems[0]):
        raise RowProblem(name, "a system turn must come first, and only once")
    system = _text(systems[0]["content"], f"{name}[system].content") if systems else None
    dialogue = [m for m in turns if m["role"] != "system"]
    roles = [m["role"] for m in dialogue]
    if roles.count("user") > 1 or roles.count("assistant") > 1:
        raise RowProblem(
            name, f"multi-turn conversation ({len(dialogue)} turns); only single-turn pairs are used"
        )
    if roles != ["user", "assistant"]:
        raise RowProblem(name, f"expected a user turn followed by an assistant turn, got roles {roles}")
    return (
        system,
        _text(dialogue[0]["content"], f"{name}[user].content"),
        _text(dialogue[1]["content"], f"{name}[assistant].content"),
    )


def _sharegpt_messages(conversations: Any) -> list[dict]:
    """ShareGPT turns {"from", "value"} as chat messages {"role", "content"}."""
    if not isinstance(conversations, list) or not conversations:
        raise RowProblem("conversations", 'expected a non-empty list of {"from", "value"} turns')
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise RowProblem(f"conversations[{i}]", "expected an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).strip().lower())
        if role is None:
            raise RowProblem(
                f"conversations[{i}].from",
                f"unknown speaker {turn['from']!r}; expected one of {sorted(SHAREGPT_ROLES)}",
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _optional_text(record: dict, key: str) -> str | None:
    value = record.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _text(value, key)


def with_context(instruction: str, contexts: Iterable[str]) -> str:
    """The prompt of a row whose passage belongs to it: instruction, blank line, passage (`PROMPT_TEMPLATE`).

    The one combining rule of every shape (Alpaca `input`, Dolly / SQuAD `context`, `passage`); with no
    non-empty passage the instruction comes back unchanged, so the row's id does not change either.
    """
    return "\n\n".join([instruction, *(c for c in contexts if c)])


@dataclass
class Normalized:
    id: str | None
    instruction: str
    response: str
    category: str
    system: str | None
    used: set[str]  # the record's keys whose text is in the row (or that only name its id/category/shape)
    contexts: dict[str, str]  # passage key -> text merged into the instruction


def normalize_row(record: Any) -> Normalized:
    """The row of one record (see the module docstring for the shapes), or raise RowProblem."""
    if not isinstance(record, dict):
        raise RowProblem(None, f"expected an object, got {type(record).__name__}")
    system = _optional_text(record, "system")
    used = {"system", "category"}
    contexts: dict[str, str] = {}
    if record.get("messages") is not None or record.get("conversations") is not None:
        if record.get("messages") is not None:
            chat_system, instruction, response = _from_messages(record["messages"])
            used.add("messages")
        else:
            messages = _sharegpt_messages(record["conversations"])
            chat_system, instruction, response = _from_messages(messages, "conversations")
            used.add("conversations")
        if chat_system and system and chat_system != system:
            raise RowProblem("system", "differs from the system turn of the conversation")
        system = chat_system or system
        prompt = record.get("prompt")
        if isinstance(prompt, str) and prompt.strip() and prompt.strip() != instruction:
            raise RowProblem("prompt", "differs from the user turn in 'messages'")
        used.add("prompt")
    else:
        ikey = next((k for k in INSTRUCTION_KEYS if k in record), None)
        rkey = next((k for k in RESPONSE_KEYS if k in record), None)
        if ikey is None:
            raise RowProblem(
                "instruction", f"missing (expected one of {INSTRUCTION_KEYS}, 'messages' or 'conversations')"
            )
        if rkey is None:
            raise RowProblem(
                "response", f"missing (expected one of {RESPONSE_KEYS}, 'messages' or 'conversations')"
            )
        instruction, response = _text(record[ikey], ikey), _text(record[rkey], rkey)
        used |= {ikey, rkey}
        for key in CONTEXT_KEYS:  # Alpaca input, Dolly / SQuAD context: part of the prompt
            if key != ikey and key in record:
                used.add(key)
                if text := _optional_text(record, key):
                    contexts[key] = text
        instruction = with_context(instruction, contexts.values())
    id_key = next((k for k in ID_KEYS if record.get(k) not in (None, "")), None)
    row_id = None if id_key is None else str(record[id_key]).strip()
    used.add(id_key or ID_KEYS[0])
    category = record.get("category") or "uncategorized"
    if not isinstance(category, str):
        raise RowProblem("category", f"expected text, got {type(category).__name__}")
    return Normalized(row_id, instruction, response, category.strip(), system, used, contexts)


def _non_empty(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, list | tuple | dict):
        return bool(value)
    return value is not None


def normalize_prompt(text: str) -> str:
    """Key under which two prompts count as the same prompt (case, unicode form and whitespace ignored)."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().casefold()


def content_id(instruction: str, system: str | None = None) -> str:
    return "cov-" + hashlib.sha256(prompt_key(instruction, system).encode()).hexdigest()[:12]


def prompt_key(instruction: str, system: str | None = None) -> str:
    """Two rows are the same prompt when instruction and system prompt match (normalised)."""
    key = normalize_prompt(instruction)
    return key if not system else f"{normalize_prompt(system)}\n{key}"


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


# --------------------------------------------------------------------------- the stage


@dataclass
class CoverageResult:
    train: list[dict]
    test: list[dict]
    report: dict
    example: dict | None = None  # the first imported row with a passage (`Imported.example`), for 01


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
    return CoverageResult(train, test, report, imported.example)


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
    from .review import load_review

    result = build_coverage(
        cfg, seed, load_decisions(curation_path(cfg, layout)), load_review(layout.review_file)
    )
    write_coverage(result, layout)
    return result


def split_table(result: CoverageResult):
    """Rows per category and split, as a DataFrame (for display and the bar plot)."""
    import pandas as pd

    frame = pd.DataFrame(result.report["per_category"]).fillna(0).astype(int)
    frame["total"] = frame.sum(axis=1)
    return frame


def plot_split(result: CoverageResult, path: Path | None = None):
    """Bar plot of rows per category per split, and prompt/response length histograms."""
    import matplotlib.pyplot as plt

    table = split_table(result).drop(columns="total")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    table.plot.bar(ax=ax1, rot=20)
    ax1.set_title("Rows per category and split")
    ax1.set_ylabel("rows")
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
