"""`seesay caption` cold start: how long one image takes from a fresh process, and seesay's share.

Prints JSON. Each figure is the best of `--repeats` fresh subprocesses:

- `import_torch_s`: `python -c "import torch"` alone (the floor no seesay change can lower);
- `caption_total_s`: `python -m seesay caption --checkpoint CK IMAGE --device cpu` end to end;
- `seesay_share_s`: their difference, what seesay itself adds (the target is under 0.5 s);
- `phases_s`: one more subprocess timing the phases in process after `import torch`: importing
  seesay's caption command, loading the checkpoint, captioning the image.

Without `--checkpoint` it saves a demo-sized model (configs/shapes_demo.yaml: small_cnn 64 px,
soft attention 64/64/128, a 60-word vocabulary) to a temporary directory and uses that.

    python benchmarks/cold_start.py [--checkpoint RUN_DIR/best] [--image IMG] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from seesay.commands import caption  # noqa: F401  (the verb's module, as the CLI imports it)
from seesay.checkpoint import load_checkpoint
t2 = time.perf_counter()
ck = load_checkpoint(sys.argv[1])
t3 = time.perf_counter()
from seesay.decoding import Beam
img = ck.model.preprocess(sys.argv[2])[None]
res = ck.model.generate(img, Beam(5), max_len=20)
ck.tokenizer.decode(res.tokens[0].tolist())
t4 = time.perf_counter()
print(json.dumps({"import_torch": t1 - t0, "import_seesay_caption": t2 - t1, "load_checkpoint": t3 - t2,
                  "caption_one_image": t4 - t3}))
"""


def best_time(cmd: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t0)
    return best


def demo_checkpoint(directory: Path) -> tuple[Path, Path]:
    """A demo-sized soft-attention checkpoint and a 64 px image in `directory`."""
    import numpy as np
    from PIL import Image

    from seesay.checkpoint import save_checkpoint
    from seesay.data.tokenize import build_vocab
    from seesay.model import build_model

    words = [f"w{i}" for i in range(56)]
    vocab = build_vocab([words], min_word_freq=1)
    spec = {"encoder": {"name": "small_cnn", "width": 64, "encoded_size": 8, "image_size": 64},
            "decoder": {"name": "soft_attention", "embed_dim": 64, "attention_dim": 64, "decoder_dim": 128,
                        "vocab_size": len(vocab)}}
    model = build_model(spec, tokenizer=vocab, image_size=64)
    ck = save_checkpoint(directory / "best", model=model, config={"model": spec})
    image = directory / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    return ck, image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory (default: a demo-sized one)")
    ap.add_argument("--image", default=None, help="image to caption (default: a random 64 px one)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ck, image = (Path(args.checkpoint), Path(args.image or "")) if args.checkpoint else demo_checkpoint(Path(tmp))
        if args.image:
            image = Path(args.image)
        if not image.is_file():
            sys.exit("--image: give an image to caption with --checkpoint")
        py = sys.executable
        torch_s = best_time([py, "-c", "import torch"], args.repeats)
        total_s = best_time([py, "-m", "seesay", "caption", "--checkpoint", str(ck), str(image), "--device", "cpu",
                             "--workers", "0"], args.repeats)
        phases = None
        for _ in range(args.repeats):
            out = subprocess.run([py, "-c", PHASES, str(ck), str(image)], check=True, capture_output=True, text=True)
            run = json.loads(out.stdout.strip().splitlines()[-1])
            phases = run if phases is None else {k: min(v, run[k]) for k, v in phases.items()}
    print(json.dumps({"python": sys.version.split()[0], "repeats": args.repeats, "import_torch_s": round(torch_s, 3),
                      "caption_total_s": round(total_s, 3), "seesay_share_s": round(total_s - torch_s, 3),
                      "phases_s": {k: round(v, 3) for k, v in (phases or {}).items()}}, indent=1))


if __name__ == "__main__":
    main()
