"""Attention blocks shared by the decoders.

# m - images (memory rows), g - decoder rows per image (beams), n - regions, d - encoder width,
# a - attention width, h - decoder width
The grid and its projection hold one row per image (M); the decoder state may hold G rows per
image (G beams, image-major: R = M * G rows), so the grid is never copied per beam. With
G = 1 this is ordinary row-by-row attention (teacher forcing, greedy decoding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seesay.layers import gemm

# Without autograd on CPU, the (M, G, N, A) sum of an additive attention step (the largest
# tensor of a decoding step, 16 MiB for 100 images x 5 beams at demo sizes) is computed a few
# images at a time so that it stays in a core's L2 cache: about 20 % more batched beam-search
# captions/s on this project's CPU (benchmarks/decode_throughput.py). GPUs take it in one go.
CPU_CHUNK_ELEMENTS = 1 << 17


def rows_per_image(memory_rows: int, rows: int) -> int:
    """G for a step over `rows` = G * `memory_rows` image-major decoder rows (G beams per image)."""
    if memory_rows == 0 or rows % memory_rows:
        raise ValueError(f"{rows} decoder rows do not split evenly over {memory_rows} images")
    return rows // memory_rows


def grouped_scores(grid_proj: Tensor, query: Tensor, head: Callable[[Tensor], Tensor]) -> Tensor:
    """head(grid_proj[m, n] + query[m, g]) -> (M, G, N).

    grid_proj (M, N, A), query (M, G, A); `head` maps the fresh (..., A) sum, which it may
    overwrite, to its (..., 1) scores (`relu_scores`, `tanh_scores`).
    """
    M, N, A = grid_proj.shape
    G = query.shape[1]

    def block(p: Tensor, q: Tensor) -> Tensor:
        return head(p.unsqueeze(1) + q.unsqueeze(2)).squeeze(-1)

    per_image = G * N * A
    if torch.is_grad_enabled() or grid_proj.device.type != "cpu" or M * per_image <= CPU_CHUNK_ELEMENTS:
        return block(grid_proj, query)
    n = max(1, CPU_CHUNK_ELEMENTS // per_image)
    out = grid_proj.new_empty(M, G, N)
    for i in range(0, M, n):
        out[i : i + n] = block(grid_proj[i : i + n], query[i : i + n])
    return out


def running_scores(grid_proj: Tensor, query: Tensor, head: Callable[[Tensor], Tensor],
                   scores: LoopScores | LoopTanhScores | None) -> Tensor:
    """Teacher forcing's scores (R, N) for the first R rows of the per-row projection grid_proj
    (M >= R rows; query (R, A)): by the forward's loop node (`LoopScores`, `LoopTanhScores`), which
    reads those rows itself, or the plain way, which slices grid_proj only when R is smaller (only
    without grad: under autograd a slice per step costs a gradient of grid_proj's full size)."""
    if scores is not None and scores.fused:
        return scores(query)
    R, N = query.shape[0], grid_proj.shape[1]
    proj = grid_proj if R == grid_proj.shape[0] else grid_proj[:R]
    return grouped_scores(proj, query.view(R, 1, -1), head).view(R, N)


def relu_scores(x: Tensor, score: nn.Linear) -> Tensor:
    """score(relu(x)) (..., 1), computed in x."""
    return score(x.relu_())


def tanh_scores(x: Tensor, score: nn.Linear) -> Tensor:
    """score(tanh(x)) (..., 1), computed in x.

    As tanh(x) = 2 sigmoid(2x) - 1, w^T tanh(x) + b = (2w)^T sigmoid(2x) + b - sum(w): on a CPU
    torch's float32 tanh is about 6x slower than its sigmoid (8.6 vs 1.4 ms over the (32, 196,
    512) sum of a teacher-forcing step at the tutorial's sizes, one thread), and the sum is the
    largest tensor of a step. The scores differ from tanh's by float32 rounding (4e-7 relative).
    """
    w, b = score.weight, score.bias
    return F.linear(x.mul_(2).sigmoid_(), 2 * w, -w.sum(1) if b is None else b - w.sum(1))


class AdditiveAttention(nn.Module):
    """Bahdanau-style attention of Xu et al. (2015): alpha = softmax(w(relu(W_e e + W_h h))).

    The encoder projection does not depend on the step, so callers compute it once with
    `project()` and pass it to every step (the tutorial recomputes it per step).
    """

    def __init__(self, enc_dim: int, dec_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.enc_proj = gemm.Linear(enc_dim, attention_dim)
        self.dec_proj = gemm.Linear(dec_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project(self, grid: Tensor) -> Tensor:
        return self.enc_proj(grid)  # (M, N, A)

    def _head(self, x: Tensor) -> Tensor:
        return relu_scores(x, self.score)

    def forward(self, grid: Tensor, grid_proj: Tensor, h: Tensor, query: Tensor | None = None,
                slots: tuple[Tensor, int] | None = None, scores: LoopScores | None = None,
                images: int | None = None) -> tuple[Tensor, Tensor]:
        """grid (M, N, D), grid_proj (M, N, A), h (R, H) with R = M * G; `query` is dec_proj(h)
        when the caller made it (teacher forcing's `LoopLinear`).

        Teacher forcing passes `slots` (its rows' places among their images' rows, `image_slots`):
        grid_proj has one row per decoder row while `grid` keeps one per image, and the context is
        read per image. h may then hold only the first R of grid_proj's rows (the rows still
        running), whose images may be the first `images` of the grid (`rank_images`); `scores` is
        the forward's `LoopScores` over grid_proj.
        Returns the context (R, D) and the weights alpha (R, N).
        """
        N = grid.shape[1]
        R = h.shape[0]
        query = self.dec_proj(h) if query is None else query
        if slots is not None:  # teacher forcing: one projection row per decoder row, h maybe only the first rows
            alpha = torch.softmax(running_scores(grid_proj, query, self._head, scores), dim=-1)
            return slot_context(alpha, grid, *slots, images=images), alpha
        M = grid_proj.shape[0]
        G = rows_per_image(M, R)
        # in place: the (M, G, N, A) sum is the largest tensor of a beam step, and a second copy
        # of it costs ~2x batched decoding speed on CPU (measured, benchmarks/decode_throughput.py)
        e = grouped_scores(grid_proj, query.view(M, G, -1), self._head)  # (M, G, N)
        alpha = torch.softmax(e, dim=-1)
        context = torch.bmm(alpha, grid)  # (M, G, D): one small matrix product per image, not per beam
        return context.view(R, -1), alpha.view(R, N)


class _StepScores:
    """What `LoopScores` and `LoopTanhScores` share: the attention's P (the per-row projection, (R,
    N, A)) and its score layer; when P needs a gradient, P's gradient is accumulated over the steps
    by the owner and handed to autograd once, through `_ScoresHand`."""

    def __init__(self, proj: Tensor, score: nn.Linear) -> None:
        self.fused = torch.is_grad_enabled() and not torch.is_autocast_enabled(proj.device.type)
        self.acc: Tensor | None = None
        self.scratch: Tensor | None = None
        self.w, self.b = score.weight[0], score.bias
        self.accumulating = self.fused and proj.requires_grad
        self.proj = _ScoresHand.apply(self, proj, self.w) if self.accumulating else proj


class LoopScores(_StepScores):
    """The additive scores w^T relu(P + q_t) + b of every step t of one teacher-forced forward.

    # r - decoder rows, n - regions, a - attention width
    Autograd would keep each step's (R, N, A) activation, make an (R, N, A) gradient per step,
    add it into P's gradient and reduce it twice more (for q_t and w). Here the forward makes the
    activation s_t = relu(P + q_t) in one scratch tensor (cheaper on a CPU than a fresh tensor per
    step, whose pages the system must first map), and the backward makes only its 0/1 pattern
    m_t = [P + q_t > 0] in that tensor, in one pass over P, which enters matrix products:
    u_t = g_t m_t (summed over the regions) gives dq_t = w * u_t. P's gradient, sum_t g_t m_t w, is
    accumulated without w in one fused multiply-add per step and scaled by w once, when autograd
    reaches P after every step (as `seesay.layers.loop.LoopLinear` does for weights). So is most
    of w's: since s_t = m_t (P + q_t), sum_t g_t s_t = sum(acc * P) + sum_t q_t u_t, which needs
    P's accumulation once and a small product per step instead of a pass over s_t per step (about
    a quarter less time in the scores at the tutorial's sizes, one thread). A step may cover only
    P's first rows (the rows still running: teacher forcing sorts them longest first); its passes
    then read and write those rows only. Outside autograd, or under autocast, the attention
    computes the scores the plain way.
    """

    def __call__(self, query: Tensor) -> Tensor:
        """query (R, A) for P's first R rows (the rows still running) -> scores (R, N)."""
        return _Scores.apply(self, self.proj, query, self.w, self.b)

    def _scratch(self, proj: Tensor, rows: int) -> Tensor:
        if self.scratch is None or self.scratch.shape != proj.shape or self.scratch.dtype != proj.dtype:
            self.scratch = torch.empty_like(proj)
        return self.scratch[:rows]

    def activation(self, proj: Tensor, query: Tensor) -> Tensor:
        """relu(P + q) for q's rows, in the scratch tensor (overwritten by the next call)."""
        R = query.shape[0]
        return torch.add(proj[:R], query[:, None], out=self._scratch(proj, R)).relu_()

    def pattern(self, proj: Tensor, query: Tensor) -> Tensor:
        """relu's derivative at P + q, 1.0 where P + q > 0 else 0.0, in the scratch tensor. P > -q
        is the same test as fl(P + q) > 0: a rounded sum keeps the exact sum's sign."""
        R = query.shape[0]
        return torch.gt(proj[:R], query.neg()[:, None], out=self._scratch(proj, R))

    def accumulate(self, grad: Tensor, pattern: Tensor, proj: Tensor) -> None:
        """acc[:R] += grad * pattern for the step's R rows (the backward meets the steps last first)."""
        R = grad.shape[0]
        if self.acc is None:
            self.acc = proj.new_empty(proj.shape)
            torch.mul(grad[..., None], pattern, out=self.acc[:R])
            self.acc[R:].zero_()
        else:
            self.acc[:R].addcmul_(grad[..., None], pattern)

    def finish(self, proj: Tensor, w: Tensor, need_w: bool) -> tuple[Tensor | None, Tensor | None]:
        """P's gradient sum_t g_t m_t w from the accumulation, and w's share sum(acc * P)."""
        acc, self.acc, self.scratch = self.acc, None, None
        if acc is None:
            return None, None
        A = acc.shape[-1]
        dw = (acc.reshape(-1, A) * proj.reshape(-1, A)).sum(0) if need_w else None
        return acc.mul_(w), dw


class _ScoresHand(torch.autograd.Function):
    """Identity on P; its backward adds P's gradient from the steps' accumulation and w's share
    of it, both made by the owner (`LoopScores.finish`, `LoopTanhScores.finish`)."""

    @staticmethod
    def forward(ctx: Any, owner: LoopScores | LoopTanhScores, proj: Tensor, w: Tensor) -> Tensor:
        ctx.owner = owner
        ctx.save_for_backward(proj, w)
        ctx.set_materialize_grads(False)
        return proj.view_as(proj)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> Any:
        proj, w = ctx.saved_tensors
        acc, dw = ctx.owner.finish(proj, w, ctx.needs_input_grad[2])
        if acc is not None:
            grad = acc if grad is None else grad + acc
        return None, grad, dw


class _Scores(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, owner: LoopScores, proj: Tensor, query: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.owner = owner
        ctx.save_for_backward(proj, query, w)
        e = torch.matmul(owner.activation(proj, query), w)
        return e if b is None else e + b

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Any:
        proj, query, w = ctx.saved_tensors
        owner = ctx.owner
        need_p, need_q, need_w, need_b = ctx.needs_input_grad[1:5]
        by_acc = owner.accumulating and need_p  # w's gradient mostly from P's accumulation
        dw = None
        if need_w and not by_acc:  # w's gradient from the activation, made again
            s = owner.activation(proj, query)
            dw = torch.mv(s.flatten(0, 1).t(), grad.reshape(-1))
        m = owner.pattern(proj, query)
        u = torch.bmm(grad[:, None], m).squeeze(1) if need_q or (need_w and by_acc) else None  # (R, A)
        if need_w and by_acc:
            dw = (query * u).sum(0)  # the rest, sum(acc * P), when autograd reaches P (`_ScoresHand`)
        dq = u * w if need_q else None
        db = grad.sum().reshape(1) if need_b else None
        if need_p:
            owner.accumulate(grad, m, proj)
        return None, None, dq, dw, db


class LoopTanhScores(_StepScores):
    """The sentinel attention's scores w^T tanh(P + q_t) + b of every step t of one teacher-forced
    forward, as `LoopScores` does for relu's.

    # r - decoder rows, n - regions, a - attention width
    With s_t = sigmoid(2 (P + q_t)), tanh(P + q_t) = 2 s_t - 1 (`tanh_scores`), so the scores are
    (2w)^T s_t + b - sum(w) and their derivative in P + q_t is 4 w s_t (1 - s_t). s_t is made in
    one scratch tensor, in the forward and again in the backward, instead of kept per step as
    autograd keeps tanh's output: a fresh (R, N, A) tensor per step costs more than making it
    again (the system maps its pages first), and the steps' activations are the loop's largest
    memory (218 MB at the tutorial's sizes). The backward turns s_t into t_t = g_t s_t (1 - s_t)
    in place, in one pass, which gives dq_t = 4 w * sum_n t_t and is added into P's accumulation,
    scaled by 4w once when autograd reaches P after every step. A step covers P's first R rows
    (the rows still running): autograd would make a gradient of P's full size for a slice, at
    every step. Outside autograd, or under autocast, the attention computes the scores the plain
    way.
    """

    def __init__(self, proj: Tensor, score: nn.Linear) -> None:
        super().__init__(proj, score)
        self.doubled: Tensor | None = None

    def __call__(self, query: Tensor) -> Tensor:
        """query (R, A) for P's first R rows (the rows still running) -> scores (R, N)."""
        return _TanhScores.apply(self, self.proj, query, self.w, self.b)

    def activation(self, proj: Tensor, query: Tensor) -> Tensor:
        """sigmoid(2 (P + q)) for q's rows, in the scratch tensor (overwritten by the next call)."""
        if self.doubled is None:  # 2P, once per forward
            self.doubled = proj.detach() * 2
            self.scratch = torch.empty_like(self.doubled)
        R = query.shape[0]
        return torch.add(self.doubled[:R], (query * 2)[:, None], out=self.scratch[:R]).sigmoid_()  # alpha=2: slower

    def accumulate(self, t: Tensor) -> None:
        """acc[:R] += t for the step's R rows (the backward meets the steps last first)."""
        R = t.shape[0]
        if self.acc is None:
            self.acc = t.new_zeros((self.proj.shape[0], *t.shape[1:]))
        self.acc[:R].add_(t)

    def finish(self, proj: Tensor, w: Tensor, need_w: bool) -> tuple[Tensor | None, Tensor | None]:
        """P's gradient 4w * sum_t t_t from the accumulation; w's gradient comes from the steps."""
        acc, self.acc, self.doubled, self.scratch = self.acc, None, None, None
        return (None if acc is None else acc.mul_(4 * w)), None


class _TanhScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, owner: LoopTanhScores, proj: Tensor, query: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        s = owner.activation(proj, query)  # (R, N, A)
        R, N, A = s.shape
        e = torch.mv(s.view(-1, A), 2 * w).view(R, N) - w.sum()
        ctx.owner = owner
        ctx.save_for_backward(proj, query, w)
        return e if b is None else e + b

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Any:
        proj, query, w = ctx.saved_tensors
        owner = ctx.owner
        s = owner.activation(proj, query)  # made again, in the scratch
        R, N, A = s.shape
        need_p, need_q, need_w, need_b = ctx.needs_input_grad[1:5]
        # dL/dw = sum g (2 s - 1), from s before it is overwritten
        dw = torch.mv(s.view(-1, A).t(), grad.reshape(-1)).mul_(2).sub_(grad.sum()) if need_w else None
        db = grad.sum().reshape(1) if need_b else None
        dq = None
        if need_q or (need_p and owner.accumulating):
            t = torch.ops.aten.sigmoid_backward.grad_input(grad[..., None].expand(R, N, A), s, grad_input=s)
            dq = t.sum(1).mul_(4 * w) if need_q else None
            if need_p and owner.accumulating:
                owner.accumulate(t)
        return None, None, dq, dw, db


def image_slots(rows: Tensor, images: int) -> tuple[Tensor, int]:
    """Each decoder row's slot among its image's rows: (image * G + k, G), where k counts the rows
    of the same image before it and G is the most rows any image has (`rows` [R] image ids)."""
    R = rows.numel()
    by_image = torch.sort(rows, stable=True).indices
    counts = torch.bincount(rows, minlength=images)
    starts = torch.cumsum(counts, 0) - counts
    k = torch.empty_like(rows)
    k[by_image] = torch.arange(R, device=rows.device) - starts[rows[by_image]]
    G = int(counts.max()) if R else 1
    return rows * G + k, G


def rank_images(rows: Tensor, images: int) -> tuple[Tensor, Tensor, list[int]]:
    """Number the images in the order of their first decoder row.

    Teacher forcing sorts its rows longest caption first (`decode_order`), so the rows still running
    at a step are a prefix of the rows, and with this numbering their images are a prefix of the
    images: the first `bisect_left(first, n)` images hold the first n rows. `rows` [R] is each
    row's image. Returns the rows' new image ids, `ranked` (the old id of each new image: the grid
    is `grid[ranked]`) and `first`, each new image's first row (R for an image without rows).
    """
    R = rows.numel()
    first = torch.full((images,), R, dtype=rows.dtype, device=rows.device)
    first.scatter_reduce_(0, rows, torch.arange(R, dtype=rows.dtype, device=rows.device), "amin")
    first, ranked = torch.sort(first, stable=True)
    new_id = torch.empty_like(ranked)
    new_id[ranked] = torch.arange(images, dtype=ranked.dtype, device=ranked.device)
    return new_id[rows], ranked, first.tolist()


def slot_context(alpha: Tensor, grid: Tensor, slot: Tensor, G: int, images: int | None = None) -> Tensor:
    """sum_n alpha[r, n] grid[image(r), n] for rows r = 0..R-1 of several captions per image.

    alpha (R, N) with R <= len(slot) (a prefix of the rows: teacher forcing's running rows), grid
    (M, N, D) one row per image. The rows are placed in their image's G slots and each image's
    grid is read once for its rows (a per-row copy of the grid reads it G times: at tutorial sizes
    that read, not the arithmetic, sets the cost of the product). With `images` given, the rows'
    images are the grid's first `images` (`rank_images`) and only those are read.
    """
    R, N = alpha.shape
    M, _, D = grid.shape
    if images is not None and images < M:
        M, grid = images, grid[:images]
    slot = slot[:R]
    placed = alpha.new_zeros(M * G, N).index_copy(0, slot, alpha)
    return torch.bmm(placed.view(M, G, N), grid).view(M * G, D).index_select(0, slot)


class LoopContext:
    """`slot_context` for every step of one teacher-forced forward over a grid that needs a
    gradient (the adaptive decoder's regions), reading only the running rows' images.

    # m - images, g - rows per image (slots), n - regions, d - width
    The images are ranked by their first row (`rank_images`), so a step's running rows belong to
    the first k images; autograd would make a gradient of the whole grid for the slice grid[:k]
    at every step. Here each step's backward adds its share into the first k images of one
    accumulation (one in-place batched product), which autograd receives once, when it reaches the
    grid after every step. Outside autograd, or under autocast, `slot_context` is used as it is.
    """

    def __init__(self, grid: Tensor, slots: tuple[Tensor, int]) -> None:
        self.fused = (torch.is_grad_enabled() and grid.requires_grad
                      and not torch.is_autocast_enabled(grid.device.type))
        self.slot, self.G = slots
        self.acc: Tensor | None = None
        self.grid = _ContextHand.apply(self, grid) if self.fused else grid

    def __call__(self, alpha: Tensor, images: int) -> Tensor:
        """alpha (R, N) for the first R rows, whose images are the grid's first `images` -> (R, D)."""
        if not self.fused:
            return slot_context(alpha, self.grid, self.slot, self.G, images)
        return _Context.apply(self, self.grid, alpha, images)

    def accumulate(self, placed: Tensor, grad: Tensor) -> None:
        """acc[:k] += placed^T grad: placed (k, G, N), grad (k, G, D)."""
        k = placed.shape[0]
        if self.acc is None:
            self.acc = self.grid.new_zeros(self.grid.shape)
        self.acc[:k].baddbmm_(placed.transpose(1, 2), grad)


class _ContextHand(torch.autograd.Function):
    """Identity on the grid; its backward adds the steps' accumulation (`LoopContext`)."""

    @staticmethod
    def forward(ctx: Any, owner: LoopContext, grid: Tensor) -> Tensor:
        ctx.owner = owner
        ctx.set_materialize_grads(False)
        return grid.view_as(grid)

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> Any:
        acc, ctx.owner.acc = ctx.owner.acc, None
        if acc is not None:
            grad = acc if grad is None else grad + acc
        return None, grad


class _Context(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, owner: LoopContext, grid: Tensor, alpha: Tensor, images: int) -> Tensor:
        R, N = alpha.shape
        G, slot = owner.G, owner.slot[:R]
        placed = alpha.new_zeros(images * G, N).index_copy_(0, slot, alpha).view(images, G, N)
        ctx.owner, ctx.images = owner, images
        ctx.save_for_backward(grid, placed, slot)
        return torch.bmm(placed, grid[:images]).view(images * G, -1).index_select(0, slot)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Any:
        grid, placed, slot = ctx.saved_tensors
        k, G, N = placed.shape
        g = grad.new_zeros(k * G, grad.shape[1]).index_copy_(0, slot, grad).view(k, G, -1)
        d_alpha = None
        if ctx.needs_input_grad[2]:
            d_alpha = torch.bmm(g, grid[:k].transpose(1, 2)).view(k * G, N).index_select(0, slot)
        if ctx.needs_input_grad[1]:
            ctx.owner.accumulate(placed, g)
        return None, None, d_alpha, None


class SentinelAttention(nn.Module):
    """Spatial attention with a visual sentinel (Lu et al. 2017, "Knowing When to Look").

    z = w^T tanh(W_v V + W_g h) over the regions and w^T tanh(W_s s + W_g h) for the sentinel;
    a softmax over the N+1 scores gives alpha_hat, whose last entry is the sentinel gate beta.
    The adaptive context is beta * s + (1 - beta) * sum_i alpha_i v_i.
    """

    def __init__(self, dim: int, attention_dim: int) -> None:
        super().__init__()
        self.v_proj = gemm.Linear(dim, attention_dim)
        self.g_proj = gemm.Linear(dim, attention_dim)
        self.s_proj = gemm.Linear(dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project(self, grid: Tensor) -> Tensor:
        return self.v_proj(grid)  # (M, N, A)

    def _head(self, x: Tensor) -> Tensor:
        return tanh_scores(x, self.score)

    def forward(self, grid: Tensor, grid_proj: Tensor, h: Tensor, sentinel: Tensor, query: Tensor | None = None,
                scores: LoopTanhScores | None = None, context: LoopContext | None = None,
                images: int | None = None) -> tuple[Tensor, Tensor]:
        """grid (M, N, H), grid_proj (M, N, A), h and sentinel (R, H) with R = M * G; `query` is
        g_proj(h) when the caller made it (teacher forcing's `LoopLinear`).

        Teacher forcing passes the forward's `context` (`LoopContext` over `grid`, one row per image,
        which knows each row's place among its image's rows) and `scores` (`LoopTanhScores` over
        grid_proj, one row per decoder row); h may then hold only the first R of grid_proj's rows
        (the rows still running), whose images may be the grid's first `images` (`rank_images`).
        Returns the adaptive context (R, H) and alpha_hat (R, N+1), last column = beta.
        """
        M, N, _ = grid.shape
        R = h.shape[0]
        g = self.g_proj(h) if query is None else query  # (R, A)
        if context is not None:
            z = running_scores(grid_proj, g, self._head, scores)
        else:
            G = rows_per_image(M, R)
            z = grouped_scores(grid_proj, g.view(M, G, -1), self._head).view(R, N)
        z_s = tanh_scores(self.s_proj(sentinel) + g, self.score)  # (R, 1)
        alpha_hat = torch.softmax(torch.cat([z, z_s], dim=-1), dim=-1)  # (R, N+1)
        beta = alpha_hat[:, -1:]  # (R, 1)
        if context is not None:
            spatial = context(alpha_hat[:, :-1], M if images is None else images)
        else:
            spatial = torch.bmm(alpha_hat[:, :-1].reshape(M, G, N), grid).view(R, -1)
        return spatial + beta * sentinel, alpha_hat
