"""Corpus BLEU-1..4 exactly as pycocoevalcap 1.2 computes it (``Bleu(4)``, option "closest").

Input is already tokenised text (tokens separated by whitespace). Per image: clipped n-gram
matches against the maximum count over that image's references, and the reference length
*closest* to the candidate length (ties go to the shorter reference). Corpus score: the
n-gram matches and lengths are summed over all images first, then combined once (a corpus
BLEU, not a mean of sentence BLEUs), with the same tiny/small constants pycocoevalcap uses,
so an empty candidate scores 0 rather than raising.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

_SMALL = 1e-9
_TINY = 1e-15


def _ngrams(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter(zip(words))
    for k in range(2, n + 1):
        counts.update(zip(*[words[i:] for i in range(k)]))
    return counts


def _combine(
    correct: Sequence[float], guess: Sequence[float], testlen: float, reflen: float, n: int
) -> list[float]:
    out = []
    bleu = 1.0
    for k in range(n):
        bleu *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
        out.append(bleu ** (1.0 / (k + 1)))
    ratio = (testlen + _TINY) / (reflen + _SMALL)
    if ratio < 1:
        bp = math.exp(1 - 1 / ratio)
        out = [b * bp for b in out]
    return out


def bleu_stats(
    candidate: str, references: Sequence[str], n: int = 4
) -> tuple[int, int, list[int], list[int]]:
    """(testlen, closest reflen, guess[n], correct[n]) for one tokenised candidate."""
    maxcounts: dict = {}
    reflens = []
    for ref in references:
        words = ref.split()
        reflens.append(len(words))
        for ngram, count in _ngrams(words, n).items():
            if count > maxcounts.get(ngram, 0):
                maxcounts[ngram] = count
    words = candidate.split()
    testlen = len(words)
    reflen = min((abs(rl - testlen), rl) for rl in reflens)[1]
    guess = [max(0, testlen - k + 1) for k in range(1, n + 1)]
    correct = [0] * n
    for ngram, count in _ngrams(words, n).items():
        correct[len(ngram) - 1] += min(maxcounts.get(ngram, 0), count)
    return testlen, reflen, guess, correct


def bleu_score(
    gts: Mapping[object, Sequence[str]], res: Mapping[object, Sequence[str] | str], n: int = 4
) -> tuple[list[float], list[np.ndarray]]:
    """Corpus BLEU-1..n and per-image BLEU-1..n (arrays in ``gts`` key order).

    ``res[k]`` may be a one-element list (pycocoevalcap's format) or a string.
    """
    total_test = total_ref = 0
    total_guess = [0] * n
    total_correct = [0] * n
    per_image = [[] for _ in range(n)]
    for key, refs in gts.items():
        cand = res[key]
        if not isinstance(cand, str):
            (cand,) = cand
        testlen, reflen, guess, correct = bleu_stats(cand, refs, n)
        total_test += testlen
        total_ref += reflen
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
        for k, b in enumerate(_combine(correct, guess, testlen, reflen, n)):
            per_image[k].append(b)
    corpus = _combine(total_correct, total_guess, total_test, total_ref, n)
    return corpus, [np.asarray(p, dtype=np.float64) for p in per_image]
