"""`seesay synth shapes`: write the built-in drawn-shapes dataset (Karpathy format)."""

from __future__ import annotations

import argparse

HELP = "write a built-in synthetic captioning dataset (drawn shapes, Karpathy format)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=["shapes"], help="which synthetic dataset to write")
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        default=argparse.SUPPRESS,
        help="directory to write (dataset_shapes.json, images/)",
    )
    parser.add_argument("--num-images", type=int, default=1000, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of images in val")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="fraction of images in test")
    parser.add_argument("--format", choices=["karpathy", "imagefolder"], default="karpathy",
                        help="karpathy: captioned scenes (dataset_shapes.json); imagefolder: one object per image in "
                             "OUTPUT/{train,val,test}/<colour>_<shape>/, for classification (default: karpathy)")


def run(args: argparse.Namespace) -> int:
    from seesay.data.synth import HELD_OUT_PAIRS, make_shapes, make_shapes_imagefolder, split_counts

    if args.format == "imagefolder":
        out = make_shapes_imagefolder(args.output, num_images=args.num_images, seed=args.seed,
                                      image_size=args.image_size, val_fraction=args.val_fraction,
                                      test_fraction=args.test_fraction)
        counts = {s: sum(1 for _ in (out / s).glob("*/*.png")) for s in ("train", "val", "test")}
        print(f"wrote {args.num_images} images ({args.image_size}x{args.image_size}; train {counts['train']} / "
              f"val {counts['val']} / test {counts['test']}; one object each, class = colour and shape) to {out}\n"
              f"next: seesay prepare --format imagefolder --images {out} --output DATA_DIR")
        return 0

    path = make_shapes(
        args.output,
        num_images=args.num_images,
        seed=args.seed,
        image_size=args.image_size,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
    )
    c = split_counts(path)
    held = ", ".join(f"{col} {shape}" for col, shape in HELD_OUT_PAIRS)
    print(
        f"wrote {args.num_images} images ({args.image_size}x{args.image_size}; train {c['train']} / "
        f"val {c['val']} / test {c['test']}, 5 captions each) to {path.parent / 'images'}\n"
        f"annotations: {path}\n"
        f"held out of train (appear in test): {held}\n"
        f"next: seesay prepare --format karpathy --annotations {path} --images {path.parent} --output DATA_DIR"
    )
    return 0
