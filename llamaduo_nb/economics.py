"""The money side of a migration (paper §4.5, Table 2, Fig. 4): what the run spent, and when owning pays off.

Two parts:

* **Spent** — `ledger_costs` reads the run's cost ledger (`calls.sqlite`, see callcache.py) and sums
  calls, tokens and dollars per provider, per stage (evaluation, synthesis, deploy parity, baselines,
  teacher study) and per cycle. Because the offline demo's calls cost $0, each row also shows what the
  same tokens would have cost at the projection's service price.
* **Projected** — `params/economics.yaml` describes a daily workload, the service's token prices and one
  or more local deployments (GPUs bought or rented, electricity, fine-tuning). Month m costs

      service(m) = m * days_per_month * (in_tokens/day * in_price + out_tokens/day * out_price) / 1e6
      local(m)   = fine-tuning + purchase + migration spend + m * (electricity + rent per month)

  `table2` lays these out like the paper's Table 2, `crossovers` gives the month where the service's
  cumulative cost overtakes each local deployment, and `plot_breakeven` draws Fig. 4 with the crossovers.

The shipped defaults are the paper's: GPT-4o at $5 / $15 per 1M tokens (Aug 2024); light workload 10M/1M
tokens per day ($65/day, $1,950/month) on 1 x L4 ($2,539, $30/month power); heavy 50M/5M ($325/day,
$9,750/month) on 8 x L4 ($20,312, $240/month); $800 of fine-tuning. Two inconsistencies in the paper are
resolved by its own numbers: (1) the text calls the heavy workload 50M/10M tokens a day, but $325/day and
Table 2's 1500M/150M a month both mean 5M output tokens a day; (2) Table 2 prints $3,369 for the light local
deployment after 2 months, while its inputs give $2,539 + $800 + 2 x $30 = $3,399 (its 12-month cell,
$3,699, and the whole heavy column count m months of power). Everything else matches the paper to the dollar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .callcache import ledger_frame, retried_attempts
from .config import _check, build, read_yaml  # _check: the validation hook `build` reports
from .jsonio import save_figure, write_json
from .runlayout import project_file

# ---------------------------------------------------------------------------- what the run spent

STAGE_BUCKETS = {
    "04_evaluate": "evaluation",
    "04_pairwise": "evaluation",
    "05_synthesize": "synthesis",
    "06_deploy": "deploy parity",
}
_SUM_COLUMNS = ["calls", "failed", "input_tokens", "output_tokens", "cost_usd"]


def stage_bucket(stage: str) -> str:
    """The paper's cost categories: evaluation, synthesis, baselines, teacher study (others keep their name)."""
    lowered = stage.lower()
    if "baseline" in lowered:
        return "baselines"
    if "teacher" in lowered:
        return "teacher study"
    return STAGE_BUCKETS.get(stage, stage)


def ledger_costs(db_path: str | Path, price: ServicePrice | None = None) -> dict[str, pd.DataFrame]:
    """Calls, failed calls, tokens and USD from the run's ledger, grouped four ways.

    Keys: `by_provider`, `by_stage`, `by_cycle`, `total`. With `price`, a column `at_service_price_usd`
    says what the same tokens would cost at that service's prices.
    """
    ledger = ledger_frame(db_path)
    retried = retried_attempts(ledger)  # a row per HTTP attempt: a retried one is no call of its own
    ledger = ledger.assign(
        calls=(~retried).astype(int),
        failed=(~ledger["ok"].astype(bool) & ~retried).astype(int),
        stage_group=ledger["stage"].map(stage_bucket),
        cycle_label=ledger["cycle"].map(lambda c: "-" if c is None or pd.isna(c) else f"cycle {int(c):02d}"),
    )
    columns = list(_SUM_COLUMNS)
    if price is not None:
        ledger["at_service_price_usd"] = (
            ledger["input_tokens"] * price.input_usd_per_m + ledger["output_tokens"] * price.output_usd_per_m
        ) / 1e6
        columns.append("at_service_price_usd")

    def grouped(keys: list[str]) -> pd.DataFrame:
        if ledger.empty:
            return pd.DataFrame(columns=[*keys, *columns])
        return ledger.groupby(keys, sort=True)[columns].sum().reset_index()

    total = pd.DataFrame([{c: ledger[c].sum() if not ledger.empty else 0 for c in columns}])
    return {
        "by_provider": grouped(["provider", "model"]),
        "by_stage": grouped(["stage_group"]).rename(columns={"stage_group": "stage"}),
        "by_cycle": grouped(["cycle_label", "stage_group"]).rename(
            columns={"cycle_label": "cycle", "stage_group": "stage"}
        ),
        "total": total,
    }


def plot_ledger(costs: dict[str, pd.DataFrame], path: str | Path):
    """Tokens per stage (stacked input/output) and USD per stage, actual and at the service price."""
    import matplotlib.pyplot as plt

    by_stage = costs["by_stage"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if by_stage.empty:
        for ax in (ax1, ax2):
            ax.text(
                0.5,
                0.5,
                "no service-LLM calls in the ledger",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
    else:
        stages = by_stage["stage"].astype(str)
        ax1.bar(stages, by_stage["input_tokens"] / 1e3, label="input")
        ax1.bar(
            stages, by_stage["output_tokens"] / 1e3, bottom=by_stage["input_tokens"] / 1e3, label="output"
        )
        ax1.set(ylabel="thousand tokens", title="Tokens per stage")
        ax1.legend()
        x = np.arange(len(stages))
        ax2.bar(x - 0.2, by_stage["cost_usd"], width=0.4, label="actual")
        if "at_service_price_usd" in by_stage:
            ax2.bar(
                x + 0.2,
                by_stage["at_service_price_usd"],
                width=0.4,
                label="at the projection's service price",
            )
        ax2.set_xticks(x, stages)
        ax2.set(ylabel="USD", title="Cost per stage")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


# ---------------------------------------------------------------------------- the projection's inputs


@dataclass(frozen=True)
class ServicePrice:
    name: str = "GPT-4o (Aug 2024)"
    input_usd_per_m: float = 5.0  # USD per 1M input tokens
    output_usd_per_m: float = 15.0  # USD per 1M output tokens

    EXAMPLE = "name: GPT-4o (Aug 2024)\ninput_usd_per_m: 5.0\noutput_usd_per_m: 15.0"

    def validate(self) -> None:
        _check(self.input_usd_per_m >= 0, "input_usd_per_m", "must be >= 0")
        _check(self.output_usd_per_m >= 0, "output_usd_per_m", "must be >= 0")


@dataclass(frozen=True)
class LocalDeployment:
    name: str
    gpus: int = 1
    purchase_usd: float = 0.0  # buying the server(s); 0 when renting
    rent_usd_per_gpu_hour: float = 0.0  # renting instead (cloud price per GPU hour); 0 when bought
    electricity_usd_per_month: float = 0.0  # power bill of the deployment per month
    power_kwh_per_month: float | None = None  # shown in Table 2 next to the power bill
    finetune_usd: float = 0.0  # one-off fine-tuning (all cycles, hyper-parameter search included)
    label: str | None = None  # how Table 2 names the hardware, e.g. "1 x L4"

    EXAMPLE = "name: 1xL4\ngpus: 1\npurchase_usd: 2539\nelectricity_usd_per_month: 30\nfinetune_usd: 800"

    def validate(self) -> None:
        _check(self.gpus >= 1, "gpus", "must be >= 1")
        for key in ("purchase_usd", "rent_usd_per_gpu_hour", "electricity_usd_per_month", "finetune_usd"):
            _check(getattr(self, key) >= 0, key, "must be >= 0")
        _check(
            self.power_kwh_per_month is None or self.power_kwh_per_month >= 0,
            "power_kwh_per_month",
            "must be >= 0",
        )


@dataclass(frozen=True)
class Workload:
    name: str
    input_tokens_per_day: float
    output_tokens_per_day: float
    local: str  # name of the local deployment that serves this workload

    EXAMPLE = "name: light\ninput_tokens_per_day: 10_000_000\noutput_tokens_per_day: 1_000_000\nlocal: 1xL4"

    def validate(self) -> None:
        _check(self.input_tokens_per_day >= 0, "input_tokens_per_day", "must be >= 0")
        _check(self.output_tokens_per_day >= 0, "output_tokens_per_day", "must be >= 0")


@dataclass(frozen=True)
class EconomicsParams:
    workloads: list[Workload]
    local: list[LocalDeployment]
    service: ServicePrice = field(default_factory=ServicePrice)
    days_per_month: float = 30.0
    horizon_months: int = 24  # length of the cumulative-cost plot
    report_months: list[int] = field(default_factory=lambda: [2, 12])  # rows of Table 2
    include_migration_spend: bool = True  # add the ledger's actual service spend to each local one-off cost

    EXAMPLE = "service: {input_usd_per_m: 5, output_usd_per_m: 15}\nworkloads: [...]\nlocal: [...]"

    def validate(self) -> None:
        _check(len(self.workloads) >= 1, "workloads", "describe at least one workload")
        _check(len(self.local) >= 1, "local", "describe at least one local deployment")
        names = [d.name for d in self.local]
        _check(len(set(names)) == len(names), "local", f"deployment names must be unique, got {names}")
        for i, w in enumerate(self.workloads):
            _check(
                w.local in names, f"workloads[{i}].local", f"'{w.local}' is not a local deployment {names}"
            )
        _check(self.days_per_month > 0, "days_per_month", "must be > 0")
        _check(self.horizon_months >= 1, "horizon_months", "must be >= 1")
        _check(all(m >= 1 for m in self.report_months), "report_months", "months must be >= 1")

    def deployment(self, name: str) -> LocalDeployment:
        return next(d for d in self.local if d.name == name)


def load_economics(path: str | Path) -> EconomicsParams:
    """Read and validate `params/economics.yaml`; errors name the file and the key, with an example."""
    path = project_file(path)
    data = read_yaml(path, "economics file (see params/economics.yaml for the format)")
    return build(EconomicsParams, data, source=str(path))


# ---------------------------------------------------------------------------- the projection


def service_usd_per_day(workload: Workload, service: ServicePrice) -> float:
    return (
        workload.input_tokens_per_day * service.input_usd_per_m
        + workload.output_tokens_per_day * service.output_usd_per_m
    ) / 1e6


def service_usd_per_month(workload: Workload, service: ServicePrice, days_per_month: float) -> float:
    return service_usd_per_day(workload, service) * days_per_month


def local_one_off_usd(local: LocalDeployment, migration_usd: float = 0.0) -> float:
    return local.finetune_usd + local.purchase_usd + migration_usd


def local_usd_per_month(local: LocalDeployment, days_per_month: float) -> float:
    return local.electricity_usd_per_month + local.rent_usd_per_gpu_hour * 24 * days_per_month * local.gpus


def cumulative_costs(params: EconomicsParams, migration_usd: float = 0.0) -> pd.DataFrame:
    """Cumulative USD by month (0..horizon): one service column per workload, one per local deployment."""
    spend = migration_usd if params.include_migration_spend else 0.0
    months = np.arange(0, params.horizon_months + 1)
    frame = pd.DataFrame({"month": months})
    for w in params.workloads:
        frame[f"{params.service.name}: {w.name}"] = months * service_usd_per_month(
            w, params.service, params.days_per_month
        )
    for d in params.local:
        frame[f"local {d.label or d.name}"] = local_one_off_usd(d, spend) + months * local_usd_per_month(
            d, params.days_per_month
        )
    return frame


def crossovers(params: EconomicsParams, migration_usd: float = 0.0) -> pd.DataFrame:
    """For every (local deployment, workload): the month where the service's cumulative cost passes the
    local one (fractional), the first whole month after it, and whether this is the workload's own pairing."""
    spend = migration_usd if params.include_migration_spend else 0.0
    records = []
    for d in params.local:
        for w in params.workloads:
            service = service_usd_per_month(w, params.service, params.days_per_month)
            local = local_usd_per_month(d, params.days_per_month)
            one_off = local_one_off_usd(d, spend)
            month = one_off / (service - local) if service > local else None
            records.append(
                {
                    "local": d.label or d.name,
                    "workload": w.name,
                    "paired": w.local == d.name,
                    "service_usd_per_month": service,
                    "local_usd_per_month": local,
                    "local_one_off_usd": one_off,
                    "crossover_month": month,
                    "first_cheaper_month": None if month is None else int(np.floor(month)) + 1,
                }
            )
    return pd.DataFrame(records)


def _tokens(n: float) -> str:
    return f"{n / 1e6:,.0f}M" if n >= 1e6 else f"{n / 1e3:,.0f}K"


def table2(params: EconomicsParams, migration_usd: float = 0.0) -> pd.DataFrame:
    """The paper's Table 2 layout: per workload, the local deployment next to the service, as text cells."""
    spend = migration_usd if params.include_migration_spend else 0.0
    days = params.days_per_month
    columns, cells = [], {}
    rows = [
        "Fine-tuning",
        "Migration spend (ledger)",
        "Serving specs",
        "Serving electricity / rent",
        *[f"{m} months" for m in params.report_months],
    ]
    for w in params.workloads:
        d = params.deployment(w.local)
        local_col, service_col = (w.name, d.label or d.name), (w.name, params.service.name)
        columns += [local_col, service_col]
        per_month = local_usd_per_month(d, days)
        power = f"{d.power_kwh_per_month:,.0f} kWh " if d.power_kwh_per_month is not None else ""
        running = f"{power}${d.electricity_usd_per_month:,.0f}"
        if d.rent_usd_per_gpu_hour:
            running += f" + rent ${d.rent_usd_per_gpu_hour:g}/GPU-h (${per_month:,.0f}/month)"
        spec = (
            f"{d.label or d.name} ${d.purchase_usd:,.0f}"
            if d.purchase_usd
            else f"{d.label or d.name} (rented)"
        )
        cells[local_col] = [
            f"${d.finetune_usd:,.0f}",
            f"${spend:,.2f}",
            spec,
            running,
            *[f"${local_one_off_usd(d, spend) + m * per_month:,.0f}" for m in params.report_months],
        ]
        monthly = service_usd_per_month(w, params.service, days)
        volume = f"{_tokens(w.input_tokens_per_day * days)}/{_tokens(w.output_tokens_per_day * days)}"
        cells[service_col] = [
            "-",
            "-",
            f"{volume} ${monthly:,.0f}",
            "-",
            *[f"${m * monthly:,.0f}" for m in params.report_months],
        ]
    frame = pd.DataFrame({col: cells[col] for col in columns}, index=rows)
    frame.columns = pd.MultiIndex.from_tuples(columns, names=["workload", ""])
    return frame


def plot_breakeven(params: EconomicsParams, path: str | Path, migration_usd: float = 0.0):
    """Fig. 4: cumulative cost by month, service per workload vs each local deployment; crossovers marked."""
    import matplotlib.pyplot as plt

    costs = cumulative_costs(params, migration_usd)
    cross = crossovers(params, migration_usd)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for column in costs.columns[1:]:
        style = "-" if column.startswith("local ") else "--"
        ax.plot(costs["month"], costs[column], style, label=column)
    letters = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    notes = []
    for row in cross.sort_values(["paired", "crossover_month"], ascending=[False, True]).itertuples():
        if (
            row.crossover_month is None
            or pd.isna(row.crossover_month)
            or row.crossover_month > params.horizon_months
        ):
            continue
        letter = next(letters, "?")
        y = row.crossover_month * row.service_usd_per_month
        ax.plot(row.crossover_month, y, "o", color="black", ms=6)
        ax.annotate(
            letter, (row.crossover_month, y), textcoords="offset points", xytext=(5, 6), fontweight="bold"
        )
        notes.append(
            f"{letter}: {row.workload} workload vs local {row.local} at month {row.crossover_month:.1f}"
        )
    ax.set(
        xlabel="month",
        ylabel="cumulative cost (USD)",
        xlim=(0, params.horizon_months),
        title="Cumulative cost: service API vs local deployment",
    )
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"${v:,.0f}"))
    ax.legend(fontsize=8, loc="upper left")
    if notes:
        ax.text(0.99, 0.02, "\n".join(notes), transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def economics_report(params: EconomicsParams, costs: dict[str, pd.DataFrame], source: str = "") -> dict:
    """The content of deploy/economics.json: the ledger sums, the projection's inputs and its results."""
    import dataclasses
    import json

    def records(frame: pd.DataFrame) -> list[dict]:
        return json.loads(frame.to_json(orient="records"))

    spend = migration_spend(costs)
    return {
        "source": source,
        "ledger": {name: records(frame) for name, frame in costs.items()},
        "migration_spend_usd": spend,
        "params": dataclasses.asdict(params),
        "service_usd_per_day": {w.name: service_usd_per_day(w, params.service) for w in params.workloads},
        "service_usd_per_month": {
            w.name: service_usd_per_month(w, params.service, params.days_per_month) for w in params.workloads
        },
        "table2": {
            " / ".join(col): dict(zip(table2(params, spend).index, values, strict=True))
            for col, values in table2(params, spend).items()
        },
        "crossovers": records(crossovers(params, spend)),
    }


def write_economics(
    layout: Any, params: EconomicsParams, costs: dict[str, pd.DataFrame], source: str = ""
) -> dict:
    """Write deploy/economics.json (`RunLayout.economics_report`) and return its content."""

    report = economics_report(params, costs, source)
    write_json(layout.economics_report, report)
    return report


def migration_spend(costs: dict[str, pd.DataFrame]) -> float:
    """What the run actually paid service LLMs, from `ledger_costs(...)["total"]`."""
    total = costs["total"]
    return float(total["cost_usd"].iloc[0]) if not total.empty else 0.0
