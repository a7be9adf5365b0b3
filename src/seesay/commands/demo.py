"""`seesay demo`: make the built-in dataset, train a captioner on the CPU, evaluate and explain it."""

from __future__ import annotations

import argparse

HELP = "the whole pipeline on the built-in shapes dataset: make, prepare, train (~5 CPU minutes), evaluate"

DESCRIPTION = """\
Draws the built-in shapes dataset, prepares it, trains a small CNN + soft-attention captioner
on a time budget, captions the test split, prints its scores beside a baseline that gives every
test image the most common training caption, and captions a few test images with attention maps.
Re-running reuses the dataset; training starts fresh unless --resume.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from seesay.demo import DEFAULT_MINUTES, DEFAULT_NUM_IMAGES, DEFAULT_THREADS

    parser.description = DESCRIPTION
    parser.add_argument("--output", "-o", default="demo_out", help="directory for the dataset, run and results")
    parser.add_argument("--minutes", type=float, default=DEFAULT_MINUTES,
                        help="training budget in wall-clock minutes (the other steps add about a minute)")
    parser.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES,
                        help="shapes images to draw (80%% train, 10%% val, 10%% test)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the dataset and the training run")
    parser.add_argument("--resume", action="store_true",
                        help="continue training OUTPUT/run from its last epoch instead of starting fresh")
    parser.add_argument("--metrics", choices=["auto", "fast", "full"], default="auto",
                        help="fast: BLEU/ROUGE-L/CIDEr in Python; full: adds METEOR (java); auto: full when java works")
    parser.add_argument("--beam-size", type=int, default=3, help="beam size for the test captions")
    parser.add_argument("--samples", type=int, default=4, help="test images to show with captions and attention maps")
    parser.add_argument("--no-attention", action="store_true", help="do not draw attention maps")
    parser.add_argument("--config", default=None, help="a YAML recipe applied over the demo's built-in recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one recipe value, e.g. --set decoder.decoder_dim=128 (repeatable)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                        help="torch CPU threads (0: torch's default); one is fastest for this small model "
                             "on a busy machine")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from seesay.demo import format_summary, run_demo

    result = run_demo(
        args.output,
        minutes=args.minutes,
        num_images=args.num_images,
        seed=args.seed,
        progress=not args.no_progress,
        resume=args.resume,
        metrics=args.metrics,
        beam_size=args.beam_size,
        num_samples=args.samples,
        attention=not args.no_attention,
        config=args.config,
        overrides=args.overrides,
        threads=args.threads,
    )
    print(format_summary(result))
    return 0
