"""ROUGE-L exactly as pycocoevalcap 1.2 computes it.

Per image: longest common subsequence between the candidate and each reference (tokens from
``str.split(" ")``, as pycocoevalcap does, so an empty caption is one empty token), precision and
recall each maximised over the references *separately*, then F with beta = 1.2. Corpus score
is the mean of the per-image scores. The LCS length is computed with a bit-parallel algorithm
(Hyyroe 2004), which gives the same integer as the dynamic programme, only faster.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

BETA = 1.2


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(b):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(b)) - 1
    v = full
    for tok in a:
        m = masks.get(tok)
        if m is None:
            continue
        u = v & m
        v = ((v + u) | (v - u)) & full
    return len(b) - bin(v).count("1")


def rouge_l(candidate: str, references: Sequence[str], beta: float = BETA) -> float:
    """ROUGE-L F for one tokenised candidate against its tokenised references."""
    token_c = candidate.split(" ")
    prec_max = rec_max = 0.0
    for ref in references:
        token_r = ref.split(" ")
        lcs = lcs_length(token_r, token_c)
        prec_max = max(prec_max, lcs / float(len(token_c)))
        rec_max = max(rec_max, lcs / float(len(token_r)))
    if prec_max != 0 and rec_max != 0:
        return ((1 + beta**2) * prec_max * rec_max) / float(rec_max + beta**2 * prec_max)
    return 0.0


def rouge_score(
    gts: Mapping[object, Sequence[str]], res: Mapping[object, Sequence[str] | str]
) -> tuple[float, np.ndarray]:
    """Corpus ROUGE-L (mean) and per-image ROUGE-L (array in ``gts`` key order)."""
    scores = []
    for key, refs in gts.items():
        cand = res[key]
        if not isinstance(cand, str):
            (cand,) = cand
        scores.append(rouge_l(cand, refs))
    arr = np.asarray(scores, dtype=np.float64)
    return float(arr.mean()) if len(arr) else 0.0, arr
