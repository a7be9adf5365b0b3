"""A small VQ-VAE that seesay trains itself (`seesay train-vq`), so image tokens work offline and
on users' own images.

# B - batch, C - channels, H/W - pixels, h/w - code grid, K - codebook size, D - code dimension

Encoder: a 3x3 convolution, log2(downsample) stride-2 4x4 convolutions (channels doubling from
hidden / downsample, at least 16, up to `hidden`), two residual blocks, a 1x1 projection to D.
Decoder: the mirror image, with 4x4 transposed convolutions. Images are -1..1 on both sides (as
the VQGAN's).

The codebook learns by exponential moving averages of the encoder outputs assigned to each code
(van den Oord et al. 2017, appendix; VQ-VAE-2), not by gradients; the encoder gets the
straight-through gradient of the reconstruction plus a commitment loss beta * |z - sg(e)|^2.
Codes are initialised from encoder outputs of the first batch. A code not assigned for
`dead_after` steps is restarted at an encoder output of the current batch drawn with probability
proportional to its squared distance from its own code (the worst-represented patches: on the
shapes, the few object pixels rather than the background), so the share of codes in use stays
high instead of collapsing onto a few.
The moving averages are buffers: they are saved with the weights, and only `embedding` matters
for encoding and decoding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seesay.vq.base import VQTokenizer


@dataclass
class SmallVQConfig:
    codebook_size: int = 512
    downsample: int = 8
    image_size: int = 64
    hidden: int = 64
    embed_dim: int = 32
    beta: float = 0.25  # commitment weight
    decay: float = 0.99  # EMA decay of the codebook statistics
    dead_after: int = 50  # restart codes not assigned for this many steps

    def __post_init__(self) -> None:
        ds = int(self.downsample)
        if ds < 2 or ds & (ds - 1):
            raise ValueError(f"downsample must be a power of two >= 2, got {self.downsample}")
        if self.image_size % ds:
            raise ValueError(f"image size {self.image_size} is not divisible by downsample {ds}")
        for name in ("codebook_size", "hidden", "embed_dim"):
            if int(getattr(self, name)) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
        if int(self.dead_after) < 1:
            raise ValueError(f"dead_after must be >= 1, got {self.dead_after}")
        if not 0 < self.decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SmallVQConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown small VQ settings: {', '.join(unknown)}")
        return cls(**d)


class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class EMAQuantizer(nn.Module):
    """Nearest-code quantizer whose codebook follows EMA statistics (see the module doc)."""

    def __init__(self, size: int, dim: int, decay: float, dead_after: int) -> None:
        super().__init__()
        self.decay, self.dead_after = decay, dead_after
        self.register_buffer("embedding", torch.randn(size, dim) * 0.1)  # (K, D)
        self.register_buffer("cluster_size", torch.ones(size))  # (K,) EMA of assignments per step
        self.register_buffer("embed_sum", self.embedding.clone())  # (K, D) EMA of assigned vectors' sum
        self.register_buffer("unused_steps", torch.zeros(size, dtype=torch.long))  # (K,) steps since last assigned
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.restarts = 0  # codes restarted so far (not saved)

    def codes(self, flat: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N,)
        e = self.embedding
        return (flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None] - 2 * flat @ e.t()).argmin(1)

    @torch.no_grad()
    def _random_rows(self, flat: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        """`n` rows of `flat` (with a little noise), uniformly or in proportion to `weights`."""
        if weights is None or not bool(weights.sum() > 0):
            idx = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        else:
            idx = torch.multinomial(weights, n, replacement=n > flat.shape[0])
        return flat[idx] + 0.01 * flat.std() * torch.randn(n, flat.shape[1], device=flat.device)

    @torch.no_grad()
    def update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        """One EMA step on a batch's encoder outputs (N, D) and their codes, then dead-code restarts."""
        if not bool(self.initialised):
            self.embedding.copy_(self._random_rows(flat, self.embedding.shape[0]))
            self.embed_sum.copy_(self.embedding)
            self.initialised.fill_(True)
            return
        onehot = F.one_hot(codes, self.embedding.shape[0]).type(flat.dtype)  # (N, K)
        self.cluster_size.mul_(self.decay).add_(onehot.sum(0), alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        k = self.embedding.shape[0]
        smoothed = (self.cluster_size + 1e-5) / (n + k * 1e-5) * n  # Laplace smoothing: no division by 0
        self.embedding.copy_(self.embed_sum / smoothed[:, None])
        self.unused_steps.add_(1).masked_fill_(onehot.sum(0) > 0, 0)
        dead = self.unused_steps >= self.dead_after
        if dead.any():
            m = int(dead.sum())
            error = (flat - self.embedding[codes]).pow(2).sum(1)  # (N,) how badly each row is represented
            fresh = self._random_rows(flat, m, error)
            self.embedding[dead] = fresh
            self.embed_sum[dead] = fresh
            self.cluster_size[dead] = 1.0
            self.unused_steps[dead] = 0
            self.restarts += m

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quantized with straight-through gradient (B, D, h, w), codes (B, h, w), commitment loss)."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.codes(flat.detach())
        if self.training:
            self.update(flat.detach(), codes)
            codes = self.codes(flat.detach())  # after an initialisation or a restart
        q = self.embedding[codes].reshape(b, h, w, d).permute(0, 3, 1, 2)
        commitment = F.mse_loss(z, q.detach())
        return z + (q - z).detach(), codes.reshape(b, h, w), commitment


class SmallVQ(VQTokenizer):
    type_name = "small"

    def __init__(self, config: SmallVQConfig | None = None) -> None:
        super().__init__()
        self.cfg = c = config or SmallVQConfig()
        n_down = int(math.log2(c.downsample))
        # channels per resolution, doubling as the grid halves up to `hidden`: the full-resolution
        # layers stay thin, which keeps a CPU training step cheap
        width = [min(c.hidden, max(16, c.hidden >> (n_down - i))) for i in range(n_down + 1)]
        enc: list[nn.Module] = [nn.Conv2d(3, width[0], 3, padding=1)]
        for i in range(n_down):
            enc += [nn.SiLU(), nn.Conv2d(width[i], width[i + 1], 4, stride=2, padding=1)]
        enc += [_Residual(c.hidden), _Residual(c.hidden), nn.SiLU(), nn.Conv2d(c.hidden, c.embed_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(c.embed_dim, c.hidden, 3, padding=1), _Residual(c.hidden), _Residual(c.hidden)]
        for i in reversed(range(n_down)):
            dec += [nn.SiLU(), nn.ConvTranspose2d(width[i + 1], width[i], 4, stride=2, padding=1)]
        dec += [nn.SiLU(), nn.Conv2d(width[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.quantize = EMAQuantizer(c.codebook_size, c.embed_dim, c.decay, c.dead_after)
        self.codebook_size, self.downsample, self.image_size = c.codebook_size, c.downsample, c.image_size

    def _encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        b, d, h, w = z.shape
        return self.quantize.codes(z.permute(0, 2, 3, 1).reshape(-1, d)).reshape(b, h, w)

    def _decode_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantize.embedding[codes].permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training step on images -1..1: {"loss", "loss_rec", "loss_commit", "codes", "recon"}."""
        q, codes, commitment = self.quantize(self.encoder(x))
        recon = self.decoder(q)
        rec = F.mse_loss(recon, x)
        return {"loss": rec + self.cfg.beta * commitment, "loss_rec": rec, "loss_commit": commitment,
                "codes": codes, "recon": recon}

    def config(self) -> dict[str, Any]:
        return asdict(self.cfg)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SmallVQ:
        return cls(SmallVQConfig.from_dict(config))
