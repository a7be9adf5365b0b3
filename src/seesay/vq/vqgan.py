"""The taming-transformers VQGAN (Esser et al. 2021), written for seesay.

# B - batch, C - channels, H/W - pixels, h/w - code grid, K - codes (n_embed), D - embed_dim

The parameter names are taming's (`encoder.*`, `decoder.*`, `quant_conv.*`, `quantize.embedding.weight`,
`post_quant_conv.*`), so the state dict of a taming `VQModel` checkpoint, less its `loss.*` keys
(discriminator and LPIPS), loads strictly (`seesay convert vqgan`). Defaults are the f16 model with
16384 codes: ch 128, ch_mult (1, 1, 2, 2, 4), 2 residual blocks per level, attention at 16 px,
z_channels = embed_dim = 256; a 256 px image becomes 16x16 codes.

What taming does and this file keeps: swish activations; GroupNorm with 32 groups (eps 1e-6);
downsampling by a stride-2 3x3 convolution after padding right and bottom by one; upsampling by
nearest-neighbour x2 then a 3x3 convolution; single-head attention over the whole grid with 1x1
convolutions q, k, v, proj_out and scale C^-1/2 (here through `scaled_dot_product_attention`,
the same arithmetic); the decoder has one more residual block per level than the encoder; no
time embedding (taming's `temb_channels=0`), no `double_z`. Images are -1..1 on both sides.
The quantizer picks the code at the smallest Euclidean distance (taming's VectorQuantizer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seesay.vq.base import VQTokenizer


@dataclass
class VQGANConfig:
    """taming's `ddconfig` plus `n_embed` / `embed_dim` (model.yaml: model.params)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 16384
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be positive integers, got {self.ch_mult}")
        for name in ("ch", "num_res_blocks", "z_channels", "embed_dim", "n_embed", "resolution"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(self.ch * m % 32 for m in self.ch_mult):
            raise ValueError(f"ch * ch_mult must be multiples of 32 (GroupNorm with 32 groups), got ch {self.ch}")
        if self.resolution % (2 ** (len(self.ch_mult) - 1)):
            raise ValueError(f"resolution {self.resolution} is not divisible by 2^{len(self.ch_mult) - 1}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQGANConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown VQGAN settings: {', '.join(unknown)}")
        return cls(**d)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: `block`, `attn` (empty when this resolution has none), and `downsample` /
    `upsample` except at the last level (taming's anonymous nn.Module with the same names)."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Middle(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, c: VQGANConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        res, block_in = c.resolution, c.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(c.ch_mult):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(block_in, c.ch * mult, c.dropout))
                block_in = c.ch * mult
                if res in c.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _Middle(block_in, c.dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, z, h, w)
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VQGANConfig) -> None:
        super().__init__()
        block_in = c.ch * c.ch_mult[-1]
        res = c.resolution // 2 ** (len(c.ch_mult) - 1)
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = _Middle(block_in, c.dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(c.ch_mult))):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, c.ch * c.ch_mult[i], c.dropout))
                block_in = c.ch * c.ch_mult[i]
                if res in c.attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)  # up[0] is the full resolution, as in taming
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, z, h, w) -> (B, 3, H, W)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest code by Euclidean distance; `embedding.weight` is [K, D]."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def codes(self, z: torch.Tensor) -> torch.Tensor:  # (B, D, h, w) -> (B, h, w)
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        e = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None] - 2 * flat @ e.t()
        return dist.argmin(1).reshape(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:  # (B, h, w) -> (B, D, h, w)
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class VQGAN(VQTokenizer):
    type_name = "vqgan"

    def __init__(self, config: VQGANConfig | None = None) -> None:
        super().__init__()
        self.cfg = config or VQGANConfig()
        c = self.cfg
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quantize = VectorQuantizer(c.n_embed, c.embed_dim)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)
        self.codebook_size = c.n_embed
        self.downsample = 2 ** (len(c.ch_mult) - 1)
        self.image_size = c.resolution

    def _encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize.codes(self.quant_conv(self.encoder(x)))

    def _decode_pixels(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction -1..1 of images -1..1 (what taming's VQModel.forward returns first)."""
        return self._decode_pixels(self._encode_pixels(x))

    def config(self) -> dict[str, Any]:
        d = asdict(self.cfg)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VQGAN:
        return cls(VQGANConfig.from_dict(config))
