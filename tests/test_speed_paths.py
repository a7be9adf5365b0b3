"""The fast formulations agree with the plain ones they replace (issue 17).

- teacher forcing with the non-recurrent work out of the step loop (words' share of the LSTM
  gates, output layer over all steps) == a plain per-step loop over nn.LSTMCell, logits and
  gradients;
- image-grouped teacher forcing (`image_rows`, one feature row per image) == the same captions
  with their image's features copied per row;
- checkpoints load the same weights through the fast path.
"""

from __future__ import annotations

import bisect

import pytest
import torch
import torch.nn.functional as F

from seesay.decoders.common import unpack_steps
from seesay.encoders.base import EncoderOutput
from seesay.registry import build_decoder

torch.set_num_threads(1)

V, D, N = 31, 16, 9
SIZES = {
    "show_tell": {"embed_dim": 12, "decoder_dim": 20},
    "soft_attention": {"embed_dim": 12, "attention_dim": 14, "decoder_dim": 20},
    "adaptive_attention": {"embed_dim": 12, "attention_dim": 14, "decoder_dim": 20},
    "transformer": {"d_model": 16, "heads": 2, "layers": 2, "ff_dim": 32},
}
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _enc(n: int, seed: int = 0) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(n, N, D, generator=g)
    return EncoderOutput(grid, grid.mean(1), (3, 3))


def _captions(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = max(lengths) + 2  # extra padding columns: logits beyond the longest caption stay zero
    tokens = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, L in enumerate(lengths):
        tokens[i, 0], tokens[i, L - 1] = 1, 2
        tokens[i, 1: L - 1] = torch.randint(4, V, (L - 2,), generator=g)
    return tokens, torch.tensor(lengths)


def _decoder(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_decoder(name, vocab_size=V, enc_dim=D, **{**SIZES[name], **kw}).eval()


# -- plain formulations, written the straightforward way ------------------------------------------


def _valid(lengths: torch.Tensor, t: int) -> torch.Tensor:
    return (t < lengths - 1)[:, None].float()


def _plain_show_tell(dec, enc, tokens, lengths):
    h, c = dec.lstm(dec.image_norm(dec.image_proj(enc.pooled)))
    emb = dec.embedding(tokens)
    out = []
    for t in range(tokens.shape[1] - 1):
        h, c = dec.lstm(emb[:, t], (h, c))
        out.append(dec.fc(h) * _valid(lengths, t))
    return torch.stack(out, 1), None


def _plain_soft(dec, enc, tokens, lengths):
    grid, att = enc.grid, dec.attention
    mean = grid.mean(1)
    h, c = dec.init_h(mean), dec.init_c(mean)
    proj = att.enc_proj(grid)
    emb = dec.embedding(tokens)
    out, alphas = [], []
    for t in range(tokens.shape[1] - 1):
        alpha = torch.softmax(att.score(torch.relu(proj + att.dec_proj(h)[:, None])).squeeze(-1), -1)
        context = torch.sigmoid(dec.f_beta(h)) * (alpha[..., None] * grid).sum(1)
        h, c = dec.lstm(torch.cat([emb[:, t], context], -1), (h, c))
        out.append(dec.fc(h) * _valid(lengths, t))
        alphas.append(alpha * _valid(lengths, t))
    return torch.stack(out, 1), torch.stack(alphas, 1)


def _plain_adaptive(dec, enc, tokens, lengths):
    att = dec.attention
    regions = torch.relu(dec.region_proj(enc.grid))
    glob = torch.relu(dec.global_proj(enc.grid.mean(1)))
    h = c = enc.grid.new_zeros(enc.grid.shape[0], dec.decoder_dim)
    emb = dec.embedding(tokens)
    out, alphas = [], []
    for t in range(tokens.shape[1] - 1):
        x = torch.cat([emb[:, t], glob], -1)
        h_new, c = dec.lstm(x, (h, c))
        sentinel = torch.sigmoid(dec.sentinel_x(x) + dec.sentinel_h(h)) * torch.tanh(c)
        h = h_new
        g = att.g_proj(h)
        z = att.score(torch.tanh(att.v_proj(regions) + g[:, None])).squeeze(-1)
        z_s = att.score(torch.tanh(att.s_proj(sentinel) + g))
        a = torch.softmax(torch.cat([z, z_s], -1), -1)
        context = (a[:, :-1, None] * regions).sum(1) + a[:, -1:] * sentinel
        out.append(dec.fc(context + h) * _valid(lengths, t))
        alphas.append(a * _valid(lengths, t))
    return torch.stack(out, 1), torch.stack(alphas, 1)


PLAIN = {"show_tell": _plain_show_tell, "soft_attention": _plain_soft, "adaptive_attention": _plain_adaptive}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_hoisted_teacher_forcing_equals_the_plain_loop(name):
    dec = _decoder(name)
    enc = _enc(5)
    tokens, lengths = _captions([4, 7, 2, 7, 5])
    out = dec(enc, tokens, lengths)
    logits, alphas = PLAIN[name](dec, enc, tokens, lengths)
    torch.testing.assert_close(out.logits, logits, **TOL)
    if alphas is not None:
        torch.testing.assert_close(out.attention, alphas, **TOL)
    # the gradients of every parameter agree too
    w = torch.randn_like(logits)
    new = torch.autograd.grad((out.logits * w).sum(), list(dec.parameters()), allow_unused=True)
    old = torch.autograd.grad((logits * w).sum(), list(dec.parameters()), allow_unused=True)
    for (pname, _), a, b in zip(dec.named_parameters(), new, old):
        assert (a is None) == (b is None), pname
        if a is not None:
            torch.testing.assert_close(a, b, **TOL, msg=pname)


def _loop_nodes_alive() -> int:
    import gc

    from seesay.layers import attention, loop

    kinds = (loop.LoopLinear, attention.LoopScores, attention.LoopTanhScores, attention.LoopContext)
    gc.collect()
    return sum(type(o) in kinds for o in gc.get_objects())  # type(), not isinstance: no deprecated proxies touched


@pytest.mark.parametrize("bias", [True, False])
def test_loop_linear_is_freed_once_its_forward_and_backward_are_done(bias):
    """No cycle through autograd's graph keeps a LoopLinear (with its rows) alive after backward:
    one biased LoopLinear per step of a training loop used to stay in memory for good."""
    import weakref

    from seesay.layers.loop import LoopLinear

    lin = torch.nn.Linear(3, 4, bias=bias)
    x = torch.randn(2, 3, requires_grad=True)
    loop = LoopLinear(lin.weight, lin.bias)
    (loop(x) + loop(x[:1]).sum()).sum().backward()
    assert lin.weight.grad is not None
    gone = weakref.ref(loop)
    del loop
    import gc

    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("name", sorted(PLAIN))
@pytest.mark.parametrize("grouped", [False, True])
def test_training_steps_leave_no_loop_nodes_behind(name, grouped):
    before = _loop_nodes_alive()
    dec = _decoder(name).train()
    tokens, lengths = _captions([4, 7, 2, 7, 5, 3])
    rows = torch.tensor([0, 0, 1, 1, 2, 2]) if grouped else None
    for _ in range(3):
        dec(_enc(3 if grouped else 6), tokens, lengths, rows).logits.sum().backward()
    assert _loop_nodes_alive() == before


@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("layout", ["image_major", "shuffled", "uneven"])
@pytest.mark.parametrize("grid_grad", [True, False])
def test_image_grouped_forward_equals_row_expanded(name, layout, grid_grad):
    """One feature row per image + image_rows == every caption with its own copy of the features
    (uneven: images with 3, 2 and 1 captions, and a fourth image with none); with a grid that needs a
    gradient (an encoder in the loop) and one that does not (cached features: the soft attention
    then reads only the running rows' images)."""
    dec = _decoder(name, **({"alpha_c": 1.0} if "attention" in name else {}))
    enc = _enc(3 if layout != "uneven" else 4, seed=4)
    rows = {"image_major": torch.arange(3).repeat_interleave(2), "shuffled": torch.tensor([2, 0, 1, 0, 2, 1]),
            "uneven": torch.tensor([2, 0, 2, 1, 2, 0])}[layout]
    tokens, lengths = _captions([5, 3, 6, 4, 2, 6], seed=5)
    grouped_enc = EncoderOutput(enc.grid.clone().requires_grad_(grid_grad), enc.pooled, enc.grid_hw)
    expanded_enc = EncoderOutput(enc.grid.clone().requires_grad_(grid_grad), enc.pooled, enc.grid_hw)
    grouped = dec(grouped_enc, tokens, lengths, image_rows=rows)
    expanded = dec(expanded_enc.index_select(rows), tokens, lengths)
    torch.testing.assert_close(grouped.logits, expanded.logits, **TOL)
    if expanded.attention is not None:
        torch.testing.assert_close(grouped.attention, expanded.attention, **TOL)
    for key in expanded.extras:
        torch.testing.assert_close(grouped.extras[key], expanded.extras[key], **TOL)
    w = torch.randn_like(expanded.logits)
    grids = ([grouped_enc.grid], [expanded_enc.grid]) if grid_grad else ([], [])
    ga = torch.autograd.grad((grouped.logits * w).sum(), [*grids[0], *dec.parameters()], allow_unused=True)
    gb = torch.autograd.grad((expanded.logits * w).sum(), [*grids[1], *dec.parameters()], allow_unused=True)
    for a, b in zip(ga, gb):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, **TOL)


def test_image_slots_place_each_row_among_its_images_rows():
    from seesay.layers.attention import image_slots, slot_context

    rows = torch.tensor([2, 0, 2, 1, 2, 0])
    slot, G = image_slots(rows, 4)
    assert G == 3
    assert slot.tolist() == [2 * 3 + 0, 0, 2 * 3 + 1, 1 * 3, 2 * 3 + 2, 1]
    grid = torch.randn(4, 5, 7)
    alpha = torch.softmax(torch.randn(6, 5), -1)
    for R in (6, 4, 1):  # teacher forcing's running rows are a prefix
        torch.testing.assert_close(slot_context(alpha[:R], grid, slot, G), torch.bmm(alpha[:R, None], grid[rows[:R]])[:, 0])


def test_rank_images_puts_the_running_rows_images_first():
    from seesay.layers.attention import rank_images

    rows = torch.tensor([3, 1, 3, 0, 1, 3])  # sorted longest caption first; image 2 has no rows
    new, ranked, first = rank_images(rows, 4)
    assert ranked.tolist() == [3, 1, 0, 2] and first == [0, 1, 3, 6]
    assert new.tolist() == [0, 1, 0, 2, 1, 0]
    assert torch.equal(ranked[new], rows)
    for n in range(1, 7):  # the first n rows' images are the first bisect_left(first, n) images
        assert set(new[:n].tolist()) == set(range(bisect.bisect_left(first, n)))


def _running_rows_batch(grouped: bool):
    """Six captions of uneven lengths, of three images (`grouped`: one feature row per image) or of
    six; with each step's running rows' count, longest caption first."""
    lengths = [3, 6, 2, 6, 4, 5]
    tokens, lengths_t = _captions(lengths, seed=5)
    rows = torch.tensor([2, 0, 1, 0, 2, 1]) if grouped else None
    steps = sorted((L - 1 for L in lengths), reverse=True)
    return lengths, tokens, lengths_t, rows, _enc(3 if grouped else 6, seed=4), steps


def _spy_on_slot_context(monkeypatch) -> list[tuple[int, int]]:
    """Record (rows, images read) of every `slot_context` or `LoopContext` call: one per teacher-forcing step."""
    from seesay.layers import attention

    calls = []
    real = attention.slot_context

    def spy(alpha, grid, slot, G, images=None):
        calls.append((alpha.shape[0], grid.shape[0] if images is None else images))
        return real(alpha, grid, slot, G, images)

    def loop_spy(self, alpha, images):
        if self.fused:  # else it calls slot_context
            calls.append((alpha.shape[0], images))
        return loop_real(self, alpha, images)

    loop_real = attention.LoopContext.__call__
    monkeypatch.setattr(attention, "slot_context", spy)
    monkeypatch.setattr(attention.LoopContext, "__call__", loop_spy)
    return calls


@pytest.mark.parametrize("grid_grad", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_soft_attention_steps_read_only_the_running_rows_images(monkeypatch, grid_grad, grouped):
    """With cached features (no gradient to the grid) each teacher-forcing step multiplies the context
    by the images of its running rows only; a grid with a gradient is read whole."""
    calls = _spy_on_slot_context(monkeypatch)
    dec = _decoder("soft_attention")
    lengths, tokens, lengths_t, rows, enc, steps = _running_rows_batch(grouped)
    enc = EncoderOutput(enc.grid.requires_grad_(grid_grad), enc.pooled, enc.grid_hw)
    dec(enc, tokens, lengths_t, image_rows=rows).logits.sum().backward()
    img = rows if grouped else torch.arange(6)
    by_length = img[torch.sort(torch.tensor(lengths), descending=True, stable=True).indices]
    expected = []
    for t in range(steps[0]):
        n = sum(1 for c in steps if c > t)
        expected.append((n, enc.grid.shape[0] if grid_grad else len(set(by_length[:n].tolist()))))
    assert calls == expected


@pytest.mark.parametrize("grouped", [False, True])
def test_adaptive_attention_steps_attend_with_the_running_rows_only(monkeypatch, grouped):
    """Each teacher-forcing step of the adaptive decoder scores with its running rows only and reads
    only their images' regions (ranked by their longest caption; `LoopContext` keeps the regions'
    gradient to those images), with grad and without (evaluation losses)."""
    calls = _spy_on_slot_context(monkeypatch)
    dec = _decoder("adaptive_attention")
    lengths, tokens, lengths_t, rows, enc, steps = _running_rows_batch(grouped)
    img = rows if grouped else torch.arange(6)
    by_length = img[torch.sort(torch.tensor(lengths), descending=True, stable=True).indices]
    expected = []
    for t in range(steps[0]):
        n = sum(1 for c in steps if c > t)
        expected.append((n, len(set(by_length[:n].tolist()))))
    dec(enc, tokens, lengths_t, image_rows=rows).logits.sum().backward()
    assert calls == expected
    calls.clear()
    with torch.no_grad():
        dec(enc, tokens, lengths_t, image_rows=rows)
    assert calls == expected


def test_loop_linear_gradients_equal_autograds_per_step_ones():
    """LoopLinear's one-product weight gradient == autograd's per-step sum, with shrinking rows, a
    step whose output is unused, a direct use of the weight outside the loop, and no grad mode."""
    from seesay.layers.loop import LoopLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 6)
    x0 = torch.randn(5, 6, requires_grad=True)

    def run(loop: bool):
        use = LoopLinear(lin.weight, lin.bias) if loop else lin
        h, outs = x0, []
        for t in range(4):
            y = use(h[: 5 - t])
            outs.append(y)
            h = torch.tanh(y)
        loss = sum((o ** 2).sum() for o in outs[:3]) + (lin.weight ** 3).sum()  # the last step's output unused
        return torch.autograd.grad(loss, [lin.weight, lin.bias, x0])

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(a, b, **TOL)
    with torch.no_grad():
        fast = LoopLinear(lin.weight, lin.bias)
        assert not fast.track
        torch.testing.assert_close(fast(x0), lin(x0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = LoopLinear(lin.weight, lin.bias)
        y = fast(x0)
        assert y.dtype == torch.bfloat16
        (g,) = torch.autograd.grad(y.float().sum(), [lin.weight])
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, torch.ones(6, 1) * x0.sum(0), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("name", sorted(SIZES))
def test_caption_model_passes_image_rows_to_decoders_that_take_them(name, monkeypatch):
    from seesay.model import build_model

    torch.manual_seed(0)
    model = build_model({"encoder": {"name": "small_cnn", "width": 16, "encoded_size": 3, "image_size": 24},
                         "decoder": {"name": name, "vocab_size": V, **SIZES[name]}}).eval()
    assert model.decoder.takes_image_rows
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    rows = torch.tensor([0, 0, 1, 1, 1])
    tokens, lengths = _captions([4, 6, 3, 5, 6])
    seen = []
    original = type(model.decoder).forward

    def spy(self, enc, *a, **kw):
        seen.append(enc.grid.shape[0])
        return original(self, enc, *a, **kw)

    monkeypatch.setattr(type(model.decoder), "forward", spy)
    out = model(images, tokens, lengths, rows)
    assert seen == [2]  # one feature row per image reached the decoder
    ref = original(model.decoder, model.encode(images).index_select(rows), tokens, lengths)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)


PACKING = sorted(n for n in SIZES if getattr(_decoder(n), "packs_logits", False))


def test_the_recurrent_decoders_and_the_transformer_pack_their_logits():
    assert PACKING == ["adaptive_attention", "show_tell", "soft_attention", "transformer"]


@pytest.mark.parametrize("width", [1, 3], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", PACKING)
def test_a_batch_with_no_word_to_predict_gives_empty_outputs(name, width):
    """Every caption of length 1 (only <start>): no position to predict, in either layout, and no
    error (the Transformer used to fail reshaping its empty attention)."""
    dec = _decoder(name).eval()
    enc = _enc(2)
    tokens, lengths = torch.zeros(2, width, dtype=torch.long), torch.tensor([1, 1])
    tokens[:, 0] = 1
    full = dec(enc, *_captions([3, 2]))  # the shapes of a batch that has words to predict
    padded = dec(enc, tokens, lengths)
    packed = dec(enc, tokens, lengths, packed=True)
    assert padded.logits.shape == (2, width - 1, V) and not padded.logits.any()
    assert packed.logits.shape == (0, V) and packed.positions.numel() == 0
    if full.attention is not None:
        assert padded.attention.shape == (2, width - 1, full.attention.shape[-1]) and not padded.attention.any()


@pytest.mark.parametrize("grouped", [False, True], ids=["per_caption", "by_image"])
@pytest.mark.parametrize("name", PACKING)
def test_packed_logits_are_the_padded_logits_real_positions(name, grouped):
    dec = _decoder(name).train()  # dropout on: both forwards must draw the same masks
    lengths_list = [4, 7, 2, 7, 5, 3]
    tokens, lengths = _captions(lengths_list)
    rows = torch.tensor([0, 0, 1, 1, 2, 2]) if grouped else None
    enc = _enc(3 if grouped else 6)
    torch.manual_seed(5)
    padded = dec(enc, tokens, lengths, rows)
    torch.manual_seed(5)
    packed = dec(enc, tokens, lengths, rows, packed=True)
    assert padded.positions is None
    T1 = tokens.shape[1] - 1
    pos = packed.positions
    real = sorted(b * T1 + t for b, L in enumerate(lengths_list) for t in range(L - 1))
    assert sorted(pos.tolist()) == real  # every real position once, no padding
    assert packed.logits.shape == (len(real), V)
    if name == "transformer":  # the output layer runs on fewer rows: another blocking of the same product
        torch.testing.assert_close(packed.logits, padded.logits.reshape(-1, V)[pos], **TOL)
    else:  # the same product over the same rows
        assert torch.equal(packed.logits, padded.logits.reshape(-1, V)[pos])
    if padded.attention is not None:
        assert torch.equal(packed.attention, padded.attention)
    w = torch.randn(len(real), V)
    a = torch.autograd.grad((packed.logits * w).sum(), list(dec.parameters()), allow_unused=True)
    g = torch.zeros(len(lengths_list) * T1, V).index_copy_(0, pos, w).view(len(lengths_list), T1, V)
    b = torch.autograd.grad((padded.logits * g).sum(), list(dec.parameters()), allow_unused=True)
    for (pname, _), x, y in zip(dec.named_parameters(), a, b):
        assert (x is None) == (y is None), pname
        if x is not None:
            torch.testing.assert_close(x, y, **TOL, msg=pname)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_packed_cross_entropy_equals_the_padded_one(smoothing):
    from seesay.train.objectives import token_cross_entropy

    dec = _decoder("soft_attention")
    tokens, lengths = _captions([4, 7, 2, 7, 5])
    enc = _enc(5)
    padded = dec(enc, tokens, lengths)
    packed = dec(enc, tokens, lengths, packed=True)
    loss_a, n_a, hits_a = token_cross_entropy(padded.logits, tokens, lengths, label_smoothing=smoothing)
    loss_b, n_b, hits_b = token_cross_entropy(packed.logits, tokens, lengths, label_smoothing=smoothing,
                                              positions=packed.positions)
    assert int(n_a) == int(n_b) == 20 and int(hits_a) == int(hits_b)
    torch.testing.assert_close(loss_b, loss_a)
    # each real position's gradient is the same: the loss sums the same terms, in another order
    (ga,) = torch.autograd.grad(loss_a, [padded.logits])
    (gb,) = torch.autograd.grad(loss_b, [packed.logits])
    torch.testing.assert_close(gb, ga.reshape(-1, V)[packed.positions], atol=1e-7, rtol=1e-6)
    assert (gb.sum(-1).abs() < 1e-6).all()  # a softmax's gradient rows sum to zero: no target lost


@pytest.mark.parametrize("name", PACKING)
def test_packed_sequence_logprobs_equal_the_padded_ones(name):
    from seesay.train.objectives import sequence_logprobs

    dec = _decoder(name)
    tokens, lengths = _captions([4, 7, 2, 7, 5])
    enc = _enc(5)
    padded = dec(enc, tokens, lengths)
    packed = dec(enc, tokens, lengths, packed=True)
    a = sequence_logprobs(padded.logits, tokens, lengths)
    b = sequence_logprobs(packed.logits, tokens, lengths, packed.positions)
    assert a.shape == b.shape == (5,)
    torch.testing.assert_close(b, a, **TOL)
    w = torch.randn(5)
    ga = torch.autograd.grad((a * w).sum(), list(dec.parameters()), allow_unused=True)
    gb = torch.autograd.grad((b * w).sum(), list(dec.parameters()), allow_unused=True)
    for (pname, _), x, y in zip(dec.named_parameters(), gb, ga):
        if x is not None:
            torch.testing.assert_close(x, y, **TOL, msg=pname)


@pytest.mark.parametrize("packs", [True, False], ids=["packing", "not_packing"])
@pytest.mark.parametrize("name", sorted(SIZES))
def test_cross_entropy_asks_packed_logits_of_models_that_give_them(name, packs, monkeypatch):
    from seesay.model import build_model
    from seesay.train.objectives import CrossEntropy

    torch.manual_seed(0)
    model = build_model({"encoder": {"name": "small_cnn", "width": 16, "encoded_size": 3, "image_size": 24},
                         "decoder": {"name": name, "vocab_size": V, **SIZES[name]}}).eval()
    if not packs:  # a family without the packed path (titans_mac, T5) is never asked for it
        model.decoder.packs_logits = False
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    rows = torch.tensor([0, 0, 1, 1, 1])
    tokens, lengths = _captions([4, 6, 3, 5, 6])
    asked, given = [], []
    original = type(model).forward

    def spy(self, *a, **kw):
        asked.append(kw.get("packed", False))
        out = original(self, *a, **kw)
        given.append(out.positions is not None)
        return out

    monkeypatch.setattr(type(model), "forward", spy)

    class Wrapped(torch.nn.Module):  # as DDP holds it: the model is .module
        def __init__(self, m):
            super().__init__()
            self.module = m

        def forward(self, *a, **kw):
            return self.module(*a, **kw)

    got = CrossEntropy(0.1)(Wrapped(model), images, tokens, lengths, rows)
    assert asked == [packs] and given == [packs]
    out = original(model, images, tokens, lengths, rows)  # padded, the reference
    from seesay.train.objectives import token_cross_entropy

    ref, _, _ = token_cross_entropy(out.logits, tokens, lengths, label_smoothing=0.1)
    torch.testing.assert_close(got["loss_ce"], ref)
    # a decoder that does not pack ignores the request: padded logits, no positions
    out = model(images, tokens, lengths, rows, packed=True)
    assert (out.positions is not None) == packs
    assert out.logits.dim() == (2 if packs else 3)


def test_unpack_steps_places_each_step_at_its_row_and_time():
    order = torch.tensor([2, 0, 1])  # sorted row r is caller row order[r]
    rows_per_step = [3, 2, 1]
    packed = torch.arange(6.0)[:, None]  # step 0: 0 1 2, step 1: 3 4, step 2: 5
    out = unpack_steps(packed, order, rows_per_step, 4)[..., 0]
    assert out.tolist() == [[1, 4, 0, 0], [2, 0, 0, 0], [0, 3, 5, 0]]


def test_lstm_cell_matches_torch():
    from seesay.decoders.common import input_gates, lstm_cell

    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(6, 5)
    x, h, c = torch.randn(4, 6), torch.randn(4, 5), torch.randn(4, 5)
    ref = cell(x, (h, c))
    got = lstm_cell(input_gates(cell, x) + F.linear(h, cell.weight_hh), c)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)


# beam search results of the implementation before issue 17's bookkeeping changes (same seeds)
BEAM_GOLDEN = {
    "soft_attention/beam3": {"tokens": [[2, 0, 0, 0, 0, 0, 0], [12, 12, 12, 12, 12, 12, 12], [6, 6, 6, 8, 3, 3, 3], [7, 12, 12, 0, 0, 0, 0]], "lengths": [1, 7, 7, 7], "scores": [-2.5432, -17.5805, -17.6854, -17.6895]},
    "soft_attention/beam4_lp": {"tokens": [[2, 0, 0, 0, 0, 0, 0], [0, 10, 10, 6, 6, 6, 6], [12, 12, 12, 12, 12, 12, 12], [12, 12, 12, 12, 12, 12, 1], [6, 6, 6, 8, 3, 3, 3], [6, 6, 6, 8, 8, 3, 3], [7, 12, 12, 0, 0, 0, 0], [7, 12, 0, 0, 0, 0, 0]], "lengths": [1, 7, 7, 7, 7, 7, 7, 7], "scores": [-2.5432, -10.8931, -10.822, -10.8265, -10.8867, -10.8867, -10.8892, -10.8894]},
    "soft_attention/diverse": {"tokens": [[2, 0, 0, 0, 0, 0, 0], [0, 10, 10, 6, 6, 6, 6], [12, 12, 12, 12, 12, 12, 12], [12, 12, 12, 12, 12, 12, 1], [6, 6, 6, 8, 3, 3, 3], [6, 6, 10, 8, 3, 3, 3], [7, 12, 12, 0, 0, 0, 0], [7, 12, 0, 0, 0, 0, 0]], "lengths": [1, 7, 7, 7, 7, 7, 7, 7], "scores": [-2.5432, -17.6959, -17.5805, -17.5877, -17.6854, -17.687, -17.6895, -17.6898]},
    "soft_attention/beam3_ngram": {"tokens": [[0, 10, 10, 6, 8, 1, 1], [12, 12, 6, 12, 1, 1, 12], [6, 6, 10, 8, 8, 3, 3], [7, 12, 12, 0, 0, 10, 0]], "lengths": [7, 7, 7, 7], "scores": [-17.6961, -17.6362, -17.6862, -17.7055]},
    "transformer/beam3": {"tokens": [[2], [2], [2], [2]], "lengths": [1, 1, 1, 1], "scores": [-2.1424, -2.1496, -2.119, -2.1143]},
    "transformer/beam4_lp": {"tokens": [[2, 0, 0, 0, 0], [3, 3, 3, 3, 2], [2, 0, 0, 0, 0], [3, 3, 3, 3, 2], [2, 0, 0, 0, 0], [3, 3, 3, 3, 2], [2, 0, 0, 0, 0], [6, 2, 0, 0, 0]], "lengths": [1, 5, 1, 5, 1, 5, 1, 2], "scores": [-2.1424, -6.1146, -2.1496, -6.2316, -2.119, -6.1648, -2.1143, -3.7273]},
    "transformer/diverse": {"tokens": [[2, 0, 0, 0, 0], [3, 3, 3, 3, 2], [2, 0, 0, 0, 0], [3, 3, 3, 3, 2], [2, 0, 0, 0, 0], [3, 3, 3, 3, 2], [2, 0, 0, 0, 0], [3, 3, 3, 3, 2]], "lengths": [1, 5, 1, 5, 1, 5, 1, 5], "scores": [-2.1424, -8.743, -2.1496, -8.9103, -2.119, -8.8148, -2.1143, -8.9759]},
    "transformer/beam3_ngram": {"tokens": [[3, 1, 3, 3, 2], [3, 3, 1, 3, 2], [3, 3, 1, 3, 2], [3, 1, 3, 3, 2]], "lengths": [5, 5, 5, 5], "scores": [-9.2747, -9.4115, -9.3077, -9.4704]},
}


@pytest.mark.parametrize("key", sorted(BEAM_GOLDEN))
def test_beam_search_results_unchanged(key):
    from seesay.decoding import Beam, Constraints, DiverseBeam, decode

    name, label = key.split("/")
    strategies = {"beam3": (Beam(3), 1, None), "beam4_lp": (Beam(4, 0.7), 2, None),
                  "diverse": (DiverseBeam(4, 2, 0.5), 2, None),
                  "beam3_ngram": (Beam(3), 1, Constraints(no_repeat_ngram_size=2, min_length=2))}
    sizes = {"soft_attention": {"embed_dim": 12, "attention_dim": 14, "decoder_dim": 20},
             "transformer": {"d_model": 16, "heads": 2, "layers": 2, "ff_dim": 32}}
    torch.manual_seed(0)
    dec = build_decoder(name, vocab_size=13, enc_dim=16, **sizes[name]).eval()
    g = torch.Generator().manual_seed(3)
    grid = torch.randn(4, 9, 16, generator=g) * 2
    strategy, n, constraints = strategies[label]
    res = decode(dec, EncoderOutput(grid, grid.mean(1), (3, 3)), strategy, bos=1, eos=2, max_len=7, num_captions=n,
                 constraints=constraints)
    want = BEAM_GOLDEN[key]
    assert res.tokens.tolist() == want["tokens"]
    assert res.lengths.tolist() == want["lengths"]
    assert res.scores.tolist() == pytest.approx(want["scores"], abs=2e-4)


# -- checkpoints load without building random weights first ------------------------------------------


def _saved(tmp_path, decoder: str, **dec_kw):
    from seesay.checkpoint import save_checkpoint
    from seesay.data.tokenize import build_vocab
    from seesay.model import build_model

    vocab = build_vocab([[f"w{i}" for i in range(20)]], min_word_freq=1)
    spec = {"encoder": {"name": "small_cnn", "width": 16, "encoded_size": 3, "image_size": 24},
            "decoder": {"name": decoder, "vocab_size": len(vocab), **dec_kw}}
    torch.manual_seed(0)
    model = build_model(spec, tokenizer=vocab, image_size=24).eval()
    return model, save_checkpoint(tmp_path / "ck", model=model, config={"model": spec})


@pytest.mark.parametrize("name", [*sorted(SIZES), "titans_mac"])
def test_checkpoint_loads_identical_weights_through_the_meta_device(tmp_path, name):
    from conftest import TINY_DECODERS
    from seesay import checkpoint
    from seesay.decoding import Beam

    model, path = _saved(tmp_path, name, **TINY_DECODERS[name])
    state = checkpoint.read_weights(path / checkpoint.MODEL_FILE)
    config, tok, pre = checkpoint.read_checkpoint_files(path)
    fast = checkpoint._load_without_init(config["model"], tok, pre, state)
    # titans_mac's library keeps non-persistent buffers (rotary caches) that a checkpoint cannot
    # fill: it takes the plain way
    assert (fast is None) == (name == "titans_mac")
    loaded = checkpoint.load_checkpoint(path).model
    want = model.state_dict()
    for got in ([fast.state_dict()] if fast is not None else []) + [loaded.state_dict()]:
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(got[k], v) and not got[k].is_meta, k
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
    images = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8)
    a, b = model.generate(images, Beam(2), max_len=5), loaded.generate(images, Beam(2), max_len=5)
    assert torch.equal(a.tokens, b.tokens)


def test_checkpoint_falls_back_to_the_plain_load_for_tied_or_unfilled_tensors(tmp_path, monkeypatch):
    from seesay import checkpoint

    model, path = _saved(tmp_path, "show_tell", embed_dim=12, decoder_dim=12)
    state = checkpoint.read_weights(path / checkpoint.MODEL_FILE)
    config, tok, pre = checkpoint.read_checkpoint_files(path)
    from seesay.decoders.show_tell import ShowTellDecoder

    original_init = ShowTellDecoder.__init__

    def with_extra_tensor(self, **kw):
        original_init(self, **kw)
        self.lookup = torch.arange(5.0)  # a plain tensor attribute: the checkpoint cannot fill it

    monkeypatch.setattr(ShowTellDecoder, "__init__", with_extra_tensor)
    assert checkpoint._load_without_init(config["model"], tok, pre, state) is None
    assert torch.equal(checkpoint.load_checkpoint(path).model.decoder.lookup, torch.arange(5.0))

    def tied(self, **kw):
        original_init(self, **kw)
        self.fc.weight = self.embedding.table.weight if self.fc.weight.shape == self.embedding.table.weight.shape \
            else self.fc.weight
        self.same_projection = self.image_proj  # the same parameters under two names: assigning would untie them

    monkeypatch.setattr(ShowTellDecoder, "__init__", tied)
    assert checkpoint._load_without_init(config["model"], tok, pre, state) is None


@pytest.mark.parametrize("p_grad", [True, False])
@pytest.mark.parametrize("kind", ["relu", "tanh"])
def test_loop_scores_gradients_equal_autograds(kind, p_grad):
    """LoopScores (relu: scratch activation, P's gradient summed over the steps, w's made mostly from
    that sum, or from the activation when P needs no gradient) and LoopTanhScores (tanh through
    sigmoid, made again in the backward) == the plain formula, for steps over shrinking prefixes of
    P's rows (the rows still running) and P also used outside the loop; without grad or under
    autocast the attention takes the plain path."""
    from seesay.layers.attention import LoopScores, LoopTanhScores

    owner, act = {"relu": (LoopScores, torch.relu), "tanh": (LoopTanhScores, torch.tanh)}[kind]
    torch.manual_seed(0)
    score = torch.nn.Linear(6, 1)
    P0 = torch.randn(4, 5, 6, requires_grad=p_grad)
    qs = [torch.randn(r, 6, requires_grad=True) for r in (4, 3, 3, 1)]

    def run(fused: bool):
        P = P0 * 2.0
        scores = owner(P, score)
        assert scores.fused and scores.accumulating == p_grad
        out = [scores(q) if fused else score(act(P[: q.shape[0]] + q[:, None])).squeeze(-1) for q in qs]
        loss = sum((torch.softmax(e, -1) * torch.arange(5.0)).sum() * (i + 1) for i, e in enumerate(out)) + P.sum()
        return out, torch.autograd.grad(loss, [P0, *qs, *score.parameters()] if p_grad else [*qs, *score.parameters()])

    (e_new, g_new), (e_old, g_old) = run(True), run(False)
    for x, y in zip([*e_new, *g_new], [*e_old, *g_old]):
        torch.testing.assert_close(x, y, **TOL)
    with torch.no_grad():
        assert not owner(P0, score).fused
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not owner(P0, score).fused


def test_loop_context_gradients_equal_autograds():
    """LoopContext (each step's gradient added into the first k images of one accumulation) ==
    slot_context under plain autograd, for steps over shrinking prefixes of rows and images and a
    grid also used outside the loop; without grad or under autocast it is slot_context itself."""
    from seesay.layers.attention import LoopContext, image_slots, slot_context

    torch.manual_seed(0)
    rows = torch.tensor([0, 0, 1, 2, 1, 3])  # ranked: each image's first row in image order
    slots = image_slots(rows, 4)
    grid0 = torch.randn(4, 5, 3, requires_grad=True)
    alphas = [torch.randn(r, 5, requires_grad=True) for r in (6, 5, 4, 3, 1)]
    images = [4, 4, 3, 3, 1]  # the images of the first r rows

    def run(fused: bool):
        grid = grid0 * 2.0
        ctx = LoopContext(grid, slots)
        assert ctx.fused
        out = [ctx(a, k) if fused else slot_context(a, grid, *slots, images=k) for a, k in zip(alphas, images)]
        loss = sum((o * torch.arange(3.0)).sum() * (i + 1) for i, o in enumerate(out)) + grid.sum()
        return out, torch.autograd.grad(loss, [grid0, *alphas])

    (o_new, g_new), (o_old, g_old) = run(True), run(False)
    for x, y in zip([*o_new, *g_new], [*o_old, *g_old]):
        torch.testing.assert_close(x, y, **TOL)
    with torch.no_grad():
        assert not LoopContext(grid0, slots).fused
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not LoopContext(grid0, slots).fused


@pytest.mark.parametrize("bias", [True, False])
def test_tanh_scores_equal_the_plain_formula_and_its_gradients(bias):
    """w^T tanh(x) + b computed as (2w)^T sigmoid(2x) + b - sum(w) (the sentinel attention's
    scores): values and gradients to x, w and b match torch's tanh; without grad x is overwritten."""
    from seesay.layers.attention import tanh_scores

    torch.manual_seed(0)
    score = torch.nn.Linear(8, 1, bias=bias)
    x0 = torch.randn(3, 5, 8) * 3  # saturated and linear parts of tanh
    x = x0.clone().requires_grad_()
    params = [x, *score.parameters()]
    ref = score(torch.tanh(x))
    got = tanh_scores(x * 1.0, score)  # a fresh tensor, as the attention passes
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        y = x0.clone()
        torch.testing.assert_close(tanh_scores(y, score), ref.detach(), rtol=1e-6, atol=1e-6)
        assert not torch.equal(y, x0)  # computed in place: no second tensor of the sum's size


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_teacher_forcing_under_autocast_keeps_float32_gradients(name):
    """bf16 autocast (what --amp does on CUDA with float16): the loop's linear maps run in bf16, every
    parameter still gets a float32 gradient near the float32 one."""
    dec = _decoder(name).train()
    dec.dropout.p = 0.0
    enc = _enc(3, seed=2)
    tokens, lengths = _captions([5, 3, 6, 4, 2, 6], seed=3)
    rows = torch.tensor([0, 0, 1, 2, 2, 1])
    w = torch.randn(6, tokens.shape[1] - 1, V, generator=torch.Generator().manual_seed(0))
    ref = torch.autograd.grad((dec(enc, tokens, lengths, image_rows=rows).logits * w).sum(), list(dec.parameters()),
                              allow_unused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(enc, tokens, lengths, image_rows=rows)
    got = torch.autograd.grad((out.logits.float() * w).sum(), list(dec.parameters()), allow_unused=True)
    for (pname, _p), a, b in zip(dec.named_parameters(), got, ref):
        if b is None:
            continue
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), pname
        assert (a - b).norm() <= 0.1 * b.norm() + 5e-3, pname  # (an attention score bias: ~0 exactly)
