"""Location tokens: box -> <loc_i> tokens -> box, IoU, grounding scores, allowed-token lists."""

from __future__ import annotations

import random

import pytest

from seesay.locations import (
    allowed_token_ids,
    box_iou,
    box_to_bins,
    box_to_tokens,
    grounding_scores,
    img_tokens,
    loc_tokens,
    parse_loc_token,
    token_kind,
    tokens_to_box,
)


@pytest.mark.parametrize("bins", [1000, 100, 7])
def test_random_boxes_survive_within_one_bin(bins):
    rng = random.Random(bins)
    for _ in range(500):
        w, h = rng.randint(1, 1000), rng.randint(1, 1000)
        x0, x1 = sorted(rng.uniform(0, w) for _ in range(2))
        y0, y1 = sorted(rng.uniform(0, h) for _ in range(2))
        tokens = box_to_tokens((x0, y0, x1, y1), w, h, bins)
        assert len(tokens) == 4 and all(parse_loc_token(t) is not None for t in tokens)
        back = tokens_to_box(tokens, w, h, bins)
        for got, want, side in zip(back, (x0, y0, x1, y1), (w, h, w, h)):
            assert abs(got - want) <= side / bins / 2 + 1e-9  # half a bin: the bin centre


def test_edges_and_outside_coordinates():
    assert box_to_bins((0, 0, 640, 480), 640, 480, 1000) == (0, 0, 999, 999)  # the far edge is the last bin
    assert box_to_bins((-5, -1, 700, 500), 640, 480, 1000) == (0, 0, 999, 999)  # clamped into the image
    assert box_to_bins((320, 240, 320, 240), 640, 480, 10) == (5, 5, 5, 5)
    assert box_to_tokens((0, 0, 10, 10), 10, 10, 2) == ["<loc_0>", "<loc_0>", "<loc_1>", "<loc_1>"]
    assert tokens_to_box(["<loc_0>", "<loc_0>", "<loc_1>", "<loc_1>"], 10, 10, 2) == (2.5, 2.5, 7.5, 7.5)
    with pytest.raises(ValueError):
        box_to_bins((0, 0, 1, 1), 0, 10, 10)
    with pytest.raises(ValueError):
        box_to_bins((0, 0, 1, 1), 10, 10, 0)


def test_generated_answers_to_boxes():
    assert tokens_to_box("<loc_1> <loc_2> <loc_3> <loc_4> <end>", 100, 100, 10) == (15.0, 25.0, 35.0, 45.0)
    assert tokens_to_box("a red circle", 100, 100, 10) is None
    assert tokens_to_box(["<loc_1>", "<loc_2>", "<loc_3>"], 100, 100, 10) is None
    assert tokens_to_box(["<loc_1>", "<loc_2>", "<loc_3>", "<loc_10>"], 100, 100, 10) is None  # out of range


def test_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0  # empty boxes
    assert box_iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)


def test_grounding_accuracy_and_mean_iou():
    targets = [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 10)]
    predicted = [(0, 0, 10, 10), (5, 0, 15, 10), (0, 0, 10, 5), None]  # IoU 1, 1/3, 1/2, 0
    s = grounding_scores(predicted, targets)
    assert s["n"] == 4
    assert s["accuracy"] == pytest.approx(2 / 4)  # IoU >= 0.5 counts
    assert s["mean_iou"] == pytest.approx((1 + 1 / 3 + 0.5 + 0) / 4)
    assert grounding_scores(predicted, targets, threshold=0.3)["accuracy"] == pytest.approx(3 / 4)
    assert grounding_scores([], []) == {"accuracy": 0.0, "mean_iou": 0.0, "n": 0}
    with pytest.raises(ValueError):
        grounding_scores([None], [])


def test_token_names_and_allowed_ids():
    assert loc_tokens(3) == ["<loc_0>", "<loc_1>", "<loc_2>"]
    assert img_tokens(2) == ["<img_0>", "<img_1>"]
    assert [token_kind(t) for t in ("<loc_5>", "<img_5>", "circle", "<loc_x>", "<end>")] == \
        ["loc", "img", "word", "word", "word"]
    vocab = ["<pad>", "<end>", "a", "circle", *loc_tokens(3), *img_tokens(2)]
    assert allowed_token_ids(vocab, None, "loc", always=[1]) == [1, 4, 5, 6]
    assert allowed_token_ids(vocab, None, "img", always=[1]) == [1, 7, 8]
    assert allowed_token_ids(vocab.__getitem__, len(vocab), "word") == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        allowed_token_ids(vocab, None, "pixels")
    with pytest.raises(ValueError):
        allowed_token_ids(vocab.__getitem__, None, "word")
