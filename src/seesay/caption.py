"""Caption image files with a trained checkpoint, going on past bad files (`seesay caption`).

Each file goes through the captioner's own `preprocess` (the size and reading rules saved with
the checkpoint), so inference sees exactly what training saw; decoding is
`seesay.captioner.caption_images`, the same call the server makes on uploaded bytes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from seesay.captioner import caption_images
from seesay.decoding import Beam, Constraints, Strategy
from seesay.errors import SeesayError
from seesay.model import pick_device

log = logging.getLogger(__name__)


class CaptionResult(NamedTuple):
    image: str
    caption: str | None  # None when the image could not be read
    score: float | None  # sum of log-probabilities (length-normalised with a beam length penalty)
    tokens: list[int]
    error: str | None = None  # one-line reason when the image failed
    attention: Any = None  # (L, A) tensor for decoders with attention, else None
    rank: int = 0  # with num_captions > 1: 0 for an image's best caption, 1 for the next, ...


def caption_files(checkpoint: str | os.PathLike | Any, paths: Sequence[str | os.PathLike],
                  strategy: Strategy = Beam(5), *, max_len: int = 50, batch_size: int = 16,
                  device: str | torch.device | None = None, prompt: str | None = None,
                  constraints: Constraints | None = None, num_captions: int = 1) -> list[CaptionResult]:
    """Caption image files, `batch_size` at a time; unreadable images get `error` set, others go on.

    `checkpoint` is a checkpoint directory (e.g. RUN_DIR/best) or an already loaded
    `seesay.checkpoint.Checkpoint`. `prompt` forces every caption to start with that text;
    `constraints` (`seesay.decoding.Constraints`, bad endings as words) hold for every caption.
    With `num_captions` N > 1 each readable image has N results in a row (`rank` 0..N-1, best
    score first); an unreadable one has a single result with `error`.
    """
    from seesay.checkpoint import load_checkpoint

    dev = pick_device(device)
    ckpt = checkpoint if hasattr(checkpoint, "model") else load_checkpoint(checkpoint, map_location=dev)
    model = ckpt.model.to(dev).eval()
    results: list[CaptionResult] = []
    for start in range(0, len(paths), max(batch_size, 1)):
        chunk = [str(p) for p in paths[start: start + batch_size]]
        ok: list[str] = []
        tensors = []
        failed: dict[str, str] = {}
        for p in chunk:
            try:
                tensors.append(model.preprocess(p))
                ok.append(p)
            except SeesayError as e:
                failed[p] = str(e)
            except Exception as e:  # noqa: BLE001 - any decoder failure is that image's problem only
                failed[p] = f"{p}: unreadable image ({type(e).__name__}: {e})"
        done = dict(zip(ok, caption_images(model, tensors, strategy, prompt=prompt, max_len=max_len,
                                           batch_size=batch_size, constraints=constraints,
                                           num_captions=num_captions))) if ok else {}
        for p in chunk:
            if p in failed:
                log.debug("skipping %s", failed[p])
                results.append(CaptionResult(p, None, None, [], failed[p]))
                continue
            for rank, r in enumerate(done[p] if num_captions != 1 else [done[p]]):
                results.append(CaptionResult(p, r.caption, r.score, r.tokens, None, r.attention, rank))
    return results
