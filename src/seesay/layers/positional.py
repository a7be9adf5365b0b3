"""Sinusoidal position encodings (Vaswani et al. 2017), 1-D for words and 2-D for image grids."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """(P,) positions -> (P, dim) encodings; dim must be even."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32) * (-math.log(10000.0) / half))
    angles = positions.float()[:, None] * freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sinusoid_2d(h: int, w: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(h*w, dim) encodings, row-major: half the channels encode the row, half the column."""
    rows = sinusoid(torch.arange(h, device=device), dim // 2)  # (h, dim/2)
    cols = sinusoid(torch.arange(w, device=device), dim // 2)  # (w, dim/2)
    return torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1).reshape(h * w, dim)
