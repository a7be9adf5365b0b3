"""The Titans multimodal extension's API (MultimodalMAC, VisionTransformerEncoder, ImageProcessor):
the documented example runs at tiny sizes and generation really depends on the image."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("titans_pytorch")

from seesay.encoders.base import EncoderOutput  # noqa: E402
from seesay.multimodal import ImageProcessor, MultimodalMAC  # noqa: E402

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
