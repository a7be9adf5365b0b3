"""T5 span corruption: the pretraining objective of masked-text pretraining on captions.

# n - tokens of one caption
`random_spans_noise_mask` is T5's (Raffel et al. 2020, `t5.data.preprocessors.random_spans_noise_mask`,
also in Hugging Face's `run_t5_mlm_flax.py`): about `noise_density` of the tokens are noise, cut into
spans of mean length `mean_span_length`; the text always starts with a kept span, and kept and noise
spans alternate. `span_corrupt` turns a caption's ids into T5's (inputs, targets) pair: each noise
span becomes one sentinel `<extra_id_k>` in the inputs, and the targets list the noise spans, each
after its sentinel; a trailing kept span leaves a final sentinel in the targets (T5's convention):

    words    I'm 18 ! And did this as my Senior Project . What does Reddit Think ?
    inputs   I'm 18 <extra_id_0> And did ... Project . What does <extra_id_1> Think <extra_id_2>
    targets  <extra_id_0> ! <extra_id_1> Reddit <extra_id_2> ?

Everything is a pure function of the ids and a numpy `Generator` (training seeds one per epoch
and row, so a resumed run corrupts exactly as an uninterrupted one).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from seesay.errors import SeesayError

NOISE_DENSITY = 0.15
MEAN_SPAN_LENGTH = 3.0


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """`num_items` split into `num_segments` non-empty runs at random: their lengths."""
    first = np.arange(num_items - 1) < (num_segments - 1)
    rng.shuffle(first)
    segment_id = np.cumsum(np.pad(first, (1, 0)))
    return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = NOISE_DENSITY,
                            mean_span_length: float = MEAN_SPAN_LENGTH) -> np.ndarray:
    """bool [length]: True at noise tokens (T5's random_spans_noise_mask).

    At least one token is noise and one is kept once length >= 2 (a single token is kept)."""
    if not 0.0 < noise_density < 1.0:
        raise SeesayError(f"noise density must be in (0, 1), not {noise_density}")
    if mean_span_length < 1:
        raise SeesayError(f"mean noise span length must be >= 1, not {mean_span_length}")
    orig = int(length)
    if orig <= 0:
        return np.zeros(0, dtype=bool)
    length = max(orig, 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_span_length)), 1)
    num_nonnoise = length - num_noise
    num_spans = min(num_spans, num_noise, num_nonnoise)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)  # kept, noise, kept, ...
    starts = np.cumsum(interleaved)[:-1]
    indicator = np.zeros(length, dtype=np.int64)
    indicator[starts] = 1
    is_noise = np.cumsum(indicator) % 2 == 1
    return is_noise[:orig]


def _replace_spans(ids: Sequence[int], mask: np.ndarray, sentinels: Sequence[int]) -> list[int]:
    """ids with each run of True in `mask` replaced by the next sentinel."""
    out: list[int] = []
    k = 0
    prev = False
    for tok, m in zip(ids, mask):
        if m and not prev:
            if k >= len(sentinels):
                raise SeesayError(f"span corruption needs more than the tokenizer's {len(sentinels)} sentinels "
                                  f"(a text of {len(ids)} tokens); shorten the captions (--max-len)")
            out.append(int(sentinels[k]))
            k += 1
        elif not m:
            out.append(int(tok))
        prev = bool(m)
    return out


def span_corrupt(ids: Sequence[int], sentinels: Sequence[int], rng: np.random.Generator, *,
                 noise_density: float = NOISE_DENSITY, mean_span_length: float = MEAN_SPAN_LENGTH
                 ) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one caption's ids (no bos / eos); `sentinels[k]` is `<extra_id_k>`'s id.

    An empty caption gives ([], []); a one-token caption is kept whole (inputs = the token,
    targets = [sentinels[0]]), as T5's mask never makes a lone token noise."""
    if not sentinels:
        raise SeesayError("span corruption needs a tokenizer with <extra_id_*> sentinels")
    mask = random_spans_noise_mask(len(ids), rng, noise_density, mean_span_length)
    return _replace_spans(ids, mask, sentinels), _replace_spans(ids, ~mask, sentinels)


def reconstruct(inputs: Sequence[int], targets: Sequence[int], sentinels: Sequence[int]) -> list[int]:
    """The original ids back from a `span_corrupt` pair (each sentinel in `inputs` gets its span)."""
    index = {int(s): k for k, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    current: int | None = None
    for tok in targets:
        if int(tok) in index:
            current = index[int(tok)]
            spans[current] = []
        elif current is not None:
            spans[current].append(int(tok))
    out: list[int] = []
    for tok in inputs:
        k = index.get(int(tok))
        out.extend(spans.get(k, []) if k is not None else [int(tok)])
    return out
