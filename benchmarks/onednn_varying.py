"""oneDNN's products (`seesay.layers.gemm`) against torch's when every batch has new shapes.

Prints JSON. `onednn_train.py` and `onednn_decode.py` repeat one batch, so every product has
the same shape at every repetition. Real batches do not: an epoch's captions have new lengths
at every step (the teacher-forced loop's row counts and the all-steps products' sizes change),
and decoding drops finished images, so its row counts shrink at different steps for different
images. oneDNN builds a kernel (a "primitive", JIT-compiled) for each new shape and keeps up to
1024 of them (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`); a new shape costs about 0.5-5 ms on top of
the product (measured at the tutorial's sizes), and the kept kernels take resident memory.

Each workload runs in fresh processes, alternating `SEESAY_ONEDNN=1` (seesay's default) and
`SEESAY_ONEDNN=0` (torch's products only) `--rounds` times. A process runs `--warmup` steps or
calls, then times `--steps` more, all with new data drawn from the same seeds in both settings.
It reports the timed steps' total and median seconds (medians over rounds, and every round's),
captions/s, and the resident size after the warm-up and at the end; "onednn_speedup" is torch's
total time over oneDNN's (the same batches in both).

- train:<decoder>:<batch>: one optimiser step on cached features with new captions (8-16
  words) and images at every step (`train_throughput.make_step(..., varying=True)`);
- beam5:<decoder> / greedy:<decoder>: decoding a batch of 1 to `--images` images, a new
  number at each call, 20 steps each (`<end>` unreachable: a randomly initialised decoder ends
  every caption at once or never, so the rows that finished captions free, which trained
  models add, are not simulated).

    python benchmarks/onednn_varying.py --threads 2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from allocator import _rss_mib

DEFAULT = ("train:soft_attention:32", "train:soft_attention:128", "train:show_tell:32",
           "train:adaptive_attention:32", "train:transformer:32", "beam5:soft_attention", "greedy:transformer")


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.machine()


def _parse(name: str, preset: str) -> tuple[str, str, int]:
    """(kind, decoder, batch) of a workload name; ValueError saying what is wrong."""
    from train_throughput import PRESETS

    from seesay.registry import list_decoders

    kind, _, rest = name.partition(":")
    family, _, batch = rest.partition(":")
    if kind not in ("train", "beam5", "greedy"):
        raise ValueError(f"workload {name!r}: kind must be train, beam5 or greedy")
    known = [d for d in PRESETS[preset]["decoders"] if d in list_decoders()]
    if family not in known:
        raise ValueError(f"workload {name!r}: decoder {family!r} is not in the {preset} preset "
                         f"(known: {', '.join(known)})")
    if kind == "train" and not (batch.isdigit() and int(batch) > 0):
        raise ValueError(f"workload {name!r}: train needs a batch size, e.g. train:{family}:32")
    if kind != "train" and batch:
        raise ValueError(f"workload {name!r}: decoding takes no batch size (--images sets the most images)")
    return kind, family, int(batch or 0)


def _decode_call(kind: str, family: str, preset: str, images: int):
    """A callable decoding a new batch of 1..`images` images per call; returns the images decoded."""
    import torch
    from decode_throughput import PRESETS, decoder_kwargs

    from seesay.decoding import beam_search, greedy
    from seesay.encoders.base import EncoderOutput
    from seesay.registry import build_decoder

    p = PRESETS[preset]
    torch.manual_seed(0)
    V, g, eos = p["vocab"], p["grid"], p["vocab"] + 1  # <end> unreachable: 20 steps each
    dec = build_decoder(family, vocab_size=V, enc_dim=p["enc_dim"], **decoder_kwargs(family, p["dims"])).eval()
    gen = torch.Generator().manual_seed(1)

    def call() -> int:
        n = int(torch.randint(1, images + 1, (1,), generator=gen))
        grid = torch.randn(n, g * g, p["enc_dim"], generator=gen)
        enc = EncoderOutput(grid, grid.mean(1), (g, g))
        with torch.inference_mode():
            if kind == "beam5":
                beam_search(dec, enc, bos=1, eos=eos, beam_size=5, max_len=20)
            else:
                greedy(dec, enc, bos=1, eos=eos, max_len=20)
        return n

    return call


def worker(args: argparse.Namespace) -> dict:
    import torch

    from seesay.allocator import keep_freed_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    kind, family, B = _parse(args.worker, args.preset)
    if kind == "train":
        from train_throughput import make_step

        step = make_step(args.preset, family, "cached", device=torch.device("cpu"), amp=False, varying=True,
                         batch=B)[0]

        def call() -> int:
            step()
            return B
    else:
        call = _decode_call(kind, family, args.preset, args.images)
    for _ in range(args.warmup):
        call()
    rss = [_rss_mib()]
    seconds, captions = [], 0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        captions += call()
        seconds.append(time.perf_counter() - t0)
    rss.append(_rss_mib())
    from seesay.layers import gemm

    return {"onednn": gemm.available(), "median_s": statistics.median(seconds), "total_s": sum(seconds),
            "captions_per_s": captions / sum(seconds), "rss_mib_after_warmup_and_end": [round(x) for x in rss]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(DEFAULT),
                    help="train:<decoder>:<batch>, beam5:<decoder> or greedy:<decoder>")
    ap.add_argument("--preset", default="tutorial", choices=("tutorial", "demo"))
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two settings, fresh processes")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps or calls per process")
    ap.add_argument("--steps", type=int, default=40, help="timed steps or calls per process")
    ap.add_argument("--images", type=int, default=100, help="most images per decoding call")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    for name in args.workloads:
        try:
            _parse(name, args.preset)
        except ValueError as e:
            ap.error(str(e))
    flags = [f"--{k}={getattr(args, k)}" for k in ("preset", "warmup", "steps", "images")]
    flags += [f"--threads={args.threads}"] if args.threads else []
    results = {}
    for name in args.workloads:
        runs: dict[str, list[dict]] = {"onednn": [], "torch": []}
        for r in range(args.rounds):
            for setting in (("onednn", "torch") if r % 2 == 0 else ("torch", "onednn")):
                env = {**os.environ, "SEESAY_ONEDNN": "1" if setting == "onednn" else "0"}
                out = subprocess.run([sys.executable, __file__, "--worker", name, *flags],
                                     capture_output=True, text=True, env=env)
                if out.returncode:
                    sys.exit(f"onednn_varying.py: workload {name} ({setting}) failed:\n{out.stderr[-2000:]}")
                runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
        total = {k: statistics.median(r["total_s"] for r in rs) for k, rs in runs.items()}
        summary = {s: {"applied": [r["onednn"] for r in rs],
                       "median_s": round(statistics.median(r["median_s"] for r in rs), 4),
                       "total_s": round(total[s], 4),
                       "rounds_median_s": [round(r["median_s"], 4) for r in rs],
                       "captions_per_s": [round(r["captions_per_s"], 1) for r in rs],
                       "rss_mib_after_warmup_and_end": [r["rss_mib_after_warmup_and_end"] for r in rs]}
                   for s, rs in runs.items()}
        summary["onednn_speedup"] = round(total["torch"] / total["onednn"], 3)
        results[name] = summary
    import torch

    print(json.dumps({"torch": torch.__version__, "cpu": _cpu_name(),
                      "threads": args.threads, "preset": args.preset, "rounds": args.rounds, "warmup": args.warmup,
                      "steps": args.steps, "results": results}, indent=1))


if __name__ == "__main__":
    main()
