"""Attention blocks shared by the decoders.

# b - batch (rows), n - regions, d - encoder width, a - attention width, h - decoder width
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AdditiveAttention(nn.Module):
    """Bahdanau-style attention of Xu et al. (2015): alpha = softmax(w(relu(W_e e + W_h h))).

    The encoder projection does not depend on the step, so callers compute it once with
    `project()` and pass it to every step (the tutorial recomputes it per step).
    """

    def __init__(self, enc_dim: int, dec_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.enc_proj = nn.Linear(enc_dim, attention_dim)
        self.dec_proj = nn.Linear(dec_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project(self, grid: Tensor) -> Tensor:
        return self.enc_proj(grid)  # (B, N, A)

    def forward(self, grid: Tensor, grid_proj: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the context (B, D) and the weights alpha (B, N)."""
        # in place: the (B, N, A) sum is the largest tensor of a beam step, and a second copy of
        # it costs ~2x batched decoding speed on CPU (measured, benchmarks/decode_throughput.py)
        x = grid_proj + self.dec_proj(h).unsqueeze(1)  # (B, N, A)
        e = self.score(x.relu_()).squeeze(-1)  # (B, N)
        alpha = torch.softmax(e, dim=-1)
        context = torch.bmm(alpha.unsqueeze(1), grid).squeeze(1)  # (B, D)
        return context, alpha


class SentinelAttention(nn.Module):
    """Spatial attention with a visual sentinel (Lu et al. 2017, "Knowing When to Look").

    z = w^T tanh(W_v V + W_g h) over the regions and w^T tanh(W_s s + W_g h) for the sentinel;
    a softmax over the N+1 scores gives alpha_hat, whose last entry is the sentinel gate beta.
    The adaptive context is beta * s + (1 - beta) * sum_i alpha_i v_i.
    """

    def __init__(self, dim: int, attention_dim: int) -> None:
        super().__init__()
        self.v_proj = nn.Linear(dim, attention_dim)
        self.g_proj = nn.Linear(dim, attention_dim)
        self.s_proj = nn.Linear(dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project(self, grid: Tensor) -> Tensor:
        return self.v_proj(grid)  # (B, N, A)

    def forward(self, grid: Tensor, grid_proj: Tensor, h: Tensor, sentinel: Tensor) -> tuple[Tensor, Tensor]:
        """Returns the adaptive context (B, H) and alpha_hat (B, N+1), last column = beta."""
        g = self.g_proj(h)  # (B, A)
        z = self.score(torch.tanh(grid_proj + g.unsqueeze(1))).squeeze(-1)  # (B, N)
        z_s = self.score(torch.tanh(self.s_proj(sentinel) + g))  # (B, 1)
        alpha_hat = torch.softmax(torch.cat([z, z_s], dim=-1), dim=-1)  # (B, N+1)
        beta = alpha_hat[:, -1:]  # (B, 1)
        context = torch.bmm(alpha_hat[:, :-1].unsqueeze(1), grid).squeeze(1) + beta * sentinel
        return context, alpha_hat
