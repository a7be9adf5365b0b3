"""`seesay caption`: caption images with a trained checkpoint."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "caption images with a trained checkpoint (beam search or sampling)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files to caption")
    p.add_argument("--image", dest="image_flags", action="append", default=[], metavar="PATH",
                   help="an image file to caption (repeatable; same as the positional IMAGE arguments)")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help='start every caption with TEXT (e.g. "This is an image of "), then continue decoding; '
                        "the printed caption includes it")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, e.g. RUN_DIR/best")
    p.add_argument("--beam-size", type=int, default=None,
                   help="beam width (5 when not sampling; 1 is greedy); cannot be combined with sampling")
    p.add_argument("--length-penalty", type=float, default=0.0,
                   help="beam length penalty alpha: score / ((5+len)/6)^alpha; 0 disables it")
    p.add_argument("--temperature", type=float, default=None,
                   help="sample with this softmax temperature (0: greedy, as --beam-size 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely words only (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest word set with this mass")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--max-length", type=int, default=50,
                   help="maximum caption length in tokens (not counting the --prompt tokens)")
    p.add_argument("--batch-size", type=int, default=16, help="images decoded together")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--output", default=None, help="write captions to this file instead of standard output")
    p.add_argument("--json", action="store_true", help="JSON lines: {image, caption, score}")
    p.add_argument("--attention-map", default=None, metavar="OUT.png",
                   help="also draw each word's attention over the image (OUT-<stem>.png for several images)")


def run(args: argparse.Namespace) -> int:
    from seesay.caption import caption_files
    from seesay.decoding import strategy_from_options
    from seesay.errors import SeesayError
    from seesay.files import check_outputs

    images = [*args.images, *args.image_flags]
    if not images:
        raise SeesayError("no images given (pass IMAGE arguments or --image PATH)")
    if args.temperature is not None and args.temperature < 0:
        raise SeesayError("--temperature must be >= 0 (0: greedy)")
    greedy = args.temperature == 0  # the Titans extension's convention: temperature 0 is argmax
    sampling = args.temperature is not None or args.top_k > 0 or args.top_p < 1.0
    if sampling and args.beam_size not in (None, 1):
        raise SeesayError("--beam-size cannot be combined with --temperature/--top-k/--top-p (sampling or greedy)")
    if greedy and (args.top_k > 0 or args.top_p < 1.0):
        raise SeesayError("--temperature 0 (greedy) cannot be combined with --top-k/--top-p")
    if not 0.0 < args.top_p <= 1.0:
        raise SeesayError("--top-p must be in (0, 1]")
    if args.top_k < 0:
        raise SeesayError(f"--top-k must be >= 0 (0: all words), not {args.top_k}")
    beam = 1 if sampling else (args.beam_size if args.beam_size is not None else 5)
    if beam < 1:
        raise SeesayError("--beam-size must be >= 1")
    if args.length_penalty < 0:
        raise SeesayError("--length-penalty must be >= 0")
    if args.max_length < 1:
        raise SeesayError("--max-length must be >= 1")
    if args.batch_size < 1:
        raise SeesayError("--batch-size must be >= 1")
    check_outputs({"--output": args.output, "--attention-map": args.attention_map})  # before any decoding
    strategy = strategy_from_options(beam_size=beam, length_penalty=args.length_penalty, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    results = caption_files(args.checkpoint, images, strategy, max_len=args.max_length,
                            batch_size=args.batch_size, device=args.device, prompt=args.prompt)
    lines = []
    for r in results:
        if r.error is not None:
            print(f"seesay caption: error: {r.error}", file=sys.stderr)
            continue
        if args.json:
            lines.append(json.dumps({"image": r.image, "caption": r.caption, "score": round(r.score, 4)},
                                    ensure_ascii=False))
        else:
            lines.append(r.caption if len(images) == 1 else f"{r.image}\t{r.caption}")
    text = "".join(line + "\n" for line in lines)
    if args.output:
        try:
            from seesay.files import write_text_atomic

            write_text_atomic(args.output, text)
        except OSError as e:
            raise SeesayError(f"{args.output}: cannot write ({e.strerror})") from None
    else:
        sys.stdout.write(text)
    if args.attention_map and any(r.error is None for r in results):
        from seesay.viz.visualize import save_attention_maps

        for path in save_attention_maps(args.attention_map, results, args.checkpoint):
            print(f"seesay caption: attention map written to {path}", file=sys.stderr)
    return 1 if results and all(r.error is not None for r in results) else 0
