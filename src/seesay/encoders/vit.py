"""`vit`: a Vision Transformer (Dosovitskiy et al., 2020) through the encoder contract.

The patch tokens form the grid ((image_size / patch_size)^2 regions), the pooled vector is
the CLS token (`pooled="cls"`) or the mean of the patch tokens (`pooled="mean"`). Written with
plain torch (nn.MultiheadAttention, which dispatches to scaled-dot-product attention); no timm.

Module and parameter names mirror torchvision's `VisionTransformer` (conv_proj, class_token,
encoder.pos_embedding, encoder.layers.encoder_layer_{i}.{ln_1,self_attention,ln_2,mlp},
encoder.ln), so a torchvision ViT state dict (e.g. a saved `vit_b_16` file) loads directly with
`weights=PATH`; its classification head is dropped and the position embeddings are resized
(bicubic) when the file was trained at another image size.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seesay.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderOutput, Preprocess
from seesay.encoders.cnn import FrozenBatchNormMixin
from seesay.encoders.weights import load_into, read_state_dict
from seesay.errors import SeesayError
from seesay.registry import register_encoder


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float, attention_dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=attention_dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim), nn.Dropout(dropout)
        )
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class _ViTTrunk(nn.Module):
    def __init__(self, seq_len: int, dim: int, depth: int, heads: int, mlp_dim: int, dropout: float,
                 attention_dropout: float) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_len, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(
            OrderedDict(
                (f"encoder_layer_{i}", ViTBlock(dim, heads, mlp_dim, dropout, attention_dropout))
                for i in range(depth)
            )
        )
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformerEncoder(FrozenBatchNormMixin, Encoder):
    """ViT encoder. Defaults are ViT-B/16: 224 px, 16 px patches, width 768, 12 layers, 12 heads,
    MLP 3072, dropout 0.1. Tiny CPU settings, e.g.: image_size=32, patch_size=8, dim=64, depth=2,
    heads=2, mlp_dim=128.

    forward(images [B,3,S,S] normalised) -> EncoderOutput(grid [B,(S/P)^2,dim], pooled [B,dim], (S/P,S/P)).
    `forward_tokens(images)` returns all tokens [B,1+N,dim] (CLS first) after the final LayerNorm.
    Fine-tuning (`set_fine_tune(True)`) opens every parameter: a ViT is usually trained end to end.
    A frozen ViT stays in eval mode (no dropout) even inside a model in train().
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        dropout: float = 0.1,
        pooled: str = "cls",
        attention_dropout: float = 0.0,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise SeesayError(f"vit: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if dim % heads != 0:
            raise SeesayError(f"vit: dim {dim} is not divisible by heads {heads}")
        if pooled not in ("cls", "mean"):
            raise SeesayError(f"vit: pooled must be 'cls' or 'mean', not {pooled!r}")
        self.image_size, self.patch_size = image_size, patch_size
        self.dim, self.depth, self.heads, self.mlp_dim = dim, depth, heads, mlp_dim
        self.pooled_mode = pooled
        self.grid_side = image_size // patch_size
        self.conv_proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        # torchvision's initialisation (LeCun normal patch projection, zero CLS)
        fan_in = 3 * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = _ViTTrunk(self.grid_side**2 + 1, dim, depth, heads, mlp_dim, dropout, attention_dropout)
        self.out_dim = dim
        self.preprocess = Preprocess(size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.pretrained = weights is not None
        if weights is not None:
            self.load_torchvision_weights(weights)

    def forward_tokens(self, images: Tensor) -> Tensor:
        x = self.conv_proj(images)  # (B, dim, h, w)
        b, d, h, w = x.shape
        if (h, w) != (self.grid_side, self.grid_side):
            raise SeesayError(
                f"vit: expected {self.image_size}x{self.image_size} images, got "
                f"{images.shape[-2]}x{images.shape[-1]} (apply encoder.preprocess first)"
            )
        x = x.flatten(2).transpose(1, 2)  # (B, N, dim)
        x = torch.cat([self.class_token.expand(b, -1, -1), x], dim=1)
        return self.encoder(x)

    def set_fine_tune(self, flag: bool) -> None:
        super().set_fine_tune(flag)
        self._refresh_bn_mode()

    def forward(self, images: Tensor) -> EncoderOutput:
        tokens = self.forward_tokens(images)
        grid = tokens[:, 1:]
        pooled = tokens[:, 0] if self.pooled_mode == "cls" else grid.mean(dim=1)
        return EncoderOutput(grid, pooled, (self.grid_side, self.grid_side))

    # ---- weights -------------------------------------------------------------------------
    def load_torchvision_weights(self, path: str | Path) -> None:
        """Load a torchvision VisionTransformer state dict (.pth/.pt or .safetensors)."""
        state = read_state_dict(path, "vit")
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}
        for k in list(state):  # torchvision's pre-v2 MLP names
            for i, new in (("1", "0"), ("2", "3")):
                if f".mlp.linear_{i}." in k:
                    state[k.replace(f".mlp.linear_{i}.", f".mlp.{new}.")] = state.pop(k)
        pos = state.get("encoder.pos_embedding")
        if pos is not None and pos.shape != self.encoder.pos_embedding.shape and pos.shape[-1] == self.dim:
            state["encoder.pos_embedding"] = _resize_pos_embedding(pos, self.grid_side)
        load_into(self, state, str(path), optional_prefixes=(),
                  expected=f"not a torchvision ViT state dict for this configuration (dim={self.dim}, "
                           f"depth={self.depth}, patch_size={self.patch_size})")


def _resize_pos_embedding(pos: Tensor, side: int) -> Tensor:
    """[1, 1+n*n, D] -> [1, 1+side*side, D] by bicubic interpolation of the patch part."""
    cls, patches = pos[:, :1], pos[:, 1:]
    old = int(round(math.sqrt(patches.shape[1])))
    if old * old != patches.shape[1]:
        return pos  # not a square grid: left for the shape check to report
    d = patches.shape[-1]
    grid = patches.reshape(1, old, old, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(side, side), mode="bicubic", align_corners=True).to(pos.dtype)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, side * side, d)], dim=1)


@register_encoder("vit")
def vit(
    *,
    image_size: int = 224,
    patch_size: int = 16,
    dim: int = 768,
    depth: int = 12,
    heads: int = 12,
    mlp_dim: int = 3072,
    dropout: float = 0.1,
    pooled: str = "cls",
    weights: str | None = None,
) -> VisionTransformerEncoder:
    if isinstance(weights, str) and weights.lower() in ("", "none"):
        weights = None
    return VisionTransformerEncoder(
        image_size=image_size, patch_size=patch_size, dim=dim, depth=depth, heads=heads,
        mlp_dim=mlp_dim, dropout=dropout, pooled=pooled, weights=weights,
    )
