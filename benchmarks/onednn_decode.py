"""Decoding with and without oneDNN's packed products (`seesay.layers.gemm`), in one process.

Prints JSON. For each decoder: captions/s of greedy and beam 5 over `--images` images in one
batch, and beam 5 one image at a time over `--sequential-images`, with seesay's oneDNN path
("onednn") and with torch's own products ("torch"), alternating the two `--rounds` times so
that a busy or noisy machine disturbs both alike. Each figure is the best round; "all" keeps
every round, and "speedup" is best over best.

Decoders are randomly initialised with `<end>` unreachable, so every caption runs `--max-len`
steps (as in `decode_throughput.py`, whose presets this uses).

    python benchmarks/onednn_decode.py --preset tutorial --threads 1
    SEESAY_ONEDNN=0 python benchmarks/decode_throughput.py ...   # the other benchmarks, torch's products only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from collections.abc import Callable

import torch
from decode_throughput import PRESETS, decoder_kwargs

from seesay.decoding import beam_search, greedy
from seesay.encoders.base import EncoderOutput
from seesay.layers import gemm
from seesay.registry import build_decoder


def rate(fn, captions: int) -> float:
    t0 = time.perf_counter()
    fn()
    return captions / (time.perf_counter() - t0)


def bench(name: str, preset: dict, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    V, g = preset["vocab"], preset["grid"]
    dec = build_decoder(name, vocab_size=V, enc_dim=preset["enc_dim"], **decoder_kwargs(name, preset["dims"])).eval()
    enc = EncoderOutput(torch.randn(args.images, g * g, preset["enc_dim"]), torch.randn(args.images, preset["enc_dim"]),
                        (g, g))
    singles = [enc.index_select(torch.tensor([i])) for i in range(min(args.sequential_images, args.images))]
    common = {"bos": 1, "eos": V + 1, "max_len": args.max_len}
    runs = {
        "greedy": (lambda: greedy(dec, enc, **common), args.images),
        "beam5": (lambda: beam_search(dec, enc, beam_size=5, **common), args.images),
        "beam5_one_at_a_time": (lambda: [beam_search(dec, e, beam_size=5, **common) for e in singles], len(singles)),
    }
    with torch.inference_mode():
        greedy(dec, singles[0], **common)  # warm-up
        seen = alternate(args.rounds, lambda: {k: round(rate(fn, n), 2) for k, (fn, n) in runs.items()})
    return {k: compare(by, 2) for k, by in seen.items()}


def alternate(rounds: int, measure: Callable[[], dict[str, float]]) -> dict[str, dict[str, list[float]]]:
    """`measure()` with torch's products, then with seesay's (oneDNN), `rounds` times, so that a busy
    machine disturbs both alike: {key: {"torch": [...], "onednn": [...]}}, one value per round."""
    seen: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
        for backend in ("torch", "onednn"):
            with gemm.torch_products() if backend == "torch" else contextlib.nullcontext():
                for k, v in measure().items():
                    seen.setdefault(k, {"torch": [], "onednn": []})[backend].append(v)
    return seen


def compare(by: dict[str, list[float]], digits: int) -> dict:
    """Best round of each backend, their ratio, and every round."""
    best = {b: max(v) for b, v in by.items()}
    return {"torch": best["torch"], "onednn": best["onednn"], "speedup": round(best["onednn"] / best["torch"], digits),
            "all": by}


def setup(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    if not gemm.available():
        raise SystemExit("oneDNN's float32 product is not available here (torch build, CPU or SEESAY_ONEDNN=0)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tutorial")
    ap.add_argument("--decoders", nargs="+", default=["soft_attention", "show_tell", "adaptive_attention"])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--sequential-images", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    setup(args.threads)
    results = {name: bench(name, PRESETS[args.preset], args) for name in args.decoders}
    print(json.dumps({"preset": args.preset, "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "machine": platform.machine(), "images": args.images, "max_len": args.max_len,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
