"""`seesay prepare` end to end: every format, bad items, resume after a kill, the CLI."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seesay.data.images import load_image_rgb
from seesay.data.prepare import STOP_ENV, PrepareInterrupted, prepare_dataset
from seesay.data.store import open_prepared
from seesay.data.tokenize import Vocab
from seesay.errors import SeesayError

COLORS = ["red", "green", "blue", "yellow"]


def _image(path: Path, i: int, size=(24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(i)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _karpathy(tmp_path: Path, n=24, *, filepath="images", sentences_per_image=None) -> tuple[Path, Path]:
    root = tmp_path / "src"
    images = []
    for i in range(n):
        _image(root / filepath / f"{i:04d}.png", i, size=(24 + i % 3, 20))
        k = sentences_per_image(i) if sentences_per_image else 5
        sents = [{"raw": f"A {COLORS[(i + j) % 4]} circle, number {j}.", "tokens": []} for j in range(k)]
        split = "train" if i < n * 3 // 4 else ("val" if i % 2 else "test")
        images.append({"filepath": filepath, "filename": f"{i:04d}.png", "imgid": i, "split": split,
                       "sentences": sents, "objects": [{"shape": "circle", "box": [1, 2, 3, 4]}]})
    ann = root / "dataset_shapes.json"
    ann.write_text(json.dumps({"dataset": "shapes", "images": images}))
    return ann, root


def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w x h pixels (a decompression bomb that costs nothing to make)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))
    return path


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_empty_and_long_captions_are_dropped_and_counted(tmp_path):
    from seesay.data.prepare import summary_line

    root = tmp_path / "imgs"
    root.mkdir()
    rows = []
    for i in range(6):
        _image(root / f"{i}.png", i)
        rows.append({"image": f"{i}.png", "text": "a red square", "split": "train" if i < 4 else "test"})
    rows += [{"image": "0.png", "text": "", "split": "train"},  # blank: dropped by the reader
             {"image": "1.png", "text": "  \t ", "split": "train"},  # whitespace only
             {"image": "2.png", "text": "?!", "split": "train"},  # no tokens left after tokenising
             {"image": "3.png", "text": "a very long red square " * 5, "split": "train"}]  # 25 tokens
    ann = tmp_path / "pairs.json"
    ann.write_text(json.dumps(rows))
    m = prepare_dataset("pairs", tmp_path / "data", annotations=ann, images=root, image_size=16, max_len=10,
                        min_word_freq=1, workers=1, progress=False)
    assert (m["empty_captions"], m["long_captions"], m["dropped_captions"]) == (3, 1, 4)
    assert m["skipped"] == 0 and m["splits"]["train"]["images"] == 4
    line = summary_line(m, tmp_path / "data")
    assert "3 empty" in line and "1 longer than 10 tokens" in line
    refs = open_prepared(tmp_path / "data").split("train").references
    assert all(r.strip() for rs in refs for r in rs)  # no blank reference reaches evaluation


def test_karpathy_prepare_layout_and_contents(tmp_path):
    def per_image(i):
        return 2 if i == 0 else 7 if i == 1 else 5

    ann, root = _karpathy(tmp_path, sentences_per_image=per_image)
    # one caption too long: dropped and counted, still a reference
    data = json.loads(ann.read_text())
    data["images"][2]["sentences"].append({"raw": " ".join(["word"] * 12)})
    # a word only in val/test must not enter the vocabulary
    data["images"][-1]["sentences"][0]["raw"] = "zebra zebra zebra zebra zebra zebra"
    ann.write_text(json.dumps(data))
    out = tmp_path / "data"
    m = prepare_dataset("karpathy", out, annotations=ann, images=root, image_size=16, max_len=10,
                        min_word_freq=2, workers=1, progress=False)
    assert m["splits"] == {"train": {"images": 18, "captions": 90}, "val": {"images": 3, "captions": 15},
                           "test": {"images": 3, "captions": 15}}
    assert m["dropped_captions"] == 1 and m["skipped"] == 0 and m["image_size"] == 16
    assert m["tokenizer"] == "word" and m["caption_length"] == 12
    assert not (tmp_path / "data.partial").exists()
    for name in ("manifest.json", "vocab.json", "skipped.jsonl", "train/images.npy", "train/captions.npy",
                 "train/lengths.npy", "train/references.jsonl", "train/meta.jsonl"):
        assert (out / name).is_file(), name
    vocab = Vocab.load(out / "vocab.json")
    assert vocab.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and "zebra" not in vocab
    assert {"a", "circle", "number", "red", "green", "blue", "yellow"} <= set(vocab.itos)
    assert m["vocab_size"] == len(vocab)

    pd = open_prepared(out)
    train = pd.split("train")
    assert train.images.shape == (18, 16, 16, 3) and train.images.dtype == np.uint8
    assert train.captions.shape == (18, 5, 12) and train.captions.dtype == np.int32
    np.testing.assert_array_equal(train.images[3], load_image_rgb(root / "images" / "0003.png", 16))
    # image 0 has 2 captions: both kept, 3 more sampled from them; image 1 has 7: the first 5 kept
    decoded0 = [vocab.decode(c) for c in train.captions[0]]
    assert decoded0[:2] == ["a red circle number 0", "a green circle number 1"]
    assert set(decoded0[2:]) <= set(decoded0[:2])
    assert [vocab.decode(c) for c in train.captions[1]] == [f"a {COLORS[(1 + j) % 4]} circle number {j}" for j in range(5)]
    assert train.lengths[0, 0] == 7 and train.captions[0, 0, 0] == vocab.start_id and train.captions[0, 0, 6] == vocab.end_id
    assert (train.captions[0, 0, 7:] == 0).all()
    assert len(train.references[2]) == 6 and train.references[2][-1] == " ".join(["word"] * 12)
    assert train.references[0] == ["A red circle, number 0.", "A green circle, number 1."]
    meta = train.meta[3]
    assert meta["image_id"] == "0003.png" and meta["extra"]["orig_size"] == [24, 20]
    assert meta["extra"]["objects"][0]["box"] == [1, 2, 3, 4] and meta["extra"]["imgid"] == 3


def test_coco_prepare(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for sub, ids in (("train2014", range(1, 6)), ("val2014", range(100, 108))):
        images, anns = [], []
        for iid in ids:
            name = f"COCO_{sub}_{iid:012d}.jpg"
            _image(root / sub / name, iid)
            images.append({"id": iid, "file_name": name})
            anns += [{"id": iid * 10 + k, "image_id": iid, "caption": f"a photo of thing {k}"} for k in range(5)]
        (root / "annotations" / f"captions_{sub}.json").write_text(json.dumps({"images": images, "annotations": anns}))
    m = prepare_dataset("coco", tmp_path / "out", coco_dir=root, image_size=8, min_word_freq=1, workers=2,
                        progress=False)
    assert m["splits"]["train"]["images"] == 5 + 4 and m["splits"]["val"]["images"] == 2
    assert m["splits"]["test"]["images"] == 2
    assert open_prepared(tmp_path / "out").split("val").image_ids == ["100", "101"]


def test_pairs_prepare_without_splits(tmp_path):
    items = []
    for i in range(40):
        _image(tmp_path / "img" / f"p{i}.png", i)
        items += [{"image": f"p{i}.png", "text": f"thing number {i % 5}"}, {"image": f"p{i}.png", "text": "a thing"}]
    (tmp_path / "pairs.json").write_text(json.dumps(items))
    m = prepare_dataset("pairs", tmp_path / "out", annotations=tmp_path / "pairs.json", images=tmp_path / "img",
                        image_size=8, min_word_freq=1, captions_per_image=3, workers=1, progress=False)
    assert sum(s["images"] for s in m["splits"].values()) == 40
    assert m["splits"]["val"]["images"] == 2 and m["splits"]["test"]["images"] == 2
    assert open_prepared(tmp_path / "out").split("train").captions.shape[1] == 3


def test_aichallenger_prepare_chinese(tmp_path):
    sents = ["一个穿着红色衣服的女人在草地上行走", "草地上有一个穿着红色衣服的女人", "一个女人在草地上",
             "女人在草地上行走", "穿着红色衣服的女人在行走"]
    data = []
    for i in range(12):
        _image(tmp_path / "img" / f"{i:x}.jpg", i)
        data.append({"image_id": f"{i:x}.jpg", "url": "u", "caption": sents})
    (tmp_path / "ai.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    m = prepare_dataset("aichallenger", tmp_path / "out", annotations=tmp_path / "ai.json",
                        images=tmp_path / "img", image_size=8, workers=1, progress=False)
    assert m["tokenizer"] == "jieba"
    pd = open_prepared(tmp_path / "out")
    assert "女人" in pd.vocab and "草地" in pd.vocab
    assert pd.vocab.decode(pd.split("train").captions[0, 0]) == sents[0]
    refs = pd.split("train").references[0]
    assert refs == sents
    mc = prepare_dataset("aichallenger", tmp_path / "char", annotations=tmp_path / "ai.json",
                         images=tmp_path / "img", image_size=8, workers=1, progress=False, tokenizer="char")
    assert mc["tokenizer"] == "char" and "女" in open_prepared(tmp_path / "char").vocab


def _bad_dataset(tmp_path: Path, n_good=60) -> tuple[Path, Path, dict[str, str]]:
    root = tmp_path / "src"
    items = []
    for i in range(n_good):
        _image(root / f"g{i}.png", i)
    # converted, never dropped
    Image.new("L", (12, 9), 77).save(root / "g0.png")
    Image.new("CMYK", (12, 9), (0, 200, 0, 0)).save(root / "g1.jpg")
    Image.new("RGBA", (12, 9), (9, 9, 9, 0)).save(root / "g2.png")
    Image.new("RGB", (12, 9), (5, 100, 5)).convert("P").save(root / "g3.png")
    Image.fromarray(np.full((9, 12), 30000, dtype=np.uint16)).save(root / "g4.png")
    names = [f"g{i}.png" for i in range(n_good)]
    names[1] = "g1.jpg"
    bad = {"missing.png": "file not found", "zero.png": "empty file", "text.png": "not an image",
           "trunc.png": "truncated image", "bomb.png": "decompression bomb"}
    (root / "zero.png").write_bytes(b"")
    (root / "text.png").write_text("hello")
    big = tmp_path / "big.png"
    _image(big, 0, size=(300, 300))
    (root / "trunc.png").write_bytes(big.read_bytes()[:5000])
    _png_header_only(root / "bomb.png", 10000, 10000)
    order = names[:10] + list(bad) + names[10:]
    for k, name in enumerate(order):
        items.append({"image": name, "text": f"a thing in picture {k % 3}", "split": "train" if k % 4 else "val"})
    ann = tmp_path / "pairs.json"
    ann.write_text(json.dumps(items))
    return ann, root, bad


def test_bad_items_skipped_listed_and_counted(tmp_path, capsys):
    ann, root, bad = _bad_dataset(tmp_path)
    m = prepare_dataset("pairs", tmp_path / "out", annotations=ann, images=root, image_size=8, min_word_freq=1,
                        workers=2, progress=False, max_skip_fraction=0.1, _chunk_size=4)
    assert m["skipped"] == 5
    assert m["skipped_reasons"] == {"decompression bomb": 1, "empty file": 1, "file not found": 1,
                                    "not an image": 1, "truncated image": 1}
    lines = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert {x["image_id"]: x["reason"].split(" (")[0] for x in lines} == bad
    pd = open_prepared(tmp_path / "out")
    total = sum(len(pd.split(s)) for s in pd.splits)
    assert total == 60
    # rows were compacted: every stored image is its own file's pixels
    for s in pd.splits:
        st = pd.split(s)
        for i, meta in enumerate(st.meta):
            np.testing.assert_array_equal(st.images[i], load_image_rgb(meta["image"], 8))
    ids = [i for s in pd.splits for i in pd.split(s).image_ids]
    assert {"g0.png", "g1.jpg", "g2.png", "g3.png", "g4.png"} <= set(ids)

    from seesay.data.prepare import summary_line

    line = summary_line(m, tmp_path / "out")
    assert line.startswith("prepared 60 images (train ") and "skipped 5: see " in line and "\n" not in line


def test_too_many_bad_items_fail_clearly(tmp_path):
    ann, root, _ = _bad_dataset(tmp_path, n_good=20)
    with pytest.raises(SeesayError) as e:
        prepare_dataset("pairs", tmp_path / "out", annotations=ann, images=root, image_size=8, min_word_freq=1,
                        workers=1, progress=False)
    msg = str(e.value)
    assert "5 of 25 images" in msg and "--max-skip-fraction" in msg and "skipped.jsonl" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "out.partial" / "skipped.jsonl").is_file()


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_prepare_resumes_to_identical_result(tmp_path, workers):
    ann, root, _ = _bad_dataset(tmp_path, n_good=40)
    kw = dict(annotations=ann, images=root, image_size=8, min_word_freq=1, progress=False,
              max_skip_fraction=0.2, _chunk_size=3, workers=workers)
    clean = tmp_path / "clean"
    prepare_dataset("pairs", clean, **kw)
    out = tmp_path / "out"
    with pytest.raises(PrepareInterrupted):
        prepare_dataset("pairs", out, _stop_after_chunks=4, **kw)
    assert not out.exists()
    done = list((tmp_path / "out.partial" / "chunks").glob("*.json"))
    assert 4 <= len(done) < 15
    with pytest.raises(PrepareInterrupted):  # a second interruption, further on
        prepare_dataset("pairs", out, _stop_after_chunks=3, **kw)
    # chunks holding bad images are tried again, so progress is at least one new chunk
    assert len(list((tmp_path / "out.partial" / "chunks").glob("*.json"))) > len(done)
    prepare_dataset("pairs", out, **kw)
    assert not (tmp_path / "out.partial").exists()
    assert _files(out) == _files(clean)


def test_fixed_images_are_picked_up_on_rerun(tmp_path):
    ann, root, bad = _bad_dataset(tmp_path, n_good=20)
    kw = dict(annotations=ann, images=root, image_size=8, min_word_freq=1, workers=1, progress=False, _chunk_size=4)
    with pytest.raises(SeesayError, match="are bad"):
        prepare_dataset("pairs", tmp_path / "out", **kw)
    for i, name in enumerate(bad):  # the user repairs the bad files and runs again
        (root / name).unlink(missing_ok=True)
        _image(root / name, 100 + i)
    m = prepare_dataset("pairs", tmp_path / "out", **kw)
    assert m["skipped"] == 0 and sum(v["images"] for v in m["splits"].values()) == 25
    prepare_dataset("pairs", tmp_path / "clean", **kw)
    assert _files(tmp_path / "out") == _files(tmp_path / "clean")


def test_killed_cli_run_resumes(tmp_path):
    ann, root = _karpathy(tmp_path, n=150)
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "seesay", "prepare", "--format", "karpathy", "--annotations", str(ann),
           "--images", str(root), "--output", str(out), "--image-size", "8", "--workers", "2", "--no-progress"]
    env = {**os.environ, STOP_ENV: "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr  # hard exit, like a kill
    assert not out.exists() and (tmp_path / "data.partial" / "chunks").is_dir()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("prepared 150 images (train 112 / val 19 / test 19), skipped 0")
    clean = tmp_path / "clean"
    prepare_dataset("karpathy", clean, annotations=ann, images=root, image_size=8, workers=1, progress=False)
    assert _files(out) == _files(clean)


def test_stale_partial_and_existing_output(tmp_path):
    ann, root = _karpathy(tmp_path, n=12)
    kw = dict(annotations=ann, images=root, min_word_freq=1, workers=1, progress=False, _chunk_size=2)
    out = tmp_path / "data"
    with pytest.raises(PrepareInterrupted):
        prepare_dataset("karpathy", out, image_size=8, _stop_after_chunks=2, **kw)
    # other options: the stale partial is discarded, the result is right
    m = prepare_dataset("karpathy", out, image_size=12, **kw)
    assert open_prepared(out).split("train").images.shape[1:] == (12, 12, 3)
    # same inputs again: nothing to do
    assert prepare_dataset("karpathy", out, image_size=12, **kw) == m
    with pytest.raises(SeesayError, match="--overwrite"):
        prepare_dataset("karpathy", out, image_size=10, **kw)
    prepare_dataset("karpathy", out, image_size=10, overwrite=True, **kw)
    assert open_prepared(out).image_size == 10
    assert not (tmp_path / "data.old").exists()


def test_concurrent_prepare_of_one_output_is_refused(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    ann, root = _karpathy(tmp_path, n=4)
    lock = open(tmp_path / "data.lock", "w")  # noqa: SIM115 - held for the test
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with pytest.raises(SeesayError, match="another seesay prepare is writing it"):
            prepare_dataset("karpathy", tmp_path / "data", annotations=ann, image_size=4, workers=1, progress=False)
    finally:
        lock.close()
    prepare_dataset("karpathy", tmp_path / "data", annotations=ann, image_size=4, workers=1, progress=False,
                    min_word_freq=1)
    assert not (tmp_path / "data.lock").exists()


def test_records_api_and_option_errors(tmp_path):
    _image(tmp_path / "a.png", 1)
    recs = [{"image": str(tmp_path / "a.png"), "image_id": "a", "split": "train", "sentences": ["one two"],
             "extra": {"k": 1}}]
    m = prepare_dataset(None, tmp_path / "o", records=recs, image_size=4, min_word_freq=1, workers=1, progress=False)
    assert m["splits"] == {"train": {"images": 1, "captions": 5}} and m["source"] == {"format": "records"}
    assert open_prepared(tmp_path / "o").split("train").meta[0]["extra"]["k"] == 1
    mb = prepare_dataset(None, tmp_path / "b", records=[{**recs[0], "sentences": ["über 猫"]}], image_size=4,
                         tokenizer="byte", max_len=12, workers=1, progress=False)
    assert mb["vocab_size"] == 260 and mb["dropped_captions"] == 0
    pb = open_prepared(tmp_path / "b")
    assert pb.vocab.decode(pb.split("train").captions[0, 0]) == "über 猫"
    assert pb.split("train").lengths[0, 0] == len("über 猫".encode()) + 2
    with pytest.raises(SeesayError, match="--max-len"):
        prepare_dataset(None, tmp_path / "p", records=recs, max_len=0)
    with pytest.raises(SeesayError, match="tokenizer"):
        prepare_dataset(None, tmp_path / "p", records=recs, tokenizer="bpe")
    with pytest.raises(SeesayError, match="no usable training images"):
        prepare_dataset(None, tmp_path / "p", records=[{**recs[0], "split": "val"}], workers=1, progress=False)


def test_cli_prepare_and_one_line_errors(tmp_path):
    ann, root = _karpathy(tmp_path, n=8)
    base = [sys.executable, "-m", "seesay", "prepare", "--format", "karpathy", "--images", str(root),
            "--image-size", "8", "--min-word-freq", "1", "--workers", "1", "--no-progress"]
    proc = subprocess.run(base + ["--annotations", str(ann), "--output", str(tmp_path / "d")], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "prepared 8 images (train 6 / val 1 / test 1), skipped 0"
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [\n{"filename": "a.png",, }]}')
    proc = subprocess.run(base + ["--annotations", str(bad), "--output", str(tmp_path / "e")], capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "broken.json: malformed JSON at line 2 column" in proc.stderr
