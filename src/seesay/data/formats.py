"""Dataset readers: each turns one annotation format into a list of `Record`s.

A `Record` is one image: its file, an id, its split, every raw caption, and `extra` (any
other per-image fields, kept in the prepared dataset's meta.jsonl).

Formats (see docs/data.md):

- ``karpathy``: `dataset_{coco,flickr8k,flickr30k}.json`; image = ROOT/filepath/filename
  (`filepath` is absent for Flickr); id = `cocoid` when present, else the file name;
  `restval` becomes `train` unless `keep_restval` (then it stays a split of its own).
- ``coco``: COCO_DIR/annotations/captions_{train,val}2014.json, images in COCO_DIR/train2014
  and COCO_DIR/val2014. With COCO_DIR/dataset_coco.json (or annotations/dataset_coco.json)
  Karpathy's split is applied (images it does not list go to train). Without it: all of
  train2014 is train; val2014 sorted by image id gives its first k images to val, the next k
  to test and the rest to train, k = min(5000, n // 4) (5000/5000/30504 on the full set, the
  sizes of Karpathy's split).
- ``pairs``: `[{"image": "a.jpg", "text": "...", "split"?: ...}]`; items with the same image
  are one image with several captions. Without any "split": the deterministic split below.
- ``aichallenger``: `[{"image_id": "x.jpg", "caption": [...]}]` (AI Challenger 2017), split as
  for pairs unless entries carry a "split".
- ``imagefolder``, ``imagenet``, ``sun397`` (classification as captioning: `classify_formats`) and
  ``redcaps`` (`redcaps`) read a dataset folder (`images`). Their readers mark items they reject
  (a label naming no class, an annotation without text) with `Record.bad`: prepare lists and
  counts them like bad images.

Every image of a Karpathy file must have a `split` (train, val, test or restval): an image
without one is refused with one line (it used to join train, which can leak test images into
training). Readers set `Record.root`, the folder the image must stay inside (`--images`, or the
COCO image folder): `seesay prepare` skips an image whose path resolves outside it (`../`,
absolute paths, symlinks leading out) without opening it; see `outside_root`.

Deterministic split (pairs, aichallenger): images are ordered by the MD5 of their file name;
the first 5% (at least one image when there are 3 or more) go to val, the next 5% (same rule)
to test, the rest to train. It does not depend on the order of the file or on the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seesay.errors import SeesayError

FORMATS = ("karpathy", "coco", "pairs", "aichallenger", "imagefolder", "imagenet", "sun397", "redcaps")


@dataclass
class Record:
    image_path: str
    image_id: str
    split: str
    sentences: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    blank_captions: int = 0  # blank sentences the reader dropped (counted in the manifest)
    root: str | None = None  # the folder `image_path` must resolve inside (None: not confined)
    bad: str | None = None  # why the reader rejected the item (a label naming no class...): prepare lists and counts it

    @classmethod
    def from_any(cls, r: Any) -> Record:
        if isinstance(r, Record):
            return r
        if isinstance(r, dict):
            path = r.get("image_path", r.get("image"))
            if path is None:
                raise SeesayError(f"record has no image path: {str(r)[:80]}")
            sents = r.get("sentences", r.get("captions"))
            if isinstance(sents, str):
                sents = [sents]
            return cls(str(path), str(r.get("image_id", Path(str(path)).name)), str(r.get("split", "train")),
                       [str(s) for s in (sents or [])], dict(r.get("extra") or {}))
        raise SeesayError(f"cannot read a record from {type(r).__name__}")


def load_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; problems become one-line `SeesayError`s naming the file and position."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SeesayError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise SeesayError(f"{path}: is a directory, expected a JSON file") from None
    except UnicodeDecodeError as e:
        raise SeesayError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise SeesayError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SeesayError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} (char {e.pos}): {e.msg}") from None


def outside_root(image_path: str | os.PathLike, root: str | os.PathLike) -> str | None:
    """None when `image_path` resolves (symlinks followed) inside `root`, else where it resolves to.

    Only path names and links are inspected (lstat/readlink): the image itself is never opened.
    """
    real_root = os.path.realpath(root)
    real = os.path.realpath(image_path)
    if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
        return None
    return real


def _bad(path: Path, what: str) -> SeesayError:
    return SeesayError(f"{path}: {what}")


def _clean(sentences: Any, path: Path, where: str) -> tuple[list[str], int]:
    """Whitespace-normalised captions, and how many were blank (dropped here, counted by prepare)."""
    if isinstance(sentences, str):
        sentences = [sentences]
    if not isinstance(sentences, list):
        raise _bad(path, f"{where}: captions must be a list of strings")
    out = []
    for s in sentences:
        if not isinstance(s, str):
            raise _bad(path, f"{where}: caption is not a string: {str(s)[:40]!r}")
        s = " ".join(s.split())
        if s:
            out.append(s)
    return out, len(sentences) - len(out)


def deterministic_split(names: list[str], val_fraction: float = 0.05, test_fraction: float = 0.05) -> dict[str, str]:
    """name -> split by the MD5 rule in the module doc."""
    order = sorted(set(names), key=lambda n: (hashlib.md5(n.encode("utf-8")).hexdigest(), n))
    n = len(order)

    def count(frac: float) -> int:
        return max(1, round(frac * n)) if n >= 3 else 0

    n_val, n_test = count(val_fraction), count(test_fraction)
    out = {}
    for i, name in enumerate(order):
        out[name] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return out


# -- karpathy ------------------------------------------------------------------------------------
_KARPATHY_KNOWN = {"filepath", "filename", "sentences", "sentids", "split"}


def read_karpathy(annotations: str | os.PathLike, images: str | os.PathLike, *, keep_restval: bool = False) -> list[Record]:
    path = Path(annotations)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise _bad(path, 'not a Karpathy split file (expected {"images": [...]})')
    root = Path(images)
    _require_splits(path, data["images"])
    records = []
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(img, dict) or "filename" not in img:
            raise _bad(path, f"{where}: missing 'filename'")
        split = img["split"]
        if split == "restval" and not keep_restval:
            split = "train"
        sents = img.get("sentences", [])
        if not isinstance(sents, list):
            raise _bad(path, f"{where}: 'sentences' must be a list")
        raw = []
        for s in sents:
            if isinstance(s, dict):
                if "raw" in s:
                    raw.append(s["raw"])
                elif "tokens" in s:
                    if not isinstance(s["tokens"], list) or not all(isinstance(t, str) for t in s["tokens"]):
                        raise _bad(path, f"{where}: 'tokens' must be a list of strings")
                    raw.append(" ".join(s["tokens"]))
            else:
                raw.append(s)
        fp = img.get("filepath") or ""
        if not isinstance(img["filename"], str) or not img["filename"] or not isinstance(fp, str):
            raise _bad(path, f"{where}: 'filename' and 'filepath' must be strings")
        image_path = root / fp / img["filename"]
        image_id = str(img["cocoid"]) if "cocoid" in img else str(img["filename"])
        extra = {k: v for k, v in img.items() if k not in _KARPATHY_KNOWN}
        sentences, blank = _clean(raw, path, where)
        records.append(Record(str(image_path), image_id, str(split), sentences, extra, blank, str(root)))
    return records


def _require_splits(path: Path, images: list[Any]) -> None:
    """Refuse a Karpathy file in which some image has no (string) `split`.

    Defaulting such images to train (as seesay once did) can leak test images into training.
    """
    missing = [i for i, img in enumerate(images)
               if isinstance(img, dict) and not (isinstance(img.get("split"), str) and img["split"])]
    if missing:
        first = images[missing[0]]
        name = first.get("filename", first.get("cocoid", "?"))
        raise _bad(path, f"images[{missing[0]}] ({name}) has no 'split' ({len(missing)} of {len(images)} images "
                         "have none); give every image a split (train, val, test or restval), or use --format "
                         "pairs, which splits images without one deterministically")


# -- coco ----------------------------------------------------------------------------------------
def _coco_annotations(path: Path) -> tuple[list[dict], dict[int, list[str]]]:
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise _bad(path, 'not a COCO captions file (expected "images" and "annotations" lists)')
    caps: dict[int, list[tuple[int, str]]] = {}
    for j, a in enumerate(data["annotations"]):
        try:
            caps.setdefault(int(a["image_id"]), []).append((int(a.get("id", j)), a["caption"]))
        except (KeyError, TypeError, ValueError):
            raise _bad(path, f"annotations[{j}]: needs 'image_id' and 'caption'") from None
    by_image = {k: [c for _, c in sorted(v, key=lambda t: t[0])] for k, v in caps.items()}
    for j, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise _bad(path, f"images[{j}]: needs 'id' and 'file_name'")
        if not isinstance(im["file_name"], str) or not im["file_name"]:
            raise _bad(path, f"images[{j}]: 'file_name' must be a non-empty string")
        try:
            int(im["id"])
        except (TypeError, ValueError):
            raise _bad(path, f"images[{j}]: 'id' must be an integer") from None
    return data["images"], by_image


def coco_karpathy_split(root: Path, *, keep_restval: bool = False) -> dict[int, str] | None:
    """COCO id -> Karpathy's split from ROOT/dataset_coco.json (or ROOT/annotations/), None without
    one; restval counts as train unless `keep_restval`. Shared by the caption and instance readers,
    so a test image's captions and regions are never trained on."""
    for cand in (root / "dataset_coco.json", root / "annotations" / "dataset_coco.json"):
        if cand.is_file():
            kd = load_json(cand)
            if not isinstance(kd, dict) or not isinstance(kd.get("images"), list):
                raise _bad(cand, 'not a Karpathy split file (expected {"images": [...]})')
            _require_splits(cand, kd["images"])
            split: dict[int, str] = {}
            for j, img in enumerate(kd["images"]):
                if isinstance(img, dict) and "cocoid" in img:
                    s = img["split"]
                    try:
                        cocoid = int(img["cocoid"])
                    except (TypeError, ValueError):
                        raise _bad(cand, f"images[{j}]: 'cocoid' must be an integer") from None
                    split[cocoid] = "train" if s == "restval" and not keep_restval else s
            return split
    return None


def coco_splits(ids: list[int], sub: str, karpathy: dict[int, str] | None) -> list[str]:
    """The split of each image of COCO's `sub` folder (`ids` sorted): Karpathy's when known (train
    for images it lacks), else the first min(5000, n/4) of val2014 are val, the next as many test,
    the rest and all of train2014 train."""
    if karpathy is not None:
        return [karpathy.get(i, "train") for i in ids]
    if sub == "val2014":
        k = min(5000, len(ids) // 4)
        return ["val"] * k + ["test"] * k + ["train"] * (len(ids) - 2 * k)
    return ["train"] * len(ids)


def read_coco(coco_dir: str | os.PathLike, *, keep_restval: bool = False) -> list[Record]:
    root = Path(coco_dir)
    if not root.is_dir():
        raise SeesayError(f"{root}: COCO directory not found")
    karpathy_split = coco_karpathy_split(root, keep_restval=keep_restval)
    records: list[Record] = []
    found = False
    for sub in ("train2014", "val2014"):
        ann = root / "annotations" / f"captions_{sub}.json"
        if not ann.is_file():
            continue
        found = True
        images, caps = _coco_annotations(ann)
        images = sorted(images, key=lambda im: int(im["id"]))
        splits = coco_splits([int(im["id"]) for im in images], sub, karpathy_split)
        for im, split in zip(images, splits):
            iid = int(im["id"])
            extra = {"cocoid": iid, "coco_split": sub}
            sentences, blank = _clean(caps.get(iid, []), ann, f"image {iid}")
            records.append(Record(str(root / sub / im["file_name"]), str(iid), split, sentences, extra, blank,
                                  str(root / sub)))
    if not found:
        raise SeesayError(f"{root}: no annotations/captions_train2014.json or annotations/captions_val2014.json")
    return records


# -- pairs / aichallenger ------------------------------------------------------------------------
def _grouped(path: Path, items: list[tuple[str, tuple[list[str], int], str | None, dict]], root: Path) -> list[Record]:
    order: list[str] = []
    groups: dict[str, Record] = {}
    has_split = any(it[2] is not None for it in items)
    for name, (texts, blank), split, extra in items:
        rec = groups.get(name)
        if rec is None:
            rec = groups[name] = Record(str(root / name), name, split or "train", [], extra, 0, str(root))
            order.append(name)
        elif split is not None and rec.split != split:
            raise _bad(path, f"image {name!r} is given two splits ({rec.split!r} and {split!r})")
        rec.sentences.extend(texts)
        rec.blank_captions += blank
    if not has_split:
        assign = deterministic_split(order)
        for name in order:
            groups[name].split = assign[name]
    return [groups[n] for n in order]


def read_pairs(annotations: str | os.PathLike, images: str | os.PathLike) -> list[Record]:
    path = Path(annotations)
    data = load_json(path)
    if not isinstance(data, list):
        raise _bad(path, 'expected a JSON list of {"image": ..., "text": ...}')
    items = []
    for i, it in enumerate(data):
        if not isinstance(it, dict) or "image" not in it or "text" not in it:
            raise _bad(path, f'item {i}: needs "image" and "text"')
        if not isinstance(it["image"], str) or not it["image"]:
            raise _bad(path, f'item {i}: "image" must be a non-empty string (a file name under --images)')
        extra = {k: v for k, v in it.items() if k not in ("image", "text", "split")}
        split = it.get("split")
        items.append((str(it["image"]), _clean(it["text"], path, f"item {i}"),
                      None if split is None else str(split), extra))
    return _grouped(path, items, Path(images))


def read_aichallenger(annotations: str | os.PathLike, images: str | os.PathLike) -> list[Record]:
    path = Path(annotations)
    data = load_json(path)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise _bad(path, 'expected a JSON list of {"image_id": "x.jpg", "caption": [...]}')
    items = []
    for i, it in enumerate(data):
        if not isinstance(it, dict) or "image_id" not in it or "caption" not in it:
            raise _bad(path, f'item {i}: needs "image_id" and "caption"')
        if not isinstance(it["image_id"], str) or not it["image_id"]:
            raise _bad(path, f'item {i}: "image_id" must be a non-empty string (a file name under --images)')
        extra = {k: v for k, v in it.items() if k not in ("image_id", "caption", "split")}
        split = it.get("split")
        items.append((str(it["image_id"]), _clean(it["caption"], path, f"item {i}"),
                      None if split is None else str(split), extra))
    return _grouped(path, items, Path(images))


def read_records(fmt: str, *, annotations: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
                 coco_dir: str | os.PathLike | None = None, keep_restval: bool = False, partition: int | None = None,
                 redcaps_text: str = "caption") -> list[Record]:
    """Dispatch to the reader for `fmt` after checking its required options (the folder formats
    imagefolder, imagenet, sun397 and redcaps read `images`; see classify_formats and redcaps)."""
    if fmt in ("imagefolder", "imagenet", "sun397", "redcaps"):
        from seesay.data import classify_formats, redcaps

        if images is None:
            raise SeesayError(f"--format {fmt} needs --images DIR (the dataset folder)")
        if fmt == "imagefolder":
            return classify_formats.read_imagefolder(images)
        if fmt == "imagenet":  # --annotations: the synset mapping file, when not in DIR
            return classify_formats.read_imagenet(images, annotations)
        if fmt == "sun397":
            return classify_formats.read_sun397(images, partition)
        return redcaps.read_redcaps(images, text=redcaps_text, annotations=annotations)
    if fmt == "coco":
        if coco_dir is None:
            raise SeesayError("--format coco needs --coco-dir")
        return read_coco(coco_dir, keep_restval=keep_restval)
    if fmt not in FORMATS:
        raise SeesayError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if annotations is None:
        raise SeesayError(f"--format {fmt} needs --annotations FILE")
    if images is None:  # default: the folder that holds the annotation file
        images = Path(annotations).parent
    if fmt == "karpathy":
        return read_karpathy(annotations, images, keep_restval=keep_restval)
    if fmt == "pairs":
        return read_pairs(annotations, images)
    return read_aichallenger(annotations, images)


def records_fingerprint(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        item = [r.image_path, r.image_id, r.split, r.sentences, r.extra] + ([r.bad] if r.bad is not None else [])
        h.update(json.dumps(item, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
