"""Greedy, beam search and sampling over every registered decoder (tiny, untrained, CPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_decoder
from seesay.decoding import beam_search, filter_logits, greedy, sample
from seesay.encoders.base import EncoderOutput
from seesay.registry import list_decoders

torch.set_num_threads(1)

V, N, D = 11, 5, 8
BOS, EOS = 1, 2
DECODERS = list_decoders()  # every registered family (tests/test_contracts.py: each has a tiny config)


def make(name: str, seed: int = 0):
    dec = tiny_decoder(name, V, D, seed=seed).eval()
    # make <end> likely enough that some beams finish and some do not: +1.5 on its logit, through a
    # hook on the vocabulary projection (titans_mac's has no bias to raise)
    (proj,) = [m for m in dec.modules() if isinstance(m, torch.nn.Linear) and m.out_features == V]
    boost = 1.5 * torch.nn.functional.one_hot(torch.tensor(EOS), V)
    proj.register_forward_hook(lambda module, inputs, out: out + boost)
    return dec


def fake_enc(batch: int, seed: int = 1) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    return EncoderOutput(torch.randn(batch, N, D, generator=g) * 2, torch.randn(batch, D, generator=g), (1, 5))


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_result_format(name):
    dec = make(name)
    res = greedy(dec, fake_enc(6), bos=BOS, eos=EOS, max_len=12)
    assert res.tokens.dtype == torch.long and res.tokens.shape[0] == 6
    for i in range(6):
        L = int(res.lengths[i])
        row = res.tokens[i].tolist()
        assert all(t == 0 for t in row[L:])
        assert EOS not in row[: L - 1]
        assert row[L - 1] == EOS or L == 12
    if res.attention is not None:
        assert res.attention.shape[:2] == res.tokens.shape


@pytest.mark.parametrize("name", DECODERS)
def test_beam_size_one_equals_greedy(name):
    dec = make(name)
    enc = fake_enc(7)
    g = greedy(dec, enc, bos=BOS, eos=EOS, max_len=15)
    b = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=1, max_len=15)
    assert torch.equal(g.tokens, b.tokens)
    assert torch.equal(g.lengths, b.lengths)
    torch.testing.assert_close(g.scores, b.scores, atol=1e-5, rtol=0)
    if g.attention is not None:
        torch.testing.assert_close(g.attention, b.attention, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_beam_without_any_end_returns_max_len(name):
    dec = make(name)
    enc = fake_enc(3)
    res = beam_search(dec, enc, bos=BOS, eos=V + 5, beam_size=4, max_len=9)  # <end> can never be produced
    assert res.tokens.shape == (3, 9)
    assert res.lengths.tolist() == [9, 9, 9]
    assert torch.isfinite(res.scores).all()
    if res.attention is not None:
        assert res.attention.shape[:2] == (3, 9)
    g = greedy(dec, enc, bos=BOS, eos=V + 5, max_len=9)
    assert (res.scores >= g.scores - 1e-4).all()  # a beam is never worse than greedy when nothing ends


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("penalty", [0.0, 0.7])
def test_batched_beam_equals_per_image(name, penalty):
    dec = make(name)
    enc = fake_enc(5)
    batched = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=3, max_len=12, length_penalty=penalty)
    for i in range(5):
        one = beam_search(dec, enc.index_select(torch.tensor([i])), bos=BOS, eos=EOS, beam_size=3, max_len=12,
                          length_penalty=penalty)
        L = int(one.lengths[0])
        assert int(batched.lengths[i]) == L
        assert batched.tokens[i, :L].tolist() == one.tokens[0, :L].tolist()
        torch.testing.assert_close(batched.scores[i], one.scores[0], atol=1e-5, rtol=0)
        if one.attention is not None:
            torch.testing.assert_close(batched.attention[i, :L], one.attention[0, :L], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_beam_score_is_the_sequence_logprob(name):
    """The reported score equals the decoder's log-probability of the returned tokens (traceback is right)."""
    dec = make(name)
    enc = fake_enc(4)
    res = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=4, max_len=10)
    state = dec.init_state(enc)
    prev = torch.full((4,), BOS)
    total = torch.zeros(4)
    for t in range(res.tokens.shape[1]):
        logprobs, state, att = dec.step(prev, state)
        alive = t < res.lengths
        total += torch.where(alive, logprobs.gather(1, res.tokens[:, t : t + 1]).squeeze(1), 0.0)
        if att is not None:
            torch.testing.assert_close(att[alive], res.attention[alive, t], atol=1e-5, rtol=0)
        prev = res.tokens[:, t]
    torch.testing.assert_close(total, res.scores, atol=1e-4, rtol=0)


def test_length_penalty_prefers_longer_captions():
    dec = make("soft_attention")
    enc = fake_enc(8)
    plain = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=5, max_len=20, length_penalty=0.0)
    long = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=5, max_len=20, length_penalty=2.0)
    assert long.lengths.float().mean() >= plain.lengths.float().mean()


@pytest.mark.parametrize("name", DECODERS)
def test_sampling_top_k_one_equals_greedy(name):
    dec = make(name)
    enc = fake_enc(6)
    g = greedy(dec, enc, bos=BOS, eos=EOS, max_len=12)
    s = sample(dec, enc, bos=BOS, eos=EOS, max_len=12, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(g.tokens, s.tokens)
    torch.testing.assert_close(g.scores, s.scores)


def test_sampling_is_reproducible_with_a_generator():
    dec = make("soft_attention")
    enc = fake_enc(6)
    a = sample(dec, enc, bos=BOS, eos=EOS, max_len=12, temperature=1.5, generator=torch.Generator().manual_seed(7))
    b = sample(dec, enc, bos=BOS, eos=EOS, max_len=12, temperature=1.5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens)


def test_top_p_on_a_known_distribution():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p)).squeeze(0).tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert kept(0.6) == [False, True, False, True]  # 0.5 + 0.3
    assert kept(0.9) == [False, True, True, True]  # 0.5 + 0.3 + 0.15
    assert kept(0.99) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    # the kept tokens are renormalised in proportion
    p = torch.softmax(filter_logits(logits, top_p=0.6), dim=-1)
    torch.testing.assert_close(p, torch.tensor([[0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]]))


def test_top_k_and_temperature():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isfinite(filter_logits(logits, top_k=2)).squeeze(0).tolist() == [False, True, True, False]
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2)
    with pytest.raises(ValueError):
        filter_logits(logits, temperature=0.0)


def test_sampling_respects_top_p():
    """With top_p=0.6 on a fixed distribution only the two most likely tokens are ever drawn."""

    class Fixed:
        def init_state(self, enc):
            return {}

        def step(self, prev, state):
            lp = torch.tensor([0.05, 0.5, 0.15, 0.3]).log().expand(prev.shape[0], 4)
            return lp, state, None

        def reorder_state(self, state, index):
            return state

    enc = EncoderOutput(torch.zeros(200, 1, 1), torch.zeros(200, 1), (1, 1))
    res = sample(Fixed(), enc, bos=0, eos=99, max_len=3, top_p=0.6, generator=torch.Generator().manual_seed(0))
    assert set(res.tokens.flatten().tolist()) == {1, 3}


def test_transformer_cached_equals_uncached():
    dec = make("transformer")
    enc = fake_enc(5)
    cached = greedy(dec, enc, bos=BOS, eos=EOS, max_len=14)
    dec.use_cache = False
    try:
        full = greedy(dec, enc, bos=BOS, eos=EOS, max_len=14)
        full_beam = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=3, max_len=14)
    finally:
        dec.use_cache = True
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.scores, full.scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.attention, full.attention, atol=1e-5, rtol=0)
    beam = beam_search(dec, enc, bos=BOS, eos=EOS, beam_size=3, max_len=14)
    assert torch.equal(beam.tokens, full_beam.tokens)



def test_transformer_attention_layer_choice():
    dec = make("transformer")
    enc = fake_enc(3)
    last = greedy(dec, enc, bos=BOS, eos=EOS, max_len=6)
    dec.attention_layer = 0
    try:
        first = greedy(dec, enc, bos=BOS, eos=EOS, max_len=6)
    finally:
        dec.attention_layer = -1
    assert torch.equal(first.tokens, last.tokens)
    assert not torch.allclose(first.attention, last.attention)


class EndsAt:
    """Wraps a decoder: image i's captions end around step ends[i] (<end> made near-impossible
    before it and near-certain from it on), and each step's number of rows is recorded.
    (Also used by test_titans.py.)"""

    def __init__(self, dec, ends, vocab_size=V, eos=EOS):
        self.dec, self.ends, self.rows = dec, ends, []
        self.eos_column = torch.nn.functional.one_hot(torch.tensor(eos), vocab_size)

    def init_state(self, enc):
        return {"inner": self.dec.init_state(enc), "end": self.ends.clone(), "t": 0}

    def reorder_state(self, state, index):
        return {"inner": self.dec.reorder_state(state["inner"], index), "end": state["end"][index], "t": state["t"]}

    def step(self, prev, state):
        self.rows.append(prev.shape[0])
        logprobs, inner, att = self.dec.step(prev, state["inner"])
        push = torch.where(state["end"] <= state["t"], 12.0, -12.0)
        logprobs = torch.log_softmax(logprobs + push[:, None] * self.eos_column, -1)
        return logprobs, {"inner": inner, "end": state["end"], "t": state["t"] + 1}, att


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("beam", [1, 3])
def test_finished_images_leave_the_batch_without_changing_results(name, beam, monkeypatch):
    import seesay.decoding as decoding

    dec = make(name)
    ends = torch.tensor([2, 9, 3, 12, 4, 4, 6, 2, 11, 5, 3, 7])
    enc = fake_enc(12, seed=3)
    run = (lambda d: greedy(d, enc, bos=BOS, eos=EOS, max_len=15)) if beam == 1 else \
        (lambda d: beam_search(d, enc, bos=BOS, eos=EOS, beam_size=beam, max_len=15, length_penalty=0.7))
    counted = EndsAt(dec, ends)
    shrunk = run(counted)
    assert counted.rows[0] == 12 * beam
    assert min(counted.rows) < 12 * beam  # finished images stopped costing decoder work
    assert counted.rows == sorted(counted.rows, reverse=True)
    monkeypatch.setattr(decoding._Active, "COMPACT_FRACTION", 2.0)  # never remove anything
    counted_full = EndsAt(dec, ends)
    full = run(counted_full)
    assert set(counted_full.rows) == {12 * beam}
    assert sum(counted.rows) < sum(counted_full.rows)
    assert len(set(full.lengths.tolist())) > 3
    assert torch.equal(shrunk.tokens, full.tokens) and torch.equal(shrunk.lengths, full.lengths)
    torch.testing.assert_close(shrunk.scores, full.scores, atol=1e-5, rtol=0)
    if full.attention is not None:
        torch.testing.assert_close(shrunk.attention, full.attention, atol=1e-5, rtol=0)


# -- Constraints.allowed_ids (issue 13's token classes; issue 17 added it) --------------------------


@pytest.mark.parametrize("strategy_name", ["greedy", "beam", "diverse", "sample"])
def test_allowed_ids_restrict_every_strategy(strategy_name):
    from seesay.decoding import Beam, Constraints, DiverseBeam, Greedy, Sample, decode

    dec = make("soft_attention")
    strategy = {"greedy": Greedy(), "beam": Beam(3), "diverse": DiverseBeam(4, 2, 1.0),
                "sample": Sample(temperature=1.5, seed=0)}[strategy_name]
    free = decode(dec, fake_enc(3), strategy, bos=1, eos=2, max_len=8, constraints=Constraints(min_length=3))
    used = {t for r, n in zip(free.tokens.tolist(), free.lengths.tolist()) for t in r[:n]} - {2}
    assert used, "the unconstrained captions should use some tokens (else this test tests nothing)"
    allowed = tuple(t for t in range(3, V) if t not in used)
    res = decode(dec, fake_enc(3), strategy, bos=1, eos=2, max_len=8,
                 constraints=Constraints(min_length=3, allowed_ids=allowed))
    for row, n in zip(res.tokens.tolist(), res.lengths.tolist()):
        assert n >= 3 and set(row[:n]) <= {*allowed, 2}


def test_allowed_ids_keep_the_model_scores_and_end_when_nothing_is_allowed():
    from seesay.decoding import Constraints, Greedy, decode

    dec = make("show_tell")
    enc = fake_enc(2)
    only_eos = decode(dec, enc, Greedy(), bos=1, eos=2, max_len=6, constraints=Constraints(allowed_ids=()))
    assert only_eos.tokens[:, 0].tolist() == [2, 2] and only_eos.lengths.tolist() == [1, 1]
    # min_length bans eos while nothing else is allowed: the row ends rather than pick a forbidden token
    stuck = decode(dec, enc, Greedy(), bos=1, eos=2, max_len=6, constraints=Constraints(min_length=2, allowed_ids=()))
    assert stuck.tokens[:, 0].tolist() == [2, 2]
    res = decode(dec, enc, Greedy(), bos=1, eos=2, max_len=6, constraints=Constraints(allowed_ids=[4, 6]))
    with torch.no_grad():
        logprobs, _, _ = dec.step(torch.ones(2, dtype=torch.long), dec.init_state(enc))
    # the first pick is the model's best among the allowed tokens
    assert res.tokens[:, 0].tolist() == [[2, 4, 6][i] for i in logprobs[:, [2, 4, 6]].argmax(1).tolist()]


def test_allowed_ids_are_validated():
    from seesay.decoding import Constraints, Greedy, decode

    with pytest.raises(ValueError, match="allowed_ids"):
        Constraints(allowed_ids=[-1])
    assert Constraints(allowed_ids=[3, 3, 4]).allowed_ids == (3, 4)
    assert Constraints(allowed_ids=()).active and not Constraints().active
    dec = make("show_tell")
    with pytest.raises(ValueError, match="allowed_ids"):
        decode(dec, fake_enc(1), Greedy(), bos=1, eos=2, max_len=3, constraints=Constraints(allowed_ids=[10_000]))
