"""Masked image modelling: VQ codes as `<img_i>` targets, seeded patch masks, mixed with span
corruption in one batch, exact resume, on the built-in shapes with a tiny swinv2 + t5 (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_DECODERS, TINY_ENCODERS, tiny_train_config
from seesay.data.prepare import prepare_dataset
from seesay.data.store import PreparedData
from seesay.errors import SeesayError
from seesay.train.mim import code_cache, patch_mask, with_image_tokens

torch.set_num_threads(1)
pytest.importorskip("sentencepiece")
pytest.importorskip("transformers")

K = 16  # codebook


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(caption data, pretrain data, VQ dir): 16 shapes images of 32 px, SentencePiece; a 4x4-code VQ."""
    from seesay.data.synth import make_shapes
    from seesay.vq.small import SmallVQ, SmallVQConfig

    root = tmp_path_factory.mktemp("mim")
    ann = make_shapes(root / "raw", num_images=16, seed=0, image_size=32, val_fraction=0.25, test_fraction=0.0)
    common = dict(annotations=ann, images=root / "raw", image_size=32, tokenizer="sentencepiece", vocab_size=150,
                  workers=1, progress=False, captions_per_image=2)
    prepare_dataset("karpathy", root / "cap", **common)
    prepare_dataset("karpathy", root / "pre", task="pretrain", **common)
    torch.manual_seed(0)
    vq = SmallVQ(SmallVQConfig(codebook_size=K, downsample=8, image_size=32, hidden=16, embed_dim=8))
    vq.save_pretrained(root / "vq")
    return root / "cap", root / "pre", root / "vq"


def test_patch_masks_are_seeded_and_have_the_ratio():
    a = patch_mask(64, 0.75, 1, 0, 0, 5)
    assert a.dtype == bool and a.sum() == 48
    assert np.array_equal(a, patch_mask(64, 0.75, 1, 0, 0, 5))  # same (seed, epoch, dataset, image)
    assert not np.array_equal(a, patch_mask(64, 0.75, 1, 1, 0, 5))  # another epoch
    assert not np.array_equal(a, patch_mask(64, 0.75, 1, 0, 0, 6))  # another image
    assert patch_mask(64, 0.0, 1, 0, 0, 5).sum() == 0 and patch_mask(64, 1.0, 1, 0, 0, 5).all()


def test_codes_are_cached_and_become_image_tokens(setup, tmp_path):
    from seesay.vq import load_vq

    cap, _, vq_dir = setup
    p = PreparedData(cap)
    store = p.split("train")
    vq = load_vq(vq_dir)
    codes = code_cache(vq, vq_dir, store, tmp_path, data_dir=cap)
    assert codes.shape == (len(store), 16) and codes.dtype == np.int32 and 0 <= codes.min() and codes.max() < K
    x = torch.from_numpy(np.array(store.images[:2])).permute(0, 3, 1, 2)
    assert np.array_equal(codes[:2], vq.encode(x).flatten(1).numpy())
    (cached,) = tmp_path.iterdir()
    mtime = (cached / "codes.npy").stat().st_mtime_ns
    code_cache(vq, vq_dir, store, tmp_path, data_dir=cap)  # read back, not recomputed
    assert (cached / "codes.npy").stat().st_mtime_ns == mtime and not list(tmp_path.glob(".*tmp*"))
    tok = with_image_tokens(p.vocab, K)
    first = tok.token_to_id("<img_0>")
    assert first == len(p.vocab) and tok.token_to_id(f"<img_{K - 1}>") == first + K - 1
    assert tok.encode("a red circle") == p.vocab.encode("a red circle")  # the data's ids are unchanged
    assert tok.decode([first + 3, first + 7, tok.eos_id]) == "<img_3> <img_7>"


def _cfg(cap, pre, vq, out, epochs, resume, **data):
    cfg = tiny_train_config(pre, out, epochs=epochs, resume=resume, seed=4, batch_size=8)
    cfg.encoder.name, cfg.encoder.options = "swinv2", dict(TINY_ENCODERS["swinv2"])
    cfg.encoder.fine_tune = True
    cfg.decoder.name, cfg.decoder.options = "t5", {**TINY_DECODERS["t5"], "dropout": 0.1, "max_target_length": 24}
    cfg.data.datasets = [str(pre), str(cap)]
    cfg.data.vae_ckpt_path, cfg.data.image_vocab_size = str(vq), K
    cfg.train.image_mask_ratio = 0.5
    cfg.train.val_max_len = 6
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_mim_rows_train_and_resume_exactly(setup, tmp_path, monkeypatch):
    from seesay.train.caption_task import train_captioner
    from seesay.train.objectives import CrossEntropy

    cap, pre, vq = setup
    seen = []
    original = CrossEntropy.__call__

    def spy(self, model, src, tokens, lengths, image_rows=None, prompt=None, bool_masked_pos=None):
        seen.append((src.shape[0], tokens.clone(), bool_masked_pos))
        return original(self, model, src, tokens, lengths, image_rows, prompt=prompt, bool_masked_pos=bool_masked_pos)

    monkeypatch.setattr(CrossEntropy, "__call__", spy)
    train_captioner(_cfg(cap, pre, vq, tmp_path / "full", 2, False))
    masked = [(n, t, m) for n, t, m in seen if m is not None]
    assert masked, "no batch had a masked-image row"
    tok = with_image_tokens(PreparedData(pre).vocab, K)
    first = tok.token_to_id("<img_0>")
    for n, tokens, m in masked:
        assert m.shape == (n, 64) and m.dtype == torch.bool  # (32 px / patch 4)^2 patches
        per_image = m.sum(1).tolist()  # the batch's images unmasked, then one masked copy per MIM row
        n_mim = sum(c > 0 for c in per_image)
        assert set(per_image[: n - n_mim]) == {0} and set(per_image[n - n_mim:]) == {32}  # ratio 0.5
        mim_rows = [r for r in tokens.tolist() if any(first <= t < first + K for t in r)]
        assert len(mim_rows) == n_mim and all(r[0] == tok.bos_id and sum(first <= t < first + K for t in r) == 16
                                              and r[17] == tok.eos_id for r in mim_rows)
    train_captioner(_cfg(cap, pre, vq, tmp_path / "split", 1, False))
    train_captioner(_cfg(cap, pre, vq, tmp_path / "split", 2, True))
    x = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    y = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    for k in x:
        assert torch.equal(x[k], y[k]), k
    # the model's prediction of a masked image's codes, decoded beside the image and its reconstruction
    from seesay.checkpoint import load_checkpoint
    from seesay.cli import main
    from seesay.train.mim import predict_codes

    model = load_checkpoint(tmp_path / "full" / "last").model
    images = torch.from_numpy(np.array(PreparedData(pre).split("val").images[:2])).permute(0, 3, 1, 2)
    codes = predict_codes(model, images, K, 4, ratio=0.75)
    assert codes.shape == (2, 4, 4) and 0 <= int(codes.min()) and int(codes.max()) < K
    raw = sorted((pre.parent / "raw" / "images").iterdir())[:2]
    out = tmp_path / "mim.png"
    assert main(["visualize", "--vq", str(vq), "--checkpoint", str(tmp_path / "full" / "last"), *map(str, raw),
                 "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mim_needs_a_matching_vq_and_images_in_the_loop(setup, tmp_path):
    from seesay.train.caption_task import train_captioner

    cap, pre, vq = setup
    with pytest.raises(SeesayError, match="image_vocab_size 16384 does not match"):
        train_captioner(_cfg(cap, pre, vq, tmp_path / "a", 1, False, image_vocab_size=16384))
    cfg = _cfg(cap, pre, vq, tmp_path / "b", 1, False)
    cfg.encoder.fine_tune = False
    with pytest.raises(SeesayError, match="needs the images in the loop"):
        train_captioner(cfg)
