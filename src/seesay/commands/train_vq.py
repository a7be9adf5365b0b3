"""`seesay train-vq --data DIR --output DIR`: train a small VQ image tokenizer on a prepared dataset."""

from __future__ import annotations

import argparse

HELP = "train a small VQ image tokenizer on a prepared dataset's train images (image tokens without downloads)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="prepared dataset (DATA_DIR of seesay prepare)")
    parser.add_argument("--output", "-o", required=True,
                        help="directory to write (config.json, model.safetensors, metrics.json)")
    parser.add_argument("--codebook-size", type=int, default=512, help="number of codes (image tokens)")
    parser.add_argument("--downsample", type=int, default=8, help="pixels per code along each side (a power of two)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side the images are resized to (default: the prepared images' size)")
    parser.add_argument("--hidden", type=int, default=64, help="channels of the encoder and decoder")
    parser.add_argument("--embed-dim", type=int, default=32, help="dimension of each code vector")
    parser.add_argument("--restart-after", type=int, default=50,
                        help="restart a code not used for this many steps (keeps the codebook in use)")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine decay to 0)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")


def run(args: argparse.Namespace) -> int:
    import json

    from seesay.vq.train import train_vq

    metrics = train_vq(
        args.data, args.output, codebook_size=args.codebook_size, downsample=args.downsample,
        image_size=args.image_size, hidden=args.hidden, embed_dim=args.embed_dim,
        restart_after=args.restart_after, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
    )
    print(f"wrote {args.output}: reconstruction MSE {metrics['mse']:.5f} (PSNR {metrics['psnr']:.2f} dB) on "
          f"{metrics['images']} {metrics['split']} images, {metrics['codes_used']:.0%} of "
          f"{metrics['codebook_size']} codes used (perplexity {metrics['perplexity']:.1f})")
    print(json.dumps(metrics))
    return 0
