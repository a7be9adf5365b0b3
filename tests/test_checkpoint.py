"""Checkpoint directories: round trip, atomic replace, one-line errors, train-state trees."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from seesay.checkpoint import (
    load_checkpoint,
    load_train_state,
    save_checkpoint,
    tree_from_json,
    tree_to_json,
)
from seesay.errors import SeesayError

SPEC = {
    "encoder": {"name": "small_cnn", "width": 8, "encoded_size": 4, "image_size": 32},
    "decoder": {"name": "soft_attention", "vocab_size": 12, "embed_dim": 8, "attention_dim": 8, "decoder_dim": 8},
}


def _vocab():
    from seesay.data.tokenize import Vocab

    return Vocab(["<pad>", "<start>", "<end>", "<unk>", *[f"w{i}" for i in range(8)]])


def _model():
    from seesay.model import build_model

    torch.manual_seed(0)
    return build_model(SPEC, tokenizer=_vocab(), image_size=32)


def test_round_trip(tmp_path):
    model = _model()
    vocab = _vocab()
    pre = {"encoder": model.encoder.preprocess.to_dict(), "image_size": 32}
    path = save_checkpoint(tmp_path / "best", model=model, config={"train": {"epochs": 1}})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "preprocess.json",
                                                       "tokenizer"]
    assert sorted(p.name for p in (path / "tokenizer").iterdir()) == ["tokenizer.json"]
    ck = load_checkpoint(path)
    assert not ck.model.training
    assert ck.config["model"] == {**SPEC, "captioner": "encoder_decoder"} and ck.config["train"] == {"epochs": 1}
    assert ck.preprocess == json.loads(json.dumps(pre))
    assert ck.vocab == vocab
    for (k, a), (k2, b) in zip(model.state_dict().items(), ck.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    model.eval()
    r1 = model.generate(images, max_len=5)
    r2 = ck.model.generate(images, max_len=5)
    assert torch.equal(r1.tokens, r2.tokens)


def test_atomic_replace_leaves_no_temp(tmp_path):
    model, vocab = _model(), _vocab()
    for epoch in range(3):
        save_checkpoint(tmp_path / "last", model=model, tokenizer=vocab, config={"epoch": epoch},
                        train_state={"loop": {"epoch": epoch}})
    assert [p.name for p in tmp_path.iterdir()] == ["last"]
    assert json.loads((tmp_path / "last" / "config.json").read_text())["epoch"] == 2
    assert load_train_state(tmp_path / "last")["loop"] == {"epoch": 2}


def test_errors_are_one_line(tmp_path):
    with pytest.raises(SeesayError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(SeesayError, match="incomplete checkpoint") as e:
        load_checkpoint(tmp_path / "half")
    assert "\n" not in str(e.value)
    with pytest.raises(SeesayError, match="train_state"):
        load_train_state(tmp_path / "half")


def test_mismatched_weights_error(tmp_path):
    model, vocab = _model(), _vocab()
    path = save_checkpoint(tmp_path / "ck", model=model, tokenizer=vocab, config={})
    cfg = json.loads((path / "config.json").read_text())
    cfg["model"]["decoder"]["decoder_dim"] = 16
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SeesayError, match="do not match"):
        load_checkpoint(path)


def test_tree_round_trip_optimizer_and_rng():
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "py": random.getstate(), "np": np.random.get_state(),
             "torch": torch.get_rng_state(), "best": -math.inf, "nested": {1: (2, [3.5, None])}}
    tensors: dict = {}
    meta = json.loads(json.dumps(tree_to_json(state, tensors)))  # must be plain JSON
    back = tree_from_json(meta, tensors)
    assert back["py"] == state["py"]
    assert back["best"] == -math.inf and back["nested"] == {1: (2, [3.5, None])}
    assert torch.equal(back["torch"], state["torch"])
    np.random.set_state(back["np"])
    opt2 = torch.optim.Adam(m.parameters(), lr=1e-3)
    opt2.load_state_dict(back["opt"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][name])


def test_bad_checkpoint_files_are_one_line_naming_the_file(tmp_path):
    """A pickle renamed to model.safetensors is refused, never unpickled; a garbage tokenizer and a
    tokenizer that does not match the model's vocabulary size name their files."""
    model, vocab = _model(), _vocab()
    path = save_checkpoint(tmp_path / "ck", model=model, tokenizer=vocab, config={})
    good = (path / "model.safetensors").read_bytes()
    torch.save(model.state_dict(), path / "model.safetensors")  # a pickle
    with pytest.raises(SeesayError, match="model.safetensors: not a readable safetensors file") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    (path / "model.safetensors").write_bytes(good)
    tok = path / "tokenizer" / "tokenizer.json"
    tok.write_text("{not json")
    with pytest.raises(SeesayError, match="tokenizer.json: unreadable tokenizer"):
        load_checkpoint(path)
    tok.write_text(json.dumps({"type": "seesay-vocab", "itos": ["a", "b"]}))
    with pytest.raises(SeesayError, match="tokenizer.json: vocabulary must start with"):
        load_checkpoint(path)
    from seesay.data.tokenize import Vocab

    small = Vocab(["<pad>", "<start>", "<end>", "<unk>", "w0"])
    small.save_pretrained(path / "tokenizer")
    with pytest.raises(SeesayError, match="tokenizer has 5 tokens but the model spec says vocab_size 12"):
        load_checkpoint(path)
