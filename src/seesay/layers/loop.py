"""Linear layers used at every step of a Python loop, with one weight gradient per loop.

# t - steps, n - rows at a step, i - input width, o - output width
Autograd computes a weight's gradient at each use: a teacher-forced LSTM decoder over T steps
makes T small (o, i) products (each over the step's few rows, the slow shape on a CPU) and adds
each into the (o, i) gradient buffer, which costs as much again as the products at tutorial
sizes. `LoopLinear` keeps the step's (input, output gradient) rows instead and makes the
weight's gradient once, sum_t g_t^T x_t = G^T X over all steps' rows, in one large product.

How: the weight reaches the loop through an identity node (`_Hand`) whose backward autograd runs
only after every step that used the weight has run its own backward (each step depends on it),
so by then every step has left its rows. The result is the same gradient, up to the order of
floating-point sums. Inputs' gradients are computed per step as before (the recurrence needs
them). Under autocast the weight is cast once per loop to the autocast dtype. The products are
torch's: oneDNN's, with the weight packed once per loop, were faster on a repeated batch but
slower on real batches, whose every new row count costs a kernel build
(`seesay.layers.gemm`'s docstring).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from seesay.layers import gemm


class LoopLinear:
    """y = x W^T + b for every step of one forward pass; weight (and bias) gradients made once.

    Build one per forward (it holds that forward's rows until backward) and call it at each step.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        self._xs: list[Tensor] = []
        self._gs: list[Tensor] = []
        weight = weight.contiguous()  # once per loop: a slice of columns costs a copy per product
        params = (weight,) if bias is None else (weight, bias)
        self.track = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if self.track:
            out = _Hand.apply(self, *params)
            params = out if isinstance(out, tuple) else (out,)
        device = weight.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            params = tuple(p.to(dtype) for p in params)
        self.weight = params[0]
        self.bias = params[1] if len(params) > 1 else None

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.weight.dtype)
        if not self.track:
            return gemm.linear(x, self.weight, self.bias)
        return _Step.apply(self, x, self.weight, self.bias)

    def _keep(self, x: Tensor, grad: Tensor) -> None:
        self._xs.append(x.reshape(-1, x.shape[-1]))
        self._gs.append(grad.reshape(-1, grad.shape[-1]))

    def _gradients(self) -> tuple[Tensor | None, Tensor | None]:
        """G^T X and the sum of G over all kept rows; the rows are released."""
        if not self._gs:
            return None, None
        g, x = torch.cat(self._gs), torch.cat(self._xs)
        self._xs, self._gs = [], []
        return g.t() @ x, g.sum(0)


class _Hand(torch.autograd.Function):
    """Identity on the parameters; its backward makes their gradients from the steps' rows.

    The owner keeps this node's outputs (its weight and bias), so the node holds the owner only
    weakly: a strong reference would close a cycle through autograd's C++ graph that Python's
    garbage collector does not see when the node has two outputs, and every biased `LoopLinear`
    of every training step would stay in memory (two per step for soft attention). The steps'
    nodes (`_Step`) hold the owner until backward has passed them, so it is alive here whenever
    a step used it."""

    @staticmethod
    def forward(ctx: Any, owner: LoopLinear, *params: Tensor) -> Any:
        ctx.owner = weakref.ref(owner)
        ctx.set_materialize_grads(False)
        out = tuple(p.view_as(p) for p in params)
        return out if len(out) > 1 else out[0]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> Any:
        owner = ctx.owner()
        gw, gb = owner._gradients() if owner is not None else (None, None)
        made = (gw, gb)[: len(grads)]
        out = []
        for direct, loop in zip(grads, made):  # a direct use of the parameter outside the steps adds
            if loop is None:
                out.append(direct)
            else:
                out.append(loop if direct is None else direct + loop.to(direct.dtype))
        return (None, *out)


class _Step(torch.autograd.Function):
    """One step's product; its backward keeps (x, grad) for the weight and returns x's gradient."""

    @staticmethod
    def forward(ctx: Any, owner: LoopLinear, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.owner = owner
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:
        x, weight = ctx.saved_tensors
        ctx.owner._keep(x, grad)
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[1] else None
        return None, grad_x, None, None
