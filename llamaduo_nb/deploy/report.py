"""06: the stage report deploy/deploy.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..jsonio import write_json
from ..runlayout import RunLayout


def write_report(layout: RunLayout, **parts: Any) -> dict:
    """deploy/deploy.json: what was shipped, where, how big, how long, and whether parity held."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
        if isinstance(value, pd.DataFrame):
            return json.loads(value.to_json(orient="records"))
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    report = {k: plain(v) for k, v in parts.items()}
    write_json(layout.deploy_report, report)
    return report
