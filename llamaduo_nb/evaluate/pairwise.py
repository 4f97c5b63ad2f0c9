"""Pairwise comparison beside the grading: is the student's answer better than the reference?

With `evaluate.pairwise: true`, every LLM judge of `evaluate.judges` sees a test prompt and two answers, the
student's (a row of 03's responses.jsonl) and the test split's reference, and names the better one ("A", "B")
or a tie (`prompts/pairwise.md`). LLM judges prefer a position (often the first) no matter what stands there,
so every comparison is asked in BOTH orders, `student_first` (the student is A) and `student_second` (the
student is B), `evaluate.pairwise_m` times each. The two verdicts of one (row, repeat) make one *pair*:

* both orders name the student: a **win**; both name the reference: a **loss**; both say tie: a **tie**;
* the orders disagree (the judge picked the same slot twice, or one slot once and a tie once): the verdict
  followed the position, not the answers; the pair counts as a **tie** and as a **position flip**
  (`position_flips`; `first_slot_both` / `second_slot_both` count the pairs where the judge picked the same
  slot in both orders). This is MT-Bench's conservative rule: a win needs both orders.
* the student's answer IS the reference (equal after stripping whitespace, common for labels): a **tie** with
  no call (`identical`): both orders would be the same prompt, and a judge's slot preference there would
  read as a position flip it could not avoid.

Win rate of the student against the reference = (wins + ½ ties) / pairs, in [0, 1]: 0.5 is "as good as the
reference" (or a judge that only follows position), 1 is "better every time". Its 95% interval is the cluster
bootstrap over prompts that V and C@ζ use (`stats.cluster_bootstrap`: a prompt's K samples and repeats are
resampled together). A pair with an order that failed (request error, unreadable reply, failed answer) is a
*failure*: counted per judge, kept in pairwise.jsonl with its raw reply, left out of the win rate, never
guessed. The win rate is reported, never used by the ε decision.

Every reply is read by one reader (`read_verdict`, on `services.read_one`'s rule), the requests' `reader`: a
JSON object naming the winner ({"winner": "A" | "B" | "tie"}, with the spellings judges use: "Answer A",
"b", "Tie", "equal", ...); quoted examples and the echoed format are never the verdict, two different
verdicts in one reply are a failure.

The planned calls (`planned_pair_calls`: every LLM judge, every answered row that differs from its reference,
both orders, pairwise_m repeats) are built with the requests `judge_pairwise` sends;
`stage.planned_pairwise_calls` gives the forecast the cycle's. Equal requests are paid once (an answer given K
times is compared once per order and repeat), so a run pays at most what is planned.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import EvaluateConfig
from ..jsonio import DataFileError, read_jsonl, save_figure
from ..plan import PlannedCall
from ..prompts import PromptTemplate, load_template
from ..services import ChatRequest, ChatResult, ServicePool, extract_json, read_one
from .judging import RAW_KEEP_CHARS
from .stats import CONFIDENCE, cluster_bootstrap

PAIRWISE_TEMPLATE = "pairwise"
PAIRWISE_PLACEHOLDERS = {"instruction", "answer_a", "answer_b", "reply_format"}
ORDERS = ("student_first", "student_second")  # the student's answer is A, then B
VERDICTS = ("A", "B", "tie")
PAIRWISE_REPLY_TOKENS = 10  # {"winner": "tie"} and its framing
REPLY_FORMAT = '{"winner": "<A, B or tie>"}'
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": list(VERDICTS)}},
    "required": ["winner"],
    "additionalProperties": False,
}
POINTS = {"win": 1.0, "tie": 0.5, "loss": 0.0}
RULE = (
    "each pair asked in both orders; a win or loss needs both orders to agree, any disagreement (a position "
    "flip) counts as a tie, and so does an answer identical to the reference (no call); "
    "win rate = (wins + ties / 2) / pairs"
)
OPPONENT = "reference (the test split's answer)"

_VERDICT_KEYS = ("winner", "verdict", "better", "better_answer", "preferred", "preference", "choice")
_TIE_WORDS = {
    "tie",
    "draw",
    "equal",
    "both",
    "neither",
    "none",
    "same",
    "tied",
    "equally good",
    "equally bad",
}
_PREFIXES = ("answer", "assistant", "response", "option")


# --------------------------------------------------------------------------- the prompt and the requests


def pairwise_template() -> PromptTemplate:
    return load_template(PAIRWISE_TEMPLATE, required=PAIRWISE_PLACEHOLDERS)


def pairwise_messages(row: dict, order: str, template: PromptTemplate) -> list[dict[str, str]]:
    """The chat messages of one comparison: `student_first` puts the row's candidate in slot A and the
    reference in slot B, `student_second` the other way round."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    student, reference = row["candidate"], row["reference"]
    a, b = (student, reference) if order == "student_first" else (reference, student)
    content = template.render(
        instruction=row["instruction"], answer_a=a, answer_b=b, reply_format=REPLY_FORMAT
    )
    return [{"role": "user", "content": content}]


def pairwise_requests(
    rows: Sequence[dict], cfg: EvaluateConfig, template: PromptTemplate
) -> list[ChatRequest]:
    """Per row, per repeat (pairwise_m), both orders: row-major, then repeat, then order. `repeat` keeps the
    repeats apart in the call cache; the two orders differ by their messages."""
    return [
        ChatRequest(
            messages=pairwise_messages(row, order, template),
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            json_schema=VERDICT_SCHEMA,
            schema_name="verdict",
            repeat=repeat,
            reader=read_verdict,
        )
        for row in rows
        for repeat in range(cfg.pairwise_m)
        for order in ORDERS
    ]


# --------------------------------------------------------------------------- reading one verdict


def _has_verdict_key(obj: Any) -> bool:
    return isinstance(obj, dict) and any(str(k).strip().lower() in _VERDICT_KEYS for k in obj)


def _normalize(value: Any) -> str:
    """'A', 'B' or 'tie' from one verdict value; ValueError for anything else (never a guess)."""
    if not isinstance(value, str):
        raise ValueError(f'the winner is {value!r}, expected "A", "B" or "tie"')
    text = value.strip().strip("[]()*`'\". ").lower().replace("_", " ")
    if text in _TIE_WORDS:
        return "tie"
    for prefix in _PREFIXES:
        if text.startswith(prefix + " "):
            text = text[len(prefix) + 1 :].strip()
    if text in ("a", "b"):
        return text.upper()
    raise ValueError(f'the winner is {value!r}, expected "A", "B" or "tie"')


def verdict_of(obj: dict) -> str:
    """The verdict of a JSON object naming the winner; every verdict key it has must say the same."""
    found = {_normalize(v) for k, v in obj.items() if str(k).strip().lower() in _VERDICT_KEYS}
    if len(found) != 1:
        raise ValueError(f"the verdict object names different winners: {obj!r}")
    return found.pop()


def read_verdict(text: str) -> str:
    """'A', 'B' or 'tie' from one judge reply; ValueError says why the reply is not a verdict.

    The verdict is the JSON object with a winner key ("winner", "verdict", "better", "preferred", "choice")
    anywhere in the text (code fences and prose around it are fine), read by `services.read_one`'s rule: the
    echoed format ({"winner": "<A, B or tie>"}) and values the prose introduces as examples are never the
    verdict, and two different verdicts in one reply are a failure. A winner that is neither A, B nor a tie
    word ("A or B", "the first one") is a failure too: the reply is kept, never guessed.
    """

    def explain(reply: str) -> None:
        extract_json(reply, lambda v: isinstance(v, dict))  # "no JSON object found" when there is none
        raise ValueError(
            f"no JSON object with a winner key ({', '.join(_VERDICT_KEYS[:3])}, ...) in the reply"
        )

    verdict, _ = read_one(text or "", _has_verdict_key, verdict_of, what="verdict", none_found=explain)
    return verdict


def student_outcome(order: str, verdict: str) -> str:
    """'win' / 'loss' / 'tie' of the student for a verdict given in `order`."""
    if verdict == "tie":
        return "tie"
    student_slot = "A" if order == "student_first" else "B"
    return "win" if verdict == student_slot else "loss"


# --------------------------------------------------------------------------- records


def _record(row: dict, judge: str, repeat: int, order: str) -> dict:
    return {
        "prompt_id": row["prompt_id"],
        "sample_index": row["sample_index"],
        "category": row.get("category"),
        "judge": judge,
        "repeat": repeat,
        "order": order,
        "verdict": None,
        "student": None,
        "ok": False,
        "error": None,
        "cached": False,
        "cache_key": None,
        "raw": None,
        "identical": False,
    }


def pairwise_record(row: dict, judge: str, repeat: int, order: str, result: ChatResult) -> dict:
    """One line of pairwise.jsonl; a failure keeps its reason and the start of the reply, never a verdict."""
    record = _record(row, judge, repeat, order)
    record.update(cached=bool(result.cached), cache_key=result.cache_key or None)
    if result.error:
        record["error"] = f"request: {result.error}"
        return record
    try:  # the request's reader, applied to the text again: one reading, whatever filled `result.parsed`
        verdict = read_verdict(result.text)
    except ValueError as exc:
        record.update(error=f"parse: {exc}", raw=(result.text or "")[:RAW_KEEP_CHARS])
        return record
    record.update(verdict=verdict, student=student_outcome(order, verdict), ok=True)
    return record


def identical(row: dict) -> bool:
    """Whether the student's answer is the reference itself (whitespace aside): a tie without a call."""
    return row["candidate"].strip() == row["reference"].strip()


def _to_compare(rows: Sequence[dict]) -> list[dict]:
    return [row for row in rows if not row.get("error") and not identical(row)]


def judge_pairwise(pool: ServicePool | None, rows: Sequence[dict], cfg: EvaluateConfig) -> list[dict]:
    """Every answered row compared with its reference by every LLM judge, both orders, pairwise_m times,
    through `pool`; an answer equal to its reference is a tie without a call (`identical`), and a row whose
    answer failed gets failed records ("answer: ...") so it is counted. `pool` may be None when no row needs
    a call."""
    answered = _to_compare(rows)
    records: list[dict] = []
    if answered and pool is None:
        raise ValueError(f"pairwise comparison by {cfg.judges} needs an open ServicePool")
    if answered:
        requests = pairwise_requests(answered, cfg, pairwise_template())
        per_row = cfg.pairwise_m * len(ORDERS)
        desc = f"pairwise {'+'.join(cfg.judges)} ({len(answered)} rows x {cfg.pairwise_m} x 2 orders)"
        grouped = pool.complete_groups({judge: requests for judge in cfg.judges}, desc=desc)
        for judge in cfg.judges:
            for i, result in enumerate(grouped[judge]):
                repeat, order = divmod(i % per_row, len(ORDERS))
                records.append(pairwise_record(answered[i // per_row], judge, repeat, ORDERS[order], result))
    for judge in cfg.judges:
        for row in rows:
            if row.get("error"):
                extra = {"error": f"answer: {row.get('error')}"}
            elif identical(row):
                extra = {"student": "tie", "ok": True, "identical": True}
            else:
                continue
            for repeat in range(cfg.pairwise_m):
                for order in ORDERS:
                    records.append(_record(row, judge, repeat, order) | extra)
    return records


def planned_pair_calls(
    stage: str, cycle: int | None, rows: Sequence[dict], cfg: EvaluateConfig
) -> list[PlannedCall]:
    """The calls `judge_pairwise` makes for `rows`: every LLM judge, every answered row that differs from its
    reference, pairwise_m repeats, both orders (none when `cfg.pairwise` is off)."""
    answered = _to_compare(rows)
    if not cfg.pairwise or not cfg.judges or not answered:
        return []
    requests = pairwise_requests(answered, cfg, pairwise_template())
    reply = min(PAIRWISE_REPLY_TOKENS, cfg.max_tokens)
    return [PlannedCall(stage, cycle, judge, request, reply) for judge in cfg.judges for request in requests]


# --------------------------------------------------------------------------- statistics


def pair_outcomes(records: Sequence[dict]) -> pd.DataFrame:
    """One line per (judge, prompt_id, sample_index, repeat): the two orders' outcomes and the pair's.

    Columns: judge, prompt_id, sample_index, repeat, student_first, student_second (the student's outcome in
    each order, None when it failed), outcome ("win" / "loss" / "tie", None for a failed pair), flip (the
    orders disagree), points (1 / 0.5 / 0, NaN for a failed pair), slot (the slot picked in both orders of a
    flip: "A", "B", or None), identical (the answer is the reference: a tie without a call)."""
    keys = ["judge", "prompt_id", "sample_index", "repeat"]
    pairs: dict[tuple, dict] = {}
    for r in records:
        key = tuple(r[k] for k in keys)
        entry = pairs.setdefault(key, dict(zip(keys, key, strict=True)))
        entry[r["order"]] = r["student"] if r["ok"] else None
        entry[f"{r['order']} verdict"] = r["verdict"] if r["ok"] else None
        entry["identical"] = bool(r.get("identical"))
    lines = []
    for entry in pairs.values():
        first, second = entry.get("student_first"), entry.get("student_second")
        outcome, flip, slot = None, False, None
        if first is not None and second is not None:
            flip = first != second
            outcome = "tie" if flip else first
            a, b = entry.get("student_first verdict"), entry.get("student_second verdict")
            slot = a if flip and a == b and a != "tie" else None
        lines.append(
            {
                **{k: entry[k] for k in keys},
                "student_first": first,
                "student_second": second,
                "outcome": outcome,
                "flip": flip,
                "points": np.nan if outcome is None else POINTS[outcome],
                "slot": slot,
                "identical": entry["identical"],
            }
        )
    columns = [*keys, "student_first", "student_second", "outcome", "flip", "points", "slot", "identical"]
    return pd.DataFrame(lines, columns=columns)


def summarize_pairwise(
    records: Sequence[dict], *, n_boot: int = 1000, seed: int = 0, m: int | None = None
) -> dict:
    """metrics.json's `pairwise` block: per judge the pairs scored, wins, losses, ties (position flips and
    identical answers included), position_flips, identical, first_slot_both / second_slot_both, failures, win_rate in [0, 1] and its 95%
    cluster-bootstrap interval over prompts (`win_rate_ci95`, None without resamples or pairs)."""
    table = pair_outcomes(records)
    per_judge: dict[str, dict] = {}
    for judge, rows in table.groupby("judge", sort=False):
        scored = rows[rows["outcome"].notna()]
        counts = scored["outcome"].value_counts()
        n = int(len(scored))
        win_rate = float(scored["points"].mean()) if n else None
        ci = cluster_bootstrap(
            scored["points"].tolist(), scored["prompt_id"].tolist(), n_boot=n_boot, seed=seed
        )
        per_judge[str(judge)] = {
            "pairs": n,
            "wins": int(counts.get("win", 0)),
            "losses": int(counts.get("loss", 0)),
            "ties": int(counts.get("tie", 0)),
            "position_flips": int(scored["flip"].sum()),
            "identical": int(scored["identical"].sum()),
            "first_slot_both": int((scored["slot"] == "A").sum()),
            "second_slot_both": int((scored["slot"] == "B").sum()),
            "failures": int(len(rows) - n),
            "prompts": int(scored["prompt_id"].nunique()),
            "win_rate": win_rate,
            "win_rate_ci95": list(ci) if ci and n else None,
        }
    return {
        "opponent": OPPONENT,
        "rule": RULE,
        "m": m,
        "bootstrap": {"samples": n_boot, "seed": seed, "confidence": CONFIDENCE, "unit": "prompt"},
        "per_judge": per_judge,
    }


def load_pairwise(path: str | Path) -> list[dict]:
    """Read pairwise.jsonl (04's verdicts); DataFileError names the row and field that is wrong."""
    path = Path(path)
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, start=1):
        for field in ("prompt_id", "sample_index", "judge", "repeat", "order", "ok"):
            if field not in row:
                raise DataFileError(path, lineno, field, "required field is missing")
        if row["order"] not in ORDERS:
            raise DataFileError(path, lineno, "order", f"expected one of {ORDERS}, got {row['order']!r}")
        if row["ok"] and row.get("student") not in POINTS:
            raise DataFileError(
                path, lineno, "student", f"an ok verdict needs win/loss/tie, got {row.get('student')!r}"
            )
    return rows


# --------------------------------------------------------------------------- display


def _rate(entry: dict) -> str:
    if entry.get("win_rate") is None:
        return "n/a"
    ci = entry.get("win_rate_ci95")
    return f"{entry['win_rate']:.2f}" + (f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else "")


def pairwise_table(metrics: dict) -> pd.DataFrame:
    """One line per LLM judge: wins / ties / losses of the student against the reference, the position flips
    and identical answers among the ties, failures, and the win rate with its 95% interval (empty when pairwise is off)."""
    block = metrics.get("pairwise") or {}
    records = [
        {
            "judge": judge,
            "pairs": e["pairs"],
            "wins": e["wins"],
            "ties": e["ties"],
            "losses": e["losses"],
            "position flips (in ties)": e["position_flips"],
            "identical answers (in ties)": e.get("identical", 0),
            "failed pairs": e["failures"],
            "win rate [95% CI]": _rate(e),
        }
        for judge, e in block.get("per_judge", {}).items()
    ]
    columns = ["judge", "pairs", "wins", "ties", "losses", "position flips (in ties)"]
    columns += ["identical answers (in ties)", "failed pairs"]
    return pd.DataFrame(records, columns=[*columns, "win rate [95% CI]"]).set_index("judge")


def pairwise_line(metrics: dict) -> str:
    """One sentence for the run summary: each judge's win rate of the student against the reference; a judge
    whose pairs are mostly position flips is said to read the order, not the answers."""
    block = metrics.get("pairwise") or {}
    parts = []
    for judge, e in block.get("per_judge", {}).items():
        part = f"{judge} {_rate(e)} ({e['wins']} W / {e['ties']} T / {e['losses']} L, {e['position_flips']} position flips"
        judged = e["pairs"] - e.get("identical", 0)
        if judged and e["position_flips"] > judged / 2:
            part += ": mostly flips, this judge reads the order rather than the answers"
        parts.append(part + ")")
    return "win rate against the reference: " + "; ".join(parts) if parts else ""


def plot_pairwise(metrics: dict, path: str | Path | None = None):
    """Left: per judge, the shares of wins, stated ties, position flips, identical answers and losses; right: the win rate with
    its 95% interval against the 0.5 line (as good as the reference). Saved as PNG when `path` is given."""
    import matplotlib.pyplot as plt

    per_judge = (metrics.get("pairwise") or {}).get("per_judge", {})
    judges = list(per_judge) or ["(pairwise off)"]
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(11, 0.7 * len(judges) + 2.2), gridspec_kw={"width_ratios": [3, 2]}
    )
    parts = [
        ("wins", "#2ca02c", lambda e: e["wins"]),
        ("ties", "#bbbbbb", lambda e: e["ties"] - e["position_flips"] - e.get("identical", 0)),
        ("position flips (ties)", "#ff7f0e", lambda e: e["position_flips"]),
        ("identical answers (ties)", "#9edae5", lambda e: e.get("identical", 0)),
        ("losses", "#d62728", lambda e: e["losses"]),
    ]
    y = np.arange(len(judges))
    left = np.zeros(len(judges))
    for label, colour, value in parts:
        shares = np.array(
            [
                value(per_judge[j]) / per_judge[j]["pairs"] if per_judge.get(j, {}).get("pairs") else 0.0
                for j in judges
            ]
        )
        ax1.barh(y, shares, left=left, color=colour, label=label)
        left += shares
    ax1.set(yticks=y, yticklabels=judges, xlim=(0, 1), xlabel="share of pairs (both orders asked)")
    ax1.invert_yaxis()
    handles, labels = ax1.get_legend_handles_labels()
    ax1.set_title("Student vs reference, per judge")
    for i, judge in enumerate(judges):
        e = per_judge.get(judge)
        if not e or e.get("win_rate") is None:
            continue
        ci = e.get("win_rate_ci95") or [e["win_rate"], e["win_rate"]]
        ax2.errorbar(
            e["win_rate"],
            i,
            xerr=[[e["win_rate"] - ci[0]], [ci[1] - e["win_rate"]]],
            fmt="o",
            capsize=4,
            color="#1f77b4",
        )
    ax2.axvline(0.5, color="grey", ls="--", lw=0.8)
    ax2.set(yticks=y, yticklabels=[""] * len(judges), xlim=(0, 1), xlabel="win rate (wins + ties / 2)")
    ax2.set_ylim(ax1.get_ylim())
    ax2.set_title("Win rate, 95% cluster-bootstrap interval")
    fig.legend(handles, labels, loc="lower center", ncols=5, frameon=False)
    fig.tight_layout(rect=(0, 0.55 / fig.get_figheight(), 1, 1))
    if path is not None:
        save_figure(fig, path)
    return fig
