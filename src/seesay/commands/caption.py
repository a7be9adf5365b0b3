"""`seesay caption`: caption images, folders or lists of images with a trained checkpoint or an ONNX export."""

from __future__ import annotations

import argparse
import sys

HELP = "caption images or folders of images with a trained checkpoint (beam search or sampling)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", metavar="IMAGE",
                   help="image files to caption, or folders (walked recursively, image files only, sorted)")
    p.add_argument("--list", default=None, metavar="FILE",
                   help="also caption the images listed in FILE, one path per line (# starts a comment line)")
    p.add_argument("--image", dest="image_flags", action="append", default=[], metavar="PATH",
                   help="an image file to caption (repeatable; same as the positional IMAGE arguments)")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help='start every caption with TEXT (e.g. "This is an image of "), then continue decoding; '
                        "the printed caption includes it")
    p.add_argument("--task", choices=("caption", "region", "grounding"), default="caption",
                   help="caption: describe the image; grounding: print the box (pixels) of --text; region: "
                        "describe the --box (a model trained on region data, docs/vlm.md)")
    p.add_argument("--text", default=None, help="--task grounding: what to find, e.g. \"a red circle\"")
    p.add_argument("--box", default=None, metavar="X0,Y0,X1,Y1",
                   help="--task region: the box to describe, in pixels of the image")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory, e.g. RUN_DIR/best (with --runtime onnx: a `seesay export` folder)")
    p.add_argument("--runtime", default="torch", choices=["torch", "onnx"],
                   help="torch: the checkpoint with PyTorch; onnx: an ONNX export with onnxruntime (CPU)")
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
    p.add_argument("--workers", type=int, default=2,
                   help="threads reading and resizing the next images while the model decodes (0: none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--output", default=None,
                   help="write captions to this file instead of standard output; its extension picks the format: "
                        ".jsonl JSON lines, .csv, .json COCO results [{image_id, caption}], .txt text. Written "
                        "batch by batch; a re-run with the same output skips the images already in it")
    p.add_argument("--overwrite", action="store_true",
                   help="start --output afresh instead of skipping the images already in it")
    p.add_argument("--json", action="store_true",
                   help='JSON lines: {image, caption, score} (with --num-captions N > 1 also "captions": '
                        '[{caption, score}, ...], best first)')
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (shown for folders, lists and more than one batch of images)")
    p.add_argument("--attention-map", default=None, metavar="OUT.png",
                   help="also draw each word's attention over the image (OUT-<stem>.png for several images)")


def decoding_from_args(args: argparse.Namespace):
    """(strategy, constraints, num_captions) from the decoding flags, with their checks (one line each)."""
    from seesay.decoding import strategy_from_options
    from seesay.errors import SeesayError

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
    strategy = strategy_from_options(beam_size=beam, length_penalty=args.length_penalty, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, seed=args.seed, diverse_groups=groups,
                                     diversity_penalty=0.5 if args.diversity_penalty is None else args.diversity_penalty)
    return strategy, constraints, n


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seesay.caption import (
        CaptionOutput,
        caption_stream,
        find_images,
        image_rows,
        load_captioner,
        output_format,
    )
    from seesay.errors import SeesayError
    from seesay.files import check_outputs
    from seesay.layers import gemm
    from seesay.progress import progress

    inputs = [*args.images, *args.image_flags]
    if not inputs and args.list is None:
        raise SeesayError("no images given (pass IMAGE arguments or folders, --image PATH or --list FILE)")
    if args.batch_size < 1:
        raise SeesayError("--batch-size must be >= 1")
    if args.workers < 0:
        raise SeesayError(f"--workers must be >= 0, not {args.workers}")
    if args.attention_map and args.runtime == "onnx":
        raise SeesayError("--attention-map needs the PyTorch checkpoint (--runtime torch)")
    strategy, constraints, n = decoding_from_args(args)
    if args.task != "caption" or args.text is not None or args.box is not None:
        return _answer_regions(args, inputs, strategy)
    check_outputs({"--output": args.output, "--attention-map": args.attention_map})  # before any decoding
    fmt = output_format(args.output, args.json)
    folders = [x for x in inputs if Path(x).is_dir()]
    items = find_images(inputs, args.list)
    if not items:
        where = ", ".join(folders) if folders else f"--list {args.list}"
        raise SeesayError(f"{where}: no image files found")
    many = bool(folders) or args.list is not None  # a folder or a list: bar, summary
    model = load_captioner(args.checkpoint, runtime=args.runtime, device=args.device)
    if args.runtime == "torch" and getattr(model, "tokenizer", None) is not None:
        from seesay.data.region_tasks import answer_constraints

        constraints = answer_constraints(model.tokenizer, "caption", constraints)  # no <loc_i> / <img_i> words
    out = CaptionOutput(args.output, fmt, single=len(items) == 1 and not many, fresh=args.overwrite,
                        rel_of={it.path: it.rel for it in items})
    todo = [it.path for it in items if not out.done(it)]
    skipped = len(items) - len(todo)
    bar = progress(len(todo), desc="captioning", unit="img",
                   enabled=not args.no_progress and (many or len(todo) > args.batch_size))
    captioned = bad = 0
    best = []  # for --attention-map
    with gemm.packing():  # the weights stay fixed for the whole command: each is packed once (CPU)
        try:
            for batch in caption_stream(model, todo, strategy, max_len=args.max_length, batch_size=args.batch_size,
                                        workers=args.workers, prompt=args.prompt, constraints=constraints,
                                        num_captions=n):
                for r in batch:
                    if r.error is not None:
                        print(f"seesay caption: error: {r.error}", file=sys.stderr)
                        bad += 1
                rows = image_rows(batch, n)
                out.write(rows)
                captioned += len(rows)
                bar.update(len(rows) + sum(r.error is not None for r in batch))
                if args.attention_map:
                    best.extend(r for r in batch if r.error is None and r.rank == 0)
        except BaseException:
            out.abort()  # what was written stays; a re-run goes on from there
            raise
        finally:
            bar.close()
    out.close()
    if many or args.output:
        where = f" (already in {args.output})" if args.output else ""
        print(f"seesay caption: {captioned} captioned, {skipped} skipped{where}, {bad} bad", file=sys.stderr)
    if args.attention_map and best:
        from seesay.viz.visualize import save_attention_maps

        for path in save_attention_maps(args.attention_map, best, args.checkpoint):
            print(f"seesay caption: attention map written to {path}", file=sys.stderr)
    return 1 if bad and not captioned and not skipped else 0


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


def _answer_regions(args: argparse.Namespace, inputs: list[str], strategy) -> int:
    """--task grounding / region: one line per image (the box in pixels, or the region's text)."""
    import json

    import torch
    from PIL import Image

    from seesay.caption import find_images, load_captioner
    from seesay.data.region_tasks import LOC_PREFIX, answer_constraints, loc_vocab_size, task_prompt
    from seesay.errors import SeesayError
    from seesay.locations import tokens_to_box

    if args.task == "caption":
        raise SeesayError("--text and --box go with --task grounding or --task region")
    if args.runtime != "torch":
        raise SeesayError(f"--task {args.task} needs the PyTorch checkpoint (--runtime torch)")
    if args.task == "grounding" and args.box is not None or args.task == "region" and args.text is not None:
        raise SeesayError("--task grounding takes --text, --task region takes --box")
    box = None
    if args.box is not None:
        try:
            box = [float(v) for v in args.box.split(",")]
        except ValueError:
            box = []
        if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
            raise SeesayError(f"--box must be x0,y0,x1,y1 in pixels with x0 < x1 and y0 < y1, not {args.box!r}")
    model = load_captioner(args.checkpoint, runtime="torch", device=args.device)
    tok = model.tokenizer
    bins = loc_vocab_size(tok)
    if not bins:
        raise SeesayError(f"--checkpoint {args.checkpoint}: the model has no <loc_i> tokens (train it on region data)")
    constraints = answer_constraints(tok, args.task)
    device = next(model.parameters()).device
    lines = []
    for it in find_images(inputs, args.list):
        try:
            with Image.open(it.path) as im:
                w, h = im.size
            x = model.preprocess(it.path)[None].to(device)
        except (OSError, SeesayError) as e:
            print(f"seesay caption: error: {it.path}: {e}", file=sys.stderr)
            continue
        rel = None if box is None else [box[0] / w, box[1] / h, box[2] / w, box[3] / h]
        prompt = task_prompt(tok, args.task, text=args.text, box=rel, num_bins=bins)
        with torch.no_grad():
            res = model.generate(x, strategy, prompt=[prompt], constraints=constraints,
                                 max_len=LOC_PREFIX if args.task == "grounding" else args.max_length)
        ids = res.tokens[0, : int(res.lengths[0])].tolist()
        if args.task == "grounding":
            found = tokens_to_box([tok.id_to_token(i) for i in ids], w, h, bins)
            answer = None if found is None else [round(v, 1) for v in found]
            text = "no box" if answer is None else ",".join(f"{v:g}" for v in answer)
        else:
            answer = text = tok.decode(ids)
        lines.append(json.dumps({"image": it.path, args.task: answer}) if args.json else f"{it.path}\t{text}")
    body = "".join(line + "\n" for line in lines)
    if args.output:
        from seesay.files import write_text_atomic

        write_text_atomic(args.output, body)
    else:
        sys.stdout.write(body)
    return 0 if lines else 1
