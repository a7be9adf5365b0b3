"""The Titans multimodal extension's API (MultimodalMAC, VisionTransformerEncoder, ImageProcessor):
the documented example runs at tiny sizes and generation really depends on the image. The same
model as a seesay captioner: strategies, checkpoints, teacher forcing vs step decoding."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("titans_pytorch")

from seesay.captioner import caption_images, require_captioner  # noqa: E402
from seesay.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from seesay.decoding import Beam, Greedy, Sample  # noqa: E402
from seesay.encoders.base import EncoderOutput  # noqa: E402
from seesay.errors import SeesayError  # noqa: E402
from seesay.multimodal import ByteTokenizer, ImageProcessor, MultimodalMAC  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

PROMPT = "This is an image of "


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(**kw) -> MultimodalMAC:
    torch.manual_seed(0)
    args = dict(image_size=32, patch_size=8, vision_dim=32, vision_depth=1, vision_heads=2,
                vision_mlp_dim=64, vision_dropout=0.1, num_tokens=256, text_dim=32, depth=2, segment_len=32,
                num_image_tokens=4, heads=2, dim_head=16)
    args.update(kw)
    return MultimodalMAC(**args)


def pil_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    stripes = np.zeros((40, 48, 3), np.uint8)
    stripes[::4] = 255
    return [
        Image.fromarray(np.full((40, 48, 3), (200, 30, 30), np.uint8)),
        Image.fromarray(stripes),
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)),
    ]


def prompt_for(model: MultimodalMAC) -> torch.Tensor:
    return torch.tensor([[ord(c) for c in PROMPT] + [model.image_token_id]])


def test_top_level_names_are_lazy_exports():
    """`from seesay import MultimodalMAC, VisionTransformerEncoder, ImageProcessor` works, and
    neither `import seesay` nor `import seesay.decoders` imports titans_pytorch."""
    import subprocess
    import sys

    code = (
        "import sys, seesay, seesay.decoders\n"
        "assert 'titans_pytorch' not in sys.modules, 'eager titans import'\n"
        "from seesay import MultimodalMAC, VisionTransformerEncoder, ImageProcessor\n"
        "from seesay.multimodal import MultimodalMAC as M, ImageProcessor as P\n"
        "from seesay.encoders.vit import VisionTransformerEncoder as V\n"
        "assert (MultimodalMAC, ImageProcessor, VisionTransformerEncoder) == (M, P, V)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_example_runs():
    from seesay.encoders.vit import VisionTransformerEncoder

    model = tiny_model()
    assert isinstance(model.vision_encoder, VisionTransformerEncoder)
    assert model.image_token_id == 256  # beyond the byte range
    image_tensor = model.image_processor.preprocess(pil_images()[0]).unsqueeze(0)
    assert image_tensor.shape == (1, 3, 32, 32)
    prompt = prompt_for(model)
    out = model.generate(prompt, images=image_tensor.unsqueeze(1),
                         image_positions=torch.tensor([[prompt.shape[1] - 1]]), max_length=30, temperature=0.8)
    assert out.shape == (1, 30 - prompt.shape[1])
    assert out.dtype == torch.long and int(out.max()) < 256
    assert model.training  # generate restores the mode


def test_random_init_logits_and_greedy_outputs_depend_on_the_image():
    model = tiny_model().eval()
    prompt = prompt_for(model)
    pos = torch.tensor([[prompt.shape[1] - 1]])
    outs, logits = [], []
    for im in pil_images():
        x = model.image_processor(im)[None, None]
        logits.append(model(prompt, images=x, image_positions=pos, return_loss=False)[0, -1])
        outs.append(model.generate(prompt, images=x, image_positions=pos, max_length=30, temperature=0))
    assert (logits[0] - logits[1]).abs().max() > 1e-3
    assert (logits[0] - logits[2]).abs().max() > 1e-3
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[0], outs[2])


def test_trained_a_few_steps_it_names_each_image():
    model = tiny_model(vision_dropout=0.0)  # dropout-free for a steady 80-step run
    images = [model.image_processor(im) for im in pil_images()[:2]]
    words = ["cat.", "dog."]
    seqs = torch.tensor([[ord(c) for c in PROMPT] + [model.image_token_id] + [ord(c) for c in w] for w in words])
    batch_images = torch.stack(images)[:, None]  # [2, 1, 3, H, W]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    first = None
    for _ in range(80):
        loss = model(seqs, images=batch_images)  # positions found from image_token_id
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.1 * first
    prompt = prompt_for(model)
    pos = torch.tensor([[prompt.shape[1] - 1]])
    got = []
    for x in images:
        out = model.generate(prompt, images=x[None, None], image_positions=pos,
                             max_length=prompt.shape[1] + 4, temperature=0)
        got.append(bytes(out[0].tolist()).decode("latin-1"))
    assert got[0] != got[1], got
    # the prompt is the same: the first byte after it can only come from the image
    assert got[0][0] == "c" and got[1][0] == "d", got


def test_cached_generation_equals_recompute_across_windows():
    model = tiny_model(segment_len=8, num_longterm_mem_tokens=2, num_persist_mem_tokens=2).eval()
    prompt = prompt_for(model)
    x = model.image_processor(pil_images()[2])[None, None]
    pos = torch.tensor([[prompt.shape[1] - 1]])
    a = model.generate(prompt, images=x, image_positions=pos, max_length=40, temperature=0)
    b = model.generate(prompt, images=x, image_positions=pos, max_length=40, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_several_images_per_sample_and_positions():
    model = tiny_model().eval()
    ims = [model.image_processor(im) for im in pil_images()]
    img = model.image_token_id
    toks = torch.tensor([[img, 97, 98, img, 99, 100], [104, img, 105, 106, img, 107]])
    images = torch.stack([torch.stack([ims[0], ims[1]]), torch.stack([ims[1], ims[2]])])  # [2, 2, 3, H, W]
    by_marker = model(toks, images=images, return_loss=False)
    by_pos = model(toks, images=images, image_positions=torch.tensor([[0, 3], [1, 4]]), return_loss=False)
    assert by_marker.shape == (2, 6, 256)
    assert torch.allclose(by_marker, by_pos, atol=1e-6)
    # positions listed out of order pair images with positions, not with list order
    swapped = model(toks, images=images[:, [1, 0]], image_positions=torch.tensor([[3, 0], [4, 1]]), return_loss=False)
    assert torch.allclose(by_marker, swapped, atol=1e-6)
    # swapping which image goes where changes the text logits after the second image
    other = model(toks, images=images[:, [1, 0]], return_loss=False)
    assert (other[:, 4:] - by_marker[:, 4:]).abs().max() > 1e-4
    # a sample with one image fewer (-1 = no image there) still works
    toks2 = toks.clone()
    toks2[1, 4] = 120
    loss = model(toks2, images=images, image_positions=torch.tensor([[0, 3], [1, -1]]))
    assert torch.isfinite(loss)
    out = model.generate(toks2, images=images, image_positions=torch.tensor([[0, 3], [1, -1]]),
                         max_length=10, temperature=0)
    assert out.shape == (2, 4)


def test_loss_is_on_text_only_and_backward_works():
    model = tiny_model()
    img = model.image_token_id
    toks = torch.tensor([[104, 105, img, 97, 98, 99]])
    x = model.image_processor(pil_images()[0])[None, None]
    loss = model(toks, images=x)
    loss.backward()
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    # padding after `lengths` is not a target
    full = model.eval()(toks, images=x, lengths=torch.tensor([5]))
    changed = toks.clone()
    changed[0, 5] = 7
    assert torch.allclose(full, model(changed, images=x, lengths=torch.tensor([5])), atol=1e-6)


def test_eos_stops_generation():
    model = tiny_model().eval()
    prompt = prompt_for(model)
    x = model.image_processor(pil_images()[0])[None, None]
    pos = torch.tensor([[prompt.shape[1] - 1]])
    free = model.generate(prompt, images=x, image_positions=pos, max_length=40, temperature=0)
    eos = int(free[0, 2])
    stopped = model.generate(prompt, images=x, image_positions=pos, max_length=40, temperature=0, eos_token_id=eos)
    first = int((free[0] == eos).nonzero()[0])
    assert stopped.shape[1] == first + 1 and torch.equal(stopped[0], free[0, : first + 1])


class MeanColourEncoder(torch.nn.Module):
    """A custom encoder: 2x2 cells of mean colour, projected to 16 channels."""

    out_dim = 16

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 16)

    def forward(self, images):
        cells = torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(2).transpose(1, 2)
        return EncoderOutput(self.proj(cells), self.proj(cells).mean(1), (2, 2))


def test_custom_encoder_module_in_place_of_the_vit():
    model = tiny_model(vision_encoder=MeanColourEncoder(), compressor="resampler").eval()
    assert isinstance(model.image_processor, ImageProcessor)
    prompt = prompt_for(model)
    pos = torch.tensor([[prompt.shape[1] - 1]])
    logits = [model(prompt, images=model.image_processor(im)[None, None], image_positions=pos,
                    return_loss=False)[0, -1] for im in pil_images()[:2]]
    assert (logits[0] - logits[1]).abs().max() > 1e-4
    out = model.generate(prompt, images=model.image_processor(pil_images()[0])[None, None],
                         image_positions=pos, max_length=25, temperature=0)
    assert out.shape == (1, 25 - prompt.shape[1])


def test_image_processor_modes_and_normalisation():
    proc = ImageProcessor(image_size=16)
    white = Image.fromarray(np.full((20, 30), 255, np.uint8))  # mode L
    x = proc.preprocess(white)
    assert x.shape == (3, 16, 16)
    expected = (1.0 - torch.tensor(proc.mean)) / torch.tensor(proc.std)
    assert torch.allclose(x[:, 0, 0], expected, atol=1e-5)
    rgba = Image.fromarray(np.zeros((10, 10, 4), np.uint8), mode="RGBA")
    assert proc(rgba).shape == (3, 16, 16)
    arr = np.zeros((16, 16, 3), np.uint8)
    assert torch.allclose(proc(arr), proc(torch.zeros(3, 16, 16, dtype=torch.uint8)), atol=1e-6)
    assert proc.preprocess_batch([white, rgba]).shape == (2, 3, 16, 16)


# ---- the captioner contract ----------------------------------------------------------------------


def uint8_batch(n: int = 2) -> torch.Tensor:
    """Images as a prepared split stores them: uint8 [n, 3, 40, 48]."""
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in pil_images()[:n]])


def test_multimodal_mac_is_a_captioner(tmp_path):
    from seesay.registry import list_captioners
    from seesay.tokenizers import check_tokenizer

    model = tiny_model()
    require_captioner(model)
    check_tokenizer(model.tokenizer)
    assert "multimodal_mac" in list_captioners()
    tok = model.tokenizer
    assert (len(tok), tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (256, 0, 2, 3, 26)
    spec = model.spec()
    assert spec["captioner"] == "multimodal_mac" and spec["num_tokens"] == 256 and spec["eos_token_id"] == 3
    # preprocess reads paths, bytes, PIL images and arrays alike -> normalised [3, S, S]
    path = tmp_path / "red.png"
    pil_images()[0].save(path)
    x = model.preprocess(path)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert torch.allclose(model.preprocess(path.read_bytes()), x) and torch.allclose(model.preprocess(pil_images()[0]), x)
    with pytest.raises(SeesayError, match="missing.png: file not found"):
        model.preprocess(tmp_path / "missing.png")
    assert model.preprocess_config()["image_processor"]["image_size"] == 32
    # what `seesay caption` and the server call: images of any kind in, text out
    caps = caption_images(model.eval(), [path, pil_images()[1]], Greedy(), max_len=6)
    assert len(caps) == 2 and all(isinstance(c.caption, str) and len(c.tokens) <= 6 for c in caps)
    # uint8 images (a prepared split) are normalised by the image processor; float ones are taken as normalised
    u8 = uint8_batch()
    assert torch.allclose(model.eval().encode(u8).grid, model.encode(model.image_processor.normalize(u8)).grid)
    # training capabilities: the vision encoder is the "encoder" group and can be frozen
    groups = model.param_groups()
    assert {id(p) for p in groups["encoder"]} == {id(p) for p in model.vision_encoder.parameters()}
    assert groups["decoder"] and not {id(p) for p in groups["decoder"]} & {id(p) for p in groups["encoder"]}
    model.set_fine_tune(False)
    assert not model.features_trainable and model.param_groups()["encoder"] == []
    assert model.ddp_find_unused_parameters


def test_byte_tokenizer_contract(tmp_path):
    from seesay.tokenizers import load_tokenizer

    tok = ByteTokenizer()
    assert tok.encode("  a  cat\n") == [97, 32, 99, 97, 116]
    assert tok.encode_prompt("This is ") == list(b"This is ")  # the trailing space stays
    assert tok.encode("\x02x\x03") == [26, 120, 26]  # bytes that are bos / eos become unk
    assert tok.decode([2, *"né".encode(), 3, 120]) == "né"  # bos dropped, stops at eos, UTF-8
    assert tok.decode([110, 26, 0, 0]) == "n\ufffd"
    assert [tok.id_to_token(i) for i in (97, 32, 2, 3, 0xE9)] == ["a", " ", "<start>", "<end>", "<0xE9>"]
    tok.save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok") == tok
    # dedicated ids beyond the bytes, through the model's constructor options
    model = tiny_model(num_tokens=259, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    assert (model.tokenizer.bos_id, model.tokenizer.eos_id, model.image_token_id) == (256, 257, 259)
    assert model.tokenizer.encode("\x00\x02") == [0, 2]  # every byte is text here
    with pytest.raises(SeesayError, match="eos id 256 is not a text id"):
        tiny_model(eos_token_id=256)
    with pytest.raises(SeesayError, match="must differ"):
        ByteTokenizer(pad_id=3)


def test_generate_with_each_strategy_and_greedy_equals_the_token_level_api():
    model = tiny_model().eval()
    tok = model.tokenizer
    images = uint8_batch()
    prompt = "This is "
    p = len(tok.encode_prompt(prompt))
    greedy = model.generate(images, Greedy(), prompt=prompt, max_len=12)
    assert greedy.tokens.shape[0] == 2 and bool((greedy.lengths <= p + 12).all())
    assert all(tok.decode(row).startswith(prompt) for row in greedy.tokens)
    beam = model.generate(images, Beam(2), prompt=prompt, max_len=12)
    assert torch.equal(beam.tokens[:, :p], greedy.tokens[:, :p])
    assert torch.equal(model.generate(images, Beam(1), prompt=prompt, max_len=12).tokens, greedy.tokens)
    s1 = model.generate(images, Sample(temperature=1.5, seed=7), prompt=prompt, max_len=12)
    s2 = model.generate(images, Sample(temperature=1.5, seed=7), prompt=prompt, max_len=12)
    s3 = model.generate(images, Sample(temperature=1.5, seed=8), prompt=prompt, max_len=12)
    assert torch.equal(s1.tokens, s2.tokens) and not torch.equal(s1.tokens, s3.tokens)
    # features from encode() give the same captions as images
    assert torch.equal(model.generate(model.encode(images), prompt=prompt, max_len=12).tokens, greedy.tokens)
    # the token-level call at temperature 0 over the same sequence (image, bos, prompt) agrees
    ids = torch.tensor([model.image_token_id, tok.bos_id, *tok.encode_prompt(prompt)])
    legacy = model.generate(ids.expand(2, -1), images=model.image_processor.normalize(images)[:, None],
                            image_positions=torch.tensor([[0], [0]]), max_length=len(ids) + 12, temperature=0,
                            eos_token_id=tok.eos_id)
    n = legacy.shape[1]
    assert torch.equal(legacy, greedy.tokens[:, p: p + n])
    # options of one call style refused in the other
    with pytest.raises(SeesayError, match="token-level"):
        model.generate(images, images=images[:, None])
    with pytest.raises(SeesayError, match="strategy, prompt and max_len need images first"):
        model.generate(ids[None], Beam(2), images=images[:1, None].float())


@pytest.mark.filterwarnings("ignore:MultimodalMAC")  # the captions cross a window here, on purpose
def test_teacher_forcing_agrees_with_step_decoding():
    model = tiny_model(segment_len=8, num_longterm_mem_tokens=2, num_persist_mem_tokens=2).eval()
    tok = model.tokenizer
    images = uint8_batch()
    rows = [[tok.bos_id, *tok.encode("a red one"), tok.eos_id], [tok.bos_id, *tok.encode("stripes"), tok.eos_id]]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    out = model(images, tokens, lengths)
    assert out.logits.shape == (2, width - 1, 256)
    teacher = out.logits.log_softmax(-1)
    steps = model.step_decoder()
    state = steps.init_state(model.encode(images))
    for t in range(width - 1):
        logprobs, state, _ = steps.step(tokens[:, t], state)
        for r in range(2):
            if t < lengths[r] - 1:
                assert torch.allclose(logprobs[r], teacher[r, t], atol=1e-4), (r, t)
    # image_rows: each image once, several caption rows per image
    again = model(images, tokens[[1, 0, 1]], lengths[[1, 0, 1]], image_rows=torch.tensor([1, 0, 0]))
    assert torch.allclose(again.logits[:2], out.logits[[1, 0]], atol=1e-5)
    assert (again.logits[2] - out.logits[1]).abs().max() > 1e-4  # the same caption on the other image


@pytest.fixture(scope="module")
def trained_captioner():
    """A tiny captioner trained through the captioner contract to say "cat." / "dog." + eos."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_model(vision_dropout=0.0)
    tok = model.tokenizer
    images = uint8_batch()
    tokens = torch.tensor([[tok.bos_id, *tok.encode(w), tok.eos_id] for w in ("cat.", "dog.")])
    lengths = torch.full((2,), tokens.shape[1])
    opt = torch.optim.AdamW([p for g in model.param_groups().values() for p in g], lr=5e-3)
    for _ in range(80):
        logits = model(images, tokens, lengths).logits
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(n)
    return model.eval(), images


def test_trained_captioner_names_each_image_and_stops_at_eos(trained_captioner):
    model, images = trained_captioner
    for strategy in (Greedy(), Beam(2)):
        res = model.generate(images, strategy, max_len=20)
        assert [model.tokenizer.decode(r) for r in res.tokens] == ["cat.", "dog."], strategy
        assert res.lengths.tolist() == [5, 5]  # "cat." + eos, not max_len


def test_checkpoint_round_trip_gives_identical_captions(trained_captioner, tmp_path):
    model, images = trained_captioner
    save_checkpoint(tmp_path / "ckpt", model=model, config={"note": "multimodal"})
    ck = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(ck.model, MultimodalMAC) and ck.tokenizer == model.tokenizer
    assert ck.model.spec() == model.spec()
    for strategy in (Greedy(), Sample(seed=3)):
        a = model.generate(images, strategy, prompt="c", max_len=10)
        b = ck.model.generate(images, strategy, prompt="c", max_len=10)
        assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.scores, b.scores, atol=1e-5)
    # a fresh process (nothing imported but the checkpoint loader) loads it and captions the same
    import subprocess
    import sys

    torch.save(images, tmp_path / "images.pt")
    code = ("import torch; from seesay.checkpoint import load_checkpoint; from seesay.decoding import Greedy; "
            f"ck = load_checkpoint({str(tmp_path / 'ckpt')!r}); "
            f"x = torch.load({str(tmp_path / 'images.pt')!r}, weights_only=True); "
            "print(ck.model.generate(x, Greedy(), prompt='c', max_len=10).tokens.tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(model.generate(images, Greedy(), prompt="c", max_len=10).tokens.tolist())
    # a custom vision module has no JSON spec: saving it says so in one line
    custom = tiny_model(vision_encoder=MeanColourEncoder())
    with pytest.raises(SeesayError, match="custom vision_encoder= module cannot be saved as a checkpoint"):
        save_checkpoint(tmp_path / "custom", model=custom)
    assert not (tmp_path / "custom").exists()


def test_max_length_not_above_the_prompt_is_refused():
    """Issue: max_length=12 after the README's 21-token prompt silently returned nothing."""
    model = tiny_model().eval()
    prompt = prompt_for(model)
    assert prompt.shape[1] == 21
    x = model.image_processor(pil_images()[0])[None, None]
    pos = torch.tensor([[20]])
    for bad in (12, 21):
        with pytest.raises(SeesayError, match=f"max_length={bad} counts the prompt's 21 tokens"):
            model.generate(prompt, images=x, image_positions=pos, max_length=bad, temperature=0)
    assert model.generate(prompt, images=x, image_positions=pos, max_length=22, temperature=0).shape == (1, 1)


def test_multimodal_mac_trains_and_captions_through_the_cli(tmp_path, capsys):
    """`seesay train --set captioner.family=multimodal_mac`: the family brings its byte tokenizer (the
    dataset's word captions are re-encoded with it), trains its random ViT (auto), saves a checkpoint
    that `seesay caption` loads."""
    import json

    from conftest import prepared_shapes
    from seesay import cli

    data = prepared_shapes(tmp_path, num_images=20)
    opts = {"image_size": 32, "patch_size": 8, "vision_dim": 16, "vision_depth": 1, "vision_heads": 2,
            "vision_mlp_dim": 32, "num_tokens": 256, "text_dim": 16, "depth": 2, "segment_len": 64,
            "num_image_tokens": 4, "heads": 2, "dim_head": 8}
    sets = [x for k, v in opts.items() for x in ("--set", f"captioner.{k}={v}")]
    run = tmp_path / "run"
    rc = cli.main(["train", "--data", str(data), "--output", str(run), "--set", "captioner.family=multimodal_mac",
                   *sets, "--epochs", "1", "--batch-size", "20", "--workers", "0", "--device", "cpu", "--no-progress",
                   "--set", "train.val_max_len=6", "--set", "train.tensorboard=false"])
    assert rc == 0
    assert not (run / "features").exists()  # the random ViT trained (in the loop), not cached frozen
    assert json.loads((run / "best" / "config.json").read_text())["model"]["captioner"] == "multimodal_mac"
    assert json.loads((run / "best" / "tokenizer" / "tokenizer.json").read_text())["type"] == "seesay-bytes"
    capsys.readouterr()
    image = sorted((tmp_path / "raw" / "images").glob("*.png"))[0]
    rc = cli.main(["caption", "--checkpoint", str(run / "best"), str(image), "--beam-size", "2", "--max-length", "6",
                   "--device", "cpu"])
    assert rc == 0 and capsys.readouterr().out.strip() != ""
