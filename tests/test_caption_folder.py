"""`seesay caption DIR` / `--list`: the walk, the output formats, resuming, bad files, interruption."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import seesay.caption as caption_lib
from seesay import cli
from seesay.caption import ImageItem, coco_image_id, find_images
from seesay.checkpoint import save_checkpoint
from seesay.data.tokenize import SPECIALS, Vocab
from seesay.model import build_model

torch.set_num_threads(1)
WORDS = ["a", "red", "blue", "circle", "square", "on", "white"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    vocab = Vocab([*SPECIALS, *WORDS])
    spec = {"encoder": {"name": "small_cnn", "width": 8, "encoded_size": 2, "image_size": 16},
            "decoder": {"name": "show_tell", "vocab_size": len(vocab), "embed_dim": 8, "decoder_dim": 8,
                        "dropout": 0.0}}
    model = build_model(spec, tokenizer=vocab, image_size=16).eval()
    with torch.no_grad():
        model.decoder.fc.bias[vocab.end_id] -= 2.0
    path = tmp_path_factory.mktemp("ckpt") / "best"
    save_checkpoint(path, model=model, config={})
    return path


def _png(path, seed, size=(20, 24)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def tree(tmp_path):
    """root/ with images at three depths, non-images, a hidden image and one broken file."""
    root = tmp_path / "photos"
    _png(root / "b.png", 1)
    _png(root / "a_0042.png", 2)
    _png(root / "sub" / "c.jpg", 3)
    _png(root / "sub" / "deeper" / "d.PNG", 4)
    _png(root / ".hidden.png", 5)
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "data.json").write_text("{}")
    (root / "sub" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


def run_cli(args, capsys):
    code = cli.main(["caption", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_walk_is_recursive_sorted_and_ignores_non_images(tree):
    items = find_images([str(tree)])
    assert [it.rel for it in items] == ["a_0042.png", "b.png", "sub/broken.jpg", "sub/c.jpg", "sub/deeper/d.PNG"]
    assert all(it.path.startswith(str(tree)) for it in items)
    assert find_images([str(tree), str(tree / "b.png")]) == items  # each path once


def test_coco_image_id_from_digits_else_relative_path():
    assert coco_image_id(ImageItem("x/COCO_val2014_000000391895.jpg", "COCO_val2014_000000391895.jpg")) == 391895
    assert coco_image_id(ImageItem("p/sub/c.jpg", "sub/c.jpg")) == "sub/c.jpg"


def test_folder_to_jsonl_lists_bad_files_and_counts(checkpoint, tree, tmp_path, capsys):
    out = tmp_path / "caps.jsonl"
    code, stdout, err = run_cli(["--checkpoint", str(checkpoint), str(tree), "--output", str(out), "--beam-size",
                                 "2", "--max-length", "5", "--batch-size", "2"], capsys)
    assert code == 0 and stdout == ""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(tree / p) for p in ("a_0042.png", "b.png", "sub/c.jpg",
                                                                  "sub/deeper/d.PNG")]
    assert all(r["caption"] for r in rows)
    err_lines = err.strip().splitlines()
    assert any("broken.jpg" in line and "error" in line for line in err_lines)
    assert err_lines[-1] == f"seesay caption: 4 captioned, 0 skipped (already in {out}), 1 bad"


def test_a_folder_packs_each_weight_once_for_the_whole_command(checkpoint, tree, tmp_path, capsys, monkeypatch):
    """One batch at a time, yet each large weight is packed for oneDNN once (seesay.layers.gemm)."""
    from seesay.layers import gemm

    if not gemm.available():
        pytest.skip("no oneDNN float32 product in this torch build")
    monkeypatch.setattr(gemm, "MIN_WEIGHT_ELEMENTS", 0)  # the tiny model's weights count as large
    packed = []
    real = gemm.pack
    monkeypatch.setattr(gemm, "pack", lambda w: packed.append(w.data_ptr()) or real(w))
    code, _, _ = run_cli(["--checkpoint", str(checkpoint), str(tree), "--output", str(tmp_path / "c.jsonl"),
                          "--max-length", "4", "--batch-size", "1", "--device", "cpu"], capsys)  # oneDNN: CPU only
    assert code == 0
    assert len(packed) == len(set(packed)) == 3  # 4 images, 4 decoding calls: W_ih, W_hh, fc packed once


def test_list_input_and_csv(checkpoint, tree, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two photos\n{tree / 'b.png'}\n\n{tree / 'sub' / 'c.jpg'}\n")
    out = tmp_path / "caps.csv"
    code, _, err = run_cli(["--checkpoint", str(checkpoint), "--list", str(listing), "--output", str(out),
                            "--beam-size", "3", "--num-captions", "2", "--max-length", "5"], capsys)
    assert code == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [(r["image"], r["rank"]) for r in rows] == [(str(tree / "b.png"), "1"), (str(tree / "b.png"), "2"),
                                                       (str(tree / "sub" / "c.jpg"), "1"),
                                                       (str(tree / "sub" / "c.jpg"), "2")]
    assert float(rows[0]["score"]) >= float(rows[1]["score"])
    assert not (tmp_path / ".caps.csv.partial.jsonl").exists()
    code, _, err = run_cli(["--checkpoint", str(checkpoint), "--list", str(tmp_path / "nope.txt")], capsys)
    assert code == 2 and "nope.txt: file not found" in err


def test_coco_results_json(checkpoint, tree, tmp_path, capsys):
    out = tmp_path / "results.json"
    code, _, _ = run_cli(["--checkpoint", str(checkpoint), str(tree), "--output", str(out), "--max-length", "4"],
                         capsys)
    assert code == 0
    results = json.loads(out.read_text())
    assert [r["image_id"] for r in results] == [42, "b.png", "sub/c.jpg", "sub/deeper/d.PNG"]
    assert all(set(r) == {"image_id", "caption"} and r["caption"] for r in results)


def test_unknown_output_extension_is_one_line(checkpoint, tree, tmp_path, capsys):
    code, _, err = run_cli(["--checkpoint", str(checkpoint), str(tree), "--output", str(tmp_path / "caps.xml")],
                           capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "unknown extension .xml" in err
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    code, _, err = run_cli(["--checkpoint", str(checkpoint), str(empty)], capsys)
    assert code == 2 and "no image files found" in err


@pytest.mark.parametrize("ext", ["jsonl", "csv", "json"])
def test_rerun_skips_done_images(checkpoint, tree, tmp_path, capsys, ext):
    out = tmp_path / f"caps.{ext}"
    args = ["--checkpoint", str(checkpoint), str(tree), "--output", str(out), "--max-length", "4"]
    run_cli(args, capsys)
    first = out.read_text()
    _png(tree / "sub" / "e.png", 9)
    code, _, err = run_cli(args, capsys)
    assert code == 0
    assert err.strip().splitlines()[-1].startswith("seesay caption: 1 captioned, 4 skipped")
    second = out.read_text()
    if ext == "jsonl":
        assert second.startswith(first) and len(second.splitlines()) == 5
    elif ext == "csv":
        assert second.startswith(first) and len(second.splitlines()) == 6  # header + 5
    else:
        assert [r["image_id"] for r in json.loads(second)][-1] == "sub/e.png"
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert "5 captioned, 0 skipped" in err


def test_bomb_and_bad_files_are_counted_not_fatal(checkpoint, tree, tmp_path, capsys, monkeypatch):
    from PIL import Image

    _png(tree / "big.png", 7, size=(60, 60))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60 x 60 is a "bomb" now, 20 x 24 is not
    out = tmp_path / "caps.jsonl"
    code, _, err = run_cli(["--checkpoint", str(checkpoint), str(tree), "--output", str(out), "--max-length", "3",
                            "--workers", "3"], capsys)
    assert code == 0
    assert any("big.png: decompression bomb" in line for line in err.splitlines())
    assert "4 captioned, 0 skipped" in err and "2 bad" in err
    assert len(out.read_text().splitlines()) == 4


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_interrupted_run_loses_nothing_done_and_resumes(checkpoint, tree, tmp_path, capsys, monkeypatch, ext):
    out = tmp_path / f"caps.{ext}"
    args = ["--checkpoint", str(checkpoint), str(tree), "--output", str(out), "--max-length", "4",
            "--batch-size", "2"]
    real = caption_lib.caption_images
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C while the second batch decodes
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(caption_lib, "caption_images", interrupted)
    code, _, err = run_cli(args, capsys)
    assert code == 130 and "interrupted" in err
    kept = out if ext == "jsonl" else tmp_path / f".caps.{ext}.partial.jsonl"
    done = [json.loads(line)["image"] for line in kept.read_text().splitlines()]
    assert done == [str(tree / "a_0042.png"), str(tree / "b.png")]  # the first batch, complete
    monkeypatch.setattr(caption_lib, "caption_images", real)
    code, _, err = run_cli(args, capsys)
    assert code == 0 and "2 captioned, 2 skipped" in err
    if ext == "jsonl":
        images = [json.loads(line)["image"] for line in out.read_text().splitlines()]
    else:
        images = [r["image"] for r in csv.DictReader(out.read_text().splitlines())]
        assert not kept.exists()
    assert images == [str(tree / p) for p in ("a_0042.png", "b.png", "sub/c.jpg", "sub/deeper/d.PNG")]


def test_unfinished_last_line_is_cut_before_appending(checkpoint, tree, tmp_path, capsys):
    out = tmp_path / "caps.jsonl"
    out.write_text(json.dumps({"image": str(tree / "b.png"), "caption": "a", "score": -1.0}) + '\n{"image": "x')
    code, _, err = run_cli(["--checkpoint", str(checkpoint), str(tree), "--output", str(out), "--max-length", "3"],
                           capsys)
    assert code == 0 and "3 captioned, 1 skipped" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["caption"] == "a"
