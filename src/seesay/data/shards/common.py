"""What the shard writer and the stream share: names, tar reading, sample fields, image decoding."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from seesay.errors import SeesayError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEFAULT_SHARD_SIZE = 1000
DEFAULT_BUFFER = 1000
JPEG_QUALITY = 95


def _webdataset() -> Any:
    try:
        import webdataset
    except ImportError:
        from seesay.errors import missing_extra

        raise missing_extra("webdataset", "shards") from None
    return webdataset


def is_sharded(manifest: dict[str, Any], split: str = "train") -> bool:
    """Whether `split` of a prepared manifest is WebDataset shards (else the memory-mapped store)."""
    return manifest.get("format") == "shards" and split in (manifest.get("shards") or {})


def expand_shards(pattern: str) -> list[str]:
    """Brace patterns (``corpus/{00000..00999}.tar``) and ``::``-separated lists, as webdataset reads them."""
    from webdataset.shardlists import expand_urls

    urls = list(expand_urls(pattern))
    if not urls:
        raise SeesayError(f"--shards {pattern!r}: no shards")
    return urls


def _is_url(u: str) -> bool:
    return "://" in u or u.startswith("pipe:") or u == "-"


def _resolve(url: str, root: Path) -> str:
    return url if _is_url(url) or os.path.isabs(url) else str(root / url)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


# -- reading a tar ------------------------------------------------------------------------------
def iter_shard(url: str, skip: frozenset[str] | set[str] = frozenset(),
               errors: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one tar (dicts of raw bytes by extension, with ``__key__``), without those in
    `skip`. A tar that breaks part-way ends there: the error goes to `errors` (or raises)."""
    from webdataset.tariterators import tarfile_samples

    def handler(e: Exception) -> bool:
        if errors is None:
            return False
        errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        return True

    try:
        for s in tarfile_samples([{"url": url}], handler=handler):
            if s.get("__key__") not in skip:
                yield s
    except SeesayError:
        raise
    except Exception as e:  # noqa: BLE001 - the reraising handler: one line naming the shard
        raise SeesayError(f"{url}: cannot read the shard ({type(e).__name__}: {str(e)[:200]})") from None


def _image_bytes(sample: dict[str, Any]) -> tuple[str, bytes] | None:
    for ext in IMAGE_EXTENSIONS:
        if isinstance(sample.get(ext), (bytes, bytearray)):
            return ext, bytes(sample[ext])
    return None


def _sample_json(sample: dict[str, Any]) -> dict[str, Any]:
    raw = sample.get("json")
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """Every caption of a sample: its .json "captions" list (seesay's shards), else its .txt."""
    meta = _sample_json(sample)
    caps = meta.get("captions")
    if isinstance(caps, list) and caps:
        out = [str(c) for c in caps if str(c).strip()]
    else:
        txt = sample.get("txt")
        text = txt.decode("utf-8", "replace") if isinstance(txt, (bytes, bytearray)) else ""
        if not text.strip() and isinstance(meta.get("caption"), str):
            text = meta["caption"]  # img2dataset also keeps it in the .json
        out = [text.strip()] if text.strip() else []
    return out


# -- writing: records -> shards + the store for the other splits ----------------------------------


def decode_image(sample: dict[str, Any], size: int) -> np.ndarray:
    """A sample's image as uint8 [size, size, 3], resized (squashed) as `seesay prepare` does."""
    from seesay.data.images import read_image

    img = _image_bytes(sample)
    key = sample.get("__key__")
    if img is None:
        raise SeesayError(f"{sample.get('__url__')}: sample {key} has no image")
    arr, _ = read_image(img[1], size, name=f"{sample.get('__url__')}:{key}")
    return arr
