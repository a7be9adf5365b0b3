"""Encoder features computed once per image, for training a decoder on a frozen encoder.

# n - images, r - regions (h*w), d - feature width
A frozen encoder gives the same output every epoch, and every caption of an image shares
it, so running it per caption per epoch (as the tutorial does) wastes most of the time.
`build_feature_cache` runs the encoder once over a split's images and writes

    CACHE_DIR/<key>/grid.f16     float16 [n, r, d]  (np.memmap)
    CACHE_DIR/<key>/pooled.f16   float16 [n, d]
    CACHE_DIR/<key>/meta.json    shapes, grid_hw, the key's inputs

The key hashes the data directory, split, image count, encoder spec, preprocessing and the
encoder's weights, so a cache is reused across runs (and resumes) exactly when valid.
`FeatureStore` reads it: small caches are loaded into memory (on the GPU when training
there), large ones are read from the memory map per batch, so training memory does not grow
with the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seesay.encoders.base import EncoderOutput

log = logging.getLogger(__name__)

IN_MEMORY_BYTES = 2 * 1024**3  # caches up to this size are held in RAM / on the GPU


def encoder_fingerprint(encoder: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(**parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def build_feature_cache(
    encode: Callable[[torch.Tensor], EncoderOutput],
    images: Any,
    directory: str | Path,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Run `encode` (uint8 [B,3,H,W] -> EncoderOutput) once over `images` (uint8 [n,H,W,3]).

    Skipped when `directory` already holds a finished cache. Written aside and renamed.
    """
    directory = Path(directory)
    if (directory / "meta.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    n = len(images)
    grid_mm = pooled_mm = None
    grid_hw = None
    bar = None
    if progress:  # a bar on a terminal, a plain line every 30 s in logs
        from seesay.progress import progress as progress_display

        bar = progress_display(n, desc="encoding images once", unit="img")
    try:
        for start in range(0, n, batch_size):
            batch = np.array(images[start:start + batch_size])  # a writable copy
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).to(device)  # (B, 3, H, W) uint8
            enc = encode(x)
            g = enc.grid.float().cpu().numpy().astype(np.float16)
            p = enc.pooled.float().cpu().numpy().astype(np.float16)
            if grid_mm is None:
                grid_hw = tuple(int(v) for v in enc.grid_hw)
                grid_mm = np.lib.format.open_memmap(tmp / "grid.npy", mode="w+", dtype=np.float16,
                                                    shape=(n, *g.shape[1:]))
                pooled_mm = np.lib.format.open_memmap(tmp / "pooled.npy", mode="w+", dtype=np.float16,
                                                      shape=(n, p.shape[1]))
            grid_mm[start:start + len(batch)] = g
            pooled_mm[start:start + len(batch)] = p
            if bar is not None:
                bar.update(len(batch))
        if grid_mm is None:
            raise ValueError("no images to encode")
        grid_mm.flush()
        pooled_mm.flush()
        del grid_mm, pooled_mm
        info = {"num_images": n, "grid_hw": list(grid_hw), **(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2, default=str))
        try:
            os.replace(tmp, directory)
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return directory


class FeatureStore:
    """Cached features indexed by image; `get(index) -> EncoderOutput` in float32."""

    def __init__(self, directory: str | Path, device: torch.device | str = "cpu",
                 in_memory_bytes: int = IN_MEMORY_BYTES) -> None:
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        self.grid_hw = tuple(meta["grid_hw"])
        self.device = torch.device(device)
        grid = np.load(directory / "grid.npy", mmap_mode="r")
        pooled = np.load(directory / "pooled.npy", mmap_mode="r")
        self.num_images = grid.shape[0]
        self.in_memory = grid.nbytes + pooled.nbytes <= in_memory_bytes
        if self.in_memory:
            self.grid = torch.from_numpy(np.array(grid)).to(self.device)
            self.pooled = torch.from_numpy(np.array(pooled)).to(self.device)
        else:
            self.grid, self.pooled = grid, pooled

    def __len__(self) -> int:
        return self.num_images

    def get(self, index: torch.Tensor) -> EncoderOutput:
        if self.in_memory:
            idx = index.to(self.grid.device)
            grid, pooled = self.grid.index_select(0, idx), self.pooled.index_select(0, idx)
        else:
            idx = index.cpu().numpy()
            order = np.argsort(idx, kind="stable")  # sorted reads are kinder to the page cache
            g = np.empty((len(idx), *self.grid.shape[1:]), dtype=np.float16)
            p = np.empty((len(idx), self.pooled.shape[1]), dtype=np.float16)
            g[order] = self.grid[idx[order]]
            p[order] = self.pooled[idx[order]]
            grid, pooled = torch.from_numpy(g), torch.from_numpy(p)
        return EncoderOutput(grid.to(self.device, non_blocking=True).float(),
                             pooled.to(self.device, non_blocking=True).float(), self.grid_hw)
