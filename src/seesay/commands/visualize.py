"""`seesay visualize`: caption one image and draw the attention over it, word by word."""

from __future__ import annotations

import argparse

HELP = "caption an image and save a figure of where the model looked for each word"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. RUN_DIR/best)")
    parser.add_argument("--image", required=True, help="image file to caption")
    parser.add_argument("--output", "-o", required=True, help="figure to write (PNG)")
    parser.add_argument("--beam-size", type=int, default=1, help="beam size (1 = greedy); the chosen beam's attention is drawn")
    parser.add_argument("--max-length", type=int, default=50, help="longest caption in tokens")
    parser.add_argument("--length-penalty", type=float, default=0.0, help="GNMT length penalty alpha for beam search (0 = none)")
    parser.add_argument("--cols", type=int, default=5, help="panels per row; long captions wrap onto more rows")
    parser.add_argument("--layer", type=int, default=None,
                        help="transformer/titans: which layer's cross-attention (averaged over heads) to draw; "
                        "0-based, negative from the end (default: the last layer)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def run(args: argparse.Namespace) -> int:
    from seesay.viz.visualize import visualize_image

    res = visualize_image(
        args.checkpoint,
        args.image,
        args.output,
        beam_size=args.beam_size,
        max_len=args.max_length,
        length_penalty=args.length_penalty,
        cols=args.cols,
        device=args.device,
        layer=args.layer,
    )
    print(f"{res.image}: {res.caption}")
    print(f"attention map: {res.output}")
    return 0
