"""PyTorch datasets and collate functions over a prepared dataset.

- `CaptionDataset(data, split)`: one item per caption (N * C items); item i is caption
  i % C of image i // C. For teacher-forced training with random caption batches.
- `ImageCaptionDataset(data, split)`: one item per image, with all its C encoded captions and
  every raw reference. For validation, and for training with the encoder in the loop (each
  image is encoded once per step and its rows repeated with `image_rows`).

Both are map-style datasets with `__len__`, so `DistributedSampler` shards them; they pickle
without their memory maps, so any number of DataLoader workers read the store at once.
`load_images=False` leaves the image out (for decoders trained on cached features, which look
features up by `image_index`). `encoded=(captions [N, C, L], lengths [N, C])` replaces the stored
token ids (a captioner with a tokenizer of its own re-encodes the references:
`seesay.train.data.encode_references`).

`collate_captions` gives {"images" uint8 [B,3,S,S], "captions" Long [B,T], "lengths" Long [B],
"image_index" Long [B], "image_ids"}; `collate_images` gives {"images" uint8 [B,3,S,S],
"captions" Long [B*C,T], "lengths" Long [B*C], "image_rows" Long [B*C] (which image each caption
row belongs to), "image_index" Long [B], "image_ids", "references" list[list[str]]}. T is the
longest caption in the batch; lengths count <start> and <end>; rows are padded with `pad_id`
(bind the tokenizer's with functools.partial). Collation is done in numpy
(torch.stack/repeat_interleave on small CPU tensors were 20-1000x slower on a busy machine).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from seesay.data.store import PreparedData, SplitStore


def _split(data: str | os.PathLike | PreparedData, split: str) -> tuple[PreparedData, SplitStore]:
    prepared = data if isinstance(data, PreparedData) else PreparedData(data)
    return prepared, prepared.split(split)


def _image_tensor(store: SplitStore, i: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(store.images[i].transpose(2, 0, 1)))


class CaptionDataset(Dataset):
    """One item per (image, caption) pair; see the module doc."""

    def __init__(self, data: str | os.PathLike | PreparedData, split: str = "train", *, load_images: bool = True,
                 encoded: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.data, self.store = _split(data, split)
        self.split = split
        self.load_images = load_images
        self.captions, self.lengths = encoded if encoded is not None else (None, None)
        self.captions_per_image = self.data.captions_per_image if encoded is None else int(encoded[0].shape[1])
        self.vocab = self.data.vocab

    def __len__(self) -> int:
        return len(self.store) * self.captions_per_image

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        img, c = divmod(int(i), self.captions_per_image)
        captions = self.store.captions if self.captions is None else self.captions
        n = int((self.store.lengths if self.lengths is None else self.lengths)[img, c])
        item = {
            "caption": torch.from_numpy(np.array(captions[img, c, :n], dtype=np.int64)),
            "length": n,
            "image_index": img,
            "image_id": self.store.image_ids[img],
        }
        if self.load_images:
            item["image"] = _image_tensor(self.store, img)
        return item


class ImageCaptionDataset(Dataset):
    """One item per image with all its captions and references; see the module doc."""

    def __init__(self, data: str | os.PathLike | PreparedData, split: str = "val", *, load_images: bool = True,
                 encoded: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.data, self.store = _split(data, split)
        self.split = split
        self.load_images = load_images
        self.captions, self.lengths = encoded if encoded is not None else (None, None)
        self.captions_per_image = self.data.captions_per_image if encoded is None else int(encoded[0].shape[1])
        self.vocab = self.data.vocab

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        i = int(i)
        captions = self.store.captions if self.captions is None else self.captions
        lengths = np.array((self.store.lengths if self.lengths is None else self.lengths)[i], dtype=np.int64)
        item = {
            "captions": torch.from_numpy(np.array(captions[i, :, : int(lengths.max())], dtype=np.int64)),
            "lengths": torch.from_numpy(lengths),
            "image_index": i,
            "image_id": self.store.image_ids[i],
            "references": self.store.references[i],
        }
        if self.load_images:
            item["image"] = _image_tensor(self.store, i)
        return item


def _pad(seqs: list[torch.Tensor], pad_id: int = 0) -> torch.Tensor:
    arrays = [s.numpy().reshape(1, -1) if s.dim() == 1 else s.numpy() for s in seqs]
    width = max(a.shape[1] for a in arrays)
    out = np.full((sum(a.shape[0] for a in arrays), width), pad_id, dtype=np.int64)
    r = 0
    for a in arrays:
        out[r:r + a.shape[0], : a.shape[1]] = a
        r += a.shape[0]
    return torch.from_numpy(out)


def _stack_images(batch: list[dict[str, Any]]) -> torch.Tensor:
    # numpy, not torch.stack: stacking uint8 tensors with torch was ~1000x slower here (CPU threads)
    return torch.from_numpy(np.stack([b["image"].numpy() for b in batch]))


def collate_captions(batch: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {
        "captions": _pad([b["caption"] for b in batch], pad_id),
        "lengths": torch.tensor([b["length"] for b in batch], dtype=torch.long),
        "image_index": torch.tensor([b["image_index"] for b in batch], dtype=torch.long),
        "image_ids": [b["image_id"] for b in batch],
    }
    if "image" in batch[0]:
        out["images"] = _stack_images(batch)
    return out


def collate_images(batch: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    per = [int(b["captions"].shape[0]) for b in batch]
    out: dict[str, Any] = {
        "captions": _pad([b["captions"] for b in batch], pad_id),
        "lengths": torch.from_numpy(np.concatenate([b["lengths"].numpy() for b in batch])),
        "image_rows": torch.from_numpy(np.repeat(np.arange(len(batch), dtype=np.int64), per)),
        "image_index": torch.tensor([b["image_index"] for b in batch], dtype=torch.long),
        "image_ids": [b["image_id"] for b in batch],
        "references": [b["references"] for b in batch],
    }
    if "image" in batch[0]:
        out["images"] = _stack_images(batch)
    return out
