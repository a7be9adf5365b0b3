"""`seesay plot`: training curves of one or more runs on one chart."""

from __future__ import annotations

import argparse

HELP = "plot loss, top-5 accuracy and validation metrics per epoch for one or more runs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl (written by seesay train)")
    parser.add_argument("--output", "-o", default="curves.png", help="figure to write (.png, .pdf or .svg)")
    parser.add_argument("--labels", nargs="+", default=None, help="legend names, one per run (default: the run directory names)")
    parser.add_argument("--title", default=None, help="title above the chart")
    parser.add_argument("--cols", type=int, default=3, help="subplots per row")


def run(args: argparse.Namespace) -> int:
    from seesay.errors import SeesayError
    from seesay.files import check_output
    from seesay.viz.curves import plot_runs

    if args.cols < 1:
        raise SeesayError(f"--cols must be >= 1, not {args.cols}")
    check_output(args.output)
    out = plot_runs(args.runs, args.output, labels=args.labels, title=args.title, cols=args.cols)
    print(f"wrote {out}")
    return 0
