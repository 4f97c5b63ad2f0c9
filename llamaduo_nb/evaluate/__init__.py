"""04_evaluate: judges score every model's answers; Table 1, V and C@zeta with intervals, the epsilon decision.

The notebook imports this one name (`from llamaduo_nb import evaluate`); the work is split by concern:

* `judging`       the one answer-and-judge path (`answer_with_provider`, `judge_rows`), the judge prompt,
                  parsing a judgment (scores + optional rationale); used by 04, the baselines and 06
* `metric_judges` reference-metric judges (ROUGE-L, chrF, exact match): offline, free, M = 1
* `stats`         pure statistics: V, C@zeta, cluster-bootstrap intervals, the eq. 9 decision
* `agreement`     how much the M repeats and the judges agree (Spearman, Kendall, Krippendorff's alpha)
* `tables`        paper Table 1 with P-Match, decision / failure / category tables
* `plots`         paper Fig. 2 (over cycles) and Fig. 3 (precision vs similarity per model), histograms
* `stage`         04's file work: judge the cycle, reference rows once per run, metrics.json, Table 1

See `judging`'s docstring for how 06 calls the shared path.
"""

from __future__ import annotations

from .agreement import agreement_report, judge_pairs, krippendorff_alpha, repeat_spread
from .judging import (
    JUDGE_PLACEHOLDERS,
    JUDGE_TEMPLATE,
    JUDGMENT_SCHEMA,
    JUDGMENT_SCHEMA_RATIONALE,
    METRICS,
    RAW_KEEP_CHARS,
    SCORE_MAX,
    SCORE_MIN,
    answer_failed_record,
    answer_with_provider,
    judge_messages,
    judge_names,
    judge_requests,
    judge_responses,
    judge_rows,
    judge_template,
    judgment_record,
    load_judgments,
    load_responses,
    parse_judgment,
    rationale_of,
    scores_from_object,
)
from .metric_judges import METRIC_JUDGES, label_match, metric_judgments, reference_label
from .plots import (
    cycles_frame,
    plot_category_histograms,
    plot_cycles,
    plot_models_scores,
    plot_scores,
    reference_lines,
)
from .stage import (
    base_student_responses,
    reference_rows,
    reference_status,
    run_judges,
    table1_models,
    write_agreement,
    write_cycle_table1,
    write_metrics,
)
from .stats import (
    bootstrap_ci,
    cluster_bootstrap,
    compute_metrics,
    decide,
    decision_rule_text,
    metric_summary,
    score_table,
    statistic_key,
    summarize,
    zeta_key,
)
from .tables import (
    BASE_MODEL,
    category_table,
    comparison,
    cycle_label,
    decision_table,
    failure_table,
    markdown_table,
    p_match,
    responses_preview,
    results_table,
    table1,
    table1_long,
    write_table1,
)

__all__ = [
    "BASE_MODEL",
    "JUDGE_PLACEHOLDERS",
    "JUDGE_TEMPLATE",
    "JUDGMENT_SCHEMA",
    "JUDGMENT_SCHEMA_RATIONALE",
    "METRICS",
    "METRIC_JUDGES",
    "RAW_KEEP_CHARS",
    "SCORE_MAX",
    "SCORE_MIN",
    "agreement_report",
    "answer_failed_record",
    "answer_with_provider",
    "base_student_responses",
    "bootstrap_ci",
    "category_table",
    "cluster_bootstrap",
    "comparison",
    "compute_metrics",
    "cycle_label",
    "cycles_frame",
    "decide",
    "decision_rule_text",
    "decision_table",
    "failure_table",
    "judge_messages",
    "judge_names",
    "judge_pairs",
    "judge_requests",
    "judge_responses",
    "judge_rows",
    "judge_template",
    "judgment_record",
    "krippendorff_alpha",
    "label_match",
    "load_judgments",
    "load_responses",
    "markdown_table",
    "metric_judgments",
    "metric_summary",
    "p_match",
    "parse_judgment",
    "plot_category_histograms",
    "plot_cycles",
    "plot_models_scores",
    "plot_scores",
    "rationale_of",
    "reference_label",
    "reference_lines",
    "reference_rows",
    "reference_status",
    "repeat_spread",
    "responses_preview",
    "results_table",
    "run_judges",
    "score_table",
    "scores_from_object",
    "statistic_key",
    "summarize",
    "table1",
    "table1_long",
    "table1_models",
    "write_agreement",
    "write_cycle_table1",
    "write_metrics",
    "write_table1",
    "zeta_key",
]
