"""Helpers shared by the recurrent decoders: padding-free teacher forcing and state reordering."""

from __future__ import annotations

import torch
from torch import Tensor

from seesay.layers import gemm

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
    """Pick rows of the state: `index_select(0, index)` on every per-row tensor.

    Per-image memory (keys starting with "mem_": the grid, its attention projection, the
    cross-attention keys/values) is not duplicated per row. States carry "img", the image id
    of each row; rows are image-major (each image's rows are consecutive, ids ascending) and
    the memory holds one row per image, in that order. A step with R rows over M memory rows
    therefore serves G = R / M rows (beams) per image. A reorder that keeps the same images
    (beam reordering, expanding each image to K beams) leaves the memory untouched; one that
    keeps a subset of the images (finished images leaving a batch) selects their memory rows.
    Anything else (images in another order, or unequal rows per image) gives every row its
    own copy of its image's memory, which is always correct.
    """
    img = state.get("img")
    if img is None:
        return {k: v.index_select(0, index) for k, v in state.items()}
    new_img = img.index_select(0, index)
    if torch.equal(new_img, img):  # beam reordering, every step: the cheap common case
        return {k: v if k.startswith(STATIC_PREFIX) else v.index_select(0, index) for k, v in state.items()}
    old_images = torch.unique_consecutive(img)
    new_images, counts = torch.unique_consecutive(new_img, return_counts=True)
    grouped = bool((new_images[1:] > new_images[:-1]).all()) and bool((counts == counts[0]).all()) if counts.numel() else True
    mem_rows: Tensor | None = None  # None: keep the memory as it is
    if not grouped:
        mem_rows = torch.searchsorted(old_images, new_img)
        new_img = torch.arange(new_img.numel(), device=new_img.device)  # every row is its own group now
    elif not torch.equal(new_images, old_images):
        mem_rows = torch.searchsorted(old_images, new_images)
    out = {}
    for k, v in state.items():
        if k == "img":
            out[k] = new_img
        elif k.startswith(STATIC_PREFIX):
            out[k] = v if mem_rows is None else v.index_select(0, mem_rows)
        else:
            out[k] = v.index_select(0, index)
    return out


def reorder_beam_rows(state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """`reorder_rows` for an index that keeps every row within its image and every image's number of
    rows (beam search's reorder at each step): the per-image memory and "img" stay as they are,
    without the comparison (a host sync) `reorder_rows` needs to find that out."""
    return {k: v if k.startswith(STATIC_PREFIX) or k == "img" else v.index_select(0, index) for k, v in state.items()}


def per_row(mem: Tensor, rows: int) -> Tensor:
    """Per-image memory `mem` (M rows) for a step over `rows` decoder rows.

    Teacher forcing keeps one memory row per caption, sorted longest first, and step t runs on
    the first `rows` of them; decoding keeps one row per image and runs `rows` = G * M
    image-major rows (G beams per image).
    """
    M = mem.shape[0]
    return mem[:rows] if rows <= M else mem.repeat_interleave(rows // M, dim=0)


def image_ids(batch: int, device: torch.device) -> Tensor:
    return torch.arange(batch, device=device)


# -- teacher forcing without per-step work that does not depend on the recurrence --------------


def row_memory(mem: Tensor, rows: Tensor | None) -> Tensor:
    """Per-image tensor `mem` (M, ...) as one row per decoder row: `rows` [R] names each row's image
    (None: row i is image i). Decoders compute per-image work (grid projections, keys/values) on
    the M images first and copy the results to their rows here, instead of recomputing it per row."""
    return mem if rows is None else mem.index_select(0, rows)


def lstm_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """nn.LSTMCell's update from its summed pre-activations `gates` (R, 4H) in its order i, f, g, o.

    Teacher forcing computes the parts of `gates` that do not depend on the recurrence (the word
    embedding's product with W_ih, both biases) for every step in one product before the loop.
    """
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class LSTMCell(torch.nn.LSTMCell):
    """nn.LSTMCell (same parameters, same state dict) whose gates come from `gemm.linear` inside a
    `gemm.packing()` block where that applies (decoding on a CPU); elsewhere torch's own cell."""

    def forward(self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if hx is None or x.dim() != 2 or not gemm.active():
            return super().forward(x, hx)
        h, c = hx
        if not (gemm.usable(x, self.weight_ih) or gemm.usable(h, self.weight_hh)):
            return super().forward(x, hx)
        return lstm_cell(gemm.linear(x, self.weight_ih, self.bias_ih) + gemm.linear(h, self.weight_hh, self.bias_hh), c)


def input_gates(lstm: torch.nn.LSTMCell, x: Tensor, start: int = 0, stop: int | None = None,
                weight: Tensor | None = None) -> Tensor:
    """x @ W_ih[:, start:stop].T + b_ih + b_hh: the LSTM input's share of the gates for an input slice
    (the words of every step at once in teacher forcing). `weight`, when given, is that slice,
    already taken (`split_input_weight`)."""
    bias = lstm.bias_ih + lstm.bias_hh if lstm.bias else None
    if weight is not None:
        return gemm.linear(x, weight, bias)
    stop = lstm.weight_ih.shape[1] if stop is None else stop
    return gemm.linear(x, lstm.weight_ih, bias, cols=(start, stop))


def split_input_weight(lstm: torch.nn.LSTMCell, width: int) -> tuple[Tensor, Tensor]:
    """W_ih's columns [:width] and [width:], each contiguous, for a training forward that uses both
    parts: one split gives W_ih one gradient, made by concatenation (two slices would each make a
    zero-filled gradient of W_ih's full size, then add them)."""
    first, rest = lstm.weight_ih.split([width, lstm.weight_ih.shape[1] - width], dim=1)
    return first.contiguous(), rest.contiguous()


def step_positions(order: Tensor, rows_per_step: list[int], time: int) -> Tensor:
    """Where each row of a length-sorted loop's step-major outputs goes in the caller's (B, time)
    layout, flattened: b * time + t (`decode_order`: sorted row r is the caller's row order[r])."""
    counts = torch.tensor(rows_per_step, dtype=torch.long, device=order.device)
    t = torch.repeat_interleave(torch.arange(len(rows_per_step), device=order.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    r = torch.arange(t.numel(), device=order.device) - starts.repeat_interleave(counts)
    return order[r] * time + t


def unpack_steps(packed: Tensor, order: Tensor, rows_per_step: list[int], time: int) -> Tensor:
    """Step-major outputs of a length-sorted loop -> (B, time, X) in the caller's row order.

    `packed` (sum(rows_per_step), X) concatenates step t's outputs for the first rows_per_step[t]
    sorted rows; sorted row r is the caller's row order[r] (`decode_order`). Positions no step
    reached are zeros, as the decoder contract asks of padding. One product over `packed` (the
    output layer) replaces one per step.
    """
    B = order.numel()
    X = packed.shape[-1]
    out = packed.new_zeros(B * time, X)
    if packed.shape[0]:
        out.index_copy_(0, step_positions(order, rows_per_step, time), packed)  # in place: no second tensor
    return out.view(B, time, X)


def step_outputs(logits: Tensor, order: Tensor, rows_per_step: list[int], time: int, packed: bool
                 ) -> tuple[Tensor, Tensor | None]:
    """The teacher-forced logits as the decoder contract gives them: (B, time, V) padded, or, when
    the caller asked for `packed` (`forward(..., packed=True)`), the step-major rows as they are
    with their positions (`step_positions`)."""
    if packed:
        return logits, step_positions(order, rows_per_step, time)
    return unpack_steps(logits, order, rows_per_step, time), None
