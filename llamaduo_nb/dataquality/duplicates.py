"""Data quality for instruction data: exact and near-duplicate removal, ROUGE-L, test-set decontamination.

Used by 05_synthesize (each synthetic batch is cleaned against the data kept so far and the test split)
and by ``llamaduo dedup`` (`add_dedup_subparser`, `run_dedup_cli`). Only `run_dedup_cli` touches files.

What it decides
---------------
* `dedup` keeps exactly ONE row per duplicate cluster. Two rows are linked when their text fields are
  identical (``exact_duplicate``) or when they are MinHash-LSH candidates whose ROUGE-L F1 (over the
  fields joined) reaches ``threshold`` (``near_duplicate``; default 0.7, Self-Instruct's value).
  Clusters are the connected components of those links (union-find), so they do not depend on input
  order. The kept row is the earliest: rows of ``against`` (the data kept so far) always win and are
  never dropped; among new rows the first in input order wins. Each dropped row names the kept row of
  its cluster and its ROUGE-L F1 with it (a row can join through a chain, so that score may be lower).
  Note what the rule means for templated prompts: two rows "Classify the sentiment of ...: <8 words>"
  with different short inputs can reach 0.7 and are then near-duplicates; raise ``threshold`` if that
  is not wanted.
* `decontaminate` drops a row when its instruction OR response is near a test item's instruction or
  response, by the first rule that matches, in this order: ``exact_match`` (same tokens as a test
  instruction), ``rouge_l`` (MinHash-LSH candidate with ROUGE-L F1 >= 0.7; both texts need >= 8 tokens,
  so labels such as "Positive" never match), ``ngram_13`` (a shared 13-token span, as GPT-3's filter)
  and ``ngram_containment`` (>= 50% of the test text's distinctive 8-grams occur in the row: catches
  short test prompts inside longer rows). Template text is not evidence: an 8-gram found in >= 3 test
  items is boilerplate, and so is every span touching it; the LSH ignores shingles found in >= 3 test
  items. Each drop records the test item (index and id), both fields, the rule and the score.
* `clean` = `decontaminate`, then `dedup` of the remaining rows against ``against``, sharing the
  tokenisation; `CleanResult.report` counts per rule and shows examples.

ROUGE-L, exactly
----------------
`rouge_l_f1` reproduces ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=...)`` bit for
bit: the same tokens (lowercase; every character outside [a-z0-9] separates; Porter stemming of tokens
longer than 3 characters, cached per distinct token) and the same precision/recall/F1 arithmetic. The
tests compare both on several hundred pairs (unicode, punctuation, empty and long texts). The LCS runs
in rapidfuzz: every distinct token gets a private code point, so a text becomes a string with one
character per token and ``rapidfuzz.distance.LCSseq`` (bit-parallel C++) gives the token LCS. Here,
rouge-score needs ~0.7 ms for a pair of 80-token texts, rapidfuzz ~0.3 us. Beyond 1.1M distinct tokens
(more than Unicode has code points) texts fall back to tuples of ids: slower, still exact.

Candidate generation, with the numbers that chose it (benchmark pool of benches/bench_dataquality.py, 20K rows)
-------------------------------------------------------------------------------------------------------
* Signatures: one-permutation MinHash (one 64-bit hash per shingle picks a bin and a value; one
  ``np.minimum.at`` fills every bin of every text) with densification by the nearest filled bin, left or
  right by a fixed per-bin direction (Shrivastava & Li, UAI 2014). The chance that two texts agree on a
  bin stays their Jaccard similarity. For 1.6M shingles this takes 0.01-0.04 s plus densification;
  classic MinHash with numpy universal hashing took 1.6 s (64 permutations) / 3.7 s (128), datasketch
  ``MinHash.bulk`` 3.4 s, and per-token ``MinHash.update`` calls ~25 s. Bands use bins b, b + 32 (not
  adjacent ones): densification copies values between neighbours, and adjacent bands made 2.3M
  candidate pairs at 100K rows instead of 6K.
* Shingles: word bigrams of the ROUGE tokens, per field (a row's set is the union of its fields').
  Unigrams made every pair of rows sharing a prompt template a candidate (569K pairs at 20K rows with
  16 x 4 bands); trigrams lose short instructions (a 20%-edited 30-token text keeps Jaccard ~0.3).
* Boilerplate: shingles occurring more than max(20, 0.5% of the rows) times (counted in hashed
  buckets) are left out of a row's signature when they are less than half of its shingles. Templates
  otherwise make same-template rows collide (with 42 x 3 bands: 456K candidate pairs at 20K rows with
  them, 3.1K without); a row made mostly of frequent shingles keeps them, because a large family of
  near-copies makes its own text frequent and must still find itself.
* 64 bins, 32 bands x 2 rows (S-curve midpoint (1/32)^(1/2) = 0.18): near-duplicate recall 0.998 at
  20K and 300K rows, 99% for copies with 20% of their words edited. 128 bins as 42 x 3 found 0.992
  (0.96 at 20% edits) and 64 bins as 21 x 3 0.978, for the same time: candidates are cheap, since
  every one is confirmed exactly by ROUGE-L (~0.5 us a pair).
* A bucket of more than 64 rows is linked as a star plus a chain in content-hash order instead of all
  its pairs: bounded work, still independent of input order.

Speed (``make bench``, 2-core VM shared with other jobs): `clean` of 20K rows against 1K test items in
~1.0 s where the reference pipeline takes ~50 s (50x; per-token datasketch MinHash, MinHashLSH,
rouge-score, an O(N^2) membership filter); 300K rows in ~16 s (``--dq-large 300000``). 1M rows against
5K test items (the child process of ``python -m benches --only dataquality``): 59.2 s wall, 58.6 CPU-s at
load 3.5, peak RSS 2.93 GiB of which ~1.0 GiB is the pool itself; other runs 64 CPU-s and 66-80 s wall
at load 3 (before the numpy encoder, the shared doc gather and the length bound: 86 CPU-s, 92 s wall,
2.8 GiB; the same rows kept and dropped, and identical results on a 30K fixture). Where the time goes
at 1M: encoding 20 CPU-s, the decontamination scan (second thread) ~30 s, which overlaps it on a second
core, then in dedup signatures 8 s (above ~8M shingles they are
recomputed rather than cached, to bound memory), 3.5M LSH candidate pairs confirmed by LCS ~12-18 s
(rapidfuzz, 2 threads; candidates grow faster than rows because template shingles below the
boilerplate cut form large buckets).

* Encoding (`_Encoder.encode_many`): one ``bytes.translate`` over a batch of 16K texts, token boundaries
  in numpy, and each token of up to 16 bytes read as two integers (its bytes, exact) and looked up in an
  open-addressing table; new tokens get ids in order of first appearance, so codes equal the per-token
  path's (a test compares both). The per-token path made a Python bytes object and a dict lookup per
  token: 35 CPU-s for the 82M tokens of 1M rows, against 20.
* Dedup confirms only candidate pairs whose lengths allow ROUGE-L F1 >= threshold (F1 <= 2 min/(m+n)),
  and builds each compared doc once, gathering pairs in numpy's object loop.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import hashlib
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from tqdm.auto import tqdm

from llamaduo_nb.coverage import INSTRUCTION_KEYS, RESPONSE_KEYS
from llamaduo_nb.jsonio import DataFileError, iter_jsonl, write_json, write_jsonl

FIELDS = ("instruction", "response")
_WORKERS = min(4, os.cpu_count() or 1)  # numpy sorts and rapidfuzz release the GIL

# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style content parts
        return "\n".join(
            str(part.get("text", "")) if isinstance(part, Mapping) else str(part) for part in content
        )
    raise ValueError(f"message content must be a string, got {type(content).__name__}")


def _string_field(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field '{key}' must be a string, got {type(value).__name__}")
    return value


def row_text(row: Mapping[str, Any]) -> tuple[str, str]:
    """Return ``(instruction, response)`` of a row in any schema 01_coverage accepts.

    Chat format ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``:
    the instruction is the first user turn, the response the first assistant turn after it. Otherwise
    the first present of ``instruction | prompt | question | input`` and of ``response | completion |
    output | answer``; a missing response counts as empty.
    """
    if row.get("messages") is not None:
        return _chat_text(row["messages"])
    instruction_key = next((key for key in INSTRUCTION_KEYS if key in row), None)
    response_key = next((key for key in RESPONSE_KEYS if key in row), None)
    if instruction_key is None and response_key is None:
        raise ValueError(
            "row has no instruction/response fields and no 'messages'; expected e.g. "
            '{"instruction": "Summarize ...", "response": "..."} '
            f"(instruction keys: {', '.join(INSTRUCTION_KEYS)}; response keys: {', '.join(RESPONSE_KEYS)})"
        )
    return (
        _string_field(row, instruction_key) if instruction_key else "",
        _string_field(row, response_key) if response_key else "",
    )


def _chat_text(messages: Any) -> tuple[str, str]:
    if not isinstance(messages, list):
        raise ValueError('\'messages\' must be a list of {"role", "content"} objects')
    instruction: str | None = None
    for message in messages:
        if not isinstance(message, Mapping):
            raise ValueError(f"each message must be an object with role and content, got {message!r:.60}")
        if instruction is None:
            if message.get("role") == "user":
                instruction = _content_text(message.get("content"))
        elif message.get("role") == "assistant":
            return instruction, _content_text(message.get("content"))
    if instruction is None:
        raise ValueError(
            "'messages' has no user turn; expected e.g. "
            '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
        )
    return instruction, ""


def _row_fields(row: Mapping[str, Any], text_fields: Sequence[str]) -> tuple[str, ...]:
    if not isinstance(row, Mapping):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    if text_fields == FIELDS:
        instruction, response = row.get("instruction"), row.get("response")
        if type(instruction) is str and type(response) is str and "messages" not in row:
            return instruction, response  # the common case, checked cheaply
        return row_text(row)
    pair = row_text(row) if any(name in FIELDS for name in text_fields) else ("", "")
    return tuple(
        pair[FIELDS.index(name)] if name in FIELDS else _string_field(row, name) for name in text_fields
    )


class RowError(ValueError):
    """A row cannot be read; ``source`` names the input ("pool", "against", "test"), ``index`` is 0-based."""

    def __init__(self, source: str, index: int, row: Any, problem: str):
        self.source, self.index, self.problem = source, index, problem
        row_id = row.get("id") if isinstance(row, Mapping) else None
        label = f"{source} row {index}" + (f" (id={row_id!r})" if row_id is not None else "")
        super().__init__(f"{label}: {problem}")


def _fields_of(
    rows: Sequence[Mapping[str, Any]], text_fields: Sequence[str], source: str
) -> list[tuple[str, ...]]:
    text_fields = tuple(text_fields)
    out = []
    for index, row in enumerate(rows):
        try:
            out.append(_row_fields(row, text_fields))
        except ValueError as exc:
            raise RowError(source, index, row, str(exc)) from None
    return out


# --------------------------------------------------------------------------------------------------
# Tokens, encoding and ROUGE-L
# --------------------------------------------------------------------------------------------------

# rouge-score: text.lower(), re.sub(r"[^a-z0-9]+", " "), split. Encoding to ASCII with "replace" turns
# every non-ASCII character into "?", which the table then turns into a space like any other separator.
_SEPARATORS = bytes(c if 48 <= c <= 57 or 97 <= c <= 122 else 32 for c in range(256))
_LOWER_SEPARATORS = bytes(c + 32 if 65 <= c <= 90 else b for c, b in enumerate(_SEPARATORS))
_VALID_TOKEN = re.compile(r"^[a-z0-9]+$")  # rouge-score's final filter (after stemming)


def _raw_tokens(text: str) -> list[bytes]:
    return text.lower().encode("ascii", "replace").translate(_SEPARATORS).split()


@functools.cache
def _porter() -> Any:
    from nltk.stem import porter

    return porter.PorterStemmer()


@functools.lru_cache(maxsize=1 << 18)
def _stem(token: str) -> str:
    return _porter().stem(token)


def rouge_tokens(text: str, use_stemmer: bool = False) -> list[str]:
    """The tokens rouge-score's default tokenizer produces for ``text``."""
    tokens = [token.decode("ascii") for token in _raw_tokens(text)]
    if use_stemmer:
        tokens = [_stem(token) if len(token) > 3 else token for token in tokens]
        tokens = [token for token in tokens if _VALID_TOKEN.match(token)]
    return tokens


# Each distinct token gets an id; id k is written as code point k + 1, skipping the surrogate block, so an
# encoded text is a str with one character per token. Beyond the last code point a text is kept as a tuple
# of ids instead (slower, still exact).
_ID_CAPACITY = 0x10FFFF - 0x800 - 1
_OVERFLOW = "\U0010ffff"


def _code_of(token_id: int) -> str:
    code = token_id + 1
    return chr(code + 0x800 if code >= 0xD800 else code)


def _ids_of_codes(codes: np.ndarray) -> np.ndarray:
    codes = codes.astype(np.int64)
    return codes - 1 - np.where(codes >= 0xE000, 0x800, 0)


Encoded = str | tuple[int, ...]
_FAST_BATCH = 16384  # texts per numpy encoding batch (0: the per-token path only, as the tests compare)
_LENGTH_BOUND = True  # dedup skips the LCS of pairs whose lengths alone rule out the threshold
_KEY_BYTES = 16  # tokens up to this long are looked up by their bytes in numpy, longer ones in a dict


class _Codes(dict):
    """raw token bytes -> its one-character code ("" when stemming leaves no valid token)."""

    def __init__(self, encoder: _Encoder):
        super().__init__()
        self.encoder = encoder

    def __missing__(self, raw: bytes) -> str:
        code = self.encoder._new_token(raw)
        self[raw] = code
        return code


class _Encoder:
    """Turns texts into token codes with one shared vocabulary, so encoded texts can be compared."""

    def __init__(self, use_stemmer: bool = False):
        self.use_stemmer = use_stemmer
        self.tokens: list[str] = []
        self._ids: dict[str, int] = {}
        self._codes = _Codes(self)
        self._lookup = self._codes.__getitem__
        self._hashes = np.zeros(0, dtype=np.uint64)
        self._hashes_lock = threading.Lock()  # clean() reads hashes in a second thread while encoding
        self._table = _TokenTable()  # for _encode_batch: short tokens by their bytes

    def _new_token(self, raw: bytes) -> str:
        token = raw.decode("ascii")
        if self.use_stemmer and len(token) > 3:
            token = _stem(token)
            if not _VALID_TOKEN.match(token):
                return ""
        token_id = self._ids.get(token)
        if token_id is None:
            token_id = self._ids[token] = len(self.tokens)
            self.tokens.append(token)
        return _code_of(token_id) if token_id < _ID_CAPACITY else _OVERFLOW

    def encode(self, text: str) -> Encoded:
        if text.isascii():  # lowercase in the byte table: one pass less, same tokens
            raw = text.encode("ascii").translate(_LOWER_SEPARATORS).split()
        else:
            raw = text.lower().encode("ascii", "replace").translate(_SEPARATORS).split()
        encoded = "".join(map(self._lookup, raw))
        if len(self.tokens) > _ID_CAPACITY and _OVERFLOW in encoded:
            return tuple(self._id_of(token) for token in raw if self._codes[token])
        return encoded

    def encode_many(self, texts: Iterable[str]) -> list[Encoded]:
        """Encode texts: in numpy batches (`_encode_batch`) unless stemming or a vocabulary near the
        code-point limit asks for the per-token path, which encodes each distinct text once."""
        out: list[Encoded] = []
        if not self.use_stemmer and _FAST_BATCH > 0:
            batch: list[str] = []
            for text in texts:
                batch.append(text)
                if len(batch) == _FAST_BATCH:
                    out.extend(self._encode_batch(batch))
                    batch = []
            out.extend(self._encode_batch(batch))
            return out
        done: dict[str, Encoded] = {}
        encode = self.encode
        for text in texts:
            encoded = done.get(text)
            if encoded is None:
                encoded = done[text] = encode(text)
            out.append(encoded)
        return out

    def _encode_batch(self, texts: list[str]) -> list[Encoded]:
        """`encode` of many texts at once, with the same tokens, ids and codes, without a Python object
        per token: one translated byte buffer, token boundaries and exact 16-byte keys in numpy, looked up
        in a sorted copy of the vocabulary; only new and longer tokens go through the dict."""
        raws = [t.encode("ascii") if t.isascii() else t.lower().encode("ascii", "replace") for t in texts]
        joined = b" ".join(raws).translate(_LOWER_SEPARATORS)  # lower case and separators as in `encode`
        buf = np.frombuffer(joined, dtype=np.uint8)
        edge = np.diff((buf != 32).view(np.int8), prepend=np.int8(0), append=np.int8(0))
        starts, ends = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
        if len(self.tokens) + starts.size >= _ID_CAPACITY:  # ids might overflow: the tuple path
            return [self.encode(text) for text in texts]
        lengths = ends - starts
        text_starts = np.zeros(len(texts), dtype=np.int64)
        np.cumsum(np.fromiter(map(len, raws), np.int64, len(raws))[:-1] + 1, out=text_starts[1:])
        per_text = np.bincount(np.searchsorted(text_starts, starts, side="right") - 1, minlength=len(texts))
        ids = self._batch_ids(joined, starts, lengths)
        if ids is None:  # two different tokens with the same 64-bit key in this batch: the exact path
            return [self.encode(text) for text in texts]
        codes = (ids + 1).astype(np.uint32)
        codes[codes >= 0xD800] += 0x800
        text = codes.tobytes().decode("utf-32-le")
        bounds = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(per_text, out=bounds[1:])
        cuts = bounds.tolist()
        return [text[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

    def _batch_ids(self, joined: bytes, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
        """The id of every token (bytes ``joined[starts[k]:starts[k] + lengths[k]]``), assigning new ids in
        order of first appearance as `encode` does. A token of up to 16 bytes is read as two integers (its
        bytes, exactly) and found in an open-addressing table that stores both integers, so a match is
        exact; longer tokens go through the dict. None if two different new tokens of this batch share a
        64-bit key (then the caller takes the per-token path)."""
        n = len(joined)
        padded = joined + bytes(_KEY_BYTES + 8)
        # every byte offset of `padded` read as a little-endian uint64 (unaligned, stride 1)
        words = np.ndarray(shape=(n + _KEY_BYTES,), dtype="<u8", buffer=padded, strides=(1,))
        lo = words[starts] & _BYTE_MASKS[np.minimum(lengths, 8)]
        hi = words[starts + 8] & _BYTE_MASKS[np.clip(lengths - 8, 0, 8)]
        key = _fmix(_fmix(lo) ^ hi)
        ids = self._table.find(key, lo, hi)
        ids[lengths > _KEY_BYTES] = -1
        new = np.flatnonzero(ids < 0)
        if not new.size:
            return ids
        new_short = new[lengths[new] <= _KEY_BYTES]
        keys, first, inverse = np.unique(key[new_short], return_index=True, return_inverse=True)
        first = new_short[first]
        inverse = inverse.ravel()
        if (lo[first[inverse]] != lo[new_short]).any() or (hi[first[inverse]] != hi[new_short]).any():
            return None
        long_tokens = new[lengths[new] > _KEY_BYTES].tolist()
        for k in sorted(first.tolist() + long_tokens):  # ids are given in order of first appearance
            self._lookup(joined[starts[k] : starts[k] + lengths[k]])
        token_ids = self._ids
        first_ids = [
            token_ids[joined[starts[k] : starts[k] + lengths[k]].decode("ascii")] for k in first.tolist()
        ]
        ids[new_short] = np.array(first_ids, dtype=np.int64)[inverse]
        for k in long_tokens:
            ids[k] = token_ids[joined[starts[k] : starts[k] + lengths[k]].decode("ascii")]
        self._table.add(keys, lo[first], hi[first], first_ids)
        return ids

    def _id_of(self, raw: bytes) -> int:
        token = raw.decode("ascii")
        return self._ids[_stem(token) if self.use_stemmer and len(token) > 3 else token]

    def token_hashes(self) -> np.ndarray:
        """A 64-bit hash of every token's text, by id: the same token hashes the same in every run."""
        with self._hashes_lock:
            if self._hashes.size < len(self.tokens):
                new = self.tokens[self._hashes.size :]
                self._hashes = np.concatenate([self._hashes, _string_hashes(new)])
            return self._hashes


_BYTE_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], dtype=np.uint64)


class _TokenTable:
    """Open addressing (linear probing, load <= 1/2) from a token's two byte integers to its id."""

    def __init__(self) -> None:
        self.bits = 12
        self.size = 0
        self._alloc()

    def _alloc(self) -> None:
        slots = 1 << self.bits
        self.lo = np.zeros(slots, dtype=np.uint64)
        self.hi = np.zeros(slots, dtype=np.uint64)
        self.ids = np.full(slots, -1, dtype=np.int64)

    def _slot(self, key: np.ndarray) -> np.ndarray:
        return (key >> np.uint64(64 - self.bits)).astype(np.int64)

    def find(self, key: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Id of each token, -1 where absent."""
        slot = self._slot(key)
        out = self.ids[slot]
        hit = (out >= 0) & (self.lo[slot] == lo) & (self.hi[slot] == hi)
        todo = np.flatnonzero((out >= 0) & ~hit)  # slot taken by another token: probe on
        out[~hit] = -1
        slot[todo] = (slot[todo] + 1) & ((1 << self.bits) - 1)
        mask = (1 << self.bits) - 1
        while todo.size:
            at = slot[todo]
            found = self.ids[at]
            hit = (found >= 0) & (self.lo[at] == lo[todo]) & (self.hi[at] == hi[todo])
            out[todo[hit]] = found[hit]
            more = (found >= 0) & ~hit  # occupied by another token: probe the next slot
            todo = todo[more]
            slot[todo] = (at[more] + 1) & mask
        return out

    def add(self, keys: np.ndarray, lo: np.ndarray, hi: np.ndarray, ids: list[int]) -> None:
        if 2 * (self.size + len(ids)) > (1 << self.bits):
            old = np.flatnonzero(self.ids >= 0)
            entries = (self.lo[old], self.hi[old], self.ids[old])
            while 2 * (self.size + len(ids)) > (1 << self.bits):
                self.bits += 1
            self._alloc()
            self.size = 0
            if old.size:
                self.add(_fmix(_fmix(entries[0]) ^ entries[1]), *entries[:2], entries[2].tolist())
        mask = (1 << self.bits) - 1
        table_ids, table_lo, table_hi = self.ids, self.lo, self.hi
        for slot, a, b, token_id in zip(
            self._slot(keys).tolist(), lo.tolist(), hi.tolist(), ids, strict=True
        ):
            while table_ids[slot] >= 0:
                slot = (slot + 1) & mask
            table_ids[slot], table_lo[slot], table_hi[slot] = token_id, a, b
        self.size += len(ids)


def _string_hashes(strings: list[str]) -> np.ndarray:
    """Polynomial hash of each ASCII string's bytes, mixed (vectorised)."""
    lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
    data = np.frombuffer("".join(strings).encode("ascii"), dtype=np.uint8).astype(np.uint64)
    starts = np.zeros(len(strings), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    from_end = np.repeat(starts + lengths, lengths) - 1 - np.arange(data.size)
    powers = np.cumprod(np.full(int(lengths.max(initial=1)), _MULT, dtype=np.uint64))  # M^1 .. M^max
    hashes = np.add.reduceat(data * powers[from_end], starts) if data.size else np.zeros(0, dtype=np.uint64)
    return _fmix(_fmix(hashes ^ lengths.astype(np.uint64)) + np.uint64(0x632BE59BD9B4E019))


def _all_str(encoded: Iterable[Encoded]) -> bool:
    return set(map(type, encoded)) <= {str}


def _as_ids(encoded: Encoded) -> tuple[int, ...]:
    if isinstance(encoded, tuple):
        return encoded
    return tuple(_ids_of_codes(np.frombuffer(encoded.encode("utf-32-le"), dtype=np.uint32)).tolist())


def _lcs_lengths(left: Sequence[Encoded], right: Sequence[Encoded], workers: int = -1) -> np.ndarray:
    """Token LCS length of each pair ``(left[k], right[k])``."""
    if not left:
        return np.zeros(0, dtype=np.float64)
    if _all_str(left) and _all_str(right):
        if len(left) < 2000:  # thread start-up costs more than it saves on small batches
            return np.fromiter(map(LCSseq.similarity, left, right), dtype=np.float64, count=len(left))
        return process.cpdist(left, right, scorer=LCSseq.similarity, workers=workers).astype(np.float64)
    pairs = [
        (a, b) if isinstance(a, str) and isinstance(b, str) else (_as_ids(a), _as_ids(b))
        for a, b in zip(left, right, strict=True)
    ]
    return np.fromiter((LCSseq.similarity(a, b) for a, b in pairs), dtype=np.float64, count=len(pairs))


def _f1(lcs: np.ndarray, target_len: np.ndarray, prediction_len: np.ndarray) -> np.ndarray:
    """rouge-score's arithmetic, elementwise (same IEEE operations in the same order, so equal bits)."""
    target_len = np.asarray(target_len, dtype=np.float64)
    prediction_len = np.asarray(prediction_len, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / prediction_len
        recall = lcs / target_len
        f1 = 2 * precision * recall / (precision + recall)
    undefined = (target_len == 0) | (prediction_len == 0) | ~(precision + recall > 0)
    f1[undefined] = 0.0
    return f1


def _f1_pairs(left: Sequence[Encoded], right: Sequence[Encoded]) -> np.ndarray:
    lcs = _lcs_lengths(left, right)
    return _f1(
        lcs,
        np.fromiter(map(len, left), np.float64, len(left)),
        np.fromiter(map(len, right), np.float64, len(right)),
    )


def rouge_l_f1(target: str, prediction: str, use_stemmer: bool = False) -> float:
    """ROUGE-L F1 exactly as ``RougeScorer(["rougeL"], use_stemmer).score(target, prediction)``."""
    return float(rouge_l_f1_batch([target], [prediction], use_stemmer=use_stemmer)[0])


def rouge_l_f1_batch(
    targets: Sequence[str], predictions: Sequence[str], use_stemmer: bool = False
) -> np.ndarray:
    """ROUGE-L F1 of each pair ``(targets[k], predictions[k])``, as a float64 array."""
    if len(targets) != len(predictions):
        raise ValueError(f"targets and predictions differ in length: {len(targets)} != {len(predictions)}")
    encoder = _Encoder(use_stemmer)
    return _f1_pairs([encoder.encode(t) for t in targets], [encoder.encode(p) for p in predictions])


# --------------------------------------------------------------------------------------------------
# Shingles, one-permutation MinHash, LSH
# --------------------------------------------------------------------------------------------------

_MULT = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
_EMPTY = np.uint32(0xFFFFFFFF)


def _fmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(31))
    x *= _MIX
    x ^= x >> np.uint64(29)
    return x


@dataclass(frozen=True)
class MinHashParams:
    """Candidate generation; see the module docstring for why these defaults."""

    ngram: int = 2  # word n-gram shingles
    num_perm: int = 64  # one-permutation-hashing bins
    bands: int = 32
    rows: int = 2  # bands * rows <= num_perm
    common_fraction: float = 0.005  # shingles more frequent than this share of texts are boilerplate
    common_min_count: int = 20  # ... and never below this count
    max_bucket: int = 64  # larger LSH buckets are linked as star + chain

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.bands < 1 or self.rows < 1:
            raise ValueError(f"ngram, bands and rows must be >= 1, got {self}")
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands * rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")


@dataclass
class _TokenArrays:
    """The token hashes of many encoded texts, concatenated."""

    hashes: np.ndarray  # uint64 per token
    starts: np.ndarray  # int64 per text
    lengths: np.ndarray  # int64 per text

    @classmethod
    def of(cls, encoded: Sequence[Encoded], encoder: _Encoder) -> _TokenArrays:
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        if _all_str(encoded):
            ids = _ids_of_codes(np.frombuffer("".join(encoded).encode("utf-32-le"), dtype=np.uint32))
        else:
            ids = np.fromiter(
                (i for e in encoded for i in _as_ids(e)), dtype=np.int64, count=int(lengths.sum())
            )
        starts = np.zeros(len(encoded), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        return cls(encoder.token_hashes()[ids], starts, lengths)


def _mult_power(k: int) -> np.uint64:
    return np.uint64(pow(int(_MULT), k, 1 << 64))


def _window_hashes(token_hashes: np.ndarray, n: int) -> np.ndarray:
    """Polynomial hash of every n-token window (length len - n + 1), by binary doubling."""
    total = token_hashes.size
    if total < n:
        return np.zeros(0, dtype=np.uint64)
    powers = {1: token_hashes}
    width = 1
    while width * 2 <= n:
        prev = powers[width]
        powers[width * 2] = prev[: prev.size - width] * _mult_power(width) + prev[width:]
        width *= 2
    result: np.ndarray | None = None
    covered = 0
    for width in sorted(powers, reverse=True):
        if covered + width <= n and (n - covered) & width:
            block = powers[width][covered : covered + total - n + 1]
            result = block if result is None else result * _mult_power(width) + block
            covered += width
    assert result is not None and covered == n
    return result[: total - n + 1]


def _ngrams(tokens: _TokenArrays, n: int, short_texts: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash, owner text, start position) of every n-gram inside a text, grouped by text.

    With ``short_texts``, a text shorter than n contributes one shingle of its whole token sequence
    (appended after the others; positions are then not returned).
    """
    windows = _window_hashes(tokens.hashes, n)
    per_text = np.maximum(tokens.lengths - n + 1, 0)
    inside = np.ones(windows.size, dtype=bool)
    if n > 1:  # windows starting in the last n - 1 tokens of a text cross into the next one
        ends = (tokens.starts + tokens.lengths)[tokens.lengths > 0]
        crossing = (ends[:, None] - np.arange(n - 1, 0, -1)).ravel()
        inside[crossing[(crossing >= 0) & (crossing < windows.size)]] = False
    hashes = windows[inside]
    owner = np.repeat(np.arange(tokens.lengths.size), per_text)
    position = np.flatnonzero(inside) if not short_texts else np.zeros(0, dtype=np.int64)
    if short_texts and n > 1:
        extra_h, extra_o = [hashes], [owner]
        for length in range(1, n):
            which = np.flatnonzero(tokens.lengths == length)
            if which.size:
                extra_h.append(_window_hashes(tokens.hashes, length)[tokens.starts[which]])
                extra_o.append(which)
        hashes, owner = np.concatenate(extra_h), np.concatenate(extra_o)
    return _fmix(hashes), owner, position


# Texts are processed in chunks so that numpy's temporaries stay small enough for the allocator to
# recycle them: fresh memory is expensive to touch on this class of (virtual) machine.
_CHUNK = 8192


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(start, min(start + _CHUNK, n)) for start in range(0, n, _CHUNK)]


def _shingles(
    encoded: Sequence[Encoded], encoder: _Encoder, params: MinHashParams
) -> tuple[np.ndarray, np.ndarray]:
    hashes, owner, _ = _ngrams(_TokenArrays.of(encoded, encoder), params.ngram, short_texts=True)
    return hashes, owner


def _bucket_count(n_texts: int) -> int:
    """Size of a hashed table of shingles: about 32 buckets per text, between 2^16 and 2^22."""
    return 1 << max(16, min(22, (32 * n_texts).bit_length()))


def _bucket_of(hashes: np.ndarray, buckets: int) -> np.ndarray:
    return (hashes & np.uint64(buckets - 1)).astype(np.intp)


_SHINGLE_CACHE_LIMIT = 8_000_000  # shingles kept between the counting and the signature pass (~100 MB)


def _row_shingles(
    codes: Sequence[Encoded], encoder: _Encoder, params: MinHashParams
) -> tuple[_TokenArrays, np.ndarray, np.ndarray]:
    """Tokens, shingle hashes and owning text of consecutive encoded texts (a row's fields)."""
    tokens = _TokenArrays.of(codes, encoder)
    hashes, owner, _ = _ngrams(tokens, params.ngram, short_texts=True)
    return tokens, hashes, owner


class _RowShingles:
    """Shingles of rows (the union of their fields' shingles), gathered chunk by chunk, with hashed
    counts for the boilerplate limit; kept for the signature pass while they fit the cache limit."""

    def __init__(self, params: MinHashParams, n_rows: int):
        self.params, self.n_rows = params, n_rows
        self.buckets = _bucket_count(n_rows)
        self.counts = np.zeros(self.buckets, dtype=np.int64)
        self._pending: list[np.ndarray] = []  # bucket numbers not yet counted
        self._pending_size = 0
        self.chunks: list[tuple[np.ndarray, np.ndarray]] | None = []  # (hashes, global row)
        self.total = 0

    def add(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        self._pending.append(_bucket_of(hashes, self.buckets))
        self._pending_size += hashes.size
        if self._pending_size >= 2 * self.buckets:  # one pass over the counts per several chunks
            self._count()
        self.total += hashes.size
        if self.chunks is not None:
            self.chunks = self.chunks + [(hashes, rows)] if self.total <= _SHINGLE_CACHE_LIMIT else None

    def _count(self) -> None:
        if self._pending:
            self.counts += np.bincount(np.concatenate(self._pending), minlength=self.buckets)
        self._pending, self._pending_size = [], 0

    def merge(self, other: _RowShingles) -> None:
        other._count()
        self.counts += other.counts
        self.total += other.total
        both = self.chunks is not None and other.chunks is not None and self.total <= _SHINGLE_CACHE_LIMIT
        self.chunks = self.chunks + other.chunks if both else None  # type: ignore[operator]

    def common(self) -> np.ndarray | None:
        """Buckets of shingles more frequent than the boilerplate limit (None if there are none)."""
        self._count()
        limit = max(self.params.common_min_count, self.params.common_fraction * self.n_rows)
        common = self.counts > limit
        return common if common.any() else None


def _test_boilerplate(
    test_texts: Sequence[Encoded], items: np.ndarray, encoder: _Encoder, params: MinHashParams, min_df: int
) -> np.ndarray | None:
    """Buckets of shingles found in at least ``min_df`` distinct test items: the test split's templates."""
    hashes, owner = _shingles(test_texts, encoder, params)
    distinct, df = _runs(_distinct_pairs(hashes, items[owner])[0])
    if not (df >= min_df).any():
        return None
    common = np.zeros(_bucket_count(len(test_texts)), dtype=bool)
    common[_bucket_of(distinct[df >= min_df], common.size)] = True
    return common


def _drop_common(
    hashes: np.ndarray,
    owner: np.ndarray,
    n_texts: int,
    common: np.ndarray | None,
    keep_if_mostly_common: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Leave boilerplate shingles out of a text's signature, unless it has nothing else.

    With ``keep_if_mostly_common``, a text keeps them all as soon as they are at least half of its
    shingles: a short text under a long template, or a member of a large family of near-copies, whose
    shared text is frequent *because* it is duplicated; dropping it would hide those duplicates.
    """
    if common is None:
        return hashes, owner
    is_common = common[_bucket_of(hashes, common.size)]
    if keep_if_mostly_common:
        filtered = 2 * np.bincount(owner[is_common], minlength=n_texts) < np.bincount(
            owner, minlength=n_texts
        )
    else:
        filtered = np.zeros(n_texts, dtype=bool)
        filtered[owner[~is_common]] = True
    keep = ~is_common | ~filtered[owner]
    return hashes[keep], owner[keep]


def _band_key_chunks(
    texts: Sequence[Encoded],
    encoder: _Encoder,
    params: MinHashParams,
    common: np.ndarray | None,
    keep_if_mostly_common: bool,
) -> Iterable[tuple[int, int, np.ndarray, np.ndarray]]:
    """(start, end, band keys (bands, end - start), has shingles) for consecutive chunks of texts."""
    for start, end in _chunks(len(texts)):
        hashes, owner = _shingles(texts[start:end], encoder, params)
        hashes, owner = _drop_common(hashes, owner, end - start, common, keep_if_mostly_common)
        signatures = _signatures(hashes, owner, end - start, params.num_perm)
        yield start, end, _band_keys(signatures, params), signatures[:, 0] != _EMPTY


@functools.cache
def _rightward(num_perm: int) -> np.ndarray:
    return np.random.default_rng(20140723).random(num_perm) < 0.5  # fixed: runs must agree


def _nearest_filled_left(filled: np.ndarray) -> np.ndarray:
    """Column of the nearest True at or left of each column, cyclically (-1 in rows without any)."""
    source = np.where(filled, np.arange(filled.shape[1], dtype=np.int16), np.int16(-1))
    np.maximum.accumulate(source, axis=1, out=source)
    np.copyto(source, source[:, -1:], where=source < 0)
    return source


def _signatures(hashes: np.ndarray, owner: np.ndarray, n_texts: int, num_perm: int) -> np.ndarray:
    """One-permutation MinHash, densified; rows that stay all-EMPTY have no shingles.

    An empty bin takes the value of the nearest non-empty bin to its left or to its right, cyclically,
    the direction being fixed per bin (Shrivastava & Li, "Improved densification of one permutation
    hashing", UAI 2014). The rule is the same for every text, so the probability that two texts agree
    on a bin is still their Jaccard similarity.
    """
    bins = ((hashes >> np.uint64(32)) % np.uint64(num_perm)).astype(np.intp)
    values = np.minimum((hashes & np.uint64(0xFFFFFFFF)).astype(np.uint32), _EMPTY - np.uint32(1))
    flat = np.full(n_texts * num_perm, _EMPTY, dtype=np.uint32)
    np.minimum.at(flat, owner.astype(np.intp) * num_perm + bins, values)
    signatures = flat.reshape(n_texts, num_perm)
    filled = signatures != _EMPTY
    if filled.all():
        return signatures
    left = _nearest_filled_left(filled)
    right = np.int16(num_perm - 1) - _nearest_filled_left(filled[:, ::-1])[:, ::-1]
    source = np.where(_rightward(num_perm), right, left)
    source[~filled.any(axis=1)] = 0  # no shingles: stays EMPTY
    return np.take_along_axis(signatures, source.astype(np.intp), axis=1)


def _band_keys(signatures: np.ndarray, params: MinHashParams) -> np.ndarray:
    """(bands, texts) uint64 keys; an equal key in some band makes two texts a candidate pair.

    Band b's keys are offset by b so that keys of different bands never meet when all bands are
    searched together.
    """
    n = signatures.shape[0]
    # band b holds bins b, b + bands, b + 2 * bands, ...: densification copies values between
    # neighbouring bins, so a band of adjacent bins would often hold a single shingle three times
    used = signatures[:, : params.bands * params.rows].reshape(n, params.rows, params.bands)
    keys = np.zeros((params.bands, n), dtype=np.uint64)
    for r in range(params.rows):
        keys *= _MULT
        keys += used[:, r, :].T
    keys += (np.arange(params.bands, dtype=np.uint64) * np.uint64(0xD6E8FEB86659FD93))[:, None]
    return _fmix(keys)  # high bits feed the bitmap prefilter of _KeyIndex and must look random


def _self_pairs(
    keys: np.ndarray, members: np.ndarray, digest: Callable[[int], bytes], max_bucket: int
) -> np.ndarray:
    """Candidate pairs among ``members`` (text indices), as int64 codes ``low * n + high``.

    Buckets of up to ``max_bucket`` texts give all their pairs; a larger bucket is linked as a star plus
    a chain in ``digest`` order, which does not depend on input order either.
    """
    n = int(keys.shape[1])
    if members.size < 2:
        return np.zeros(0, dtype=np.int64)
    index_bits = max(1, (n - 1).bit_length())
    key_mask = ~np.uint64((1 << index_bits) - 1)
    members_u64 = members.astype(np.uint64)

    def band_pairs(band_keys: np.ndarray) -> np.ndarray:
        packed = np.sort((band_keys[members] & key_mask) | members_u64)
        bucket = packed & key_mask
        boundary = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1], True])
        sizes = np.diff(boundary)
        if not (sizes > 1).any():
            return np.zeros(0, dtype=np.int64)
        items = (packed & ~key_mask).astype(np.int64)
        size_of = np.repeat(sizes, sizes)
        offset = np.arange(packed.size) - np.repeat(boundary[:-1], sizes)
        count = np.where(size_of <= max_bucket, size_of - 1 - offset, 0)
        left, partner = _expand(np.arange(packed.size) + 1, count)
        codes = [items[left] * n + items[partner]]  # items ascending within a bucket
        for start in boundary[:-1][sizes > max_bucket].tolist():
            big = sorted(items[start : start + int(size_of[start])].tolist(), key=digest)
            star = [(big[0], other) for other in big[1:]]
            chain = list(zip(big[1:-1], big[2:], strict=True))
            codes.append(np.array([min(a, b) * n + max(a, b) for a, b in star + chain], dtype=np.int64))
        return np.concatenate(codes)

    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        per_band = list(pool.map(band_pairs, keys))
    return _sorted_unique(np.concatenate(per_band))


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is several times slower on large int arrays)."""
    values = np.sort(values)
    keep = np.ones(values.size, dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, how often each occurs) of an already sorted array."""
    starts = (
        np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
        if sorted_values.size
        else np.zeros(0, dtype=np.intp)
    )
    return sorted_values[starts], np.diff(np.r_[starts, sorted_values.size])


def _distinct_pairs(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (first, second) pairs, sorted by first, then second."""
    order = np.lexsort((second, first))
    first, second = first[order], second[order]
    new = np.ones(first.size, dtype=bool)
    new[1:] = (first[1:] != first[:-1]) | (second[1:] != second[:-1])
    return first[new], second[new]


def _expand(lo: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ranges [lo, lo + count): (index of the range, position) of every element."""
    which = np.repeat(np.arange(lo.size), count)
    return which, np.repeat(lo, count) + (np.arange(which.size) - np.repeat(np.cumsum(count) - count, count))


class _KeyIndex:
    """Sorted band keys of a fixed set of texts, searched with the band keys of other texts."""

    def __init__(self, keys: np.ndarray, items: np.ndarray):
        flat = keys.ravel()  # band offsets keep the bands apart
        order = np.argsort(flat, kind="stable")
        self.sorted = flat[order]
        self.items = np.tile(items, keys.shape[0])[order]
        self.shift = np.uint64(64 - max(16, min(24, int(self.sorted.size).bit_length() + 6)))
        self.bitmap = np.zeros(1 << (64 - int(self.shift)), dtype=bool)
        self.bitmap[(self.sorted >> self.shift).astype(np.intp)] = True

    def query(self, keys: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query item, index item) for every shared key; may contain repeats."""
        flat = keys.ravel()
        maybe = np.flatnonzero(self.bitmap[(flat >> self.shift).astype(np.intp)])
        lo = np.searchsorted(self.sorted, flat[maybe], side="left")
        count = np.searchsorted(self.sorted, flat[maybe], side="right") - lo
        which, at = _expand(lo, count)
        return np.tile(items, keys.shape[0])[maybe[which]], self.items[at]


# --------------------------------------------------------------------------------------------------
# Dedup
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DuplicateDrop:
    """A dropped row and the kept row of its cluster."""

    index: int  # position in the rows given to dedup
    reason: str  # "exact_duplicate" | "near_duplicate"
    duplicate_of: int  # position of the kept representative, in `rows` or in `against`
    duplicate_of_source: str  # "pool" | "against"
    score: float  # ROUGE-L F1 with the representative (1.0 for exact duplicates)


@dataclass
class DedupResult:
    kept: list[dict[str, Any]]
    kept_indices: list[int]
    dropped: list[DuplicateDrop]
    stats: dict[str, Any] = field(default_factory=dict, compare=False)  # timings, counts

    def counts(self) -> dict[str, int]:
        counts = {
            "input": len(self.kept) + len(self.dropped),
            "kept": len(self.kept),
            "exact_duplicate": 0,
            "near_duplicate": 0,
        }
        for drop in self.dropped:
            counts[drop.reason] += 1
        return counts


def _content_digest(fields: tuple[str, ...]) -> bytes:
    """A hash of a row's text: orders rows independently of their input order."""
    return hashlib.blake2b("\x1f".join(fields).encode("utf-8", "surrogatepass"), digest_size=8).digest()


class _Progress:
    """Stage timings, plus a tqdm bar over stages when asked."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False)
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 4)
        self._last = now
        self.bar.set_postfix_str(stage)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: encoding allocates millions of small lists (no cycles), and
    each collection would walk every object the caller holds -- 6% of the time with 300K rows loaded."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _encode_all(
    texts: Iterable[str], encoder: _Encoder, total: int, progress: bool, desc: str
) -> list[Encoded]:
    return encoder.encode_many(
        tqdm(texts, total=total, desc=desc, disable=not progress or total < 10_000, leave=False)
    )


def dedup(
    rows: Sequence[Mapping[str, Any]],
    against: Sequence[Mapping[str, Any]] | None = None,
    *,
    text_fields: Sequence[str] = FIELDS,
    threshold: float = 0.7,
    use_stemmer: bool = False,
    params: MinHashParams | None = None,
    progress: bool = False,
) -> DedupResult:
    """Keep one row per duplicate cluster of ``rows`` (rows near a row of ``against`` are all dropped).

    ``text_fields`` are compared together (their texts joined); "instruction"/"response" are read with
    `row_text`, so chat rows work. ``threshold`` is the ROUGE-L F1 that confirms a near-duplicate.
    """
    with _gc_paused():
        return _dedup_rows(rows, against or [], text_fields, threshold, use_stemmer, params, progress)


def _dedup_rows(
    rows: Sequence[Mapping[str, Any]],
    against: Sequence[Mapping[str, Any]],
    text_fields: Sequence[str],
    threshold: float,
    use_stemmer: bool,
    params: MinHashParams | None,
    progress: bool,
) -> DedupResult:
    params = params or MinHashParams()
    fields = _fields_of(against, text_fields, "against") + _fields_of(rows, text_fields, "pool")
    encoder = _Encoder(use_stemmer)
    stages = _Progress(progress, 5, "dedup")
    codes = _encode_all((t for f in fields for t in f), encoder, sum(map(len, fields)), progress, "encode")
    index = _DedupIndex.build(fields, len(against), codes, None, encoder, params, stages)
    kept, dropped, stats = index.resolve(None, threshold, stages)
    return DedupResult(kept=[rows[i] for i in kept], kept_indices=kept, dropped=dropped, stats=stats)


@dataclass
class _DedupIndex:
    """Exact groups and LSH band keys of the rows of `against` followed by the pool's rows ("global"
    indices). Built once; `resolve` then dedups any subset of the pool rows."""

    fields: list[tuple[str, ...]]
    n_against: int
    exact_rep: np.ndarray  # global index of the first row with the same texts
    unique: np.ndarray  # global indices of first occurrences; "docs" are numbered along it
    codes: list[Encoded]  # encoded fields, per_row per row
    per_row: int
    keys: np.ndarray  # (bands, docs)
    has_shingles: np.ndarray  # (docs,)
    params: MinHashParams

    @classmethod
    def build(
        cls,
        fields: list[tuple[str, ...]],
        n_against: int,
        codes: list[Encoded],  # the encoded fields of every row, row after row
        shingles: _RowShingles | None,  # the rows' shingles if already gathered
        encoder: _Encoder,
        params: MinHashParams,
        stages: _Progress,
    ) -> _DedupIndex:
        n = len(fields)
        per_row = len(fields[0]) if fields else 1
        first_of: dict[tuple[str, ...], int] = {}
        exact_rep = np.fromiter(
            (first_of.setdefault(f, i) for i, f in enumerate(fields)), dtype=np.int64, count=n
        )
        del first_of
        unique = np.flatnonzero(exact_rep == np.arange(n))
        doc_of_row = np.full(n, -1, dtype=np.int64)
        doc_of_row[unique] = np.arange(unique.size)
        stages.done("exact")
        keys = np.zeros((params.bands, unique.size), dtype=np.uint64)
        has_shingles = np.zeros(unique.size, dtype=bool)
        if unique.size > 1:
            if shingles is None:
                shingles = _RowShingles(params, n)
                for start, end in _chunks(n):
                    _, hashes, owner = _row_shingles(codes[per_row * start : per_row * end], encoder, params)
                    shingles.add(hashes, owner // per_row + start)
            common = shingles.common()
            for hashes, rows in shingles.chunks or cls._recomputed(codes, per_row, n, encoder, params):
                docs = doc_of_row[rows]
                mine = docs >= 0  # exact copies add nothing
                if not mine.any():
                    continue
                first, last = int(docs[mine].min()), int(docs[mine].max()) + 1
                owner = docs[mine] - first
                kept_hashes, owner = _drop_common(hashes[mine], owner, last - first, common, True)
                signatures = _signatures(kept_hashes, owner, last - first, params.num_perm)
                keys[:, first:last] = _band_keys(signatures, params)
                has_shingles[first:last] = signatures[:, 0] != _EMPTY
        stages.done("minhash")
        return cls(fields, n_against, exact_rep, unique, codes, per_row, keys, has_shingles, params)

    @staticmethod
    def _recomputed(
        codes: list[Encoded], per_row: int, n: int, encoder: _Encoder, params: MinHashParams
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start, end in _chunks(n):
            _, hashes, owner = _row_shingles(codes[per_row * start : per_row * end], encoder, params)
            yield hashes, owner // per_row + start

    def docs_of(self, *columns: np.ndarray) -> list[np.ndarray]:
        """The joined encoded texts of the docs in each column (object arrays): each distinct doc built once,
        by numpy on object arrays (no Python call per pair)."""
        needed = _sorted_unique(np.concatenate(columns)) if columns else np.zeros(0, dtype=np.int64)
        codes = np.empty(len(self.codes), dtype=object)
        codes[:] = self.codes
        rows = self.unique[needed] * self.per_row
        parts = [codes[rows + k] for k in range(self.per_row)]
        if all(_all_str(part) for part in parts):
            docs = functools.reduce(np.add, parts)  # str + str in numpy's object loop
        else:
            docs = np.empty(needed.size, dtype=object)
            docs[:] = [_join(fields) for fields in zip(*parts, strict=True)]
        position = np.zeros(self.unique.size, dtype=np.int64)
        position[needed] = np.arange(needed.size)
        return [docs[position[column]] for column in columns]

    def resolve(
        self, active_pool: np.ndarray | None, threshold: float, stages: _Progress
    ) -> tuple[list[int], list[DuplicateDrop], dict[str, Any]]:
        """Dedup the pool rows where ``active_pool`` is True (all when None); pool-relative indices."""
        n, n_against, unique = len(self.fields), self.n_against, self.unique
        active = np.ones(n, dtype=bool)
        if active_pool is not None:
            active[n_against:] = active_pool
        is_pool = unique >= n_against
        usable = active[unique] & self.has_shingles
        pool_members = np.flatnonzero(is_pool & usable)
        codes = [np.zeros(0, dtype=np.int64)]
        if pool_members.size:
            digest = lambda d: _content_digest(self.fields[unique[d]])  # noqa: E731
            codes.append(_self_pairs(self.keys, pool_members, digest, self.params.max_bucket))
            against_members = np.flatnonzero(~is_pool & usable)
            if against_members.size:
                index = _KeyIndex(self.keys[:, against_members], against_members)
                for start, end in _chunks(pool_members.size):
                    members = pool_members[start:end]
                    a, b = index.query(self.keys[:, members], members)
                    codes.append(_sorted_unique(b * unique.size + a))  # b (against) < a (pool)
        candidates = _sorted_unique(np.concatenate(codes))
        stages.done("lsh_pairs")

        low, high = np.divmod(candidates, max(unique.size, 1))
        left, right = self.docs_of(low, high)
        left_len = np.fromiter(map(len, left), np.float64, len(left))
        right_len = np.fromiter(map(len, right), np.float64, len(right))
        # F1 grows with the LCS, which is at most the shorter text: pairs of too different lengths cannot
        # reach the threshold and need no LCS (the margin covers rounding; their score stays 0 here)
        bound = _f1(np.minimum(left_len, right_len), left_len, right_len)
        possible = np.flatnonzero(bound >= threshold - 1e-9 if _LENGTH_BOUND else bound >= -1)
        scores = np.zeros(low.size, dtype=np.float64)
        scores[possible] = _f1_pairs(left[possible].tolist(), right[possible].tolist())
        confirmed = scores >= threshold
        stages.done("rouge_l")

        roots = _components(n, self.exact_rep, unique[low[confirmed]], unique[high[confirmed]])
        doc_of = np.full(n, -1, dtype=np.int64)
        doc_of[unique] = np.arange(unique.size)
        pool_rows = np.flatnonzero(active[n_against:]) + n_against
        dropped_g = pool_rows[roots[pool_rows] != pool_rows]
        near = dropped_g[self.exact_rep[dropped_g] != roots[dropped_g]]
        near_scores = _f1_pairs(
            *(docs.tolist() for docs in self.docs_of(doc_of[self.exact_rep[near]], doc_of[roots[near]]))
        )
        score_of = dict(zip(near.tolist(), near_scores.tolist(), strict=True))
        dropped = []
        for g, root in zip(dropped_g.tolist(), roots[dropped_g].tolist(), strict=True):
            from_against = root < n_against
            dropped.append(
                DuplicateDrop(
                    index=g - n_against,
                    reason="near_duplicate" if g in score_of else "exact_duplicate",
                    duplicate_of=root if from_against else root - n_against,
                    duplicate_of_source="against" if from_against else "pool",
                    score=score_of.get(g, 1.0),
                )
            )
        kept = (pool_rows[roots[pool_rows] == pool_rows] - n_against).tolist()
        stages.done("clusters")
        stages.close()
        stats = {
            "unique_texts": int(unique.size),
            "candidate_pairs": int(candidates.size),
            "confirmed_pairs": int(confirmed.sum()),
            "seconds": stages.seconds,
        }
        return kept, dropped, stats


def _components(n: int, exact_rep: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Root (smallest member) of every row's cluster; clusters join exact copies and confirmed pairs."""
    parent = exact_rep.tolist()  # an exact copy points at its first occurrence, which is a root

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(left.tolist(), right.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array(parent, dtype=np.int64)
    while True:  # pointer jumping until every row points at its root
        jumped = roots[roots]
        if np.array_equal(jumped, roots):
            return roots
        roots = jumped


def _join(parts: Sequence[Encoded]) -> Encoded:
    if _all_str(parts):
        return "".join(parts)  # type: ignore[arg-type]
    return tuple(i for p in parts for i in _as_ids(p))


# --------------------------------------------------------------------------------------------------
# Decontamination
# --------------------------------------------------------------------------------------------------

RULES = ("exact_match", "rouge_l", "ngram_13", "ngram_containment")


@dataclass(frozen=True)
class Contamination:
    """Why a row was dropped: which field of it is near which field of which test item."""

    index: int  # position in the rows given to decontaminate
    rule: str  # one of RULES (the first that matched, in that order)
    test_index: int
    test_id: Any  # the test row's "id", or its index when it has none
    field: str  # "instruction" | "response" (of the row)
    test_field: str  # "instruction" | "response" (of the test item)
    score: float  # 1.0 | ROUGE-L F1 | share of the test text's distinctive 8-grams found in the row field


@dataclass
class DecontamResult:
    kept: list[dict[str, Any]]
    kept_indices: list[int]
    dropped: list[Contamination]
    stats: dict[str, Any] = field(default_factory=dict, compare=False)  # timings, counts

    def counts(self) -> dict[str, int]:
        counts = {"input": len(self.kept) + len(self.dropped), "kept": len(self.kept)} | dict.fromkeys(
            RULES, 0
        )
        for drop in self.dropped:
            counts[drop.rule] += 1
        return counts


@dataclass(frozen=True)
class DecontamParams:
    rouge_threshold: float = 0.7
    min_tokens: int = 8  # both texts need this many tokens for the ROUGE-L rule
    span: int = 13  # ngram_13: shared span length in tokens
    containment_ngram: int = 8
    containment_threshold: float = 0.5
    boilerplate_df: int = 3  # an 8-gram in this many test items is template text, not evidence
    minhash: MinHashParams = field(default_factory=MinHashParams)

    def __post_init__(self) -> None:
        if self.span < self.containment_ngram:
            raise ValueError(f"span ({self.span}) must be >= containment_ngram ({self.containment_ngram})")


def decontaminate(
    rows: Sequence[Mapping[str, Any]],
    test_rows: Sequence[Mapping[str, Any]],
    *,
    params: DecontamParams | None = None,
    use_stemmer: bool = False,
    progress: bool = False,
) -> DecontamResult:
    """Drop rows whose instruction or response is near a test item's instruction or response."""
    pool_fields = _fields_of(rows, FIELDS, "pool")
    test_fields = _fields_of(test_rows, FIELDS, "test")
    with _gc_paused():
        encoder = _Encoder(use_stemmer)
        encoded = _encode_all(
            (t for f in pool_fields for t in f), encoder, 2 * len(rows), progress, "encode pool"
        )
        test_encoded = [encoder.encode(text) for f in test_fields for text in f]
        return _decontaminate(
            rows, encoded, test_rows, test_encoded, encoder, params or DecontamParams(), progress
        )


def _decontaminate(
    rows: Sequence[Mapping[str, Any]],
    pool_encoded: list[Encoded],  # [instruction 0, response 0, instruction 1, ...]
    test_rows: Sequence[Mapping[str, Any]],
    test_encoded: list[Encoded],  # same layout
    encoder: _Encoder,
    params: DecontamParams,
    progress: bool,
    ready: Iterable[tuple[int, int]] | None = None,  # ranges of pool_encoded as they become encoded
    gathered: _RowShingles | None = None,  # collects the pool rows' shingles for dedup on the way
    row_offset: int = 0,  # index of pool row 0 in `gathered`
) -> DecontamResult:
    stages = _Progress(progress, 4, "decontaminate")
    test_ids = [row.get("id", i) if isinstance(row, Mapping) else i for i, row in enumerate(test_rows)]
    # evidence[row] = (rule priority, -score, test field index, pool field index, score)
    evidence: dict[int, tuple[int, float, int, int, float]] = {}

    def found(rule: str, pool_field: int, test_field: int, score: float) -> None:
        candidate = (RULES.index(rule), -score, test_field, pool_field % 2, score)
        row = pool_field // 2
        if row not in evidence or candidate < evidence[row]:
            evidence[row] = candidate

    side = _TestSide.build(test_encoded, encoder, params) if test_rows else None
    if ready is None:
        ready = [(0, len(pool_encoded))]
    scan = _PoolScan(side, encoder, params, gathered, row_offset) if side is not None else None
    for start, end in ready:
        if scan is not None:
            scan.add(pool_encoded, start, end)
    stages.done("scan")
    n_rows = len(rows)
    test_instruction: dict[Encoded, int] = {}
    for t in range(len(test_rows)):
        if len(test_encoded[2 * t]):
            test_instruction.setdefault(test_encoded[2 * t], 2 * t)
    for r in range(n_rows):
        hit = test_instruction.get(pool_encoded[2 * r])
        if hit is not None:
            found("exact_match", 2 * r, hit, 1.0)
    if scan is not None and side is not None:
        _rouge_rule(scan.candidates(), pool_encoded, test_encoded, params, found)
        _ngram_rules(scan.matches(), pool_encoded, side, params, found)
    stages.done("rules")

    dropped = [
        Contamination(
            index=row,
            rule=RULES[priority],
            test_index=test_field // 2,
            test_id=test_ids[test_field // 2],
            field=FIELDS[pool_side],
            test_field=FIELDS[test_field % 2],
            score=score,
        )
        for row, (priority, _, test_field, pool_side, score) in sorted(evidence.items())
    ]
    kept_indices = [r for r in range(n_rows) if r not in evidence]
    stages.done("report")
    stages.close()
    return DecontamResult(
        kept=[rows[r] for r in kept_indices],
        kept_indices=kept_indices,
        dropped=dropped,
        stats={"seconds": stages.seconds},
    )


@dataclass
class _TestSide:
    """What pool texts are compared with: LSH keys of the test texts and their distinctive n-grams."""

    encoded: list[Encoded]
    boilerplate: np.ndarray | None  # bucket table of template shingles (shared by several test items)
    index: _KeyIndex | None  # band keys of the test texts with >= min_tokens tokens
    e_hash: np.ndarray  # evidence n-grams: hash (sorted), test field, start position in the field
    e_field: np.ndarray
    e_pos: np.ndarray
    distinct_per_field: np.ndarray  # distinct evidence n-grams of each test field
    bitmap: np.ndarray  # prefilter on the high bits of e_hash
    shift: np.uint64

    @classmethod
    def build(cls, test_encoded: list[Encoded], encoder: _Encoder, params: DecontamParams) -> _TestSide:
        lengths = np.fromiter(map(len, test_encoded), np.int64, len(test_encoded))
        long_test = np.flatnonzero(lengths >= params.min_tokens)
        boilerplate, index = None, None
        if long_test.size:
            texts = [test_encoded[i] for i in long_test.tolist()]
            # boilerplate = shingles shared by several test items (their templates); near-copies of ONE
            # test item in the pool cannot turn its text into boilerplate this way
            boilerplate = _test_boilerplate(
                texts, long_test // 2, encoder, params.minhash, params.boilerplate_df
            )
            keys = [k for _, _, k, _ in _band_key_chunks(texts, encoder, params.minhash, boilerplate, False)]
            index = _KeyIndex(np.concatenate(keys, axis=1), long_test)

        # Evidence for the n-gram rules: n-grams present in >= boilerplate_df distinct test items are
        # template text, so is every token they cover, and evidence n-grams must not touch template text.
        n = params.containment_ngram
        tokens = _TokenArrays.of(test_encoded, encoder)
        t_hash, t_field, t_pos = _ngrams(tokens, n, short_texts=False)
        distinct_hashes, df = _runs(_distinct_pairs(t_hash, t_field // 2)[0])
        boiler = np.isin(t_hash, distinct_hashes[df >= params.boilerplate_df])
        cover = np.zeros(tokens.hashes.size + 1, dtype=np.int64)
        np.add.at(cover, t_pos[boiler], 1)
        np.add.at(cover, t_pos[boiler] + n, -1)
        template_prefix = np.r_[0, np.cumsum(np.cumsum(cover)[:-1] > 0)]
        evidence = template_prefix[t_pos + n] - template_prefix[t_pos] == 0
        order = np.flatnonzero(evidence)[np.argsort(t_hash[evidence], kind="stable")]
        e_hash, e_field = t_hash[order], t_field[order]
        e_pos = t_pos[order] - tokens.starts[e_field]
        distinct_per_field = np.bincount(_distinct_pairs(e_field, e_hash)[0], minlength=len(test_encoded))
        bits = max(16, min(24, int(e_hash.size).bit_length() + 6))
        shift = np.uint64(64 - bits)
        bitmap = np.zeros(1 << bits, dtype=bool)
        bitmap[(e_hash >> shift).astype(np.intp)] = True
        return cls(
            test_encoded, boilerplate, index, e_hash, e_field, e_pos, distinct_per_field, bitmap, shift
        )


class _PoolScan:
    """Pool texts compared with the test side, range by range: LSH candidates (codes pool field * test
    fields + test field) for the ROUGE-L rule, and (pool field, evidence n-gram) matches for the n-gram
    rules. The rows' shingles are handed to ``rows`` on the way, for dedup."""

    def __init__(
        self,
        side: _TestSide,
        encoder: _Encoder,
        params: DecontamParams,
        rows: _RowShingles | None = None,
        row_offset: int = 0,
    ):
        self.side, self.encoder, self.params = side, encoder, params
        self.rows, self.row_offset = rows, row_offset
        self._codes: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        self._match_field: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        self._match_at: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]

    def add(self, pool_encoded: list[Encoded], start: int, end: int) -> None:
        """Scan fields [start, end) of pool_encoded (instruction, response, instruction, ...)."""
        side, params = self.side, self.params
        n, n_test, minhash = params.containment_ngram, len(side.encoded), params.minhash
        for first, last in _chunks(end - start):  # chunks of an even size: rows stay whole
            offset = start + first
            tokens, hashes, owner = _row_shingles(pool_encoded[offset : start + last], self.encoder, minhash)
            if self.rows is not None:
                self.rows.add(hashes, (owner + offset) // 2 + self.row_offset)
            long = tokens.lengths >= params.min_tokens
            if side.index is not None and long.any():
                position = np.cumsum(long) - 1
                mine = long[owner]
                long_hashes, long_owner = _drop_common(
                    hashes[mine], position[owner[mine]], int(position[-1]) + 1, side.boilerplate, False
                )
                signatures = _signatures(long_hashes, long_owner, int(position[-1]) + 1, minhash.num_perm)
                pool_f, test_f = side.index.query(
                    _band_keys(signatures, minhash), np.flatnonzero(long) + offset
                )
                self._codes.append(_sorted_unique(pool_f * n_test + test_f))
            if side.e_hash.size:
                p_hash, p_owner, _ = _ngrams(tokens, n, short_texts=False)
                maybe = np.flatnonzero(side.bitmap[(p_hash >> side.shift).astype(np.intp)])
                lo = np.searchsorted(side.e_hash, p_hash[maybe], side="left")
                count = np.searchsorted(side.e_hash, p_hash[maybe], side="right") - lo
                which, at = _expand(lo, count)
                self._match_field.append(p_owner[maybe[which]] + offset)
                self._match_at.append(at)

    def candidates(self) -> np.ndarray:
        return _sorted_unique(np.concatenate(self._codes))

    def matches(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self._match_field), np.concatenate(self._match_at)


def _rouge_rule(
    candidates: np.ndarray,
    pool_encoded: list[Encoded],
    test_encoded: list[Encoded],
    params: DecontamParams,
    found: Callable[[str, int, int, float], None],
) -> None:
    pool_field, test_field = np.divmod(candidates, max(len(test_encoded), 1))
    scores = _f1_pairs(
        [test_encoded[i] for i in test_field.tolist()], [pool_encoded[i] for i in pool_field.tolist()]
    )
    for k in np.flatnonzero(scores >= params.rouge_threshold).tolist():
        found("rouge_l", int(pool_field[k]), int(test_field[k]), float(scores[k]))


def _ngram_rules(
    matches: tuple[np.ndarray, np.ndarray],
    pool_encoded: list[Encoded],
    side: _TestSide,
    params: DecontamParams,
    found: Callable[[str, int, int, float], None],
) -> None:
    """Shared-span and containment rules, estimated from the hashed matches and verified exactly."""
    pool_f, at = matches
    if not at.size:
        return
    n, n_test = params.containment_ngram, len(side.encoded)
    pair = pool_f.astype(np.int64) * n_test + side.e_field[at]
    # containment estimate per (pool field, test field): distinct evidence hashes matched / distinct in test
    pairs, matched = _runs(_distinct_pairs(pair, side.e_hash[at])[0])
    share = matched / np.maximum(side.distinct_per_field[pairs % n_test], 1)
    # a shared span of `span` tokens shows up as span - n + 1 consecutive matched test positions
    run = params.span - n + 1
    pair_of, position = _distinct_pairs(pair, side.e_pos[at])
    starts = np.flatnonzero(
        (pair_of[run - 1 :] == pair_of[: pair_of.size - run + 1])
        & (position[run - 1 :] - position[: position.size - run + 1] == run - 1)
    )
    span_start: dict[int, list[int]] = {}
    for code, first in zip(pair_of[starts].tolist(), position[starts].tolist(), strict=True):
        span_start.setdefault(code, []).append(first)
    flagged = set(span_start) | set(pairs[share >= params.containment_threshold].tolist())
    evidence_grams: dict[int, set[Encoded]] = {}
    for code in sorted(flagged):
        pf, tf = divmod(code, n_test)
        hay, needle = pool_encoded[pf], side.encoded[tf]
        if tf not in evidence_grams:
            evidence_grams[tf] = {needle[p : p + n] for p in side.e_pos[side.e_field == tf].tolist()}
        grams = evidence_grams[tf]
        exact_share = sum(1 for gram in grams if _contains(hay, gram)) / max(len(grams), 1)
        if any(_contains(hay, needle[p : p + params.span]) for p in span_start.get(code, [])):
            found("ngram_13", pf, tf, exact_share)
        elif exact_share >= params.containment_threshold:
            found("ngram_containment", pf, tf, exact_share)


def _contains(hay: Encoded, needle: Encoded) -> bool:
    if isinstance(hay, str) and isinstance(needle, str):
        return needle in hay
    hay_ids, needle_ids = _as_ids(hay), _as_ids(needle)
    k = len(needle_ids)
    return any(hay_ids[i : i + k] == needle_ids for i in range(len(hay_ids) - k + 1))


# --------------------------------------------------------------------------------------------------
# Clean = decontaminate + dedup
# --------------------------------------------------------------------------------------------------


@dataclass
class CleanResult:
    kept: list[dict[str, Any]]
    kept_indices: list[int]  # positions in the pool
    decontamination: DecontamResult | None
    dedup: DedupResult  # indices in it are positions in the pool too

    def report(self, examples: int = 3, pool: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Counts per rule, timings, and a few dropped examples (texts shown when ``pool`` is given)."""
        counts: dict[str, Any] = {
            "input": len(self.kept)
            + len(self.dedup.dropped)
            + (len(self.decontamination.dropped) if self.decontamination else 0),
            "kept": len(self.kept),
            "dropped": {"exact_duplicate": 0, "near_duplicate": 0}
            | {f"contaminated:{rule}": 0 for rule in RULES},
        }
        for drop in self.dedup.dropped:
            counts["dropped"][drop.reason] += 1
        for c in self.decontamination.dropped if self.decontamination else []:
            counts["dropped"][f"contaminated:{c.rule}"] += 1

        def text(index: int) -> dict[str, str]:
            if pool is None:
                return {}
            instruction, response = row_text(pool[index])
            return {"instruction": instruction[:200], "response": response[:200]}

        shown: dict[str, list[dict[str, Any]]] = {}
        for drop in self.dedup.dropped:
            bucket = shown.setdefault(drop.reason, [])
            if len(bucket) < examples:
                bucket.append(
                    {
                        "index": drop.index,
                        "duplicate_of": drop.duplicate_of,
                        "duplicate_of_source": drop.duplicate_of_source,
                        "score": round(drop.score, 4),
                    }
                    | text(drop.index)
                )
        for c in self.decontamination.dropped if self.decontamination else []:
            bucket = shown.setdefault(f"contaminated:{c.rule}", [])
            if len(bucket) < examples:
                bucket.append(
                    {
                        "index": c.index,
                        "test_index": c.test_index,
                        "test_id": c.test_id,
                        "field": c.field,
                        "test_field": c.test_field,
                        "score": round(c.score, 4),
                    }
                    | text(c.index)
                )
        seconds = {"dedup": self.dedup.stats.get("seconds", {})}
        if self.decontamination:
            seconds["decontaminate"] = self.decontamination.stats.get("seconds", {})
        return counts | {"examples": shown, "seconds": seconds}


def clean(
    pool: Sequence[Mapping[str, Any]],
    against: Sequence[Mapping[str, Any]] | None = None,
    test: Sequence[Mapping[str, Any]] | None = None,
    *,
    dedup_threshold: float = 0.7,
    decontam: DecontamParams | None = None,
    minhash: MinHashParams | None = None,
    use_stemmer: bool = False,
    progress: bool = False,
) -> CleanResult:
    """Decontaminate ``pool`` against ``test``, then dedup the rest (within itself and against ``against``).

    Tokenisation is shared between both steps. Indices in the result refer to positions in ``pool``.
    """
    with _gc_paused():
        return _clean(pool, against, test, dedup_threshold, decontam, minhash, use_stemmer, progress)


def _clean(
    pool: Sequence[Mapping[str, Any]],
    against: Sequence[Mapping[str, Any]] | None,
    test: Sequence[Mapping[str, Any]] | None,
    dedup_threshold: float,
    decontam: DecontamParams | None,
    minhash: MinHashParams | None,
    use_stemmer: bool,
    progress: bool,
) -> CleanResult:
    minhash = minhash or MinHashParams()
    decontam = decontam or DecontamParams(minhash=minhash)
    against, test = against or [], test or []
    encoder = _Encoder(use_stemmer)
    pool_fields = _fields_of(pool, FIELDS, "pool")
    against_fields = _fields_of(against, FIELDS, "against")
    test_fields = _fields_of(test, FIELDS, "test")
    test_encoded = encoder.encode_many([text for f in test_fields for text in f])
    n_against = len(against)

    # Decontamination runs in a second thread and scans the pool chunk by chunk as this thread encodes
    # it; this thread then builds the dedup index of every pool row. Both sides are mostly numpy work,
    # which releases the GIL. Dedup finally considers only the rows that decontamination kept.
    encoded: list[Encoded] = []
    ready: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()

    def encoded_ranges() -> Iterator[tuple[int, int]]:
        while (item := ready.get()) is not None:
            yield item

    n_rows = n_against + len(pool)
    gathered = _RowShingles(minhash, n_rows) if test else None
    with ThreadPoolExecutor(max_workers=1) as worker:
        pending = None
        if test:
            pending = worker.submit(
                _decontaminate,
                *(pool, encoded, test, test_encoded, encoder, decontam, progress),
                *(encoded_ranges(), gathered, n_against),
            )
        try:
            for start, end in tqdm(_chunks(len(pool)), desc="encode pool", disable=not progress, leave=False):
                encoded.extend(encoder.encode_many([text for f in pool_fields[start:end] for text in f]))
                ready.put((2 * start, 2 * end))
        finally:
            ready.put(None)
        against_codes = encoder.encode_many([text for f in against_fields for text in f])
        if gathered is not None:
            against_shingles = _RowShingles(minhash, n_rows)
            for start, end in _chunks(n_against):
                _, hashes, owner = _row_shingles(against_codes[2 * start : 2 * end], encoder, minhash)
                against_shingles.add(hashes, owner // 2 + start)
        contamination = pending.result() if pending is not None else None
    if gathered is not None:
        gathered.merge(against_shingles)
    stages = _Progress(progress, 5, "dedup")
    fields = against_fields + pool_fields
    index = _DedupIndex.build(fields, n_against, against_codes + encoded, gathered, encoder, minhash, stages)
    active = np.ones(len(pool), dtype=bool)
    if contamination is not None:
        active[[c.index for c in contamination.dropped]] = False
    kept, dropped, stats = index.resolve(active, dedup_threshold, stages)
    deduplicated = DedupResult(kept=[pool[i] for i in kept], kept_indices=kept, dropped=dropped, stats=stats)
    return CleanResult(
        kept=deduplicated.kept, kept_indices=kept, decontamination=contamination, dedup=deduplicated
    )


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _read_rows(path: str | Path, source: str) -> list[dict[str, Any]]:
    return list(tqdm(iter_jsonl(path), desc=f"read {source}", unit=" rows", leave=False, disable=None))


def run_dedup_cli(
    pool: str | Path,
    against: str | Path | None,
    test: str | Path | None,
    out: str | Path,
    report_path: str | Path | None = None,
    *,
    dedup_threshold: float = 0.7,
    rouge_threshold: float = 0.7,
    use_stemmer: bool = False,
    examples: int = 3,
    stream: Any = None,
) -> dict[str, Any]:
    """`llamaduo dedup`: clean a pool JSONL file, write the kept rows unchanged, print and return a report."""
    stream = stream if stream is not None else sys.stdout
    paths = {"pool": pool, "against": against, "test": test}
    rows = {name: _read_rows(path, name) if path is not None else [] for name, path in paths.items()}
    started = time.perf_counter()
    try:
        result = clean(
            rows["pool"],
            rows["against"],
            rows["test"],
            dedup_threshold=dedup_threshold,
            decontam=DecontamParams(rouge_threshold=rouge_threshold),
            use_stemmer=use_stemmer,
            progress=True,
        )
    except RowError as exc:
        raise DataFileError(paths[exc.source], exc.index + 1, None, exc.problem) from None
    report = {
        "pool": str(pool),
        "against": str(against) if against is not None else None,
        "test": str(test) if test is not None else None,
        "out": str(out),
        "seconds_total": round(time.perf_counter() - started, 3),
    } | result.report(examples=examples, pool=rows["pool"])
    write_jsonl(out, result.kept)
    if report_path is not None:
        write_json(report_path, report)
    print(format_report(report), file=stream)
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"kept {report['kept']} of {report['input']} rows -> {report['out']}  ({report['seconds_total']} s)"
    ]
    for reason, count in report["dropped"].items():
        if count:
            lines.append(f"  dropped {count:>7}  {reason}")
    for reason, shown in report["examples"].items():
        lines.append(f"  e.g. {reason}:")
        for example in shown:
            what = {k: v for k, v in example.items() if k not in ("instruction", "response")}
            lines.append(f"    {what}")
            if "instruction" in example:
                lines.append(f"      instruction: {example['instruction'][:100]!r}")
    return "\n".join(lines)


def add_dedup_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``dedup`` on an argparse subparsers object; the handler is set as ``func``."""
    parser = subparsers.add_parser(
        "dedup",
        help="drop duplicate and test-contaminated rows from a JSONL pool",
        description="Decontaminate a JSONL pool against a test split, then keep one row per duplicate "
        "cluster (rows near an --against row are dropped). Kept rows are written unchanged.",
    )
    parser.add_argument(
        "--pool", required=True, help="JSONL rows to clean (instruction/response or messages)"
    )
    parser.add_argument("--against", help="JSONL rows already kept (they always win; not written)")
    parser.add_argument("--test", help="JSONL test split that must not leak into the pool")
    parser.add_argument("--out", required=True, help="JSONL file for the kept rows")
    parser.add_argument("--report", help="write the report as JSON here too")
    parser.add_argument(
        "--threshold", type=float, default=0.7, help="ROUGE-L F1 of a near-duplicate (default 0.7)"
    )
    parser.add_argument(
        "--test-threshold",
        type=float,
        default=0.7,
        help="ROUGE-L F1 to a test text that counts as contamination (default 0.7)",
    )
    parser.add_argument(
        "--stem", action="store_true", help="Porter-stem tokens for ROUGE-L (rouge-score use_stemmer)"
    )
    parser.set_defaults(func=_dedup_command)
    return parser


def _dedup_command(args: argparse.Namespace) -> int:
    run_dedup_cli(
        args.pool,
        args.against,
        args.test,
        args.out,
        args.report,
        dedup_threshold=args.threshold,
        rouge_threshold=args.test_threshold,
        use_stemmer=args.stem,
    )
    return 0
