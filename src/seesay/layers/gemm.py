"""Float32 matrix products on the CPU through oneDNN, with weights packed once when decoding.

torch's CPU `linear`/`mm` in float32 goes to MKL, which repacks the weight on every call. For
the products of a decoder's step loop (a few to a few hundred rows against the same weight,
step after step) that repacking costs more than the arithmetic: on this project's 2-core
AMD EPYC build machine a 32-row product with a 2048x2048 weight runs at 27 GMAC/s through
MKL and 40-47 through oneDNN with the weight packed once; 5 rows (one image's beams) 11 vs 28;
2 threads double the oneDNN figures and hardly move MKL's small ones
(benchmarks/roofline.py reports both backends). torch ships oneDNN (`torch.backends.mkldnn`)
and exposes the product as `mkldnn::_linear_pointwise`, the op its compiler uses. Given an
unpacked weight, oneDNN is still faster than MKL on this machine, by less: 32 rows 35 vs 25
GMAC/s, 5 rows 14 vs 7.5, a 411x512 by 512x10000 output layer 46 vs 41 (one thread).

`linear` takes oneDNN for a weight of more than `MIN_WEIGHT_ELEMENTS` elements, float32, on the
CPU (`usable`):
- inside a `packing()` block and without autograd (decoding), with the weight packed once;
- elsewhere reading the weight as it is, with autograd through `_Linear`, whose gradient
  products go through oneDNN too (training; `seesay.layers.loop.LoopLinear` uses `dense` and
  `matmul` for its step products). oneDNN reads an unpacked weight only when it is contiguous or
  the transpose of a contiguous one; a slice of columns goes to torch.
and `torch.nn.functional.linear` everywhere else: other devices and dtypes, autocast, tracing,
ONNX export, torch.compile and Python dispatch modes (torch's flop counter counts only its own
ops), builds without oneDNN, non-x86 CPUs (whose oneDNN may route through other libraries), and
when the environment sets SEESAY_ONEDNN=0. Results equal torch's up to the order of float32 sums.

Packing costs about one product's time, so it pays only when a weight is used many times with
the same values: the decoding functions (`seesay.decoding`) open a `packing()` block, inside
which each weight is packed at its first use and reused at every step. A block is the cache's
whole lifetime: weights change between calls (training steps; fused Adam does not even move a
parameter's version counter), never within one decoding call. Training does not pack: packing
the loop's weights once per forward cost about what it saved (in-process A/B, tutorial sizes).
`Linear` is a drop-in nn.Linear (same parameters, same state dict) whose calls go through
`linear` (`seesay.decoders.common.LSTMCell` is its nn.LSTMCell).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@cache
def available() -> bool:
    """oneDNN's packed float32 product can be used in this process (checked once)."""
    if os.environ.get("SEESAY_ONEDNN", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.equal(product(torch.ones(1, 3), pack(torch.ones(2, 3))), torch.full((1, 2), 3.0)))
    except (AttributeError, RuntimeError):
        return False


# Below this many weight elements (512 KiB in float32) the oneDNN call's fixed cost (~15 us, and
# ~10 us of this module's checks) exceeds what packing saves: torch's own product is as fast or
# faster there (5 to 100 rows, measured on the build machine).
MIN_WEIGHT_ELEMENTS = 1 << 17
# An unpacked weight needs more: 16-32 rows by a 512x512 weight run as fast through MKL as through
# oneDNN, by 1024x512 oneDNN is 1.2x faster, by 2048x512 to 10000x512 1.3-2.2x (1 and 2 threads).
MIN_UNPACKED_ELEMENTS = 1 << 18

_OFF: ContextVar[bool] = ContextVar("seesay_gemm_off", default=False)


def usable(x: Tensor, weight: Tensor) -> bool:
    """oneDNN takes this product: a weight of more than `MIN_WEIGHT_ELEMENTS`, float32 on the CPU,
    outside autocast, tracing, compilation, dispatch modes and `torch_products()`."""
    return (weight.numel() > MIN_WEIGHT_ELEMENTS and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.dim() == 2 and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling() and not _dispatch_mode()
            and not _exporting() and not _OFF.get() and available())


def unpackable(weight: Tensor) -> bool:
    """A `usable` product may also read this weight unpacked: more than `MIN_UNPACKED_ELEMENTS`, and
    contiguous or a contiguous tensor's transpose (given a slice of columns, oneDNN falls back to a
    reference loop a thousand times slower: measured)."""
    return weight.numel() > MIN_UNPACKED_ELEMENTS and (weight.is_contiguous() or weight.t().is_contiguous())


@contextmanager
def torch_products() -> Iterator[None]:
    """Inside this block every product is torch's own (A/B benchmarks and tests)."""
    token = _OFF.set(True)
    try:
        yield
    finally:
        _OFF.reset(token)


def _tracked(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _dispatch_mode() -> bool:
    """A Python dispatch mode is active (FlopCounterMode, fake tensors): it must see torch's own ops."""
    return bool(torch._C._len_torch_dispatch_stack())


def _exporting() -> bool:
    onnx = sys.modules.get("torch.onnx")  # not imported: not exporting (and importing it costs 40 ms)
    return onnx is not None and onnx.is_in_onnx_export()


def pack(weight: Tensor) -> Tensor:
    """weight (O, I) in oneDNN's blocked layout for `product` (a copy: about one product's time)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ W.T + bias through oneDNN, `weight` = `pack(W)` or W itself (contiguous, or the transpose
    of a contiguous tensor); no checks and no autograd (see `linear`)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None if bias is None else bias.detach(), "none", [], "")


_SCOPE: ContextVar[dict | None] = ContextVar("seesay_gemm_packs", default=None)


@contextmanager
def packing() -> Iterator[None]:
    """A block whose weights do not change: `linear` packs each weight at its first use in the block
    and reuses it until the block ends. Nested blocks share the outermost one's packs. Usable as a
    decorator; per thread (and per asyncio task)."""
    if active():
        yield
        return
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def active() -> bool:
    """Inside a `packing()` block."""
    return _SCOPE.get() is not None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, cols: tuple[int, int] | None = None) -> Tensor:
    """x @ weight[:, cols].T + bias, through oneDNN where `usable` (packed once per `packing()` block
    when no gradient flows, else read as it is; see the module's docstring), else torch's
    `F.linear`. `cols` (start, stop) multiplies by a block of the weight's columns (the part of an
    input layer that meets one part of its input).

    `weight` should be a parameter (a long-lived tensor): the block keeps each distinct weight
    and its pack until it ends, which for the server is its whole life."""
    part = weight if cols is None else weight[:, cols[0]:cols[1]]
    if not usable(x, part):
        return F.linear(x, part, bias)
    if _tracked(x, part, bias):
        return _Linear.apply(x, part, bias) if unpackable(part) else F.linear(x, part, bias)
    packs = _SCOPE.get()
    if packs is None:
        return dense(x, part, bias)  # no block: oneDNN reads the weight as it is
    key = (id(weight), cols)
    hit = packs.get(key)
    if hit is None:  # the weight is kept with its pack, so that its id cannot be reused within the block
        hit = packs[key] = (weight, pack(part))
    return product(x, hit[1], bias)


def dense(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias through oneDNN (weight not packed) where `usable`, else torch; no autograd
    (for a custom function's forward and backward formulas)."""
    return product(x, weight, bias) if usable(x, weight) and unpackable(weight) else F.linear(x, weight, bias)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for a (..., K) and b (K, N), as `dense`."""
    return dense(a, b.t())


class _Linear(torch.autograd.Function):
    """x W^T + b through oneDNN with autograd: the gradients' products go through oneDNN too."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        return product(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Any:
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = matmul(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = matmul(g.t(), x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear whose calls go through `linear` (oneDNN with a packed weight inside `packing()`)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

