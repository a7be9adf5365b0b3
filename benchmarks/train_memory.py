"""Peak memory of training versus dataset size, printed as JSON.

The issue's target: training memory does not grow with dataset size. For each size (shapes
datasets of e.g. 200, 800 and 3200 images) and each feeding mode, one fresh subprocess
trains the demo-size soft_attention model (configs/shapes_demo.yaml sizes) for one epoch
(capped at --max-steps optimiser steps, validation on at most --val-images images) and reports:

- peak_rss_mib: the process's VmHWM (peak resident set, /proc/self/status; ru_maxrss where
  /proc is missing). It counts touched pages of memory-mapped files (images, feature cache),
  which the kernel can drop at will, so it may creep up a little with the data;
- peak_anon_mib: the peak of RssAnon (heap, tensors: memory the process really owns), sampled
  every 20 ms by a thread. This is the figure that must stay flat;
- seconds and the train steps run.

Modes: "cached_mmap" (frozen encoder, features computed once into the on-disk cache and read
back through a memory map: the store's in-RAM threshold is forced to 0 bytes, as for a dataset
too big for RAM) and "fine_tune_encoder" (--fine-tune-encoder: images go through the encoder
every step, images grouped per batch). Datasets are made once under --work (kept between runs).

    python benchmarks/train_memory.py                         # 200 800 3200 images, both modes
    python benchmarks/train_memory.py --sizes 200 3200 --max-steps 20 --modes cached_mmap
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODES = ("cached_mmap", "fine_tune_encoder")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def make_data(work: Path, n: int) -> Path:
    """A prepared shapes dataset of `n` images (64 px, as the demo), made once."""
    from seesay.data.prepare import prepare_dataset
    from seesay.data.synth import make_shapes

    data = work / f"shapes{n}_data"
    if (data / "manifest.json").is_file():
        return data
    raw = work / f"shapes{n}_raw"
    annotations = make_shapes(raw, num_images=n, seed=0, image_size=64)
    prepare_dataset("karpathy", data, annotations=annotations, images=raw, image_size=64, min_word_freq=1)
    return data


def child(args: argparse.Namespace) -> None:
    """One training run in this process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    peak_anon = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon") or 0)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    import seesay.train.caption_task as caption_task
    from seesay.config import Config
    from seesay.train import features

    used_mmap: list[bool] = []
    if args.mode == "cached_mmap":
        features.IN_MEMORY_BYTES = 0

        class MappedStore(features.FeatureStore):
            def __init__(self, directory, device="cpu", in_memory_bytes: int = 0) -> None:
                super().__init__(directory, device=device, in_memory_bytes=0)
                used_mmap.append(not self.in_memory)

        caption_task.FeatureStore = MappedStore
    cfg = Config.from_dict({
        "data": {"path": args.data, "workers": 0, "val_max_images": args.val_images},
        "encoder": {"name": "small_cnn", "fine_tune": args.mode == "fine_tune_encoder", "lr": 1e-3,
                    "options": {"width": 64, "encoded_size": 8, "image_size": 64}},
        "decoder": {"name": "soft_attention", "lr": 2e-3, "alpha_c": 1.0,
                    "options": {"embed_dim": 64, "attention_dim": 64, "decoder_dim": 128, "dropout": 0.3}},
        "train": {"output": args.output, "epochs": 1, "batch_size": 80, "max_steps_per_epoch": args.max_steps,
                  "val_beam_size": 1, "val_max_len": 20, "device": "cpu", "tensorboard": False,
                  "progress": False, "seed": 0},
    })
    t0 = time.perf_counter()
    caption_task.train_captioner(cfg)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon") or 0)
    hwm = _status_kib("VmHWM")
    if hwm is None:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_mib": round(hwm / 1024, 1), "peak_anon_mib": round(peak_anon[0] / 1024, 1),
                      "seconds": round(seconds, 1),
                      "feature_store_memory_mapped": (all(used_mmap) and bool(used_mmap)) if args.mode == "cached_mmap"
                      else None}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 800, 3200], help="dataset sizes (images)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="feeding modes")
    parser.add_argument("--max-steps", type=int, default=40, help="optimiser steps in the epoch (cap)")
    parser.add_argument("--val-images", type=int, default=50, help="validation images decoded after the epoch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each run")
    parser.add_argument("--work", default=None, help="folder for the datasets and runs (default: a temp folder)")
    parser.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="seesay_train_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                    "max_steps": args.max_steps, "val_images": args.val_images, "work": str(work), "runs": {}}
    for mode in args.modes:
        result["runs"][mode] = {}
        for n in args.sizes:
            data = make_data(work, n)
            out = work / f"run_{mode}_{n}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run: the feature cache is built (and measured) again
            cmd = [sys.executable, __file__, "--child", mode, "--data", str(data), "--output", str(out),
                   "--max-steps", str(args.max_steps), "--val-images", str(args.val_images),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if proc.returncode != 0:
                tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
                result["runs"][mode][str(n)] = {"error": tail[0]}
            else:
                result["runs"][mode][str(n)] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{mode} {n}: {result['runs'][mode][str(n)]}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
