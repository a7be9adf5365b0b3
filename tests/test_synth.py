"""The built-in shapes dataset (seesay.data.synth, `seesay synth shapes`)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seesay.cli import main
from seesay.data.synth import COLORS, HELD_OUT_PAIRS, SHAPES, _relation, make_shapes
from seesay.errors import SeesayError


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes1000")
    path = make_shapes(out, num_images=1000, seed=0)
    return path, json.loads(path.read_text())


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_karpathy_format(big):
    path, data = big
    assert path.name == "dataset_shapes.json"
    assert data["dataset"] == "shapes"
    images = data["images"]
    assert len(images) == 1000
    assert Counter(im["split"] for im in images) == {"train": 800, "val": 100, "test": 100}
    sentids = []
    for i, im in enumerate(images[:200]):
        assert im["imgid"] == i
        assert im["filepath"] == "images" and im["filename"] == f"{i:06d}.png"
        assert (path.parent / im["filepath"] / im["filename"]).is_file()
        assert im["width"] == im["height"] == 128
        assert len(im["sentences"]) == 5
        raws = [s["raw"] for s in im["sentences"]]
        assert len(set(raws)) == 5, raws  # five different captions
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        for s in im["sentences"]:
            assert s["imgid"] == i
            assert s["tokens"] == re.sub(r"[^\w\s]", " ", s["raw"].lower()).split()
            assert s["raw"][0].isupper() and s["raw"].endswith(".")
        sentids += im["sentids"]
        assert 1 <= len(im["objects"]) <= 3
        for o in im["objects"]:
            assert o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in ("small", "large")
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128
    assert len(set(sentids)) == len(sentids)


def test_held_out_pairs_absent_from_train_present_in_test(big):
    _, data = big
    seen = {"train": set(), "val": set(), "test": set()}
    for im in data["images"]:
        for o in im["objects"]:
            seen[im["split"]].add((o["color"], o["shape"]))
    held = set(HELD_OUT_PAIRS)
    assert data["held_out_pairs"] == [list(p) for p in HELD_OUT_PAIRS]
    assert not held & seen["train"]
    assert held <= seen["test"]
    # each held-out colour and shape is still seen in train with other partners
    train_colors = {c for c, _ in seen["train"]}
    train_shapes = {s for _, s in seen["train"]}
    assert {c for c, _ in held} <= train_colors and {s for _, s in held} <= train_shapes
    # captions of train images never name a held-out pair
    for im in data["images"]:
        if im["split"] == "train":
            for s in im["sentences"]:
                for c, sh in held:
                    assert f"{c} {sh}" not in s["raw"].lower()


def test_small_vocabulary_survives_min_word_freq_5(big):
    _, data = big
    train = Counter()
    every = set()
    for im in data["images"]:
        for s in im["sentences"]:
            every.update(s["tokens"])
            if im["split"] == "train":
                train.update(s["tokens"])
    assert 35 <= len(every) <= 70
    rare = {w for w in every if train[w] < 5}
    assert not rare, rare


def test_captions_name_the_objects(big):
    _, data = big
    for im in data["images"][:300]:
        for s in im["sentences"]:
            toks = set(s["tokens"])
            # every colour word named is the colour of some object; same for shapes
            colors = {o["color"] for o in im["objects"]}
            shapes = {o["shape"] for o in im["objects"]}
            assert toks & set(COLORS) <= colors, (s["raw"], im["objects"])
            named = {t.rstrip("s") if t.rstrip("s") in SHAPES else t for t in toks} & set(SHAPES)
            assert named <= shapes, (s["raw"], im["objects"])


def test_relations_are_true(big):
    _, data = big
    phrase = {
        "to the left of": "left",
        "on the left of": "left",
        "left of": "left",
        "to the right of": "right",
        "on the right of": "right",
        "right of": "right",
        "above": "above",
        "below": "below",
        "under": "below",
    }
    pat = re.compile(
        r"(?:a|an) (?:(small|little|large|big) )?(\w+) (\w+) (to the left of|on the left of|left of|"
        r"to the right of|on the right of|right of|above|below|under) (?:a|an) "
        r"(?:(small|little|large|big) )?(\w+) (\w+)"
    )
    checked = 0
    for im in data["images"]:
        objs = im["objects"]
        for s in im["sentences"]:
            m = pat.search(s["raw"].lower())
            if not m:
                continue
            sa, ca, sha, rel, sb, cb, shb = m.groups()

            def find(size, color, shape, objs=objs):
                size = {"little": "small", "big": "large"}.get(size, size)
                return [
                    o
                    for o in objs
                    if o["color"] == color and o["shape"] == shape and (size is None or o["size"] == size)
                ]

            a, b = find(sa, ca, sha), find(sb, cb, shb)
            assert a and b, s["raw"]
            if len(a) == 1 and len(b) == 1:
                assert _relation(a[0]["box"], b[0]["box"]) == phrase[rel], (s["raw"], objs)
                checked += 1
    assert checked > 300


def test_relation_helper():
    assert _relation([0, 0, 10, 10], [20, 0, 30, 10]) == "left"
    assert _relation([20, 0, 30, 10], [0, 0, 10, 10]) == "right"
    assert _relation([0, 0, 10, 10], [0, 20, 10, 30]) == "above"
    assert _relation([0, 20, 10, 30], [0, 0, 10, 10]) == "below"
    # diagonal, mostly vertical but overlapping in y: horizontal separation decides
    assert _relation([0, 0, 10, 10], [12, 5, 22, 15]) == "left"


def test_boxes_match_pixels_and_background_differs(tmp_path):
    path = make_shapes(tmp_path, num_images=60, seed=3)
    data = _load(path)
    palette = {k: np.array(v, dtype=float) for k, v in COLORS.items()}
    for im in data["images"]:
        arr = np.asarray(Image.open(tmp_path / "images" / im["filename"]).convert("RGB"), dtype=float)
        assert arr.shape == (128, 128, 3)
        outside = np.ones(arr.shape[:2], bool)
        boxes = [o["box"] for o in im["objects"]]
        for o in im["objects"]:
            x0, y0, x1, y1 = o["box"]
            outside[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = False
            cx = (x0 + x1) // 2
            cy = (y0 + y1) // 2 if o["shape"] != "triangle" else y0 + int(0.7 * (y1 - y0))
            px = arr[cy, cx]
            nearest = min(palette, key=lambda k: np.linalg.norm(palette[k] - px))
            assert nearest == o["color"], (im["filename"], o, px)
            # the drawn object fills its box edge to edge (tight box)
            ys, xs = np.nonzero(np.linalg.norm(arr[y0:y1, x0:x1] - palette[o["color"]], axis=-1) < 60)
            assert xs.min() <= 2 and ys.min() <= 2, o
            assert xs.max() >= x1 - x0 - 3 and ys.max() >= y1 - y0 - 3, o
        # objects never overlap
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        # background pixels are never close to any object colour
        bg = arr[outside]
        dists = np.stack([np.linalg.norm(bg - p, axis=-1) for p in palette.values()])
        assert dists.min() > 60, im["filename"]


def test_deterministic_per_seed(tmp_path):
    a = make_shapes(tmp_path / "a", num_images=30, seed=5)
    b = make_shapes(tmp_path / "b", num_images=30, seed=5)
    c = make_shapes(tmp_path / "c", num_images=30, seed=6)
    assert a.read_bytes() == b.read_bytes()
    for name in sorted(p.name for p in (tmp_path / "a" / "images").iterdir()):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (
            tmp_path / "b" / "images" / name
        ).read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert (tmp_path / "a/images/000000.png").read_bytes() != (tmp_path / "c/images/000000.png").read_bytes()


def test_image_size_and_small_runs(tmp_path):
    path = make_shapes(tmp_path, num_images=7, seed=1, image_size=64, val_fraction=0.0, test_fraction=0.0)
    data = _load(path)
    assert {im["split"] for im in data["images"]} == {"train"}
    im = Image.open(tmp_path / "images" / "000000.png")
    assert im.size == (64, 64) and im.mode == "RGB"
    for img in data["images"]:
        for o in img["objects"]:
            assert o["box"][2] <= 64 and o["box"][3] <= 64
    with pytest.raises(SeesayError):
        make_shapes(tmp_path / "x", num_images=0)
    with pytest.raises(SeesayError):
        make_shapes(tmp_path / "y", num_images=10, val_fraction=0.6, test_fraction=0.6)


def test_cli(tmp_path, capsys):
    rc = main(
        [
            "synth",
            "shapes",
            "--output",
            str(tmp_path / "s"),
            "--num-images",
            "20",
            "--seed",
            "2",
            "--image-size",
            "96",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 20 images" in out and "dataset_shapes.json" in out
    data = _load(tmp_path / "s" / "dataset_shapes.json")
    assert len(data["images"]) == 20 and data["images"][0]["width"] == 96


def test_rerun_into_same_dir_with_fewer_images(tmp_path):
    make_shapes(tmp_path, num_images=12, seed=0)
    path = make_shapes(tmp_path, num_images=5, seed=0)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert len(_load(path)["images"]) == 5
