"""Training steps with and without oneDNN's products (`seesay.layers.gemm`), in one process.

Prints JSON. For each decoder and feeding mode (those of `train_throughput.py`, whose presets
and step this uses): captions/s of a full optimiser step with seesay's oneDNN path ("onednn")
and with torch's own products ("torch"), alternating the two `--rounds` times
(`onednn_decode.alternate`). A round times `--steps` steps after one warm-up step and
keeps the fastest; each figure is the best round, "all" keeps every round, and "speedup" is
best over best.

    python benchmarks/onednn_train.py --preset tutorial --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
from onednn_decode import alternate, compare, setup
from roofline import best_of
from train_throughput import PRESETS, make_step


def bench(preset: str, decoder: str, mode: str, args: argparse.Namespace) -> dict:
    step = make_step(preset, decoder, mode, device=torch.device("cpu"), amp=False)[0]
    B = PRESETS[preset]["batch"]
    seen = alternate(args.rounds, lambda: {"step": round(B / best_of(step, args.steps, warmup=True), 1)})
    return {"decoder": decoder, "mode": mode, **compare(seen["step"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tutorial")
    ap.add_argument("--decoders", nargs="+", default=["soft_attention", "show_tell", "adaptive_attention", "transformer"])
    ap.add_argument("--modes", nargs="+", default=["cached_grouped"], choices=["cached", "cached_grouped"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    setup(args.threads)
    results = [bench(args.preset, d, m, args) for d in args.decoders for m in args.modes]
    print(json.dumps({"preset": args.preset, "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "machine": platform.machine(), "batch_captions": PRESETS[args.preset]["batch"],
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
