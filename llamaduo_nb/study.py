"""Combine finished runs: Fig. 2 over synthetic volume and Table 1 across runs — one code path for the end of a
sweep or study (`runner`) and for `llamaduo compare RUN_DIR RUN_DIR ...`.

A *line* is one finished run: an arm of a study (one synthetic-data generator) or a run given to `compare`
(e.g. another student). From each line's cycles it reads what 04 wrote (metrics.json: V, C@zeta and their
95% cluster-bootstrap intervals; the ε verdict) and what 02 wrote (finetune.json: training rows by origin),
and writes, into one folder (`RunLayout` paths):

* `fig2_volumes.png` — paper Fig. 2: a row per statistic (mean, C@zeta), a column per judge, score against
  the synthetic rows in training on a log axis, one colour per line (precision solid, similarity dashed),
  bands from the intervals; cycle 0 (no synthetic rows, not on a log axis) as a dotted level in the line's
  colour, the service baselines as grey levels. `fig2_volumes.csv` holds every point drawn.
* `volumes_table.md/.csv` — a Table-1 cell (`mean / C@50 / C@70 [interval of the mean]`) per line × volume
  and judge, with ε's verdict and the cycle `deploy.select` picks.
* `table1_study.md/.csv` — one Table 1 (evaluate.tables: intervals, P-Match) across the lines: each line's
  student before fine-tuning and at its selected cycle, and the service baselines (a study's arms share the
  base student and cycle 0: those rows appear once).
* `study.json` — what was combined: the runs, their selected cycles, the test split's SHA-256, the judges.

Lines are combined only when they were judged alike: the same test split (SHA-256 of test.jsonl), the same
judges and the same zetas; otherwise `StudyError` says which run differs and how.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .config import ConfigError, RunConfig, load_config
from .deploy.select import DeployError, select_cycle
from .evaluate import (
    BASE_MODEL,
    METRIC_JUDGES,
    METRICS,
    load_judgments,
    markdown_table,
    reference_lines,
    table1_long,
    write_table1,
    zeta_key,
)
from .evaluate.plots import REFERENCE_STYLES, cycles_frame
from .jsonio import atomic_write, read_json, save_figure, sha256_file, write_json
from .runlayout import RunLayout
from .schemas import evaluated_cycles

FRAME_COLUMNS = [
    "line",
    "cycle",
    "synthetic_rows",
    "train_rows",
    "judge",
    "metric",
    "statistic",
    "value",
    "ci_low",
    "ci_high",
    "passed",
    "selected",
]
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
METRIC_LINESTYLE = {"precision": "-", "similarity": "--"}


class StudyError(ConfigError):
    """Runs that cannot be combined (different test split or judges, unfinished, no evaluated cycle)."""


@dataclass(frozen=True)
class Line:
    """One finished run drawn as one line: its label (generator or run name), folder and settings."""

    label: str
    layout: RunLayout
    cfg: RunConfig

    @property
    def selected(self):
        """The cycle `deploy.select` ships (`deploy.select.select_cycle`)."""
        return select_cycle(self.layout, self.cfg.deploy.select)


# --------------------------------------------------------------------------- lines and their checks


def study_lines(cfg: RunConfig, layout: RunLayout) -> list[Line]:
    """The lines of a sweep or study: every arm of a study (one per generator), or the run itself."""
    if cfg.arms:
        return [
            Line(arm, RunLayout(layout.arm_dir(arm)), load_config(RunLayout(layout.arm_dir(arm)).params_file))
            for arm in cfg.arms
        ]
    return [Line(cfg.synthesize.generator_names[0], layout, cfg)]


def run_lines(run_dirs: Sequence[str | Path]) -> list[Line]:
    """`llamaduo compare`'s lines: each folder must be a finished run (params.yaml, state.json "finished"); a
    study's folder stands for its arms (one line per generator, named `<study>/<generator>`)."""
    lines = []
    for run_dir in run_dirs:
        layout = RunLayout(Path(run_dir))
        if layout.arms():
            lines += run_lines([layout.arm_dir(arm) for arm in layout.arms()])
            continue
        if not layout.params_file.is_file():
            raise StudyError(f"{layout.root}: no params.yaml; name a run folder, e.g. outputs/demo")
        state = read_json(layout.state_file) if layout.state_file.is_file() else {}
        if state.get("status") != "finished":
            raise StudyError(
                f"{layout.root}: the run is not finished (status {state.get('status', 'unknown')}); compare reads "
                "finished runs (`llamaduo run <params> --resume` finishes it)"
            )
        lines.append(Line(_run_label(layout), layout, load_config(layout.params_file)))
    labels = [line.label for line in lines]
    if len(set(labels)) < len(labels):  # two folders of one name: name each by its full path
        lines = [Line(str(ln.layout.root), ln.layout, ln.cfg) for ln in lines]
    return lines


def _run_label(layout: RunLayout) -> str:
    """A run's name in tables and legends: its folder, `<study>/<generator>` for an arm of a study."""
    state = read_json(layout.state_file) if layout.state_file.is_file() else {}
    if state.get("shared_from"):
        return f"{Path(state['shared_from']).name}/{layout.root.name}"
    return layout.root.name


def check_comparable(lines: Sequence[Line]) -> dict[str, Any]:
    """The test split's SHA-256, the judges and zetas every line shares; StudyError naming the first that
    differs (a Table 1 across runs judged on other prompts or by other judges would mislead)."""
    if not lines:
        raise StudyError("nothing to combine: name at least one finished run")
    first = lines[0]
    facts = []
    for line in lines:
        if not line.layout.test_file.is_file():
            raise StudyError(f"{line.layout.root}: no {line.layout.test_file.name}; run 01_coverage first")
        facts.append(
            {
                "test_sha256": sha256_file(line.layout.test_file),
                "judges": sorted(line.cfg.evaluate.all_judges),
                "zetas": [float(z) for z in line.cfg.evaluate.zetas],
            }
        )
    for line, fact in zip(lines[1:], facts[1:], strict=True):
        for key, what in (
            ("test_sha256", "test split (SHA-256 of coverage/test.jsonl)"),
            ("judges", "judges (evaluate.judges + evaluate.metric_judges)"),
            ("zetas", "zetas (evaluate.zetas)"),
        ):
            if fact[key] != facts[0][key]:
                raise StudyError(
                    f"{line.layout.root} and {first.layout.root} differ in their {what}: {fact[key]} vs "
                    f"{facts[0][key]}; a Table 1 across them would compare scores measured differently"
                )
    return facts[0]


# --------------------------------------------------------------------------- Fig. 2 over volume


def _synthetic_rows(layout: RunLayout, cycle: int) -> int | None:
    path = layout.train_summary(cycle)
    if not path.is_file():
        return None
    summary = read_json(path)
    by_origin = summary.get("rows_by_origin") or {}
    return sum(n for origin, n in by_origin.items() if origin != "coverage")


def volume_frame(lines: Sequence[Line]) -> pd.DataFrame:
    """Every (line, cycle, judge, metric, statistic) with its interval, the cycle's synthetic and training rows
    (finetune.json), ε's verdict and whether `deploy.select` picks it: the points of Fig. 2 over volume. The
    points are 04's own Fig. 2 frame (`evaluate.cycles_frame`), a reference metric's similarity left out."""
    frames = []
    for line in lines:
        try:
            selected = line.selected.cycle
        except DeployError:
            selected = None
        points = cycles_frame(line.layout)
        if points.empty:
            continue
        passed = {
            cycle: bool((metrics.get("decision") or {}).get("passed", False))
            for cycle, metrics, _ in evaluated_cycles(line.layout)
        }
        wanted = [
            metric in _metrics(judge) for judge, metric in zip(points.judge, points.metric, strict=True)
        ]
        points = points[wanted]
        points = points.assign(
            line=line.label,
            synthetic_rows=points.cycle.map({c: _synthetic_rows(line.layout, c) for c in passed}),
            passed=points.cycle.map(passed),
            selected=points.cycle == selected,
        )
        frames.append(points[FRAME_COLUMNS])
    if not frames:
        return pd.DataFrame(columns=FRAME_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def _metrics(judge: str) -> tuple[str, ...]:
    """A reference metric scores precision = similarity: one line."""
    return ("precision",) if judge in METRIC_JUDGES else METRICS


def plot_volumes(frame: pd.DataFrame, path: str | Path, epsilon: float | None = None, references=None):
    """Paper Fig. 2: score against synthetic rows in training (log axis), a row per statistic, a column per
    judge, one colour per line with its 95% band; cycle 0 (no synthetic rows) as a dotted level in the line's
    colour; `references` ({model: {judge: {metric: {stat: value}}}}, the service baselines) as grey levels."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    stats = list(dict.fromkeys(frame["statistic"])) or ["mean"]
    judges = list(dict.fromkeys(frame["judge"])) or ["(no judgments)"]
    labels = list(dict.fromkeys(frame["line"]))
    colour = {label: COLOURS[i % len(COLOURS)] for i, label in enumerate(labels)}
    refs = list(references or {})
    ref_style = {label: REFERENCE_STYLES[i % len(REFERENCE_STYLES)] for i, label in enumerate(refs)}
    fig, axes = plt.subplots(
        len(stats), len(judges), figsize=(4.2 * len(judges), 2.7 * len(stats) + 1.0), squeeze=False,
        sharex=True, sharey=True,
    )  # fmt: skip
    swept = frame[frame["synthetic_rows"].fillna(0) > 0]
    for r, stat in enumerate(stats):
        for c, judge in enumerate(judges):
            ax = axes[r][c]
            for label in labels:
                for metric in _metrics(judge):
                    rows = frame[
                        (frame["line"] == label) & (frame["judge"] == judge)
                        & (frame["metric"] == metric) & (frame["statistic"] == stat)
                    ]  # fmt: skip
                    on_axis = rows[rows["synthetic_rows"].fillna(0) > 0].sort_values("synthetic_rows")
                    x = on_axis["synthetic_rows"].astype(float).to_numpy()
                    y = on_axis["value"].astype(float).to_numpy()
                    style = {"color": colour[label], "ls": METRIC_LINESTYLE[metric]}
                    ax.plot(x, y, marker="o", lw=1.6, ms=4, label=f"{label} {metric}", **style)
                    lo, hi = on_axis["ci_low"].astype(float), on_axis["ci_high"].astype(float)
                    if len(on_axis) and lo.notna().all() and hi.notna().all():
                        ax.fill_between(x, lo, hi, color=colour[label], alpha=0.12, lw=0)
                    start = rows[rows["synthetic_rows"].fillna(0) == 0]["value"].dropna()
                    if len(start):
                        ax.axhline(float(start.iloc[0]), color=colour[label], ls=":", lw=1.0, alpha=0.8)
                    for ref in refs:
                        v = (references[ref].get(judge) or {}).get(metric, {}).get(stat)
                        if v is not None:
                            ax.axhline(v, color="#555555", ls=ref_style[ref], lw=1.0, alpha=0.7)
            if epsilon is not None:
                ax.axhline(epsilon, color="#d62728", lw=0.9, ls="--", alpha=0.6)
            if len(swept):
                ax.set_xscale("log")
            ax.set_ylim(0, 101)
            ax.grid(axis="y", color="#eeeeee", lw=0.6)
            if r == 0:
                kind = "reference metric" if judge in METRIC_JUDGES else "LLM judge"
                ax.set_title(f"{judge} ({kind})", fontsize=10)
            if c == 0:
                ax.set_ylabel("V" if stat == "mean" else stat.replace("c@", "C@"))
            if r == len(stats) - 1:
                ax.set_xlabel("synthetic rows in training (log)", fontsize=9)
    if len(swept):
        ticks = sorted({int(v) for v in swept["synthetic_rows"]})
        for ax in axes[-1]:
            ax.set_xticks(ticks, [_volume_label(v) for v in ticks], fontsize=8)
            ax.minorticks_off()
    handles = [Line2D([], [], color=colour[label], marker="o", label=label) for label in labels]
    if any(j not in METRIC_JUDGES for j in judges):
        handles += [Line2D([], [], color="grey", ls=METRIC_LINESTYLE[m], label=m) for m in METRICS]
    handles.append(Line2D([], [], color="grey", ls=":", label="cycle 0 (no synthetic rows)"))
    handles += [Line2D([], [], color="#555555", ls=ref_style[ref], label=f"{ref} (service)") for ref in refs]
    if epsilon is not None:
        handles.append(Line2D([], [], color="#d62728", ls="--", label=f"epsilon {epsilon:g}"))
    fig.suptitle("Over synthetic volume (paper Fig. 2): 95% cluster-bootstrap bands")
    ncols = min(len(handles), 4)
    fig.legend(handles=handles, loc="lower center", ncols=ncols, fontsize=8, frameon=False)
    rows_of_legend = -(-len(handles) // ncols)
    fig.tight_layout(rect=(0, 0.035 * rows_of_legend + 0.02, 1, 1))
    save_figure(fig, path)
    return fig


def _volume_label(rows: int) -> str:
    if rows >= 1000 and rows % 1000 == 0:
        return f"{rows // 1000}K"
    return str(rows)


# --------------------------------------------------------------------------- tables


def _cell(stats: dict, zetas: Sequence[float]) -> str:
    if stats.get("mean") is None:
        return "n/a"
    text = " / ".join(
        [f"{stats['mean']:.2f}", *(f"{stats.get(zeta_key(z), float('nan')):.0f}%" for z in zetas)]
    )
    ci = stats.get("mean_ci95")
    return text + (f" [{ci[0]:.1f}-{ci[1]:.1f}]" if ci else "")


def volumes_table(lines: Sequence[Line]) -> pd.DataFrame:
    """Table 1 per line × volume: `mean / C@zeta [interval of the mean]` per judge and metric (metrics.json),
    ε's verdict, and the cycle `deploy.select` ships."""
    records = []
    for line in lines:
        try:
            selected = line.selected.cycle
        except DeployError:
            selected = None
        zetas = line.cfg.evaluate.zetas
        for cycle, metrics, train_rows in evaluated_cycles(line.layout):
            decision = metrics.get("decision") or {}
            record: dict[str, Any] = {
                "line": line.label,
                "cycle": cycle,
                "synthetic rows": _synthetic_rows(line.layout, cycle),
                "train rows": train_rows,
            }
            for judge, entry in metrics.get("per_judge", {}).items():
                for metric in _metrics(judge):
                    column = judge if judge in METRIC_JUDGES else f"{judge} {metric}"
                    record[column] = _cell(entry.get(metric, {}), zetas)
            value = decision.get("value")
            record["decision value"] = "n/a" if value is None else f"{value:.2f}"
            record["epsilon"] = "met" if decision.get("passed") else "not met"
            record["shipped"] = "yes" if cycle == selected else ""
            records.append(record)
    return pd.DataFrame(records)


def study_models(lines: Sequence[Line], *, shared_prefix: bool) -> dict[str, tuple[str, list]]:
    """Table 1's rows across the lines: the students before fine-tuning, each line at its selected cycle, then
    the service baselines (each once, from the first line that has it). `shared_prefix` True (compare): every
    line brings its own base-student row, all rows named by their line; a judgments file already taken through
    a hard link (the arms of one study share their base student and cycle 0) is not repeated. False (a study):
    the shared base student and cycle 0 once, unnamed; an arm whose selected cycle is 0 adds no row of its
    own."""
    models: dict[str, tuple[str, list]] = {}
    files: set[tuple[int, int]] = set()  # a file linked into several arms is one model's judgments: once

    def add(label: str, kind: str, path: Path) -> None:
        if not path.is_file() or label in models:
            return
        identity = (path.stat().st_dev, path.stat().st_ino)
        if identity not in files:
            files.add(identity)
            models[label] = (kind, load_judgments(path))

    if not shared_prefix:
        add(BASE_MODEL, "base", lines[0].layout.baseline_judgments_file("base_student"))
        add("cycle 0 (coverage data only)", "local", lines[0].layout.judgments_file(0))
    for line in lines:
        prefix = f"{line.label}: "
        if shared_prefix:
            add(f"{prefix}{BASE_MODEL}", "base", line.layout.baseline_judgments_file("base_student"))
        choice = line.selected
        if not shared_prefix and choice.cycle == 0:
            continue
        volume = _synthetic_rows(line.layout, choice.cycle)
        what = f"cycle {choice.cycle}" + (f", {volume} synthetic rows" if volume else "")
        add(f"{prefix}{what}", "local", line.layout.judgments_file(choice.cycle))
    for line in lines:
        for model in line.cfg.evaluate.baselines:
            add(model, "service", line.layout.baseline_judgments_file(model))
    return models


# --------------------------------------------------------------------------- the one combiner


def combine(lines: Sequence[Line], out: RunLayout, *, shared_prefix: bool) -> list[str]:
    """Check, then write Fig. 2 over volume, the volume table, Table 1 across the lines and study.json into
    `out`; returns the Markdown lines that present them (the summary's section, `compare`'s report)."""
    facts = check_comparable(lines)
    ev = lines[0].cfg.evaluate
    for line in lines:
        try:
            line.selected  # noqa: B018 -- a line without an evaluated cycle and adapter cannot be combined
        except DeployError as exc:
            raise StudyError(f"{line.label}: {exc}") from None
    out.root.mkdir(parents=True, exist_ok=True)
    long = table1_long(study_models(lines, shared_prefix=shared_prefix), ev)
    write_table1(long, ev.zetas, out.study_table1_csv, out.study_table1_md)
    service = long[long["kind"] == "service"]
    frame = volume_frame(lines)
    with atomic_write(out.volumes_csv) as fh:
        frame.to_csv(fh, index=False)
    import matplotlib.pyplot as plt

    fig = plot_volumes(
        frame, out.volumes_plot, ev.epsilon, reference_lines(service) if len(service) else None
    )
    plt.close(fig)
    table = volumes_table(lines)
    with atomic_write(out.volumes_table_csv) as fh:
        table.to_csv(fh, index=False)
    volumes_md = markdown_table(table.set_index("line").rename_axis("line").fillna(""))
    with atomic_write(out.volumes_table_md) as fh:
        fh.write(volumes_md)
    chosen = []
    for line in lines:
        choice = line.selected
        state = read_json(line.layout.state_file) if line.layout.state_file.is_file() else {}
        chosen.append(
            {
                "line": line.label,
                "run_dir": str(line.layout.root),
                "student": line.cfg.student.model_id,
                "generator": line.cfg.synthesize.generator_names,
                "selected_cycle": choice.cycle,
                "select": choice.select,
                "why": choice.reason,
                "stop_reason": state.get("stop_reason"),
            }
        )
    write_json(out.study_file, {**facts, "lines": chosen})
    rel = lambda p: Path(p).name  # noqa: E731 -- every file sits in `out`
    lines_md = [
        "## Over synthetic volume (paper Fig. 2)",
        "",
        f"![score against synthetic volume]({rel(out.volumes_plot)})",
        "",
        f"One colour per line ({', '.join(line.label for line in lines)}); x: synthetic rows in training (log "
        "axis, as 02 counted them); cycle 0 (no synthetic rows) is the dotted level. Bands: the 95% "
        "cluster-bootstrap intervals of 04; where they overlap, this test split does not tell the lines or "
        f"volumes apart (a tiny student cannot show an effect). Every point: `{rel(out.volumes_csv)}`.",
        "",
        "### Per line and volume (Table 1 cells: mean / C@zeta [interval of the mean])",
        "",
        volumes_md.rstrip("\n"),
        "",
        "### Table 1 across the lines (each at the cycle `deploy.select` ships)",
        "",
        out.study_table1_md.read_text(encoding="utf-8").rstrip("\n"),
        "",
        "Shipped cycle per line: " + "; ".join(f"{c['line']}: {c['why']}" for c in chosen) + ".",
    ]
    return lines_md


def write_study(cfg: RunConfig, layout: RunLayout) -> list[str]:
    """The end of a sweep or study: `combine` its lines (the arms, or the run itself) into its own folder."""
    lines = study_lines(cfg, layout)
    section = combine(lines, layout, shared_prefix=False)
    if cfg.arms:
        section += ["", "### Arms", ""]
        section += [
            f"- **{line.label}**: `{line.layout.root}` (its own summary.md, `llamaduo status {line.layout.root}`)"
            for line in lines
        ]
    return section


def compare(run_dirs: Sequence[str | Path], out_dir: str | Path) -> str:
    """`llamaduo compare`: one Table 1 and one Fig. 2 over volume across finished runs (e.g. two students),
    written into `out_dir` with its report `summary.md`; returns the report."""
    lines = run_lines(run_dirs)
    out = RunLayout(Path(out_dir))
    section = combine(lines, out, shared_prefix=True)
    text = (
        "\n".join(
            [
                f"# Comparison of {len(lines)} runs",
                "",
                *(f"- {ln.label}: `{ln.layout.root}`" for ln in lines),
                "",
                *section,
            ]
        )
        + "\n"
    )
    with atomic_write(out.summary_file) as fh:
        fh.write(text)
    return text
