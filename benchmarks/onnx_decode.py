"""ONNX (onnxruntime) vs PyTorch caption decoding speed on the CPU, demo-size models.

Prints one JSON object: for each decoder, captions/s of greedy and beam-5 decoding of
`--images` images in one batch, with the PyTorch model and with its ONNX export
(`seesay export`), both running seesay's own decoding (`seesay.decoding.decode`) and both on
`--threads` threads. Images are encoded once, outside the timings (the encoder is timed apart:
`encode_images_per_s`). Models are the demo's sizes (small_cnn 64 px -> 8x8x64 grid, decoder
width 128, 60 words), randomly initialised, with `<end>` made unreachable so every caption runs
exactly `--max-len` steps in both runtimes. Each figure is the best of `--repeats` timings.

    python benchmarks/onnx_decode.py                          # all four decoders, 100 images
    python benchmarks/onnx_decode.py --decoders soft_attention --images 20 --repeats 1   # quick check
    python benchmarks/onnx_decode.py --checkpoint RUN_DIR/best   # a trained model (captions end early)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from roofline import best_of

from seesay.decoding import Beam, Greedy

DECODERS = ("show_tell", "soft_attention", "adaptive_attention", "transformer")


def demo_model(decoder: str, vocab_words: int = 56):
    from seesay.data.tokenize import SPECIALS, Vocab
    from seesay.demo import DEMO_RECIPE
    from seesay.model import build_model

    torch.manual_seed(0)
    vocab = Vocab([*SPECIALS, *[f"w{i}" for i in range(vocab_words)]])
    enc = {k: v for k, v in DEMO_RECIPE["encoder"].items() if k not in ("name", "fine_tune", "lr")}
    if decoder == "transformer":
        dec = {"d_model": 128, "heads": 8, "layers": 3, "ff_dim": 512, "dropout": 0.0}
    elif decoder == "show_tell":
        dec = {"embed_dim": 64, "decoder_dim": 128, "dropout": 0.0}
    else:
        dec = {"embed_dim": 64, "attention_dim": 64, "decoder_dim": 128, "dropout": 0.0}
    spec = {"encoder": {"name": "small_cnn", **enc}, "decoder": {"name": decoder, "vocab_size": len(vocab), **dec}}
    model = build_model(spec, tokenizer=vocab, image_size=enc["image_size"]).eval()
    fc = getattr(model.decoder, "fc", None)
    if fc is not None:  # every caption runs --max-len steps: the same work in both runtimes
        with torch.no_grad():
            fc.bias[vocab.end_id] = -1e4
    return model


def bench(model, folder: Path, args: argparse.Namespace) -> dict:
    from seesay.export.onnx import export_onnx
    from seesay.export.runtime import OnnxCaptioner

    t0 = time.perf_counter()
    export_onnx(model_checkpoint(model, folder), folder / "onnx")
    export_s = time.perf_counter() - t0
    runtime = OnnxCaptioner(folder / "onnx", threads=args.threads)
    size = runtime.image_size
    images = torch.randint(0, 256, (args.images, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    out: dict = {"export_s": round(export_s, 2)}
    with torch.inference_mode():
        feats = {"pytorch": model.encode(images), "onnx": runtime.encode(images)}
        for name, cap in (("pytorch", model), ("onnx", runtime)):
            s = best_of(lambda cap=cap: cap.encode(images), args.repeats)
            out[f"{name}_encode_images_per_s"] = round(args.images / s, 1)
            for label, strategy in (("greedy", Greedy()), ("beam5", Beam(5))):
                cap.generate(feats[name].__class__(feats[name].grid[:2], feats[name].pooled[:2], feats[name].grid_hw),
                             strategy, max_len=3)  # warm-up
                s = best_of(lambda cap=cap, st=strategy, f=feats[name]: cap.generate(f, st, max_len=args.max_len),
                            args.repeats)
                out[f"{name}_{label}_captions_per_s"] = round(args.images / s, 2)
    for label in ("greedy", "beam5"):
        out[f"onnx_vs_pytorch_{label}"] = round(out[f"onnx_{label}_captions_per_s"]
                                                / out[f"pytorch_{label}_captions_per_s"], 2)
    return out


def model_checkpoint(model, folder: Path):
    from seesay.checkpoint import save_checkpoint

    return save_checkpoint(folder / "best", model=model, config={})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoders", nargs="*", default=list(DECODERS), help="decoders to time")
    parser.add_argument("--checkpoint", default=None, help="time this trained checkpoint instead")
    parser.add_argument("--images", type=int, default=100, help="images decoded in one batch")
    parser.add_argument("--max-len", type=int, default=20, help="caption length (steps)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--repeats", type=int, default=3, help="timings per figure (the best is kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    result = {"device": platform.processor() or "cpu", "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "threads": args.threads, "images": args.images,
              "max_len": args.max_len, "repeats": args.repeats, "results": {}}
    with tempfile.TemporaryDirectory(prefix="seesay-onnx-bench-") as tmp:
        if args.checkpoint:
            from seesay.checkpoint import load_checkpoint

            model = load_checkpoint(args.checkpoint).model.eval()
            result["results"]["checkpoint"] = bench(model, Path(tmp), args)
        else:
            for name in args.decoders:
                folder = Path(tmp) / name
                folder.mkdir()
                result["results"][name] = bench(demo_model(name), folder, args)
                print(f"{name}: {result['results'][name]}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
