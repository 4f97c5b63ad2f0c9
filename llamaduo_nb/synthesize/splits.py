"""01's splits as 05 reads them (the teacher study's instructions, synthesis seeds, decontamination), checked."""

from __future__ import annotations

from pathlib import Path

from ..jsonio import DataFileError, read_jsonl


def load_split(path: Path, name: str) -> list[dict]:
    """The rows of a coverage split; every row has text `id`, `instruction` and `response`."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run 01_coverage first (the {name} split is needed)")
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, start=1):
        for key in ("id", "instruction", "response"):
            if not isinstance(row.get(key), str):
                raise DataFileError(path, lineno, key, "required text field is missing or not a string")
    return rows
