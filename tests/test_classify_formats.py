"""Classification readers (imagefolder, imagenet, sun397): labels, splits, targets, bad items, manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from seesay import cli
from seesay.data.classify_formats import read_imagefolder, read_imagenet, read_sun397, read_synset_mapping
from seesay.data.prepare import prepare_dataset
from seesay.data.store import PreparedData
from seesay.errors import SeesayError

torch.set_num_threads(1)


def _img(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)
    return path


def _prepare(fmt, images, out, **kw):
    return prepare_dataset(fmt, out, images=images, image_size=8, workers=1, progress=False,
                           max_skip_fraction=kw.pop("max_skip_fraction", 0.5), **kw)


def test_imagefolder_with_split_folders(tmp_path):
    root = tmp_path / "folder"
    for split, n in (("train", 3), ("val", 1), ("test", 1)):
        for cls in ("tabby_cat", "dog"):
            for i in range(n):
                _img(root / split / cls / f"{i}.png")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")  # a bad image
    recs = read_imagefolder(root)
    assert {r.split for r in recs} == {"train", "val", "test"}
    cat = next(r for r in recs if r.image_id == "train/tabby_cat/0.png")
    assert cat.sentences == ["a photo of tabby cat"] and cat.extra == {"label": "tabby cat", "class": "tabby_cat"}
    m = _prepare("imagefolder", root, tmp_path / "data")
    assert m["task"] == "classify" and m["labels"] == ["dog", "tabby cat"]
    assert m["prompt"] == "What does the image describe?" and m["captions_per_image"] == 1
    assert m["splits"]["train"]["images"] == 6 and m["skipped"] == 1
    data = PreparedData(tmp_path / "data")
    assert data.vocab.encode("a photo of tabby cat")[-1] != data.vocab.unk_id  # min_word_freq 1 for classes
    skipped = data.skipped()
    assert [s["image_id"] for s in skipped] == ["train/dog/broken.jpg"]


def test_imagefolder_without_splits_is_split_deterministically(tmp_path):
    root = tmp_path / "flat"
    for cls in ("a", "b"):
        for i in range(10):
            _img(root / cls / f"{i}.jpg")
    one, two = read_imagefolder(root), read_imagefolder(root)
    assert [(r.image_id, r.split) for r in one] == [(r.image_id, r.split) for r in two]
    counts = {s: sum(r.split == s for r in one) for s in ("train", "val", "test")}
    assert counts == {"train": 18, "val": 1, "test": 1}
    with pytest.raises(SeesayError, match="no class folders"):
        read_imagefolder(tmp_path / "flat" / "a")


def _imagenet(root: Path, flat_val: bool) -> Path:
    root.mkdir(parents=True)
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn02123045 tabby, tabby cat\n")
    for wnid in ("n01440764", "n02123045"):
        for i in range(3):
            _img(root / "train" / wnid / f"{wnid}_{i}.JPEG")
    if flat_val:
        _img(root / "val" / "ILSVRC2012_val_00000001.JPEG")
        _img(root / "val" / "ILSVRC2012_val_00000002.JPEG")
        _img(root / "val" / "ILSVRC2012_val_00000003.JPEG")
        (root / "LOC_val_solution.csv").write_text(
            "ImageId,PredictionString\n"
            "ILSVRC2012_val_00000001,n01440764 1 2 3 4\n"
            "ILSVRC2012_val_00000002,n02123045 1 2 3 4 n02123045 5 6 7 8\n"
            "ILSVRC2012_val_00000003,n09999999 1 2 3 4\n")  # a class the train set lacks
    else:
        _img(root / "val" / "n02123045" / "v.JPEG")
        _img(root / "val" / "n09999999" / "w.JPEG")
    return root


@pytest.mark.parametrize("flat_val", [True, False])
def test_imagenet(tmp_path, flat_val):
    root = _imagenet(tmp_path / "in", flat_val)
    recs = read_imagenet(root)
    train = [r for r in recs if r.split == "train"]
    assert len(train) == 6 and {r.extra["label"] for r in train} == {"tench", "tabby"}
    bad = [r for r in recs if r.bad]
    assert len(bad) == 1 and bad[0].bad.startswith("unknown class (n09999999")
    m = _prepare("imagenet", root, tmp_path / "data")
    assert m["labels"] == ["tabby", "tench"] and m["skipped_reasons"] == {"unknown class": 1}
    assert m["splits"]["val"]["images"] == (2 if flat_val else 1)
    refs = PreparedData(tmp_path / "data").split("val").references
    assert ["a photo of tabby"] in refs


def test_imagenet_bad_files(tmp_path):
    root = _imagenet(tmp_path / "in", True)
    (root / "LOC_val_solution.csv").write_text("id,label\nx,y\n")
    with pytest.raises(SeesayError, match="LOC_val_solution.csv.*ImageId,PredictionString"):
        read_imagenet(root)
    (root / "LOC_synset_mapping.txt").write_text("garbage\n")
    with pytest.raises(SeesayError, match="LOC_synset_mapping.txt: line 1"):
        read_synset_mapping(root / "LOC_synset_mapping.txt")
    with pytest.raises(SeesayError, match="not an ImageNet folder"):
        read_imagenet(tmp_path)


def _sun(root: Path) -> Path:
    images = root / "SUN397"
    classes = ["/a/abbey", "/b/bakery/shop", "/b/bus_interior"]
    (images).mkdir(parents=True)
    (images / "ClassName.txt").write_text("\n".join(classes) + "\n")
    for c in classes:
        for i in range(4):
            _img(images / c.lstrip("/") / f"sun_{i}.jpg")
    parts = root / "Partitions"
    parts.mkdir()
    (parts / "Training_01.txt").write_text("\n".join(f"{c}/sun_{i}.jpg" for c in classes for i in range(3))
                                           + "\n/z/zoo/sun_9.jpg\n")
    (parts / "Testing_01.txt").write_text("\n".join(f"{c}/sun_3.jpg" for c in classes) + "\n")
    return root


def test_sun397_partition_and_default_split(tmp_path):
    root = _sun(tmp_path / "sun")
    recs = read_sun397(root, partition=1)
    assert {r.extra["label"] for r in recs if not r.bad} == {"abbey", "bakery shop", "bus interior"}
    assert sum(r.split == "test" for r in recs) == 3 and sum(r.split == "val" for r in recs) >= 1
    assert [r.bad for r in recs if r.bad] == ["unknown class (zoo in Training_01.txt)"]
    plain = read_sun397(root)
    assert len(plain) == 12 and {r.split for r in plain} == {"train", "val", "test"}
    with pytest.raises(SeesayError, match="Training_02.txt not found"):
        read_sun397(root, partition=2)
    rc = cli.main(["prepare", "--format", "sun397", "--images", str(root), "--partition", "1", "--output",
                   str(tmp_path / "data"), "--image-size", "8", "--workers", "1", "--no-progress",
                   "--max-skip-fraction", "0.2"])
    assert rc == 0
    m = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert m["task"] == "classify" and m["source"]["partition"] == 1 and m["skipped"] == 1


def test_task_and_prompt_overrides(tmp_path):
    root = tmp_path / "folder"
    for cls in ("a", "b"):
        for i in range(4):
            _img(root / cls / f"{i}.png")
    m = _prepare("imagefolder", root, tmp_path / "d", prompt="What is this?")
    assert m["prompt"] == "What is this?"
    # only the prompt changed: the prepared data is reused and its manifest updated
    m2 = _prepare("imagefolder", root, tmp_path / "d", task="caption")
    assert m2["task"] == "caption" and "labels" not in m2 and m2["prompt"] == "What does the image describe?"
    assert PreparedData(tmp_path / "d").manifest["task"] == "caption"
    with pytest.raises(SeesayError, match="--prompt does not apply"):
        _prepare("imagefolder", root, tmp_path / "e", task="pretrain", prompt="x")


def test_synth_shapes_imagefolder_command(tmp_path, capsys):
    rc = cli.main(["synth", "shapes", "--format", "imagefolder", "--output", str(tmp_path / "s"), "--num-images", "10",
                   "--image-size", "32", "--val-fraction", "0.2", "--test-fraction", "0.2"])
    assert rc == 0 and "--format imagefolder" in capsys.readouterr().out
    recs = read_imagefolder(tmp_path / "s")
    assert len(recs) == 10 and {r.split for r in recs} == {"train", "val", "test"}
    assert all(r.sentences == [f"a photo of {r.extra['label']}"] and len(r.extra["label"].split()) == 2 for r in recs)
    first = sorted((tmp_path / "s").rglob("*.png"))
    cli.main(["synth", "shapes", "--format", "imagefolder", "--output", str(tmp_path / "t"), "--num-images", "10",
              "--image-size", "32", "--val-fraction", "0.2", "--test-fraction", "0.2"])
    again = sorted((tmp_path / "t").rglob("*.png"))
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]  # deterministic
