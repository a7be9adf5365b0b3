"""Issue 6: `seesay train --encoder vit --decoder titans_mac|transformer` on word and byte
vocabularies, `seesay caption --image/--prompt/--temperature 0`, and prompt (prefix) decoding
through the shared decoding functions."""

from __future__ import annotations

import json

import pytest
import torch

from seesay import cli
from seesay.decoding import beam_search, greedy, sample
from seesay.encoders.base import EncoderOutput
from seesay.registry import build_decoder

torch.set_num_threads(1)

V, N, D = 11, 4, 8
BOS, EOS = 1, 2
TINY_DECODERS = {
    "soft_attention": dict(embed_dim=16, attention_dim=16, decoder_dim=16, dropout=0.0),
    "transformer": dict(d_model=16, heads=2, layers=1, ff_dim=32, dropout=0.0),
    "titans_mac": dict(dim=16, depth=1, heads=2, dim_head=8, num_image_tokens=2, num_persist_mem_tokens=1,
                       num_longterm_mem_tokens=1, max_len=16),
}
VIT = ["--set", "encoder.image_size=32", "--set", "encoder.patch_size=8", "--set", "encoder.dim=16",
       "--set", "encoder.depth=1", "--set", "encoder.heads=2", "--set", "encoder.mlp_dim=32",
       "--set", "encoder.dropout=0.0"]
CLI_DECODERS = {
    "titans_mac": ["--set", "decoder.dim=16", "--set", "decoder.depth=1", "--set", "decoder.heads=2",
                   "--set", "decoder.dim_head=8", "--set", "decoder.num_image_tokens=2",
                   "--set", "decoder.num_persist_mem_tokens=1", "--set", "decoder.num_longterm_mem_tokens=1",
                   "--set", "decoder.max_len=52"],
    "transformer": ["--set", "decoder.d_model=16", "--set", "decoder.heads=2", "--set", "decoder.layers=1",
                    "--set", "decoder.ff_dim=32", "--set", "decoder.dropout=0.0"],
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    dec = build_decoder(name, vocab_size=V, enc_dim=D, **TINY_DECODERS[name]).eval()
    return dec


def fake_enc(batch: int, seed: int = 1) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    return EncoderOutput(torch.randn(batch, N, D, generator=g) * 2, torch.randn(batch, D, generator=g), (2, 2))


@torch.no_grad()
def forced_then_greedy(dec, enc, prefix: torch.Tensor, max_len: int):
    """Reference: step() by hand, forcing the prefix tokens, then argmax; one image at a time."""
    state = dec.init_state(enc)
    prev = torch.tensor([BOS])
    tokens, score = [], 0.0
    for j in range(prefix.shape[0] + max_len):
        logprobs, state, _ = dec.step(prev, state)
        tok = prefix[j] if j < prefix.shape[0] else logprobs[0].argmax()
        score += float(logprobs[0, tok])
        tokens.append(int(tok))
        prev = tok.view(1)
        if j >= prefix.shape[0] and int(tok) == EOS:
            break
    return tokens, score


# ---- prefix decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY_DECODERS))
def test_prefix_greedy_equals_forced_decoding(name):
    dec = make(name)
    enc = fake_enc(3)
    prefix = torch.tensor([[5, 6, 7], [4, 4, 9], [10, 3, 5]])
    res = greedy(dec, enc, bos=BOS, eos=EOS, max_len=6, prefix=prefix)
    for i in range(3):
        row_enc = EncoderOutput(enc.grid[i : i + 1], enc.pooled[i : i + 1], enc.grid_hw)
        ref, ref_score = forced_then_greedy(dec, row_enc, prefix[i], 6)
        L = int(res.lengths[i])
        assert res.tokens[i, :L].tolist() == ref
        assert res.tokens[i, :3].tolist() == prefix[i].tolist()
        assert float(res.scores[i]) == pytest.approx(ref_score, abs=1e-4)
    # the prefix changes what follows (else the test would prove nothing)
    plain = greedy(dec, enc, bos=BOS, eos=EOS, max_len=6)
    assert not torch.equal(plain.tokens, res.tokens)


@pytest.mark.parametrize("name", list(TINY_DECODERS))
def test_prefix_beam_and_sampling_agree_with_greedy(name):
    dec = make(name)
    enc = fake_enc(2)
    prefix = torch.tensor([5, 6])  # one prefix for every image
    g = greedy(dec, enc, bos=BOS, eos=EOS, max_len=7, prefix=prefix)
    b1 = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=1, max_len=7, prefix=prefix)
    s1 = sample(dec, enc, bos=BOS, eos=EOS, max_len=7, top_k=1, prefix=prefix)
    for r in (b1, s1):
        assert torch.equal(r.tokens, g.tokens) and torch.equal(r.lengths, g.lengths)
        torch.testing.assert_close(r.scores, g.scores, atol=1e-4, rtol=0)
    b3 = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=3, max_len=7, prefix=prefix)
    assert (b3.tokens[:, :2] == prefix).all()
    for i in range(2):  # the beam's score is the forced sequence's log-probability (rescored by hand)
        L = int(b3.lengths[i])
        seq = b3.tokens[i, :L]
        state = dec.init_state(EncoderOutput(enc.grid[i : i + 1], enc.pooled[i : i + 1], enc.grid_hw))
        prev, total = torch.tensor([BOS]), 0.0
        with torch.no_grad():
            for tok in seq:
                lp, state, _ = dec.step(prev, state)
                total += float(lp[0, tok])
                prev = tok.view(1)
        assert float(b3.scores[i]) == pytest.approx(total, abs=1e-4)
        assert float(b3.scores[i]) >= float(g.scores[i]) - 1e-4 or int(g.lengths[i]) != L


def test_prefix_attention_rows_and_validation():
    dec = make("soft_attention")
    enc = fake_enc(2)
    res = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=2, max_len=5, prefix=torch.tensor([5, 6]))
    assert res.attention is not None and res.attention.shape[:2] == res.tokens.shape
    assert torch.all(res.attention[:, :2].sum(-1) > 0.99)  # the forced steps have attention rows
    with pytest.raises(ValueError):
        greedy(dec, enc, bos=BOS, eos=EOS, max_len=5, prefix=torch.tensor([5, EOS]))
    empty = greedy(dec, enc, bos=BOS, eos=EOS, max_len=5, prefix=torch.zeros(0, dtype=torch.long))
    assert torch.equal(empty.tokens, greedy(dec, enc, bos=BOS, eos=EOS, max_len=5).tokens)


def test_encode_prompt_byte_keeps_trailing_space():
    from seesay.data.tokenize import SPECIALS, Vocab, build_vocab

    byte = build_vocab([], tokenizer="byte")
    ids = byte.encode_prompt("This is an image of ")
    assert byte.decode(ids) == "This is an image of "
    word = Vocab([*SPECIALS, "a", "red"])
    assert word.encode_prompt("A red") == [4, 5]
    assert word.encode_prompt("") == []


# ---- train + caption end to end ----------------------------------------------------------------


@pytest.fixture(scope="module", params=["word", "byte"])
def data_dir(request, tmp_path_factory):
    from seesay.data.prepare import prepare_dataset
    from seesay.data.synth import make_shapes

    root = tmp_path_factory.mktemp(f"shapes_{request.param}")
    ann = make_shapes(root / "raw", num_images=12, seed=0, image_size=32, val_fraction=0.25, test_fraction=0.0)
    prepare_dataset("karpathy", root / "data", annotations=ann, images=root / "raw", image_size=32,
                    min_word_freq=1, workers=1, progress=False, tokenizer=request.param)
    return root / "data", sorted((root / "raw" / "images").glob("*.png")), request.param


@pytest.mark.parametrize("decoder", ["titans_mac", "transformer"])
def test_train_vit_then_caption_with_prompt(data_dir, decoder, tmp_path, capsys):
    from seesay.captioner import caption_images
    from seesay.checkpoint import load_checkpoint
    from seesay.data.images import load_image_rgb
    from seesay.decoding import Greedy

    data, images, tokenizer = data_dir
    run = tmp_path / "run"
    rc = cli.main(["train", "--data", str(data), "--encoder", "vit", "--decoder", decoder, "--output", str(run),
                   "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "10", "--workers", "0",
                   "--device", "cpu", "--no-progress", "--val-max-images", "2", *VIT, *CLI_DECODERS[decoder],
                   "--set", "train.val_max_len=8", "--set", "train.tensorboard=false"])
    assert rc == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["step"] == 2
    capsys.readouterr()

    out = tmp_path / "caption.txt"
    img = str(images[0])
    rc = cli.main(["caption", "--checkpoint", str(run / "best"), "--image", img, "--prompt", "a",
                   "--temperature", "0", "--max-length", "10", "--output", str(out), "--device", "cpu"])
    assert rc == 0
    caption = out.read_text(encoding="utf-8").rstrip("\n")

    ck = load_checkpoint(run / "best")
    assert ck.vocab.tokenizer == tokenizer
    x = torch.from_numpy(load_image_rgb(img, 32).copy()).permute(2, 0, 1)[None]
    direct = caption_images(ck.model, x, Greedy(), prompt="a", max_len=10)[0]
    assert caption == direct.caption and caption.startswith("a")
    assert direct.tokens[0] == ck.vocab.encode_tokens(
        ["<0x61>"] if tokenizer == "byte" else ["a"])[0]
    assert 1 < len(direct.tokens) <= 11

    # the positional form and --image give the same output; without a prompt, greedy differs in tokens
    rc = cli.main(["caption", "--checkpoint", str(run / "best"), img, "--prompt", "a", "--temperature", "0",
                   "--max-length", "10", "--device", "cpu"])
    assert rc == 0 and capsys.readouterr().out.rstrip("\n") == caption

    # issue 5: both decoders return attention over the 4x4 ViT grid, drawn by --attention-map
    assert direct.attention is not None and direct.attention.shape == (len(direct.tokens), 16)
    assert torch.allclose(direct.attention[:2].sum(-1), torch.ones(2), atol=1e-5)
    if tokenizer == "word":
        rc = cli.main(["caption", "--checkpoint", str(run / "best"), "--image", img, "--prompt", "a",
                       "--temperature", "0", "--max-length", "4", "--device", "cpu",
                       "--attention-map", str(tmp_path / "att.png")])
        assert rc == 0 and (tmp_path / "att.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["x.png", "--temperature", "0", "--beam-size", "3"], "beam-size"),
    (["x.png", "--temperature", "-1"], "temperature"),
    (["x.png", "--temperature", "0", "--top-k", "5"], "top-k"),
    ([], "no images"),
])
def test_caption_flag_errors(args, message, tmp_path, capsys):
    code = cli.main(["caption", "--checkpoint", str(tmp_path / "missing"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# ---- titans_mac attention over the image (issue 5) ----------------------------------------------

TITANS_ATT = {
    "one_window": dict(),
    "resampler": dict(compressor="resampler"),
    "windows_longterm": dict(segment_len=6, num_longterm_mem_tokens=2),
    "prefix_longer_than_window": dict(segment_len=3),
    "sliding": dict(segment_len=6, sliding_window_attn=True),
    "mem_heads_2": dict(neural_mem_heads=2),
}


def titans(**extra):
    torch.manual_seed(0)
    kw = dict(dim=16, depth=2, heads=2, dim_head=8, num_image_tokens=4, num_persist_mem_tokens=1,
              num_longterm_mem_tokens=1, max_len=12)
    return build_decoder("titans_mac", vocab_size=V, enc_dim=D, **{**kw, **extra}).eval()


def grid_enc(batch: int, seed: int = 1) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    return EncoderOutput(torch.randn(batch, 16, D, generator=g), torch.randn(batch, D, generator=g), (4, 4))


@pytest.mark.parametrize("config", list(TITANS_ATT))
def test_titans_attention_cached_uncached_and_forward_agree(config):
    dec = titans(**TITANS_ATT[config])
    enc = grid_enc(2)
    results = []
    for use_cache in (True, False):
        dec.use_cache = use_cache
        results.append(greedy(dec, enc, bos=BOS, eos=EOS, max_len=8))
    cached, uncached = results
    assert torch.equal(cached.tokens, uncached.tokens)
    att = cached.attention
    assert att is not None and att.shape == (*cached.tokens.shape, 16)  # one row per step over the 4x4 grid
    torch.testing.assert_close(att, uncached.attention, atol=1e-6, rtol=0)
    sums = att.sum(-1)
    # rows sum to 1 while the image is in the token's attention window, else 0
    assert torch.all(((sums - 1).abs() < 1e-5) | (sums.abs() < 1e-7))
    assert torch.all((sums[:, :2] - 1).abs() < 1e-5)  # <start> and the first word always see the image
    assert torch.all(att >= 0)
    if config in ("windows_longterm", "prefix_longer_than_window"):
        assert torch.all(sums[:, 3:] == 0)  # later windows reach the image only through the memory
    # teacher forcing returns the same rows as step()
    toks = torch.cat([torch.full((2, 1), BOS), cached.tokens.clamp(min=3)], dim=1)
    lengths = torch.tensor([toks.shape[1], toks.shape[1] - 2])
    with torch.no_grad():
        out = dec(enc, toks, lengths)
        state, rows = dec.init_state(enc), []
        for t in range(toks.shape[1] - 1):
            _, state, a = dec.step(toks[:, t], state)
            rows.append(a)
    ref = torch.stack(rows, 1) * (torch.arange(toks.shape[1] - 1)[None] < (lengths - 1)[:, None]).unsqueeze(-1)
    torch.testing.assert_close(out.attention, ref, atol=1e-6, rtol=0)


def test_titans_attention_follows_the_pooled_cells_and_beams():
    dec = titans()
    enc = grid_enc(2)
    # pool compressor: 4x4 grid pooled to 2x2 tokens; each token's attention spreads evenly
    # over its own 2x2 block of cells
    res = greedy(dec, enc, bos=BOS, eos=EOS, max_len=3)
    a = res.attention[0, 0].view(4, 4)
    for bi in range(2):
        for bj in range(2):
            block = a[2 * bi : 2 * bi + 2, 2 * bj : 2 * bj + 2]
            assert torch.allclose(block, block[0, 0].expand(2, 2), atol=1e-7)
    # beam search reorders the image map with the beams: beam 1 == greedy, incl. attention
    b1 = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=1, max_len=3)
    torch.testing.assert_close(b1.attention, res.attention, atol=1e-6, rtol=0)
    b3 = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=3, max_len=5)
    assert b3.attention.shape == (*b3.tokens.shape, 16)
    assert torch.all((b3.attention.sum(-1)[:, :2] - 1).abs() < 1e-5)
    # the image attention depends on the image
    other = greedy(dec, grid_enc(2, seed=5), bos=BOS, eos=EOS, max_len=3)
    assert not torch.allclose(other.attention[:, 0], res.attention[:, 0])


def test_titans_attention_layer_choice():
    from seesay.errors import SeesayError

    dec = titans()
    enc = grid_enc(2)
    last = greedy(dec, enc, bos=BOS, eos=EOS, max_len=4)
    dec.attention_layer = 0
    first = greedy(dec, enc, bos=BOS, eos=EOS, max_len=4)
    dec.use_cache = False
    first_uncached = greedy(dec, enc, bos=BOS, eos=EOS, max_len=4)
    assert torch.equal(first.tokens, last.tokens)  # only what is reported changes
    assert not torch.allclose(first.attention, last.attention)
    torch.testing.assert_close(first.attention, first_uncached.attention, atol=1e-6, rtol=0)
    assert torch.all((first.attention.sum(-1)[:, :2] - 1).abs() < 1e-5)
    dec.attention_layer = 2
    with pytest.raises(SeesayError, match="attention_layer"):
        greedy(dec, enc, bos=BOS, eos=EOS, max_len=2)
