"""`seesay visualize`, `seesay plot` and `seesay report` end to end on a tiny trained run."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from seesay import cli  # noqa: E402

try:  # tests/ is not a package: pytest puts it on sys.path (rootdir-relative "prepend" import)
    from test_viz_report import image_check, render_dom  # noqa: E402
except ImportError:  # pragma: no cover - a package layout
    from .test_viz_report import image_check, render_dom  # noqa: E402


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A tiny prepared shapes dataset and a run trained on it for 2 epochs (tiny sizes)."""
    import torch

    from seesay.config import Config
    from seesay.data.prepare import prepare_dataset
    from seesay.data.synth import make_shapes
    from seesay.train.caption_task import train_captioner

    root = tmp_path_factory.mktemp("viz")
    ann = make_shapes(root / "raw", num_images=30, seed=1, image_size=64, val_fraction=0.2, test_fraction=0.2)
    data = root / "data"
    prepare_dataset("karpathy", data, annotations=ann, images=root / "raw", image_size=32, min_word_freq=1,
                    workers=1, progress=False)
    cfg = Config()
    cfg.data.path, cfg.data.workers = str(data), 0
    cfg.encoder.name, cfg.encoder.fine_tune = "small_cnn", True
    cfg.encoder.options = {"width": 8, "encoded_size": 4, "image_size": 32}
    cfg.decoder.name = "soft_attention"
    cfg.decoder.options = {"embed_dim": 16, "attention_dim": 16, "decoder_dim": 32, "dropout": 0.0}
    cfg.train.output = str(root / "run")
    cfg.train.epochs, cfg.train.batch_size, cfg.train.val_max_len = 2, 20, 12
    cfg.train.device, cfg.train.progress, cfg.train.tensorboard = "cpu", False, False
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_captioner(cfg)
    finally:
        torch.set_num_threads(threads)
    image = root / "photo.png"
    Image.open(root / "raw" / "images" / sorted(p.name for p in (root / "raw" / "images").iterdir())[0]).convert(
        "RGB"
    ).resize((80, 60)).save(image)
    return {"root": root, "data": data, "run": root / "run", "image": image}


def _tiny_checkpoint(path, decoder, data):
    """A randomly initialised checkpoint with another decoder, for the vocabulary of `data`."""
    import torch

    from seesay.checkpoint import save_checkpoint
    from seesay.data.tokenize import Vocab
    from seesay.model import build_model

    torch.manual_seed(0)
    vocab = Vocab.load(data / "vocab.json")
    spec = {
        "encoder": {"name": "small_cnn", "width": 8, "encoded_size": 4, "image_size": 32},
        "decoder": {"name": decoder, "vocab_size": len(vocab), "embed_dim": 16, "decoder_dim": 32, "dropout": 0.0},
    }
    if decoder in ("soft_attention", "adaptive_attention"):
        spec["decoder"]["attention_dim"] = 16
    model = build_model(spec, tokenizer=vocab, image_size=32)
    save_checkpoint(path, model=model, config={})
    return path


@pytest.mark.slow
@pytest.mark.parametrize("beam", [1, 3])
def test_visualize_command(shapes, tmp_path, capsys, beam):
    out = tmp_path / "att.png"
    rc = cli.main(["visualize", "--checkpoint", str(shapes["run"] / "best"), "--image", str(shapes["image"]),
                   "--output", str(out), "--beam-size", str(beam), "--max-length", "12", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"attention map: {out}" in printed
    with Image.open(out) as im:
        assert im.size[0] > 200 and np.asarray(im.convert("L")).std() > 5


@pytest.mark.slow
def test_visualize_matches_generate(shapes, tmp_path):
    """The figure shows the decoded words with exactly the attention generate() returned."""
    import torch

    from seesay.checkpoint import load_checkpoint
    from seesay.data.images import load_image_rgb
    from seesay.decoding import Beam
    from seesay.viz import visualize as V

    ckpt = load_checkpoint(shapes["run"] / "best")
    drawn = {}

    def fake_save(output, image, words, attention, grid_hw, **kw):
        drawn.update(words=list(words), attention=np.asarray(attention), grid_hw=grid_hw, image=image)
        return output

    mp = pytest.MonkeyPatch()
    mp.setattr(V, "save_attention_map", fake_save)
    try:
        res = V.visualize_image(ckpt, shapes["image"], tmp_path / "x.png", beam_size=2, max_len=12, device="cpu")
    finally:
        mp.undo()
    x = torch.from_numpy(np.array(load_image_rgb(shapes["image"], 32))).permute(2, 0, 1)[None]
    ref = ckpt.model.generate(x, Beam(2), max_len=12)
    n = int(ref.lengths[0])
    assert drawn["words"] == res.words == [ckpt.vocab.itos[t] for t in ref.tokens[0, :n].tolist()]
    np.testing.assert_allclose(drawn["attention"], ref.attention[0, :n].numpy(), atol=1e-6)
    assert drawn["grid_hw"] == (4, 4)
    assert drawn["image"].shape == (60, 80, 3)  # the original picture, aspect kept


@pytest.mark.slow
def test_visualize_adaptive_and_errors(shapes, tmp_path, capsys):
    ada = _tiny_checkpoint(tmp_path / "ada", "adaptive_attention", shapes["data"])
    out = tmp_path / "ada.png"
    assert cli.main(["visualize", "--checkpoint", str(ada), "--image", str(shapes["image"]), "--output", str(out),
                     "--max-length", "6", "--device", "cpu"]) == 0
    assert out.is_file()
    st = _tiny_checkpoint(tmp_path / "st", "show_tell", shapes["data"])
    assert cli.main(["visualize", "--checkpoint", str(st), "--image", str(shapes["image"]), "--output",
                     str(tmp_path / "st.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no attention" in err[0]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert cli.main(["visualize", "--checkpoint", str(ada), "--image", str(bad), "--output", str(out)]) == 2
    assert "bad.png" in capsys.readouterr().err


@pytest.mark.slow
def test_caption_attention_hook(shapes, tmp_path):
    """What `seesay caption --attention-map` calls: path image, inferred grid, sentinel column."""
    from seesay.viz.attention import attention_map_paths
    from seesay.viz.visualize import infer_grid_hw, save_caption_attention

    assert infer_grid_hw(196) == (14, 14) and infer_grid_hw(65, has_sentinel=True) == (8, 8)
    assert infer_grid_hw(65) == (8, 8) and infer_grid_hw(64) == (8, 8)
    att = np.random.default_rng(0).random((3, 17))
    outs = attention_map_paths(tmp_path / "att.png", [shapes["image"], shapes["image"].with_name("b.png")])
    p = save_caption_attention(outs[0], shapes["image"], ["a", "red", "<end>"], att)
    assert p == tmp_path / "att-photo.png" and p.is_file()


@pytest.mark.slow
def test_save_attention_maps_for_caption_results(shapes, tmp_path):
    """The helper `seesay caption --attention-map` uses, on real caption_images() output."""
    from collections import namedtuple

    import torch

    from seesay.captioner import caption_images
    from seesay.checkpoint import load_checkpoint
    from seesay.data.images import load_image_rgb
    from seesay.decoding import Beam
    from seesay.errors import SeesayError
    from seesay.viz.visualize import save_attention_maps

    ckpt = load_checkpoint(shapes["run"] / "best")
    x = torch.from_numpy(np.array(load_image_rgb(shapes["image"], 32))).permute(2, 0, 1)[None]
    r = caption_images(ckpt.model, x, Beam(2), max_len=10)[0]
    Result = namedtuple("Result", "image caption score tokens error attention")
    ok = Result(str(shapes["image"]), r.caption, r.score, r.tokens, None, r.attention)
    failed = Result(str(tmp_path / "missing.png"), None, None, [], "missing.png: no such file", None)
    written = save_attention_maps(tmp_path / "maps" / "att.png", [ok, failed], shapes["run"] / "best")
    assert written == [tmp_path / "maps" / "att-photo.png"] and written[0].is_file()
    assert save_attention_maps(tmp_path / "one.png", [ok], ckpt.vocab) == [tmp_path / "one.png"]
    with pytest.raises(SeesayError, match="no attention"):
        save_attention_maps(tmp_path / "x.png", [ok._replace(attention=None)], ckpt.vocab)


@pytest.mark.slow
def test_plot_command_on_real_runs(shapes, tmp_path, capsys):
    recs = [json.loads(x) for x in (shapes["run"] / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["epoch"] for r in recs] == [1, 2]
    other = tmp_path / "with_attention"
    other.mkdir()
    (other / "metrics.jsonl").write_text((shapes["run"] / "metrics.jsonl").read_text())
    out = tmp_path / "curves.png"
    assert cli.main(["plot", str(shapes["run"]), str(other / "best"), "--output", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as im:
        assert im.size[0] > 800


@pytest.mark.slow
def test_report_command_renders_in_chromium(shapes, tmp_path, capsys):
    from seesay.data.store import open_prepared

    out = tmp_path / "report.html"
    rc = cli.main(["report", "--checkpoint", str(shapes["run"] / "best"), "--data", str(shapes["data"]), "--split",
                   "test", "--num-images", "5", "--output", str(out), "--beam-size", "2", "--max-length", "12",
                   "--device", "cpu"])
    assert rc == 0
    assert "5 images" in capsys.readouterr().out
    page = out.read_text(encoding="utf-8")
    ids = re.findall(r'<div class="item" id="img-([^"]+)"', page)
    store = open_prepared(shapes["data"]).split("test")
    assert sorted(ids) == sorted(store.image_ids[:5])
    cider = [float(x) for x in re.findall(r'<span class="key">CIDEr ([0-9.]+)</span>', page)]
    worst = cider[: (len(cider) + 1) // 2]
    best = cider[(len(cider) + 1) // 2 :]
    assert worst == sorted(worst) and best == sorted(best, reverse=True)
    assert not best or max(worst) <= min(best)

    dom = render_dom(out, tmp_path)
    total, decoded = image_check(dom)
    assert total >= 5 + 5 and decoded == total  # 5 photos plus at least one attention panel each
    text = html.unescape(re.sub(r"<[^>]+>", " ", dom))
    captions = [html.unescape(c) for c in re.findall(r'<p class="caption">(.*?)</p>', page)]
    assert len(captions) == 5
    for c in captions:
        assert c in text
    for i in range(5):
        for r in store.references[i]:
            assert r in text
