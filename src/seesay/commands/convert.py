"""`seesay convert vqgan CKPT --output DIR`: a taming VQGAN checkpoint into safetensors + JSON."""

from __future__ import annotations

import argparse

HELP = "convert a model from another project's format into seesay's (vqgan: a taming-transformers VQGAN)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=["vqgan"], help="what to convert (vqgan: taming-transformers VQModel)")
    parser.add_argument("checkpoint", help="the checkpoint to convert (e.g. taming's last.ckpt)")
    parser.add_argument("--output", "-o", required=True, help="directory to write (config.json, model.safetensors)")
    parser.add_argument("--config", default=None,
                        help="taming's model.yaml with the architecture (default: the f16 model with 16384 codes)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle the checkpoint fully when a weights-only load refuses it; this runs any "
                        "code the file holds, so only for files from a source you trust")


def run(args: argparse.Namespace) -> int:
    from seesay.vq.convert import convert_vqgan

    vq = convert_vqgan(args.checkpoint, args.output, config=args.config, trust_pickle=args.trust_pickle)
    print(f"wrote {args.output}: VQGAN, {vq.codebook_size} codes, {vq.image_size} px -> "
          f"{vq.grid_size}x{vq.grid_size} codes (downsample {vq.downsample})")
    return 0
