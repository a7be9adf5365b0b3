"""seesay: image captioning toolkit.

`import seesay` is cheap: names below are resolved on first use, so nothing heavy (torch,
Java, titans, wandb) is imported until it is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SeesayError": "seesay.errors",
    "build_encoder": "seesay.registry",
    "build_decoder": "seesay.registry",
    "list_encoders": "seesay.registry",
    "list_decoders": "seesay.registry",
    "EncoderOutput": "seesay.encoders.base",
    "Preprocess": "seesay.encoders.base",
    "DecoderOutput": "seesay.decoders.base",
    "VisionTransformerEncoder": "seesay.encoders.vit",
    "MultimodalMAC": "seesay.multimodal",
    "ImageProcessor": "seesay.multimodal",
    "CaptionModel": "seesay.model",
    "build_model": "seesay.model",
    "load_checkpoint": "seesay.checkpoint",
    "save_checkpoint": "seesay.checkpoint",
    "compute_scores": "seesay.metrics",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'seesay' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["__version__", *_LAZY]
