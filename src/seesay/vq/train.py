"""Training the small VQ tokenizer on a prepared dataset (`seesay train-vq`).

A loop of its own rather than `seesay.train.loop` (which is built around captioning tasks,
validation metrics and resumable checkpoints): a couple of CPU minutes of Adam on random
batches of the train images, then the reconstruction error and codebook use on the val images
(test, else train, when there is no val split), saved with the weights as metrics.json:

    mse        mean squared error per pixel and channel, images 0..1
    psnr       10 log10(1 / mse), in dB
    codes_used share of the codebook that appears at least once in the evaluation images
    perplexity exp(entropy) of the code distribution over those images (K means uniform use)
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seesay.errors import SeesayError
from seesay.vq.base import VQTokenizer
from seesay.vq.small import SmallVQ, SmallVQConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def _as_batch(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> uint8 [N, 3, S, S] on `device`."""
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).to(device)


@torch.no_grad()
def evaluate_vq(vq: VQTokenizer, images: np.ndarray, *, batch_size: int = 64) -> dict[str, float]:
    """Reconstruction error and codebook use of `vq` on uint8 images [N, S, S, 3] (see the module doc)."""
    if len(images) == 0:
        raise SeesayError("no images to evaluate the VQ tokenizer on")
    was_training = vq.training
    vq.eval()
    dev = next(vq.parameters()).device
    counts = torch.zeros(vq.codebook_size, dtype=torch.float64)
    se, n = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = _as_batch(images[start:start + batch_size], dev)
        codes = vq.encode(x)
        target = (vq.to_model_input(x) + 1) / 2
        recon = vq.decode(codes)
        se += float((recon - target).pow(2).sum())
        n += target.numel()
        counts += torch.bincount(codes.flatten().cpu(), minlength=vq.codebook_size).double()
    vq.train(was_training)
    mse = se / n
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {
        "mse": mse,
        "psnr": 10 * math.log10(1 / max(mse, 1e-12)),
        "codes_used": float((counts > 0).float().mean()),
        "perplexity": math.exp(entropy),
        "images": len(images),
    }


def train_vq(
    data: str | Path,
    output: str | Path,
    *,
    codebook_size: int = 512,
    downsample: int = 8,
    image_size: int | None = None,
    hidden: int = 64,
    embed_dim: int = 32,
    restart_after: int = 50,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | None = "cpu",
    log_every: int | None = None,
) -> dict[str, Any]:
    """Train a `SmallVQ` on DATA's train images and save it (with metrics.json) to `output`.

    `image_size` None: the prepared images' size. Returns the metrics (also in metrics.json).
    """
    from seesay.data.store import PreparedData
    from seesay.files import check_output_dir
    from seesay.model import pick_device

    for flag, value in (("--steps", steps), ("--batch-size", batch_size), ("--codebook-size", codebook_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SeesayError(f"{flag} must be an integer >= 1, not {value!r}")
    if not lr > 0:
        raise SeesayError(f"--lr must be > 0, not {lr!r}")
    check_output_dir(output)
    prepared = PreparedData(data)
    if "train" not in prepared.splits:
        raise SeesayError(f"{data}: no train split to learn the codebook from")
    train = prepared.split("train").images
    eval_split = next((s for s in ("val", "test") if s in prepared.splits and len(prepared.split(s))), "train")
    eval_images = prepared.split(eval_split).images
    if len(train) == 0:
        raise SeesayError(f"{data}: the train split has no images")
    try:
        cfg = SmallVQConfig(codebook_size=codebook_size, downsample=downsample,
                            image_size=image_size or prepared.image_size, hidden=hidden, embed_dim=embed_dim,
                            dead_after=restart_after)
    except ValueError as e:
        raise SeesayError(f"train-vq: {e}") from None
    dev = pick_device(device)
    log_every = log_every or max(1, min(100, steps // 10))  # train_loss_last: the last window's mean
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SmallVQ(cfg).to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    started = time.monotonic()
    first = last = None
    window: list[float] = []
    for step in range(1, steps + 1):
        rate = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / steps))  # cosine decay to 0
        for group in opt.param_groups:
            group["lr"] = rate
        idx = torch.randint(0, len(train), (batch_size,), generator=gen).sort().values.numpy()
        x = model.to_model_input(_as_batch(train[idx], dev))
        out = model(x)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        window.append(float(out["loss_rec"].detach()))
        if step == 1:
            first = window[0]
        if step % log_every == 0 or step == steps:
            last = sum(window) / len(window)
            used = int(out["codes"].unique().numel())
            log.info("step %d/%d: reconstruction loss %.5f, %d codes in the batch, %d restarts",
                     step, steps, last, used, model.quantize.restarts)
            window = []
    model.eval()
    metrics = evaluate_vq(model, eval_images)
    metrics.update({
        "split": eval_split,
        "train_loss_first": first,
        "train_loss_last": last,
        "steps": steps,
        "batch_size": batch_size,
        "seconds": round(time.monotonic() - started, 1),
        "codebook_size": codebook_size,
        "downsample": downsample,
        "image_size": cfg.image_size,
        "code_grid": [cfg.image_size // downsample] * 2,
        "restarts": model.quantize.restarts,
        "restart_after": restart_after,
        "data": str(data),
    })
    model.cpu().save_pretrained(output, extra_files={METRICS_FILE: metrics})
    return metrics
