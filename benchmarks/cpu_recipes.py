"""Which CPU recipe for photo-like images: configs/cpu_efficientnet.yaml against configs/shapes_demo.yaml.

Draws a held-out-style dataset that neither recipe was tuned on: one letter or digit per image
(PIL's scalable default font), in one of 8 colours, at a random size, position and angle, over a
noisy two-colour background, at 160 px; five captions per image from templates naming the
character and its colour ("a red letter k", "the digit 7 in blue", ...). Each recipe trains for
the same wall-clock budget on that data (the EfficientNet recipe at 160 px with cached frozen
features, the small-CNN recipe at 64 px trained from scratch, as shipped), then the test split is
captioned with beam 3 and scored (fast metrics) beside the most-common-training-caption baseline.
Prints JSON.

    python benchmarks/cpu_recipes.py --work /tmp/cpu_recipes --minutes 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
           "purple": (140, 60, 180), "orange": (240, 130, 30), "black": (20, 20, 20), "white": (245, 245, 245)}
DIGITS = {str(i): w for i, w in enumerate("zero one two three four five six seven eight nine".split())}


def _captions(ch: str, colour: str) -> list[str]:
    if ch.isdigit():
        name, kind = ch, "digit"
        alt = DIGITS[ch]
    else:
        name, kind = ch.lower(), "letter"
        alt = f"{'capital' if ch.isupper() else 'small'} {ch.lower()}"
    return [f"a {colour} {kind} {name}", f"the {kind} {name} in {colour}", f"a {colour} {alt}",
            f"{kind} {name} written in {colour}", f"a picture of a {colour} {kind} {name}"]


def draw(out: Path, n: int, size: int, seed: int) -> Path:
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    rng = random.Random(seed)
    npr = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    chars = string.ascii_letters + string.digits
    pairs = []
    for i in range(n):
        ch = rng.choice(chars)
        colour = rng.choice(list(COLOURS))
        bg = [c for c in COLOURS if c != colour]
        a, b = (np.array(COLOURS[rng.choice(bg)], dtype=np.float32) for _ in range(2))
        t = npr.random((size, size, 1), dtype=np.float32)
        base = (a * 0.35 + b * 0.35 + 40) * (0.8 + 0.4 * t)  # muted, noisy background
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
        glyph = Image.new("L", (size, size), 0)
        font = ImageFont.load_default(size=rng.randint(size // 3, size * 2 // 3))
        ImageDraw.Draw(glyph).text((size // 2 + rng.randint(-size // 8, size // 8),
                                    size // 2 + rng.randint(-size // 8, size // 8)), ch, fill=255, font=font,
                                   anchor="mm")
        glyph = glyph.rotate(rng.uniform(-25, 25), resample=Image.BICUBIC)
        img.paste(Image.new("RGB", (size, size), COLOURS[colour]), (0, 0), glyph)
        name = f"{i:05d}.png"
        img.save(out / "images" / name)
        split = "test" if i % 10 == 0 else "val" if i % 10 == 1 else "train"
        pairs += [{"image": name, "text": c, "split": split} for c in _captions(ch, colour)]
    path = out / "pairs.json"
    path.write_text(json.dumps(pairs))
    return path


def run_recipe(name: str, recipe: Path, data: Path, out: Path, minutes: float) -> dict:
    from seesay.commands.train import build_config
    from seesay.decoding import Beam
    from seesay.evaluate import evaluate_checkpoint
    from seesay.train.caption_task import train_captioner

    args = argparse.Namespace(config=str(recipe), overrides=[f"train.max_minutes={minutes}", "train.epochs=200",
                                                             "train.progress=false", "train.tensorboard=false"],
                              data=str(data), output=str(out), device="cpu")
    cfg = build_config(args)
    t0 = time.perf_counter()
    state = train_captioner(cfg)
    train_s = time.perf_counter() - t0
    ev = evaluate_checkpoint(out / "best", data, split="test", strategy=Beam(3), max_length=20, output=None,
                             device="cpu")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"recipe": name, "train_s": round(train_s, 1), "epochs": len(records),
            "best_val_CIDEr": round(state.best_score, 4),
            "test": {k: round(v, 4) for k, v in ev.report.corpus.items() if v is not None}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working directory (data, runs)")
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--minutes", type=float, default=4.0, help="training budget per recipe")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from seesay.data.prepare import prepare_dataset
    from seesay.demo import baseline_scores

    work = Path(args.work)
    if not (work / "raw" / "pairs.json").is_file():
        draw(work / "raw", args.num_images, 160, args.seed)
    for size in (160, 64):
        if not (work / f"data{size}" / "manifest.json").is_file():
            prepare_dataset("pairs", work / f"data{size}", annotations=work / "raw" / "pairs.json",
                            images=work / "raw" / "images", image_size=size, min_word_freq=1, workers=1,
                            progress=False)
    results = {"images": args.num_images, "minutes": args.minutes, "threads": args.threads,
               "baseline": baseline_scores(work / "data160", metrics="fast")}
    results["baseline"]["scores"] = {k: round(v, 4) for k, v in results["baseline"]["scores"].items()
                                     if v is not None}
    runs = []
    for name, recipe, size in (("cpu_efficientnet", "cpu_efficientnet.yaml", 160),
                               ("shapes_demo", "shapes_demo.yaml", 64)):
        runs.append(run_recipe(name, ROOT / "configs" / recipe, work / f"data{size}", work / f"run_{name}",
                               args.minutes))
    base = results["baseline"]["scores"]["CIDEr"]
    for r in runs:
        r["CIDEr_vs_baseline"] = round(r["test"]["CIDEr"] / base, 2) if base else None
    results["runs"] = runs
    json.dump(results, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
