"""`swinv2`: a Swin Transformer v2 (Liu et al., 2022; Hugging Face `Swinv2Model`) through the
encoder contract.

# b - batch, n - patches of the last stage (h*w), d - hidden size
grid = last_hidden_state [B, N, D] (the final stage's patch grid), pooled = the pooler output
(mean of the grid) [B, D], grid_hw = that grid's (h, w). `forward(images, bool_masked_pos=...)`
passes a [B, num_patches] mask through (the model is built with `use_mask_token=True`), for
masked-image objectives.

Sources (`seesay.hf`): `image_model_name` is a hub name or a local `save_pretrained` directory;
`config` overrides its config (or, with `image_model_name=None`, is the whole config: tiny
models). `weights="pretrained"` loads the weights, "none" builds the architecture with random
weights. The resolved config goes into the model spec (`resolved_options`), so a checkpoint
rebuilds offline: checkpoints load with weights "none" and a full config, reading no file.

Preprocessing: the model's `image_size`; mean/std from the directory's preprocessor_config.json
(`image_mean` / `image_std`) when there is one, else ImageNet's (what every Swin v2 processor on
the hub uses); `image_mean` / `image_std` options override both. Saved with the checkpoint.

Frozen (`set_fine_tune(False)`, the default) the whole model stays in eval mode (no drop path),
so its features are fixed and training caches them; `fine_tune=True` trains all of it (the
recipe key `image_model_train`). `gradient_checkpointing` trades compute for memory.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from seesay.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, EncoderOutput, Preprocess
from seesay.encoders.cnn import FrozenBatchNormMixin
from seesay.errors import SeesayError
from seesay.hf import (
    enable_checkpointing,
    is_local,
    load_config,
    load_model,
    plain_config,
    read_json_file,
    require_transformers,
)
from seesay.registry import register_encoder

DEFAULT_IMAGE_MODEL = "microsoft/swinv2-base-patch4-window8-256"
OPTION = "encoder swinv2 image_model_name"


class Swinv2Encoder(FrozenBatchNormMixin, Encoder):
    masks_patches = True  # forward takes bool_masked_pos [B, num_patches] (seesay.train.mim)

    def __init__(self, model: Any, preprocess: Preprocess, *, pretrained: bool,
                 resolved: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.out_dim = int(cfg.hidden_size)
        self.preprocess = preprocess
        self.pretrained = pretrained
        self._resolved = resolved or {}
        side = cfg.image_size // cfg.patch_size
        for _ in range(len(cfg.depths) - 1):  # each patch merging halves the grid (odd sizes are padded)
            side = math.ceil(side / 2)
        self.grid_side = side

    def resolved_options(self) -> dict[str, Any]:
        """Options to add to the model spec so it rebuilds without the hub (see the module doc)."""
        return dict(self._resolved)

    @property
    def num_patches(self) -> int:
        """Patches of the first stage: the width of `bool_masked_pos`."""
        cfg = self.model.config
        return int(cfg.image_size // cfg.patch_size) ** 2

    def forward(self, images: Tensor, bool_masked_pos: Tensor | None = None) -> EncoderOutput:
        out = self.model(pixel_values=images, bool_masked_pos=bool_masked_pos)
        grid = out.last_hidden_state  # (B, N, D)
        n = grid.shape[1]
        hw = (self.grid_side, self.grid_side)
        if hw[0] * hw[1] != n:
            side = int(round(math.sqrt(n)))
            hw = (side, n // side)
        pooled = out.pooler_output if out.pooler_output is not None else grid.mean(dim=1)
        return EncoderOutput(grid, pooled, hw)

    def set_fine_tune(self, flag: bool) -> None:
        super().set_fine_tune(flag)
        self._refresh_bn_mode()


def _mean_std(name: str | None, image_mean: Any, image_std: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if is_local(name):
        proc = read_json_file(name, "preprocessor_config.json") or {}
        mean, std = tuple(proc.get("image_mean", mean)), tuple(proc.get("image_std", std))
    if image_mean is not None:
        mean = tuple(image_mean)
    if image_std is not None:
        std = tuple(image_std)
    if len(mean) != 3 or len(std) != 3:
        raise SeesayError(f"encoder swinv2: image_mean and image_std need 3 values (RGB), got {list(mean)} / {list(std)}")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


@register_encoder("swinv2")
def swinv2(*, image_model_name: str | None = DEFAULT_IMAGE_MODEL, config: dict[str, Any] | None = None,
           weights: str | None = "pretrained", fine_tune: bool = False, gradient_checkpointing: bool = False,
           image_size: int | None = None, image_mean: list[float] | None = None,
           image_std: list[float] | None = None) -> Swinv2Encoder:
    """Swin v2 encoder; weights "pretrained" (from image_model_name) or "none"; see the module doc."""
    transformers = require_transformers()
    w = "none" if weights is None else str(weights).lower()
    if w not in ("pretrained", "none", ""):
        raise SeesayError(f"encoder swinv2: weights must be 'pretrained' or 'none', not {weights!r} "
                          "(a local model directory goes in image_model_name)")
    pretrained = w == "pretrained" and image_model_name is not None
    overrides = dict(config or {})
    if image_size is not None:
        overrides["image_size"] = int(image_size)
    full = "model_type" in overrides  # a whole config (as checkpoints keep it): nothing to read
    source = None if full and not pretrained else image_model_name
    cfg = load_config(transformers.Swinv2Config, source, overrides, OPTION)
    if pretrained:
        model = load_model(transformers.Swinv2Model, image_model_name, cfg, OPTION, use_mask_token=True)
    else:
        model = transformers.Swinv2Model(cfg, use_mask_token=True)
    if gradient_checkpointing:
        enable_checkpointing(model)
    mean, std = _mean_std(image_model_name if source is not None else None, image_mean, image_std)
    resolved: dict[str, Any] = {}
    if source is not None:  # read from a directory or the hub: keep what was read in the spec
        resolved = {"config": plain_config(model.config), "image_mean": list(mean), "image_std": list(std)}
    enc = Swinv2Encoder(model, Preprocess(size=int(model.config.image_size), mean=mean, std=std),
                        pretrained=pretrained, resolved=resolved)
    enc.set_fine_tune(bool(fine_tune))
    return enc
