"""The RedCaps reader: annotation files, caption or raw_caption, missing images and bad entries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from seesay import cli
from seesay.data.prepare import prepare_dataset
from seesay.data.redcaps import read_redcaps
from seesay.data.store import PreparedData
from seesay.errors import SeesayError

torch.set_num_threads(1)


def _redcaps(root: Path, n: int = 12) -> Path:
    anns = []
    for i in range(n):
        sub = "itookapicture" if i % 2 else "cats"
        image_id = f"id{i}"
        anns.append({"image_id": image_id, "subreddit": sub, "url": f"https://i.redd.it/{image_id}.jpg",
                     "caption": f"my photo number {i}", "raw_caption": f"My Photo #{i}!", "author": "u", "score": i})
        if i != 3:  # id3 was never downloaded
            path = root / "images" / sub / f"{image_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (10, 10), (i * 20, 40, 90)).save(path)
    anns.append({"image_id": "nocap", "subreddit": "cats", "url": "x"})  # no caption
    anns.append({"image_id": "evil", "subreddit": "../..", "caption": "x"})  # not a folder name
    anns.append("not an object")
    (root / "annotations").mkdir(parents=True)
    half = len(anns) // 2
    for name, part in (("cats_2020.json", anns[:half]), ("itookapicture_2021.json", anns[half:])):
        (root / "annotations" / name).write_text(json.dumps({"info": {"year": 2020}, "annotations": part}))
    return root


def test_read_redcaps_caption_and_raw_caption(tmp_path):
    root = _redcaps(tmp_path / "rc")
    recs = read_redcaps(root)
    good = [r for r in recs if r.bad is None]
    assert len(good) == 12 and sorted(r.bad for r in recs if r.bad) == [
        "annotation is not an object", "missing caption", "missing subreddit"]
    r1 = next(r for r in good if r.image_id == "id1")
    assert r1.sentences == ["my photo number 1"] and r1.image_path.endswith("images/itookapicture/id1.jpg")
    assert r1.extra["subreddit"] == "itookapicture" and r1.extra["url"].endswith("id1.jpg")
    assert {r.split for r in good} == {"train", "val", "test"}
    raw = read_redcaps(root, text="raw_caption")
    assert next(r for r in raw if r.image_id == "id1").sentences == ["My Photo #1!"]
    with pytest.raises(SeesayError, match="--redcaps-text"):
        read_redcaps(root, text="title")


def test_prepare_redcaps_counts_bad_items_and_missing_images(tmp_path):
    root = _redcaps(tmp_path / "rc")
    m = prepare_dataset("redcaps", tmp_path / "data", images=root, image_size=8, workers=1, progress=False,
                        max_skip_fraction=0.5, min_word_freq=1)
    assert m["task"] == "caption" and m["prompt"] == "What does the image describe?"
    assert m["captions_per_image"] == 1 and m["source"]["redcaps_text"] == "caption"
    assert m["skipped"] == 4  # 3 bad entries + 1 image never downloaded
    assert m["skipped_reasons"]["file not found"] == 1
    reasons = {s["reason"] for s in PreparedData(tmp_path / "data").skipped()}
    assert {"missing caption", "missing subreddit"} <= reasons
    pre = prepare_dataset("redcaps", tmp_path / "pre", images=root, image_size=8, workers=1, progress=False,
                          max_skip_fraction=0.5, task="pretrain")
    assert pre["task"] == "pretrain" and pre["prompt"] is None
    with pytest.raises(SeesayError, match="more than --max-skip-fraction"):
        prepare_dataset("redcaps", tmp_path / "strict", images=root, image_size=8, workers=1, progress=False)


def test_broken_annotation_file_is_one_line(tmp_path, capsys):
    root = tmp_path / "rc"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "x_2020.json").write_text('{"info": {}, "annotations": {}}')
    with pytest.raises(SeesayError, match="x_2020.json: not a RedCaps annotation file"):
        read_redcaps(root)
    (root / "annotations" / "x_2020.json").write_text("{broken")
    rc = cli.main(["prepare", "--format", "redcaps", "--images", str(root), "--output", str(tmp_path / "o")])
    assert rc != 0
    err = capsys.readouterr().err
    assert "x_2020.json: malformed JSON" in err and "Traceback" not in err
    with pytest.raises(SeesayError, match="no annotations/ folder"):
        read_redcaps(tmp_path)
