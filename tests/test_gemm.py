"""seesay.layers.gemm: oneDNN products with weights packed once per decoding call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seesay.decoders.common import LSTMCell
from seesay.decoding import beam_search, greedy
from seesay.encoders.base import EncoderOutput
from seesay.layers import gemm
from seesay.registry import build_decoder

needs_onednn = pytest.mark.skipif(not gemm.available(), reason="this torch build or CPU has no oneDNN float32 product")
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def count_packs(monkeypatch):
    """Every weight small or large takes the oneDNN path; returns the list of packed shapes."""
    monkeypatch.setattr(gemm, "MIN_WEIGHT_ELEMENTS", 0)
    packed: list[tuple[int, ...]] = []
    real = gemm.pack

    def counting(w):
        packed.append(tuple(w.shape))
        return real(w)

    monkeypatch.setattr(gemm, "pack", counting)
    return packed


@pytest.fixture
def products(monkeypatch):
    """The weights of every oneDNN product, in call order."""
    seen: list[torch.Tensor] = []
    real = gemm.product

    def spying(x, w, bias=None):
        seen.append(w)
        return real(x, w, bias)

    monkeypatch.setattr(gemm, "product", spying)
    return seen


@needs_onednn
def test_outside_a_packing_block_linear_is_torchs_product(count_packs, products):
    """A forward outside decoding (a validation loss, a user's own call) may see a new shape at
    every call: oneDNN would build a kernel for each, so torch multiplies."""
    x, w, b = torch.randn(5, 7), torch.randn(9, 7), torch.randn(9)
    with torch.no_grad():
        torch.testing.assert_close(gemm.linear(x, w, b), F.linear(x, w, b), **TOL)
    assert count_packs == [] and products == []


@needs_onednn
def test_a_block_packs_each_weight_once_and_matches_torch(count_packs):
    torch.manual_seed(0)
    w, b = torch.randn(40, 24), torch.randn(40)
    with gemm.packing():
        for rows in (5, 1, 32):  # one pack serves any number of rows
            x = torch.randn(rows, 24)
            torch.testing.assert_close(gemm.linear(x, w, b), F.linear(x, w, b), **TOL)
        x = torch.randn(3, 10)
        torch.testing.assert_close(gemm.linear(x, w, cols=(4, 14)), F.linear(x, w[:, 4:14]), **TOL)
        with gemm.packing():  # a nested block reuses the outer one's packs
            gemm.linear(torch.randn(2, 24), w)
    assert count_packs == [(40, 24), (40, 10)]
    with gemm.packing():  # a new block packs again: weights may have changed in between
        gemm.linear(torch.randn(2, 24), w)
    assert len(count_packs) == 3


@needs_onednn
@pytest.mark.parametrize("shape", [(4, 8), (3, 5, 8), (0, 8)])
def test_training_products_are_torchs_even_in_a_packing_block(shape, count_packs, products):
    torch.manual_seed(0)
    lin = gemm.Linear(8, 6)
    x = torch.randn(*shape, requires_grad=True)
    for block in (False, True):
        with gemm.packing() if block else torch.enable_grad():
            out = lin(x)
        grad_out = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, *lin.parameters()], grad_out)
        want = torch.autograd.grad(F.linear(x, lin.weight, lin.bias), [x, *lin.parameters()], grad_out)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL)
    assert count_packs == [] and products == []


@needs_onednn
def test_torch_products_turns_the_packed_path_off(products):
    x, w = torch.randn(16, 512), torch.randn(1024, 512)
    with torch.no_grad(), gemm.packing():
        gemm.linear(x, w)
        assert len(products) == 1
        with gemm.torch_products():
            torch.testing.assert_close(gemm.linear(x, w), F.linear(x, w), **TOL)
    assert len(products) == 1


@needs_onednn
def test_loop_linear_makes_the_same_gradients_with_torchs_products(count_packs, products):
    """LoopLinear (teacher forcing's step products, weight gradient made once) on a slice of columns,
    with rows finishing as in teacher forcing: torch's gradients, and no oneDNN kernel."""
    from seesay.layers.loop import LoopLinear

    torch.manual_seed(0)
    weight = torch.randn(12, 20, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    h0 = torch.randn(5, 8, requires_grad=True)

    def run(step_linear):
        h, outs = h0, []
        for n in (5, 5, 3, 1):
            h = torch.tanh(step_linear(h[:n]))[:, :8]
            outs.append(h)
        return torch.cat(outs).square().sum()

    got = torch.autograd.grad(run(LoopLinear(weight[:, 4:12], bias)), [weight, bias, h0])
    want = torch.autograd.grad(run(lambda v: F.linear(v, weight[:, 4:12], bias)), [weight, bias, h0])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    assert count_packs == [] and products == []


@needs_onednn
@pytest.mark.parametrize("name", ["soft_attention", "adaptive_attention", "show_tell", "transformer"])
def test_training_steps_over_new_batches_build_no_onednn_kernel(name, count_packs, products):
    """Each batch of new captions brings new product shapes; oneDNN would build and keep a kernel
    for each (docs/performance.md): training must stay on torch's products."""
    dec, enc = _decoder_and_grid(name)
    dec.train()
    gen = torch.Generator().manual_seed(2)
    for length in (6, 4, 5):
        lengths = torch.randint(2, length + 1, (3,), generator=gen)
        lengths[0] = length
        tokens = torch.randint(3, 30, (3, length), generator=gen)
        dec(enc, tokens, lengths).logits.sum().backward()
    assert count_packs == [] and products == []
    assert all(p.grad is not None for p in dec.parameters() if p.requires_grad)


@needs_onednn
def test_the_default_threshold_keeps_small_weights_on_torchs_product(monkeypatch):
    packed = []
    real = gemm.pack
    monkeypatch.setattr(gemm, "pack", lambda w: packed.append(tuple(w.shape)) or real(w))
    with torch.no_grad(), gemm.packing():
        gemm.Linear(64, 64)(torch.randn(3, 64))
        gemm.Linear(512, 512)(torch.randn(3, 512))
    assert packed == [(512, 512)]


@needs_onednn
def test_lstm_cell_matches_torchs_and_keeps_its_state_dict(count_packs):
    torch.manual_seed(0)
    ref = torch.nn.LSTMCell(6, 5)
    cell = LSTMCell(6, 5)
    cell.load_state_dict(ref.state_dict())  # old checkpoints of nn.LSTMCell load as they are
    assert list(cell.state_dict()) == list(ref.state_dict())
    x, h, c = torch.randn(4, 6), torch.randn(4, 5), torch.randn(4, 5)
    with torch.no_grad(), gemm.packing():
        got = cell(x, (h, c))
    for a, b in zip(got, ref(x, (h, c))):
        torch.testing.assert_close(a, b, **TOL)
    assert count_packs == [(20, 6), (20, 5)]


def test_seesay_onednn_0_turns_the_path_off(monkeypatch):
    monkeypatch.setenv("SEESAY_ONEDNN", "0")
    gemm.available.cache_clear()
    try:
        assert not gemm.available()
        monkeypatch.setattr(gemm, "MIN_WEIGHT_ELEMENTS", 0)
        monkeypatch.setattr(gemm, "pack", lambda w: pytest.fail("packed with SEESAY_ONEDNN=0"))
        x, w = torch.randn(3, 4), torch.randn(5, 4)
        with gemm.packing():
            assert torch.equal(gemm.linear(x, w), F.linear(x, w))
    finally:
        monkeypatch.delenv("SEESAY_ONEDNN")
        gemm.available.cache_clear()


SIZES = {"soft_attention": {"embed_dim": 12, "attention_dim": 14, "decoder_dim": 20},
         "adaptive_attention": {"embed_dim": 12, "attention_dim": 14, "decoder_dim": 20},
         "show_tell": {"embed_dim": 12, "decoder_dim": 20},
         "transformer": {"d_model": 16, "heads": 2, "layers": 2, "ff_dim": 32}}


def _decoder_and_grid(name):
    torch.manual_seed(0)
    dec = build_decoder(name, vocab_size=30, enc_dim=16, dropout=0.0, **SIZES[name])
    grid = torch.randn(3, 9, 16, generator=torch.Generator().manual_seed(1)) * 2
    return dec, EncoderOutput(grid, grid.mean(1), (3, 3))


@needs_onednn
@pytest.mark.parametrize("name", sorted(SIZES))
def test_decoders_decode_alike_through_onednn_and_torch(name, count_packs, monkeypatch):
    dec, enc = _decoder_and_grid(name)
    dec.eval()
    with torch.inference_mode():
        fast = beam_search(dec, enc, bos=1, eos=2, beam_size=3, max_len=6)
        fast_greedy = greedy(dec, enc, bos=1, eos=2, max_len=6)
        assert count_packs, "no product went through oneDNN"
        with gemm.torch_products():
            slow = beam_search(dec, enc, bos=1, eos=2, beam_size=3, max_len=6)
            slow_greedy = greedy(dec, enc, bos=1, eos=2, max_len=6)
    assert fast.tokens.tolist() == slow.tokens.tolist()
    torch.testing.assert_close(fast.scores, slow.scores, **TOL)
    assert fast_greedy.tokens.tolist() == slow_greedy.tokens.tolist()


@needs_onednn
def test_training_between_decoding_calls_is_seen_by_the_next_call(count_packs):
    """Fused Adam changes weights without moving their version counters: packs must not outlive a call."""
    from seesay.train.optim import build_optimizer

    dec, enc = _decoder_and_grid("soft_attention")
    opt = build_optimizer("adam", [{"params": list(dec.parameters()), "lr": 0.05}], 0.0)
    tokens = torch.randint(3, 30, (3, 6))
    lengths = torch.full((3,), 6)

    def first_step_logprobs():
        dec.eval()
        with torch.no_grad(), gemm.packing():
            logprobs, _, _ = dec.step(torch.ones(3, dtype=torch.long), dec.init_state(enc))
        return logprobs

    before = first_step_logprobs()
    dec.train()
    dec(enc, tokens, lengths).logits.sum().backward()
    opt.step()
    after = first_step_logprobs()
    dec.eval()
    with torch.no_grad():
        want, _, _ = dec.step(torch.ones(3, dtype=torch.long), dec.init_state(enc))  # torch's products
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, want, **TOL)


@needs_onednn
def test_the_flop_counter_sees_torchs_products(count_packs, monkeypatch):
    """Benchmarks count multiply-adds with torch's flop counter, which knows only torch's own ops."""
    from torch.utils.flop_counter import FlopCounterMode

    dec, enc = _decoder_and_grid("soft_attention")
    dec.eval()

    def flops():
        with FlopCounterMode(display=False) as counter:
            greedy(dec, enc, bos=1, eos=2, max_len=4)
        return counter.get_total_flops()

    counted = flops()
    assert count_packs == []  # nothing went around the counter
    with gemm.torch_products():
        assert counted == flops() > 0


@needs_onednn
def test_empty_rows_and_other_dtypes(count_packs):
    w64 = torch.randn(6, 4, dtype=torch.float64)
    with gemm.packing():
        assert gemm.linear(torch.randn(0, 4), torch.randn(6, 4)).shape == (0, 6)  # e.g. every image finished
        x64 = torch.randn(3, 4, dtype=torch.float64)
        assert torch.equal(gemm.linear(x64, w64), F.linear(x64, w64))  # float64 stays on torch's product
    assert count_packs == [(6, 4)]
