"""The titans_mac decoder: contract, caption-only loss, image dependence, cache == recompute,
beam reordering of the library cache, issue-#64 parameter fix, training and overfitting."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("titans_pytorch")

from conftest import tiny_decoder  # noqa: E402
from seesay.decoders.titans_mac import (  # noqa: E402
    TitansMACDecoder,
    reorder_mac_cache,
    set_accelerated_scan,
)
from seesay.encoders.base import EncoderOutput  # noqa: E402

V, E = 20, 12
BOS, EOS = 1, 2

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> TitansMACDecoder:
    """The shared tiny titans_mac (tests/conftest.py) at depth 2 unless `kw` says otherwise: layer 1
    attention only, layer 2 with the neural memory (every second layer), so caches of both kinds run."""
    return tiny_decoder("titans_mac", V, E, **{"depth": 2, **kw})


def enc_of(b: int, seed: int = 0) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    return EncoderOutput(torch.randn(b, 9, E, generator=g), torch.randn(b, E, generator=g), (3, 3))


def captions(b: int, t: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(3, V, (b, t), generator=g)
    tok[:, 0] = BOS
    return tok


def test_contract_shapes_and_registry():
    from seesay.registry import build_decoder

    dec = build_decoder("titans_mac", vocab_size=V, enc_dim=E, dim=32, depth=1, heads=2, dim_head=16,
                        num_image_tokens=4, max_len=10)
    assert isinstance(dec, TitansMACDecoder)
    assert dec.segment_len == 4 + 10  # auto: image tokens + max caption length
    tok = captions(3, 7)
    out = dec(enc_of(3), tok, torch.tensor([7, 5, 3]))
    assert out.logits.shape == (3, 6, V)
    assert out.attention.shape == (3, 6, 9)  # attention over the 3x3 encoder grid
    lp, state, att = dec.step(tok[:, 0], dec.init_state(enc_of(3)))
    assert lp.shape == (3, V) and att.shape == (3, 9)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3), atol=1e-5)


@pytest.mark.parametrize("compressor", ["pool", "resampler"])
def test_image_changes_logits_at_every_caption_position(compressor):
    dec = tiny(compressor=compressor).eval()
    tok = captions(2, 10)
    lengths = torch.tensor([10, 10])
    with torch.no_grad():
        a = dec(enc_of(2, seed=1), tok, lengths).logits
        b = dec(enc_of(2, seed=2), tok, lengths).logits
    per_pos = (a - b).abs().amax(dim=-1)  # (B, T-1)
    assert bool((per_pos > 1e-4).all()), per_pos


def test_padding_does_not_change_real_positions():
    dec = tiny().eval()
    tok = captions(2, 10)
    lengths = torch.tensor([6, 10])
    tok2 = tok.clone()
    tok2[0, 6:] = torch.tensor([5, 6, 7, 8])  # different garbage after row 0's end
    tok[0, 6:] = 0
    with torch.no_grad():
        a = dec(enc_of(2), tok, lengths).logits
        b = dec(enc_of(2), tok2, lengths).logits
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-6)
    assert torch.allclose(a[1], b[1], atol=1e-6)


CONFIGS = [
    {},  # one window holds image + caption
    {"neural_mem_heads": 2},  # issue #64 path, (batch*heads)-laid-out memory state
    {"segment_len": 6},  # several windows, long-term memory tokens inside the sequence
    {"segment_len": 3, "num_longterm_mem_tokens": 0},  # image prefix longer than a window
    {"neural_memory_segment_len": 4},  # neural memory updates inside the caption
    {"segment_len": 5, "sliding_window_attn": True, "neural_mem_heads": 2},
]


@pytest.mark.filterwarnings("ignore:titans_mac")
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_teacher_forcing_equals_cached_and_uncached_steps(kw):
    dec = tiny(**kw).eval()
    enc = enc_of(3)
    tok = captions(3, 12)
    with torch.no_grad():
        full = dec(enc, tok, torch.full((3,), 12)).logits.log_softmax(-1)
        for use_cache in (True, False):
            state = dec.init_state(enc, use_cache=use_cache)
            assert (state.cache is not None) == use_cache
            steps = []
            for t in range(11):
                lp, state, _ = dec.step(tok[:, t], state)
                steps.append(lp)
            assert torch.allclose(torch.stack(steps, 1), full, atol=1e-5), (use_cache, kw)
        # reorder_state picks / repeats rows of every cache tensor (KV and neural memory)
        index = torch.tensor([2, 0, 2, 1, 1])
        state = dec.reorder_state(dec.init_state(enc), index)
        steps = []
        for t in range(11):
            lp, state, _ = dec.step(tok[index, t], state)
            steps.append(lp)
        assert torch.allclose(torch.stack(steps, 1), full[index], atol=1e-5)


def test_reorder_midway_matches_fresh_rows():
    dec = tiny(neural_mem_heads=2, neural_memory_segment_len=3).eval()
    enc = enc_of(3)
    tok = captions(3, 8)
    with torch.no_grad():
        state = dec.init_state(enc)
        for t in range(4):
            _, state, _ = dec.step(tok[:, t], state)
        index = torch.tensor([1, 1, 0])
        state = dec.reorder_state(state, index)
        lp_mid, _, _ = dec.step(tok[index, 4], state)
        full = dec(enc_of(3), tok, torch.full((3,), 8)).logits.log_softmax(-1)
    assert torch.allclose(lp_mid, full[index, 4], atol=1e-5)


def test_reorder_handles_every_cache_field():
    dec = tiny(neural_mem_heads=2, neural_memory_segment_len=3).eval()
    with torch.no_grad():
        state = dec.init_state(enc_of(2))
        _, state, _ = dec.step(torch.full((2,), BOS), state)
    index = torch.tensor([1, 0, 1])
    seq_index, kv, mems = reorder_mac_cache(state.cache, index, 2)
    assert kv.shape[2] == 3
    for st in mems:
        assert all(v.shape[0] == 3 * 2 for v in st.weights.values())
        assert all(v.shape[0] == 3 * 2 for v in st.updates.values())
        assert all(v.shape[1] == 3 * 2 for v in st.states[1].values())  # momentum: (order, B*h, ...)
        assert st.cache_store_segment.shape[1] == 3


@pytest.mark.filterwarnings("ignore:titans_mac")
@pytest.mark.parametrize("kw", [{}, {"segment_len": 6}])
def test_cached_greedy_and_beam_equal_uncached(kw):
    from seesay.decoding import beam_search, greedy

    dec = tiny(**kw).eval()
    enc = enc_of(3)
    dec.use_cache = True
    g1 = greedy(dec, enc, bos=BOS, eos=EOS, max_len=10)
    b1 = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=3, max_len=10)
    dec.use_cache = False
    g2 = greedy(dec, enc, bos=BOS, eos=EOS, max_len=10)
    b2 = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=3, max_len=10)
    assert torch.equal(g1.tokens, g2.tokens) and torch.equal(g1.lengths, g2.lengths)
    assert torch.allclose(g1.scores, g2.scores, atol=1e-4)
    assert torch.equal(b1.tokens, b2.tokens)
    assert torch.allclose(b1.scores, b2.scores, atol=1e-4)


@pytest.mark.filterwarnings("ignore:titans_mac")
@pytest.mark.parametrize("beam", [1, 3])
def test_finished_images_leave_the_batch(beam, monkeypatch):
    """Images whose captions end early are dropped from the library cache mid-decoding; results do not change."""
    import seesay.decoding as decoding
    from seesay.decoding import beam_search, greedy

    try:  # tests/ is not a package: pytest puts it on sys.path (rootdir-relative "prepend" import)
        from test_decoding import EndsAt
    except ImportError:  # pragma: no cover - a package layout
        from .test_decoding import EndsAt

    dec = tiny(neural_mem_heads=2, neural_memory_segment_len=3).eval()
    ends = torch.tensor([1, 6, 2, 8, 3, 2])

    def run():
        wrapped = EndsAt(dec, ends, V, EOS)
        if beam == 1:
            return greedy(wrapped, enc_of(6), bos=BOS, eos=EOS, max_len=10), wrapped.rows
        return beam_search(wrapped, enc_of(6), bos=BOS, eos=EOS, beam_size=beam, max_len=10), wrapped.rows

    shrunk, rows = run()
    assert min(rows) < 6 * beam
    monkeypatch.setattr(decoding._Active, "COMPACT_FRACTION", 2.0)
    full, rows = run()
    assert set(rows) == {6 * beam}
    assert torch.equal(shrunk.tokens, full.tokens) and torch.equal(shrunk.lengths, full.lengths)
    assert torch.allclose(shrunk.scores, full.scores, atol=1e-5)


def test_issue_64_memory_parameters_are_untied_and_train():
    from safetensors.torch import load_file, save_file

    dec = tiny(neural_mem_heads=2)
    ptrs = {}
    for name, p in dec.named_parameters():
        if "memory_model_parameters" in name:
            assert p.stride(0) != 0, name
            assert p.is_contiguous()
        assert p.data_ptr() not in ptrs, f"{name} shares storage with {ptrs.get(p.data_ptr())}"
        ptrs[p.data_ptr()] = name
        if ".memory_model." in name:  # never used (read through functional_call): frozen
            assert not p.requires_grad, name
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-3)
    tok = captions(2, 8)
    out = dec(enc_of(2), tok, torch.tensor([8, 8]))
    torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), tok[:, 1:].reshape(-1)).backward()
    opt.step()  # fails in titans-pytorch as released when heads > 1
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "m.safetensors")
        save_file({k: v.contiguous() for k, v in dec.state_dict().items()}, path)
        fresh = tiny(neural_mem_heads=2)
        fresh.load_state_dict(load_file(path))


def test_max_grad_norm_and_scan_flags():
    dec = tiny(max_grad_norm=0.5)
    mems = [m for m in dec.modules() if type(m).__name__ == "NeuralMemory"]
    assert mems and all(m.max_grad_norm == 0.5 for m in mems)
    set_accelerated_scan(dec.mac, torch.device("cpu"))
    assert not any(m.assoc_scan.use_accelerated for m in mems)  # accelerated-scan needs CUDA


def _train(dec, enc, tok, lengths, steps, lr=3e-3):
    opt = torch.optim.AdamW(dec.parameters(), lr=lr)
    losses = []
    dec.train()
    for _ in range(steps):
        logits = dec(enc, tok, lengths).logits
        target = tok[:, 1:]
        mask = torch.arange(target.shape[1])[None] < (lengths - 1)[:, None]
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        loss = (ce * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_loss_falls_and_overfits_a_few_images():
    from seesay.decoding import greedy

    dec = tiny(depth=2, num_persist_mem_tokens=0, num_longterm_mem_tokens=0, max_len=8)
    enc = enc_of(4, seed=3)
    # four images, four different captions of different lengths: <start> words <end> <pad>
    tok = torch.tensor([
        [BOS, 3, 4, 5, EOS, 0],
        [BOS, 6, 7, EOS, 0, 0],
        [BOS, 8, 9, 10, 11, EOS],
        [BOS, 12, 3, 13, EOS, 0],
    ])
    lengths = torch.tensor([5, 4, 6, 5])
    losses = _train(dec, enc, tok, lengths, steps=60, lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    dec.eval()
    res = greedy(dec, enc, bos=BOS, eos=EOS, max_len=8)
    for i in range(4):
        n = int(lengths[i]) - 1
        assert res.tokens[i, :n].tolist() == tok[i, 1 : n + 1].tolist()


def test_vit_titans_caption_model_checkpoint_round_trip(tmp_path):
    """vit + titans_mac through build_model, a training step, then save/load (safetensors) and
    identical beam-search captions."""
    from seesay.checkpoint import load_checkpoint, save_checkpoint
    from seesay.data.tokenize import SPECIALS, Vocab
    from seesay.decoding import Beam
    from seesay.model import build_model

    vocab = Vocab(list(SPECIALS) + [f"w{i}" for i in range(V - len(SPECIALS))])
    spec = {
        "encoder": {"name": "vit", "image_size": 32, "patch_size": 8, "dim": 32, "depth": 1, "heads": 2,
                    "mlp_dim": 64, "dropout": 0.0},
        "decoder": {"name": "titans_mac", "vocab_size": len(vocab), "dim": 32, "depth": 2, "heads": 2,
                    "dim_head": 16, "num_image_tokens": 4, "neural_mem_heads": 2, "neural_memory_layers": [1, 2],
                    "max_len": 10},
    }
    torch.manual_seed(0)
    model = build_model(spec, tokenizer=vocab, image_size=32)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    tok = captions(2, 6)
    out = model(images, tok, torch.tensor([6, 6]))
    torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), tok[:, 1:].reshape(-1)).backward()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    model.eval()
    before = model.generate(images, Beam(2), max_len=8)
    save_checkpoint(tmp_path / "ck", model=model, config={})
    ck = load_checkpoint(tmp_path / "ck")
    after = ck.model.generate(images, Beam(2), max_len=8)
    assert torch.equal(before.tokens, after.tokens)
