"""Readers, tokenisers, the vocabulary and image loading, on small fixtures built here."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seesay.data.formats import (
    Record,
    deterministic_split,
    load_json,
    read_aichallenger,
    read_coco,
    read_karpathy,
    read_pairs,
    read_records,
)
from seesay.data.images import load_image_rgb, read_image
from seesay.data.tokenize import SPECIALS, Vocab, build_vocab, detokenize, tokenize
from seesay.errors import SeesayError


def _img(path: Path, size=(40, 30), color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# -- readers -------------------------------------------------------------------------------------
def test_karpathy_flickr_flat_folder(tmp_path):
    ann = {"dataset": "flickr8k", "images": [
        {"filename": "a.jpg", "imgid": 0, "split": "train", "sentids": [0, 1],
         "sentences": [{"raw": "A dog runs.", "tokens": ["a", "dog", "runs"]}, {"raw": "A dog.", "tokens": ["a", "dog"]}]},
        {"filename": "b.jpg", "imgid": 1, "split": "test", "sentids": [2],
         "sentences": [{"raw": "Two cats", "tokens": ["two", "cats"]}]},
    ]}
    (tmp_path / "d.json").write_text(json.dumps(ann))
    recs = read_karpathy(tmp_path / "d.json", tmp_path / "imgs")
    assert [r.image_id for r in recs] == ["a.jpg", "b.jpg"]
    assert recs[0].image_path == str(tmp_path / "imgs" / "a.jpg")
    assert recs[0].sentences == ["A dog runs.", "A dog."]
    assert recs[1].split == "test"
    assert recs[0].extra == {"imgid": 0}


def test_karpathy_coco_filepath_restval_and_extra(tmp_path):
    ann = {"images": [
        {"filepath": "val2014", "filename": "x.jpg", "cocoid": 42, "split": "restval",
         "sentences": [{"raw": "a cat"}], "objects": [{"shape": "circle", "box": [0, 0, 4, 4]}], "width": 8},
    ]}
    (tmp_path / "d.json").write_text(json.dumps(ann))
    r = read_karpathy(tmp_path / "d.json", tmp_path)[0]
    assert r.split == "train" and r.image_id == "42"
    assert r.image_path == str(tmp_path / "val2014" / "x.jpg")
    assert r.extra["objects"][0]["box"] == [0, 0, 4, 4] and r.extra["width"] == 8 and r.extra["cocoid"] == 42
    assert read_karpathy(tmp_path / "d.json", tmp_path, keep_restval=True)[0].split == "restval"


def _coco(tmp_path: Path, n_train=3, n_val=8, karpathy=False) -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    aid = 0
    for sub, n, base in (("train2014", n_train, 100), ("val2014", n_val, 500)):
        images, anns = [], []
        for i in range(n):
            iid = base + (n - i)  # ids out of order on purpose
            images.append({"id": iid, "file_name": f"COCO_{sub}_{iid:012d}.jpg", "width": 40, "height": 30})
            for k in range(2):
                aid += 1
                anns.append({"id": aid, "image_id": iid, "caption": f"image {iid} caption {k}"})
        (root / "annotations" / f"captions_{sub}.json").write_text(json.dumps({"images": images, "annotations": anns}))
    if karpathy:
        kimgs = [{"filepath": "val2014", "filename": "f", "cocoid": 501, "split": "test", "sentences": []},
                 {"filepath": "val2014", "filename": "f", "cocoid": 502, "split": "restval", "sentences": []},
                 {"filepath": "val2014", "filename": "f", "cocoid": 503, "split": "val", "sentences": []}]
        (root / "dataset_coco.json").write_text(json.dumps({"images": kimgs}))
    return root


def test_coco_without_karpathy_split_is_deterministic(tmp_path):
    root = _coco(tmp_path)
    recs = read_coco(root)
    train = [r for r in recs if r.extra["coco_split"] == "train2014"]
    val = sorted((r for r in recs if r.extra["coco_split"] == "val2014"), key=lambda r: int(r.image_id))
    assert all(r.split == "train" for r in train)
    # k = min(5000, 8 // 4) = 2: lowest ids to val, next two to test, rest to train
    assert [r.split for r in val] == ["val", "val", "test", "test", "train", "train", "train", "train"]
    assert val[0].sentences == [f"image {val[0].image_id} caption 0", f"image {val[0].image_id} caption 1"]
    assert val[0].image_path.endswith(f"val2014/COCO_val2014_{int(val[0].image_id):012d}.jpg")


def test_coco_with_karpathy_split(tmp_path):
    root = _coco(tmp_path, karpathy=True)
    by_id = {r.image_id: r.split for r in read_coco(root)}
    assert by_id["501"] == "test" and by_id["502"] == "train" and by_id["503"] == "val"
    assert by_id["504"] == "train"  # not listed in Karpathy's file
    assert {r.image_id: r.split for r in read_coco(root, keep_restval=True)}["502"] == "restval"


def test_pairs_groups_texts_and_splits(tmp_path):
    items = [{"image": f"{i % 30}.jpg", "text": f"caption {i}"} for i in range(60)]
    (tmp_path / "p.json").write_text(json.dumps(items))
    recs = read_pairs(tmp_path / "p.json", tmp_path)
    assert len(recs) == 30 and recs[0].sentences == ["caption 0", "caption 30"]
    counts = {s: sum(r.split == s for r in recs) for s in ("train", "val", "test")}
    assert counts == {"train": 26, "val": 2, "test": 2}
    again = read_pairs(tmp_path / "p.json", tmp_path)
    assert [r.split for r in again] == [r.split for r in recs]
    # the split of an image does not depend on the order of the file
    (tmp_path / "q.json").write_text(json.dumps(items[::-1]))
    rev = {r.image_id: r.split for r in read_pairs(tmp_path / "q.json", tmp_path)}
    assert rev == {r.image_id: r.split for r in recs}


def test_pairs_explicit_splits_and_conflicts(tmp_path):
    items = [{"image": "a.jpg", "text": "x", "split": "val"}, {"image": "a.jpg", "text": "y", "split": "val"},
             {"image": "b.jpg", "text": "z"}]
    (tmp_path / "p.json").write_text(json.dumps(items))
    recs = read_pairs(tmp_path / "p.json", tmp_path)
    assert [(r.image_id, r.split) for r in recs] == [("a.jpg", "val"), ("b.jpg", "train")]
    items.append({"image": "a.jpg", "text": "w", "split": "test"})
    (tmp_path / "p.json").write_text(json.dumps(items))
    with pytest.raises(SeesayError, match="two splits"):
        read_pairs(tmp_path / "p.json", tmp_path)


def test_aichallenger_reader_and_chinese(tmp_path):
    data = [{"url": "http://x", "image_id": f"{i}.jpg",
             "caption": ["一个穿着红色衣服的女人在草地上行走", "草地上有一个女人\n", "  "]} for i in range(4)]
    (tmp_path / "c.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    recs = read_aichallenger(tmp_path / "c.json", tmp_path)
    assert len(recs) == 4
    assert recs[0].sentences == ["一个穿着红色衣服的女人在草地上行走", "草地上有一个女人"]  # blanks dropped
    assert recs[0].extra == {"url": "http://x"}


def test_malformed_json_is_one_line_with_position(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image": "a.jpg",\n "text": }]')
    with pytest.raises(SeesayError) as e:
        load_json(bad)
    msg = str(e.value)
    assert "\n" not in msg and "bad.json" in msg and "line 2" in msg
    for fmt in ("pairs", "aichallenger", "karpathy"):
        with pytest.raises(SeesayError, match="bad.json: malformed JSON at line 2"):
            read_records(fmt, annotations=bad, images=tmp_path)
    with pytest.raises(SeesayError, match="not a Karpathy split"):
        (tmp_path / "k.json").write_text("[]")
        read_karpathy(tmp_path / "k.json", tmp_path)
    with pytest.raises(SeesayError, match="needs --coco-dir"):
        read_records("coco")


def test_deterministic_split_small_sets():
    assert set(deterministic_split(["a", "b"]).values()) == {"train"}
    s = deterministic_split(["a", "b", "c"])
    assert sorted(s.values()) == ["test", "train", "val"]


def test_record_from_dict():
    r = Record.from_any({"image": "x.png", "sentences": "one", "split": "val"})
    assert r.image_id == "x.png" and r.sentences == ["one"] and r.split == "val"


# -- tokenisers and vocabulary ---------------------------------------------------------------------
def test_word_tokenizer_is_karpathy_like():
    assert tokenize("A man's hat, on a  RED-brick wall!") == ["a", "man's", "hat", "on", "a", "red", "brick", "wall"]
    assert tokenize("\"Two\" dogs; 3 cats_here...") == ["two", "dogs", "3", "cats", "here"]
    assert tokenize("Café crème") == ["café", "crème"]
    assert tokenize("!!!") == []


def test_char_and_byte_tokenizers_round_trip():
    assert tokenize("ab  c", "char") == ["a", "b", " ", "c"]
    text = "猫 on a mat"
    toks = tokenize(text, "byte")
    assert len(toks) == len(text.encode("utf-8")) and detokenize(toks, "byte") == text
    v = build_vocab([toks], "byte", min_word_freq=100)
    assert len(v) == 4 + 256 and v.decode(v.encode(text)) == text


def test_jieba_tokenizer():
    toks = tokenize("一个穿着红色衣服的女人在草地上行走。", "jieba")
    assert "女人" in toks and "草地" in toks and "。" not in toks
    assert "".join(toks) == "一个穿着红色衣服的女人在草地上行走"


def test_vocab_order_min_freq_and_specials():
    caps = [["b", "a"], ["a", "c"], ["b", "d"], ["a"]]
    v = build_vocab(caps, "word", min_word_freq=2)
    assert v.itos == [*SPECIALS, "a", "b"]  # a:3, b:2 (ties broken by text), c/d rare
    assert (v.pad_id, v.start_id, v.end_id, v.unk_id) == (0, 1, 2, 3)
    assert v.encode_tokens(["a", "zzz", "c"], add_special=True) == [1, 4, 3, 3, 2]
    assert v.decode([1, 4, 3, 5, 2, 4, 0]) == "a <unk> b"
    # min_word_freq 0 or 1 keeps everything; an empty corpus gives only the specials
    assert len(build_vocab(caps, "word", 0)) == 8 and len(build_vocab([], "word", 1)) == 4
    tie = build_vocab([["y", "x"]], "word", 1)
    assert tie.itos[4:] == ["x", "y"]
    # a caption token that looks like a special token does not become one
    assert build_vocab([["<unk>", "<unk>"]], "word", 1).itos == list(SPECIALS)


def test_vocab_save_load(tmp_path):
    v = build_vocab([["猫", "狗"], ["猫"]], "jieba", 1)
    v.save(tmp_path / "vocab.json")
    w = Vocab.load(tmp_path / "vocab.json")
    assert w == v and w.tokenizer == "jieba" and w.counts["猫"] == 2
    assert w.decode(w.encode_tokens(["猫", "狗"])) == "猫狗"
    (tmp_path / "bad.json").write_text('{"itos": ["a"]}')
    with pytest.raises(SeesayError, match="bad.json"):
        Vocab.load(tmp_path / "bad.json")


# -- images --------------------------------------------------------------------------------------
def _png_header_only(path: Path, w: int, h: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))
    return path


def test_modes_are_converted_to_rgb(tmp_path):
    Image.new("L", (20, 10), 128).save(tmp_path / "gray.png")
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.new("RGB", (20, 10), (0, 0, 255)).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(np.full((10, 20), 65535, dtype=np.uint16)).save(tmp_path / "sixteen.png")
    Image.new("LA", (20, 10), (50, 255)).save(tmp_path / "la.png")
    for name in ("gray.png", "cmyk.jpg", "rgba.png", "pal.png", "sixteen.png", "la.png"):
        a = load_image_rgb(tmp_path / name, 8)
        assert a.shape == (8, 8, 3) and a.dtype == np.uint8, name
    full = load_image_rgb(tmp_path / "rgba.png", None)
    assert full.shape == (10, 20, 3) and tuple(full[0, 0]) == (255, 255, 255) and tuple(full[5, 5]) == (255, 0, 0)
    assert tuple(load_image_rgb(tmp_path / "sixteen.png", None)[0, 0]) == (255, 255, 255)
    assert tuple(load_image_rgb(tmp_path / "gray.png", None)[0, 0]) == (128, 128, 128)
    r, g, b = load_image_rgb(tmp_path / "cmyk.jpg", None)[5, 5].tolist()
    assert r > 200 and g < 60 and b < 60
    assert tuple(load_image_rgb(tmp_path / "pal.png", None)[0, 0]) == (0, 0, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image_rgb(tmp_path / "rot.jpg", None).shape == (40, 20, 3)


def test_resize_squashes_and_reports_original_size(tmp_path):
    _img(tmp_path / "a.png", (40, 30))
    arr, wh = read_image(tmp_path / "a.png", 16)
    assert arr.shape == (16, 16, 3) and wh == (40, 30) and tuple(arr[8, 8]) == (200, 10, 10)


def test_bad_images_raise_one_line_errors(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    _img(tmp_path / "full.jpg", (64, 64))
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    _png_header_only(tmp_path / "bomb.png", 10000, 10000)  # 1e8 pixels > PIL's ~8.9e7 limit
    _png_header_only(tmp_path / "bigbomb.png", 30000, 30000)  # PIL itself refuses this one
    cases = {"missing.jpg": "file not found", "zero.jpg": "empty file", "text.jpg": "not an image",
             "trunc.jpg": "truncated", "bomb.png": "decompression bomb", "bigbomb.png": "decompression bomb"}
    for name, reason in cases.items():
        with pytest.raises(SeesayError) as e:
            load_image_rgb(tmp_path / name, 8)
        msg = str(e.value)
        assert msg.startswith(f"{tmp_path / name}: ") and reason in msg and "\n" not in msg, msg
