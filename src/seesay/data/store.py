"""Reading a prepared dataset (what `seesay prepare` writes).

Layout of DATA_DIR::

    manifest.json          format version, source, options, counts per split, vocab size, skipped
    vocab.json             <pad>=0, <start>=1, <end>=2, <unk>=3, then tokens by frequency
    skipped.jsonl          one {"split", "image_id", "image", "reason"} per skipped image
    <split>/images.npy     uint8 [N, S, S, 3] RGB
    <split>/captions.npy   int32 [N, C, max_len + 2]: <start> tokens <end>, padded with 0
    <split>/lengths.npy    int32 [N, C]: tokens per caption including <start> and <end>
    <split>/references.jsonl  {"image_id", "references": [every raw sentence]} per image, in order
    <split>/meta.jsonl     {"index", "image_id", "image", "extra": {..., "orig_size": [w, h]}}

Arrays are memory-mapped read-only (`np.load(mmap_mode="r")`) on first use in each process;
a `SplitStore` pickles without them, so DataLoader workers (any number) each map the files
themselves and read concurrently.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from seesay.data.tokenize import Vocab
from seesay.errors import SeesayError


def _read_jsonl(path: Path) -> list[Any]:
    try:
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise SeesayError(f"{path}: file not found (incomplete prepared dataset?)") from None
    except json.JSONDecodeError as e:
        raise SeesayError(f"{path}: malformed JSON line ({e.msg})") from None


class SplitStore:
    """One split of a prepared dataset: images, encoded captions, references, meta."""

    _LAZY = ("images", "captions", "lengths", "references", "meta", "image_ids")

    def __init__(self, root: str | os.PathLike, split: str, num_images: int | None = None) -> None:
        self.root = Path(root)
        self.split = split
        self.dir = self.root / split
        if not self.dir.is_dir():
            raise SeesayError(f"{self.root}: no split {split!r}")
        self._n = num_images

    def _load(self, name: str) -> np.ndarray:
        path = self.dir / name
        try:
            return np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise SeesayError(f"{path}: file not found (incomplete prepared dataset?)") from None

    @cached_property
    def images(self) -> np.ndarray:
        """uint8 [N, S, S, 3], memory-mapped."""
        return self._load("images.npy")

    @cached_property
    def captions(self) -> np.ndarray:
        """int32 [N, C, max_len + 2], memory-mapped."""
        return self._load("captions.npy")

    @cached_property
    def lengths(self) -> np.ndarray:
        """int32 [N, C], including <start> and <end>."""
        return self._load("lengths.npy")

    @cached_property
    def references(self) -> list[list[str]]:
        """Every raw reference sentence per image, in image order."""
        return [r["references"] for r in _read_jsonl(self.dir / "references.jsonl")]

    @cached_property
    def meta(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.dir / "meta.jsonl")

    @cached_property
    def image_ids(self) -> list[str]:
        return [r["image_id"] for r in _read_jsonl(self.dir / "references.jsonl")]

    @property
    def captions_per_image(self) -> int:
        return int(self.captions.shape[1])

    def __len__(self) -> int:
        if self._n is None:
            self._n = int(self.lengths.shape[0])
        return self._n

    def image(self, i: int) -> np.ndarray:
        """One image as a fresh uint8 [S, S, 3] array."""
        return np.array(self.images[i])

    def __getstate__(self) -> dict[str, Any]:
        # memory maps are reopened in each process (cheap to pickle into DataLoader workers)
        return {k: v for k, v in self.__dict__.items() if k not in self._LAZY}

    def __repr__(self) -> str:
        return f"SplitStore({str(self.root)!r}, {self.split!r}, images={len(self)})"


class PreparedData:
    """A prepared DATA_DIR: `manifest`, `vocab`, `splits` and `split(name) -> SplitStore`."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            if self.root.with_name(self.root.name + ".partial").exists():
                raise SeesayError(f"{self.root}: preparation did not finish; run seesay prepare again to resume")
            raise SeesayError(f"{self.root}: not a prepared dataset (no manifest.json); run seesay prepare first")
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise SeesayError(f"{path}: malformed JSON ({e})") from None
        version = self.manifest.get("format_version")
        if version != 1:
            raise SeesayError(f"{path}: prepared with format version {version}, this seesay reads version 1")

    @cached_property
    def vocab(self) -> Vocab:
        return Vocab.load(self.root / "vocab.json")

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def captions_per_image(self) -> int:
        return int(self.manifest["captions_per_image"])

    def split(self, name: str) -> SplitStore:
        if name not in self.manifest["splits"]:
            raise SeesayError(f"{self.root}: no split {name!r} (has {', '.join(self.splits)})")
        return SplitStore(self.root, name, int(self.manifest["splits"][name]["images"]))

    def skipped(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.root / "skipped.jsonl")

    def __repr__(self) -> str:
        return f"PreparedData({str(self.root)!r}, splits={self.manifest['splits']})"


def open_prepared(root: str | os.PathLike) -> PreparedData:
    return PreparedData(root)


def open_split(root: str | os.PathLike, split: str) -> SplitStore:
    return PreparedData(root).split(split)
