"""Readers of image-classification datasets, whose target is the text "a photo of <label>".

Classification as captioning (see docs/vlm.md): every image gets one caption, `target_text(label)`
= "a photo of <label>" (no article: the label is used as it is, so the closed-set evaluation can
compare a generated text with each class's target exactly), and its record keeps
`extra = {"label": <readable label>, "class": <the dataset's class name>}`.

Formats:

- ``imagefolder``: ROOT/<class>/<image> (one folder per class, any depth of files directly in it),
  or ROOT/{train,val,test}/<class>/<image> when ROOT/train exists (each split folder read the same
  way). The label is the folder name with underscores as spaces ("tabby_cat" -> "tabby cat").
  Without split folders: `formats.deterministic_split` over "<class>/<file>".
- ``imagenet``: the ILSVRC layout, ROOT (or ROOT/ILSVRC/Data/CLS-LOC, Kaggle's layout) with
  train/<wnid>/*.JPEG and val/ either in class folders (val/<wnid>/*.JPEG) or flat (val/*.JPEG)
  labelled by LOC_val_solution.csv (Kaggle's: "ImageId,PredictionString", the first word of the
  prediction string is the wnid). Names from LOC_synset_mapping.txt ("n01440764 tench, Tinca
  tinca" -> "tench", the first name); without it the wnid is the label (with a warning). Splits:
  train and val.
- ``sun397``: ROOT/SUN397 (or ROOT itself) with <letter>/<class>/.../*.jpg and ClassName.txt
  ("/a/abbey", "/b/bakery/shop" -> "abbey", "bakery shop"), looked for in ROOT, ROOT/Partitions
  and the image folder. With `partition` NN: Training_NN.txt gives train (5% of it, by the
  deterministic split, becomes val) and Testing_NN.txt gives test; else every image of every class,
  deterministically split.

Bad items are skipped and counted by `seesay prepare` like bad images: an image that does not
decode, and here also a label-file line naming an unknown class or a missing file
(`Record.bad`). Broken files (a label file without the expected columns, no classes at all)
are a one-line SeesayError naming the file.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

from seesay.data.formats import Record, deterministic_split
from seesay.errors import SeesayError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_DIRS = ("train", "val", "test")


def target_text(label: str) -> str:
    """The caption an image of class `label` is trained to produce."""
    return f"a photo of {label}"


def readable(name: str) -> str:
    """A class folder's name as a label: underscores and slashes as spaces, whitespace collapsed."""
    return " ".join(name.replace("_", " ").replace("/", " ").split())


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (hidden files and other suffixes ignored)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise SeesayError(f"{folder}: cannot list ({e.strerror or e})") from None
    return [p for p in entries if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
            and not p.is_dir()]


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _record(path: Path, image_id: str, split: str, label: str, cls: str, root: Path) -> Record:
    return Record(str(path), image_id, split, [target_text(label)], {"label": label, "class": cls}, 0, str(root))


def _bad(image_id: str, path: str, split: str, why: str, root: Path) -> Record:
    return Record(path, image_id, split, [], {}, 0, str(root), bad=why)


# -- imagefolder -----------------------------------------------------------------------------------
def read_imagefolder(root: str | os.PathLike) -> list[Record]:
    root = Path(root)
    if not root.is_dir():
        raise SeesayError(f"{root}: image folder not found (--images)")
    records: list[Record] = []
    if (root / "train").is_dir():
        for split in SPLIT_DIRS:
            if (root / split).is_dir():
                for cls in _class_dirs(root / split):
                    for p in _images_in(cls):
                        records.append(_record(p, f"{split}/{cls.name}/{p.name}", split, readable(cls.name), cls.name,
                                               root))
    else:
        for cls in _class_dirs(root):
            for p in _images_in(cls):
                records.append(_record(p, f"{cls.name}/{p.name}", "train", readable(cls.name), cls.name, root))
        assign = deterministic_split([r.image_id for r in records])
        for r in records:
            r.split = assign[r.image_id]
    if not records:
        raise SeesayError(f"{root}: no class folders with images (expected ROOT/<class>/<image> or "
                          "ROOT/train/<class>/<image>)")
    return records


# -- imagenet --------------------------------------------------------------------------------------
def read_synset_mapping(path: str | os.PathLike) -> dict[str, str]:
    """LOC_synset_mapping.txt: "n01440764 tench, Tinca tinca" -> {"n01440764": "tench"}."""
    path = Path(path)
    out = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SeesayError(f"{path}: cannot read the synset mapping ({getattr(e, 'strerror', None) or e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        wnid, _, names = line.strip().partition(" ")
        first = names.split(",")[0].strip()
        if not wnid.startswith("n") or not first:
            raise SeesayError(f"{path}: line {n} is not '<wnid> <name>, <name>...': {line[:60]!r}")
        out[wnid] = first
    if not out:
        raise SeesayError(f"{path}: no synsets")
    return out


def _read_val_solution(path: Path) -> dict[str, str]:
    """LOC_val_solution.csv: ImageId -> wnid (the first word of PredictionString)."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise SeesayError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise SeesayError(f"{path}: expected a CSV with the header ImageId,PredictionString")
    out = {}
    for n, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if len(row) < 2 or not row[1].split():
            raise SeesayError(f"{path}: line {n} needs an ImageId and a PredictionString")
        out[row[0].strip()] = row[1].split()[0]
    return out


def read_imagenet(root: str | os.PathLike, synsets: str | os.PathLike | None = None) -> list[Record]:
    root = Path(root)
    data = root / "ILSVRC" / "Data" / "CLS-LOC" if (root / "ILSVRC" / "Data" / "CLS-LOC").is_dir() else root
    if not (data / "train").is_dir():
        raise SeesayError(f"{root}: not an ImageNet folder (no train/<wnid>/ folders, nor ILSVRC/Data/CLS-LOC/train)")
    mapping_file = Path(synsets) if synsets is not None else next(
        (p for p in (root / "LOC_synset_mapping.txt", data / "LOC_synset_mapping.txt") if p.is_file()), None)
    names = read_synset_mapping(mapping_file) if mapping_file is not None else None
    if names is None:
        log.warning("%s: no LOC_synset_mapping.txt: the wnids are the labels", root)
    classes = [p.name for p in _class_dirs(data / "train")]
    if not classes:
        raise SeesayError(f"{data / 'train'}: no class folders")

    def label(wnid: str) -> str:
        return readable(names.get(wnid, wnid)) if names else wnid

    records: list[Record] = []
    for wnid in classes:
        for p in _images_in(data / "train" / wnid):
            records.append(_record(p, f"train/{wnid}/{p.name}", "train", label(wnid), wnid, data))
    val = data / "val"
    if val.is_dir():
        class_dirs = _class_dirs(val)
        if class_dirs:
            for d in class_dirs:
                for p in _images_in(d):
                    iid = f"val/{d.name}/{p.name}"
                    records.append(_record(p, iid, "val", label(d.name), d.name, data) if d.name in classes
                                   else _bad(iid, str(p), "val", f"unknown class ({d.name})", data))
        else:
            solution = next((p for p in (root / "LOC_val_solution.csv", data / "LOC_val_solution.csv") if p.is_file()),
                            None)
            if solution is None:
                raise SeesayError(f"{val}: flat val images need LOC_val_solution.csv in {root} (or val/<wnid>/ folders)")
            labels = _read_val_solution(solution)
            files = {p.stem: p for p in _images_in(val)}
            for image_id, wnid in sorted(labels.items()):
                p = files.get(image_id)
                iid = f"val/{image_id}"
                if wnid not in classes:
                    records.append(_bad(iid, str(p), "val", f"unknown class ({wnid} in {solution.name})", data))
                else:  # a missing file is skipped by prepare as "file not found"
                    records.append(_record(p if p is not None else val / f"{image_id}.JPEG", iid, "val", label(wnid),
                                           wnid, data))
    return records


# -- sun397 ----------------------------------------------------------------------------------------
def _find(names: list[Path]) -> Path | None:
    return next((p for p in names if p.is_file()), None)


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SeesayError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None


def _sun_class(path: str) -> str:
    """"/b/bakery/shop" -> "bakery/shop" (the letter folder dropped)."""
    parts = [p for p in path.strip().split("/") if p]
    return "/".join(parts[1:]) if len(parts) > 1 and len(parts[0]) == 1 else "/".join(parts)


def read_sun397(root: str | os.PathLike, partition: int | None = None) -> list[Record]:
    root = Path(root)
    images = root / "SUN397" if (root / "SUN397").is_dir() else root
    if not images.is_dir():
        raise SeesayError(f"{root}: SUN397 folder not found (--images)")
    places = [root, root / "Partitions", images]
    class_file = _find([p / "ClassName.txt" for p in places])
    if class_file is not None:
        class_paths = _read_lines(class_file)
        for n, c in enumerate(class_paths, 1):
            if not c.startswith("/"):
                raise SeesayError(f"{class_file}: line {n} is not a class path like /a/abbey: {c[:60]!r}")
    else:  # every folder that holds images, below a one-letter folder
        class_paths = sorted("/" + str(d.relative_to(images)) for d in images.rglob("*") if d.is_dir()
                             and len(d.relative_to(images).parts) >= 2 and _images_in(d))
    classes = {_sun_class(c): c for c in class_paths}
    if not classes:
        raise SeesayError(f"{images}: no SUN397 classes (no ClassName.txt and no <letter>/<class>/ image folders)")
    records: list[Record] = []
    if partition is None:
        for cls, cpath in sorted(classes.items()):
            folder = images / cpath.lstrip("/")
            if folder.is_dir():
                for p in _images_in(folder):
                    records.append(_record(p, f"{cls}/{p.name}", "train", readable(cls), cls, images))
        assign = deterministic_split([r.image_id for r in records])
        for r in records:
            r.split = assign[r.image_id]
        if not records:
            raise SeesayError(f"{images}: no images in the SUN397 class folders")
        return records
    nn = f"{int(partition):02d}"
    for kind, split in (("Training", "train"), ("Testing", "test")):
        pfile = _find([p / f"{kind}_{nn}.txt" for p in places])
        if pfile is None:
            raise SeesayError(f"--partition {partition}: {kind}_{nn}.txt not found in {', '.join(map(str, places))}")
        part: list[Record] = []
        for line in _read_lines(pfile):
            rel = line.lstrip("/")
            cls = _sun_class(os.path.dirname("/" + rel))
            p = images / rel
            iid = f"{cls}/{os.path.basename(rel)}"
            if cls not in classes:
                part.append(_bad(iid, str(p), split, f"unknown class ({cls} in {pfile.name})", images))
            else:
                part.append(_record(p, iid, split, readable(cls), cls, images))
        if split == "train":
            assign = deterministic_split([r.image_id for r in part], val_fraction=0.05, test_fraction=0.0)
            for r in part:
                r.split = "val" if assign[r.image_id] == "val" else "train"
        records.extend(part)
    return records


def class_labels(records: list[Record]) -> list[str]:
    """The readable labels of a classification dataset's records, sorted, each once."""
    return sorted({str(r.extra["label"]) for r in records if r.bad is None and "label" in r.extra})
