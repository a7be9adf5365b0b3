"""`seesay prepare`: turn a dataset into the prepared form training reads."""

from __future__ import annotations

import argparse

HELP = ("prepare a dataset (karpathy, coco, pairs, aichallenger, imagefolder, imagenet, sun397, redcaps) for "
        "training: resized images, vocabulary, captions, task")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", required=True,
                   choices=("karpathy", "coco", "pairs", "aichallenger", "imagefolder", "imagenet", "sun397", "redcaps",
                            "webdataset", "shapes-regions", "coco-instances"),
                   help="annotation format of the dataset (imagefolder, imagenet, sun397, redcaps: the dataset "
                        "folder is --images; shapes-regions: the built-in shapes' boxes, --images the synth folder; "
                        "coco-instances: --coco-dir's instances files; see docs/vlm.md)")
    p.add_argument("--annotations", default=None,
                   help="annotation JSON (karpathy: dataset_*.json; pairs: [{image, text}]; aichallenger: caption JSON)")
    p.add_argument("--images", default=None, help="image root folder (karpathy, pairs, aichallenger); None: the folder of --annotations")
    p.add_argument("--coco-dir", default=None,
                   help="COCO folder with annotations/captions_{train,val}2014.json, train2014/, val2014/ "
                        "(and optionally dataset_coco.json for Karpathy's split)")
    p.add_argument("--output", required=True, help="DATA_DIR to write (built in DATA_DIR.partial, renamed at the end)")
    p.add_argument("--keep-restval", action="store_true", help="keep Karpathy's restval images as their own split "
                   "instead of adding them to train")
    p.add_argument("--min-word-freq", type=int, default=None,
                   help="tokens seen fewer times in train become <unk> (default: 1 for classification formats, else 5)")
    p.add_argument("--max-len", type=int, default=50, help="captions with more tokens (without <start>/<end>) are dropped")
    p.add_argument("--captions-per-image", type=int, default=None,
                   help="captions kept per image: fewer are filled by seeded sampling of the image's own, more are cut "
                        "(default: 1 for imagefolder, imagenet, sun397, redcaps and --task pretrain, else 5)")
    p.add_argument("--task", choices=("caption", "classify", "pretrain", "region", "grounding"), default=None,
                   help="the task recorded in the manifest (default: classify for imagefolder, imagenet, sun397; "
                        "region for shapes-regions and coco-instances, which also take grounding; caption otherwise)")
    p.add_argument("--loc-vocab-size", type=int, default=None,
                   help="shapes-regions, coco-instances: location bins per box coordinate, the <loc_i> tokens added "
                        "to the SentencePiece tokenizer (default: 1000)")
    p.add_argument("--prompt", default=None,
                   help='input text of prompt-reading models (default: "What does the image describe?"; '
                        "none for pretrain)")
    p.add_argument("--partition", type=int, default=None,
                   help="sun397: use Training_NN.txt / Testing_NN.txt (default: a deterministic split)")
    p.add_argument("--redcaps-text", choices=("caption", "raw_caption"), default="caption",
                   help="redcaps: which annotation text is the caption (default: caption)")
    p.add_argument("--output-format", choices=("store", "shards"), default="store",
                   help="store: memory-mapped arrays; shards: the train split as WebDataset tars, the other splits "
                        "in the store (docs/shards.md)")
    p.add_argument("--shard-size", type=int, default=1000, help="--output-format shards: images per shard")
    p.add_argument("--shards", default=None,
                   help="--format webdataset: img2dataset-style shards, e.g. 'corpus/{00000..00999}.tar', "
                        "http(s) URLs or pipe: commands; read in place, not copied (default: none)")
    p.add_argument("--val-shards", default=None,
                   help="--format webdataset: shards for the val split (default: the last of --shards)")
    p.add_argument("--image-size", type=int, default=256, help="images are resized (squashed) to this square size")
    p.add_argument("--tokenizer", choices=("word", "char", "byte", "jieba", "sentencepiece"), default=None,
                   help="tokenizer; None: jieba for aichallenger, word otherwise; sentencepiece: trained on the "
                        "training captions (--vocab-size) or loaded (--tokenizer-model), for the t5 decoder")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="--tokenizer sentencepiece: pieces to train, specials and 100 <extra_id_*> sentinels "
                        "included (a soft limit on small corpora) (default: none)")
    p.add_argument("--tokenizer-model", default=None,
                   help="--tokenizer sentencepiece: an existing model instead of training one: a T5 directory "
                        "(its spiece.model) or a .model file (default: none)")
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
        vocab_size=args.vocab_size, tokenizer_model=args.tokenizer_model,
        workers=args.workers, max_skip_fraction=args.max_skip_fraction, progress=not args.no_progress,
        seed=args.seed, overwrite=args.overwrite, allow_outside_images=args.allow_outside_images,
        task=args.task, prompt=args.prompt, loc_vocab_size=args.loc_vocab_size, partition=args.partition, redcaps_text=args.redcaps_text,
        output_format=args.output_format, shard_size=args.shard_size, shards=args.shards, val_shards=args.val_shards,
    )
    print(summary_line(manifest, args.output))
    return 0
