"""What `seesay.allocator.keep_freed_memory()` (called by the command line) changes, printed as JSON.

Each workload runs in fresh processes, alternating glibc's defaults (SEESAY_KEEP_FREED_MEMORY=0)
and the thresholds the command line sets, `--rounds` times each. Per repetition of a workload it
reports the wall time (best and median over all rounds), the minor page faults and the system
CPU time (the kernel mapping and zero-filling fresh pages: what the setting removes), and the
process's peak resident size (what it costs).

Workloads, at the Show-Attend-Tell tutorial's sizes (512/512/512, vocabulary 10k, 14x14x2048
grid, `train_throughput.py`'s "tutorial" preset):
- train_soft_cached / train_transformer_grouped: one training step (forward, loss, backward,
  Adam) on cached features, 32 captions (`train_throughput.make_step`);
- train_soft_varying: the same soft-attention step with new captions (8-16 words) and features
  at every repetition, as a real epoch's batches are (not in the default list: run it with many
  `--reps` to watch the resident size, reported after the first and the last repetition);
- beam5_soft: soft attention's beam 5 over `--images` images, 20 steps;
- greedy_transformer: the Transformer's greedy decoding over `--images` images, 20 steps.

    python benchmarks/allocator.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKLOADS = ("train_soft_cached", "train_transformer_grouped", "beam5_soft", "greedy_transformer")
EXTRA_WORKLOADS = ("train_soft_varying",)


def _workload(name: str, images: int):
    """A callable running one repetition of `name`."""
    import torch

    sys.path.insert(0, str(HERE))
    if name.startswith("train_"):
        from train_throughput import make_step

        decoder, mode = {"train_soft_cached": ("soft_attention", "cached"),
                         "train_soft_varying": ("soft_attention", "cached"),
                         "train_transformer_grouped": ("transformer", "cached_grouped")}[name]
        return make_step("tutorial", decoder, mode, device=torch.device("cpu"), amp=False,
                         varying=name == "train_soft_varying")[0]
    from decode_throughput import PRESETS, decoder_kwargs

    from seesay.decoding import beam_search, greedy
    from seesay.encoders.base import EncoderOutput
    from seesay.registry import build_decoder

    p = PRESETS["tutorial"]
    family = "soft_attention" if name == "beam5_soft" else "transformer"
    torch.manual_seed(0)
    dec = build_decoder(family, vocab_size=p["vocab"], enc_dim=p["enc_dim"], **decoder_kwargs(family, p["dims"])).eval()
    g = p["grid"]
    enc = EncoderOutput(torch.randn(images, g * g, p["enc_dim"]), torch.randn(images, p["enc_dim"]), (g, g))
    common = {"bos": 1, "eos": p["vocab"] + 1, "max_len": 20}  # <end> unreachable: 20 steps each

    def run() -> None:
        with torch.inference_mode():
            if name == "beam5_soft":
                beam_search(dec, enc, beam_size=5, **common)
            else:
                greedy(dec, enc, **common)

    return run


def _rss_mib() -> float:
    """The resident size now (Linux), else the peak so far."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> dict:
    import torch

    from seesay.allocator import keep_freed_memory

    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory()
    run = _workload(args.worker, args.images)
    for _ in range(args.warmup):
        run()
    times, rss = [], []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        if not rss or len(times) == args.reps:
            rss.append(_rss_mib())
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    n = args.reps
    return {"kept": kept, "seconds": times, "minor_faults": (r1.ru_minflt - r0.ru_minflt) / n,
            "sys_seconds": (r1.ru_stime - r0.ru_stime) / n, "user_seconds": (r1.ru_utime - r0.ru_utime) / n,
            "peak_rss_mib": r1.ru_maxrss / 1024, "rss_mib_first_last": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS + EXTRA_WORKLOADS)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two settings, fresh processes")
    ap.add_argument("--reps", type=int, default=4, help="timed repetitions per process")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--images", type=int, default=100, help="images per decoding batch")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--worker", choices=WORKLOADS + EXTRA_WORKLOADS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    flags = [f"--{k}={v}" for k, v in (("reps", args.reps), ("warmup", args.warmup), ("images", args.images))]
    flags += [f"--threads={args.threads}"] if args.threads else []
    results = {}
    for name in args.workloads:
        runs: dict[str, list[dict]] = {"glibc_defaults": [], "kept": []}
        for r in range(args.rounds):
            order = ("glibc_defaults", "kept") if r % 2 == 0 else ("kept", "glibc_defaults")
            for setting in order:
                out = subprocess.run([sys.executable, __file__, "--worker", name, *flags], check=True,
                                     capture_output=True, text=True,
                                     env={**env, "SEESAY_KEEP_FREED_MEMORY": "1" if setting == "kept" else "0"})
                runs[setting].append(json.loads(out.stdout.strip().splitlines()[-1]))
        summary = {}
        for setting, rs in runs.items():
            seconds = [s for r in rs for s in r["seconds"]]
            summary[setting] = {
                "applied": all(r["kept"] for r in rs) if setting == "kept" else not any(r["kept"] for r in rs),
                "best_s": round(min(seconds), 4), "median_s": round(statistics.median(seconds), 4),
                "minor_faults": round(statistics.median(r["minor_faults"] for r in rs)),
                "sys_s": round(statistics.median(r["sys_seconds"] for r in rs), 4),
                "user_s": round(statistics.median(r["user_seconds"] for r in rs), 4),
                "peak_rss_mib": round(max(r["peak_rss_mib"] for r in rs)),
                "rss_mib_first_last": [[round(x) for x in r["rss_mib_first_last"]] for r in rs],
            }
        d, k = summary["glibc_defaults"], summary["kept"]
        summary["speedup_median"] = round(d["median_s"] / k["median_s"], 3)
        summary["speedup_best"] = round(d["best_s"] / k["best_s"], 3)
        results[name] = summary
    import torch

    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "reps": args.reps,
                      "images": args.images, "results": results}, indent=1))


if __name__ == "__main__":
    main()
