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
    p.add_argument("--min-length", type=int, default=0,
                   help="no <end> before this many tokens (not counting the --prompt tokens); 0: off")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                   help="never repeat an n-gram of N tokens within a caption, the prompt included (0: off)")
    p.add_argument("--bad-endings", default=None, metavar="WORDS",
                   help='comma-separated words a caption may not end on (e.g. a,the,with), or "default" for a '
                        "list of English articles, prepositions and conjunctions; off by default")
    p.add_argument("--num-captions", type=int, default=1, metavar="N",
                   help="N captions per image with their scores: the N best beams (N <= --beam-size) or N samples")
    p.add_argument("--diverse-groups", type=int, default=1, metavar="G",
                   help="diverse beam search: split the beams into G groups that avoid each other's words "
                        "(--beam-size divisible by G; 1: plain beam search)")
    p.add_argument("--diversity-penalty", type=float, default=None, metavar="L",
                   help="diverse beam search: penalty per beam of an earlier group that chose the same word at "
                        "the same step (default 0.5; needs --diverse-groups > 1)")
    p.add_argument("--batch-size", type=int, default=16, help="images decoded together")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--output", default=None, help="write captions to this file instead of standard output")
    p.add_argument("--json", action="store_true",
                   help='JSON lines: {image, caption, score} (with --num-captions N > 1 also "captions": '
                        '[{caption, score}, ...], best first)')
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
    constraints = constraints_from_args(args)
    n = args.num_captions
    if n < 1:
        raise SeesayError(f"--num-captions must be >= 1, not {n}")
    groups = args.diverse_groups
    if groups < 1:
        raise SeesayError(f"--diverse-groups must be >= 1, not {groups}")
    if args.diversity_penalty is not None and args.diversity_penalty < 0:
        raise SeesayError(f"--diversity-penalty must be >= 0, not {args.diversity_penalty}")
    if groups > 1:
        if sampling:
            raise SeesayError("--diverse-groups cannot be combined with --temperature/--top-k/--top-p (sampling)")
        if beam % groups:
            raise SeesayError(f"--beam-size {beam} is not divisible by --diverse-groups {groups}")
    elif args.diversity_penalty is not None:
        raise SeesayError("--diversity-penalty needs --diverse-groups G > 1 (diverse beam search)")
    if n > 1 and (greedy or (not sampling and beam == 1)):
        raise SeesayError(f"--num-captions {n}: greedy decoding gives one caption per image "
                          "(use --beam-size >= N or sampling)")
    if n > 1 and not sampling and n > beam:
        raise SeesayError(f"--num-captions {n} is more than --beam-size {beam} (beam search keeps {beam} captions)")
    check_outputs({"--output": args.output, "--attention-map": args.attention_map})  # before any decoding
    strategy = strategy_from_options(beam_size=beam, length_penalty=args.length_penalty, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, seed=args.seed, diverse_groups=groups,
                                     diversity_penalty=0.5 if args.diversity_penalty is None else args.diversity_penalty)
    results = caption_files(args.checkpoint, images, strategy, max_len=args.max_length,
                            batch_size=args.batch_size, device=args.device, prompt=args.prompt,
                            constraints=constraints, num_captions=n)
    lines = []
    for i, r in enumerate(results):
        if r.error is not None:
            print(f"seesay caption: error: {r.error}", file=sys.stderr)
            continue
        if args.json:
            if r.rank:
                continue  # the image's line (written at rank 0) lists them all
            row = {"image": r.image, "caption": r.caption, "score": round(r.score, 4)}
            if n > 1:  # an image's N results come together, best first
                row["captions"] = [{"caption": x.caption, "score": round(x.score, 4)} for x in results[i: i + n]]
            lines.append(json.dumps(row, ensure_ascii=False))
        elif n > 1:
            lines.append(f"{r.image}\t{r.rank + 1}\t{r.caption}")
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

        best = [r for r in results if r.rank == 0]  # one picture per image: its best caption
        for path in save_attention_maps(args.attention_map, best, args.checkpoint):
            print(f"seesay caption: attention map written to {path}", file=sys.stderr)
    return 1 if results and all(r.error is not None for r in results) else 0


def constraints_from_args(args: argparse.Namespace):
    """--min-length, --no-repeat-ngram-size and --bad-endings as a `seesay.decoding.Constraints`."""
    from seesay.captioner import DEFAULT_BAD_ENDINGS
    from seesay.decoding import Constraints
    from seesay.errors import SeesayError

    for flag, value in (("--min-length", args.min_length), ("--no-repeat-ngram-size", args.no_repeat_ngram_size)):
        if value < 0:
            raise SeesayError(f"{flag} must be >= 0 (0: off), not {value}")
    if args.min_length > args.max_length:
        raise SeesayError(f"--min-length {args.min_length} is more than --max-length {args.max_length}")
    words: tuple[str, ...] = ()
    if args.bad_endings is not None:
        spec = args.bad_endings.strip()
        words = DEFAULT_BAD_ENDINGS if spec == "default" else tuple(w.strip() for w in spec.split(",") if w.strip())
        if not words:
            raise SeesayError('--bad-endings: no words given (comma-separated words, or "default")')
    return Constraints(no_repeat_ngram_size=args.no_repeat_ngram_size, min_length=args.min_length, bad_endings=words)
