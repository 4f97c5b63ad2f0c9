"""The run's summary (`summary.md`, `summary.json`): per-cycle statistics with intervals, the decision and
its reason, the latest Table 1 with P-Match, Fig. 2 over cycles, pairwise win rates (with
`evaluate.pairwise`), the token statistics per split (summary.md), and where the time went.

`runner.run()` calls `write_summary` at the end of a run; 06 and the docs show `table1_markdown`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .callcache import is_retried_attempt, read_ledger
from .config import RunConfig
from .coverage import run_token_statistics
from .dataquality import token_table
from .evaluate import METRIC_JUDGES, pairwise_line
from .evaluate.plots import plot_cycles, reference_lines
from .evaluate.stats import decision_rule_text
from .finetune import rank_text
from .jsonio import atomic_write, markdown_table, read_json, write_json
from .runlayout import RunLayout
from .schemas import evaluated_cycles, read_metrics


def _cell(stats: dict) -> str:
    """`mean / C@50 / C@70 [lo-hi of the mean]` of one metric in metrics.json."""
    if stats.get("mean") is None:
        return "n/a"
    cells = [f"{stats['mean']:.2f}"] + [
        f"{v:.0f}%"
        for k, v in stats.items()
        if k.startswith("c@") and not k.endswith("_ci95") and isinstance(v, int | float)
    ]
    text = " / ".join(cells)
    ci = stats.get("mean_ci95")
    return text + (f" [{ci[0]:.1f}-{ci[1]:.1f}]" if ci else "")


def cycle_rows(layout: RunLayout) -> list[dict[str, Any]]:
    """One row per evaluated cycle: training volume, V and C@zeta per judge and metric, the decision
    (summary.json's wide form; summary.md shows it as `judge_rows` and `decision_rows`)."""
    rows = []
    for cycle in layout.cycles():
        metrics = read_metrics(layout, cycle)
        if metrics is None:
            continue
        row: dict[str, Any] = {"cycle": cycle}
        train = layout.train_summary(cycle)
        if train.is_file():
            row["train_rows"] = read_json(train).get("rows")
        if (rank := adapter_rank(layout, cycle)) is not None:
            row["adapter rank (effective)"] = rank
        for judge, entry in metrics.get("per_judge", {}).items():
            for metric in ("precision", "similarity"):
                row[f"{judge} {metric}"] = _cell(entry.get(metric, {}))
            if "n_rows" in entry:
                row[f"{judge} rows scored"] = (
                    f"{entry['n_rows'] - entry.get('rows_unscored', 0)}/{entry['n_rows']}"
                )
        decision = metrics.get("decision", {})
        row["decision value"] = None if decision.get("value") is None else round(decision["value"], 2)
        row["passed"] = decision.get("passed")
        row["reason"] = decision.get("reason", "")
        rows.append(row)
    return rows


def judge_rows(layout: RunLayout) -> list[dict[str, Any]]:
    """The cycles table in long form, narrow enough to read on GitHub: one row per cycle and judge, one score
    column per metric (a reference metric, whose precision equals its similarity, fills one)."""
    rows = []
    for cycle, metrics, train_rows in evaluated_cycles(layout):
        for judge, entry in metrics.get("per_judge", {}).items():
            reference = judge in METRIC_JUDGES
            scored = (
                f"{entry['n_rows'] - entry.get('rows_unscored', 0)}/{entry['n_rows']}"
                if "n_rows" in entry
                else ""
            )
            rows.append(
                {
                    "cycle": cycle,
                    "train rows": train_rows,
                    "judge": judge,
                    "precision": _cell(entry.get("precision", {})),
                    "similarity": "(same)" if reference else _cell(entry.get("similarity", {})),
                    "rows scored": scored,
                }
            )
    return rows


def adapter_rank(layout: RunLayout, cycle: int) -> str | None:
    """The rank of what cycle `cycle`'s saved adapter adds to the base, with the LoRAs it stacks
    ("24 (8 + 16)" under `finetune.start_from: previous_merged`), from its finetune.json; None for a
    record written before ranks were recorded."""
    train = layout.train_summary(cycle)
    chain = read_json(train).get("rank_chain") if train.is_file() else None
    return rank_text(chain) if chain else None


def decision_rows(layout: RunLayout) -> list[dict[str, Any]]:
    rows = []
    for cycle in layout.cycles():
        metrics = read_metrics(layout, cycle)
        if metrics is None:
            continue
        decision = metrics.get("decision", {})
        value = decision.get("value")
        row = {
            "cycle": cycle,
            "value": "n/a" if value is None else f"{value:.2f}",
            "passed": decision.get("passed"),
        }
        if (rank := adapter_rank(layout, cycle)) is not None:
            row["adapter rank"] = rank
        rows.append({**row, "reason": decision.get("reason", "")})
    return rows


def latest_table1_cycle(layout: RunLayout) -> int | None:
    cycles = [c for c in layout.cycles() if layout.table1_md(c).is_file()]
    return cycles[-1] if cycles else None


def table1_markdown(layout: RunLayout, cycle: int | None = None) -> str:
    """Table 1 (models x judges x metric, with intervals and P-Match) of `cycle` (default: the latest)."""
    cycle = latest_table1_cycle(layout) if cycle is None else cycle
    if cycle is None or not layout.table1_md(cycle).is_file():
        return "_No Table 1 yet: run 04_evaluate._\n"
    return layout.table1_md(cycle).read_text(encoding="utf-8")


def _md(rows: list[dict[str, Any]]) -> list[str]:
    headers = list(dict.fromkeys(k for r in rows for k in r))
    return markdown_table(headers, [[r.get(h, "") for h in headers] for r in rows]).split("\n")


def _fmt(value: Any, ci_low: Any = None, ci_high: Any = None) -> str:
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.2f}"
    if ci_low is not None and ci_high is not None and not (math.isnan(ci_low) or math.isnan(ci_high)):
        text += f" [{ci_low:.1f}-{ci_high:.1f}]"
    return text


def gain_lines(cfg: RunConfig, layout: RunLayout) -> list[str]:
    """What fine-tuning and synthesis changed, on the judges the decision rests on: the base student against
    cycle 0 (fine-tuning on the coverage data) and each later cycle against the one before (synthetic data),
    said plainly when the 95% intervals overlap."""
    import pandas as pd

    t1 = latest_table1_cycle(layout)
    if t1 is None:
        return []
    table = pd.read_csv(layout.table1_csv(t1))
    metric = "precision" if cfg.evaluate.decision_metric == "both" else cfg.evaluate.decision_metric
    lines = []
    for judge in cfg.evaluate.deciding_judges:
        rows = table[(table.judge == judge) & (table.metric == metric) & (table.statistic == "mean")]
        local = rows[rows.kind.isin(["base", "local"])].reset_index(drop=True)
        for i in range(1, len(local)):
            before, after = local.iloc[i - 1], local.iloc[i]
            if pd.isna(before.value) or pd.isna(after.value):
                continue
            overlap = not (after.ci_low > before.ci_high or after.ci_high < before.ci_low)
            change = after.value - before.value
            what = (
                "fine-tuning on the coverage data" if before.kind == "base" else "this cycle's synthetic data"
            )
            verdict = (
                "the 95% intervals overlap: no measurable change"
                if overlap
                else ("a measurable gain" if change > 0 else "a measurable loss")
            )
            lines.append(
                f"- {judge} mean {metric}: {before.model} {_fmt(before.value, before.ci_low, before.ci_high)} -> "
                f"{after.model} {_fmt(after.value, after.ci_low, after.ci_high)} ({change:+.2f}, {what}): {verdict}."
            )
    return lines


def story_lines(layout: RunLayout) -> list[str]:
    """Per cycle: what it trained on, how it was judged and decided, and what 05 added and dropped (and why)."""
    lines: list[str] = []
    for cycle in layout.cycles():
        parts = [f"### Cycle {cycle}", ""]
        if layout.train_summary(cycle).is_file():
            ft = read_json(layout.train_summary(cycle))
            origins = ", ".join(f"{k} {v}" for k, v in (ft.get("rows_by_origin") or {}).items())
            parts.append(
                f"- 02 trained on {ft.get('rows')} rows ({origins}); {ft.get('steps')} steps, "
                f"final loss {ft.get('final_loss') or float('nan'):.3f}."
            )
        metrics = read_metrics(layout, cycle)
        if metrics is not None:
            decision = metrics.get("decision", {})
            verdict = "passed" if decision.get("passed") else "not passed"
            parts.append(f"- 04 decision: {verdict} — {decision.get('reason', '')}.")
        if layout.teacher_study_file(cycle).is_file():
            study = read_json(layout.teacher_study_file(cycle))
            parts.append(f"- 05 teacher study chose **{study.get('chosen')}**: {study.get('why')}.")
        if layout.synth_report(cycle).is_file():
            rep = read_json(layout.synth_report(cycle))
            dropped = ", ".join(f"{k} {v}" for k, v in (rep.get("rejected") or {}).items() if v)
            parts.append(
                f"- 05 asked {rep.get('requests')} requests for {rep.get('target')} rows: {rep.get('candidates')} "
                f"candidates, {rep.get('accepted')} accepted; dropped: {dropped or 'none'}; "
                f"request/parse failures {rep.get('request_failures')}/{rep.get('parse_failures')}."
            )
        if len(parts) > 2:
            lines += parts + [""]
    return lines


def pairwise_lines(cfg: RunConfig, layout: RunLayout) -> list[str]:
    """Per cycle with `evaluate.pairwise`: each judge's win rate of the student against the reference; an
    embedded (135M) judge is said to mean little."""
    lines = [f"- cycle {c}: {pairwise_line(m)}." for c, m, _ in evaluated_cycles(layout) if m.get("pairwise")]
    tiny = [j for j in cfg.evaluate.judges if cfg.provider(j).kind == "embedded"]
    if lines and tiny:
        lines.append(f"- {', '.join(tiny)}: the embedded 135M model; its verdicts mean little.")
    return lines


def token_lines(cfg: RunConfig, layout: RunLayout) -> list[str]:
    """The appendix's token statistics of every split on disk (train, test, each cycle's synthetic data)
    under the student's tokenizer; a table that cannot be computed says why instead of costing the summary."""
    try:
        stats = run_token_statistics(cfg, layout)
    except Exception as exc:  # the tokenizer or a file: never the run's summary
        return [f"(token statistics could not be computed: {type(exc).__name__}: {exc})"]
    if stats is None:
        return []
    table = token_table(stats).reset_index()
    return [f"Tokens per row under `{stats['tokenizer']}` ({stats['counted']}; std: {stats['std']}).", "",
            *_md(table.astype(object).where(table.notna(), "").to_dict("records"))]  # fmt: skip


def teacher_lines(layout: RunLayout) -> list[str]:
    for cycle in reversed(layout.cycles()):
        if layout.teacher_table_csv(cycle).is_file():
            import pandas as pd

            table = pd.read_csv(layout.teacher_table_csv(cycle)).round(3)
            # "value (rank)" in one cell: half the columns, narrow enough for GitHub
            for column in [c for c in table.columns if f"rank {c}" in table.columns]:
                ranks = table.pop(f"rank {column}")
                table[column] = [
                    f"{v:g} ({r:.0f})" if pd.notna(r) else f"{v:g}"
                    for v, r in zip(table[column], ranks, strict=True)
                ]
            return [
                f"## Teacher study (cycle {cycle}: CAR = r / (1 + beta L))",
                "",
                "Each cell: value (rank among the candidates).",
                "",
                *_md(table.to_dict("records")),
            ]
    return []


def cost_lines(layout: RunLayout, state: Any) -> list[str]:
    """Service calls, HTTP attempts, tokens and USD per stage from the run's ledger, beside each stage's wall time.

    The ledger has a row per HTTP attempt: a call is its last row; rows of attempts that were retried count
    only as attempts."""
    by_stage: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for row in read_ledger(layout.calls_db):
        entry = by_stage[row["stage"]]
        retried = is_retried_attempt(row)
        entry["attempts"] += 1
        entry["calls"] += 0 if retried else 1
        entry["failed"] += 0 if row["ok"] or retried else 1
        entry["tokens"] += int(row["input_tokens"]) + int(row["output_tokens"])
        entry["usd"] += float(row["cost_usd"])
    seconds: dict[str, float] = defaultdict(float)
    for step, value in state.timings.items():
        if step != "total":
            seconds[step.split("/")[-1]] += value
    stages = sorted(set(seconds) | set(by_stage))
    lines = [
        "## Time and cost per stage",
        "",
        "| stage | seconds | service calls | HTTP attempts | failed calls | tokens | USD |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for stage in stages:
        e = by_stage.get(stage, {})
        lines.append(
            f"| {stage} | {seconds.get(stage, 0):.1f} | {int(e.get('calls', 0))} | {int(e.get('attempts', 0))} | "
            f"{int(e.get('failed', 0))} | {int(e.get('tokens', 0)):,} | {e.get('usd', 0.0):.4f} |"
        )
    lines.append(f"| total | {state.timings.get('total', sum(seconds.values())):.1f} | | | | | |")
    return lines


def write_summary(cfg: RunConfig, layout: RunLayout, state: Any, extra: list[str] | None = None) -> str:
    """summary.md + summary.json: the story of the run's cycles, Table 1, Fig. 2 and the time per notebook.

    `extra`: Markdown lines placed after Fig. 2 over cycles (a sweep's or study's Fig. 2 over volumes and its
    tables, `study.write_study`)."""

    rows = cycle_rows(layout)
    ev = cfg.evaluate
    lines = [
        f"# Run {cfg.run_name}",
        "",
        f"Stopped: {state.stop_reason}.",
        f"Decision rule: {decision_rule_text(ev)}.",
        "",
        "## Cycles",
        "",
        "Each score is mean / C@zeta for zeta in "
        + ", ".join(f"{z:g}" for z in ev.zetas)
        + " [95% cluster-bootstrap interval of the mean]; a reference metric's similarity is its precision.",
        "",
    ]
    if rows:
        lines += _md(judge_rows(layout))
        verdicts = (
            "Epsilon's verdict per cycle (a sweep records it and trains every volume anyway):"
            if cfg.loop.mode == "sweep" or cfg.arms
            else "Decision per cycle:"
        )
        lines += ["", verdicts, "", *_md(decision_rows(layout))]
    t1 = latest_table1_cycle(layout)
    if t1 is not None:
        lines += ["", f"## Table 1 (cycle {t1})", "", table1_markdown(layout, t1).rstrip("\n")]
    fig2 = None
    if rows:
        try:
            import pandas as pd

            refs = reference_lines(pd.read_csv(layout.table1_csv(t1))) if t1 is not None else None
            fig = plot_cycles(layout, ev.epsilon, references=refs)
            import matplotlib.pyplot as plt

            plt.close(fig)
            fig2 = layout.cycles_fig2_plot
        except Exception as exc:  # a plot must never cost the run its summary
            lines += ["", f"(Fig. 2 could not be drawn: {type(exc).__name__}: {exc})"]
    if fig2 is not None:
        lines += ["", "## Over cycles (paper Fig. 2)", "", f"![V and C@zeta over cycles]({fig2.name})"]
    if extra:
        lines += ["", *extra]
    for title, part in (
        ("## What changed, on the judges that decide", gain_lines(cfg, layout)),
        ("## The run, cycle by cycle", story_lines(layout)),
        ("## Pairwise: the student against the reference (both orders)", pairwise_lines(cfg, layout)),
        ("## Token statistics per split (paper appendix, Table 4)", token_lines(cfg, layout)),
    ):
        if part:
            lines += ["", title, "", *part]
    teacher = teacher_lines(layout)
    if teacher:
        lines += ["", *teacher]
    lines += ["", *cost_lines(layout, state)]
    lines += ["", "## Time per notebook (s)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in state.timings.items()]
    text = "\n".join(lines) + "\n"
    with atomic_write(layout.summary_file) as fh:
        fh.write(text)
    write_json(
        layout.summary_json,
        {
            "cycles": rows,
            "table1_cycle": t1,
            "stop_reason": state.stop_reason,
            "timings": state.timings,
        },
    )
    return text
