"""05_synthesize: grow the training data with service-LLM pairs, written by the teacher a study chose.

The notebook imports this one name (`from llamaduo_nb import synthesize`, and `synthesize.teacher`); the work
is split by concern:

* `pairs`    the pair synthesis: seeds, requests, parsing, quality rules, dedup and decontamination, the
             stage's files, tables and plots; best-of-N through the teacher's reward
* `teacher`  the teacher study: Compatibility-Adjusted Reward (CAR) and the paper's baselines, the reward
             behind one interface, the student's loss; 05's study step (`run_teacher_study`)
* `splits`   01's splits as 05 reads them, checked

Each part says the calls it will make (`planned_study_calls`, `planned_synthesis_calls`): the forecast prices
them. The check of the teacher study by short fine-tuning (laid out like the paper's Table 4; a proxy) is the workflow
`llamaduo_nb.validation`.
"""

from __future__ import annotations

from . import teacher
from .pairs import (
    FILTERS,
    PAIRS_SCHEMA,
    SYNTH_PLACEHOLDERS,
    SYNTHETIC_SOURCE,
    TEMPLATES,
    SynthesisResult,
    accepted_preview,
    apply_quality_rules,
    best_of_n_responses,
    build_report,
    candidates_from_results,
    counts_table,
    cycle_seed,
    default_generator,
    earlier_data,
    expected_requests,
    generator_info,
    generator_of,
    load_templates,
    looks_truncated,
    parse_pairs,
    plan_table,
    planned_synthesis_calls,
    plot_counts,
    postprocess,
    prompt_preview,
    quality_reason,
    reject,
    rejected_examples,
    request_batch,
    run_synthesis,
    sample_seeds,
    synthesis_messages,
    synthesize_cycle,
    synthetic_id,
    target_rows,
    task_kind,
    write_results,
)
from .splits import load_split
from .teacher import planned_study_calls, run_teacher_study

__all__ = [
    "FILTERS",
    "PAIRS_SCHEMA",
    "SYNTHETIC_SOURCE",
    "SYNTH_PLACEHOLDERS",
    "TEMPLATES",
    "SynthesisResult",
    "accepted_preview",
    "apply_quality_rules",
    "best_of_n_responses",
    "build_report",
    "candidates_from_results",
    "counts_table",
    "cycle_seed",
    "default_generator",
    "earlier_data",
    "expected_requests",
    "generator_info",
    "generator_of",
    "load_split",
    "load_templates",
    "looks_truncated",
    "parse_pairs",
    "plan_table",
    "planned_study_calls",
    "planned_synthesis_calls",
    "plot_counts",
    "postprocess",
    "prompt_preview",
    "quality_reason",
    "reject",
    "rejected_examples",
    "request_batch",
    "run_synthesis",
    "run_teacher_study",
    "sample_seeds",
    "synthesis_messages",
    "synthesize_cycle",
    "synthetic_id",
    "target_rows",
    "task_kind",
    "teacher",
    "write_results",
]
