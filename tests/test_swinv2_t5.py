"""The `swinv2` encoder and `t5` decoder (Hugging Face parts), at tiny sizes, offline.

Models are built from configs, saved with `save_pretrained` into a temporary directory and
loaded by path through the seesay options, as a user loads a hub name.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from conftest import TINY_DECODERS, TINY_ENCODERS, prepared_shapes, tiny_train_config
from seesay.data.tokenize import SPECIALS, Vocab
from seesay.decoding import Beam, Greedy, Sample, greedy
from seesay.encoders.base import EncoderOutput
from seesay.errors import SeesayError
from seesay.model import build_model
from seesay.registry import build_decoder, build_encoder

torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")  # the hf extra is part of dev installs

V = 24
BOS, EOS = 1, 2
VOCAB = Vocab([*SPECIALS, *[f"w{i}" for i in range(V - len(SPECIALS))]])
T5_CONFIG = TINY_DECODERS["t5"]["config"]
SWIN_CONFIG = dict(TINY_ENCODERS["swinv2"]["config"], image_size=32)
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """(swinv2 dir, t5 dir): tiny models saved with save_pretrained (+ a preprocessor_config.json)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    swin = transformers.Swinv2Model(transformers.Swinv2Config(**SWIN_CONFIG))
    swin.save_pretrained(root / "swin")
    (root / "swin" / "preprocessor_config.json").write_text(json.dumps({"image_mean": MEAN, "image_std": STD}))
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=20, **T5_CONFIG))
    t5.save_pretrained(root / "t5")
    return root / "swin", root / "t5"


def t5_decoder(enc_dim: int = 8, seed: int = 0, **over):
    torch.manual_seed(seed)
    kwargs = {**TINY_DECODERS["t5"], **over}
    return build_decoder("t5", vocab_size=V, enc_dim=enc_dim, **kwargs).eval()


def fake_enc(batch: int, seed: int = 1, prompt: torch.Tensor | None = None) -> EncoderOutput:
    g = torch.Generator().manual_seed(seed)
    return EncoderOutput(torch.randn(batch, 6, 8, generator=g), torch.randn(batch, 8, generator=g), (2, 3), prompt)


TOKENS = torch.tensor([[BOS, 5, 6, 7, 8, 9, EOS], [BOS, 4, EOS, 0, 0, 0, 0], [BOS, 3, 4, 5, EOS, 0, 0]])
LENGTHS = torch.tensor([7, 3, 5])
PROMPTS = torch.tensor([[5, 6, 7], [8, 0, 0], [9, 10, 0]])  # right-padded with pad 0


def spec(encoder: str = "swinv2", **dec) -> dict:
    return {"encoder": {"name": encoder, **TINY_ENCODERS[encoder]},
            "decoder": {"name": "t5", "vocab_size": V, **TINY_DECODERS["t5"], **dec}}


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---- loading by path, as a hub name ---------------------------------------------------------


def test_swinv2_loads_a_saved_model_by_path(hf_dirs):
    swin_dir, _ = hf_dirs
    enc = build_encoder("swinv2", image_model_name=str(swin_dir)).eval()
    saved = transformers.Swinv2Model.from_pretrained(str(swin_dir)).eval()
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(enc.model.state_dict()[k], v, msg=k)
    assert enc.pretrained and not enc.is_trainable  # frozen by default
    assert enc.preprocess.size == 32 and list(enc.preprocess.mean) == MEAN and list(enc.preprocess.std) == STD
    x = enc.preprocess(images(2))
    with torch.no_grad():
        out = enc(x)
        ref = saved(pixel_values=x)
    torch.testing.assert_close(out.grid, ref.last_hidden_state)
    torch.testing.assert_close(out.pooled, ref.pooler_output)
    assert out.grid_hw == (4, 4) and out.grid.shape == (2, 16, enc.out_dim)
    resolved = enc.resolved_options()
    assert resolved["config"]["embed_dim"] == 8 and resolved["image_mean"] == MEAN


def test_swinv2_passes_the_mask_and_checkpoints(hf_dirs):
    enc = build_encoder("swinv2", **TINY_ENCODERS["swinv2"]).eval()
    x = enc.preprocess(images(2))
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :20] = True
    with torch.no_grad():
        plain, masked = enc(x), enc(x, bool_masked_pos=mask)
    assert not torch.allclose(plain.grid, masked.grid)
    ck = build_encoder("swinv2", **TINY_ENCODERS["swinv2"], gradient_checkpointing=True, fine_tune=True)
    ck.load_state_dict(enc.state_dict())
    ck.train()
    out = ck(x)
    out.grid.square().mean().backward()
    missing = [n for n, p in ck.named_parameters() if p.grad is None and "mask_token" not in n]
    assert not missing  # gradients reach every layer through the checkpointed blocks
    with torch.no_grad():
        torch.testing.assert_close(ck.eval()(x).grid, plain.grid)


def test_frozen_swinv2_is_deterministic_in_train_mode():
    enc = build_encoder("swinv2", **{**TINY_ENCODERS["swinv2"], "config": {**SWIN_CONFIG, "drop_path_rate": 0.5}})
    x = enc.preprocess(images(2))
    enc.train()  # frozen inside a model that trains: no drop path, features fit for the cache
    with torch.no_grad():
        torch.testing.assert_close(enc(x).grid, enc(x).grid)
    enc.set_fine_tune(True)
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(enc(x).grid, enc(x).grid)  # trained: drop path is on


def test_t5_loads_a_saved_model_by_path_and_resizes_the_vocabulary(hf_dirs, caplog):
    _, t5_dir = hf_dirs
    saved = transformers.T5ForConditionalGeneration.from_pretrained(str(t5_dir))
    with caplog.at_level("INFO", logger="seesay.decoders.t5"):
        dec = build_decoder("t5", vocab_size=V, enc_dim=8, language_model_name=str(t5_dir))
    assert "resizing" in caplog.text and "20" in caplog.text
    assert dec.vocab_size == V and dec.t5.lm_head.out_features == V and dec.t5.shared.num_embeddings == V
    torch.testing.assert_close(dec.t5.shared.weight[:20], saved.shared.weight)
    torch.testing.assert_close(dec.t5.encoder.block[0].layer[0].SelfAttention.q.weight,
                               saved.encoder.block[0].layer[0].SelfAttention.q.weight)
    assert dec.resolved_options()["config"]["vocab_size"] == V
    # not pretrained: the directory's architecture, fresh weights
    fresh = build_decoder("t5", vocab_size=V, enc_dim=8, language_model_name=str(t5_dir), pretrained=False)
    assert not torch.allclose(fresh.t5.shared.weight[:20], saved.shared.weight)


def test_spec_carries_the_config_so_checkpoints_rebuild_offline(hf_dirs, tmp_path):
    from seesay.checkpoint import load_checkpoint, save_checkpoint

    swin_dir, t5_dir = hf_dirs
    swin_copy, t5_copy = tmp_path / "swin", tmp_path / "t5"
    shutil.copytree(swin_dir, swin_copy)
    shutil.copytree(t5_dir, t5_copy)
    s = {"encoder": {"name": "swinv2", "image_model_name": str(swin_copy)},
         "decoder": {"name": "t5", "vocab_size": V, "language_model_name": str(t5_copy)}}
    torch.manual_seed(0)
    model = build_model(s, tokenizer=VOCAB, image_size=32).eval()
    assert model.spec()["decoder"]["config"]["d_model"] == 16 and model.spec()["encoder"]["image_std"] == STD
    imgs = images(3)
    want = model.generate(imgs, Beam(2), prompt="w3 w4", max_len=6)
    save_checkpoint(tmp_path / "ck", model=model)
    shutil.rmtree(swin_copy)  # the checkpoint alone must rebuild the model: no directory, no hub
    shutil.rmtree(t5_copy)
    ck = load_checkpoint(tmp_path / "ck")
    got = ck.model.generate(imgs, Beam(2), prompt="w3 w4", max_len=6)
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.scores, want.scores)
    assert ck.model.encoder.preprocess == model.encoder.preprocess


def test_bad_sources_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(SeesayError, match="no such directory, and not a Hugging Face hub name"):
        build_decoder("t5", vocab_size=V, enc_dim=8, language_model_name=str(tmp_path / "missing"))
    with pytest.raises(SeesayError, match="not a Hugging Face hub name"):
        build_encoder("swinv2", image_model_name="bad name!")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(SeesayError, match="a file, not a model directory"):
        build_encoder("swinv2", image_model_name=str(tmp_path / "file.bin"))

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.T5Config, "from_pretrained", offline)
    with pytest.raises(SeesayError) as e:
        build_decoder("t5", vocab_size=V, enc_dim=8, language_model_name="google/t5-v1_1-small")
    msg = str(e.value)
    assert "could not fetch it from the Hugging Face hub" in msg and "local directory" in msg and "\n" not in msg


def test_missing_transformers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    for build in (lambda: build_decoder("t5", vocab_size=V, enc_dim=8, **TINY_DECODERS["t5"]),
                  lambda: build_encoder("swinv2", **TINY_ENCODERS["swinv2"])):
        with pytest.raises(SeesayError, match=r"transformers is not installed; install it with: pip install 'seesay\[hf\]'"):
            build()


# ---- the decoder: cache, prompts ------------------------------------------------------------


def test_step_by_step_equals_teacher_forcing_with_prompts_and_beams():
    dec = t5_decoder()
    enc = fake_enc(3, prompt=PROMPTS)
    out = dec(enc, TOKENS, LENGTHS)
    assert out.logits.shape == (3, 6, V)
    state = dec.init_state(enc)
    # two rows per image (beams) through the cache: the memory stays one row per image
    rows = torch.arange(3).repeat_interleave(2)
    state = dec.reorder_state(state, rows)
    assert state["mem_hidden"].shape[0] == 3
    tokens = TOKENS[rows]
    for t in range(6):
        logprobs, state, att = dec.step(tokens[:, t], state)
        assert att is None
        real = (LENGTHS[rows] - 1) > t
        ref = torch.log_softmax(out.logits[rows, t], dim=-1)
        torch.testing.assert_close(logprobs[real], ref[real], atol=1e-5, rtol=0)
        if t == 2:  # swap the beams of image 1: the cache follows its rows
            state = dec.reorder_state(state, torch.tensor([0, 1, 3, 2, 4, 5]))
            tokens = tokens[torch.tensor([0, 1, 3, 2, 4, 5])]


def test_step_runs_one_position_through_the_decoder():
    """A cached step feeds one position per row through T5's decoder layers and never recomputes the
    cross-attention keys/values: its cost does not grow with t the way a re-run of the prefix would."""
    dec = t5_decoder()
    seen: list[int] = []
    block = dec.t5.decoder.block[1]
    block.layer[-1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    cross_k: list[int] = []
    block.layer[1].EncDecAttention.k.register_forward_hook(lambda m, i, o: cross_k.append(1))
    enc = fake_enc(2)
    state = dec.init_state(enc)
    cross_k.clear()  # init_state computed them once
    prev = torch.full((2,), BOS)
    for _ in range(8):
        logprobs, state, _ = dec.step(prev, state)
        prev = logprobs.argmax(-1)
    assert seen == [1] * 8 and not cross_k
    assert state["k1"].shape[2] == 8  # the cache grew by one position per step


def test_the_prompt_changes_the_output_and_its_padding_does_not():
    dec = t5_decoder()
    a = dec(fake_enc(3, prompt=PROMPTS), TOKENS, LENGTHS).logits
    b = dec(fake_enc(3, prompt=PROMPTS.flip(1)), TOKENS, LENGTHS).logits
    none = dec(fake_enc(3), TOKENS, LENGTHS).logits
    assert not torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, none, atol=1e-4)
    padded = torch.cat([PROMPTS, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    padded[1, 1:] = 0
    torch.testing.assert_close(dec(fake_enc(3, prompt=padded), TOKENS, LENGTHS).logits, a, atol=1e-5, rtol=0)
    enc = fake_enc(3)
    single = EncoderOutput(enc.grid[1:2], enc.pooled[1:2], enc.grid_hw, PROMPTS[1:2, :1])  # no padding at all
    one = dec(single, TOKENS[1:2, :3], LENGTHS[1:2])
    torch.testing.assert_close(one.logits[0, :2], a[1, :2], atol=1e-5, rtol=0)


def test_decoder_options():
    dec = t5_decoder(ffn=True, max_source_length=2)
    assert dec.ffn is not None
    long = dec(fake_enc(3, prompt=PROMPTS), TOKENS, LENGTHS).logits
    cut = dec(fake_enc(3, prompt=PROMPTS[:, :2]), TOKENS, LENGTHS).logits
    torch.testing.assert_close(long, cut)  # max_source_length caps the prompt
    for bad in (0, -3):
        with pytest.raises(SeesayError, match="max_target_length"):
            t5_decoder(max_target_length=bad)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    plain = t5_decoder().train()
    ck = t5_decoder(gradient_checkpointing=True).train()
    ck.load_state_dict(plain.state_dict())
    enc = fake_enc(3, prompt=PROMPTS)
    grads = []
    for dec in (plain, ck):
        out = dec(enc, TOKENS, LENGTHS)
        out.logits.logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in dec.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)


def test_runs_under_autocast():
    dec = t5_decoder()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(fake_enc(3, prompt=PROMPTS), TOKENS, LENGTHS)
        res = greedy(dec, fake_enc(3, prompt=PROMPTS), bos=BOS, eos=EOS, max_len=4)
    assert out.logits.dtype == torch.bfloat16  # nothing forces float32 where autocast applies
    assert res.tokens.shape[0] == 3


# ---- the captioner: generate with prompts, other encoders ------------------------------------


@pytest.mark.parametrize("encoder", ["swinv2", "resnet18", "vit"])
def test_generate_reads_the_prompt_as_input(encoder):
    torch.manual_seed(0)
    model = build_model(spec(encoder), tokenizer=VOCAB, image_size=32).eval()
    imgs = images(3)
    feats = model.encode(imgs)
    g = model.generate(feats, Greedy(), prompt="w1 w2", max_len=6)
    assert torch.equal(g.tokens, model.generate(feats, Greedy(), prompt=[VOCAB.stoi["w1"], VOCAB.stoi["w2"]],
                                                max_len=6).tokens)
    other = model.generate(feats, Greedy(), prompt="w9 w10 w11", max_len=6)
    beams = model.generate(feats, Beam(3), prompt="w1 w2", max_len=6, num_captions=2)
    assert beams.tokens.shape[0] == 6
    assert torch.equal(model.generate(feats, Beam(1), prompt="w1 w2", max_len=6).tokens, g.tokens)
    s1 = model.generate(feats, Sample(0.8, seed=3), prompt="w1 w2", max_len=6)
    s2 = model.generate(feats, Sample(0.8, seed=3), prompt="w1 w2", max_len=6)
    assert torch.equal(s1.tokens, s2.tokens)
    # the prompt is input, not the caption's start: the first token is generated
    state = model.decoder.init_state(feats._replace(prompt=torch.tensor([[VOCAB.stoi["w1"], VOCAB.stoi["w2"]]] * 3)))
    first = model.decoder.step(torch.full((3,), BOS), state)[0].argmax(-1)
    assert g.tokens[:, 0].tolist() == first.tolist()
    # one prompt per image
    per = model.generate(feats, Greedy(), prompt=["w1 w2", "w9 w10 w11", "w1 w2"], max_len=6)
    assert per.tokens[0].tolist() == g.tokens[0].tolist() and per.tokens[1].tolist() == other.tokens[1].tolist()
    with pytest.raises(SeesayError, match="2 prompts for 3 images"):
        model.generate(feats, Greedy(), prompt=["w1", "w2"], max_len=6)
    # teacher forcing with a per-row prompt through the model
    rows = torch.tensor([0, 0, 1])
    out = model(imgs, TOKENS, LENGTHS, image_rows=rows, prompt=PROMPTS)
    ref = model.decoder(feats.index_select(rows)._replace(prompt=PROMPTS), TOKENS, LENGTHS)
    torch.testing.assert_close(out.logits, ref.logits)


def test_max_target_length_caps_generation():
    torch.manual_seed(0)
    model = build_model(spec("swinv2", max_target_length=3), tokenizer=VOCAB).eval()
    res = model.generate(images(2), Greedy(), max_len=10)
    assert res.tokens.shape[1] <= 3


def test_caption_images_and_the_caption_command_take_a_prompt(tmp_path, capsys):
    from PIL import Image

    from seesay.captioner import caption_images
    from seesay.checkpoint import save_checkpoint
    from seesay.cli import main

    torch.manual_seed(0)
    model = build_model(spec(), tokenizer=VOCAB, image_size=32).eval()
    imgs = images(2)
    caps = caption_images(model, list(imgs), Greedy(), prompt="w1 w2", max_len=5)
    ref = model.generate(imgs, Greedy(), prompt="w1 w2", max_len=5)
    assert [c.tokens for c in caps] == [r[: int(n)] for r, n in zip(ref.tokens.tolist(), ref.lengths.tolist())]
    save_checkpoint(tmp_path / "ck", model=model)
    path = tmp_path / "a.png"
    Image.fromarray(imgs[0].permute(1, 2, 0).numpy()).save(path)
    assert main(["caption", str(path), "--checkpoint", str(tmp_path / "ck"), "--prompt", "w1 w2",
                 "--max-len", "5", "--device", "cpu"]) == 0
    assert caps[0].caption in capsys.readouterr().out


# ---- learning --------------------------------------------------------------------------------


def test_tiny_swinv2_t5_overfits_four_captions():
    torch.manual_seed(0)
    model = build_model(spec(), tokenizer=VOCAB, image_size=32)
    model.set_fine_tune(True)
    model.train()
    imgs = images(4, seed=1)
    tokens = torch.tensor([[BOS, 5, 6, 7, EOS, 0], [BOS, 8, 9, EOS, 0, 0], [BOS, 10, 11, 12, 13, EOS],
                           [BOS, 14, 15, EOS, 0, 0]])
    lengths = torch.tensor([5, 4, 6, 4])
    prompt = torch.tensor([[20, 21]] * 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        out = model(imgs, tokens, lengths, prompt=prompt)
        mask = torch.arange(5)[None, :] < (lengths - 1)[:, None]
        loss = torch.nn.functional.cross_entropy(out.logits[mask], tokens[:, 1:][mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    model.eval()
    res = model.generate(imgs, Greedy(), prompt=[20, 21], max_len=8)
    recited = [res.tokens[i, : int(lengths[i]) - 1].tolist() == tokens[i, 1: int(lengths[i])].tolist()
               for i in range(4)]
    assert sum(recited) >= 3, res.tokens


def test_train_with_a_frozen_swinv2_caches_features(tmp_path):
    """`seesay train` with swinv2 (frozen) + t5: features computed once into the cache; the
    checkpoint captions with a prompt."""
    from seesay.captioner import caption_images
    from seesay.checkpoint import load_checkpoint
    from seesay.train.caption_task import train_captioner

    data = prepared_shapes(tmp_path / "shapes", num_images=12, val_fraction=0.25)
    cfg = tiny_train_config(data, tmp_path / "run", epochs=1, max_steps_per_epoch=2, val_max_len=6)
    cfg.encoder.name, cfg.encoder.options = "swinv2", dict(TINY_ENCODERS["swinv2"])
    cfg.decoder.name, cfg.decoder.options = "t5", dict(TINY_DECODERS["t5"])
    state = train_captioner(cfg)
    assert state.step == 2
    assert (tmp_path / "run" / "features").is_dir() and any((tmp_path / "run" / "features").iterdir())
    ck = load_checkpoint(tmp_path / "run" / "last")
    assert ck.model.decoder.reads_prompt and ck.model.spec()["encoder"]["name"] == "swinv2"
    caps = caption_images(ck.model, list(images(2)), Beam(2), prompt="a", max_len=4)
    assert len(caps) == 2
