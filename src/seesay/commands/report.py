"""`seesay report`: one self-contained HTML page of captions, references, scores and attention."""

from __future__ import annotations

import argparse

HELP = "write an HTML report (images embedded) of captions, references, per-image scores and attention"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. RUN_DIR/best)")
    parser.add_argument("--data", required=True, help="prepared dataset directory (seesay prepare)")
    parser.add_argument("--split", default="test", help="split to report on")
    parser.add_argument("--num-images", type=int, default=50, help="images in the report (0 = the whole split)")
    parser.add_argument("--seed", type=int, default=None, help="pick a random sample with this seed (default: the first images)")
    parser.add_argument("--output", "-o", default="report.html", help="HTML file to write")
    parser.add_argument("--beam-size", type=int, default=3, help="beam size (1 = greedy)")
    parser.add_argument("--max-length", type=int, default=50, help="longest caption in tokens")
    parser.add_argument("--length-penalty", type=float, default=0.0, help="GNMT length penalty alpha for beam search (0 = none)")
    parser.add_argument("--sort-metric", default="CIDEr", help="per-image score that ranks the images (worst half first, then best)")
    parser.add_argument("--batch-size", type=int, default=32, help="images decoded at once")
    parser.add_argument("--title", default=None, help="page title (default: 'seesay report: SPLIT split')")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress display (a bar on a terminal, a line every 30 s in logs)")


def run(args: argparse.Namespace) -> int:
    from seesay.viz.report import write_report

    s = write_report(
        args.checkpoint,
        args.data,
        args.output,
        split=args.split,
        num_images=args.num_images,
        beam_size=args.beam_size,
        max_len=args.max_length,
        length_penalty=args.length_penalty,
        batch_size=args.batch_size,
        sort_metric=args.sort_metric,
        seed=args.seed,
        device=args.device,
        progress=not args.no_progress,
        title=args.title,
    )
    scores = ", ".join(f"{k} {v:.3f}" for k, v in s.corpus.items())
    print(f"wrote {s.output}: {s.num_images} images ({scores})")
    return 0
