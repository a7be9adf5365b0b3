"""Float32 matrix products on the CPU through oneDNN, with weights packed once when decoding.

torch's CPU `linear`/`mm` in float32 goes to MKL, which repacks the weight on every call. For
the products of a decoder's step loop (a few to a few hundred rows against the same weight,
step after step) that repacking costs more than the arithmetic: on this project's 2-core
AMD EPYC build machine a 32-row product with a 2048x2048 weight runs at 27 GMAC/s through
MKL and 40-47 through oneDNN with the weight packed once; 5 rows (one image's beams) 11 vs 28;
2 threads double the oneDNN figures and hardly move MKL's small ones
(benchmarks/roofline.py reports both backends). torch ships oneDNN (`torch.backends.mkldnn`)
and exposes the product as `mkldnn::_linear_pointwise`, the op its compiler uses.

`linear` takes oneDNN inside a `packing()` block, without autograd (decoding), for a weight of
more than `MIN_WEIGHT_ELEMENTS` elements, float32, on the CPU (`usable`), with the weight packed
once per block; everywhere else it is `torch.nn.functional.linear`: training and any forward
outside a block, other devices and dtypes, autocast, tracing, ONNX export, torch.compile and
Python dispatch modes (torch's flop counter counts only its own ops), builds without oneDNN,
non-x86 CPUs (whose oneDNN may route through other libraries), and when the environment sets
SEESAY_ONEDNN=0. Results equal torch's up to the order of float32 sums.

Packing costs about one product's time, so it pays only when a weight is used many times with
the same values: the decoding functions (`seesay.decoding`) open a `packing()` block, inside
which each weight is packed at its first use and reused at every step. A block is the cache's
whole lifetime: weights change between calls (training steps; fused Adam does not even move a
parameter's version counter), never within one decoding call.

Training stays on torch's products. oneDNN builds (JIT-compiles) a kernel for every new shape
and keeps up to 1024 of them: about 0.5 ms for a few rows by a 2048x512 weight, 3-5 ms for
400 rows by the 10000x512 output layer, on top of the product. A batch of new captions brings
new shapes (the all-steps products' row counts, the loop's per-step row counts, the weight
gradients' inner sizes), so with a new batch at every step, training through oneDNN took
1.11-1.17x torch's time in the four families measured, and the kept kernels grew the process
by up to 1.5 GB (soft attention, 128 captions; tutorial sizes, Intel Xeon, two threads;
`benchmarks/onednn_varying.py`, docs/performance.md). The speedups measured earlier came from
repeating one batch, whose kernels were all built at its first step. Decoding's shapes are
few (rows = live beams, at most batch x beam size) and its packed weights save MKL's repacking
at every step, which decides it there (on AMD CPUs; on an Intel Xeon MKL's small products were
about as fast: docs/performance.md).

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
_OFF: ContextVar[bool] = ContextVar("seesay_gemm_off", default=False)


def usable(x: Tensor, weight: Tensor) -> bool:
    """oneDNN takes this product: a weight of more than `MIN_WEIGHT_ELEMENTS`, float32 on the CPU,
    outside autocast, tracing, compilation, dispatch modes and `torch_products()`."""
    return (weight.numel() > MIN_WEIGHT_ELEMENTS and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and weight.dim() == 2 and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling() and not _dispatch_mode()
            and not _exporting() and not _OFF.get() and available())


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
    """x @ W.T + bias through oneDNN, `weight` = `pack(W)`; no checks and no autograd (see `linear`)."""
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
    """x @ weight[:, cols].T + bias: inside a `packing()` block and without autograd through oneDNN
    where `usable`, with the weight packed at its first use in the block; else torch's `F.linear`
    (see the module's docstring). `cols` (start, stop) multiplies by a block of the weight's
    columns (the part of an input layer that meets one part of its input).

    `weight` should be a parameter (a long-lived tensor): the block keeps each distinct weight
    and its pack until it ends, which for the server is its whole life."""
    part = weight if cols is None else weight[:, cols[0]:cols[1]]
    packs = _SCOPE.get()
    if packs is None or _tracked(x, part, bias) or not usable(x, part):
        return F.linear(x, part, bias)
    key = (id(weight), cols)
    hit = packs.get(key)
    if hit is None:  # the weight is kept with its pack, so that its id cannot be reused within the block
        hit = packs[key] = (weight, pack(part))
    return product(x, hit[1], bias)


class Linear(nn.Linear):
    """nn.Linear whose calls go through `linear` (oneDNN with a packed weight inside `packing()`)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)

