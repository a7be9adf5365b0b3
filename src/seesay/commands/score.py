"""`seesay score`: score any COCO-format results file with the COCO caption metrics."""

from __future__ import annotations

import argparse

HELP = "score a COCO-format results file against COCO annotations or a Karpathy split (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", required=True, help='results JSON: [{"image_id": ..., "caption": "..."}]')
    p.add_argument(
        "--references",
        required=True,
        help="COCO captions annotation JSON, Karpathy split JSON (with --split), AI Challenger JSON "
        "or {image_id: [captions]}",
    )
    p.add_argument("--split", default=None, help="Karpathy split to score against (train, val, test)")
    p.add_argument(
        "--metrics",
        choices=("fast", "full"),
        default="fast",
        help="fast: BLEU-1..4, ROUGE-L, CIDEr-D without Java; full: also METEOR and SPICE (needs java)",
    )
    p.add_argument("--lang", choices=("en", "zh"), default="en", help="zh: jieba words, no PTB tokenisation")
    p.add_argument(
        "--tokenizer",
        choices=("auto", "python", "java"),
        default="auto",
        help="PTB tokenizer: auto = the Java one (as pycocoevalcap) for --metrics full when java exists, else Python",
    )
    p.add_argument(
        "--spice-models",
        default=None,
        help="directory with stanford-corenlp-3.6.0.jar and -models.jar for SPICE (or set SEESAY_SPICE_MODELS)",
    )
    p.add_argument("--output", default=None, metavar="METRICS_JSON",
                   help="where to write the corpus scores (default: beside the results file, "
                        "RESULTS.metrics.json: captions.json -> captions.metrics.json)")
    p.add_argument("--per-image", default=None, help="also write per-image scores here, worst first")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seesay.metrics.io import format_report, score_files

    output = args.output or str(Path(args.results).with_suffix(".metrics.json"))
    report = score_files(
        args.results,
        args.references,
        split=args.split,
        full=args.metrics == "full",
        lang=args.lang,
        tokenizer=args.tokenizer,
        spice_models=args.spice_models,
        output=output,
        per_image=args.per_image,
    )
    print(format_report(report))
    print(f"wrote {output}" + (f" and {args.per_image}" if args.per_image else ""))
    return 0
