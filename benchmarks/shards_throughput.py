"""Shards vs the memory-mapped store: read + decode throughput and training captions/s, as JSON.

- "read": samples/s of one epoch of training batches (whole images with their captions,
  `collate_images`) from the sharded DATA_DIR (WebDataset tars of JPEGs: read, JPEG-decoded,
  resized, shuffled through the buffer) and from the store (memory-mapped uint8 rows), with 1, 2
  and 4 DataLoader workers;
- "train": captions/s of `seesay train` with configs/shapes_demo.yaml's model (small CNN trained in
  the loop + soft attention) for one epoch from each, as the loop's own record reports it
  (training time only: set-up and validation excluded).

Both DATA_DIRs are prepared from the same built-in shapes in a temporary folder.

    python benchmarks/shards_throughput.py [--images 1024] [--image-size 64] [--shard-size 128]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def _read_rate(loader, n_images: int, set_epoch=None) -> float:
    if set_epoch is not None:
        set_epoch(0)
    start = time.perf_counter()
    seen = sum(int(b["image_index"].shape[0]) for b in loader)
    elapsed = time.perf_counter() - start
    assert seen >= n_images * 0.9, (seen, n_images)
    return seen / elapsed


def read_throughput(store_dir: Path, shard_dir: Path, workers: list[int], batch: int) -> list[dict]:
    import functools

    from torch.utils.data import DataLoader

    from seesay.data.loader import ImageCaptionDataset, collate_images
    from seesay.data.shards import ShardSplit, shard_loader
    from seesay.data.store import PreparedData

    out = []
    store = PreparedData(store_dir)
    sharded = PreparedData(shard_dir)
    n = int(store.manifest["splits"]["train"]["images"])
    for w in workers:
        ds = ImageCaptionDataset(store, "train")
        loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=w,
                            collate_fn=functools.partial(collate_images, pad_id=0))
        out.append({"source": "store", "workers": w, "samples_per_s": round(_read_rate(loader, n), 1)})
        stream, loader = shard_loader(ShardSplit(sharded), sharded.vocab, batch_size=batch, mode="images",
                                      load_images=True, seed=0, rank=0, world_size=1, workers=w)
        out.append({"source": "shards", "workers": w,
                    "samples_per_s": round(_read_rate(loader, n, stream.set_epoch), 1)})
    return out


def train_throughput(store_dir: Path, shard_dir: Path, root: Path, workers: int) -> list[dict]:
    from seesay.config import load_config
    from seesay.train.caption_task import train_captioner

    out = []
    for name, data in (("store", store_dir), ("shards", shard_dir)):
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "shapes_demo.yaml")
        cfg.data.path, cfg.data.workers = str(data), workers
        cfg.train.output, cfg.train.epochs, cfg.train.device = str(root / f"run-{name}"), 1, "cpu"
        cfg.train.progress, cfg.train.tensorboard, cfg.train.val_max_len = False, False, 8
        cfg.data.val_max_images = 16
        train_captioner(cfg)
        record = json.loads((root / f"run-{name}" / "metrics.jsonl").read_text().splitlines()[-1])
        out.append({"source": name, "workers": workers, "captions_per_s": round(record["captions_per_s"], 1)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024, help="shapes images (about 2/3 go to train)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=32, help="images per batch in the read test")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--train-workers", type=int, default=2)
    p.add_argument("--no-train", action="store_true", help="only the read test")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    from seesay.data.prepare import prepare_dataset
    from seesay.data.synth import make_shapes

    with tempfile.TemporaryDirectory(prefix="seesay-shards-") as tmp:
        root = Path(tmp)
        ann = make_shapes(root / "raw", num_images=args.images, seed=0, image_size=args.image_size)
        kw = dict(annotations=ann, images=root / "raw", image_size=args.image_size, min_word_freq=1, progress=False)
        prepare_dataset("karpathy", root / "store", **kw)
        prepare_dataset("karpathy", root / "shards", output_format="shards", shard_size=args.shard_size, **kw)
        disk = {name: sum(f.stat().st_size for f in (root / name).rglob("*") if f.is_file())
                for name in ("store", "shards")}
        result = {
            "benchmark": "shards_throughput",
            "python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine(),
            "images": args.images, "image_size": args.image_size, "shard_size": args.shard_size,
            "disk_bytes": disk,
            "read": read_throughput(root / "store", root / "shards", args.workers, args.batch),
        }
        if not args.no_train:
            result["train"] = train_throughput(root / "store", root / "shards", root, args.train_workers)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
