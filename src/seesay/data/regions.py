"""Readers of data with boxes: one `Region` per object (image, its size, a box, a description).

Region captioning ("what does this box show?") and grounding ("where is the red circle?") read
these. Boxes are (x0, y0, x1, y1) in pixels of the original image, x1/y1 exclusive edges;
`seesay.locations` turns them into `<loc_i>` tokens relative to the image size.

- COCO instances: COCO_DIR/annotations/instances_{train,val}2014.json (the same archive as the
  captions); bbox [x, y, w, h] becomes [x, y, x + w, y + h], clipped to the image; the region text
  is the category name. Skipped and counted (`Regions.skipped`): crowd annotations (iscrowd 1,
  a group rather than one object), degenerate boxes (not four finite numbers, or a side under
  `min_size` pixels after clipping), annotations of images or categories the file does not list.
  A file that is not structurally a COCO instances file is one line naming it. Splits follow
  `seesay prepare --format coco` (seesay.data.formats): Karpathy's split from dataset_coco.json
  when present, else train2014 -> train and val2014 by image id -> k val, k test, the rest train
  (k = min(5000, n // 4)), so a test image's regions are never trained on.
- The built-in shapes: each drawn object's stored tight box; the text is the noun phrase of the
  shapes captions, "a red circle", with the size word ("a small red circle") when the image has
  another object of the same colour and shape. Read from dataset_shapes.json or from a prepared
  DATA_DIR (meta.jsonl keeps the objects; `Region.index` is then the row in the split's images.npy).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seesay.data.formats import coco_karpathy_split, coco_splits, load_json
from seesay.errors import SeesayError


@dataclass
class Region:
    image_path: str
    image_id: str
    split: str
    width: int
    height: int
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image
    text: str
    index: int | None = None  # row in a prepared split's images.npy (prepared data only)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Regions:
    regions: list[Region]
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def __len__(self) -> int:
        return len(self.regions)

    def __iter__(self):
        return iter(self.regions)

    def split(self, name: str) -> list[Region]:
        return [r for r in self.regions if r.split == name]


def _bad(path: Path, what: str) -> SeesayError:
    return SeesayError(f"{path}: {what}")


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if math.isfinite(f) and f == int(f) else None


# ---- COCO instances ------------------------------------------------------------------------------


def _coco_box(bbox: Any, width: int, height: int, min_size: float) -> tuple[float, float, float, float] | None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    x0, y0 = max(0.0, x), max(0.0, y)
    x1, y1 = min(float(width), x + w), min(float(height), y + h)
    if x1 - x0 < min_size or y1 - y0 < min_size:
        return None
    return (x0, y0, x1, y1)


def _read_instances(path: Path) -> tuple[dict[int, dict], dict[int, str], list[Any]]:
    """(images by id, category names by id, annotations) of one instances file, checked."""
    data = load_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise _bad(path, 'not a COCO instances file (expected "images", "annotations" and "categories" lists)')
    cats: dict[int, str] = {}
    for j, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or _int(c.get("id")) is None or not isinstance(c.get("name"), str) or not c["name"]:
            raise _bad(path, f"categories[{j}]: needs an integer 'id' and a non-empty 'name'")
        cats[_int(c["id"])] = " ".join(c["name"].split())
    images: dict[int, dict] = {}
    for j, im in enumerate(data["images"]):
        if not isinstance(im, dict) or _int(im.get("id")) is None or not isinstance(im.get("file_name"), str) \
                or not im["file_name"]:
            raise _bad(path, f"images[{j}]: needs an integer 'id' and a non-empty 'file_name'")
        w, h = _int(im.get("width")), _int(im.get("height"))
        if w is None or h is None or w < 1 or h < 1:
            raise _bad(path, f"images[{j}]: needs positive integer 'width' and 'height'")
        images[_int(im["id"])] = {"file_name": im["file_name"], "width": w, "height": h}
    for j, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a or "bbox" not in a:
            raise _bad(path, f"annotations[{j}]: needs 'image_id', 'category_id' and 'bbox'")
    return images, cats, data["annotations"]


def read_coco_instances(coco_dir: str | os.PathLike, *, min_size: float = 1.0) -> Regions:
    """Regions of COCO_DIR/annotations/instances_{train,val}2014.json (see the module doc)."""
    root = Path(coco_dir)
    if not root.is_dir():
        raise SeesayError(f"{root}: COCO directory not found")
    karpathy = coco_karpathy_split(root)  # the caption reader's split rule (seesay.data.formats)
    out = Regions([])
    found = False
    for sub in ("train2014", "val2014"):
        path = root / "annotations" / f"instances_{sub}.json"
        if not path.is_file():
            continue
        found = True
        images, cats, anns = _read_instances(path)
        ids = sorted(images)
        split_of = dict(zip(ids, coco_splits(ids, sub, karpathy)))
        for a in anns:
            iid, cid = _int(a["image_id"]), _int(a["category_id"])
            if iid not in images:
                out.skipped["unknown image"] += 1
                continue
            if cid not in cats:
                out.skipped["unknown category"] += 1
                continue
            if a.get("iscrowd") in (1, True):
                out.skipped["crowd"] += 1
                continue
            im = images[iid]
            box = _coco_box(a["bbox"], im["width"], im["height"], min_size)
            if box is None:
                out.skipped["degenerate box"] += 1
                continue
            out.regions.append(Region(str(root / sub / im["file_name"]), str(iid), split_of[iid], im["width"],
                                      im["height"], box, cats[cid],
                                      extra={"category_id": cid, "annotation_id": a.get("id"), "coco_split": sub}))
    if not found:
        raise SeesayError(f"{root}: no annotations/instances_train2014.json or annotations/instances_val2014.json")
    return out


# ---- the built-in shapes -------------------------------------------------------------------------


def shape_phrase(obj: dict[str, Any], objects: list[dict[str, Any]]) -> str:
    """"a red circle", or "a small red circle" when another object has the same colour and shape."""
    twins = sum(o.get("color") == obj["color"] and o.get("shape") == obj["shape"] for o in objects)
    words = ([obj["size"]] if twins > 1 else []) + [obj["color"], obj["shape"]]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def _shape_regions(objects: Any, where: str, path: Path, size: tuple[int, int], base: dict[str, Any]) -> list[Region]:
    if not isinstance(objects, list):
        raise _bad(path, f"{where}: no 'objects' list (not the built-in shapes?)")
    out = []
    for k, o in enumerate(objects):
        if not isinstance(o, dict) or not all(isinstance(o.get(f), str) for f in ("shape", "color", "size")):
            raise _bad(path, f"{where}: objects[{k}] needs 'shape', 'color' and 'size'")
        box = o.get("box")
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise _bad(path, f"{where}: objects[{k}] needs a 'box' [x0, y0, x1, y1]")
        out.append(Region(**base, width=size[0], height=size[1], box=tuple(float(v) for v in box),
                          text=shape_phrase(o, objects), extra={"object": k, **{f: o[f] for f in ("shape", "color", "size")}}))
    return out


def read_shapes_regions(source: str | os.PathLike) -> Regions:
    """Regions of the built-in shapes: `source` is dataset_shapes.json (or the folder `seesay synth`
    wrote) or a DATA_DIR prepared from it."""
    src = Path(source)
    if src.is_dir() and (src / "manifest.json").is_file():
        return _prepared_shapes_regions(src)
    path = src / "dataset_shapes.json" if src.is_dir() else src
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise _bad(path, 'not a shapes dataset file (expected {"images": [...]})')
    root = path.parent
    out = Regions([])
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(img, dict) or not isinstance(img.get("filename"), str) or not isinstance(img.get("split"), str):
            raise _bad(path, f"{where}: needs 'filename' and 'split'")
        w, h = _int(img.get("width")), _int(img.get("height"))
        if w is None or h is None or w < 1 or h < 1:
            raise _bad(path, f"{where}: needs positive integer 'width' and 'height'")
        base = {"image_path": str(root / (img.get("filepath") or "") / img["filename"]), "image_id": img["filename"],
                "split": img["split"]}
        out.regions += _shape_regions(img.get("objects"), where, path, (w, h), base)
    return out


def _prepared_shapes_regions(root: Path) -> Regions:
    from seesay.data.store import PreparedData

    prepared = PreparedData(root)
    out = Regions([])
    for split in prepared.splits:
        path = root / split / "meta.jsonl"
        for line_no, m in enumerate(prepared.split(split).meta):
            extra = m.get("extra") if isinstance(m, dict) else None
            if not isinstance(extra, dict):
                raise _bad(path, f"line {line_no + 1}: no 'extra' object")
            w, h = _int(extra.get("width")), _int(extra.get("height"))
            if (w is None or h is None) and isinstance(extra.get("orig_size"), list) and len(extra["orig_size"]) == 2:
                w, h = (_int(v) for v in extra["orig_size"])
            if w is None or h is None or w < 1 or h < 1:
                raise _bad(path, f"line {line_no + 1}: no image width and height")
            base = {"image_path": str(m.get("image", "")), "image_id": str(m.get("image_id", "")), "split": split,
                    "index": int(m.get("index", line_no))}
            out.regions += _shape_regions(extra.get("objects"), f"line {line_no + 1}", path, (w, h), base)
    return out


def regions_summary(regions: Regions) -> str:
    """"N regions (train a / val b / test c); skipped: crowd 3, degenerate box 1"."""
    per = Counter(r.split for r in regions)
    text = f"{len(regions)} regions (" + " / ".join(f"{k} {v}" for k, v in sorted(per.items())) + ")"
    if regions.skipped:
        text += "; skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(regions.skipped.items()))
    return text


def regions_to_jsonl(regions: Regions) -> str:
    """One JSON object per region (for inspection and tests)."""
    return "".join(json.dumps({**r.__dict__, "box": list(r.box)}) + "\n" for r in regions)
