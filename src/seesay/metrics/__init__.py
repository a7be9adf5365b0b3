"""seesay.metrics: caption metrics computed exactly as the COCO caption evaluation does.

``compute_scores(results, references)`` gives BLEU-1..4, ROUGE-L and CIDEr-D in pure
Python/numpy (the fast path, for per-epoch validation), and with ``full=True`` also METEOR
and SPICE through pycocoevalcap's Java jars. ``CiderD`` scores many candidates against
precomputed references (a reward for self-critical training). See docs/metrics.md.
"""

from __future__ import annotations

from seesay.metrics.bleu import bleu_score
from seesay.metrics.cider import CiderD, cider_score
from seesay.metrics.core import (
    FAST_KEYS,
    METRIC_KEYS,
    ScoreReport,
    compute_scores,
    score_tokenized,
    tokenize_corpus,
)
from seesay.metrics.rouge import rouge_score
from seesay.metrics.tokenize import PUNCTUATIONS, ptb_tokenize, ptb_tokenize_lines

__all__ = [
    "FAST_KEYS",
    "METRIC_KEYS",
    "PUNCTUATIONS",
    "CiderD",
    "ScoreReport",
    "bleu_score",
    "cider_score",
    "compute_scores",
    "ptb_tokenize",
    "ptb_tokenize_lines",
    "rouge_score",
    "score_tokenized",
    "tokenize_corpus",
]
