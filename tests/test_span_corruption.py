"""T5 span corruption: sentinels in order, noise share, exact reconstruction, short texts, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from seesay.errors import SeesayError
from seesay.span_corruption import random_spans_noise_mask, reconstruct, span_corrupt

SENTINELS = list(range(1099, 999, -1))  # <extra_id_0> is the highest id, as in T5


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


@pytest.mark.parametrize("length", [20, 57, 200, 513])
def test_noise_share_and_mean_span_length(length):
    rng = np.random.default_rng(0)
    masks = [random_spans_noise_mask(length, rng) for _ in range(50)]
    share = np.mean([m.mean() for m in masks])
    assert abs(share - 0.15) < 0.03
    assert all(not m[0] for m in masks)  # a text always starts with a kept span
    lengths = [b - a for m in masks for a, b in _spans(m)]
    if length >= 100:
        assert 2.0 <= np.mean(lengths) <= 4.0


def test_sentinels_in_order_and_reconstruction():
    rng = np.random.default_rng(5)
    for n in [2, 3, 7, 16, 40, 120]:
        ids = list(range(10, 10 + n))
        inputs, targets = span_corrupt(ids, SENTINELS, rng)
        used_in = [t for t in inputs if t in SENTINELS]
        used_out = [t for t in targets if t in SENTINELS]
        assert used_in == SENTINELS[:len(used_in)] and len(used_in) >= 1
        assert used_out == SENTINELS[:len(used_out)]
        assert targets[0] == SENTINELS[0]
        assert reconstruct(inputs, targets, SENTINELS) == ids
        noise = [t for t in targets if t not in SENTINELS]
        assert len(noise) == round(max(n, 2) * 0.15) or len(noise) == 1 or n <= 3
        assert len(inputs) - len(used_in) + len(noise) == n


def test_issue_example_shape():
    words = "I'm 18 ! And did this as my Senior Project . What does Reddit Think ?".split()
    ids = list(range(len(words)))
    inputs, targets = span_corrupt(ids, SENTINELS, np.random.default_rng(1))
    assert reconstruct(inputs, targets, SENTINELS) == ids
    # the targets end with a sentinel exactly when the text ends with a kept token
    ends_with_kept = inputs[-1] not in SENTINELS
    assert (targets[-1] in SENTINELS) == ends_with_kept


def test_short_texts():
    rng = np.random.default_rng(0)
    assert span_corrupt([], SENTINELS, rng) == ([], [])
    assert span_corrupt([7], SENTINELS, rng) == ([7], [SENTINELS[0]])
    inputs, targets = span_corrupt([7, 8], SENTINELS, rng)
    assert inputs == [7, SENTINELS[0]] and targets == [SENTINELS[0], 8]


def test_deterministic_per_seed():
    ids = list(range(50))
    a = span_corrupt(ids, SENTINELS, np.random.default_rng(3))
    b = span_corrupt(ids, SENTINELS, np.random.default_rng(3))
    others = {tuple(span_corrupt(ids, SENTINELS, np.random.default_rng(s))[0]) for s in range(10)}
    assert a == b and len(others) > 1


def test_needs_sentinels_and_enough_of_them():
    with pytest.raises(SeesayError, match="sentinels"):
        span_corrupt([1, 2, 3], [], np.random.default_rng(0))
    with pytest.raises(SeesayError, match="sentinels"):
        span_corrupt(list(range(400)), SENTINELS[:3], np.random.default_rng(0))
