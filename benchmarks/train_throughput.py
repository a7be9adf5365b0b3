"""Training throughput (captions/s) for each decoder, printed as JSON.

For each decoder and size preset it times full training steps (forward, loss, backward,
Adam step) in three feeding modes:

- "cached": a frozen encoder's features are looked up from memory (what `seesay train` does
  without --fine-tune-encoder: the encoder never runs during an epoch), one feature row per
  caption (random caption batches, as the tutorial's);
- "cached_grouped": the same with B/5 images and their 5 captions each, one feature row per
  image (`image_rows`): decoders that take `image_rows` do their per-image work (the grid's
  attention projection, the Transformer's cross-attention keys/values) once per image;
- "encoder_grouped": the encoder trains and a batch holds B/5 images with their 5 captions
  each, so each image is encoded once per step (what `seesay train --fine-tune-encoder` does);
- "encoder_per_caption": the encoder trains and every caption brings its own image (the
  tutorial's random caption batches): B images are encoded per step.

Presets: "tutorial" (embed/attention/decoder 512, resnet101-like features 14x14x2048,
vocabulary 10k; its encoder modes use resnet101 and run only with --tutorial-encoder because
they are slow on a CPU) and "demo" (small_cnn at 64 px, 8x8 grid, sizes of configs/shapes_demo.yaml).

Each result also has the multiply-adds of one training step per caption (forward and
backward, counted by torch.utils.flop_counter at the measured sizes, optimizer excluded), the
GMAC/s that makes, and its fraction of the matmul roofline (`roofline.py`) measured in the same run.

    python benchmarks/train_throughput.py [--device cpu|cuda] [--steps 5] [--presets demo tutorial]

To compare two versions of seesay in one run, run this file with PYTHONPATH pointing at each
version's src/ in turn (it uses only `build_model`, `forward_features` and the objective).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
from roofline import sync  # this file's folder is on sys.path when run as a script or imported by a sibling
from torch.utils.flop_counter import FlopCounterMode

from seesay.allocator import keep_freed_memory
from seesay.encoders.base import EncoderOutput
from seesay.model import build_model
from seesay.train.objectives import token_cross_entropy as caption_loss
from seesay.train.optim import build_optimizer  # what `seesay train` steps with (fused Adam on CPU/CUDA)

CPI = 5  # captions per image

PRESETS = {
    "tutorial": {
        "encoder": {"name": "resnet101", "weights": "none", "encoded_size": 14, "image_size": 256},
        "enc_dim": 2048, "grid": 14, "vocab": 10000, "image_size": 256, "batch": 32,
        "decoders": {
            "show_tell": {"embed_dim": 512, "decoder_dim": 512},
            "soft_attention": {"embed_dim": 512, "attention_dim": 512, "decoder_dim": 512},
            "adaptive_attention": {"embed_dim": 512, "attention_dim": 512, "decoder_dim": 512},
            "transformer": {"d_model": 512, "heads": 8, "layers": 3, "ff_dim": 2048},
            "titans_mac": {"dim": 384, "depth": 4},
        },
    },
    "demo": {
        "encoder": {"name": "small_cnn", "width": 64, "encoded_size": 8, "image_size": 64},
        "enc_dim": 64, "grid": 8, "vocab": 60, "image_size": 64, "batch": 80,
        "decoders": {
            "show_tell": {"embed_dim": 128, "decoder_dim": 256},
            "soft_attention": {"embed_dim": 128, "attention_dim": 128, "decoder_dim": 256},
            "adaptive_attention": {"embed_dim": 128, "attention_dim": 128, "decoder_dim": 256},
            "transformer": {"d_model": 128, "heads": 4, "layers": 2, "ff_dim": 512},
            "titans_mac": {"dim": 128, "depth": 2, "heads": 4, "dim_head": 32},
        },
    },
}


def _captions(n: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(10, 19, (n,), generator=gen)  # <start> + 8..16 words + <end>, COCO-like
    tokens = torch.zeros(n, int(lengths.max()), dtype=torch.long)
    for i, L in enumerate(lengths.tolist()):
        tokens[i, 0], tokens[i, L - 1] = 1, 2
        tokens[i, 1: L - 1] = torch.randint(4, vocab, (L - 2,), generator=gen)
    return tokens, lengths


def _packed(model) -> dict:
    """forward(..., packed=True) where the model takes it (as `seesay train`'s cross-entropy asks);
    nothing for versions of seesay without it, so this file also times older checkouts."""
    return {"packed": True} if getattr(model, "packs_logits", False) else {}


def _loss(out, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    positions = getattr(out, "positions", None)
    kw = {} if positions is None else {"positions": positions}
    return caption_loss(out.logits, tokens, lengths, **kw)[0]


def _time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


def make_step(preset: str, decoder: str, mode: str, *, device: torch.device, amp: bool, varying: bool = False,
              batch: int | None = None, compile: bool = False):
    """(step, forward, tokens, lengths): one optimiser step of `decoder` in feeding `mode`, and its forward.

    By default every step trains on the same batch. With `varying` each step draws new captions
    (8-16 words) and, for cached features, new images' features, as an epoch's batches come: the
    products' shapes then change from step to step, which a fixed batch never shows (libraries
    that build a kernel per shape pay for it only there). `batch` overrides the preset's. `compile`:
    the decoder runs through `torch.compile` (inductor) from the first step on, which compiles it
    (`forward` called before that step runs eager, as the flop counter needs)."""
    p = PRESETS[preset]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    spec = {"encoder": dict(p["encoder"]), "decoder": {"name": decoder, **p["decoders"][decoder], "vocab_size": p["vocab"]}}
    model = build_model(spec).to(device)
    B = batch or p["batch"]
    cached = mode in ("cached", "cached_grouped")
    now: dict[str, torch.Tensor] = {}  # this step's batch

    def draw() -> None:
        tokens, lengths = _captions(B, p["vocab"], gen)
        now["tokens"], now["lengths"] = tokens.to(device), lengths.to(device)
        if cached:
            now["idx"] = torch.randint(0, 64, (B if mode == "cached" else -(-B // CPI),), generator=gen).to(device)

    if cached:
        model.encoder.set_fine_tune(False)
        module = model.decoder
        n = p["grid"] ** 2
        bank_grid = torch.randn(64, n, p["enc_dim"], dtype=torch.float16, device=device)
        bank_pooled = bank_grid.float().mean(1).half()
        draw()
        rows = None if mode == "cached" else torch.arange(-(-B // CPI), device=device).repeat_interleave(CPI)[:B]

        def forward():
            idx = now["idx"]
            enc = EncoderOutput(bank_grid[idx].float(), bank_pooled[idx].float(), (p["grid"], p["grid"]))
            return model.forward_features(enc, now["tokens"], now["lengths"], rows, **_packed(model))
    else:
        model.encoder.set_fine_tune(True)
        module = model
        draw()
        n_images = -(-B // CPI) if mode == "encoder_grouped" else B  # B = 32: 6 images of 5 captions, one of 2
        images = torch.randint(0, 256, (n_images, 3, p["image_size"], p["image_size"]), dtype=torch.uint8,
                               generator=gen).to(device)
        rows = torch.arange(n_images, device=device)
        if mode == "encoder_grouped":
            rows = rows.repeat_interleave(CPI)[:B]

        def forward():
            return module(images, now["tokens"], now["lengths"], rows, **_packed(module))
    module.train()
    opt = build_optimizer("adam", [{"params": [q for q in module.parameters() if q.requires_grad], "lr": 1e-4}], 0.0)
    # --amp: float16 with a GradScaler on CUDA, bfloat16 on the CPU (what `seesay train --amp` does)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

    def step():
        nonlocal compile
        if compile:  # at the first step, after the caller's eager forward (the flop count)
            model.decoder.compile()
            compile = False
        if varying:
            draw()
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp):
            out = forward()
            loss = _loss(out, now["tokens"], now["lengths"])
            if out.extras and out.extras.get("aux_loss") is not None:
                loss = loss + out.extras["aux_loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step, forward, now["tokens"], now["lengths"]


def bench(preset: str, decoder: str, mode: str, *, device: torch.device, steps: int, warmup: int,
          amp: bool, peak: float | None = None, varying: bool = False, batch: int | None = None,
          profile: bool = False, compile: bool = False) -> dict:
    step, forward, tokens, lengths = make_step(preset, decoder, mode, device=device, amp=amp, varying=varying,
                                               batch=batch, compile=compile)
    B = batch or PRESETS[preset]["batch"]
    macs = count_macs(forward, tokens, lengths) / B  # eager: the flop counter sees no compiled kernel's work
    first = _time_steps(step, 1, 0, device) if compile else None  # the first step compiles: timed on its own
    seconds = _time_steps(step, steps, warmup, device)
    out = {"preset": preset, "decoder": decoder, "mode": mode, "batch_captions": B, "new_batch_each_step": varying,
           "images_encoded_per_step": 0 if mode.startswith("cached") else (-(-B // CPI) if mode == "encoder_grouped" else B),
           "captions_per_s": round(B * steps / seconds, 1), "step_ms": round(1000 * seconds / steps, 1),
           "mmacs_per_caption": round(macs / 1e6, 1), "gmacs_achieved": round(macs * B * steps / seconds / 1e9, 2)}
    if peak:
        out["roofline_fraction"] = round(out["gmacs_achieved"] / peak, 3)
    if first is not None:
        out["compiled"], out["first_step_s"] = True, round(first, 2)
    if profile:
        out["per_step"] = profile_steps(step, device)
    return out


# aten operations that only make a view or an empty tensor: no kernel runs for them
VIEW_OPS = {"aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided",
            "aten::detach", "aten::alias", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice",
            "aten::narrow", "aten::expand", "aten::expand_as", "aten::t", "aten::transpose", "aten::permute",
            "aten::chunk", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::empty",
            "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::lift_fresh", "aten::result_type",
            "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous", "aten::dropout"}


def profile_steps(step, device: torch.device, steps: int = 3) -> dict:
    """What one training step asks of the host and (on CUDA) of the GPU, from torch.profiler over
    `steps` steps: aten operations called from Python or autograd (not those inside other aten
    operations), the ones of them that are more than views or empty tensors, and on CUDA the
    GPU's activities (kernels, copies, memsets) and the sum of their durations. A step whose wall time is far above its GPU time
    waits on the host: fewer operations, not fewer multiply-adds, make it faster."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.events()
    top = [e for e in events if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    out = {"wall_ms": round(1000 * wall / steps, 2), "host_ops": len(top) // steps,
           "host_ops_not_views": sum(e.name not in VIEW_OPS for e in top) // steps}
    if device.type == "cuda":
        on_gpu = [e for e in events if str(e.device_type).endswith("CUDA")]  # kernels, copies and memsets
        busy_us = sum(e.time_range.elapsed_us() for e in on_gpu)
        out.update(gpu_activities=len(on_gpu) // steps, gpu_busy_ms=round(busy_us / 1000 / steps, 2))
    return out


def count_macs(forward, tokens: torch.Tensor, lengths: torch.Tensor) -> float:
    """Multiply-adds of one forward + backward (FLOPs / 2, as torch's flop counter counts them)."""
    with FlopCounterMode(display=False) as counter:
        out = forward()
        _loss(out, tokens, lengths).backward()
    return counter.get_total_flops() / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--presets", nargs="+", default=["demo", "tutorial"], choices=list(PRESETS))
    ap.add_argument("--decoders", nargs="+", default=None, help="default: every registered one in the presets")
    ap.add_argument("--tutorial-encoder", action="store_true", help="also time resnet101 in the loop (slow on CPU)")
    ap.add_argument("--amp", action="store_true", help="autocast: float16 on CUDA, bfloat16 on the CPU")
    ap.add_argument("--modes", nargs="+", default=None, help="only these feeding modes")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-roofline", action="store_true", help="skip measuring the matmul roofline")
    ap.add_argument("--batch", type=int, default=None, help="captions a step (default: the preset's, 32 or 80)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile three steps: host operations a step and, on CUDA, GPU activities and busy time")
    ap.add_argument("--compile", action="store_true",
                    help="the decoder through torch.compile (the first step, which compiles, is reported apart)")
    ap.add_argument("--varying", action="store_true",
                    help="new captions and features at every step, as an epoch's batches (multiply-adds: the first's)")
    args = ap.parse_args()
    if args.batch is not None and args.batch < 1:
        raise SystemExit(f"--batch {args.batch}: a step needs at least one caption")
    kept = keep_freed_memory()  # as the command line does (seesay.allocator; SEESAY_KEEP_FREED_MEMORY=0: not)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from roofline import benchmark_device, measure

    from seesay.registry import list_decoders

    device = benchmark_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as `seesay train` runs on CUDA (cuDNN picks its convolutions)
    # the roofline in the products' own type: with --amp, float16 (CUDA) or bfloat16 (CPU) products
    roofline_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if args.amp else torch.float32
    roofline = None if args.no_roofline else measure(device, quick=True, dtype=roofline_dtype)
    peak = roofline["peak"] if roofline else None
    results = []
    for preset in args.presets:
        for decoder in PRESETS[preset]["decoders"]:
            if decoder not in list_decoders() or (args.decoders and decoder not in args.decoders):
                continue
            modes = ["cached", "cached_grouped"]
            if preset == "demo" or args.tutorial_encoder:
                modes += ["encoder_grouped", "encoder_per_caption"]
            for mode in modes:
                if args.modes and mode not in args.modes:
                    continue
                r = bench(preset, decoder, mode, device=device, steps=args.steps, warmup=args.warmup, amp=args.amp,
                          peak=peak, varying=args.varying, batch=args.batch, profile=args.profile,
                          compile=args.compile)
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)  # progress; the summary goes to stdout
    speedups = {}
    for r in results:
        if r["mode"] == "encoder_grouped" and any(x["mode"] == "encoder_per_caption" for x in results):
            per = next(x for x in results if x["preset"] == r["preset"] and x["decoder"] == r["decoder"]
                       and x["mode"] == "encoder_per_caption")
            speedups[f"{r['preset']}/{r['decoder']}"] = round(r["captions_per_s"] / per["captions_per_s"], 2)
    print(json.dumps({"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "machine": platform.machine(), "steps": args.steps, "amp": args.amp,
                      "allocator_kept_freed_memory": kept, "roofline_gmacs": roofline,
                      "results": results,
                      "grouped_vs_per_caption_speedup": speedups}, indent=1))


if __name__ == "__main__":
    main()
