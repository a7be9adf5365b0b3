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

Arrays are memory-mapped read-only (`np.load(mmap_mode="r", allow_pickle=False)`: never
unpickled) on first use in each process, and checked (dtype, dimensions, rows); a truncated,
object-dtype or otherwise wrong file is a one-line `SeesayError` naming it. A `manifest.json`
that is not a JSON object with a `splits` object is refused the same way.
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


_ARRAYS = {"images.npy": (np.uint8, 4), "captions.npy": (np.int32, 3), "lengths.npy": (np.int32, 2)}


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
        dtype, ndim = _ARRAYS[name]
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise SeesayError(f"{path}: file not found (incomplete prepared dataset?)") from None
        except IsADirectoryError:
            raise SeesayError(f"{path}: is a directory, expected a .npy file") from None
        except (ValueError, OSError, EOFError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "object" in why.lower() or "pickle" in why.lower():
                why = f"holds Python objects, which seesay never unpickles ({why})"
            elif "mmap length" in why or "truncated" in why.lower() or isinstance(e, EOFError):
                why = f"truncated ({why})"
            raise SeesayError(f"{path}: not a valid prepared array: {why}; prepare the dataset again") from None
        if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != ndim:
            got = f"{arr.dtype} {tuple(arr.shape)}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise SeesayError(f"{path}: expected a {np.dtype(dtype).name} array with {ndim} dimensions, got {got}; "
                              "prepare the dataset again")
        if self._n is not None and arr.shape[0] != self._n:
            raise SeesayError(f"{path}: {arr.shape[0]} rows, but manifest.json says {self._n} images; "
                              "prepare the dataset again")
        return arr

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

    def check(self) -> SplitStore:
        """Open (map) and check the three arrays now, so a damaged file is reported before any work."""
        images, captions, lengths = self.images, self.captions, self.lengths
        if not (images.shape[0] == captions.shape[0] == lengths.shape[0]) or captions.shape[1] != lengths.shape[1]:
            raise SeesayError(f"{self.dir}: images.npy {tuple(images.shape)}, captions.npy {tuple(captions.shape)} "
                              f"and lengths.npy {tuple(lengths.shape)} do not match; prepare the dataset again")
        return self

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
        except OSError as e:
            raise SeesayError(f"{path}: cannot read ({e.strerror or e})") from None
        if not isinstance(self.manifest, dict):
            raise SeesayError(f"{path}: expected a JSON object, got {type(self.manifest).__name__}; "
                              "prepare the dataset again")
        version = self.manifest.get("format_version")
        if version != 1:
            raise SeesayError(f"{path}: prepared with format version {version}, this seesay reads version 1")
        _check_manifest(path, self.manifest)

    @cached_property
    def vocab(self) -> Any:
        """The dataset's tokenizer: DATA_DIR/tokenizer/ (any registered type, e.g. SentencePiece:
        `seesay.tokenizers.load_tokenizer`) when present, else the word/char/byte/jieba vocab.json."""
        if (self.root / "tokenizer" / "tokenizer.json").is_file():
            from seesay.tokenizers import load_tokenizer

            return load_tokenizer(self.root / "tokenizer")
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
        return SplitStore(self.root, name, int(self.manifest["splits"][name]["images"])).check()

    def skipped(self) -> list[dict[str, Any]]:
        return _read_jsonl(self.root / "skipped.jsonl")

    def __repr__(self) -> str:
        return f"PreparedData({str(self.root)!r}, splits={self.manifest['splits']})"


def _is_count(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _check_manifest(path: Path, m: dict[str, Any]) -> None:
    """The fields readers rely on, so a damaged manifest is one line rather than a KeyError later."""
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise SeesayError(f"{path}: 'splits' must be a non-empty object; prepare the dataset again")
    for name, v in splits.items():
        if not isinstance(v, dict) or not _is_count(v.get("images")):
            raise SeesayError(f"{path}: splits.{name} needs a non-negative integer 'images'; prepare the dataset again")
        if not name or any(c in name for c in "/\\") or name in (".", ".."):
            raise SeesayError(f"{path}: bad split name {name!r}")
    for key in ("image_size", "captions_per_image"):
        if not _is_count(m.get(key), 1):
            raise SeesayError(f"{path}: {key!r} must be a positive integer; prepare the dataset again")


def open_prepared(root: str | os.PathLike) -> PreparedData:
    return PreparedData(root)


def open_split(root: str | os.PathLike, split: str) -> SplitStore:
    return PreparedData(root).split(split)
