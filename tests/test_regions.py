"""Region records: COCO instance annotations (with bad items) and the built-in shapes' boxes."""

from __future__ import annotations

import json

import pytest

from conftest import prepared_shapes
from seesay.data.regions import read_coco_instances, read_shapes_regions, regions_summary, shape_phrase
from seesay.data.synth import make_shapes
from seesay.errors import SeesayError


def _instances(images, annotations, categories=None):
    return {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]}


def _coco_dir(tmp_path, val=None, train=None):
    ann = tmp_path / "coco" / "annotations"
    ann.mkdir(parents=True)
    if val is not None:
        (ann / "instances_val2014.json").write_text(json.dumps(val))
    if train is not None:
        (ann / "instances_train2014.json").write_text(json.dumps(train))
    return tmp_path / "coco"


def test_coco_instances_with_bad_items(tmp_path):
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 640, "height": 480} for i in range(1, 9)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 18, "bbox": [10, 20, 100, 50], "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [600, 400, 100, 100], "iscrowd": 0},  # clipped
        {"id": 3, "image_id": 3, "category_id": 1, "bbox": [5, 5, 50, 50], "iscrowd": 1},  # crowd
        {"id": 4, "image_id": 4, "category_id": 1, "bbox": [5, 5, 0, 50], "iscrowd": 0},  # zero width
        {"id": 5, "image_id": 5, "category_id": 1, "bbox": [5, 5, -3, 50]},  # negative width
        {"id": 6, "image_id": 6, "category_id": 1, "bbox": ["a", 5, 3, 50]},  # not numbers
        {"id": 7, "image_id": 7, "category_id": 1, "bbox": [700, 10, 20, 20]},  # outside the image
        {"id": 8, "image_id": 99, "category_id": 1, "bbox": [5, 5, 30, 30]},  # no such image
        {"id": 9, "image_id": 8, "category_id": 77, "bbox": [5, 5, 30, 30]},  # no such category
    ]
    root = _coco_dir(tmp_path, val=_instances(images, anns))
    regions = read_coco_instances(root)
    assert [(r.image_id, r.text, r.box) for r in regions] == [
        ("1", "dog", (10.0, 20.0, 110.0, 70.0)),
        ("2", "person", (600.0, 400.0, 640.0, 480.0)),
    ]
    assert dict(regions.skipped) == {"crowd": 1, "degenerate box": 4, "unknown image": 1, "unknown category": 1}
    r = regions.regions[0]
    assert (r.width, r.height) == (640, 480) and r.image_path.endswith("val2014/COCO_val2014_000000000001.jpg")
    # val2014 without Karpathy's split: k = n // 4 = 2 val, 2 test, the rest train (ids sorted)
    assert [r.split for r in regions] == ["val", "val"]
    assert "crowd 1" in regions_summary(regions)


def test_coco_instances_follow_karpathy_split(tmp_path):
    images = [{"id": 7, "file_name": "a.jpg", "width": 10, "height": 10}]
    anns = [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0}]
    root = _coco_dir(tmp_path, train=_instances(images, anns))
    (root / "dataset_coco.json").write_text(json.dumps({"images": [{"cocoid": 7, "split": "test"}]}))
    assert [r.split for r in read_coco_instances(root)] == ["test"]


@pytest.mark.parametrize("data, message", [
    ([], "not a COCO instances file"),
    ({"images": [], "annotations": []}, "not a COCO instances file"),
    (_instances([{"id": 1, "file_name": "a.jpg"}], []), r"images\[0\]: needs positive integer 'width'"),
    (_instances([], [{"image_id": 1, "bbox": [0, 0, 1, 1]}]), r"annotations\[0\]: needs"),
    (_instances([], [], [{"id": 1}]), r"categories\[0\]"),
])
def test_broken_instances_file_is_one_line(tmp_path, data, message):
    root = _coco_dir(tmp_path, val=data)
    with pytest.raises(SeesayError, match=message) as e:
        read_coco_instances(root)
    assert "instances_val2014.json" in str(e.value) and "\n" not in str(e.value)


def test_coco_dir_without_instances(tmp_path):
    (tmp_path / "coco").mkdir()
    with pytest.raises(SeesayError, match="instances_train2014.json"):
        read_coco_instances(tmp_path / "coco")
    (tmp_path / "coco" / "annotations").mkdir()
    (tmp_path / "coco" / "annotations" / "instances_val2014.json").write_text("{oops")
    with pytest.raises(SeesayError, match="malformed JSON"):
        read_coco_instances(tmp_path / "coco")


def test_shape_phrases():
    red_small = {"shape": "circle", "color": "red", "size": "small"}
    red_large = {"shape": "circle", "color": "red", "size": "large"}
    orange = {"shape": "star", "color": "orange", "size": "large"}
    assert shape_phrase(red_small, [red_small, orange]) == "a red circle"
    assert shape_phrase(orange, [red_small, orange]) == "an orange star"
    assert shape_phrase(red_large, [red_small, red_large]) == "a large red circle"


def test_shapes_regions_from_the_json_and_from_prepared_data(tmp_path):
    ann = make_shapes(tmp_path / "raw", num_images=12, image_size=32, val_fraction=0.25, test_fraction=0.0)
    data = json.loads(ann.read_text())
    regions = read_shapes_regions(ann)
    objects = [(img["filename"], o) for img in data["images"] for o in img["objects"]]
    assert len(regions) == len(objects) >= 12
    for r, (name, o) in zip(regions, objects):
        assert r.image_id == name and list(r.box) == o["box"] and (r.width, r.height) == (32, 32)
        assert r.text.endswith(f"{o['color']} {o['shape']}") and r.text.split()[0] in ("a", "an")
        assert 0 <= r.box[0] < r.box[2] <= 32 and 0 <= r.box[1] < r.box[3] <= 32
    # the noun phrase is one the captions use
    first = data["images"][0]
    caption_text = " ".join(s["raw"].lower() for s in first["sentences"])
    assert any(o["color"] + " " + o["shape"] in caption_text for o in first["objects"])
    assert read_shapes_regions(tmp_path / "raw").regions == regions.regions  # the folder works too

    prepared = prepared_shapes(tmp_path / "p", num_images=12, image_size=32)
    from_prepared = read_shapes_regions(prepared)
    assert len(from_prepared) == len(read_shapes_regions(tmp_path / "p" / "raw"))
    assert {r.split for r in from_prepared} == {"train", "val"}
    assert all(r.index is not None for r in from_prepared)


def test_not_shapes_is_one_line(tmp_path):
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train", "width": 5, "height": 5}]}))
    with pytest.raises(SeesayError, match=r"no 'objects' list"):
        read_shapes_regions(p)
