"""seesay: image captioning toolkit.

`import seesay` is cheap: names below are resolved on first use, so nothing heavy (torch,
Java, titans, wandb) is imported until it is needed.

Two layers, imports going one way (tests/test_captioner.py::test_library_never_imports_applications):

- the library: `captioner` (the contract every model family implements, and the functions built on
  it), `model`, `multimodal`, `decoding`, `encoders/`, `decoders/`, `layers/`, `tokenizers`,
  `checkpoint`, `registry`, `data/`, `metrics/`, `config`, `progress`, `files`, `errors`;
- the applications, which use the library and nothing below the captioner contract: `train/`,
  `evaluate`, `caption`, `viz/`, `demo`, `commands/` and `cli`.
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
    "Captioner": "seesay.captioner",
    "caption_images": "seesay.captioner",
    "Greedy": "seesay.decoding",
    "Beam": "seesay.decoding",
    "Sample": "seesay.decoding",
    "DiverseBeam": "seesay.decoding",
    "Constraints": "seesay.decoding",
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
