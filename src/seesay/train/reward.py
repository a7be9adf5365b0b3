"""The reward of self-critical training: CIDEr-D of sampled captions against every reference of
their image, computed by the metrics code (`seesay.metrics.CiderD`), with the corpus statistics of
the *training* references.

# r - sampled captions (rows), b - images
What the reference implementations (Rennie et al. 2017; ruotianluo/self-critical.pytorch, whose
`prepro_ngrams.py` builds the same table) do, and why:

- document frequencies and N (CIDEr-D's idf and its log(N) "reference length" term) come from the
  training references, once, not from the batch: with a batch of 10 images almost every n-gram
  is rare, and the reward would change with whatever else is in the batch. They are cached as
  DATA_DIR/cider_df_<split>.json (written atomically; recomputed when missing, or when the
  references, the scoring language, the metrics tokenizer's code or this file's format changed).
- an end-of-sentence word (`EOS_WORD`) ends every reference and every candidate that emitted
  `<end>`: a caption cut off at the length limit misses the n-grams ending in it and scores
  lower, so the policy learns to finish its sentences.
- captions are tokenised exactly as validation scores them (`seesay.metrics.tokenize_corpus`,
  the Python PTB tokenizer, or jieba for Chinese), after the captioner's tokenizer decoded them
  to text: the reward is the number validation reports, per caption.
- `bleu_weight` adds w * BLEU-4 (pycocoevalcap's per-image BLEU) to the reward (default 0).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seesay.metrics import CiderD, bleu_score, tokenize_corpus
from seesay.metrics.bleu import _ngrams  # the n-gram counter CiderD itself uses

log = logging.getLogger(__name__)

EOS_WORD = "<eos>"  # appended after tokenisation, so no tokenizer ever sees (or splits) it
DF_FORMAT = 1
NGRAM = 4


def tokenize_captions(captions: Sequence[Sequence[str]], lang: str) -> list[list[str]]:
    """Each image's captions tokenised as the metrics code does (tokens joined by spaces)."""
    out = tokenize_corpus(dict(enumerate(captions)), lang=lang, tokenizer="python")
    return [out[i] for i in range(len(captions))]


def with_eos(tokenized: str) -> str:
    return f"{tokenized} {EOS_WORD}" if tokenized else EOS_WORD


def document_frequencies(references: Sequence[Sequence[str]], lang: str) -> tuple[dict[tuple[str, ...], float], int]:
    """(df, N): in how many images' references each 1..4-gram occurs (counted once per image, as
    `CiderD` counts them), over `references` (one list of raw sentences per image), with the
    end-of-sentence word appended to every reference."""
    df: dict[tuple[str, ...], float] = defaultdict(float)
    for refs in tokenize_captions(references, lang):
        for ngram in {g for ref in refs for g in _ngrams(with_eos(ref).split(), NGRAM)}:
            df[ngram] += 1
    return dict(df), len(references)


def _fingerprint(references: Sequence[Sequence[str]], lang: str) -> str:
    """What the counts depend on: the references, the language, and the metrics tokenizer's code."""
    import seesay.metrics.tokenize as metrics_tokenizer

    h = hashlib.sha256(json.dumps({"format": DF_FORMAT, "lang": lang, "eos": EOS_WORD, "n": NGRAM}).encode())
    h.update(Path(metrics_tokenizer.__file__).read_bytes())
    for refs in references:
        h.update(json.dumps(refs, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def load_document_frequencies(path: str | Path, references: Sequence[Sequence[str]], lang: str, *,
                              write: bool = True) -> tuple[dict[tuple[str, ...], float], int]:
    """`document_frequencies(references, lang)` through the cache file `path`: read when it was
    made from these references, else computed (and, with `write`, saved atomically; a data
    directory that cannot be written is only logged)."""
    from seesay.files import write_json_atomic

    path = Path(path)
    key = _fingerprint(references, lang)
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(cached, dict) and cached.get("fingerprint") == key:
            df = {tuple(k.split(" ")): float(v) for k, v in cached["df"].items()}
            return df, int(cached["num_documents"])
        log.info("%s was made from other references: recomputing it", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("%s is unreadable (%s): recomputing it", path, str(e).splitlines()[0] if str(e) else type(e).__name__)
    df, n = document_frequencies(references, lang)
    log.info("CIDEr-D document frequencies of %d training images: %d n-grams", n, len(df))
    if write:
        try:
            write_json_atomic(path, {"format": DF_FORMAT, "fingerprint": key, "lang": lang, "eos_word": EOS_WORD,
                                     "num_documents": n, "df": {" ".join(g): v for g, v in df.items()}})
        except OSError as e:
            log.warning("could not cache the CIDEr-D document frequencies in %s (%s); computed in memory",
                        path, e.strerror or e)
    return df, n


class CaptionReward:
    """reward(references, candidates, finished, image_of) -> [r] float64 rewards.

    `references`: each image's raw reference sentences; `candidates[i]`: the text of sample i
    (as the captioner's tokenizer decodes it), `finished[i]`: whether it emitted `<end>`,
    `image_of[i]`: the index of its image in `references`.
    """

    def __init__(self, document_frequency: dict[tuple[str, ...], float], num_documents: int, *, lang: str = "en",
                 bleu_weight: float = 0.0, sigma: float = 6.0) -> None:
        self.num_documents = int(num_documents)
        self.lang, self.bleu_weight = lang, float(bleu_weight)
        # the idf table is built once (millions of n-grams on COCO); each batch only adds its references
        self._corpus = CiderD({}, sigma=sigma, document_frequency=document_frequency, num_documents=num_documents)

    def scorer(self, references: dict[int, list[str]]) -> CiderD:
        """`CiderD` with the training statistics and these (tokenised) references."""
        return self._corpus.with_references(references)

    def __call__(self, references: Sequence[Sequence[str]], candidates: Sequence[str], finished: Sequence[bool],
                 image_of: Sequence[int]) -> np.ndarray:
        refs = {b: [with_eos(r) for r in rs] for b, rs in enumerate(tokenize_captions(references, self.lang))}
        cands = [with_eos(c[0]) if done else c[0]
                 for c, done in zip(tokenize_captions([[c] for c in candidates], self.lang), finished)]
        keys = [int(b) for b in image_of]
        reward = self.scorer(refs).score_many(keys, cands)
        if self.bleu_weight:
            _, per = bleu_score({i: refs[b] for i, b in enumerate(keys)}, dict(enumerate(cands)))
            reward = reward + self.bleu_weight * per[3]
        return reward

    @classmethod
    def for_training_data(cls, data_dir: str | Path, split: str, references: Sequence[Sequence[str]], *,
                          lang: str, bleu_weight: float = 0.0, write: bool = True) -> CaptionReward:
        """The reward with DATA_DIR/cider_df_<split>.json's statistics (made when needed)."""
        df, n = load_document_frequencies(Path(data_dir) / f"cider_df_{split}.json", references, lang, write=write)
        return cls(df, n, lang=lang, bleu_weight=bleu_weight)


def describe(reward: Any) -> str:
    return (f"CIDEr-D (df of {reward.num_documents} training images)"
            + (f" + {reward.bleu_weight:g} x BLEU-4" if reward.bleu_weight else ""))
