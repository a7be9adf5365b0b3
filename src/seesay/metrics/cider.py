"""CIDEr-D exactly as pycocoevalcap 1.2 computes it (its class is named ``Cider``).

pycocoevalcap 1.2's ``Cider`` (used by ``COCOEvalCap`` under the key "CIDEr") is the CIDEr-D
variant of Vedantam et al.: tf-idf vectors of 1..4-grams, with

* document frequencies counted over the references of the *evaluated* images (one count per
  image, whatever the number of references containing the n-gram), idf = log(N) - log(max(1, df))
  with N the number of evaluated images;
* clipping: the candidate's weight of an n-gram is capped by the reference's weight;
* a Gaussian length penalty exp(-delta^2 / (2 sigma^2)) with sigma = 6, where delta is
  the difference of the *bigram* counts of candidate and reference (pycocoevalcap counts the
  length with ``if n == 1`` on the 0-based n-gram order; kept for identical numbers);
* mean over n = 1..4, mean over references, times 10.

``CiderD`` precomputes the reference vectors once, so it can score many candidates per image
(e.g. as a reward for self-critical training) without recounting the references.
"""

from __future__ import annotations

import copy
import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np

from seesay.metrics.bleu import _ngrams


class _Vec:
    __slots__ = ("weights", "norms", "length")

    def __init__(self, weights: dict, norms: list[float], length: int):
        self.weights = weights
        self.norms = norms
        self.length = length


class CiderD:
    """CIDEr-D scorer with document frequencies from a reference corpus.

    ``references``: image id -> list of tokenised reference captions. By default the document
    frequencies and N come from these references (what COCO evaluation does); pass
    ``document_frequency`` and ``num_documents`` to use another corpus (e.g. the training set).
    """

    def __init__(
        self,
        references: Mapping[Hashable, Sequence[str]],
        *,
        n: int = 4,
        sigma: float = 6.0,
        document_frequency: Mapping[tuple, float] | None = None,
        num_documents: int | None = None,
    ):
        self.n = n
        self.sigma = sigma
        counted = {key: [_ngrams(ref.split(), n) for ref in refs] for key, refs in references.items()}
        if document_frequency is None:
            df: dict = defaultdict(float)
            for ref_counts in counted.values():
                for ngram in {g for c in ref_counts for g in c}:
                    df[ngram] += 1
            document_frequency = df
            num_documents = len(counted)
        elif num_documents is None:
            raise ValueError("num_documents is required with document_frequency")
        self.document_frequency = document_frequency
        self.ref_len = float(np.log(float(num_documents))) if num_documents else 0.0
        # idf of every n-gram seen in the corpus; unseen n-grams get ref_len (log(max(1, 0)) = 0)
        self._idf = {g: self.ref_len - math.log(max(1.0, d)) for g, d in document_frequency.items()}
        self._refs = {key: [self._vec(c) for c in ref_counts] for key, ref_counts in counted.items()}

    def with_references(self, references: Mapping[Hashable, Sequence[str]]) -> CiderD:
        """A scorer with these (tokenised) references and this one's document frequencies, N and idf
        table (the idf table of a large corpus is built once; SCST rewards score each batch against
        its own images' references with the training statistics)."""
        other = copy.copy(self)
        other._refs = {key: [self._vec(_ngrams(ref.split(), self.n)) for ref in refs]
                       for key, refs in references.items()}
        return other

    def _vec(self, counts: Counter) -> _Vec:
        weights = {}
        norms = [0.0] * self.n
        length = 0
        idf = self._idf
        ref_len = self.ref_len
        for ngram, tf in counts.items():
            w = float(tf) * idf.get(ngram, ref_len)
            weights[ngram] = w
            k = len(ngram) - 1
            norms[k] += w * w
            if k == 1:  # pycocoevalcap: the "length" is the number of bigrams
                length += tf
        return _Vec(weights, [math.sqrt(x) for x in norms], length)

    def score(self, key: Hashable, candidate: str) -> float:
        """CIDEr-D of one tokenised candidate against the references of ``key``."""
        hyp = self._vec(_ngrams(candidate.split(), self.n))
        refs = self._refs[key]
        n = self.n
        total = [0.0] * n
        two_sigma2 = 2 * self.sigma**2
        for ref in refs:
            val = [0.0] * n
            rw = ref.weights
            for ngram, wh in hyp.weights.items():
                wr = rw.get(ngram)
                if wr is not None:
                    val[len(ngram) - 1] += min(wh, wr) * wr
            delta = float(hyp.length - ref.length)
            penalty = math.exp(-(delta**2) / two_sigma2)
            for k in range(n):
                if hyp.norms[k] != 0 and ref.norms[k] != 0:
                    val[k] /= hyp.norms[k] * ref.norms[k]
                total[k] += val[k] * penalty
        return float(np.mean(total)) / len(refs) * 10.0

    def score_many(self, keys: Iterable[Hashable], candidates: Iterable[str]) -> np.ndarray:
        """Scores for parallel lists of image ids and candidates (ids may repeat)."""
        return np.asarray([self.score(k, c) for k, c in zip(keys, candidates)], dtype=np.float64)


def cider_score(
    gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str] | str]
) -> tuple[float, np.ndarray]:
    """Corpus CIDEr-D (mean) and per-image CIDEr-D (array in ``gts`` key order)."""
    scorer = CiderD(gts)
    cands = []
    for key in gts:
        cand = res[key]
        if not isinstance(cand, str):
            (cand,) = cand
        cands.append(cand)
    arr = scorer.score_many(list(gts), cands)
    return float(arr.mean()) if len(arr) else 0.0, arr
