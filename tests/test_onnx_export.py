"""`seesay export --format onnx` and the onnxruntime captioner: same captions as PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_DECODERS, TINY_ENCODERS
from seesay import cli
from seesay.captioner import caption_images
from seesay.checkpoint import load_checkpoint, save_checkpoint
from seesay.data.tokenize import SPECIALS, Vocab
from seesay.decoding import Beam, Constraints, DiverseBeam, Greedy, Sample
from seesay.errors import SeesayError
from seesay.export.onnx import export_onnx
from seesay.export.runtime import OnnxCaptioner
from seesay.model import build_model

torch.set_num_threads(1)
WORDS = ["a", "red", "blue", "circle", "square", "on", "white", "the"]
EXPORTABLE = ["show_tell", "soft_attention", "adaptive_attention", "transformer"]


def make_checkpoint(path, decoder: str, encoder: str = "small_cnn", image_size: int | None = None):
    torch.manual_seed(0)
    vocab = Vocab([*SPECIALS, *WORDS])
    spec = {"encoder": {"name": encoder, **TINY_ENCODERS[encoder]},
            "decoder": {"name": decoder, "vocab_size": len(vocab), **TINY_DECODERS[decoder]}}
    model = build_model(spec, tokenizer=vocab, image_size=image_size or TINY_ENCODERS[encoder]["image_size"]).eval()
    fc = getattr(model.decoder, "fc", None)
    if fc is not None:  # captions of several words, so every step and the cache growth are compared
        with torch.no_grad():
            fc.bias[vocab.end_id] -= 3.0
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
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{decoder: (checkpoint dir, export dir)} for every encoder_decoder decoder."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name in EXPORTABLE:
        ckpt = make_checkpoint(root / name / "best", name)
        out[name] = (ckpt, export_onnx(ckpt, root / name / "onnx"))
    return out


def same(a, b, *, scores_atol=1e-4):
    assert a.tokens == b.tokens
    assert a.caption == b.caption
    assert a.score == pytest.approx(b.score, abs=scores_atol)


@pytest.mark.parametrize("name", EXPORTABLE)
def test_export_writes_checked_graphs(exported, name):
    import onnx

    _, folder = exported[name]
    layout = json.loads((folder / "onnx.json").read_text())
    files = ["encoder.onnx", "decoder_init.onnx", *[s["file"] for s in layout["steps"]]]
    assert sorted(files) == sorted(p.name for p in folder.glob("*.onnx"))
    for f in files:
        onnx.checker.check_model(onnx.load(str(folder / f)), full_check=True)
    assert (folder / "tokenizer").is_dir() and (folder / "preprocess.json").is_file()
    kinds = {leaf["name"]: leaf["kind"] for s in layout["steps"] for leaf in s["inputs"]}
    if name == "transformer":  # the KV cache appears after the first step and grows with time
        assert [s["file"] for s in layout["steps"]] == ["decoder_first_step.onnx", "decoder_step.onnx"]
        grows = {leaf["name"]: leaf["time_axes"] for leaf in layout["steps"][1]["inputs"]}
        assert grows["k0"] == [2] and grows["tokens"] == [1]
        assert kinds["mem_k0"] == "image" and kinds["k0"] == "row"
    if name == "soft_attention":  # beams share the image's memory
        assert kinds["mem_grid"] == "image" and kinds["h"] == "row"


@pytest.mark.parametrize("name", EXPORTABLE)
@pytest.mark.parametrize("strategy", [Greedy(), Beam(3)], ids=["greedy", "beam3"])
def test_onnx_captions_equal_pytorch(exported, images, name, strategy):
    ckpt, folder = exported[name]
    model = load_checkpoint(ckpt).model
    runtime = OnnxCaptioner(folder, threads=1)
    want = caption_images(model, images, strategy, max_len=10)
    got = caption_images(runtime, images, strategy, max_len=10)
    assert max(len(c.tokens) for c in want) > 2
    for a, b in zip(got, want):
        same(a, b)
        if b.attention is None:
            assert a.attention is None
        else:
            assert torch.allclose(a.attention, b.attention, atol=1e-4)


@pytest.mark.parametrize("name", ["soft_attention", "transformer"])
def test_onnx_controls_equal_pytorch(exported, images, name):
    """Prompts, constraints, several captions, diverse beams and seeded sampling all run through
    seesay's decoding over the ONNX step (memory rows follow decode()'s image removals)."""
    ckpt, folder = exported[name]
    model = load_checkpoint(ckpt).model
    runtime = OnnxCaptioner(folder, threads=1)
    cases = [
        (Beam(4), dict(num_captions=3, prompt="a", constraints=Constraints(no_repeat_ngram_size=2))),
        (DiverseBeam(4, 2, 0.5), dict(num_captions=2, constraints=Constraints(min_length=3, bad_endings=("the",)))),
        (Sample(temperature=1.0, seed=3), dict(num_captions=3)),
    ]
    for strategy, kw in cases:
        want = caption_images(model, images, strategy, max_len=8, **kw)
        got = caption_images(runtime, images, strategy, max_len=8, **kw)
        for ga, wa in zip(got, want):
            for a, b in zip(ga, wa):
                same(a, b)


def test_in_graph_resize_goes_through_dynamo(tmp_path, images):
    """A checkpoint prepared at 48 px for a 32 px encoder: the antialiased resize in the encoder's
    preprocessing has no TorchScript translation, so the encoder graph comes from dynamo."""
    ckpt = make_checkpoint(tmp_path / "best", "soft_attention", image_size=48)
    folder = export_onnx(ckpt, tmp_path / "onnx")
    assert json.loads((folder / "onnx.json").read_text())["exporter"]["encoder"] == "dynamo"
    want = caption_images(load_checkpoint(ckpt).model, images, Greedy(), max_len=8)
    got = caption_images(OnnxCaptioner(folder, threads=1), images, Greedy(), max_len=8)
    for a, b in zip(got, want):
        same(a, b)


def test_non_exportable_families_are_refused_in_one_line(tmp_path, capsys):
    pytest.importorskip("titans_pytorch")
    ckpt = make_checkpoint(tmp_path / "titans" / "best", "titans_mac")
    code = cli.main(["export", "--checkpoint", str(ckpt), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "titans_mac" in err and "cannot be exported to ONNX" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_multimodal_captioner_is_refused(tmp_path):
    pytest.importorskip("titans_pytorch")
    from seesay.multimodal import MultimodalMAC

    model = MultimodalMAC(image_size=32, patch_size=8, vision_dim=32, vision_depth=1, vision_heads=2,
                          vision_mlp_dim=64, num_tokens=256, text_dim=32, depth=1, segment_len=32,
                          num_image_tokens=4, heads=2, dim_head=16)
    save_checkpoint(tmp_path / "mm", model=model, config={})
    with pytest.raises(SeesayError, match=r"multimodal_mac.*only encoder \+ step-decoder captioners"):
        export_onnx(tmp_path / "mm", tmp_path / "out")


def test_cli_export_and_caption_with_onnx_runtime(tmp_path, images, capsys):
    ckpt = make_checkpoint(tmp_path / "run" / "best", "soft_attention")
    out = tmp_path / "export"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--output", str(out)]) == 0
    assert "ONNX graphs written" in capsys.readouterr().out
    common = [*images, "--json", "--beam-size", "3", "--max-length", "8"]
    assert cli.main(["caption", "--checkpoint", str(ckpt), *common]) == 0
    want = capsys.readouterr().out
    assert cli.main(["caption", "--runtime", "onnx", "--checkpoint", str(out), *common]) == 0
    got = capsys.readouterr().out
    assert [json.loads(line)["caption"] for line in got.splitlines()] == \
        [json.loads(line)["caption"] for line in want.splitlines()]
    # an export is not a checkpoint, and a checkpoint is not an export: one line each
    assert cli.main(["caption", "--checkpoint", str(out), images[0]]) == 2
    assert "add --runtime onnx" in capsys.readouterr().err
    assert cli.main(["caption", "--runtime", "onnx", "--checkpoint", str(ckpt), images[0]]) == 2
    assert "not an ONNX export" in capsys.readouterr().err
    # a second export replaces the first; a folder holding something else is refused
    assert cli.main(["export", "--checkpoint", str(ckpt), "--output", str(out)]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert cli.main(["export", "--checkpoint", str(ckpt), "--output", str(other)]) == 2
    assert "not a seesay ONNX export" in capsys.readouterr().err
