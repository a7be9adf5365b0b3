"""Time and peak memory of a self-critical (SCST) training step against a cross-entropy step, as JSON.

Both steps train the same checkpoint (default: the demo's, `seesay demo` -> demo_out/run/best) on
the same number of caption rows: cross-entropy on `--batch-size` reference captions, SCST on
`--batch-size // --samples` images x `--samples` sampled captions (what `seesay train --objective
scst --batch-size N` does). Features are those of the frozen image model (the recipe
configs/shapes_scst.yaml), or images through the image model with `--fine-tune`. Each mode runs in
its own subprocess (so peak memory is its own) and reports:

- step_s: median seconds of a whole step (objective, backward, Adam), after `--warmup` steps;
- scst only: sample_s (the no-grad sampling), reward_s (decoding to text + CIDEr-D) and
  forward_backward_s (the teacher-forced pass, backward and the optimizer) medians;
- peak_mib: torch.cuda.max_memory_allocated on CUDA; on CPU the peak RssAnon of the process
  (sampled every 10 ms), minus its value before the first step (the model and data are loaded).

    python benchmarks/scst_step.py                                  # demo_out/run/best on demo_out/data
    python benchmarks/scst_step.py --checkpoint RUN/best --data DATA_DIR --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def child(args: argparse.Namespace) -> dict:
    import functools

    import numpy as np
    import torch

    from seesay.captioner import evaluation_lang
    from seesay.checkpoint import load_checkpoint
    from seesay.data.loader import collate_images
    from seesay.data.store import PreparedData
    from seesay.model import pick_device
    from seesay.train.objectives import CrossEntropy, SelfCritical
    from seesay.train.reward import CaptionReward

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = pick_device(args.device)
    model = load_checkpoint(args.checkpoint, map_location=device).model
    model.train()
    if hasattr(model, "set_fine_tune"):
        model.set_fine_tune(args.fine_tune)
    data = PreparedData(args.data)
    train = data.split("train")
    lang = evaluation_lang(model.tokenizer, data.manifest, train.references)
    n_images = max(1, args.batch_size // (args.samples if args.mode == "scst" else train.captions_per_image))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=5e-5)
    rng = np.random.default_rng(0)

    def batch() -> dict:
        idx = rng.choice(len(train), n_images, replace=False)
        items = []
        for i in idx:
            lengths = np.array(train.lengths[i], dtype=np.int64)
            items.append({"captions": torch.from_numpy(np.array(train.captions[i, :, : lengths.max()], dtype=np.int64)),
                          "lengths": torch.from_numpy(lengths), "image_index": int(i), "image_id": train.image_ids[i],
                          "references": train.references[i],
                          "image": torch.from_numpy(np.ascontiguousarray(train.images[i].transpose(2, 0, 1)))})
        return functools.partial(collate_images, pad_id=model.tokenizer.pad_id)(items)

    def src_of(b: dict):
        images = b["images"].to(device)
        if args.fine_tune:
            return images
        with torch.no_grad():  # the feature cache's values
            was = model.training
            model.eval()
            enc = model.encode(images)
            model.train(was)
        return enc

    timings: dict[str, list[float]] = {"step_s": [], "sample_s": [], "reward_s": [], "forward_backward_s": []}
    if args.mode == "scst":
        reward = CaptionReward.for_training_data(args.data, "train", train.references, lang=lang)
        objective = SelfCritical(reward, samples=args.samples, baseline=args.baseline, max_len=args.max_len)
        # split the step's time: wrap the parts the objective calls
        gen, score = model.generate, reward.__call__

        def timed(fn, key):
            def inner(*a, **k):
                sync()
                t = time.perf_counter()
                out = fn(*a, **k)
                sync()
                parts[key] += time.perf_counter() - t
                return out
            return inner

        model.generate = timed(gen, "sample_s")
        objective.reward = timed(score, "reward_s")
    else:
        objective = CrossEntropy()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    batches = [batch() for _ in range(args.warmup + args.steps)]
    srcs = [src_of(b) for b in batches]
    base_kib = _status_kib("RssAnon")
    peak = [base_kib]
    stop = threading.Event()

    def sample_memory() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kib("RssAnon"))
            stop.wait(0.01)

    watcher = threading.Thread(target=sample_memory, daemon=True)
    watcher.start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for k, (b, src) in enumerate(zip(batches, srcs)):
        parts = {"sample_s": 0.0, "reward_s": 0.0}
        sync()
        t0 = time.perf_counter()
        if args.mode == "scst":
            out = objective(model, src, b["references"])
        else:
            out = objective(model, src, b["captions"].to(device), b["lengths"].to(device), b["image_rows"].to(device))
        loss = sum(v for key, v in out.items() if key.startswith("loss"))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        total = time.perf_counter() - t0
        if k >= args.warmup:
            timings["step_s"].append(total)
            if args.mode == "scst":
                timings["sample_s"].append(parts["sample_s"])
                timings["reward_s"].append(parts["reward_s"])
                timings["forward_backward_s"].append(total - parts["sample_s"] - parts["reward_s"])
    stop.set()
    watcher.join()
    result = {"mode": args.mode, "rows_per_step": n_images * (args.samples if args.mode == "scst" else
                                                                train.captions_per_image),
              "images_per_step": n_images}
    for key, values in timings.items():
        if values:
            result[key] = round(statistics.median(values), 4)
    if device.type == "cuda":
        result["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        result["peak_mib"] = round((peak[0] - base_kib) / 1024, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="demo_out/run/best")
    p.add_argument("--data", default="demo_out/data")
    p.add_argument("--batch-size", type=int, default=80, help="caption rows per step (default: 80, the recipe's)")
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--baseline", choices=["mean", "greedy"], default="mean")
    p.add_argument("--max-len", type=int, default=20, help="longest sampled caption (the recipe's val_max_len)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fine-tune", action="store_true", help="images through the image model (default: frozen features)")
    p.add_argument("--mode", choices=["xe", "scst"], default=None, help=argparse.SUPPRESS)  # the child's
    args = p.parse_args()
    if args.mode is not None:
        print(json.dumps(child(args)))
        return
    results = {}
    for mode in ("xe", "scst"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {"checkpoint": args.checkpoint, "device": args.device, "threads": args.threads, "batch_size": args.batch_size,
           "samples": args.samples, "baseline": args.baseline, "max_len": args.max_len, "fine_tune": args.fine_tune,
           "steps": args.steps, "machine": platform.processor() or platform.machine(), **results,
           "scst_over_xe_time": round(results["scst"]["step_s"] / results["xe"]["step_s"], 2)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
