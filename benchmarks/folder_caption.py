"""`seesay caption DIR` throughput: images/s over a folder of photos-sized JPEG files.

Prints one JSON object. `--images` JPEG files (default 1,000; `--size` px, smooth random
pictures, or copies of `--source` images resized) are written to a temporary folder in a few
subfolders; then the whole command runs on it (`seesay caption DIR --output caps.jsonl`: the
walk, parallel reading and resizing, batched decoding, writing each batch) with the demo-size
model (small_cnn 64 px + soft attention, randomly initialised unless `--checkpoint`), once per
`--workers` value. Captions end when the model says `<end>` or at `--max-length`.

    python benchmarks/folder_caption.py                                  # 1,000 images, workers 0 and 2
    python benchmarks/folder_caption.py --images 100 --workers 2        # quick check
    python benchmarks/folder_caption.py --checkpoint RUN_DIR/best --source shapes_raw/images
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def write_images(folder: Path, n: int, size: int, source: str | None) -> None:
    from PIL import Image

    from seesay.caption import walk_images

    rng = np.random.default_rng(0)
    sources = [it.path for it in walk_images(source)] if source else []
    yy, xx = np.mgrid[0:size, 0:size * 4 // 3].astype(np.float32) / size
    for i in range(n):
        sub = folder / f"part{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        if sources:
            img = Image.open(sources[i % len(sources)]).convert("RGB").resize((size * 4 // 3, size))
        else:
            a, b, c = rng.uniform(0, 6, 3)
            rgb = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * xx * yy + a)], -1)
            noise = rng.normal(0, 0.05, rgb.shape)
            img = Image.fromarray(np.clip((rgb + 1 + noise) * 127.5, 0, 255).astype(np.uint8))
        img.save(sub / f"{i:06d}.jpg", quality=90)


def demo_checkpoint(folder: Path) -> Path:
    from seesay.checkpoint import save_checkpoint
    from seesay.data.tokenize import SPECIALS, Vocab
    from seesay.demo import DEMO_RECIPE, PREPARED_SIZE
    from seesay.model import build_model

    torch.manual_seed(0)
    vocab = Vocab([*SPECIALS, *[f"w{i}" for i in range(56)]])
    enc = {k: v for k, v in DEMO_RECIPE["encoder"].items() if k not in ("fine_tune", "lr")}
    dec = {k: v for k, v in DEMO_RECIPE["decoder"].items() if k != "lr"}
    model = build_model({"encoder": enc, "decoder": {**dec, "vocab_size": len(vocab)}}, tokenizer=vocab,
                        image_size=PREPARED_SIZE).eval()
    return save_checkpoint(folder / "best", model=model, config={})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="number of image files")
    parser.add_argument("--size", type=int, default=480, help="image height in px (width 4/3 of it)")
    parser.add_argument("--source", default=None, help="a folder of images to copy (resized) instead of drawing")
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint (default: the demo's sizes, random)")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="--workers values to time")
    parser.add_argument("--batch-size", type=int, default=32, help="--batch-size")
    parser.add_argument("--beam-size", type=int, default=3, help="--beam-size")
    parser.add_argument("--max-length", type=int, default=20, help="--max-length")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from seesay import cli

    result = {"device": platform.processor() or "cpu", "torch": torch.__version__, "threads": args.threads,
              "images": args.images, "image_px": [args.size * 4 // 3, args.size], "batch_size": args.batch_size,
              "beam_size": args.beam_size, "max_length": args.max_length, "results": {}}
    with tempfile.TemporaryDirectory(prefix="seesay-folder-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_images(root / "photos", args.images, args.size, args.source)
        result["write_images_s"] = round(time.perf_counter() - t0, 1)
        ckpt = args.checkpoint or str(demo_checkpoint(root / "run"))
        for w in args.workers:
            out = root / f"caps-{w}.jsonl"
            t0 = time.perf_counter()
            code = cli.main(["caption", "--checkpoint", ckpt, str(root / "photos"), "--output", str(out),
                             "--workers", str(w), "--batch-size", str(args.batch_size), "--beam-size",
                             str(args.beam_size), "--max-length", str(args.max_length), "--no-progress",
                             "--device", "cpu"])
            s = time.perf_counter() - t0
            lines = len(out.read_text().splitlines()) if out.exists() else 0
            result["results"][f"workers_{w}"] = {"exit": code, "captioned": lines, "seconds": round(s, 2),
                                                 "images_per_s": round(lines / s, 1)}
            print(f"workers {w}: {result['results'][f'workers_{w}']}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
