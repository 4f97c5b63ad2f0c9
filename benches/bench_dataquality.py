"""Benchmark of the data-quality engine against the reference pipeline (`make bench`).

Generates a synthetic instruction/response pool that looks like LlamaDuo's synthetic data (four task
templates, Zipfian vocabulary, boilerplate shared with the test split) with planted truth:

- exact duplicates of pool rows;
- near-duplicates at known word-edit fractions (0 = only case/whitespace/punctuation changed);
- contaminated rows derived from test items: lightly edited prompts, paraphrased prompts (synonym swaps
  plus a clause reorder), test responses copied into a new row, and test passages embedded under a
  different instruction.

It then measures, in one process, the reference pipeline (`reference_pipeline`: an O(N^2) list-membership
filter for exact copies, datasketch MinHash fed token by token with ``update()``, MinHashLSH, rouge-score
to confirm candidates; a row is dropped as soon as a confirmed neighbour exists, so both copies of a pair
go) and this engine (`dataquality.clean`) on the 20K pool. The engine's 20K time is the median of five
runs, two before and three after the alternatives, so a change of machine load hits both sides.
Results: precision/recall against the planted truth, agreement with rouge-score on 500 sampled pairs,
written to ``outputs/bench/dataquality.{json,md}`` and printed. ``--quick``: 2K rows, a 20K scale run, no
1M run.

It also runs the fastest library pipeline we could assemble from maintained packages
(`library_pipeline`: rensa's Rust MinHash + LSH, candidates confirmed with rapidfuzz's Indel similarity
on rouge-score tokens, which *is* ROUGE-L F1, the engine's decontamination rules in library form) on the
20K pool, its LSH bands tuned until its recalls equal the engine's (LIBRARY_DEDUP_LSH), and by default
the engine on 1M rows against 5K test items in a child process (wall time, CPU time, load average and
peak RSS; ``--no-million`` skips it; generating that pool takes longer than cleaning it).
``--dq-large N`` adds a scale run of N rows in this process.

`lines(args)` gives `make bench` its rows (`benches.common`); ``python -m benches.bench_dataquality``
runs this bench alone with the detailed recall table.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FUNCTION_WORDS = (
    "the a an of to and in is for on that with as by this it be are from at or was which can not has "
    "have will its their your you these more than also into each other about how what when where who "
    "should would there been then them some only very just over such"
).split()
UNICODE_WORDS = ["café", "naïve", "Zürich", "São", "résumé", "façade", "Ångström", "İstanbul", "smörgåsbord"]

TEMPLATES = {
    "summarization": [
        "Summarize the following article in {k} sentences.\n\n{passage}",
        "Write a short summary of this text:\n{passage}",
        "Read the passage below and give a concise summary that keeps the key facts.\n\n{passage}",
        "TL;DR the following news story for a busy reader:\n\n{passage}",
    ],
    "classification": [
        "Classify the sentiment of the following review as positive, negative or neutral: {passage}",
        "Is the following customer message a complaint, a question or praise?\n\n{passage}",
        "Label the topic of this text (sports, politics, science, business): {passage}",
    ],
    "closed_qa": [
        "Answer the question using only the context.\n\nContext: {passage}\n\nQuestion: {question}",
        "Based on the passage below, {question}\n\n{passage}",
        "Read the context and answer briefly.\nContext: {passage}\nQ: {question}",
    ],
    "coding": [
        "Write a Python function `{name}` that {task}.",
        "Implement `{name}` in Python: it should {task}. Include a docstring.",
        "Create a small Python helper named {name} which {task}, and explain it in one sentence.",
    ],
}
LABELS = {
    0: ["Positive", "Negative", "Neutral"],
    1: ["Complaint", "Question", "Praise"],
    2: ["Sports", "Politics", "Science", "Business"],
}
CATEGORY_WEIGHTS = {"summarization": 0.3, "classification": 0.25, "closed_qa": 0.25, "coding": 0.2}


class TextFactory:
    """Deterministic pseudo-English: function words plus a Zipfian vocabulary of pronounceable words."""

    def __init__(self, seed: int, vocab_size: int = 40_000):
        self.rng = random.Random(seed)
        self.words = self._make_vocab(vocab_size)
        numbers = [str(n) for n in range(0, 2025, 7)] + [f"{n / 10:.1f}" for n in range(5, 1000, 37)]
        ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
        zipf = 1.0 / (ranks + 2.7) ** 1.05
        shares = (
            [0.42 / len(FUNCTION_WORDS)] * len(FUNCTION_WORDS)
            + [0.005 / len(UNICODE_WORDS)] * len(UNICODE_WORDS)
            + [0.015 / len(numbers)] * len(numbers)
            + list(0.56 * zipf / zipf.sum())
        )
        self.population = FUNCTION_WORDS + UNICODE_WORDS + numbers + self.words
        self.cum_weights = list(np.cumsum(shares))
        self.synonyms = {w: self.words[(i * 7919 + 13) % vocab_size] for i, w in enumerate(self.words[:4000])}

    def _make_vocab(self, size: int) -> list[str]:
        onsets = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z"]
        onsets += ["br", "st", "tr", "pl", "ch", "sh", "gr", "cl", "fr"]
        vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y"]
        codas = ["", "", "n", "r", "s", "l", "t", "m", "nd", "st", "ng", "ck"]
        rnd = random.Random(12345)  # the vocabulary is the same for every seed
        seen: set[str] = set(FUNCTION_WORDS)
        words: list[str] = []
        while len(words) < size:
            word = "".join(
                rnd.choice(onsets) + rnd.choice(vowels) + rnd.choice(codas) for _ in range(rnd.randint(1, 3))
            )
            if len(word) > 2 and word not in seen:
                seen.add(word)
                words.append(word)
        return words

    def sample(self, k: int) -> list[str]:
        return self.rng.choices(self.population, cum_weights=self.cum_weights, k=k)

    def word(self) -> str:
        return self.sample(1)[0]

    def sentence(self, lo: int = 7, hi: int = 20) -> str:
        words = self.sample(self.rng.randint(lo, hi))
        if len(words) > 8 and self.rng.random() < 0.4:
            words[self.rng.randint(2, len(words) - 3)] += ","
        return words[0][:1].upper() + words[0][1:] + " " + " ".join(words[1:]) + "."

    def passage(self, lo: int, hi: int) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(lo, hi)))

    def identifier(self) -> str:
        return "_".join(self.rng.choice(self.words[:3000]) for _ in range(self.rng.randint(1, 3)))

    def pair(self, category: str) -> dict[str, str]:
        rng = self.rng
        template_index = rng.randrange(len(TEMPLATES[category]))
        template = TEMPLATES[category][template_index]
        if category == "summarization":
            passage = self.passage(4, 8)
            instruction = template.format(k=rng.randint(1, 3), passage=passage)
            source = passage.split()
            start = rng.randrange(max(1, len(source) - 12))
            borrowed = " ".join(source[start : start + rng.randint(6, 12)])
            response = self.sentence() + " " + borrowed + " " + self.sentence(5, 12)
        elif category == "classification":
            passage = self.passage(1, 3)
            instruction = template.format(passage=passage)
            label = rng.choice(LABELS[template_index])
            response = label if rng.random() < 0.5 else f"{label}. " + self.sentence(6, 14)
        elif category == "closed_qa":
            passage = self.passage(2, 5)
            question = self.sentence(6, 12)[:-1] + "?"
            instruction = template.format(passage=passage, question=question)
            response = " ".join(self.sentence(5, 14) for _ in range(rng.randint(1, 2)))
        else:
            name = self.identifier()
            instruction = template.format(name=name, task=self.sentence(8, 16)[:-1].lower())
            args = ", ".join(self.identifier() for _ in range(rng.randint(1, 3)))
            body = "\n".join(
                f"    {self.identifier()} = {self.identifier()}({self.identifier()}) + {rng.randint(0, 99)}"
                for _ in range(rng.randint(2, 7))
            )
            response = f'```python\ndef {name}({args}):\n    """{self.sentence(5, 10)}"""\n{body}\n    return {self.identifier()}\n```'
        return {"instruction": instruction, "response": response, "category": category}

    def random_pair(self) -> dict[str, str]:
        category = self.rng.choices(list(CATEGORY_WEIGHTS), weights=list(CATEGORY_WEIGHTS.values()))[0]
        return self.pair(category)

    # -- edits ------------------------------------------------------------------------------------------
    def edit_words(self, text: str, fraction: float) -> str:
        """Apply round(fraction * words) word edits (substitute / delete / insert), at least one."""
        words = text.split(" ")
        for _ in range(max(1, round(fraction * len(words)))):
            op = self.rng.random()
            pos = self.rng.randrange(len(words))
            if op < 0.5 or len(words) < 3:
                words[pos] = self.word()
            elif op < 0.75:
                del words[pos]
            else:
                words.insert(pos, self.word())
        return " ".join(words)

    def format_variant(self, text: str) -> str:
        """Same words, different surface: case, whitespace and punctuation only."""
        out = text.replace(". ", ".  ").replace(",", " ,")
        return out.upper() if self.rng.random() < 0.3 else out.lower()

    def paraphrase(self, text: str) -> str:
        """Synonym swaps on ~25% of content words and one sentence moved: harder than a light edit."""
        words = text.split(" ")
        for i, word in enumerate(words):
            key = word.strip(".,?!:").lower()
            if key in self.synonyms and self.rng.random() < 0.25:
                words[i] = word.lower().replace(key, self.synonyms[key])
        sentences = " ".join(words).split(". ")
        if len(sentences) > 2:
            moved = sentences.pop(self.rng.randrange(len(sentences) - 1))
            sentences.insert(self.rng.randrange(len(sentences)), moved)
        return ". ".join(sentences)


EDIT_FRACTIONS = (0.0, 0.02, 0.05, 0.10, 0.15, 0.20)
CONTAMINATION_KINDS = ("edited_prompt", "paraphrased_prompt", "copied_response", "embedded_passage")


@dataclass
class Synthetic:
    """A generated pool, its test split, and the planted truth for every pool row."""

    pool: list[dict[str, Any]]
    test: list[dict[str, Any]]
    kind: list[str]  # unique | exact_duplicate | near_duplicate | contaminated
    detail: list[str] = field(default_factory=list)  # edit fraction or contamination kind
    source: list[int] = field(default_factory=list)  # pool index (duplicates) or test index (contamination)


def generate(
    n_pool: int,
    n_test: int = 1000,
    *,
    seed: int = 0,
    exact_fraction: float = 0.04,
    near_fraction: float = 0.10,
    contaminated_fraction: float = 0.02,
) -> Synthetic:
    """Generate `n_pool` pool rows (with planted duplicates and contamination) and `n_test` test rows."""
    test_factory = TextFactory(seed * 1000 + 1)
    test = [{"id": f"test-{i}", **test_factory.random_pair()} for i in range(n_test)]

    factory = TextFactory(seed * 1000 + 2)
    rng = factory.rng
    n_exact = int(n_pool * exact_fraction)
    n_near = int(n_pool * near_fraction)
    n_contam = int(n_pool * contaminated_fraction) if n_test else 0
    n_unique = n_pool - n_exact - n_near - n_contam

    pool: list[dict[str, Any]] = [factory.random_pair() for _ in range(n_unique)]
    kind, detail, source = ["unique"] * n_unique, [""] * n_unique, [-1] * n_unique

    def plant(row: dict[str, Any], what: str, how: str, origin: int) -> None:
        pool.append(row)
        kind.append(what)
        detail.append(how)
        source.append(origin)

    for _ in range(n_exact):
        src = rng.randrange(n_unique)
        plant(dict(pool[src]), "exact_duplicate", "", src)
    for i in range(n_near):
        src = rng.randrange(n_unique)
        fraction = EDIT_FRACTIONS[i % len(EDIT_FRACTIONS)]
        base = pool[src]
        if fraction == 0.0:
            row = {k: factory.format_variant(v) if k != "category" else v for k, v in base.items()}
        else:
            row = {
                "instruction": factory.edit_words(base["instruction"], fraction),
                "response": factory.edit_words(base["response"], fraction)
                if len(base["response"].split()) > 3
                else base["response"],
                "category": base["category"],
            }
        plant(row, "near_duplicate", f"{fraction:.2f}", src)
    long_response = [t for t, item in enumerate(test) if len(item["response"].split()) >= 12]
    for i in range(n_contam):
        how = CONTAMINATION_KINDS[i % len(CONTAMINATION_KINDS)]
        # a copied one-word label ("Positive") is not a leak, so only substantial responses are copied
        src = (
            rng.choice(long_response) if how == "copied_response" and long_response else rng.randrange(n_test)
        )
        item = test[src]
        if how == "edited_prompt":
            row = {
                "instruction": factory.edit_words(item["instruction"], rng.choice((0.02, 0.05, 0.10))),
                "response": factory.pair(item["category"])["response"],
            }
        elif how == "paraphrased_prompt":
            row = {"instruction": factory.paraphrase(item["instruction"]), "response": item["response"]}
            if len(item["response"].split()) <= 3:
                row["response"] = factory.pair(item["category"])["response"]
        elif how == "copied_response":
            row = {
                "instruction": factory.pair(item["category"])["instruction"],
                "response": "Sure! " + item["response"] + " " + factory.sentence(5, 10),
            }
        else:
            longest = max(item["instruction"].split("\n"), key=len)
            row = {
                "instruction": "Translate the following text into plain English for a child:\n\n" + longest,
                "response": factory.passage(1, 2),
            }
        row["category"] = item["category"]
        plant(row, "contaminated", how, src)

    order = list(range(n_pool))
    rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    pool = [{"id": f"pool-{new}", **pool[old]} for new, old in enumerate(order)]
    source = [position[source[old]] if kind[old] in _POOL_SOURCED else source[old] for old in order]
    kind = [kind[old] for old in order]
    detail = [detail[old] for old in order]
    return Synthetic(pool=pool, test=test, kind=kind, detail=detail, source=source)


_POOL_SOURCED = {"exact_duplicate", "near_duplicate"}


# --------------------------------------------------------------------------------------------------
# The reference pipeline (the original approach, reproduced faithfully; it is the baseline)
# --------------------------------------------------------------------------------------------------


@dataclass
class ReferenceResult:
    duplicate: set[int]
    contaminated: set[int]
    seconds: dict[str, float]


def reference_pipeline(
    pool: list[dict[str, Any]], test: list[dict[str, Any]], threshold: float = 0.7, num_perm: int = 128
) -> ReferenceResult:
    """Per-token datasketch MinHash + MinHashLSH + rouge-score, after an O(N^2) list-membership filter.

    As in the original it drops a row whenever LSH finds a confirmed neighbour, so BOTH copies of a
    near-duplicate pair are dropped.
    """
    from datasketch import MinHash, MinHashLSH
    from rouge_score import rouge_scorer

    from llamaduo_nb.dataquality import row_text

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    seconds: dict[str, float] = {}

    def minhash(text: str) -> MinHash:
        m = MinHash(num_perm=num_perm)
        for token in text.split():
            m.update(token.encode("utf8"))
        return m

    started = time.perf_counter()
    pairs = [row_text(row) for row in pool]
    texts = [f"{instruction}\n{response}" for instruction, response in pairs]
    seen: list[str] = []
    kept: list[int] = []
    duplicate: set[int] = set()
    for i, text in enumerate(texts):
        if text in seen:  # list membership: O(N) per row
            duplicate.add(i)
            continue
        seen.append(text)
        kept.append(i)
    seconds["exact_membership"] = time.perf_counter() - started

    started = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    signatures = {}
    for i in kept:
        signatures[i] = minhash(texts[i])
        lsh.insert(i, signatures[i])
    for i in kept:
        for j in lsh.query(signatures[i]):
            if j != i and scorer.score(texts[j], texts[i])["rougeL"].fmeasure >= threshold:
                duplicate.add(i)
                break
    seconds["near_duplicates"] = time.perf_counter() - started

    started = time.perf_counter()
    test_lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    test_texts = {}
    for t, row in enumerate(test):
        for f, text in enumerate(row_text(row)):
            if text.split():
                test_texts[(t, f)] = text
                test_lsh.insert((t, f), minhash(text))
    contaminated: set[int] = set()
    for i in kept:
        if i in duplicate:
            continue
        for text in pairs[i]:
            if not text.split():
                continue
            if any(
                scorer.score(test_texts[key], text)["rougeL"].fmeasure >= threshold
                for key in test_lsh.query(minhash(text))
            ):
                contaminated.add(i)
                break
    seconds["decontamination"] = time.perf_counter() - started
    seconds["total"] = sum(seconds.values())
    return ReferenceResult(duplicate=duplicate, contaminated=contaminated, seconds=seconds)


# --------------------------------------------------------------------------------------------------
# The fastest maintained library pipeline (the fair alternative, not the slow reference)
# --------------------------------------------------------------------------------------------------


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenizer without stemming: lower case, runs of [a-z0-9] (`rouge_score.tokenize`)."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


_NON_ALNUM = __import__("re").compile(r"[^a-z0-9]+")
MIN_TOKENS = 8  # the engine's min_tokens: labels such as "Positive" never match by ROUGE-L
# rensa (permutations, bands), the cheapest found with the engine's recall on the 20K pool (near-dup
# recall 0.9985, contamination 0.995; load ~4, 2 cores): dedup 100 x 20 bands (5 rows): near 1.0 in
# 2.3 s; 128 x 16: 0.977; 128 x 32: 1.0 in 15.7 s. Decontamination on word bigrams: 100 x 20: 0.985,
# 128 x 32: 0.9875, so 128 x 64 (2 rows).
LIBRARY_DEDUP_LSH = (100, 20)
LIBRARY_DECONTAM_LSH = (128, 64)


def library_pipeline(
    pool: list[dict[str, Any]],
    test: list[dict[str, Any]],
    threshold: float = 0.7,
    lsh_threshold: float = 0.5,
    backend: str = "rensa",
    dedup_lsh: tuple[int, int] = LIBRARY_DEDUP_LSH,
    decontam_lsh: tuple[int, int] = LIBRARY_DECONTAM_LSH,
) -> ReferenceResult:
    """Exact duplicates by hashing; near-duplicates and contamination by MinHash + LSH (rensa's Rust
    `RMinHash` / `RMinHashLSH`, or datasketch's numpy `MinHash.bulk` + `MinHashLSH`), candidates confirmed
    by ROUGE-L F1 >= `threshold` computed by rapidfuzz (`Indel.normalized_similarity` on token lists is
    2·LCS/(m+n) = ROUGE-L F1). `dedup_lsh` and `decontam_lsh` are (permutations, bands) for rensa; they
    were tuned so that its recall equals the engine's (see LIBRARY_DEDUP_LSH); datasketch derives its
    bands from `lsh_threshold`.

    Like the engine it decontaminates first, then keeps the first row of a duplicate cluster: a row is
    queried against the rows kept so far and inserted only when nothing confirms.
    """
    from rapidfuzz.distance import Indel

    from llamaduo_nb.dataquality import row_text

    def make(num_perm: int, num_bands: int) -> tuple[Any, Any]:
        if backend == "rensa":
            from rensa import RMinHash, RMinHashLSH

            def bulk(token_lists: list[list[str]]) -> list[Any]:
                out = []
                for toks in token_lists:
                    m = RMinHash(num_perm=num_perm, seed=42)
                    m.update(list(set(toks)) or [""])
                    out.append(m)
                return out

            return bulk, lambda: RMinHashLSH(threshold=lsh_threshold, num_perm=num_perm, num_bands=num_bands)
        from datasketch import MinHash, MinHashLSH

        def bulk_ds(token_lists: list[list[str]]) -> list[Any]:
            return MinHash.bulk(
                [[t.encode() for t in set(toks)] or [b""] for toks in token_lists], num_perm=num_perm
            )

        return bulk_ds, lambda: MinHashLSH(threshold=lsh_threshold, num_perm=num_perm)

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    pairs = [row_text(row) for row in pool]
    tokens = [rouge_tokens(f"{instruction}\n{response}") for instruction, response in pairs]
    seconds["tokenize"] = time.perf_counter() - started

    started = time.perf_counter()

    # Decontamination first, as the engine does (a contaminated row is reported as such, not as a
    # duplicate), with the engine's rules in library form: ROUGE-L >= threshold between texts of >= 8
    # tokens (LSH candidates, rapidfuzz confirms), or a shared 13-token span that is not template
    # boilerplate (a 13-gram found in >= 3 test texts), looked up in a Python set. As in the engine, the
    # LSH sets are word bigrams without the test split's templates (bigrams found in >= 3 test items):
    # with them, every row sharing a prompt template with a short test item is a candidate, and ROUGE-L
    # of two templated one-sentence prompts reaches 0.7 (3x as many rows dropped, precision 0.33).
    def bigrams(toks: list[str]) -> set[str]:
        return {f"{a} {b}" for a, b in zip(toks, toks[1:], strict=False)} if len(toks) > 1 else set(toks)

    # Likewise a 13-token span is evidence only when no token of it is template text (covered by an
    # 8-gram found in >= 3 test items): a template's tail plus a common first word is no leak.
    bulk, new_lsh = make(*decontam_lsh)
    test_lsh = new_lsh()
    test_tokens: dict[int, list[str]] = {}
    all_tokens = [[rouge_tokens(text) for text in row_text(row)] for row in test]
    bigram_df: dict[str, int] = {}
    gram8_df: dict[tuple[str, ...], int] = {}
    for t, texts in enumerate(all_tokens):
        item_bigrams: set[str] = set()
        item_grams: set[tuple[str, ...]] = set()
        for f, toks in enumerate(texts):
            if len(toks) >= MIN_TOKENS:
                test_tokens[2 * t + f] = toks
                item_bigrams |= bigrams(toks)
            item_grams |= {tuple(toks[k : k + 8]) for k in range(len(toks) - 7)}
        for gram in item_bigrams:
            bigram_df[gram] = bigram_df.get(gram, 0) + 1
        for gram8 in item_grams:
            gram8_df[gram8] = gram8_df.get(gram8, 0) + 1
    template = {gram for gram, count in bigram_df.items() if count >= 3}
    test_grams: set[tuple[str, ...]] = set()
    for texts in all_tokens:
        for toks in texts:
            covered = [False] * len(toks)
            for k in range(len(toks) - 7):
                if gram8_df[tuple(toks[k : k + 8])] >= 3:
                    covered[k : k + 8] = [True] * 8
            test_grams |= {
                tuple(toks[k : k + 13]) for k in range(len(toks) - 12) if not any(covered[k : k + 13])
            }

    def shingles(toks: list[str]) -> list[str]:
        return list(bigrams(toks) - template)

    keys = [k for k in test_tokens if shingles(test_tokens[k])]
    for key, signature in zip(keys, bulk([shingles(test_tokens[k]) for k in keys]), strict=True):
        test_lsh.insert(key, signature)
    fields = [(i, toks) for i in range(len(pool)) for toks in map(rouge_tokens, pairs[i])]
    long_fields = [(i, toks) for i, toks in fields if len(toks) >= MIN_TOKENS and shingles(toks)]
    field_signatures = bulk([shingles(toks) for _, toks in long_fields])
    contaminated: set[int] = set()
    for (i, toks), signature in zip(long_fields, field_signatures, strict=True):
        if i not in contaminated and any(
            Indel.normalized_similarity(test_tokens[key], toks, score_cutoff=threshold) >= threshold
            for key in test_lsh.query(signature)
        ):
            contaminated.add(i)
    for i, toks in fields:
        if i not in contaminated and any(
            tuple(toks[k : k + 13]) in test_grams for k in range(len(toks) - 12)
        ):
            contaminated.add(i)
    seconds["decontamination"] = time.perf_counter() - started

    started = time.perf_counter()
    seen: dict[str, int] = {}
    duplicate: set[int] = set()
    for i, toks in enumerate(tokens):
        if i in contaminated:
            continue
        key = " ".join(toks)
        if key in seen:
            duplicate.add(i)
        else:
            seen[key] = i
    seconds["exact_hash"] = time.perf_counter() - started

    started = time.perf_counter()
    candidates = [i for i in range(len(pool)) if i not in duplicate and i not in contaminated]
    bulk, new_lsh = make(*dedup_lsh)
    signatures = bulk([tokens[i] for i in candidates])
    lsh = new_lsh()
    for i, signature in zip(candidates, signatures, strict=True):
        if any(
            Indel.normalized_similarity(tokens[i], tokens[j], score_cutoff=threshold) >= threshold
            for j in lsh.query(signature)
        ):
            duplicate.add(i)
        else:
            lsh.insert(i, signature)
    seconds["near_duplicates"] = time.perf_counter() - started
    seconds["total"] = sum(seconds.values())
    return ReferenceResult(duplicate=duplicate, contaminated=contaminated, seconds=seconds)


# --------------------------------------------------------------------------------------------------
# Scoring against the planted truth
# --------------------------------------------------------------------------------------------------


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def score_duplicates(
    syn: Synthetic,
    dropped: set[int],
    representative: dict[int, int] | None,
    score: dict[int, float] | None = None,
) -> dict[str, Any]:
    """Precision/recall of duplicate removal against the planted clusters (source + its copies).

    A planted pair counts as detected when both rows end in the same cluster (engine: same kept
    representative; reference: either row dropped). ``one_kept`` is the share of planted clusters that
    keep exactly one row (the intent), ``all_lost`` the share that keep none.
    """
    clusters: dict[int, list[int]] = {}
    for i, (kind, src) in enumerate(zip(syn.kind, syn.source, strict=True)):
        if kind in _POOL_SOURCED:
            clusters.setdefault(src, [src]).append(i)
    members = {i for rows in clusters.values() for i in rows}

    def rep(i: int) -> int:
        return representative.get(i, i) if representative is not None else i

    by_fraction: dict[str, list[int]] = {}
    exact_hits = exact_total = 0
    for i, (kind, detail, src) in enumerate(zip(syn.kind, syn.detail, syn.source, strict=True)):
        if kind not in _POOL_SOURCED:
            continue
        if representative is not None:
            hit = rep(i) == rep(src) and (i in dropped or src in dropped)
        else:
            hit = i in dropped or src in dropped
        if kind == "exact_duplicate":
            exact_hits += hit
            exact_total += 1
        else:
            by_fraction.setdefault(detail, []).append(int(hit))
    near_hits = sum(sum(v) for v in by_fraction.values())
    near_total = sum(len(v) for v in by_fraction.values())
    kept_per_cluster = [sum(1 for i in rows if i not in dropped) for rows in clusters.values()]
    unplanted = dropped - members
    return {
        "unplanted_drops": len(unplanted),
        # rows dropped although nothing was planted: same-template rows whose ROUGE-L F1 reaches the
        # threshold are near-duplicates by the rule (directly, or through a chain of such rows)
        "unplanted_at_threshold": None if score is None else sum(1 for i in unplanted if score[i] >= 0.7),
        "precision": _ratio(len(dropped & members), len(dropped)),
        "recall_exact": _ratio(exact_hits, exact_total),
        "recall_near": _ratio(near_hits, near_total),
        "recall_near_by_edit_fraction": {k: _ratio(sum(v), len(v)) for k, v in sorted(by_fraction.items())},
        "one_kept": _ratio(sum(1 for k in kept_per_cluster if k == 1), len(clusters)),
        "all_lost": _ratio(sum(1 for k in kept_per_cluster if k == 0), len(clusters)),
        "dropped": len(dropped),
    }


def score_contamination(syn: Synthetic, dropped: set[int]) -> dict[str, Any]:
    truth = {i for i, kind in enumerate(syn.kind) if kind == "contaminated"}
    by_kind = {
        how: _ratio(
            sum(1 for i in truth if syn.detail[i] == how and i in dropped),
            sum(1 for i in truth if syn.detail[i] == how),
        )
        for how in CONTAMINATION_KINDS
    }
    return {
        "precision": _ratio(len(dropped & truth), len(dropped)),
        "recall": _ratio(len(dropped & truth), len(truth)),
        "recall_by_kind": by_kind,
        "dropped": len(dropped),
    }


def rouge_agreement(syn: Synthetic, n_pairs: int = 500, seed: int = 0) -> dict[str, Any]:
    """Compare rouge_l_f1 with rouge-score on sampled pairs: half near-duplicate pairs, half random."""
    from rouge_score import rouge_scorer

    from llamaduo_nb.dataquality import rouge_l_f1_batch, row_text

    rng = random.Random(seed)
    near = [(i, s) for i, (k, s) in enumerate(zip(syn.kind, syn.source, strict=True)) if k in _POOL_SOURCED]
    chosen = rng.sample(near, min(len(near), n_pairs // 2))
    chosen += [
        (rng.randrange(len(syn.pool)), rng.randrange(len(syn.pool))) for _ in range(n_pairs - len(chosen))
    ]
    targets, predictions = [], []
    for a, b in chosen:
        field = rng.randrange(3)
        ta, tb = row_text(syn.pool[a]), row_text(syn.pool[b])
        targets.append("\n".join(ta) if field == 2 else ta[field])
        predictions.append("\n".join(tb) if field == 2 else tb[field])
    result = {}
    for stem in (False, True):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
        expected = [scorer.score(t, p)["rougeL"].fmeasure for t, p in zip(targets, predictions, strict=True)]
        got = rouge_l_f1_batch(targets, predictions, use_stemmer=stem).tolist()
        result["stemmed" if stem else "plain"] = {
            "pairs": len(expected),
            "identical": sum(1 for e, g in zip(expected, got, strict=True) if e == g),
            "max_abs_diff": max(abs(e - g) for e, g in zip(expected, got, strict=True)),
        }
    return result


# --------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------


def _timed(fn: Any) -> tuple[Any, float, float]:
    """Result, wall seconds, CPU seconds of this process (all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


class EngineRuns:
    """Timed runs of the engine on one data set; runs can be spread around other measurements."""

    def __init__(self, syn: Synthetic):
        self.syn = syn
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.result: Any = None

    def run(self, times: int = 1) -> None:
        from llamaduo_nb.dataquality import clean

        for _ in range(times):
            self.result, wall, cpu = _timed(lambda: clean(self.syn.pool, None, self.syn.test))
            self.walls.append(wall)
            self.cpus.append(cpu)

    def summary(self) -> dict[str, Any]:
        syn, result = self.syn, self.result
        wall = _median(self.walls)
        duplicate = {d.index for d in result.dedup.dropped}
        representative = {d.index: d.duplicate_of for d in result.dedup.dropped}
        score = {d.index: d.score for d in result.dedup.dropped}
        contaminated = {c.index for c in result.decontamination.dropped}
        return {
            "rows": len(syn.pool),
            "test_rows": len(syn.test),
            "runs": len(self.walls),
            "seconds": round(wall, 3),
            "seconds_each": [round(w, 3) for w in self.walls],
            "cpu_seconds": round(_median(self.cpus), 3),
            "rows_per_second": round(len(syn.pool) / wall),
            "kept": len(result.kept),
            "duplicates": score_duplicates(syn, duplicate, representative, score),
            "contamination": score_contamination(syn, contaminated),
            "report": {k: v for k, v in result.report().items() if k != "examples"},
            "stats": {"dedup": result.dedup.stats, "decontaminate": result.decontamination.stats},
        }


def run_reference(syn: Synthetic) -> dict[str, Any]:
    result, wall, cpu = _timed(lambda: reference_pipeline(syn.pool, syn.test))
    return {
        "rows": len(syn.pool),
        "test_rows": len(syn.test),
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "rows_per_second": round(len(syn.pool) / wall),
        "kept": len(syn.pool) - len(result.duplicate) - len(result.contaminated),
        "seconds_by_stage": {k: round(v, 3) for k, v in result.seconds.items()},
        "duplicates": score_duplicates(syn, result.duplicate, None),
        "contamination": score_contamination(syn, result.contaminated),
    }


def markdown_table(results: dict[str, Any]) -> str:
    names = ("reference_small", "library_small", "engine_small", "engine_large", "engine_million")
    columns = [name for name in names if name in results]
    titles = {
        "reference_small": f"reference, {results['sizes']['small']:,} rows",
        "library_small": f"library pipeline, {results['sizes']['small']:,} rows",
        "engine_small": f"engine, {results['sizes']['small']:,} rows",
        "engine_large": f"engine, {results['sizes']['large']:,} rows",
        "engine_million": "engine, 1,000,000 rows x 5,000 test",
    }

    def cell(value: Any) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.3f}" if value < 100 else f"{value:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    rows = [
        ("wall seconds", lambda r: r["seconds"]),
        ("CPU seconds", lambda r: r["cpu_seconds"]),
        ("rows / second", lambda r: r["rows_per_second"]),
        ("kept rows", lambda r: r["kept"]),
        ("duplicate precision", lambda r: r["duplicates"]["precision"]),
        ("exact-duplicate recall", lambda r: r["duplicates"]["recall_exact"]),
        ("near-duplicate recall", lambda r: r["duplicates"]["recall_near"]),
    ]
    for fraction in EDIT_FRACTIONS:
        key = f"{fraction:.2f}"
        rows.append(
            (
                f"  near-dup recall, {key} words edited",
                lambda r, k=key: r["duplicates"]["recall_near_by_edit_fraction"].get(k),
            )
        )
    rows += [
        ("clusters keeping exactly one row", lambda r: r["duplicates"]["one_kept"]),
        ("clusters losing every row", lambda r: r["duplicates"]["all_lost"]),
        ("contamination precision", lambda r: r["contamination"]["precision"]),
        ("contamination recall", lambda r: r["contamination"]["recall"]),
    ]
    for how in CONTAMINATION_KINDS:
        rows.append(
            (f"  recall, {how.replace('_', ' ')}", lambda r, h=how: r["contamination"]["recall_by_kind"][h])
        )
    lines = ["| | " + " | ".join(titles[c] for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for label, get in rows:
        lines.append(f"| {label} | " + " | ".join(cell(get(results[c])) for c in columns) + " |")
    speedup, speedup_cpu = results.get("speedup_small"), results.get("speedup_small_cpu")
    agreement = results["rouge_agreement"]
    lines += [
        "",
        f"Speed-up on {results['sizes']['small']:,} rows: "
        + (f"**{speedup:.1f}x** wall clock, {speedup_cpu:.1f}x CPU time" if speedup else "n/a")
        + f" (engine: median of {results['engine_small']['runs']} runs around the reference run).",
        (
            "Reference stages: "
            + ", ".join(
                f"{stage.replace('_', ' ')} {seconds:.1f} s"
                for stage, seconds in results["reference_small"]["seconds_by_stage"].items()
                if stage != "total"
            )
            + "."
        )
        if speedup
        else "",
        f"Duplicate drops without a planted duplicate: {results['engine_small']['duplicates']['unplanted_drops']} "
        f"({results['engine_small']['duplicates']['unplanted_at_threshold']} with ROUGE-L >= 0.7 to the kept row; "
        "the rest joined through a chain): short rows under one prompt template, near-duplicates by the rule.",
        f"ROUGE-L agreement with rouge-score: {agreement['plain']['identical']}/{agreement['plain']['pairs']} "
        f"identical (max |diff| {agreement['plain']['max_abs_diff']}), stemmed "
        f"{agreement['stemmed']['identical']}/{agreement['stemmed']['pairs']}.",
        f"Test split: {results['sizes']['test']:,} items. Machine: {results['machine']}.",
    ]
    return "\n".join(lines)


def run_library(syn: Synthetic) -> dict[str, Any]:
    result, wall, cpu = _timed(lambda: library_pipeline(syn.pool, syn.test))
    return {
        "rows": len(syn.pool),
        "test_rows": len(syn.test),
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "rows_per_second": round(len(syn.pool) / wall),
        "kept": len(syn.pool) - len(result.duplicate) - len(result.contaminated),
        "seconds_by_stage": {k: round(v, 3) for k, v in result.seconds.items()},
        "duplicates": score_duplicates(syn, result.duplicate, None),
        "contamination": score_contamination(syn, result.contaminated),
    }


def _million_child(rows: int, test: int, seed: int, out: str) -> None:
    """In a child process: generate the pool, clean it, write wall time, peak RSS and recall to `out`."""
    import os
    import resource

    from llamaduo_nb.jsonio import write_json

    started = time.perf_counter()
    syn = generate(rows, test, seed=seed)
    generate_seconds = time.perf_counter() - started
    generated_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    runs = EngineRuns(syn)
    load_before = os.getloadavg()
    runs.run()
    summary = runs.summary()
    summary["load_before"] = [round(x, 2) for x in load_before]
    summary["load_after"] = [round(x, 2) for x in os.getloadavg()]
    summary["generate_seconds"] = round(generate_seconds, 1)
    summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary["rss_after_generating_bytes"] = generated_rss
    write_json(out, summary)


def run_million(rows: int, test: int, seed: int) -> dict[str, Any]:
    """The engine on `rows` x `test` in a fresh process, so its peak RSS is the pool's plus the engine's."""
    import json
    import os
    import subprocess
    import sys
    import tempfile

    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        code = (
            "from benches.bench_dataquality import _million_child; "
            f"_million_child({rows}, {test}, {seed}, {out!r})"
        )
        subprocess.run([sys.executable, "-c", code], check=True)
        return json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataquality")
    group.add_argument("--dq-small", type=int, help="rows for the reference comparison (default 20000)")
    group.add_argument(
        "--dq-large",
        type=int,
        help="rows for an extra scale run in this process (default: none; 20000 with --quick)",
    )
    group.add_argument("--dq-test", type=int, default=1000, help="test items (default 1000)")
    group.add_argument("--dq-no-reference", action="store_true", help="skip the (slow) reference pipeline")
    group.add_argument("--dq-seed", type=int, default=0)
    group.add_argument(
        "--no-million",
        dest="million",
        action="store_false",
        help="skip the engine on 1M rows x 5K test items in a child process (~4 min, most of it generating"
        " the pool; skipped with --quick)",
    )
    group.add_argument("--million", dest="million", action="store_true", help=argparse.SUPPRESS)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import os
    import platform

    small = args.dq_small or (2_000 if args.quick else 20_000)
    large = args.dq_large or (20_000 if args.quick else 0)
    million = getattr(args, "million", True) and not args.quick
    results: dict[str, Any] = {
        "sizes": {"small": small, "large": large, "test": args.dq_test},
        "seed": args.dq_seed,
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}",
    }
    print(f"generating {small:,} rows against {args.dq_test:,} test items ...", flush=True)
    syn_small = generate(small, args.dq_test, seed=args.dq_seed)
    EngineRuns(generate(500, 50, seed=99)).run()  # warm-up: imports, numpy and caches
    small_runs = EngineRuns(syn_small)
    print("engine, small ...", flush=True)
    small_runs.run(2)
    print("library pipeline (rensa MinHash-LSH + rapidfuzz), small ...", flush=True)
    results["library_small"] = run_library(syn_small)
    if not args.dq_no_reference:
        print("reference, small (slow) ...", flush=True)
        results["reference_small"] = run_reference(syn_small)
    print("engine, small, again ...", flush=True)
    small_runs.run(3)  # runs on both sides of the alternatives, so a change of load hits both
    results["engine_small"] = small_runs.summary()
    engine = results["engine_small"]
    for name in ("reference", "library"):
        if f"{name}_small" in results:
            other = results[f"{name}_small"]
            results[f"speedup_{name}"] = round(other["seconds"] / engine["seconds"], 1)
            results[f"speedup_{name}_cpu"] = round(other["cpu_seconds"] / engine["cpu_seconds"], 1)
    results["speedup_small"] = results.get("speedup_reference")
    results["speedup_small_cpu"] = results.get("speedup_reference_cpu")
    results["rouge_agreement"] = rouge_agreement(syn_small)
    del syn_small
    if large:
        print(f"engine, large ({large:,} rows) ...", flush=True)
        large_runs = EngineRuns(generate(large, args.dq_test, seed=args.dq_seed + 1))
        large_runs.run()
        results["engine_large"] = large_runs.summary()
        del large_runs
    if million:
        print("engine, 1M rows x 5K test items, in a child process ...", flush=True)
        results["engine_million"] = run_million(1_000_000, 5_000, args.dq_seed + 2)
    return results


def _recalls(r: dict[str, Any]) -> dict[str, float | None]:
    return {
        "exact": r["duplicates"]["recall_exact"],
        "near": r["duplicates"]["recall_near"],
        "contamination": r["contamination"]["recall"],
    }


def _recall(r: dict[str, Any]) -> str:
    return (
        f"recall: exact dup {r['duplicates']['recall_exact']}, near-dup {r['duplicates']['recall_near']}, "
        f"contamination {r['contamination']['recall']}"
    )


def lines(args: argparse.Namespace) -> list:
    from benches.common import BenchLine, write

    results = measure(args)
    out = Path(args.out)
    from llamaduo_nb.jsonio import atomic_write, write_json

    write_json(out / "dataquality.json", results)
    with atomic_write(out / "dataquality.md") as fh:
        fh.write(markdown_table(results) + "\n")
    print(markdown_table(results), flush=True)
    sizes = results["sizes"]
    engine = results["engine_small"]
    where = f"{sizes['small']:,} rows x {sizes['test']:,} test items"
    rows = []
    if "reference_small" in results:
        ref = results["reference_small"]
        ratio = results["speedup_reference"]
        rows.append(
            BenchLine(
                f"data quality, {where}: engine vs reference pipeline",
                f"{engine['seconds']:.2f} s ({_recall(engine)})",
                f"{ref['seconds']:.1f} s (datasketch per-token MinHash + rouge-score; {_recall(ref)})",
                ratio,
                ">= 50x",
                ratio >= 50,
            )
        )
    lib = results["library_small"]
    ratio = results["speedup_library"]
    # equal recall: the library's LSH settings were tuned until its recalls reached the engine's
    equal = all(
        _recalls(lib)[k] is not None and _recalls(lib)[k] >= _recalls(engine)[k] for k in _recalls(engine)
    )
    rows.append(
        BenchLine(
            f"data quality, {where}: engine vs fastest library pipeline at equal recall",
            f"{engine['seconds']:.2f} s, {engine['cpu_seconds']:.2f} CPU-s ({_recall(engine)})",
            f"{lib['seconds']:.1f} s, {lib['cpu_seconds']:.1f} CPU-s (rensa MinHash-LSH {LIBRARY_DEDUP_LSH[0]}x"
            f"{LIBRARY_DEDUP_LSH[1]} dedup / {LIBRARY_DECONTAM_LSH[0]}x{LIBRARY_DECONTAM_LSH[1]} decontam bands"
            f" + rapidfuzz ROUGE-L + 13-gram set; {_recall(lib)})",
            ratio,
            "> 1x at equal recall",
            ratio > 1 and equal,
            details={"recall_equal_or_higher": equal},
        )
    )
    if "engine_large" in results:
        large = results["engine_large"]
        rows.append(
            BenchLine(
                f"data quality, {sizes['large']:,} rows x {sizes['test']:,} test items: engine",
                f"{large['seconds']:.1f} s, {large['cpu_seconds']:.1f} CPU-s ({_recall(large)})",
                "n/a (scale run)",
                None,
                "",
            )
        )
    if "engine_million" in results:
        m = results["engine_million"]
        gib = m["peak_rss_bytes"] / 2**30
        rows.append(
            BenchLine(
                "data quality, 1,000,000 rows x 5,000 test items: engine (child process)",
                f"{m['seconds']:.1f} s ({m['cpu_seconds']:.0f} CPU-s, load {m['load_before'][0]:.1f}), "
                f"peak RSS {gib:.2f} GiB incl. the pool ({_recall(m)})",
                "goal: <= 60 s, <= 4 GiB",
                None,
                "<= 60 s and <= 4 GiB",
                m["seconds"] <= 60 and gib <= 4,
            )
        )
    write(rows, out / "dataquality_lines")
    return rows


def main(argv: list[str] | None = None) -> int:
    from benches.common import markdown

    parser = argparse.ArgumentParser(
        prog="python -m benches.bench_dataquality", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="2K rows and a 20K scale run, no 1M run")
    parser.add_argument("--out", default="outputs/bench", help="folder for the tables")
    add_arguments(parser)
    print(markdown(lines(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
