"""The encoder contract.

# b - batch, n - regions (h*w), d - feature width
Every encoder maps normalised images [B,3,H,W] to an `EncoderOutput`: a grid of region
features [B,N,D], a pooled vector [B,D] and the grid's (h, w). Each encoder carries the
`Preprocess` that turns stored uint8 images into its input, so inference reproduces training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderOutput(NamedTuple):
    grid: Tensor  # (B, N, D)
    pooled: Tensor  # (B, D)
    grid_hw: tuple[int, int]
    # (B, P) long ids of a text given to the model as input (T5's encoder side), right-padded with
    # the tokenizer's pad id; read only by decoders with `reads_prompt = True`
    prompt: Tensor | None = None

    def index_select(self, index: Tensor) -> EncoderOutput:
        """Rows picked by `index` (used to repeat an image per caption or per beam)."""
        prompt = None if self.prompt is None else self.prompt.index_select(0, index.to(self.prompt.device))
        return EncoderOutput(self.grid.index_select(0, index), self.pooled.index_select(0, index), self.grid_hw,
                             prompt)

    def to(self, *args: Any, **kwargs: Any) -> EncoderOutput:
        """Moved / cast; the prompt's ids only move (they stay long)."""
        grid = self.grid.to(*args, **kwargs)
        prompt = None if self.prompt is None else self.prompt.to(grid.device)
        return EncoderOutput(grid, self.pooled.to(*args, **kwargs), self.grid_hw, prompt)


@dataclass(frozen=True)
class Preprocess:
    """Resize + normalise, applied in-model to uint8 [B,3,H,W] or float [0,1] batches."""

    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(size=int(d["size"]), mean=tuple(d["mean"]), std=tuple(d["std"]))


class Encoder(nn.Module):
    """Base class: subclasses set `out_dim` and `preprocess` and implement forward().

    `set_fine_tune(flag)` decides which parameters train; by default the whole encoder
    trains when the flag is on and nothing when it is off. Pretrained CNNs override it
    to open only their later blocks.
    """

    out_dim: int
    preprocess: Preprocess

    def forward(self, images: Tensor) -> EncoderOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_fine_tune(self, flag: bool) -> None:
        for p in self.parameters():
            p.requires_grad_(flag)

    @property
    def is_trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())
