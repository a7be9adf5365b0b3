"""Decoding throughput of every decoder: greedy, beam 3 and beam 5, batched over images.

Prints one JSON object. For each size preset and decoder: captions/s for greedy, beam 3
and beam 5 decoding of `--images` images in one batch, beam 5 decoding the same images one
at a time (the tutorial's way), their ratio, and for the Transformer generated tokens/s with
and without the KV cache.

Decoders are randomly initialised (throughput does not depend on training) and `<end>` is
made unreachable, so every caption runs exactly `--max-len` steps: batched and one-at-a-time
do the same work, and runs are comparable across decoders.

    python benchmarks/decode_throughput.py                    # both presets, 100 images
    python benchmarks/decode_throughput.py --preset demo --device cuda
    python benchmarks/decode_throughput.py --preset demo --threads 1 --repeats 5   # loaded CPU box

With `--checkpoint RUN_DIR/best --data DATA_DIR` it times a trained model on the first
`--images` images of a prepared split instead (encoded once, outside the timings): captions
end when the model says `<end>`, so lengths vary as in real use and the batched search gains
from finished images leaving the batch. It also reports the mean caption length.

Each figure is the best of `--repeats` timings (default 3). Each decoder also reports the
multiply-adds per caption of greedy and beam-5 decoding at the measured sizes (counted by
torch.utils.flop_counter over a few images), the GMAC/s batched beam 5 reaches, and its
fraction of the matmul roofline (`roofline.py`: large products, and 5-row products, the
shape of one image's beam step) measured in the same run.

`--profile` adds, per decoding step of greedy and beam-5 decoding (all images in one batch, and
one image), the host's aten operations (and those that are more than views) and on CUDA the
GPU's activities and busy time: a step of a few rows is bound by its count of operations and
launches, not by its multiply-adds, on a GPU at any model size and on a CPU at small ones.
"""


from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch
from roofline import best_of
from torch.utils.flop_counter import FlopCounterMode

from seesay.allocator import keep_freed_memory
from seesay.decoding import beam_search, greedy
from seesay.encoders.base import EncoderOutput
from seesay.registry import build_decoder, list_decoders

PRESETS = {
    # Show-Attend-Tell tutorial: ResNet-101 grid 14x14x2048, 512/512/512, vocabulary ~10k
    "tutorial": {"grid": 14, "enc_dim": 2048, "vocab": 10000, "dims": 512},
    # the built-in demo: small_cnn 8x8x64 grid, a shapes vocabulary, small decoder
    "demo": {"grid": 8, "enc_dim": 64, "vocab": 60, "dims": 128},
}


def decoder_kwargs(name: str, dims: int) -> dict:
    if name == "transformer":
        return {"d_model": dims, "heads": 8, "layers": 3, "ff_dim": 4 * dims}
    if name == "show_tell":
        return {"embed_dim": dims, "decoder_dim": dims}
    return {"embed_dim": dims, "attention_dim": dims, "decoder_dim": dims}


def time_decoding(dec, enc: EncoderOutput, common: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """captions/s of greedy, beam 3 and beam 5 over all images of `enc` in one batch, and of beam 5
    one image at a time over the first `--sequential-images`, with their ratio."""
    n = enc.grid.shape[0]
    greedy(dec, enc.index_select(torch.arange(min(2, n), device=device)), **common)  # warm-up
    out: dict = {}
    s = best_of(lambda: greedy(dec, enc, **common), args.repeats, device)
    out["greedy_captions_per_s"] = round(n / s, 2)
    for k in (3, 5):
        s = best_of(lambda k=k: beam_search(dec, enc, beam_size=k, **common), args.repeats, device)
        out[f"beam{k}_captions_per_s"] = round(n / s, 2)
    m = min(args.sequential_images, n)

    def one_at_a_time() -> None:
        for i in range(m):
            beam_search(dec, enc.index_select(torch.tensor([i], device=device)), beam_size=5, **common)

    s = best_of(one_at_a_time, args.repeats, device)
    out["beam5_one_at_a_time_captions_per_s"] = round(m / s, 2)
    out["beam5_batched_speedup"] = round(out["beam5_captions_per_s"] / out["beam5_one_at_a_time_captions_per_s"], 2)
    return out


def macs_per_caption(fn, enc: EncoderOutput, images: int = 4) -> float:
    """Multiply-adds per caption of `fn(enc)` over the first `images` images (FLOPs / 2)."""
    part = enc.index_select(torch.arange(min(images, enc.grid.shape[0]), device=enc.grid.device))
    with FlopCounterMode(display=False) as counter:
        fn(part)
    return counter.get_total_flops() / 2 / part.grid.shape[0]


def add_roofline(out: dict, dec, enc: EncoderOutput, common: dict, roofline: dict | None) -> None:
    greedy_macs = macs_per_caption(lambda e: greedy(dec, e, **common), enc)
    beam_macs = macs_per_caption(lambda e: beam_search(dec, e, beam_size=5, **common), enc)
    out["greedy_mmacs_per_caption"] = round(greedy_macs / 1e6, 1)
    out["beam5_mmacs_per_caption"] = round(beam_macs / 1e6, 1)
    out["beam5_gmacs_batched"] = round(beam_macs * out["beam5_captions_per_s"] / 1e9, 2)
    out["beam5_gmacs_one_at_a_time"] = round(beam_macs * out["beam5_one_at_a_time_captions_per_s"] / 1e9, 2)
    if roofline:
        out["beam5_roofline_fraction_batched"] = round(out["beam5_gmacs_batched"] / roofline["peak"], 3)
        out["beam5_roofline_fraction_one_at_a_time"] = round(out["beam5_gmacs_one_at_a_time"] / roofline["peak"], 3)


def profile_decoding(dec, enc: EncoderOutput, common: dict, device: torch.device) -> dict:
    """Operations per decoding step (`train_throughput.profile_steps` over one whole decoding call,
    divided by its `max_len` steps: <end> is unreachable) of greedy and beam 5, batched and one image."""
    from train_throughput import profile_steps

    one = enc.index_select(torch.tensor([0], device=device))
    calls = {"greedy": lambda: greedy(dec, enc, **common), "beam5": lambda: beam_search(dec, enc, beam_size=5, **common),
             "greedy_one_image": lambda: greedy(dec, one, **common),
             "beam5_one_image": lambda: beam_search(dec, one, beam_size=5, **common)}
    out = {}
    for label, call in calls.items():
        per_call = profile_steps(call, device, steps=1)
        out[label] = {k: round(v / common["max_len"], 2) for k, v in per_call.items()}
    return out


def bench_decoder(name: str, preset: dict, args: argparse.Namespace, device: torch.device,
                  roofline: dict | None = None) -> dict:
    torch.manual_seed(0)
    V = preset["vocab"]
    dec = build_decoder(name, vocab_size=V, enc_dim=preset["enc_dim"], **decoder_kwargs(name, preset["dims"]))
    dec = dec.to(device).eval()
    n, g = args.images, preset["grid"]
    enc = EncoderOutput(torch.randn(n, g * g, preset["enc_dim"], device=device),
                        torch.randn(n, preset["enc_dim"], device=device), (g, g))
    common = {"bos": 1, "eos": V + 1, "max_len": args.max_len}  # <end> unreachable: fixed work
    out = time_decoding(dec, enc, common, args, device)
    add_roofline(out, dec, enc, common, roofline)
    if args.profile:
        out["per_decoding_step"] = profile_decoding(dec, enc, common, device)
    if name == "transformer":
        tokens = n * args.max_len
        out["greedy_tokens_per_s_cached"] = round(tokens / best_of(lambda: greedy(dec, enc, **common), args.repeats, device), 1)
        dec.use_cache = False
        out["greedy_tokens_per_s_uncached"] = round(tokens / best_of(lambda: greedy(dec, enc, **common), args.repeats, device), 1)
        dec.use_cache = True
        out["kv_cache_speedup"] = round(out["greedy_tokens_per_s_cached"] / out["greedy_tokens_per_s_uncached"], 2)
    return out


def bench_trained(args: argparse.Namespace, device: torch.device) -> dict:
    """Greedy / beam 3 / beam 5 of a trained checkpoint on real images of a prepared split."""
    import numpy as np

    from seesay.checkpoint import load_checkpoint
    from seesay.data.store import open_split

    ck = load_checkpoint(args.checkpoint, map_location=device)
    split = open_split(args.data, args.split)
    n = min(args.images, len(split))
    images = torch.from_numpy(np.ascontiguousarray(np.asarray(split.images[:n]).transpose(0, 3, 1, 2)))
    model, tok = ck.model.to(device).eval(), ck.tokenizer
    enc = model.encode(images.to(device))
    common = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "max_len": args.max_len}
    out: dict = {"checkpoint": str(args.checkpoint), "split": args.split, "images": n,
                 "decoder": ck.config.get("model", {}).get("decoder") if isinstance(ck.config, dict) else None}
    out.update(time_decoding(model.decoder, enc, common, args, device))
    lengths = beam_search(model.decoder, enc, beam_size=5, **common).lengths
    out["beam5_mean_length"] = round(float(lengths.float().mean()), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=[*PRESETS, "all"], default="all", help="model sizes")
    parser.add_argument("--decoders", nargs="*", default=None, help="decoders to time (default: all registered)")
    parser.add_argument("--images", type=int, default=100, help="images per batch")
    parser.add_argument("--sequential-images", type=int, default=100,
                        help="images decoded one at a time for the comparison (fewer for a quick run)")
    parser.add_argument("--max-len", type=int, default=20, help="decoding steps per caption")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--checkpoint", default=None,
                        help="time this trained checkpoint on real images instead of the size presets")
    parser.add_argument("--data", default=None, help="prepared data directory (with --checkpoint)")
    parser.add_argument("--split", default="test", help="split of --data to caption (with --checkpoint)")
    parser.add_argument("--no-roofline", action="store_true", help="skip measuring the matmul roofline")
    parser.add_argument("--profile", action="store_true",
                        help="also count operations per decoding step (host aten operations; on CUDA GPU activities)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="time each measurement this many times and keep the fastest (noisy shared machines)")
    args = parser.parse_args()
    kept = keep_freed_memory()  # as the command line does (seesay.allocator; SEESAY_KEEP_FREED_MEMORY=0: not)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from roofline import benchmark_device, measure

    device = benchmark_device(args.device)

    roofline = None if args.no_roofline or args.checkpoint else measure(device, quick=True)
    names = args.decoders or [d for d in list_decoders() if d in ("show_tell", "soft_attention", "adaptive_attention",
                                                                  "transformer")]
    presets = list(PRESETS) if args.preset == "all" else [args.preset]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "images": args.images,
        "sequential_images": args.sequential_images, "max_len": args.max_len, "repeats": args.repeats,
        # glibc returns big freed blocks to the OS, so every step's large tensors page-fault afresh unless
        # its thresholds are set (seesay.allocator, or these variables, or jemalloc/tcmalloc): record which
        "allocator_kept_freed_memory": kept,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
        "roofline_gmacs": roofline,
        "results": {},
    }
    if args.checkpoint:
        if not args.data:
            parser.error("--checkpoint needs --data")
        with torch.inference_mode():
            result["results"]["trained"] = bench_trained(args, device)
        print(json.dumps(result, indent=2))
        return
    with torch.inference_mode():
        for p in presets:
            result["results"][p] = {"sizes": PRESETS[p]}
            for name in names:
                result["results"][p][name] = bench_decoder(name, PRESETS[p], args, device, roofline)
                print(f"{p} {name}: {result['results'][p][name]}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
