"""Helpers shared by the recurrent decoders: padding-free teacher forcing and state reordering."""

from __future__ import annotations

import torch
from torch import Tensor

# State keys that depend only on the image (not on the words decoded so far) start with this.
STATIC_PREFIX = "mem_"


def decode_order(lengths: Tensor) -> tuple[Tensor, int, list[int]]:
    """Sort rows longest first so step t runs on the first `rows_per_step[t]` rows only.

    A caption of length L (with <start> and <end>) needs L-1 predictions; no compute is spent on
    padding. Returns (order, number of steps, rows per step).
    """
    steps_per_row = (lengths - 1).clamp(min=0)
    order = torch.sort(steps_per_row, descending=True, stable=True).indices
    counts = sorted(steps_per_row.tolist(), reverse=True)
    steps = counts[0] if counts else 0
    rows_per_step = [sum(1 for c in counts if c > t) for t in range(steps)]
    return order, steps, rows_per_step


def restore_order(order: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Undo `decode_order`'s sort so outputs come back in the caller's batch order."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return tuple(x.index_select(0, inverse) for x in tensors)


def reorder_rows(state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """index_select on dim 0 of every tensor in the state.

    States carry "img" (the image id of each row). When a reorder keeps every row on the same
    image (beam reordering), the per-image memory (keys starting with "mem_") is left as it
    is instead of being copied, which matters at 196 regions x 2048 channels x beams.
    """
    img = state.get("img")
    same_images = img is not None and torch.equal(img.index_select(0, index), img)
    return {k: v if (same_images and k.startswith(STATIC_PREFIX)) else v.index_select(0, index)
            for k, v in state.items()}


def image_ids(batch: int, device: torch.device) -> Tensor:
    return torch.arange(batch, device=device)
