"""What every notebook's second cell calls: parameters -> validated config + run layout.

A notebook's `parameters` cell holds flat typed literals; `open_stage` checks their types, loads the
run's resolved params (`<run>/params.yaml`, written by the runner) or, for a first interactive session,
the `params_file`, and returns a `Stage` with the config, the layout and the cycle.

Relative paths — `run_dir`, `params_file` and the paths inside the params file (`coverage.source`,
`coverage.curation_file`, `prices_file`, `outputs_dir`) — resolve against the project root, so a notebook
opened in JupyterLab from `notebooks/` reads and writes the same files as a Papermill run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, dump_config, load_config
from .runlayout import STAGES, RunLayout, project_path


@dataclass(frozen=True)
class Stage:
    name: str
    cfg: RunConfig
    layout: RunLayout
    cycle: int | None

    @property
    def cycle_dir(self) -> Path:
        if self.cycle is None:
            raise ConfigError(f"{self.name} is not a per-cycle stage")
        return self.layout.cycle_dir(self.cycle)


def check_parameter_types(values: dict[str, Any], declared: dict[str, type | tuple[type, ...]]) -> None:
    """Raise ConfigError when a notebook parameter has the wrong type or is not declared."""
    for name, value in values.items():
        if name not in declared:
            raise ConfigError(f"unknown notebook parameter '{name}'; this notebook takes {sorted(declared)}")
        expected = declared[name]
        if isinstance(value, bool) and bool not in (expected if isinstance(expected, tuple) else (expected,)):
            raise ConfigError(f"notebook parameter '{name}': expected {expected}, got bool {value!r}")
        if not isinstance(value, expected):
            raise ConfigError(
                f"notebook parameter '{name}': expected {getattr(expected, '__name__', expected)}, "
                f"got {type(value).__name__} {value!r}"
            )


def open_stage(stage: str, run_dir: str, params_file: str = "", cycle: int | None = None) -> Stage:
    """Load the run's config for a notebook.

    `run_dir` is `outputs/<run>`. When it holds a params.yaml (the runner writes it) that file wins, so all
    stages of a run see the same settings; otherwise `params_file` is loaded and resolved into the run dir.
    """
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; stages are {list(STAGES)}")
    check_parameter_types(
        {"run_dir": run_dir, "params_file": params_file}, {"run_dir": str, "params_file": str}
    )
    if cycle is not None:
        check_parameter_types({"cycle": cycle}, {"cycle": int})
        if cycle < 0:
            raise ConfigError(f"notebook parameter 'cycle' must be >= 0, got {cycle}")
    layout = RunLayout(project_path(run_dir))
    if layout.params_file.is_file():
        cfg = load_config(layout.params_file)
    elif params_file:
        cfg = load_config(project_path(params_file))
        dump_config(cfg, layout.params_file)
    else:
        raise ConfigError(
            f"{layout.params_file} does not exist and no params_file was given; "
            "pass params_file='params/demo.yaml' or start the run with `llamaduo run params/demo.yaml`"
        )
    return Stage(stage, resolve_project_paths(cfg), layout, cycle)


def resolve_project_paths(cfg: RunConfig) -> RunConfig:
    """The config with its relative file paths made absolute against the project root.

    `coverage.source` is rewritten only when that file or folder exists under the project root: a name
    that exists nowhere may be a hub dataset (`owner/name`), which `coverage.detect_format` decides.
    """
    coverage = cfg.coverage
    source = project_path(coverage.source)
    if source.exists():
        coverage = replace(coverage, source=str(source))
    if coverage.curation_file:
        coverage = replace(coverage, curation_file=str(project_path(coverage.curation_file)))
    return replace(
        cfg,
        coverage=coverage,
        prices_file=str(project_path(cfg.prices_file)),
        outputs_dir=str(project_path(cfg.outputs_dir)),
    )
