"""Captions users can control: n-gram blocking, bad endings and a minimum length for every strategy,
several captions per image, diverse beam search, over every registered decoder (tiny, untrained, CPU),
and the `seesay caption` / `seesay evaluate` flags end to end."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import prepared_shapes, tiny_decoder
from seesay import cli
from seesay.decoding import (
    Beam,
    Constraints,
    DiverseBeam,
    Greedy,
    Sample,
    beam_search,
    decode,
    grouped,
    strategy_from_options,
)
from seesay.encoders.base import EncoderOutput
from seesay.registry import list_decoders

torch.set_num_threads(1)

V, N, D = 11, 5, 8
BOS, EOS = 1, 2
WORD = 5  # the token the biased models love
DECODERS = list_decoders()
STRATEGIES = {"greedy": Greedy(), "beam": Beam(3), "diverse": DiverseBeam(4, 2, 1.0), "sample": Sample(seed=0)}


def make(name: str, boost: dict[int, float]):
    """A tiny decoder whose vocabulary projection adds `boost` to some logits (through a hook:
    titans_mac's projection has no bias to raise)."""
    dec = tiny_decoder(name, V, D, seed=0).eval()
    (proj,) = [m for m in dec.modules() if isinstance(m, torch.nn.Linear) and m.out_features == V]
    extra = torch.zeros(V)
    for tok, value in boost.items():
        extra[tok] = value
    proj.register_forward_hook(lambda module, inputs, out: out + extra)
    return dec


def fake_enc(batch: int, seed: int = 1) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    return EncoderOutput(torch.randn(batch, N, D, generator=g) * 2, torch.randn(batch, D, generator=g), (1, 5))


def run(dec, strategy, batch=6, **kw):
    kw.setdefault("max_len", 10)
    return decode(dec, fake_enc(batch), strategy, bos=BOS, eos=EOS, **kw)


def captions(res):
    return [row[:n] for row, n in zip(res.tokens.tolist(), res.lengths.tolist())]


def repeated_ngram(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def bad_ending(tokens: list[int], bad: set[int]) -> bool:
    return len(tokens) >= 2 and tokens[-1] == EOS and tokens[-2] in bad


# ---- constraints, for every decoder and strategy ------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("name", DECODERS)
def test_no_repeat_ngram_is_never_violated(name, strategy):
    dec = make(name, {WORD: 6.0, EOS: -6.0})  # unconstrained: the same word over and over
    plain = captions(run(dec, strategy))
    assert any(repeated_ngram(c, 2) for c in plain)
    for n in (1, 2, 3):
        res = run(dec, strategy, constraints=Constraints(no_repeat_ngram_size=n))
        for c in captions(res):
            assert not repeated_ngram([t for t in c if t != EOS], n), (n, c)


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("name", DECODERS)
def test_no_repeat_ngram_counts_the_prompt(name, strategy):
    dec = make(name, {WORD: 6.0, EOS: -6.0})
    res = run(dec, strategy, prefix=torch.tensor([WORD, 7]), constraints=Constraints(no_repeat_ngram_size=1))
    for c in captions(res):
        assert c[:2] == [WORD, 7] and WORD not in c[2:] and 7 not in c[2:]


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("name", DECODERS)
def test_bad_endings_are_never_violated(name, strategy):
    dec = make(name, {EOS: 5.0})  # captions end after one word, whichever came first
    plain = captions(run(dec, strategy, batch=8, constraints=Constraints(min_length=1)))
    bad = {c[-2] for c in plain if len(c) >= 2 and c[-1] == EOS}  # the words they end on: now forbidden
    assert bad and all(bad_ending(c, bad) for c in plain if c[-1] == EOS)
    res = run(dec, strategy, batch=8, constraints=Constraints(min_length=1, bad_ending_ids=tuple(bad)))
    for c in captions(res):
        assert not bad_ending(c, bad), c


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("name", DECODERS)
def test_min_length_is_respected(name, strategy):
    dec = make(name, {EOS: 8.0})  # unconstrained: <end> at once
    assert all(len(c) < 4 for c in captions(run(dec, strategy)))
    res = run(dec, strategy, constraints=Constraints(min_length=4), prefix=torch.tensor([7]))
    for c in captions(res):
        assert c[0] == 7 and len(c) >= 1 + 4 + 1  # the prompt, at least 4 words, then <end>
        assert c[-1] == EOS or len(c) == 1 + 10


def test_everything_ruled_out_ends_the_caption():
    """min_length and 1-gram blocking together over a vocabulary too small: the caption ends."""
    dec = make("soft_attention", {})
    res = run(dec, Greedy(), max_len=20, constraints=Constraints(no_repeat_ngram_size=1, min_length=15))
    for c in captions(res):
        words = [t for t in c if t != EOS]
        assert len(set(words)) == len(words) and c[-1] == EOS


def test_constraints_off_change_nothing():
    dec = make("transformer", {EOS: 1.0})
    for strategy in STRATEGIES.values():
        a = run(dec, strategy)
        b = run(dec, strategy, constraints=Constraints())
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.scores, b.scores)


# ---- several captions per image ----------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [3, 4])
def test_a_beam_never_continues_past_its_end_with_a_tiny_vocabulary(vocab):
    """With a vocabulary barely larger than the beam, the 2K candidates of the first step include
    impossible ones (-inf, from the beams not yet started) and the <end> extension: the live
    beams must be chosen among the others, so that no caption is returned twice (once finished,
    once continued past its <end>)."""
    from seesay.decoding import beam_search

    dec = tiny_decoder("soft_attention", vocab, 8, dropout=0.0, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    enc = EncoderOutput(torch.randn(8, 6, 8, generator=g), torch.randn(8, 8, generator=g), (2, 3))
    for n in (2, 4):
        res = beam_search(dec, enc, bos=1, eos=2, beam_size=4, max_len=5, num_captions=n)
        for i in range(8):
            mine = [tuple(res.tokens[r, : res.lengths[r]].tolist()) for r in range(i * n, i * n + n)]
            assert len(set(mine)) == n, mine
            assert all(2 not in c[:-1] for c in mine), mine  # <end> only ever last


@pytest.mark.parametrize("name", DECODERS)
def test_num_captions_beam_gives_distinct_captions_best_first(name):
    dec = make(name, {EOS: 1.5})
    one = run(dec, Beam(4))
    res = run(dec, Beam(4), num_captions=3)
    assert res.tokens.shape[0] == 6 * 3
    g = grouped(res, 3)
    assert torch.all(g.scores[:, :-1] >= g.scores[:, 1:])
    caps = captions(res)
    for i in range(6):
        mine = [tuple(c) for c in caps[3 * i: 3 * i + 3]]
        assert len(set(mine)) == 3
    # the first of each image is today's single caption
    L = one.tokens.shape[1]
    assert torch.equal(g.tokens[:, 0, :L], one.tokens) and torch.equal(g.lengths[:, 0], one.lengths)
    torch.testing.assert_close(g.scores[:, 0], one.scores, atol=0, rtol=0)
    assert torch.equal(run(dec, Beam(4), num_captions=1).tokens, one.tokens)
    # the score of every caption is its log-probability under the decoder
    total = torch.zeros(res.tokens.shape[0])
    state = dec.init_state(fake_enc(6).index_select(torch.arange(6).repeat_interleave(3)))
    prev = torch.full((18,), BOS)
    for t in range(res.tokens.shape[1]):
        logprobs, state, _ = dec.step(prev, state)
        total += torch.where(t < res.lengths, logprobs.gather(1, res.tokens[:, t: t + 1]).squeeze(1), 0.0)
        prev = res.tokens[:, t]
    torch.testing.assert_close(total, res.scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_num_captions_sampling(name):
    dec = make(name, {EOS: 1.5})
    one = run(dec, Sample(seed=4))
    assert torch.equal(run(dec, Sample(seed=4), num_captions=1).tokens, one.tokens)
    res = run(dec, Sample(seed=4), num_captions=4)
    again = run(dec, Sample(seed=4), num_captions=4)
    assert torch.equal(res.tokens, again.tokens)  # seeded
    g = grouped(res, 4)
    assert g.tokens.shape[:2] == (6, 4)
    assert torch.all(g.scores[:, :-1] >= g.scores[:, 1:])
    assert len({tuple(c) for c in captions(res)}) > 6  # independent draws, not copies of one


@pytest.mark.parametrize("name", DECODERS)
def test_num_captions_with_constraints_and_prompt(name):
    dec = make(name, {WORD: 6.0, EOS: -6.0})
    for strategy in (Beam(3), DiverseBeam(4, 2, 0.5), Sample(seed=1)):
        res = run(dec, strategy, num_captions=3, prefix=torch.tensor([7]),
                  constraints=Constraints(no_repeat_ngram_size=2))
        assert res.tokens.shape[0] == 18
        for c in captions(res):
            assert c[0] == 7 and not repeated_ngram([t for t in c if t != EOS], 2)


# ---- diverse beam search -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("penalty", [0.0, 0.7])
def test_diverse_beam_with_one_group_is_beam(name, penalty):
    dec = make(name, {EOS: 1.5})
    for n in (1, 4):
        a = run(dec, DiverseBeam(4, 1, diversity_penalty=2.0, length_penalty=penalty), num_captions=n)
        b = run(dec, Beam(4, penalty), num_captions=n)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths)
        assert torch.equal(a.scores, b.scores)
        if a.attention is not None:
            assert torch.equal(a.attention, b.attention)


@pytest.mark.parametrize("name", DECODERS)
def test_diverse_groups_avoid_each_others_words(name):
    """One beam per group, a huge penalty, <end> unreachable: at every step the three live beams
    (the three results) hold three different words, where plain beam search shares its first."""
    dec = make(name, {})
    kw = dict(eos=V + 5, max_len=4, num_captions=3)
    enc = fake_enc(5)
    res = decode(dec, enc, DiverseBeam(3, 3, 1e3), bos=BOS, **kw)
    g = grouped(res, 3).tokens
    for t in range(4):
        assert all(len(set(row)) == 3 for row in g[:, :, t].tolist())
    plain = grouped(decode(dec, enc, Beam(3), bos=BOS, **kw), 3).tokens
    assert any(len(set(row)) < 3 for row in plain[:, :, 0].tolist())


@pytest.mark.parametrize("name", DECODERS)
def test_diverse_batched_equals_per_image(name):
    dec = make(name, {EOS: 1.5})
    enc = fake_enc(5)
    kw = dict(bos=BOS, eos=EOS, beam_size=4, groups=2, diversity_penalty=0.8, max_len=12, length_penalty=0.5,
              num_captions=2, constraints=Constraints(no_repeat_ngram_size=2, bad_ending_ids=(3, 4)))
    batched = beam_search(dec, enc, **kw)
    for i in range(5):
        one = beam_search(dec, enc.index_select(torch.tensor([i])), **kw)
        for j in range(2):
            L = int(one.lengths[j])
            assert int(batched.lengths[2 * i + j]) == L
            assert batched.tokens[2 * i + j, :L].tolist() == one.tokens[j, :L].tolist()
            torch.testing.assert_close(batched.scores[2 * i + j], one.scores[j], atol=1e-5, rtol=0)


# ---- bad values --------------------------------------------------------------------------------------


def test_bad_values_are_refused():
    dec = make("show_tell", {})
    with pytest.raises(ValueError, match="beam size 3"):
        run(dec, Beam(3), num_captions=4)
    with pytest.raises(ValueError, match="greedy"):
        run(dec, Greedy(), num_captions=2)
    with pytest.raises(ValueError, match="greedy"):
        run(dec, Sample(temperature=0), num_captions=2)
    with pytest.raises(ValueError, match="num_captions"):
        run(dec, Beam(3), num_captions=0)
    with pytest.raises(ValueError, match="not divisible"):
        DiverseBeam(5, 2)
    with pytest.raises(ValueError, match="diversity_penalty"):
        DiverseBeam(4, 2, -1.0)
    for bad in (dict(no_repeat_ngram_size=-1), dict(min_length=-2), dict(min_length=1.5), dict(bad_ending_ids=(-1,))):
        with pytest.raises(ValueError):
            Constraints(**bad)
    with pytest.raises(ValueError, match="words"):
        run(dec, Greedy(), constraints=Constraints(bad_endings=("a",)))
    with pytest.raises(ValueError, match="min_length"):
        run(dec, Greedy(), max_len=5, constraints=Constraints(min_length=6))
    assert strategy_from_options(beam_size=4, diverse_groups=2, diversity_penalty=0.3) == DiverseBeam(4, 2, 0.3)
    assert Constraints(bad_endings="a, the,a").bad_endings == ("a", "the")


# ---- the library and the command line on a tiny checkpoint -------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from seesay.checkpoint import save_checkpoint
    from seesay.data.store import PreparedData
    from seesay.model import build_model

    root = tmp_path_factory.mktemp("controls")
    data = prepared_shapes(root, num_images=16, seed=2, val_fraction=0.25, test_fraction=0.25)
    vocab = PreparedData(data).vocab
    spec = {"encoder": {"name": "small_cnn", "width": 8, "encoded_size": 4, "image_size": 32},
            "decoder": {"name": "soft_attention", "vocab_size": len(vocab), "embed_dim": 16, "attention_dim": 16,
                        "decoder_dim": 16, "dropout": 0.0}}
    torch.manual_seed(0)
    model = build_model(spec, tokenizer=vocab, image_size=32).eval()
    with torch.no_grad():  # "a" over and over, ending on it: what the controls are for
        bias = model.decoder.fc.bias
        bias.zero_()
        bias[vocab.stoi["a"]] = 4.0
        bias[vocab.end_id] = 3.5
        bias[[vocab.pad_id, vocab.bos_id, vocab.unk_id]] = -30.0  # no hidden tokens: the text shows every one
    ck = save_checkpoint(root / "run" / "best", model=model, config={})
    images = sorted(str(p) for p in (root / "raw" / "images").glob("*.png"))[:3]
    return root, data, ck, images, vocab


def caption_cli(args, capsys):
    code = cli.main(["caption", "--device", "cpu", "--max-length", "8", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_library_controls(setup):
    from seesay.captioner import caption_images
    from seesay.checkpoint import load_checkpoint

    _, _, ck, images, vocab = setup
    model = load_checkpoint(ck).model
    plain = caption_images(model, images, Beam(3), max_len=8)
    assert all(c.caption == "" for c in plain)  # unconstrained, <end> at once
    plain = caption_images(model, images, Beam(3), max_len=8, constraints=Constraints(min_length=1))
    assert all(c.caption == "a" for c in plain)  # one word, and it is "a"
    one = caption_images(model, images, Beam(3), max_len=8, num_captions=1, constraints=Constraints(min_length=1))
    assert [c.caption for c in one] == [c.caption for c in plain]
    ranked = caption_images(model, images, Beam(3), max_len=8, num_captions=3,
                            constraints=Constraints(bad_endings=("a", "nonsenseword"), no_repeat_ngram_size=2,
                                                    min_length=1))
    assert len(ranked) == len(images)
    for caps in ranked:
        assert len(caps) == 3 and len({c.caption for c in caps}) == 3
        assert [c.score for c in caps] == sorted((c.score for c in caps), reverse=True)
        for c in caps:
            words = c.caption.split()
            assert (words[-1:] != ["a"] or c.tokens[-1] != vocab.end_id) and not repeated_ngram(words, 2)


def test_cli_controls(setup, capsys):
    _, _, ck, images, _ = setup
    base = ["--checkpoint", str(ck), *images]
    code, out, _ = caption_cli([*base, "--beam-size", "3", "--min-length", "1"], capsys)
    assert code == 0 and [line.split("\t")[1] for line in out.splitlines()] == ["a"] * 3
    code, out, err = caption_cli([*base, "--beam-size", "3", "--bad-endings", "a,the", "--no-repeat-ngram-size", "2",
                                  "--min-length", "2"], capsys)
    assert code == 0 and err == ""
    for line in out.splitlines():
        words = line.split("\t")[1].split()
        assert len(words) >= 2 and not repeated_ngram(words, 2)
        assert words[-1] != "a" or len(words) == 8  # only a caption cut at --max-length may
    code, out, _ = caption_cli([*base, "--bad-endings", "default", "--beam-size", "2"], capsys)
    assert code == 0 and len(out.splitlines()) == 3
    # several captions: one line per caption with image and rank; JSON: a list with scores
    code, out, _ = caption_cli([*base, "--beam-size", "3", "--num-captions", "3"], capsys)
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(im, rank) for im, rank, _ in lines] == [(im, str(r)) for im in images for r in (1, 2, 3)]
    code, out, _ = caption_cli([*base, "--beam-size", "4", "--num-captions", "2", "--diverse-groups", "2",
                                "--diversity-penalty", "1.0", "--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows] == images
    for r in rows:
        assert len(r["captions"]) == 2 and r["captions"][0] == {"caption": r["caption"], "score": r["score"]}
        assert r["captions"][0]["score"] >= r["captions"][1]["score"]
    code, out, _ = caption_cli([*base, "--temperature", "1.0", "--seed", "0", "--num-captions", "2", "--json"], capsys)
    assert code == 0 and all(len(json.loads(line)["captions"]) == 2 for line in out.splitlines())


@pytest.mark.parametrize("args, expected", [
    (["--beam-size", "2", "--num-captions", "3"], "--num-captions 3 is more than --beam-size 2"),
    (["--beam-size", "1", "--num-captions", "2"], "greedy"),
    (["--num-captions", "0"], "--num-captions must be >= 1"),
    (["--beam-size", "5", "--diverse-groups", "2"], "--beam-size 5 is not divisible by --diverse-groups 2"),
    (["--diverse-groups", "0"], "--diverse-groups must be >= 1"),
    (["--diversity-penalty", "1.0"], "--diversity-penalty needs --diverse-groups"),
    (["--diverse-groups", "2", "--beam-size", "4", "--diversity-penalty", "-1"], "--diversity-penalty must be >= 0"),
    (["--temperature", "1", "--diverse-groups", "2"], "--diverse-groups cannot be combined"),
    (["--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size must be >= 0"),
    (["--min-length", "-3"], "--min-length must be >= 0"),
    (["--min-length", "9"], "--min-length 9 is more than --max-length 8"),
    (["--bad-endings", " , "], "--bad-endings: no words"),
    (["--bad-endings", "zebra,qqq"], "bad endings: none of zebra, qqq"),
])
def test_cli_bad_values_are_one_line(setup, capsys, args, expected):
    _, _, ck, images, _ = setup
    code, out, err = caption_cli(["--checkpoint", str(ck), images[0], *args], capsys)
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err


def test_evaluate_num_captions_writes_ranked_results(setup, capsys):
    root, data, ck, _, _ = setup
    res_one, res_three = root / "one.json", root / "three.json"
    common = ["evaluate", "--checkpoint", str(ck), "--data", str(data), "--split", "test", "--max-length", "8",
              "--device", "cpu", "--no-progress", "--beam-size", "3"]
    assert cli.main([*common, "--results", str(res_one), "--output", str(root / "m1.json")]) == 0
    assert cli.main([*common, "--num-captions", "3", "--results", str(res_three),
                     "--output", str(root / "m3.json")]) == 0
    one, three = json.loads(res_one.read_text()), json.loads(res_three.read_text())
    assert len(one) == len(three) > 0
    for a, b in zip(one, three):
        assert set(a) == {"image_id", "caption"} and a["image_id"] == b["image_id"]
        assert b["caption"] == a["caption"] == b["captions"][0]["caption"]  # the metrics score the best
        assert len(b["captions"]) == 3 and len({c["caption"] for c in b["captions"]}) == 3
        scores = [c["score"] for c in b["captions"]]
        assert scores == sorted(scores, reverse=True)
    assert json.loads((root / "m1.json").read_text()) == json.loads((root / "m3.json").read_text())
    capsys.readouterr()
    code = cli.main([*common, "--num-captions", "4"])
    assert code != 0 and "--num-captions 4 is more than --beam-size 3" in capsys.readouterr().err
