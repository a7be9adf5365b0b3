"""Memory that beam search adds on top of the encoder output, at the tutorial's sizes.

Prints one JSON object: for each decoder, the peak resident memory (ru_maxrss) that one beam
search over `--images` images adds, measured in a fresh process per decoder so peaks do not
mix. The encoder output (100 x 196 x 2048 floats, 157 MB) exists before the search and is not
counted. Beams share one copy of each image's grid and its projections, so this grows with
images x beams only through the small per-beam state.

    python benchmarks/decode_memory.py                       # all decoders, beam 5, 100 images
    python benchmarks/decode_memory.py --decoders soft_attention --beam-size 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from decode_throughput import PRESETS, decoder_kwargs  # same directory: the same model sizes

from seesay.decoding import beam_search
from seesay.encoders.base import EncoderOutput
from seesay.registry import build_decoder


def measure(name: str, images: int, beam: int, steps: int) -> dict:
    """Run in a fresh process: the peak RSS one beam search adds."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    p = PRESETS["tutorial"]
    dec = build_decoder(name, vocab_size=p["vocab"], enc_dim=p["enc_dim"], **decoder_kwargs(name, p["dims"])).eval()
    g = p["grid"]
    enc = EncoderOutput(torch.randn(images, g * g, p["enc_dim"]), torch.randn(images, p["enc_dim"]), (g, g))
    common = {"bos": 1, "eos": p["vocab"] + 1, "beam_size": beam}  # <end> unreachable
    with torch.inference_mode():
        beam_search(dec, enc.index_select(torch.arange(1)), max_len=2, **common)  # warm-up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        beam_search(dec, enc, max_len=steps, **common)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mib": round(peak / 1024), "added_by_search_mib": round((peak - before) / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoders", nargs="*", default=["show_tell", "soft_attention", "adaptive_attention",
                                                          "transformer"], help="decoders to measure")
    parser.add_argument("--images", type=int, default=100, help="images in the batch")
    parser.add_argument("--beam-size", type=int, default=5, help="beams per image")
    parser.add_argument("--steps", type=int, default=5, help="decoding steps (<end> is unreachable)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure this decoder here
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.images, args.beam_size, args.steps)))
        return
    p = PRESETS["tutorial"]
    out = {"images": args.images, "beam_size": args.beam_size, "steps": args.steps,
           "sizes": f"tutorial: {p['grid']}x{p['grid']}x{p['enc_dim']} grid, {p['dims']} wide, vocabulary {p['vocab']}",
           "results": {}}
    for name in args.decoders:
        run = subprocess.run([sys.executable, __file__, "--one", name, "--images", str(args.images),
                              "--beam-size", str(args.beam_size), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        out["results"][name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{name}: {out['results'][name]}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
