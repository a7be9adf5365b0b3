"""The built-in *shapes* dataset: drawn scenes with five natural captions each.

`make_shapes(output, num_images=1000, seed=0)` writes a real Karpathy-format dataset
(`output/dataset_shapes.json`, images under `output/images/`) that `seesay prepare --format
karpathy` reads like COCO's. Every image shows one to three objects (circle, square,
triangle, star, diamond) in one of six colours and two sizes, placed without overlap on a
varied background (solid pale or dark tint, two-colour gradient, or light noise; never a
saturated colour, so never the colour of an object). Each image has five *different*
captions built from varied templates, synonyms ("small"/"little", "large"/"big") and word
order; spatial words ("to the left of", "above", "in the top right corner") are true of the
drawn boxes. Each object's shape, colour, size and tight pixel box `[x0, y0, x1, y1]` are
stored with the image, so attention maps can be checked against where the objects are.

Compositional hold-out: the (colour, shape) pairs in `HELD_OUT_PAIRS` never appear in a
train image; every one of them appears in the test split (when it has at least as many
images as there are pairs), and val may contain them too. A captioner must compose colour
and shape words it learned separately rather than memorise pairs.

Everything is a pure function of `seed` (and the size arguments): two runs write byte-
identical JSON and images; image *i* depends only on `(seed, i)`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from seesay.errors import SeesayError
from seesay.files import write_json_atomic

log = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
PLURALS = {s: s + "s" for s in SHAPES}
# Saturated object colours (RGB); backgrounds are pale or dark low-saturation tints.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 205, 25),
    "purple": (135, 45, 185),
    "orange": (245, 125, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
# (colour, shape) pairs never drawn in train images; one per shape, five distinct colours.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "diamond"),
    ("yellow", "circle"),
    ("purple", "square"),
)
JSON_NAME = "dataset_shapes.json"
IMAGE_DIR = "images"

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_SIZE_FRAC = {"small": (0.15, 0.21), "large": (0.29, 0.37)}  # side / image side
_SUPERSAMPLE = 2  # draw at 2x and downsample: antialiased edges
_ALL_PAIRS = [(c, s) for c in COLORS for s in SHAPES]
_TRAIN_PAIRS = [p for p in _ALL_PAIRS if p not in HELD_OUT_PAIRS]


# ----------------------------------------------------------------------------- scenes


def _rng_for(seed: int, index: int) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`: stable across runs and platforms
    return random.Random(f"seesay-shapes/{seed}/{index}")


def _place(rng: random.Random, sizes: list[str], image_size: int) -> list[list[float]] | None:
    """Non-overlapping square boxes (float pixels) with a gap, or None if it did not fit."""
    margin = max(2.0, image_size * 0.03)
    gap = max(3.0, image_size * 0.04)
    boxes: list[list[float]] = []
    for size in sizes:
        lo, hi = _SIZE_FRAC[size]
        side = rng.uniform(lo, hi) * image_size
        for _ in range(100):
            x0 = rng.uniform(margin, image_size - margin - side)
            y0 = rng.uniform(margin, image_size - margin - side)
            box = [x0, y0, x0 + side, y0 + side]
            if all(
                box[2] + gap <= b[0] or b[2] + gap <= box[0] or box[3] + gap <= b[1] or b[3] + gap <= box[1]
                for b in boxes
            ):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _star_points(box: Sequence[float]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    r = (x1 - x0) / 2
    # a five-point star whose tight box is the square: centre it vertically
    cy_off = r * (1 - math.cos(math.radians(36))) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + cy_off
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = math.radians(-90 + 36 * k)
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _shape_points(shape: str, box: Sequence[float]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":
        return [(x0, y1), (x1, y1), (cx, y0)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "star":
        return _star_points(box)
    return None  # circle / square drawn from the box


def _tight_box(shape: str, box: Sequence[float], image_size: int) -> list[int]:
    pts = _shape_points(shape, box)
    if pts is None:
        x0, y0, x1, y1 = box
    else:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    return [
        max(0, math.floor(x0)),
        max(0, math.floor(y0)),
        min(image_size, math.ceil(x1)),
        min(image_size, math.ceil(y1)),
    ]


def _background(rng: random.Random, image_size: int) -> tuple[np.ndarray, str]:
    """A low-saturation background (float32 HxWx3) and its kind."""

    def tint() -> np.ndarray:
        if rng.random() < 0.8:  # pale
            base = rng.uniform(200, 245)
        else:  # dark
            base = rng.uniform(35, 75)
        return np.array([base + rng.uniform(-14, 14) for _ in range(3)], dtype=np.float32)

    kind = rng.choice(("solid", "gradient", "noise"))
    n = image_size
    if kind == "gradient":
        a, b = tint(), tint()
        direction = rng.choice(("h", "v", "d"))
        t = np.linspace(0.0, 1.0, n, dtype=np.float32)
        if direction == "h":
            w = np.broadcast_to(t[None, :], (n, n))
        elif direction == "v":
            w = np.broadcast_to(t[:, None], (n, n))
        else:
            w = (t[None, :] + t[:, None]) / 2
        img = a[None, None, :] * (1 - w[..., None]) + b[None, None, :] * w[..., None]
    else:
        img = np.broadcast_to(tint()[None, None, :], (n, n, 3)).astype(np.float32)
    if kind == "noise":
        nrng = np.random.default_rng(rng.getrandbits(63))
        img = img + nrng.normal(0.0, 9.0, size=(n, n, 1)).astype(np.float32)
    return img, kind


def _draw_scene(
    rng: random.Random, objects: list[dict], boxes: list[list[float]], image_size: int
) -> tuple[Image.Image, str]:
    bg, kind = _background(rng, image_size)
    s = _SUPERSAMPLE
    canvas = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB").resize(
        (image_size * s, image_size * s), Image.NEAREST
    )
    draw = ImageDraw.Draw(canvas)
    for obj, box in zip(objects, boxes):
        base = COLORS[obj["color"]]
        fill = tuple(int(min(255, max(0, c + rng.randint(-12, 12)))) for c in base)
        big = [v * s for v in box]
        pts = _shape_points(obj["shape"], big)
        if obj["shape"] == "circle":
            draw.ellipse(big, fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle(big, fill=fill)
        else:
            draw.polygon(pts, fill=fill)
    return canvas.resize((image_size, image_size), Image.BILINEAR), kind


def _sample_objects(rng: random.Random, split: str, forced: tuple[str, str] | None, image_size: int):
    n_obj = rng.choices((1, 2, 3), weights=(0.3, 0.4, 0.3))[0]
    pairs = _TRAIN_PAIRS if split == "train" else _ALL_PAIRS
    while True:
        chosen = [rng.choice(pairs) for _ in range(n_obj)]
        if forced is not None:
            chosen[0] = forced
        sizes = [rng.choice(SIZES) for _ in range(n_obj)]
        # no two identical objects: captions must be able to tell them apart
        if len({(c, s, z) for (c, s), z in zip(chosen, sizes)}) < n_obj:
            continue
        boxes = _place(rng, sizes, image_size)
        if boxes is not None:
            objects = [{"shape": s, "color": c, "size": z} for (c, s), z in zip(chosen, sizes)]
            return objects, boxes


# ----------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(rng: random.Random, obj: dict, *, size: bool | None = None, det: str = "a") -> str:
    """A noun phrase: '(a|the) [size] colour shape'."""
    if size is None:
        size = rng.random() < 0.6
    words = []
    if size:
        words.append(rng.choice(_SIZE_WORDS[obj["size"]]))
    words += [obj["color"], obj["shape"]]
    d = _article(words[0]) if det == "a" else det
    return " ".join([d, *words])


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _relation(a: Sequence[float], b: Sequence[float]) -> str:
    """Where box `a` is relative to box `b` ('left', 'right', 'above', 'below'); true of the boxes."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    h_sep = a[2] <= b[0] or b[2] <= a[0]
    v_sep = a[3] <= b[1] or b[3] <= a[1]
    horizontal = h_sep and (abs(ax - bx) >= abs(ay - by) or not v_sep)
    if horizontal:
        return "left" if ax < bx else "right"
    return "above" if ay < by else "below"


_REL_PHRASES = {
    "left": ("to the left of", "on the left of", "left of"),
    "right": ("to the right of", "on the right of", "right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
_INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def _position(box: Sequence[float], image_size: int) -> str | None:
    """Absolute position phrase for a lone object, or None when it is not clearly anywhere."""
    cx, cy = _centre(box)
    third = image_size / 3
    col = "left" if cx < third else ("right" if cx > 2 * third else "middle")
    row = "top" if cy < third else ("bottom" if cy > 2 * third else "middle")
    if col == "middle" and row == "middle":
        return "in the middle"
    if row == "middle":
        return f"on the {col}"
    if col == "middle":
        return f"at the {row}"
    return f"in the {row} {col} corner"


def _count_word(n: int) -> str:
    return {1: "one", 2: "two", 3: "three"}[n]


def _captions(
    rng: random.Random, objects: list[dict], boxes: list[list[float]], image_size: int
) -> list[str]:
    n = len(objects)
    cands: list[str] = []
    if n == 1:
        o, pos = objects[0], _position(boxes[0], image_size)
        cands += [
            f"{_np(rng, o)} {pos}",
            f"there is {_np(rng, o)} {pos}",
            f"{_np(rng, o, size=True)} on its own",
            f"a picture of {_np(rng, o)}",
            f"a single {rng.choice(_SIZE_WORDS[o['size']])} {o['color']} {o['shape']}",
            f"one {o['color']} {o['shape']} {pos}",
            f"the image shows {_np(rng, o)} {pos}",
            f"just {_np(rng, o, size=True)}",
            f"{_np(rng, o, size=False)} {pos} of the picture",
        ]
    else:
        order = list(range(n))
        lr = sorted(order, key=lambda i: _centre(boxes[i])[0])
        i, j = rng.sample(order, 2)
        rel = _relation(boxes[i], boxes[j])
        a, b = objects[i], objects[j]
        rp = rng.choice(_REL_PHRASES[rel])
        ip = rng.choice(_REL_PHRASES[_INVERSE[rel]])
        cw = _count_word(n)
        rest = [objects[k] for k in order if k not in (i, j)]

        def listing(objs: list[dict]) -> str:
            phrases = [_np(rng, o) for o in objs]
            return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]

        shuffled = rng.sample(objects, n)
        cands += [
            f"{_np(rng, a)} {rp} {_np(rng, b)}",
            f"{_np(rng, b)} {ip} {_np(rng, a)}",
            f"{cw} shapes, {listing(shuffled)}",
            f"{listing(rng.sample(objects, n))}",
            f"there are {cw} shapes: {listing(rng.sample(objects, n))}",
            f"{cw} objects: {listing([objects[k] for k in lr])} from left to right",
            f"a picture of {listing(rng.sample(objects, n))}",
        ]
        if n == 2:
            cands += [
                f"two shapes: {_np(rng, a)} {rp} {_np(rng, b)}",
                f"there is {_np(rng, a)} {rp} {_np(rng, b)}",
            ]
        else:
            r = rest[0]
            cands += [
                f"{_np(rng, a)} {rp} {_np(rng, b)} and {_np(rng, r)}",
                f"{_np(rng, a)} {rp} {_np(rng, b)} with {_np(rng, r)} nearby",
            ]
        shapes = [o["shape"] for o in objects]
        for shape in dict.fromkeys(shapes):  # first-seen order (a set's order varies per run)
            same = [o for o in objects if o["shape"] == shape]
            if len(same) >= 2:
                colours = [o["color"] for o in same]
                cands.append(
                    f"{_count_word(len(same))} {PLURALS[shape]}, "
                    + (
                        " and ".join(f"{_article(c)} {c} one" for c in colours)
                        if len(same) == 2
                        else ", ".join(f"{_article(c)} {c} one" for c in colours[:-1])
                        + f" and {_article(colours[-1])} {colours[-1]} one"
                    )
                )
    # five distinct sentences, in a seeded order; a plural caption ("two circles, a red one
    # and a blue one") is always kept when it exists, so plural words are frequent enough
    plural = cands[-1:] if n > 1 and len({o["shape"] for o in objects}) < n else []
    seen: list[str] = []
    for c in plural + rng.sample(cands, len(cands)):
        c = " ".join(c.split())
        if c not in seen:
            seen.append(c)
        if len(seen) == 5:
            break
    while len(seen) < 5:  # vanishingly rare: fill with more sampled variants
        extra = f"a picture of {' and '.join(_np(rng, o) for o in objects)}"
        if extra not in seen:
            seen.append(extra)
    rng.shuffle(seen)
    return seen


_PUNCT = re.compile(r"[^\w\s]")


def _raw_and_tokens(text: str) -> tuple[str, list[str]]:
    raw = text[0].upper() + text[1:] + "."
    tokens = _PUNCT.sub(" ", text.lower()).split()
    return raw, tokens


# ----------------------------------------------------------------------------- dataset


def _splits(num_images: int, seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    n_test = int(round(num_images * test_fraction))
    n_val = int(round(num_images * val_fraction))
    if n_test + n_val > num_images:
        raise SeesayError(f"--val-fraction + --test-fraction must leave room for train ({num_images} images)")
    order = list(range(num_images))
    random.Random(f"seesay-shapes-split/{seed}").shuffle(order)
    split = ["train"] * num_images
    for k, idx in enumerate(order):
        if k < n_test:
            split[idx] = "test"
        elif k < n_test + n_val:
            split[idx] = "val"
    return split


def _make_one(args: tuple[int, int, str, tuple[str, str] | None, int, str]) -> dict:
    index, seed, split, forced, image_size, image_dir = args
    rng = _rng_for(seed, index)
    objects, boxes = _sample_objects(rng, split, forced, image_size)
    image, kind = _draw_scene(rng, objects, boxes, image_size)
    filename = f"{index:06d}.png"
    image.save(os.path.join(image_dir, filename), optimize=False, compress_level=1)
    for obj, box in zip(objects, boxes):
        obj["box"] = _tight_box(obj["shape"], box, image_size)
    # relations and positions in captions are computed from the stored (tight) boxes
    captions = _captions(rng, objects, [o["box"] for o in objects], image_size)
    return {
        "filename": filename,
        "split": split,
        "objects": objects,
        "background": kind,
        "captions": captions,
    }


def make_shapes(
    output: str | os.PathLike,
    *,
    num_images: int = 1000,
    seed: int = 0,
    image_size: int = 128,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Path:
    """Write the shapes dataset to `output`; return the path of `dataset_shapes.json`.

    Images go to `output/images/NNNNNN.png` (the JSON's `filepath` is "images"). The JSON
    is Karpathy's format plus, per image, `objects` (shape, color, size, box [x0, y0, x1, y1]
    in pixels of the written image, x1/y1 exclusive edges), `width`, `height` and
    `background`; top level `held_out_pairs` lists the (colour, shape) pairs absent from train.
    """
    if num_images < 1:
        raise SeesayError(f"--num-images must be at least 1, got {num_images}")
    if image_size < 32:
        raise SeesayError(f"--image-size must be at least 32 pixels, got {image_size}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise SeesayError(f"--val-fraction and --test-fraction must be in [0, 1), got {val_fraction} and {test_fraction}")
    out = Path(output)
    image_dir = out / IMAGE_DIR
    try:
        image_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SeesayError(f"{out}: cannot create output directory: {e.strerror or e}") from e
    splits = _splits(num_images, seed, val_fraction, test_fraction)
    # the k-th test image (k < 5) carries held-out pair k, so every pair is in test
    forced: list[tuple[str, str] | None] = [None] * num_images
    k = 0
    for idx, sp in enumerate(splits):
        if sp == "test" and k < len(HELD_OUT_PAIRS):
            forced[idx] = HELD_OUT_PAIRS[k]
            k += 1
    # images left by an earlier, larger run in the same directory would be stray files
    for stale in image_dir.glob("*.png"):
        if re.fullmatch(r"\d{6,}\.png", stale.name) and int(stale.stem) >= num_images:
            stale.unlink()
    jobs = [(i, seed, splits[i], forced[i], image_size, str(image_dir)) for i in range(num_images)]
    try:
        results = [_make_one(j) for j in jobs]
    except OSError as e:  # a full disk, a quota, permissions: one line, not a traceback
        raise SeesayError(f"{e.filename or image_dir}: cannot write ({e.strerror or e}); "
                          "free some space and run again (finished images are rewritten identically)") from None

    images = []
    sentid = 0
    for imgid, r in enumerate(results):
        sentences = []
        for text in r["captions"]:
            raw, tokens = _raw_and_tokens(text)
            sentences.append({"tokens": tokens, "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        images.append(
            {
                "filepath": IMAGE_DIR,
                "filename": r["filename"],
                "imgid": imgid,
                "split": r["split"],
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "objects": r["objects"],
                "width": image_size,
                "height": image_size,
                "background": r["background"],
            }
        )
    data = {
        "dataset": "shapes",
        "seed": seed,
        "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS],
        "images": images,
    }
    path = out / JSON_NAME
    try:
        write_json_atomic(path, data, ensure_ascii=False)
    except OSError as e:
        raise SeesayError(f"{path}: cannot write ({e.strerror or e})") from None
    log.debug("wrote %d shapes images to %s", num_images, out)
    return path


def split_counts(path: str | os.PathLike) -> dict[str, int]:
    """Images per split in a written dataset_shapes.json (for messages and tests)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    counts: dict[str, int] = {"train": 0, "val": 0, "test": 0}
    for img in data["images"]:
        counts[img["split"]] = counts.get(img["split"], 0) + 1
    return counts


# ----------------------------------------------------------------------------- classification


def make_shapes_imagefolder(
    output: str | os.PathLike,
    *,
    num_images: int = 1000,
    seed: int = 0,
    image_size: int = 128,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> Path:
    """The shapes as a classification set: `output/{train,val,test}/<colour>_<shape>/NNNNNN.png`.

    Every image shows one object (any size, on the usual backgrounds); its class is its colour and
    shape ("red_circle", read by `seesay prepare --format imagefolder` as the label "red circle"), 30
    classes, none held out. Deterministic in `seed` like `make_shapes`. Returns `output`."""
    if num_images < 1:
        raise SeesayError(f"--num-images must be at least 1, got {num_images}")
    if image_size < 32:
        raise SeesayError(f"--image-size must be at least 32 pixels, got {image_size}")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1):
        raise SeesayError(f"--val-fraction and --test-fraction must be in [0, 1), got {val_fraction} and {test_fraction}")
    out = Path(output)
    splits = _splits(num_images, seed, val_fraction, test_fraction)
    try:
        for i in range(num_images):
            rng = random.Random(f"seesay-shapes-classes/{seed}/{i}")
            color, shape = _ALL_PAIRS[i % len(_ALL_PAIRS)] if i < len(_ALL_PAIRS) else rng.choice(_ALL_PAIRS)
            size = rng.choice(SIZES)
            boxes = _place(rng, [size], image_size)
            assert boxes is not None  # one object always fits
            image, _ = _draw_scene(rng, [{"shape": shape, "color": color, "size": size}], boxes, image_size)
            folder = out / splits[i] / f"{color}_{shape}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:06d}.png", optimize=False, compress_level=1)
    except OSError as e:
        raise SeesayError(f"{e.filename or out}: cannot write ({e.strerror or e})") from None
    log.debug("wrote %d shapes classification images to %s", num_images, out)
    return out
