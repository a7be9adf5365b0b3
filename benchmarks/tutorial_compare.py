"""seesay next to the Show-Attend-Tell tutorial users compare it with, at the tutorial's sizes, in one run.

The tutorial (github.com/sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning) is not vendored: its
models.py, caption.py and train.py are imported from the checkout given with `--tutorial`,
with only the patches current libraries need (applied in this process, never to the files):

- `scipy.misc.imread / imresize` (removed from SciPy) and the packages its modules import but
  this comparison does not use (h5py, nltk, matplotlib, skimage) get stand-ins when missing;
  imread returns a random 256 px image (decoder-only beam search ignores the pixels);
- `torchvision.models.resnet101(pretrained=True)` builds without downloading (weights=None:
  speed does not depend on the weights);
- caption_image_beam_search's `top_k_words / vocab_size` is a float division on current
  PyTorch, which cannot index; its source is recompiled with `//` (the fix every fork applies);
- train.py unpacks `pack_padded_sequence(...)` into two values, but a PackedSequence has four
  fields today: its module gets a `pack_padded_sequence` returning (data, batch_sizes).

Measured (captions/s; sizes 512/512/512, vocabulary 10k, grid 14x14x2048, batch 32, captions
of 8-16 words, as in the issue):

- training, decoder only: the tutorial's `train.train()` on precomputed features (an identity
  encoder) vs seesay's cached-feature training (`train_throughput.py` "cached" and "cached_grouped"),
  both with a new batch at every step, timed after `--warmup` batches (a real run's steps come
  after thousands of others: a few warm-up steps let the allocator's heap settle on both sides);
- training with the frozen ResNet-101 in the loop (`--with-encoder`, slow on a CPU): the
  tutorial encodes every caption's image each step, seesay caches features (the same seesay figures);
- beam 5, decoder only: `caption_image_beam_search` one image at a time vs seesay's
  `beam_search` over `--images` images in one batch and one image at a time. Both run 20
  steps' worth: the tutorial runs until step 51 with random weights, so its time is scaled
  by 20 / its steps.

    python benchmarks/tutorial_compare.py --tutorial PATH/TO/a-PyTorch-Tutorial-to-Image-Captioning [--threads 2] [--warmup 3]

`--profile` adds what one step of one image's beam search asks of the host on each side (aten
operations, those that are more than views, and on CUDA the GPU's activities and busy time;
`train_throughput.profile_steps`): a step of five rows is bound by that count, not by its
arithmetic, on a GPU.

With `--device cuda` both sides run on the GPU (the tutorial through its own module-level
`device`, float32 as it trains; seesay's training in float32 too, so the figures compare the
same arithmetic), and every timing waits for the GPU to finish.

Prints one JSON object with every figure and the ratios (seesay / tutorial).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from roofline import benchmark_device, sync  # this file's folder is on sys.path when run as a script

from seesay.allocator import keep_freed_memory

VOCAB, GRID, ENC_DIM, DIMS, BATCH, STEPS = 10000, 14, 2048, 512, 32, 20
TUTORIAL_FILES = ("models.py", "caption.py", "train.py")


def _stand_in(name: str, **attrs) -> None:
    """Register module `name` (and its parents) with `attrs` unless it imports for real."""
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - missing or broken: a stand-in replaces it
        module = types.ModuleType(name)
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent:
            _stand_in(parent)
            setattr(sys.modules[parent], child, module)
    for k, v in attrs.items():
        if not hasattr(module, k):
            setattr(module, k, v)


def _imread(_path, *a, **k):
    return np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)


def _imresize(img, size, *a, **k):
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize(tuple(size)[::-1]))


def load_tutorial(path: str | Path, device: torch.device = torch.device("cpu")) -> dict[str, types.ModuleType]:
    """Import the tutorial's models, caption and train modules from a checkout, patched for today's libraries."""
    root = Path(path).expanduser().resolve()
    missing = [f for f in TUTORIAL_FILES if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"--tutorial {path}: not a checkout of the tutorial (no {', '.join(missing)})")
    _stand_in("scipy.misc", imread=_imread, imresize=_imresize)
    _stand_in("h5py")
    _stand_in("nltk.translate.bleu_score", corpus_bleu=lambda *a, **k: 0.0)
    _stand_in("skimage.transform")
    _stand_in("matplotlib.pyplot")
    _stand_in("matplotlib.cm")
    _stand_in("tqdm", tqdm=lambda x, *a, **k: x)
    import torchvision

    resnet101 = torchvision.models.resnet101
    if not getattr(resnet101, "_seesay_patched", False):
        def no_download(pretrained=False, **kw):  # noqa: ARG001 - the tutorial asks for pretrained weights
            return resnet101(weights=None)

        no_download._seesay_patched = True
        torchvision.models.resnet101 = no_download
    for name in ("models", "utils", "datasets", "caption", "train"):  # the tutorial's own module names
        sys.modules.pop(name, None)
    sys.path.insert(0, str(root))
    try:
        modules = {name: importlib.import_module(name) for name in ("models", "caption", "train")}
    finally:
        sys.path.remove(str(root))
    cap = modules["caption"]
    cap.imread, cap.imresize = _imread, _imresize
    source = inspect.getsource(cap.caption_image_beam_search)
    if "top_k_words / vocab_size" in source:
        code = compile(source.replace("top_k_words / vocab_size", "top_k_words // vocab_size"), cap.__file__, "exec")
        exec(code, cap.__dict__)  # noqa: S102 - the user's own checkout, patched as documented above
    from torch.nn.utils.rnn import pack_padded_sequence

    def pack_two(*a, **k):
        packed = pack_padded_sequence(*a, **k)
        return packed.data, packed.batch_sizes

    modules["train"].pack_padded_sequence = pack_two
    for m in modules.values():
        if hasattr(m, "device"):
            m.device = device
    return modules


def _batches(n: int, gen: torch.Generator, with_images: bool) -> list:
    from train_throughput import _captions

    out = []
    for _ in range(n):
        tokens, lengths = _captions(BATCH, VOCAB, gen)
        caps = torch.zeros(BATCH, 52, dtype=torch.long)  # the tutorial pads to max_len + 2
        caps[:, : tokens.shape[1]] = tokens
        src = (torch.rand(BATCH, 3, 256, 256, generator=gen) if with_images
               else torch.randn(BATCH, GRID, GRID, ENC_DIM, generator=gen))
        out.append((src, caps, lengths[:, None]))
    return out


def tutorial_training(tut: dict, *, steps: int, with_encoder: bool, warmup: int = 1,
                      device: torch.device = torch.device("cpu")) -> float:
    """Captions/s of the tutorial's train() over `steps` batches, after `warmup` batches."""
    models, train = tut["models"], tut["train"]
    torch.manual_seed(0)
    decoder = models.DecoderWithAttention(attention_dim=DIMS, embed_dim=DIMS, decoder_dim=DIMS, vocab_size=VOCAB,
                                          dropout=0.5)
    if with_encoder:
        encoder = models.Encoder()
        encoder.fine_tune(False)
    else:
        encoder = torch.nn.Identity()
    decoder, encoder = decoder.to(device), encoder.to(device)  # as the tutorial's main() does
    opt = torch.optim.Adam([p for p in decoder.parameters() if p.requires_grad], lr=4e-4)
    crit = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    loader = _batches(steps + warmup, gen, with_encoder)
    train.print_freq = 10**9
    # train() prints its first batch's line whatever print_freq is: to stderr, so stdout stays JSON
    with contextlib.redirect_stdout(sys.stderr):
        train.train(loader[:warmup], encoder, decoder, crit, None, opt, 0)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        train.train(loader[warmup:], encoder, decoder, crit, None, opt, 0)
        sync(device)
        elapsed = time.perf_counter() - t0
    return BATCH * steps / elapsed


def tutorial_beam(tut: dict, *, images: int, device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """Captions/s of caption_image_beam_search (beam 5, decoder only) scaled to 20 steps, and its steps."""
    models, cap = tut["models"], tut["caption"]
    torch.manual_seed(0)
    decoder = models.DecoderWithAttention(attention_dim=DIMS, embed_dim=DIMS, decoder_dim=DIMS, vocab_size=VOCAB).to(device).eval()
    word_map = {f"w{i}": i for i in range(VOCAB - 3)} | {"<start>": VOCAB - 3, "<end>": VOCAB - 2, "<pad>": VOCAB - 1}
    feats = torch.randn(images, 1, GRID, GRID, ENC_DIM, generator=torch.Generator().manual_seed(1)).to(device)
    calls = []
    decoder.decode_step.register_forward_hook(lambda *a: calls.append(1))
    total, steps = 0.0, 0
    with torch.no_grad():
        for i in range(images + 1):
            encoder = lambda _image, i=i: feats[min(i, images - 1)]  # noqa: E731 - decoder only
            calls.clear()
            t0 = time.perf_counter()
            try:
                cap.caption_image_beam_search(encoder, decoder, "image.jpg", word_map, beam_size=5)
            except ValueError:  # no beam ended within its 51 steps (random weights): the work is done
                pass
            sync(device)
            if i:  # the first image warms up
                total += time.perf_counter() - t0
                steps += len(calls)
    per_step = total / steps
    return 1.0 / (per_step * STEPS), steps / images


def profile_beam_steps(tut: dict, device: torch.device) -> dict:
    """Operations per beam step of one image's search (beam 5, decoder only) on each side: the
    tutorial's `caption_image_beam_search` (per call of its decode step) and seesay's `beam_search`."""
    from train_throughput import profile_steps

    from seesay.decoding import beam_search
    from seesay.encoders.base import EncoderOutput
    from seesay.registry import build_decoder

    models, cap = tut["models"], tut["caption"]
    torch.manual_seed(0)
    decoder = models.DecoderWithAttention(attention_dim=DIMS, embed_dim=DIMS, decoder_dim=DIMS, vocab_size=VOCAB).to(device).eval()
    word_map = {f"w{i}": i for i in range(VOCAB - 3)} | {"<start>": VOCAB - 3, "<end>": VOCAB - 2, "<pad>": VOCAB - 1}
    feats = torch.randn(1, GRID, GRID, ENC_DIM, generator=torch.Generator().manual_seed(1)).to(device)
    calls = []
    decoder.decode_step.register_forward_hook(lambda *a: calls.append(1))

    def tutorial() -> None:
        with torch.no_grad(), contextlib.suppress(ValueError):  # no beam ends with random weights
            cap.caption_image_beam_search(lambda _image: feats, decoder, "image.jpg", word_map, beam_size=5)

    tutorial()
    calls.clear()
    theirs = profile_steps(tutorial, device, steps=1)
    per_call = len(calls) / 2  # profile_steps runs the call once before profiling it
    dec = build_decoder("soft_attention", vocab_size=VOCAB, enc_dim=ENC_DIM, embed_dim=DIMS, attention_dim=DIMS,
                        decoder_dim=DIMS).to(device).eval()
    grid = feats.view(1, GRID * GRID, ENC_DIM)
    enc = EncoderOutput(grid, grid.mean(1), (GRID, GRID))
    with torch.inference_mode():
        ours = profile_steps(lambda: beam_search(dec, enc, bos=1, eos=VOCAB + 1, max_len=STEPS, beam_size=5), device,
                             steps=1)
    return {"tutorial": {k: round(v / per_call, 2) for k, v in theirs.items()}, "tutorial_steps": per_call,
            "seesay": {k: round(v / STEPS, 2) for k, v in ours.items()}, "seesay_steps": STEPS}


def seesay_figures(args: argparse.Namespace, device: torch.device) -> dict:
    from train_throughput import bench

    from seesay.decoding import beam_search
    from seesay.encoders.base import EncoderOutput
    from seesay.registry import build_decoder

    out = {}
    for mode in ("cached", "cached_grouped"):
        # a new batch at every step, as the tutorial's loader gives (new caption lengths, new shapes)
        r = bench("tutorial", "soft_attention", mode, device=device, steps=args.steps,
                  warmup=args.warmup, amp=False, varying=True)
        out[f"train_{mode}"] = r["captions_per_s"]
    torch.manual_seed(0)
    dec = build_decoder("soft_attention", vocab_size=VOCAB, enc_dim=ENC_DIM, embed_dim=DIMS, attention_dim=DIMS,
                        decoder_dim=DIMS).to(device).eval()
    n = args.images
    grid = torch.randn(n, GRID * GRID, ENC_DIM, generator=torch.Generator().manual_seed(1)).to(device)
    enc = EncoderOutput(grid, grid.mean(1), (GRID, GRID))
    common = {"bos": 1, "eos": VOCAB + 1, "max_len": STEPS, "beam_size": 5}  # <end> unreachable: 20 steps
    with torch.inference_mode():
        beam_search(dec, enc.index_select(torch.arange(2, device=device)), **common)
        sync(device)
        t0 = time.perf_counter()
        beam_search(dec, enc, **common)
        sync(device)
        out["beam5_batched"] = n / (time.perf_counter() - t0)
        m = min(n, args.sequential_images)
        t0 = time.perf_counter()
        for i in range(m):
            beam_search(dec, enc.index_select(torch.tensor([i], device=device)), **common)
        sync(device)
        out["beam5_one_image"] = m / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tutorial", required=True, help="a checkout of sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning")
    ap.add_argument("--steps", type=int, default=3, help="training batches timed per figure")
    ap.add_argument("--warmup", type=int, default=1, help="training batches run before the timed ones (both)")
    ap.add_argument("--images", type=int, default=100, help="images in seesay's batched beam search")
    ap.add_argument("--sequential-images", type=int, default=10, help="images decoded one at a time (both)")
    ap.add_argument("--with-encoder", action="store_true", help="also time the tutorial with ResNet-101 in the loop")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: both sides run there")
    ap.add_argument("--profile", action="store_true",
                    help="also count the operations of one beam step of one image on each side")
    args = ap.parse_args()
    device = benchmark_device(args.device)
    kept = keep_freed_memory()  # as the command line does (seesay.allocator; SEESAY_KEEP_FREED_MEMORY=0: not)
    if args.threads:
        torch.set_num_threads(args.threads)
    tut = load_tutorial(args.tutorial, device)
    t = {"train_decoder_only": tutorial_training(tut, steps=args.steps, with_encoder=False, warmup=args.warmup,
                                                 device=device)}
    if args.with_encoder:
        t["train_frozen_resnet101"] = tutorial_training(tut, steps=args.steps, with_encoder=True, warmup=args.warmup,
                                                        device=device)
    t["beam5_one_image"], tutorial_steps = tutorial_beam(tut, images=args.sequential_images, device=device)
    s = seesay_figures(args, device)
    best_train = max(s["train_cached"], s["train_cached_grouped"])  # cached_grouped: `seesay train --batch-by image`
    ratios = {"train_vs_decoder_only": best_train / t["train_decoder_only"],
              "train_cached_vs_decoder_only": s["train_cached"] / t["train_decoder_only"],
              "train_cached_grouped_vs_decoder_only": s["train_cached_grouped"] / t["train_decoder_only"],
              "batched_beam5_vs_tutorial_beam5": s["beam5_batched"] / t["beam5_one_image"],
              "batched_beam5_vs_seesay_one_image": s["beam5_batched"] / s["beam5_one_image"],
              "one_image_beam5_vs_tutorial": s["beam5_one_image"] / t["beam5_one_image"]}
    if "train_frozen_resnet101" in t:
        ratios["train_vs_frozen_resnet101"] = best_train / t["train_frozen_resnet101"]
        ratios["train_cached_vs_frozen_resnet101"] = s["train_cached"] / t["train_frozen_resnet101"]
    r2 = lambda d: {k: round(v, 2) for k, v in d.items()}  # noqa: E731
    profiled = {"beam5_one_image_per_step": profile_beam_steps(tut, device)} if args.profile else {}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(json.dumps({"machine": platform.machine(), "device": where, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "allocator_kept_freed_memory": kept,
                      "training_steps": {"warmup": args.warmup, "timed": args.steps},
                      "sizes": {"dims": DIMS, "vocab": VOCAB, "grid": GRID, "enc_dim": ENC_DIM, "batch": BATCH,
                                "beam": 5, "steps": STEPS},
                      "tutorial_captions_per_s": r2(t), "tutorial_beam_steps_per_image": round(tutorial_steps, 1),
                      "seesay_captions_per_s": r2(s), "ratios": r2(ratios), **profiled,
                      "targets": {"train_vs_decoder_only": 5, "train_vs_frozen_resnet101": 20,
                                  "batched_beam5_vs_tutorial_beam5": 25, "batched_beam5_vs_seesay_one_image": 10}},
                     indent=1))


if __name__ == "__main__":
    main()
