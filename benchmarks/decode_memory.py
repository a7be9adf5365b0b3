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
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
from seesay.decoding import beam_search
from seesay.encoders.base import EncoderOutput
from seesay.registry import build_decoder
name, images, beam, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(0)
kw = {"d_model": 512, "heads": 8, "layers": 3, "ff_dim": 2048} if name == "transformer" else \
     {"embed_dim": 512, "decoder_dim": 512, **({} if name == "show_tell" else {"attention_dim": 512})}
dec = build_decoder(name, vocab_size=10000, enc_dim=2048, **kw).eval()
enc = EncoderOutput(torch.randn(images, 196, 2048), torch.randn(images, 2048), (14, 14))
with torch.inference_mode():
    beam_search(dec, enc.index_select(torch.arange(1)), bos=1, eos=10001, beam_size=beam, max_len=2)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    beam_search(dec, enc, bos=1, eos=10001, beam_size=beam, max_len=steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_rss_mib": round(peak / 1024), "added_by_search_mib": round((peak - before) / 1024)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoders", nargs="*", default=["show_tell", "soft_attention", "adaptive_attention",
                                                          "transformer"], help="decoders to measure")
    parser.add_argument("--images", type=int, default=100, help="images in the batch")
    parser.add_argument("--beam-size", type=int, default=5, help="beams per image")
    parser.add_argument("--steps", type=int, default=5, help="decoding steps (<end> is unreachable)")
    args = parser.parse_args()
    out = {"images": args.images, "beam_size": args.beam_size, "steps": args.steps,
           "sizes": "tutorial: 14x14x2048 grid, 512 wide, vocabulary 10000", "results": {}}
    for name in args.decoders:
        run = subprocess.run([sys.executable, "-c", CHILD, name, str(args.images), str(args.beam_size), str(args.steps)],
                             capture_output=True, text=True, check=True)
        out["results"][name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{name}: {out['results'][name]}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
