"""`seesay export`: a trained checkpoint as ONNX graphs for deployment (docs/export.md)."""

from __future__ import annotations

import argparse

HELP = "export a trained checkpoint as ONNX graphs (encoder + one decoder step) with a small runtime"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, e.g. RUN_DIR/best")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="folder to write (an earlier export there is replaced); caption with it: "
                        "seesay caption --runtime onnx --checkpoint DIR")
    p.add_argument("--no-verify", action="store_true",
                   help="skip decoding random images with PyTorch and onnxruntime to check they agree")


def run(args: argparse.Namespace) -> int:
    from seesay.export.onnx import export_onnx
    from seesay.files import check_output_dir

    check_output_dir(args.output)
    out = export_onnx(args.checkpoint, args.output, verify=not args.no_verify)
    print(f"seesay export: ONNX graphs written to {out}")
    return 0
