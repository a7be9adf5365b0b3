"""The SentencePiece tokenizer: trained by seesay, or T5's own spiece.model; `seesay prepare
--tokenizer sentencepiece`; with the t5 decoder. Offline, in seconds."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch

from seesay.errors import SeesayError
from seesay.spm import SentencePieceTokenizer, load_sentencepiece, train_sentencepiece
from seesay.tokenizers import Tokenizer, check_tokenizer, load_tokenizer

torch.set_num_threads(1)

spm = pytest.importorskip("sentencepiece")  # the spm extra is part of dev installs

COLOURS = ["red", "blue", "green", "yellow", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
CAPTIONS = [f"A {c} {s} is {p} the {c2} {s2}." for c in COLOURS for s in SHAPES for p in ("above", "below", "left of")
            for c2 in COLOURS[:2] for s2 in SHAPES[:2]]


@pytest.fixture(scope="module")
def trained():
    return train_sentencepiece(CAPTIONS, 180)


def t5_style_model() -> bytes:
    """A model laid out like T5's spiece.model: pad 0, eos 1, unk 2, no bos, no sentinels."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CAPTIONS), model_writer=buf, vocab_size=80, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return buf.getvalue()


def test_trained_tokenizer_round_trips(trained, tmp_path):
    tok = trained
    assert isinstance(tok, Tokenizer)
    check_tokenizer(tok)
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, 3) and tok.kind == "sentencepiece"
    assert len(tok) <= 180
    ids = tok.encode("A red star is above the blue circle.")
    assert ids and all(4 + 100 <= i < len(tok) for i in ids)  # plain text never yields specials or sentinels
    assert tok.decode(ids) == "A red star is above the blue circle."
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, *ids, tok.pad_id]) == tok.decode(ids)  # stops at eos
    assert tok.encode("A red star", add_special=True)[0] == tok.bos_id
    assert tok.tokenize("red star") and tok.encode_tokens(tok.tokenize("red star")) == tok.encode("red star")
    # sentinels: 100 user-defined pieces, <extra_id_0> first, each one id, kept by decode
    s = tok.sentinel_ids
    assert len(s) == 100 and s[:2] == [tok.token_to_id("<extra_id_0>"), tok.token_to_id("<extra_id_1>")]
    masked = tok.encode("A red <extra_id_0> above <extra_id_1>")
    assert s[0] in masked and s[1] in masked
    assert "<extra_id_0>" in tok.decode(masked) and "<extra_id_1>" in tok.decode(masked)
    # saved as tokenizer.json + spiece.model, read back by type
    tok.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["spiece.model", "tokenizer.json"]
    again = load_tokenizer(tmp_path / "tok")
    assert again == tok and again.encode("blue square") == tok.encode("blue square")
    # deterministic: the same captions give the same model
    assert train_sentencepiece(CAPTIONS, 180) == tok


def test_added_tokens(trained, tmp_path):
    tok = SentencePieceTokenizer(trained.model_proto)
    n = len(tok)
    ids = tok.add_tokens(["<img_0>", "<img_1>", "<extra_id_0>"])
    assert ids[:2] == [n, n + 1] and ids[2] == trained.sentinel_ids[0] and len(tok) == n + 2
    enc = tok.encode("<img_1>a red<img_0> star")
    assert enc[0] == n + 1 and n in enc
    assert tok.decode(enc).startswith("<img_1>") and tok.id_to_token(n) == "<img_0>"
    tok.save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").encode("<img_1>") == [n + 1]
    with pytest.raises(SeesayError, match="not a token"):
        tok.add_tokens([" padded "])


def test_t5_directory_spiece_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(d)
    (d / "spiece.model").write_bytes(t5_style_model())
    tok = load_sentencepiece(d)
    n = tok.sp.get_piece_size()
    assert tok.source == "t5" and (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.sentinel_ids[0] == n + 99 and tok.sentinel_ids[99] == n  # T5: <extra_id_0> at the top
    assert tok.bos_id == n + 100 and len(tok) == n + 101  # <s> after the sentinels
    ids = tok.encode("A red star <extra_id_0> circle.")
    assert n + 99 in ids and tok.decode(ids) == "A red star <extra_id_0> circle."
    assert tok.decode([tok.bos_id, *tok.encode("blue"), tok.eos_id, 7]) == "blue"
    # a .model file directly, and the saved form, are the same tokenizer
    assert load_sentencepiece(d / "spiece.model") == tok
    tok.save_pretrained(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved") == tok and load_sentencepiece(tmp_path / "saved") == tok
    # with the t5 decoder from that directory: the 128-row embedding becomes the tokenizer's size
    from seesay.model import build_model

    spec = {"encoder": {"name": "small_cnn", "width": 8, "encoded_size": 2, "image_size": 32},
            "decoder": {"name": "t5", "vocab_size": len(tok), "language_model_name": str(d)}}
    model = build_model(spec, tokenizer=tok).eval()
    assert model.decoder.t5.shared.num_embeddings == len(tok)
    res = model.generate(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), prompt="What is it?", max_len=4)
    assert res.tokens.shape[0] == 2 and isinstance(tok.decode(res.tokens[0].tolist()), str)


def test_bad_inputs_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(SeesayError, match="--vocab-size must be an integer above 104"):
        train_sentencepiece(CAPTIONS, 50)
    with pytest.raises(SeesayError, match="no spiece.model"):
        load_sentencepiece(tmp_path)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(SeesayError, match="not a SentencePiece model"):
        load_sentencepiece(tmp_path / "bad.model")
    with pytest.raises(SeesayError, match="no such file"):
        load_sentencepiece(tmp_path / "missing.model")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(SeesayError, match=r"pip install 'seesay\[spm\]'"):
        train_sentencepiece(CAPTIONS, 180)


def _shapes(tmp_path):
    from seesay.data.synth import make_shapes

    return make_shapes(tmp_path / "raw", num_images=16, seed=0, image_size=32, val_fraction=0.25, test_fraction=0.0)


def test_prepare_trains_and_stores_it(tmp_path, capsys):
    from seesay.cli import main

    ann = _shapes(tmp_path)
    out = tmp_path / "data"
    assert main(["prepare", "--format", "karpathy", "--annotations", str(ann), "--images", str(tmp_path / "raw"),
                 "--output", str(out), "--image-size", "32", "--workers", "1", "--no-progress",
                 "--tokenizer", "sentencepiece", "--vocab-size", "150"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == "sentencepiece" and manifest["spm_vocab_size"] == 150
    tok = load_tokenizer(out / "tokenizer")
    assert manifest["vocab_size"] == len(tok) and not (out / "vocab.json").exists()
    caps, lens = np.load(out / "train" / "captions.npy"), np.load(out / "train" / "lengths.npy")
    refs = [json.loads(line) for line in (out / "train" / "references.jsonl").read_text().splitlines()]
    row = caps[0, 0, : lens[0, 0]].tolist()
    assert row[0] == tok.bos_id and row[-1] == tok.eos_id
    assert tok.decode(row) in refs[0]["references"]  # captions are stored in the tokenizer's ids


def test_prepare_with_a_tokenizer_model_and_errors(tmp_path, capsys):
    from seesay.cli import main

    ann = _shapes(tmp_path)
    model = tmp_path / "spiece.model"
    model.write_bytes(t5_style_model())
    base = ["prepare", "--format", "karpathy", "--annotations", str(ann), "--images", str(tmp_path / "raw"),
            "--image-size", "32", "--workers", "1", "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "d"), "--tokenizer", "sentencepiece",
                 "--tokenizer-model", str(model)]) == 0
    tok = load_tokenizer(tmp_path / "d" / "tokenizer")
    assert tok == load_sentencepiece(model) and tok.source == "t5"
    for extra, msg in ((["--tokenizer", "sentencepiece"], "needs --vocab-size N"),
                       (["--tokenizer", "sentencepiece", "--vocab-size", "20"], "--vocab-size must be an integer"),
                       (["--tokenizer", "sentencepiece", "--tokenizer-model", str(tmp_path / "nope")], "no such file"),
                       (["--vocab-size", "200"], "go with --tokenizer sentencepiece")):
        capsys.readouterr()
        assert main([*base, "--output", str(tmp_path / "e"), *extra]) != 0
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, err
