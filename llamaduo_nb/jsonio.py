"""The one place that reads and writes run files: atomic writes, JSONL and JSON.

Every file a stage declares is written through `atomic_write` (temp file in the same folder, fsync,
`os.replace`), so a reader never sees half a file: either the old content, the new one, or nothing.
Also the two helpers every writer of derived files shares: `sha256_file` (a file's content hash) and
`markdown_table` (the GitHub Markdown tables of model cards, Table 1 and the run summary).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class DataFileError(ValueError):
    """A data file is malformed; the message names the file, the row (1-based line) and the field."""

    def __init__(self, path: str | Path, row: int | None, field: str | None, problem: str):
        self.path, self.row, self.field, self.problem = str(path), row, field, problem
        where = str(path)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file next to `path`; on success fsync and rename it over `path`, on error delete it.

    The file gets the permissions a plain `open()` would give (mkstemp's 0600 would hide run products).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    with atomic_write(path) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False, sort_keys=False, default=str)
        fh.write("\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFileError(path, exc.lineno, None, f"invalid JSON: {exc.msg}") from exc


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows as JSON Lines atomically; returns the number of rows written."""
    n = 0
    with atomic_write(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=str))
            fh.write("\n")
            n += 1
    return n


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield the objects of a JSONL file; blank lines are skipped, bad lines raise DataFileError."""
    path = Path(path)
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataFileError(
                    path, lineno, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
                ) from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFileError(path, lineno, None, f"invalid JSON: {exc.msg}") from exc
            if not isinstance(obj, dict):
                raise DataFileError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
            yield obj


def read_jsonl(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=dpi)
    return Path(path)


class NotEnoughSpace(OSError):
    """A write would not fit on its file system; raised before anything is written."""


def ensure_free_space(path: str | Path, need_bytes: int, what: str) -> None:
    """Raise `NotEnoughSpace` naming `what`, the folder and both sizes when the file system holding `path`
    (or its nearest existing parent) has less than `need_bytes` (+ 2 %) free. Model folders are written whole
    before anything checks them, so a full disk found midway costs the minutes before it and leaves a
    library error (safetensors' "I/O error: No space left on device") that names no file."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes * 1.02:
        raise NotEnoughSpace(
            f"{what}: needs about {need_bytes / 1e9:.2f} GB at {path}, but its file system has "
            f"{free / 1e9:.2f} GB free; free some space (e.g. earlier runs under outputs/) or set outputs_dir "
            "to a larger disk"
        )


@contextlib.contextmanager
def atomic_dir(target: str | Path, need_bytes: int = 0, what: str = "") -> Iterator[Path]:
    """Yield a temp folder beside `target`; on success it replaces `target` whole, on error it is deleted.

    Readers see the old folder or the new one, never a half-written one (model folders, adapters). With
    `need_bytes` (what the folder will hold), a file system without that much free space is refused before
    anything is written (`ensure_free_space`; the old folder stays until the new one is complete).
    """
    target = Path(target)
    if need_bytes:
        ensure_free_space(target.parent, need_bytes, what or str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes private folders; these are shared like any other
        for item in tmp.rglob("*"):
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~_UMASK)
        if target.exists():
            stale = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, digest: Any = None) -> str:
    """The hex SHA-256 of a file's bytes, read in blocks. Given `digest` (a `hashlib` object, for a hash of
    several files or of a file plus settings), the bytes are fed into it and its hexdigest so far returned."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table (lines joined by newlines, no final newline). Cells are written with `str`,
    a "|" inside a cell escaped; callers blank their missing values (None, NaN) themselves."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)
