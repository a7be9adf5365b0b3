"""Text-only captions (`data.text_data_path`, the Titans pairs config's `text_data_path`): read,
encoded with the dataset vocabulary, mixed into training as "no image" language-model rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seesay.errors import SeesayError

DEC_SMALL = ["--set", "decoder.embed_dim=16", "--set", "decoder.attention_dim=16", "--set", "decoder.decoder_dim=16",
             "--set", "decoder.dropout=0.0", "--set", "encoder.width=8", "--set", "encoder.encoded_size=4",
             "--set", "encoder.image_size=32"]


class _Vocab:
    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3
    stoi = {"a": 4, "red": 5, "square": 6}

    def encode(self, text):
        return [self.stoi.get(w, self.unk_id) for w in text.lower().split()]


def test_read_text_data_formats(tmp_path):
    from seesay.train.data import read_text_data

    (tmp_path / "t.txt").write_text("a red square\n\nA blue  square\n", encoding="utf-8")
    tokens, lengths = read_text_data(tmp_path / "t.txt", _Vocab(), max_len=6)
    assert tokens.shape == (2, 8) and lengths.tolist() == [5, 5]
    assert tokens[0, :5].tolist() == [1, 4, 5, 6, 2] and tokens[1, :5].tolist() == [1, 4, 3, 6, 2]  # blue -> <unk>
    assert tokens[:, 5:].sum() == 0
    (tmp_path / "t.json").write_text(json.dumps(["a square", {"text": "red red red red"}]))
    tokens, lengths = read_text_data(tmp_path / "t.json", _Vocab(), max_len=2)  # cut to 2 tokens
    assert lengths.tolist() == [4, 4] and tokens[1].tolist() == [1, 5, 5, 2]
    (tmp_path / "bad.json").write_text(json.dumps([{"caption": "x"}]))
    with pytest.raises(SeesayError, match="bad.json: item 0"):
        read_text_data(tmp_path / "bad.json", _Vocab(), max_len=4)
    with pytest.raises(SeesayError, match="cannot read"):
        read_text_data(tmp_path / "missing.txt", _Vocab(), max_len=4)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(SeesayError, match="no non-empty"):
        read_text_data(tmp_path / "empty.txt", _Vocab(), max_len=4)


def test_mixed_batches_spread_and_shard():
    from seesay.train.data import MixedBatches

    tokens = np.arange(7 * 4).reshape(7, 4)
    lengths = np.full(7, 4)
    loader = [{"captions": i} for i in range(6)]

    def epoch(rank, world, e=0):
        return list(MixedBatches(loader, tokens, lengths, rows_per_epoch=9, batch_size=2, seed=1, epoch=e,
                                 rank=rank, world_size=world))

    one = epoch(0, 1)
    kinds = ["t" if b.get("text_only") else "i" for b in one]
    assert kinds.count("t") == 5 and kinds.count("i") == 6 and kinds[0] == "i" and kinds[-1] == "t"
    assert [b["captions"] for b in one if not b.get("text_only")] == list(range(6))  # image order untouched
    rows = np.concatenate([b["captions"][:, 0] // 4 for b in one if b.get("text_only")])
    assert len(rows) == 9 and set(rows[:7].tolist()) == set(range(7))  # every row once before any repeats
    assert [np.array_equal(a.get("captions"), b.get("captions")) for a, b in zip(one, epoch(0, 1))] == [True] * 11
    assert not all(np.array_equal(a["captions"], b["captions"]) for a, b in zip(one, epoch(0, 1, e=1))
                   if a.get("text_only"))
    # two processes: same number of text batches at the same positions, disjoint shares of 10 (9 padded) rows
    r0, r1 = epoch(0, 2), epoch(1, 2)
    assert [bool(b.get("text_only")) for b in r0] == [bool(b.get("text_only")) for b in r1]
    assert sum(len(b["lengths"]) for b in r0 if b.get("text_only")) == 5


def _pairs(tmp_path, text_entry, ratio):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        pairs += [{"image": f"{i}.png", "text": f"a picture number {i % 3}"},
                  {"image": f"{i}.png", "text": f"an image of kind {i % 3}"}]
    (tmp_path / "ann.json").write_text(json.dumps(pairs))
    cfg = {"image_dir": "imgs", "annotations_file": "ann.json", "epochs": 3, "learning_rate": 0.01,
           "text_data_path": text_entry, "text_ratio": ratio}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "config.json"


def _spy(monkeypatch):
    from seesay.train import caption_task

    seen: list[tuple[int, float, int]] = []  # (epoch marker, loss, rows) of each text-only step
    original = caption_task.CaptionTask.training_step

    def step(self, batch, model):
        out = original(self, batch, model)
        if batch.get("text_only"):
            seen.append((self.sampler.epoch, float(out["loss_ce"].detach()), int(out["n"])))
        return out

    monkeypatch.setattr(caption_task.CaptionTask, "training_step", step)
    return seen


def test_pairs_config_with_text_data_trains_on_it(tmp_path, monkeypatch):
    """text_data_path rows are mixed in (text_ratio x train captions per epoch) and their loss falls."""
    from seesay.cli import main

    (tmp_path / "extra.txt").write_text("\n".join(["the picture number 1 is here", "an image of kind 2 here",
                                                   "a picture of kind 0"] * 3), encoding="utf-8")
    config = _pairs(tmp_path, "extra.txt", 0.5)
    seen = _spy(monkeypatch)
    out = tmp_path / "run"
    rc = main(["train", "--config", str(config), "--output", str(out), "--device", "cpu", "--workers", "0",
               "--no-progress", "--batch-size", "6", *DEC_SMALL, "--set", "train.val_max_len=6"])
    assert rc == 0 and (out / "best" / "model.safetensors").is_file()
    saved = json.loads((out / "config.json").read_text())["data"]
    assert saved["text_data_path"].endswith("extra.txt") and saved["text_ratio"] == 0.5
    n_train = json.loads((out / "data" / "manifest.json").read_text())["splits"]["train"]["captions"]
    for e in range(3):
        assert sum(n for ep, _, n in seen if ep == e) == round(0.5 * n_train)
    first = np.mean([loss for ep, loss, _ in seen if ep == 0])
    last = np.mean([loss for ep, loss, _ in seen if ep == 2])
    print("text-only loss epoch 1 -> 3:", first, last)
    assert last < 0.8 * first


def test_text_data_with_encoder_in_the_loop(tmp_path, monkeypatch):
    """--fine-tune-encoder: image steps run the encoder, text-only steps use the blank encoding."""
    from seesay.cli import main

    (tmp_path / "extra.json").write_text(json.dumps([{"text": "a picture of kind 1"}, "an image number 2"]))
    config = _pairs(tmp_path, "extra.json", 0.25)
    seen = _spy(monkeypatch)
    rc = main(["train", "--config", str(config), "--output", str(tmp_path / "run"), "--device", "cpu",
               "--workers", "0", "--no-progress", "--batch-size", "10", "--fine-tune-encoder", "--epochs", "1",
               *DEC_SMALL, "--set", "train.val_max_len=6"])
    assert rc == 0
    assert sum(n for _, _, n in seen) > 0 and all(np.isfinite(loss) for _, loss, _ in seen)


def test_missing_text_data_is_one_line_error(tmp_path):
    from seesay.cli import main

    config = _pairs(tmp_path, "nope.txt", 0.25)
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "run"), "--device", "cpu",
                 "--workers", "0", "--no-progress", *DEC_SMALL]) == 2


def test_resume_with_text_data_is_exact(tmp_path):
    """The text rows come from a (seed, epoch) generator: 2 epochs == 1 epoch + resume."""
    import torch
    from safetensors.torch import load_file

    from seesay.cli import main

    (tmp_path / "extra.txt").write_text("a picture of kind 1\nan image number 2\n", encoding="utf-8")
    config = _pairs(tmp_path, "extra.txt", 0.5)
    common = ["--config", str(config), "--device", "cpu", "--workers", "0", "--no-progress", "--batch-size", "8",
              "--seed", "3", *DEC_SMALL, "--set", "train.val_max_len=6", "--set", "train.tensorboard=false"]
    assert main(["train", *common, "--output", str(tmp_path / "full"), "--epochs", "2"]) == 0
    assert main(["train", *common, "--output", str(tmp_path / "split"), "--epochs", "1"]) == 0
    assert main(["train", *common, "--output", str(tmp_path / "split"), "--epochs", "2", "--resume"]) == 0
    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_mixed_batches_resume_inside_an_epoch():
    """Starting at batch k gives exactly batches k.. of the whole epoch (text and image slots alike)."""
    from seesay.train.data import MixedBatches

    tokens = np.arange(7 * 4).reshape(7, 4)
    lengths = np.full(7, 4)
    loader = [{"captions": i} for i in range(6)]
    whole = list(MixedBatches(loader, tokens, lengths, rows_per_epoch=9, batch_size=2, seed=1, epoch=0,
                              rank=0, world_size=1))
    for k in range(len(whole) + 1):
        probe = MixedBatches(loader, tokens, lengths, rows_per_epoch=9, batch_size=2, seed=1, epoch=0,
                             rank=0, world_size=1, start=k)
        skipped_images = probe.image_batches_before(k)
        assert skipped_images == sum(1 for b in whole[:k] if not b.get("text_only"))
        rest = list(MixedBatches(loader[skipped_images:], tokens, lengths, rows_per_epoch=9, batch_size=2, seed=1,
                                 epoch=0, rank=0, world_size=1, image_batches=len(loader), start=k))
        assert len(rest) == len(whole) - k
        assert all(np.array_equal(a["captions"], b["captions"]) and bool(a.get("text_only")) == bool(b.get("text_only"))
                   for a, b in zip(rest, whole[k:]))
