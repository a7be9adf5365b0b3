"""seesay.data: reading datasets, the prepared on-disk form, and PyTorch loaders.

Names are resolved lazily so `import seesay.data` stays cheap (no torch until a loader is used):

- `prepare_dataset` (seesay.data.prepare): build DATA_DIR from a dataset (`seesay prepare`).
- `open_prepared`, `PreparedData`, `SplitStore` (seesay.data.store): read DATA_DIR.
- `CaptionDataset`, `ImageCaptionDataset`, `collate_captions`, `collate_images` (seesay.data.loader).
- `Vocab`, `build_vocab`, `tokenize` (seesay.data.tokenize); `load_image_rgb` (seesay.data.images);
  `Record`, `read_records` (seesay.data.formats).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "prepare_dataset": "seesay.data.prepare",
    "summary_line": "seesay.data.prepare",
    "open_prepared": "seesay.data.store",
    "open_split": "seesay.data.store",
    "PreparedData": "seesay.data.store",
    "SplitStore": "seesay.data.store",
    "CaptionDataset": "seesay.data.loader",
    "ImageCaptionDataset": "seesay.data.loader",
    "collate_captions": "seesay.data.loader",
    "collate_images": "seesay.data.loader",
    "Vocab": "seesay.data.tokenize",
    "build_vocab": "seesay.data.tokenize",
    "tokenize": "seesay.data.tokenize",
    "load_image_rgb": "seesay.data.images",
    "Record": "seesay.data.formats",
    "read_records": "seesay.data.formats",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'seesay.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
