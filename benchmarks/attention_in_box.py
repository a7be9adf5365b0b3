"""Does attention mean something? Peak-in-box rate of a soft-attention model on the shapes data.

For every colour or shape word a model emits on the test split of the built-in shapes dataset
("red", "circle", "circles"), take that step's attention over the encoder grid (the region
part; a sentinel column is dropped), find its peak cell, and check whether the cell's centre,
scaled to image pixels, lies inside the box of an object of that colour / shape in the image.
Words naming an object that is not in the image (wrong captions) are counted apart and do not
enter the rate.

Baseline: a peak drawn uniformly at random over the grid hits with probability equal to the
fraction of grid cells whose centre lies inside a matching box; averaged over the same words,
that is the rate chance would get. Also reported: the attention *mass* inside matching boxes
(the region weights of those cells summed) against the same area fraction.

Without --checkpoint the script builds everything: `make_shapes` -> `prepare_dataset`
(karpathy format) -> `train_captioner` (small_cnn encoder trained with the decoder, soft
attention) and then measures. Prints one JSON object.

    python benchmarks/attention_in_box.py --workdir /tmp/aib --num-images 1500 --epochs 12 --threads 1
    python benchmarks/attention_in_box.py --checkpoint RUN_DIR/best --data DATA_DIR

Defaults: 96 px inputs, small_cnn's 12 x 12 grid, soft attention with alpha_c = 0 (the
doubly stochastic term, 1.0 in Xu et al., pushes every cell to receive attention over the
caption and so spreads each word's attention; with it the peak-in-box rate drops a lot,
see docs/visualize.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a trained checkpoint (skip building and training)")
    p.add_argument("--data", help="the prepared shapes dataset the checkpoint was trained on")
    p.add_argument("--workdir", default="/tmp/seesay-attention-in-box", help="where data and the run go")
    p.add_argument("--num-images", type=int, default=1500, help="shapes images to generate")
    p.add_argument("--synth-size", type=int, default=128, help="generated image side in pixels")
    p.add_argument("--image-size", type=int, default=96, help="prepared image side (the model's input)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=80, help="captions per step")
    p.add_argument("--decoder", default="soft_attention", help="soft_attention or adaptive_attention")
    p.add_argument("--decoder-dim", type=int, default=256)
    p.add_argument("--width", type=int, default=64, help="small_cnn feature width")
    p.add_argument("--encoded-size", type=int, default=12, help="attention grid side (small_cnn: image-size / 8)")
    p.add_argument("--alpha-c", type=float, default=0.0,
                   help="doubly stochastic attention regularisation weight (1.0 spreads attention: see the doc)")
    p.add_argument("--lr", type=float, default=2e-3, help="decoder learning rate")
    p.add_argument("--encoder-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--split", default="test")
    p.add_argument("--max-images", type=int, default=0, help="measure on at most N images (0 = all)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers while training")
    p.add_argument("--resume", action="store_true", help="continue the run in WORKDIR/run up to --epochs")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default; 1 is much faster on a busy shared CPU)")
    return p.parse_args(argv)


def build_and_train(args: argparse.Namespace) -> tuple[Path, Path, dict[str, Any]]:
    from seesay.config import Config
    from seesay.data.prepare import prepare_dataset
    from seesay.data.synth import make_shapes
    from seesay.train.caption_task import train_captioner

    work = Path(args.workdir)
    synth_dir, data_dir, run_dir = work / "synth", work / "data", work / "run"
    t0 = time.perf_counter()
    if not (data_dir / "manifest.json").is_file():
        ann = make_shapes(synth_dir, num_images=args.num_images, seed=args.seed, image_size=args.synth_size)
        prepare_dataset("karpathy", data_dir, annotations=ann, images=synth_dir, image_size=args.image_size,
                        min_word_freq=1, progress=False)
    t1 = time.perf_counter()
    cfg = Config()
    cfg.data.path = str(data_dir)
    cfg.data.workers = args.workers
    cfg.encoder.name = "small_cnn"
    cfg.encoder.fine_tune = True
    cfg.encoder.lr = args.encoder_lr
    cfg.encoder.options = {"width": args.width, "encoded_size": args.encoded_size, "image_size": args.image_size}
    cfg.decoder.name = args.decoder
    cfg.decoder.lr = args.lr
    cfg.decoder.options = {"embed_dim": 128, "attention_dim": 128, "decoder_dim": args.decoder_dim, "dropout": 0.3,
                           "alpha_c": args.alpha_c}
    cfg.train.output = str(run_dir)
    cfg.train.epochs = args.epochs
    cfg.train.batch_size = args.batch_size
    cfg.train.seed = args.seed
    cfg.train.device = args.device
    cfg.train.progress = False
    cfg.train.tensorboard = False
    cfg.train.val_max_len = 30
    cfg.train.resume = args.resume
    train_captioner(cfg)
    t2 = time.perf_counter()
    return run_dir / "best", data_dir, {"prepare_s": round(t1 - t0, 1), "train_s": round(t2 - t1, 1)}


def word_targets() -> tuple[set[str], dict[str, str]]:
    from seesay.data.synth import COLORS, PLURALS, SHAPES

    shape_of = {s: s for s in SHAPES} | {PLURALS[s]: s for s in SHAPES}
    return set(COLORS), shape_of


def measure(checkpoint: str | Path, data_dir: str | Path, *, split: str = "test", device: str = "auto",
            max_images: int = 0, batch_size: int = 64) -> dict[str, Any]:
    from seesay.checkpoint import load_checkpoint
    from seesay.data.store import open_prepared
    from seesay.decoding import Greedy
    from seesay.viz.attention import split_attention
    from seesay.viz.visualize import resolve_device

    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, map_location=dev)
    model, vocab = ckpt.model, ckpt.vocab
    store = open_prepared(data_dir).split(split)
    n = len(store) if max_images <= 0 else min(max_images, len(store))
    colours, shape_of = word_targets()
    stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        imgs = np.stack([store.image(i) for i in idx])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous().to(dev)
        with torch.no_grad():
            enc = model.encode(x)
            res = model.generate(enc, Greedy(), max_len=30)
        if res.attention is None:
            raise SystemExit("this model returns no attention")
        h, w = enc.grid_hw
        att = res.attention.float().cpu().numpy()
        for j, i in enumerate(idx):
            extra = store.meta[i].get("extra") or {}
            objects = extra.get("objects") or []
            W, H = extra.get("orig_size") or [extra.get("width"), extra.get("height")]
            # grid cell centres in original pixels
            cx = (np.arange(w) + 0.5) * W / w
            cy = (np.arange(h) + 0.5) * H / h
            length = int(res.lengths[j])
            regions, _ = split_attention(att[j, :length], (h, w))
            for t, tok in enumerate(res.tokens[j, :length].tolist()):
                word = vocab.itos[tok]
                if word in colours:
                    kind, match = "colour", [o for o in objects if o["color"] == word]
                elif word in shape_of:
                    kind, match = "shape", [o for o in objects if o["shape"] == shape_of[word]]
                else:
                    continue
                s = stats[kind]
                s["words"] += 1
                if not match:
                    s["absent_object"] += 1
                    continue
                inside = np.zeros((h, w), dtype=bool)
                for o in match:
                    x0, y0, x1, y1 = o["box"]
                    inside |= ((cy[:, None] >= y0) & (cy[:, None] < y1)) & ((cx[None, :] >= x0) & (cx[None, :] < x1))
                near = _dilate(inside)
                r, c = np.unravel_index(int(np.argmax(regions[t])), (h, w))
                s["measured"] += 1
                s["hits"] += float(inside[r, c])
                s["baseline"] += float(inside.mean())
                s["mass"] += float(regions[t][inside].sum())
                s["near_hits"] += float(near[r, c])
                s["near_baseline"] += float(near.mean())
    out: dict[str, Any] = {}
    total: dict[str, float] = defaultdict(float)
    for kind in ("colour", "shape"):
        s = stats[kind]
        for k, v in s.items():
            total[k] += v
        out[kind] = _summary(s)
    out["all"] = _summary(total)
    out["images"] = n
    out["grid"] = [int(h), int(w)]
    out["decoder"] = model.spec().get("decoder", {}).get("name")
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Cells within one cell (8-neighbourhood) of a True cell."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)


def _summary(s: dict[str, float]) -> dict[str, Any]:
    m = s.get("measured", 0.0)
    return {
        "words": int(s.get("words", 0)),
        "measured": int(m),
        "absent_object": int(s.get("absent_object", 0)),
        "peak_in_box_rate": round(s.get("hits", 0.0) / m, 4) if m else None,
        "uniform_random_peak_rate": round(s.get("baseline", 0.0) / m, 4) if m else None,
        "attention_mass_in_box": round(s.get("mass", 0.0) / m, 4) if m else None,
        # secondary: peak within one grid cell of a matching box, and chance for that
        "peak_within_one_cell_rate": round(s.get("near_hits", 0.0) / m, 4) if m else None,
        "uniform_random_within_one_cell_rate": round(s.get("near_baseline", 0.0) / m, 4) if m else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    timing: dict[str, Any] = {}
    if args.checkpoint:
        if not args.data:
            raise SystemExit("--checkpoint needs --data (the prepared dataset it was trained on)")
        ckpt, data = Path(args.checkpoint), Path(args.data)
    else:
        ckpt, data, timing = build_and_train(args)
    t0 = time.perf_counter()
    result = measure(ckpt, data, split=args.split, device=args.device, max_images=args.max_images)
    timing["measure_s"] = round(time.perf_counter() - t0, 1)
    result["checkpoint"] = str(ckpt)
    result["timing"] = timing
    metrics = Path(ckpt).parent / "metrics.jsonl"
    if metrics.is_file():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        if lines:
            result["final_val"] = lines[-1].get("val")
            result["epochs"] = len(lines)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
