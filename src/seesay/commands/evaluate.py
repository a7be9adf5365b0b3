"""`seesay evaluate`: caption a prepared split with a checkpoint and score it like COCO."""

from __future__ import annotations

import argparse

HELP = "caption a prepared split with a checkpoint and score it (COCO metrics, per-image file worst first)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. RUN_DIR/best)")
    p.add_argument("--data", required=True, help="prepared dataset directory (seesay prepare)")
    p.add_argument("--split", default="test", help="split to caption and score")
    p.add_argument("--beam-size", type=int, default=3, help="beam width (1 = greedy)")
    p.add_argument("--length-penalty", type=float, default=0.0, help="beam length penalty (0 = none)")
    p.add_argument("--max-length", type=int, default=50, help="maximum caption length in tokens")
    p.add_argument("--batch-size", type=int, default=32, help="images per decoding batch")
    p.add_argument("--metrics", choices=("fast", "full"), default="fast",
                   help="fast: BLEU-1..4, ROUGE-L, CIDEr-D without Java; full: also METEOR and SPICE")  # fmt: skip
    p.add_argument("--output", default=None, metavar="METRICS_JSON",
                   help="corpus scores (JSON) (default: RUN_DIR/eval-SPLIT/metrics.json beside the checkpoint, "
                        "e.g. runs/sat/eval-test/metrics.json for --checkpoint runs/sat/best)")
    p.add_argument(
        "--results", default=None, help='also write the captions here as [{"image_id", "caption"}]'
    )
    p.add_argument("--num-captions", type=int, default=1, metavar="N",
                   help='N captions per image (the N best beams, N <= --beam-size): the --results entries get '
                        '"captions": [{caption, score}, ...], best first; the metrics score the best')
    p.add_argument("--per-image", default=None, help="also write per-image scores here, worst first (classify "
                   "datasets: JSON lines of image, generated, predicted, closed_set, gold)")
    p.add_argument("--lang", choices=("auto", "en", "zh"), default="auto",
                   help="auto: the data's language (zh for AI Challenger, jieba or Chinese references), else en")  # fmt: skip
    p.add_argument("--tokenizer", choices=("auto", "python", "java"), default="auto",
                   help="PTB tokenizer for English (auto: Java for --metrics full when java exists)")  # fmt: skip
    p.add_argument("--spice-models", default=None,
                   help="directory with the Stanford CoreNLP 3.6.0 jars for SPICE (or SEESAY_SPICE_MODELS)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--limit", type=int, default=None, help="caption only the first N images of the split")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress display (a bar on a terminal, a line every 30 s in logs)")


def run(args: argparse.Namespace) -> int:
    from seesay.decoding import strategy_from_options
    from seesay.errors import SeesayError
    from seesay.evaluate import evaluate_checkpoint
    from seesay.metrics.io import format_report

    if args.beam_size < 1:
        raise SeesayError(f"--beam-size must be >= 1, not {args.beam_size}")
    if args.length_penalty < 0:
        raise SeesayError(f"--length-penalty must be >= 0, not {args.length_penalty}")
    if args.num_captions < 1:
        raise SeesayError(f"--num-captions must be >= 1, not {args.num_captions}")
    if args.num_captions > args.beam_size:
        raise SeesayError(f"--num-captions {args.num_captions} is more than --beam-size {args.beam_size} "
                          f"(beam search keeps {args.beam_size} captions)")
    output = args.output or default_output(args.checkpoint, args.split)
    ev = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        progress=not args.no_progress,
        split=args.split,
        strategy=strategy_from_options(beam_size=args.beam_size, length_penalty=args.length_penalty),
        max_length=args.max_length,
        batch_size=args.batch_size,
        metrics=args.metrics,
        output=output,
        results=args.results,
        per_image=args.per_image,
        lang=args.lang,
        tokenizer=args.tokenizer,
        spice_models=args.spice_models,
        device=args.device,
        limit=args.limit,
        num_captions=args.num_captions,
    )
    if hasattr(ev, "scores") and ev.task == "grounding":  # seesay.evaluate.evaluate_regions
        print(f"grounding accuracy {100 * ev.scores['grounding_accuracy']:.2f}% (IoU >= 0.5); mean IoU "
              f"{ev.scores['mean_iou']:.3f}")
    elif hasattr(ev, "scores"):  # region captions
        print("  ".join(f"{k} {v:.3f}" for k, v in ev.scores.items() if k not in ("regions", "exact_match"))
              + f"; exact match {100 * ev.scores['exact_match']:.2f}%")
    elif hasattr(ev, "closed_set_accuracy"):  # a classify dataset: accuracy (seesay.evaluate.evaluate_classification)
        print(f"top-1 accuracy {100 * ev.accuracy:.2f}% (generated text = \"a photo of <label>\"); "
              f"closed-set accuracy {100 * ev.closed_set_accuracy:.2f}% (likeliest label)")
    else:
        print(format_report(ev.report))
    written = [str(x) for x in (output, args.results, args.per_image) if x]
    what = "regions" if hasattr(ev, "scores") else "images"
    print(f"{len(ev.captions)} {what} in {ev.seconds:.1f} s; wrote {', '.join(written)}")
    return 0


def default_output(checkpoint: str, split: str) -> str:
    """RUN_DIR/eval-SPLIT/metrics.json for a checkpoint RUN_DIR/<name> (never the working directory)."""
    from pathlib import Path

    ck = Path(checkpoint)
    run_dir = ck.parent if ck.name not in ("", ".", "..") else ck.resolve().parent
    return str(run_dir / f"eval-{split}" / "metrics.json")
