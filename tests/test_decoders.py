"""Every registered decoder against the decoder contract, at tiny sizes on CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_decoder
from seesay.decoding import beam_search, greedy
from seesay.encoders.base import EncoderOutput
from seesay.registry import list_decoders

torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared CPU

V, N, D = 13, 6, 8
BOS, EOS = 1, 2
DECODERS = list_decoders()  # every registered family (tests/test_contracts.py: each has a tiny config)


def make(name: str, *, dropout: float = 0.0, vocab: int = V, seed: int = 0):
    return tiny_decoder(name, vocab, D, dropout=dropout, seed=seed)


def fake_enc(batch: int, seed: int = 1) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    return EncoderOutput(torch.randn(batch, N, D, generator=g), torch.randn(batch, D, generator=g), (2, 3))


def fake_tokens(lengths: list[int], seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, L in enumerate(lengths):
        tokens[i, 0] = BOS
        tokens[i, 1 : L - 1] = torch.randint(3, V, (L - 2,), generator=g)
        tokens[i, L - 1] = EOS
    return tokens, torch.tensor(lengths)


def test_every_issue_decoder_is_registered():
    assert {"show_tell", "soft_attention", "adaptive_attention", "transformer"} <= set(list_decoders())


@pytest.mark.parametrize("name", DECODERS)
def test_contract_shapes(name):
    dec = make(name).eval()
    enc = fake_enc(3)
    tokens, lengths = fake_tokens([6, 4, 3])
    out = dec(enc, tokens, lengths)
    assert out.logits.shape == (3, 5, V)
    A = N + 1 if dec.has_sentinel else N
    if out.attention is not None:
        assert out.attention.shape == (3, 5, A)
    state = dec.init_state(enc)
    logprobs, state, att = dec.step(torch.full((3,), BOS), state)
    assert logprobs.shape == (3, V)
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(3), atol=1e-5)
    if att is not None:
        assert att.shape == (3, A)
        assert torch.allclose(att.sum(-1), torch.ones(3), atol=1e-5)
    state = dec.reorder_state(state, torch.tensor([2, 2, 0, 1]))
    logprobs, _, _ = dec.step(torch.tensor([3, 4, 5, 6]), state)
    assert logprobs.shape == (4, V)
    if name == "adaptive_attention":
        assert dec.has_sentinel and "sentinel_gate" in out.extras


@pytest.mark.parametrize("name", DECODERS)
def test_reorder_beams_equals_reorder_state_within_images(name):
    """beam search's per-step reorder (`reorder_beams`, rows kept within their images) steps on to the
    same log-probabilities as the general `reorder_state`."""
    dec = make(name).eval()
    state = dec.init_state(fake_enc(2))
    with torch.no_grad():
        state = dec.reorder_state(state, torch.arange(2).repeat_interleave(3))  # 3 beams per image
        for tokens, index in (([3, 4, 5, 6, 7, 8], [2, 0, 0, 4, 5, 3]), ([5, 5, 6, 7, 3, 4], [1, 1, 1, 5, 4, 4])):
            _, state, _ = dec.step(torch.tensor(tokens), state)
            index = torch.tensor(index)
            general, beams = dec.reorder_state(state, index), dec.reorder_beams(state, index)
            prev = torch.tensor([9, 10, 11, 12, 3, 4])
            torch.testing.assert_close(dec.step(prev, beams)[0], dec.step(prev, general)[0])
            state = beams


@pytest.mark.parametrize("name", DECODERS)
def test_teacher_forcing_matches_step_by_step(name):
    dec = make(name, dropout=0.5).eval()
    enc = fake_enc(4)
    tokens, lengths = fake_tokens([7, 3, 5, 2])
    out = dec(enc, tokens, lengths)
    state = dec.init_state(enc)
    for t in range(tokens.shape[1] - 1):
        logprobs, state, att = dec.step(tokens[:, t], state)
        real = lengths - 1 > t
        ref = torch.log_softmax(out.logits[:, t], dim=-1)
        torch.testing.assert_close(logprobs[real], ref[real], atol=1e-5, rtol=0)
        if att is not None:
            torch.testing.assert_close(att[real], out.attention[real, t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_padding_does_not_change_real_positions(name):
    dec = make(name).eval()
    enc = fake_enc(3)
    tokens, lengths = fake_tokens([6, 3, 4])
    out = dec(enc, tokens, lengths)
    noisy = torch.cat([tokens, torch.zeros(3, 2, dtype=torch.long)], dim=1)  # extra padding columns
    for i, L in enumerate(lengths.tolist()):
        noisy[i, L:] = torch.randint(3, V, (noisy.shape[1] - L,))
    out2 = dec(enc, noisy, lengths)
    assert out2.logits.shape == (3, 7, V)
    for i, L in enumerate(lengths.tolist()):
        torch.testing.assert_close(out2.logits[i, : L - 1], out.logits[i, : L - 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_output_keeps_caller_batch_order(name):
    dec = make(name).eval()
    enc = fake_enc(4)
    tokens, lengths = fake_tokens([3, 7, 5, 4])
    out = dec(enc, tokens, lengths)
    for i in range(4):
        one = dec(enc.index_select(torch.tensor([i])), tokens[i : i + 1, : lengths[i]], lengths[i : i + 1])
        L = int(lengths[i]) - 1
        torch.testing.assert_close(one.logits[0, :L], out.logits[i, :L], atol=1e-5, rtol=0)


def _loss(dec, enc, tokens, lengths):
    out = dec(enc, tokens, lengths)
    T = tokens.shape[1]
    mask = torch.arange(T - 1)[None, :] < (lengths - 1)[:, None]
    ce = torch.nn.functional.cross_entropy(out.logits[mask], tokens[:, 1:][mask])
    return ce + out.extras.get("aux_loss", 0.0)


@pytest.mark.parametrize("name", DECODERS)
def test_trains_and_loss_falls(name):
    dec = make(name, dropout=0.1).train()
    enc = fake_enc(8)
    tokens, lengths = fake_tokens([6, 5, 4, 6, 3, 5, 6, 4])
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = _loss(dec, enc, tokens, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", DECODERS)
def test_overfits_eight_images(name):
    """A tiny model learns 8 distinct captions for 8 random 'images' and greedy decoding recites them."""
    dec = make(name, dropout=0.0, seed=3).train()
    enc = fake_enc(8, seed=4)
    tokens, lengths = fake_tokens([6, 5, 4, 6, 3, 5, 6, 4], seed=5)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    for _ in range(300):
        loss = _loss(dec, enc, tokens, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dec.eval()
    res = greedy(dec, enc, bos=BOS, eos=EOS, max_len=10)
    for i, L in enumerate(lengths.tolist()):
        assert res.tokens[i, : L - 1].tolist() == tokens[i, 1:L].tolist(), (i, res.tokens[i], tokens[i])
        assert int(res.lengths[i]) == L - 1
    beams = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=3, max_len=10)
    assert sum(beams.tokens[i, : L - 1].tolist() == tokens[i, 1:L].tolist() for i, L in enumerate(lengths.tolist())) >= 7


def test_reorder_rows_keeps_one_memory_row_per_image():
    from seesay.decoders.common import reorder_rows

    mem = torch.arange(3.0)[:, None].expand(3, 4).clone()  # image i's memory is all i
    state = {"img": torch.arange(3), "h": torch.arange(3.0), "mem_x": mem}
    beams = reorder_rows(state, torch.arange(3).repeat_interleave(2))  # 2 beams per image
    assert beams["mem_x"] is mem and beams["img"].tolist() == [0, 0, 1, 1, 2, 2]
    assert beams["h"].tolist() == [0, 0, 1, 1, 2, 2]
    swapped = reorder_rows(beams, torch.tensor([1, 0, 3, 2, 4, 5]))  # beam reordering within images
    assert swapped["mem_x"] is mem
    subset = reorder_rows(beams, torch.tensor([0, 1, 4, 5]))  # image 1 finished and left
    assert subset["mem_x"][:, 0].tolist() == [0, 2] and subset["img"].tolist() == [0, 0, 2, 2]
    again = reorder_rows(subset, torch.tensor([2, 3]))
    assert again["mem_x"][:, 0].tolist() == [2]
    odd = reorder_rows(beams, torch.tensor([4, 0, 0]))  # out of order: each row gets its own copy
    assert odd["mem_x"][:, 0].tolist() == [2, 0, 0] and odd["h"].tolist() == [2, 0, 0]
    assert odd["img"].unique().numel() == 3


@pytest.mark.parametrize("kind", ["additive", "sentinel"])
@pytest.mark.parametrize("chunk", [1, 40, 1 << 30])
def test_grouped_attention_equals_per_row_attention(kind, chunk, monkeypatch):
    """G beams per image over one memory row equal G copies of the memory; CPU chunking changes nothing."""
    import seesay.layers.attention as att

    torch.manual_seed(0)
    M, G, N, D = 4, 3, 5, 8
    layer = att.AdditiveAttention(D, D, 6) if kind == "additive" else att.SentinelAttention(D, 6)
    grid = torch.randn(M, N, D)
    h = torch.randn(M * G, D)
    extra = () if kind == "additive" else (torch.randn(M * G, D),)
    rows = torch.arange(M).repeat_interleave(G)
    with torch.no_grad():
        ref_ctx, ref_alpha = layer(grid[rows], layer.project(grid[rows]), h, *extra)
    monkeypatch.setattr(att, "CPU_CHUNK_ELEMENTS", chunk)
    with torch.inference_mode():
        ctx, alpha = layer(grid, layer.project(grid), h, *extra)
    torch.testing.assert_close(ctx, ref_ctx, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alpha, ref_alpha, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="do not split evenly"):
        layer(grid, layer.project(grid), h[:-1], *(e[:-1] for e in extra))
