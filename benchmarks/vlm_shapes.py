"""The tiny Swin v2 + T5 recipes on the built-in shapes, against the soft-attention demo at the same CPU minutes.

1. `seesay demo --minutes M` (soft attention, small CNN): its data, its test scores (beam 3).
2. `configs/vlm_tiny_caption.yaml` trained on the demo's prepared data for the same M minutes,
   evaluated the same way (test split, beam 3, fast metrics).
3. `configs/vlm_tiny_classify.yaml` on the shapes as a class-per-folder set
   (`seesay synth shapes --format imagefolder`), M minutes, test accuracy (generated text and
   closed set).
4. Throughput of the trained tiny Swin v2 + T5 captioner: training captions/s (from its run's
   metrics) and decoding captions/s on the test images (greedy, beam 3, batched), same run.

Every subprocess runs with the same torch thread count (`--threads`, default 1, as the demo).
Prints JSON. Time it on an idle machine.

    python benchmarks/vlm_shapes.py --work /tmp/vlm_shapes --minutes 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _seesay(args: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "seesay", *args], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _train_speed(run: Path) -> float | None:
    """Training captions/s of the run's last validation window (its metrics.jsonl)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    speeds = [rec["captions_per_s"] for rec in map(json.loads, path.read_text().splitlines())
              if isinstance(rec.get("captions_per_s"), (int, float))]
    return round(speeds[-1], 1) if speeds else None


def _decode_speed(checkpoint: Path, data: Path, threads: int) -> dict[str, float]:
    import torch

    from seesay.captioner import decode_batches
    from seesay.checkpoint import load_checkpoint
    from seesay.data.store import PreparedData
    from seesay.decoding import Beam, Greedy

    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint).model
    store = PreparedData(data).split("test")
    out = {}
    for name, strategy in (("greedy", Greedy()), ("beam3", Beam(3))):
        t0 = time.perf_counter()
        n = sum(len(b.captions) for b in decode_batches(model, store, strategy, batch_size=50, max_len=20,
                                                        prompt="What does the image describe?"))
        out[f"decode_{name}_captions_per_s"] = round(n / (time.perf_counter() - t0), 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="working folder (created)")
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget of each model, wall clock")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every subprocess")
    ap.add_argument("--num-images", type=int, default=2000, help="shapes images (demo default 2000)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"minutes": args.minutes, "threads": args.threads, "num_images": args.num_images}

    demo = work / "demo"
    res["demo_wall_s"] = round(_seesay(["demo", "--output", str(demo), "--minutes", str(args.minutes),
                                        "--num-images", str(args.num_images), "--threads", str(args.threads),
                                        "--no-progress"], args.threads), 1)
    res["soft_attention_test"] = json.loads((demo / "test_metrics.json").read_text())

    data, run = demo / "data", work / "vlm_caption"
    res["vlm_caption_train_wall_s"] = round(_seesay(
        ["train", "--config", "configs/vlm_tiny_caption.yaml", "--data", str(data), "--output", str(run),
         "--max-minutes", str(args.minutes), "--device", "cpu", "--no-progress"], args.threads), 1)
    metrics = work / "vlm_caption_test.json"
    _seesay(["evaluate", "--checkpoint", str(run / "best"), "--data", str(data), "--split", "test",
             "--beam-size", "3", "--output", str(metrics), "--device", "cpu", "--no-progress"], args.threads)
    res["vlm_caption_test"] = json.loads(metrics.read_text())
    res["vlm_caption_train_captions_per_s"] = _train_speed(run)
    res.update(_decode_speed(run / "best", data, args.threads))

    raw, cls, crun = work / "cls_raw", work / "cls_data", work / "vlm_classify"
    _seesay(["synth", "shapes", "--format", "imagefolder", "--output", str(raw), "--num-images",
             str(args.num_images)], args.threads)
    _seesay(["prepare", "--format", "imagefolder", "--images", str(raw), "--image-size", "64", "--output", str(cls),
             "--no-progress"], args.threads)
    res["vlm_classify_train_wall_s"] = round(_seesay(
        ["train", "--config", "configs/vlm_tiny_classify.yaml", "--data", str(cls), "--output", str(crun),
         "--max-minutes", str(args.minutes), "--device", "cpu", "--no-progress"], args.threads), 1)
    cmetrics = work / "vlm_classify_test.json"
    _seesay(["evaluate", "--checkpoint", str(crun / "best"), "--data", str(cls), "--split", "test",
             "--output", str(cmetrics), "--device", "cpu", "--no-progress"], args.threads)
    res["vlm_classify_test"] = json.loads(cmetrics.read_text())
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
