"""`seesay prepare`: turn a dataset into the prepared form training reads."""

from __future__ import annotations

import argparse

HELP = "prepare a dataset (karpathy, coco, pairs, aichallenger) for training: resized images, vocabulary, captions"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", required=True, choices=("karpathy", "coco", "pairs", "aichallenger"),
                   help="annotation format of the dataset")
    p.add_argument("--annotations", default=None,
                   help="annotation JSON (karpathy: dataset_*.json; pairs: [{image, text}]; aichallenger: caption JSON)")
    p.add_argument("--images", default=None, help="image root folder (karpathy, pairs, aichallenger); None: the folder of --annotations")
    p.add_argument("--coco-dir", default=None,
                   help="COCO folder with annotations/captions_{train,val}2014.json, train2014/, val2014/ "
                        "(and optionally dataset_coco.json for Karpathy's split)")
    p.add_argument("--output", required=True, help="DATA_DIR to write (built in DATA_DIR.partial, renamed at the end)")
    p.add_argument("--keep-restval", action="store_true", help="keep Karpathy's restval images as their own split "
                   "instead of adding them to train")
    p.add_argument("--min-word-freq", type=int, default=5, help="tokens seen fewer times in train become <unk>")
    p.add_argument("--max-len", type=int, default=50, help="captions with more tokens (without <start>/<end>) are dropped")
    p.add_argument("--captions-per-image", type=int, default=5,
                   help="captions kept per image: fewer are filled by seeded sampling of the image's own, more are cut")
    p.add_argument("--image-size", type=int, default=256, help="images are resized (squashed) to this square size")
    p.add_argument("--tokenizer", choices=("word", "char", "byte", "jieba"), default=None,
                   help="tokenizer; None: jieba for aichallenger, word otherwise")
    p.add_argument("--workers", type=int, default=None, help="worker processes; None: all cores")
    p.add_argument("--max-skip-fraction", type=float, default=0.01,
                   help="fail when more than this fraction of the images are bad")
    p.add_argument("--seed", type=int, default=0, help="seed for filling images that have too few captions")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DATA_DIR built from other inputs")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="accept image paths that lead outside --images (../, absolute paths, symlinks out); "
                        "by default such images are skipped unopened")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress display (a bar on a terminal, periodic log lines otherwise)")


def run(args: argparse.Namespace) -> int:
    from seesay.data.prepare import prepare_dataset, summary_line

    manifest = prepare_dataset(
        args.format, args.output, annotations=args.annotations, images=args.images, coco_dir=args.coco_dir,
        keep_restval=args.keep_restval, min_word_freq=args.min_word_freq, max_len=args.max_len,
        captions_per_image=args.captions_per_image, image_size=args.image_size, tokenizer=args.tokenizer,
        workers=args.workers, max_skip_fraction=args.max_skip_fraction, progress=not args.no_progress,
        seed=args.seed, overwrite=args.overwrite, allow_outside_images=args.allow_outside_images,
    )
    print(summary_line(manifest, args.output))
    return 0
