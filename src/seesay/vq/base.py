"""The one interface every VQ image tokenizer has, and its saved form.

# B - batch, H/W - pixels, h/w - code grid (H / downsample), K - codebook size, D - code dimension

    encode(images [B, 3, H, W] uint8 0..255 or float 0..1) -> codes [B, h, w] long, 0 <= code < K
    decode(codes [B, h, w]) -> images [B, 3, image_size, image_size] float 0..1

Images of another size are resized (bilinear, antialiased) to `image_size` first, so a
tokenizer always gives the same number of codes per image (`image_size // downsample` squared):
a sequence model that reads `<img_i>` tokens needs a fixed count.

Saved form (`save_pretrained(DIR)`, `load_vq(DIR)`), never a pickle:

    DIR/config.json        {"type": "vqgan" | "small", "format_version": 1, **the architecture}
    DIR/model.safetensors  the state dict

The directory is written beside the target and renamed into place (the same three renames as
`seesay.checkpoint`), so a reader never sees half of one. Other files (train-vq's metrics.json)
may sit next to them.
"""

from __future__ import annotations

import importlib
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from seesay.errors import SeesayError

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
FORMAT_VERSION = 1

# type name -> "module:Class"; filled explicitly so `load_vq` never imports by a name from a file
VQ_TYPES: dict[str, str] = {
    "vqgan": "seesay.vq.vqgan:VQGAN",
    "small": "seesay.vq.small:SmallVQ",
}


class VQTokenizer(nn.Module):
    """Base class: subclasses set `type_name`, implement `_encode_pixels` / `_decode_pixels` on
    images in -1..1 and `config()` / `from_config()`, and set the three size attributes."""

    type_name: ClassVar[str] = ""
    codebook_size: int
    downsample: int
    image_size: int

    # ---- the interface --------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] (long) of images [B, 3, H, W] (uint8 0..255, or float 0..1)."""
        return self._encode_pixels(self.to_model_input(images))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, image_size, image_size] in 0..1 from codes [B, h, w]."""
        codes = codes.to(self._device()).long()
        if codes.dim() != 3:
            raise SeesayError(f"codes must be [B, h, w], got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise SeesayError(f"codes must lie in 0..{self.codebook_size - 1}, got {int(codes.min())}..{int(codes.max())}")
        return ((self._decode_pixels(codes) + 1) / 2).clamp(0, 1)

    @property
    def grid_size(self) -> int:
        """Codes per side (h = w)."""
        return self.image_size // self.downsample

    def to_model_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 0..255 / float 0..1 [B, 3, H, W] -> float -1..1 [B, 3, image_size, image_size]."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise SeesayError(f"images must be a [B, 3, H, W] tensor, got {shape}")
        x = images.to(self._device())
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x * 2 - 1

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- subclasses -----------------------------------------------------------------------------
    def _encode_pixels(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -1..1 -> (B, h, w)
        raise NotImplementedError

    def _decode_pixels(self, codes: torch.Tensor) -> torch.Tensor:  # (B, h, w) -> (B, 3, H, W) ~-1..1
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VQTokenizer:
        raise NotImplementedError

    # ---- saved form -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, extra_files: dict[str, Any] | None = None) -> Path:
        """Write DIR/config.json + DIR/model.safetensors (+ `extra_files`, name -> JSON object),
        replacing DIR atomically."""
        from safetensors.torch import save_file

        from seesay.checkpoint import publish_directory

        final = Path(directory)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        except OSError as e:
            raise SeesayError(f"{final}: cannot write the VQ image tokenizer ({e.strerror or e})") from None
        try:
            state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
            config = {"type": self.type_name, "format_version": FORMAT_VERSION, **self.config()}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            for name, obj in (extra_files or {}).items():
                (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
            publish_directory(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
                reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
                raise SeesayError(f"{final}: cannot write the VQ image tokenizer ({reason})") from None
            raise
        return final


def vq_class(type_name: str) -> type[VQTokenizer]:
    """The class registered under `type_name` (one line when unknown)."""
    if type_name not in VQ_TYPES:
        raise SeesayError(f"unknown VQ tokenizer type {type_name!r} (known: {', '.join(VQ_TYPES)})")
    module, name = VQ_TYPES[type_name].split(":")
    return getattr(importlib.import_module(module), name)


def read_vq_config(directory: str | Path) -> dict[str, Any]:
    """DIR/config.json of a saved tokenizer, checked (one line naming the file otherwise)."""
    d = Path(directory)
    path = d / CONFIG_FILE
    if not d.is_dir():
        raise SeesayError(f"{d}: no such VQ tokenizer directory")
    if not path.is_file():
        raise SeesayError(f"{d}: not a VQ tokenizer directory (no {CONFIG_FILE}); "
                          "convert a VQGAN with `seesay convert vqgan` or train one with `seesay train-vq`")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SeesayError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise SeesayError(f"{path}: expected a JSON object with a \"type\"")
    if config.get("format_version") != FORMAT_VERSION:
        raise SeesayError(f"{path}: format version {config.get('format_version')!r}, this seesay reads {FORMAT_VERSION}")
    return config


def load_vq(directory: str | Path, map_location: str | torch.device = "cpu") -> VQTokenizer:
    """A saved tokenizer (eval mode). Only safetensors + JSON are read; nothing is unpickled."""
    from seesay.checkpoint import read_weights

    d = Path(directory)
    config = read_vq_config(d)
    cls = vq_class(config["type"])
    params = {k: v for k, v in config.items() if k not in ("type", "format_version")}
    try:
        model = cls.from_config(params)
    except (TypeError, ValueError) as e:
        raise SeesayError(f"{d / CONFIG_FILE}: the architecture does not build ({type(e).__name__}: {e})") from None
    state = read_weights(d / MODEL_FILE)
    check_state_dict(model, state, d / MODEL_FILE)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str | Path) -> None:
    """One line naming missing / unexpected / mis-shaped keys, instead of torch's long message."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise SeesayError(f"{where}: weights do not match the architecture ({'; '.join(problems)})")
