"""`seesay visualize`: caption one image and draw the attention over it, word by word; or, with
`--vq DIR IMAGE...`, show images beside their VQ image-token reconstructions."""

from __future__ import annotations

import argparse

HELP = "caption an image and save a figure of where the model looked for each word"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (e.g. RUN_DIR/best); required "
                        "unless --vq is given")
    parser.add_argument("--image", default=None, help="image file to caption (with --checkpoint)")
    parser.add_argument("--vq", default=None, metavar="DIR",
                        help="a VQ image tokenizer (seesay train-vq / convert vqgan): draw each IMAGE beside its "
                        "reconstruction from its codes instead of an attention map")
    parser.add_argument("vq_images", nargs="*", metavar="IMAGE", help="with --vq: the images to reconstruct")
    parser.add_argument("--mask-ratio", type=float, default=0.75,
                        help="with --vq and --checkpoint (a masked-image-modelling model): share of the image's "
                        "patches masked before the model predicts its codes, drawn beside the reconstruction")
    parser.add_argument("--prompt", default=None,
                        help="with --vq and --checkpoint: the text the model reads as context (e.g. a caption)")
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
    from seesay.errors import SeesayError
    from seesay.viz.visualize import visualize_image, visualize_vq

    if args.vq is not None:
        if not 0.0 <= args.mask_ratio <= 1.0:
            raise SeesayError(f"--mask-ratio must be in [0, 1], not {args.mask_ratio}")
        out = visualize_vq(args.vq, [*([args.image] if args.image else []), *args.vq_images], args.output,
                           device=args.device, checkpoint=args.checkpoint, mask_ratio=args.mask_ratio,
                           prompt=args.prompt)
        print(f"reconstructions: {out}")
        return 0
    if args.vq_images:
        raise SeesayError(f"{args.vq_images[0]}: image arguments go with --vq; to caption, use --image")
    if args.checkpoint is None or args.image is None:
        raise SeesayError("--checkpoint and --image are required (or --vq DIR IMAGE... for VQ reconstructions)")
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
