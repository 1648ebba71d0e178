"""Near-duplicate detection for ingest: MinHash signatures of text shingles, LSH banding
to find candidate pairs, then an exact check of each candidate against its signature
estimate of Jaccard similarity.

Pure numpy; results depend only on the texts and their order (fixed seeds), never on the
run's shuffle seed.
"""
from __future__ import annotations

import re
import zlib

import numpy as np

from vpo_ray import schema

_SHIFT = np.uint64(32)
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
WORD_NGRAM = 3
CHAR_NGRAM = 5
MIN_WORDS = 5  # fewer words than this (or any CJK): character 5-grams instead of word 3-grams


def shingles(text: str) -> set[str]:
    """Word 3-grams of the normalised text; character 5-grams for short or CJK text.

    Word n-grams measure shared phrasing of sentence-length queries; a query of a few
    words (or CJK, written without spaces) has too few word 3-grams to compare, so it
    uses characters. The two kinds never match each other, so a 4-word and a 6-word
    query are never near duplicates; only exact dedup applies across that line.
    """
    t = schema.normalise_text(text)
    words = re.findall(r"\w+", t)
    if len(words) >= MIN_WORDS and not _CJK_RE.search(t):
        return {" ".join(words[i:i + WORD_NGRAM]) for i in range(len(words) - WORD_NGRAM + 1)}
    s = " ".join(words) or t
    if len(s) <= CHAR_NGRAM:
        return {"c:" + s}
    return {"c:" + s[i:i + CHAR_NGRAM] for i in range(len(s) - CHAR_NGRAM + 1)}


def minhash_signatures(texts: list[str], num_perm: int = 128, seed: int = 1, chunk: int = 256) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures: per permutation, min over shingles.

    A shingle's 32-bit CRC x is hashed by multiply-add-shift, h(x) = ((a*x + b) mod 2**64)
    >> 32 with random 64-bit a (odd) and b: a universal family (Dietzfelbinger) that is
    plain wrapping uint64 arithmetic in numpy, no slow 64-bit modulo. Small chunks keep
    the (num_perm, shingles) block in cache. `seed` is fixed (not the run's shuffle seed)
    so near-duplicate results do not change between runs.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2 ** 64 - 1, size=num_perm, dtype=np.uint64, endpoint=True)[:, None] | np.uint64(1)
    b = rng.integers(0, 2 ** 64 - 1, size=num_perm, dtype=np.uint64, endpoint=True)[:, None]
    sigs = np.empty((len(texts), num_perm), dtype=np.uint32)
    for lo in range(0, len(texts), chunk):
        sets = [shingles(t) for t in texts[lo:lo + chunk]]
        lengths = np.fromiter((len(s) for s in sets), dtype=np.int64, count=len(sets))
        x = np.fromiter((zlib.crc32(g.encode("utf-8")) for s in sets for g in s), dtype=np.uint64,
                        count=int(lengths.sum()))
        h = a * x[None, :]
        h += b
        h >>= _SHIFT
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        sigs[lo:lo + len(sets)] = np.minimum.reduceat(h, starts, axis=1).T
    return sigs


def lsh_bands(threshold: float, num_perm: int = 128, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows): the most rows per band that still makes a pair at `threshold` a
    candidate with probability >= `recall`. Candidates are then checked exactly against
    the signature estimate, so extra candidates cost time, not correctness."""
    for rows in sorted((r for r in range(1, num_perm + 1) if num_perm % r == 0), reverse=True):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def near_duplicates(texts: list[str], threshold: float, num_perm: int = 128) -> dict[int, tuple[int, float]]:
    """{i: (j, estimated Jaccard)} for each text i that is a near duplicate of an earlier kept text j.

    A text is compared with the texts kept before it (not with removed ones), so a chain
    a~b~c keeps a and drops b, and c only if c itself is close to a. Among several kept
    matches the most similar wins (ties: the earliest).
    """
    if not texts or threshold > 1.0:
        return {}
    if threshold <= 0:
        raise ValueError(f"near_dup_threshold must be in (0, 1] (or > 1 to switch off), got {threshold}")
    sigs = minhash_signatures(texts, num_perm)
    bands, rows = lsh_bands(threshold, num_perm)
    # One 64-bit key per band (a random linear mix of its rows): a rare key collision only
    # adds a candidate, which the signature check below then rejects.
    mix = np.random.default_rng(2).integers(1, 2 ** 63, size=rows, dtype=np.uint64) | np.uint64(1)
    keys = (sigs[:, :bands * rows].reshape(len(texts), bands, rows).astype(np.uint64) * mix).sum(axis=2).tolist()
    buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
    out: dict[int, tuple[int, float]] = {}
    for i, row_keys in enumerate(keys):
        cands = sorted({j for k, key in enumerate(row_keys) for j in buckets[k].get(key, ())})
        if cands:
            est = (sigs[cands] == sigs[i]).mean(axis=1)
            best = int(np.argmax(est))  # first maximum = earliest kept text
            if est[best] >= threshold:
                out[i] = (cands[best], float(est[best]))
                continue
        for k, key in enumerate(row_keys):
            buckets[k].setdefault(key, []).append(i)
    return out
