"""`seesay caption` and the caption library functions on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from seesay import cli
from seesay.caption import caption_files
from seesay.captioner import caption_images
from seesay.checkpoint import load_checkpoint, save_checkpoint
from seesay.data.tokenize import SPECIALS, Vocab
from seesay.decoding import Beam
from seesay.model import build_model

torch.set_num_threads(1)
WORDS = ["a", "red", "blue", "circle", "square", "on", "white"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    vocab = Vocab([*SPECIALS, *WORDS])
    spec = {"encoder": {"name": "small_cnn", "width": 8, "encoded_size": 4, "image_size": 32},
            "decoder": {"name": "soft_attention", "vocab_size": len(vocab), "embed_dim": 16, "attention_dim": 16,
                        "decoder_dim": 16, "dropout": 0.0}}
    model = build_model(spec, tokenizer=vocab, image_size=32).eval()
    with torch.no_grad():  # make "a red circle <end>" the most likely caption so outputs are non-empty
        model.decoder.fc.bias[vocab.end_id] -= 3.0
    path = root / "best"
    save_checkpoint(path, model=model, config={})
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(40, 40), (64, 48), (20, 30)]):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    gray = root / "gray.jpg"
    Image.fromarray(rng.integers(0, 256, (33, 33), dtype=np.uint8), mode="L").save(gray)
    paths.append(str(gray))
    broken = root / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    return paths, str(broken)


def run_cli(args, capsys):
    code = cli.main(["caption", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_caption_files_matches_model_generate(checkpoint, images):
    paths, _ = images
    results = caption_files(checkpoint, paths, Beam(3), max_len=8, batch_size=2, device="cpu")
    assert [r.image for r in results] == paths
    ckpt = load_checkpoint(checkpoint)
    from seesay.data.images import load_image_rgb

    batch = torch.from_numpy(np.stack([load_image_rgb(p, 32) for p in paths])).permute(0, 3, 1, 2)
    direct = caption_images(ckpt.model, batch, Beam(3), max_len=8)
    for r, d in zip(results, direct):
        assert r.error is None
        assert r.caption == d.caption and r.tokens == d.tokens
        assert r.score == pytest.approx(d.score, abs=1e-5)
        assert d.attention.shape == (len(d.tokens), 16)


def test_cli_plain_json_and_output(checkpoint, images, tmp_path, capsys):
    paths, _ = images
    code, out, err = run_cli(["--checkpoint", str(checkpoint), paths[0], "--max-length", "8"], capsys)
    assert code == 0 and err == ""
    assert len(out.splitlines()) == 1 and "\t" not in out
    code, out, _ = run_cli(["--checkpoint", str(checkpoint), *paths, "--json", "--beam-size", "2"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows] == paths
    assert all(set(r) == {"image", "caption", "score"} for r in rows)
    target = tmp_path / "caps.jsonl"
    code, out, _ = run_cli(["--checkpoint", str(checkpoint), *paths, "--json", "--output", str(target)], capsys)
    assert code == 0 and out == ""
    assert len(target.read_text().splitlines()) == len(paths)


def test_cli_sampling_is_seeded(checkpoint, images, capsys):
    paths, _ = images
    args = ["--checkpoint", str(checkpoint), *paths, "--temperature", "1.5", "--top-p", "0.9", "--seed", "3"]
    _, a, _ = run_cli(args, capsys)
    _, b, _ = run_cli(args, capsys)
    assert a == b
    code, _, err = run_cli([*args, "--beam-size", "3"], capsys)
    assert code == 2 and "beam-size" in err


def test_cli_bad_image_is_one_line_and_others_still_captioned(checkpoint, images, capsys):
    paths, broken = images
    missing = paths[0] + ".missing.png"
    code, out, err = run_cli(["--checkpoint", str(checkpoint), paths[0], broken, missing, paths[1]], capsys)
    assert code == 0
    assert len(out.splitlines()) == 2
    err_lines = err.strip().splitlines()
    assert len(err_lines) == 2
    assert "broken.jpg" in err_lines[0] and "missing" in err_lines[1]
    code, out, err = run_cli(["--checkpoint", str(checkpoint), broken, missing], capsys)
    assert code == 1 and out == ""


def test_cli_missing_checkpoint_is_one_line(tmp_path, images):
    paths, _ = images
    proc = subprocess.run([sys.executable, "-m", "seesay", "caption", "--checkpoint", str(tmp_path / "nope"), paths[0]],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_attention_map(checkpoint, images, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths, broken = images
    out_png = tmp_path / "att.png"
    code, out, err = run_cli(["--checkpoint", str(checkpoint), paths[0], broken, paths[1], "--max-length", "6",
                              "--attention-map", str(out_png)], capsys)
    assert code == 0
    written = sorted(p.name for p in tmp_path.glob("att*.png"))
    assert written == ["att-img0.png", "att-img1.png"], written
