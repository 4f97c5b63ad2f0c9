"""Data quality for instruction data: exact and near-duplicate removal, ROUGE-L, test-set decontamination.

Used by 01_coverage (token statistics per split), 05_synthesize (each synthetic batch is cleaned against the data kept so far and the test split),
by 04's ROUGE-L judge (`rouge_l_f1_batch`) and by ``llamaduo dedup``. Only `cli` touches files.

* `rows`        the (instruction, response) text of a row in any schema 01_coverage accepts; `RowError`
* `tokens`      rouge-score's tokenizer and the encoder of texts into strings of token codes
* `rouge`       ROUGE-L F1, bit for bit rouge-score's (`rouge_l_f1`, `rouge_l_f1_batch`)
* `minhash`     shingles, one-permutation MinHash and LSH: candidate pairs (with the numbers that chose them)
* `duplicates`  `dedup`: one row kept per cluster of exact and near-duplicates
* `decontam`    `decontaminate`: rows near a test item dropped, by rule
* `lengths`     token statistics per split under a real tokenizer (the appendix's Table 4 layout)
* `cleaning`    `clean` = decontaminate + dedup with shared tokenisation, and its speed
* `cli`         ``llamaduo dedup`` / ``python -m llamaduo_nb.dataquality``
"""

from .cleaning import CleanResult, clean
from .cli import add_dedup_subparser, format_report, run_dedup_cli
from .decontam import RULES, Contamination, DecontamParams, DecontamResult, decontaminate
from .duplicates import DedupResult, DuplicateDrop, dedup
from .lengths import PARTS, TokenStatistics, count_tokens, describe, token_statistics, token_table
from .minhash import MinHashParams
from .rouge import rouge_l_f1, rouge_l_f1_batch
from .rows import FIELDS, RowError, row_text
from .tokens import Encoded, rouge_tokens

__all__ = [
    "FIELDS",
    "RULES",
    "CleanResult",
    "Contamination",
    "DecontamParams",
    "DecontamResult",
    "DedupResult",
    "DuplicateDrop",
    "Encoded",
    "MinHashParams",
    "PARTS",
    "TokenStatistics",
    "RowError",
    "add_dedup_subparser",
    "clean",
    "count_tokens",
    "decontaminate",
    "dedup",
    "describe",
    "format_report",
    "rouge_l_f1",
    "rouge_l_f1_batch",
    "rouge_tokens",
    "row_text",
    "run_dedup_cli",
    "token_statistics",
    "token_table",
]
