"""Streaming training batches from shards, resumable inside an epoch (order: see the package docstring)."""

from __future__ import annotations

import json
import math
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from seesay.data.shards.common import (
    DEFAULT_BUFFER,
    _resolve,
    _sample_json,
    decode_image,
    iter_shard,
    sample_captions,
)
from seesay.errors import SeesayError


class ShardSplit:
    """The sharded train split of a prepared DATA_DIR: what `CaptionTask` needs of a `SplitStore`
    (len, references, image_ids, captions_per_image, images for the feature cache)."""

    def __init__(self, prepared: Any, split: str = "train") -> None:
        self.root = Path(prepared.root)
        self.split = split
        self.manifest = prepared.manifest
        entries = self.manifest["shards"][split]
        if not isinstance(entries, list) or not entries:
            raise SeesayError(f"{self.root / 'manifest.json'}: shards.{split} must be a non-empty list")
        self.urls = [_resolve(str(e["url"]), self.root) for e in entries]
        self.counts = [int(e["samples"]) for e in entries]
        skip: dict[str, set[str]] = {u: set() for u in self.urls}
        by_raw = {str(e["url"]): u for e, u in zip(entries, self.urls)}
        path = self.root / "skipped.jsonl"
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    x = json.loads(line)
                    if x.get("shard") in by_raw and x.get("key") is not None:
                        skip[by_raw[x["shard"]]].add(str(x["key"]))
        self.skip = {u: frozenset(v) for u, v in skip.items()}
        self.captions_per_image = int(self.manifest["captions_per_image"])
        self.image_size = int(self.manifest["image_size"])

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def references(self) -> list[list[str]]:
        return [r["references"] for r in self._refs()]

    @property
    def image_ids(self) -> list[str]:
        return [r["image_id"] for r in self._refs()]

    def _refs(self) -> list[dict[str, Any]]:
        from seesay.data.store import _read_jsonl

        if not hasattr(self, "_ref_rows"):
            self._ref_rows = _read_jsonl(self.root / self.split / "references.jsonl")
        return self._ref_rows

    @property
    def images(self) -> ShardImages:
        return ShardImages(self)

    def __repr__(self) -> str:
        return f"ShardSplit({str(self.root)!r}, {self.split!r}, images={len(self)}, shards={len(self.urls)})"


class ShardImages:
    """The split's images, uint8 [N, S, S, 3], read in shard order: slices are served by streaming
    (consecutive slices continue the stream; an earlier one starts it again). For the feature cache,
    whose row i is the sample with global index i."""

    def __init__(self, split: ShardSplit) -> None:
        self.split = split
        self._it: Iterator[np.ndarray] | None = None
        self._pos = 0

    def __len__(self) -> int:
        return len(self.split)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), self.split.image_size, self.split.image_size, 3)

    def _stream(self) -> Iterator[np.ndarray]:
        for url in self.split.urls:
            for s in iter_shard(url, self.split.skip[url]):
                yield decode_image(s, self.split.image_size)

    def __getitem__(self, sl: slice) -> np.ndarray:
        if not isinstance(sl, slice):
            return self[int(sl):int(sl) + 1][0]
        start, stop, _ = sl.indices(len(self))
        if self._it is None or start < self._pos:
            self._it, self._pos = self._stream(), 0
        for _ in range(start - self._pos):
            next(self._it)
        rows = [next(self._it) for _ in range(stop - start)]
        self._pos = stop
        return np.stack(rows) if rows else np.zeros((0, *self.shape[1:]), np.uint8)


def plan_epoch(counts: list[int], *, seed: int, epoch: int, rank: int, world_size: int, worker: int,
               num_workers: int, batch_size: int, buffer: int = DEFAULT_BUFFER
               ) -> tuple[list[int], list[tuple[int, int, int]], list[int]]:
    """One unit's (rank, worker) epoch: (its shard list, as indices into `counts`; the positions
    (pass, index in its shard list, offset) it emits, in order; the sizes of its batches, which are
    the epoch's batches worker, worker + num_workers, ...). Depends on nothing but its arguments."""
    total = sum(counts)
    per_rank = math.ceil(total / world_size)
    n_batches = math.ceil(per_rank / batch_size)
    sizes = [min(batch_size, per_rank - k * batch_size) for k in range(n_batches)][worker::num_workers]
    need = sum(sizes)
    order = list(range(len(counts)))
    random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    units, unit = world_size * num_workers, rank * num_workers + worker
    if len(order) >= units:
        mine, every = order[rank::world_size][worker::num_workers], None
    else:  # too few shards for one each: every unit reads all of them and keeps every units-th sample
        mine, every = order, (unit, units)
    if not need:
        return mine, [], sizes
    if sum(counts[s] for s in mine) == 0 or (every is not None and total < units):
        raise SeesayError(f"rank {rank} worker {worker}: its shards hold no samples (fewer samples than "
                          "processes x workers?)")

    def one_pass(p: int) -> Iterator[tuple[int, int, int]]:
        n = 0
        for j, s in enumerate(mine):
            for off in range(counts[s]):
                if every is None or n % every[1] == every[0]:
                    yield (p, j, off)
                n += 1

    from webdataset import filters

    rng = random.Random(f"buffer:{seed}:{epoch}:{rank}:{worker}")
    shuffle = filters.shuffle(max(1, buffer), max(1, min(buffer, 100)), rng=rng)
    # each pass over the unit's shards is shuffled on its own (the buffer drains at its end), so an
    # epoch that fits in one pass holds every sample at most once
    shuffled = (pos for p in range(sys.maxsize) for pos in shuffle(one_pass(p)))
    return mine, [next(shuffled) for _ in range(need)], sizes


def _torch_dataset_base() -> type:
    from torch.utils.data import IterableDataset

    return IterableDataset


class ShardStream(_torch_dataset_base()):  # type: ignore[misc]
    """Batches of the sharded train split for one rank (module doc: order, resume).

    `mode`: "images" (collate_images: whole images with all their captions), "captions" (caption
    rows with their image index, for cached features) or "by_image" (collate_images, images
    optional: self-critical). `batch_size` counts images. Set the epoch (and the images of it
    already trained, `skip`, a multiple of `batch_size`) before each iteration; `len` is the
    number of batches still to come. Use with `DataLoader(batch_size=None)`, any number of workers.
    """

    def __init__(self, split: ShardSplit, tokenizer: Any, *, batch_size: int, mode: str = "images",
                 load_images: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 buffer: int = DEFAULT_BUFFER, num_workers: int = 0) -> None:
        super().__init__()
        if mode not in ("images", "captions", "by_image"):
            raise ValueError(mode)
        self.split, self.tokenizer, self.mode, self.load_images = split, tokenizer, mode, load_images
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), rank, world_size
        self.buffer, self.num_workers = int(buffer), max(1, int(num_workers))
        m = split.manifest
        self.max_len, self.kind, self.cpi = int(m["max_len"]), str(m["tokenizer"]), split.captions_per_image
        self.prep_seed = int(m.get("seed", 0))
        self.base = np.concatenate([[0], np.cumsum(split.counts)]).astype(np.int64)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = int(epoch), int(skip)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(math.ceil(len(self.split) / self.world_size) / self.batch_size)

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.skip // self.batch_size, 0)

    # -- one sample ---------------------------------------------------------------------------------
    def _tokens(self, sample: dict[str, Any], meta: dict[str, Any], image_id: str, refs: list[str]) -> list[list[int]]:
        from seesay.data.tokenize import Vocab, tokenize

        tok = self.tokenizer
        if not isinstance(tok, Vocab):  # the captioner's own tokenizer: encode the raw references
            refs = refs or [""]
            return [[tok.bos_id, *list(tok.encode(refs[c % len(refs)]))[:self.max_len], tok.eos_id]
                    for c in range(self.cpi)]
        tokens = meta.get("tokens")
        if not (isinstance(tokens, list) and len(tokens) == self.cpi):
            from seesay.data.prepare import _select_captions

            kept = [t for t in (tokenize(s, self.kind) for s in refs) if 1 <= len(t) <= self.max_len]
            if not kept:
                raise SeesayError(f"{sample.get('__url__')}: sample {image_id} has no usable caption "
                                  "(the shard changed since seesay prepare?)")
            tokens = _select_captions(kept, self.cpi, self.prep_seed, "train", image_id)
        return [tok.encode_tokens(t, add_special=True) for t in tokens]

    def _item(self, sample: dict[str, Any], index: int) -> dict[str, Any]:
        import torch

        meta = _sample_json(sample)
        refs = sample_captions(sample)
        image_id = str(meta.get("image_id", sample.get("__key__")))
        ids = self._tokens(sample, meta, image_id, refs)
        width = max(len(r) for r in ids)
        caps = np.zeros((len(ids), width), np.int64)
        for c, r in enumerate(ids):
            caps[c, :len(r)] = r
        item = {"captions": torch.from_numpy(caps), "lengths": torch.tensor([len(r) for r in ids], dtype=torch.long),
                "image_index": index, "image_id": image_id, "references": refs}
        if self.load_images:
            arr = decode_image(sample, self.split.image_size)
            item["image"] = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return item

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:

        from seesay.data.loader import collate_images

        pad = getattr(self.tokenizer, "pad_id", 0)
        out = collate_images(items, pad_id=pad)
        if self.mode != "captions":
            return out
        rows = out["image_rows"]
        return {"captions": out["captions"], "lengths": out["lengths"],
                "image_index": out["image_index"].index_select(0, rows),
                "image_ids": [out["image_ids"][int(r)] for r in rows]} | (
                    {"images": out["images"].index_select(0, rows)} if "images" in out else {})

    # -- the stream ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        import torch

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start_batch = self.skip // self.batch_size
        # the DataLoader takes batch start_batch + i from its worker i % workers: that worker plays
        # the part of the epoch's worker (start_batch + i) % workers
        worker = (worker + start_batch) % workers
        counts = self.split.counts
        mine, order, sizes = plan_epoch(counts, seed=self.seed, epoch=self.epoch, rank=self.rank,
                                        world_size=self.world_size, worker=worker, num_workers=workers,
                                        batch_size=self.batch_size, buffer=self.buffer)
        done_batches = len(range(worker, start_batch, workers))  # this worker's batches before `start_batch`
        done = sum(sizes[:done_batches])
        order, sizes = order[done:], sizes[done_batches:]
        if not order:
            return
        want = set(order)
        held: dict[tuple[int, int, int], dict[str, Any]] = {}
        batch: list[dict[str, Any]] = []
        ptr, b = 0, 0
        first = min(order)
        for p in range(first[0], sys.maxsize):
            for j in range(first[1] if p == first[0] else 0, len(mine)):
                s = mine[j]
                url = self.split.urls[s]
                read = 0
                for off, sample in enumerate(iter_shard(url, self.split.skip[url])):
                    read += 1
                    pos = (p, j, off)
                    if pos in want:
                        held[pos] = self._item(sample, int(self.base[s]) + off)
                    while ptr < len(order) and order[ptr] in held:
                        batch.append(held.pop(order[ptr]))
                        ptr += 1
                        if len(batch) == sizes[b]:
                            yield self._collate(batch)
                            batch, b = [], b + 1
                    if ptr == len(order):
                        return
                if read < counts[s] and any(q[:2] == (p, j) for q in want if q[2] >= read):
                    raise SeesayError(f"{url}: {read} usable samples, but manifest.json says {counts[s]} "
                                      "(the shard changed since seesay prepare?); prepare the dataset again")


def check_resume_workers(run_dir: str | os.PathLike, workers: int) -> None:
    """A run saved inside an epoch resumes over shards only with the same DataLoader worker count
    (the epoch's order depends on it): one line otherwise."""
    from seesay.checkpoint import load_train_state

    last = Path(run_dir) / "last"
    try:
        saved = json.loads((last / "config.json").read_text(encoding="utf-8"))["data"]["workers"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if max(1, int(saved)) == max(1, int(workers)):
        return
    try:
        inside = bool(load_train_state(last)["loop"].get("batches_done"))
    except (SeesayError, KeyError, TypeError):
        return
    if inside:
        raise SeesayError(f"{last} was saved inside an epoch of a sharded dataset with --workers {saved}; resume it "
                          f"with --workers {saved} (not {workers}): the epoch's order depends on it")


def shard_loader(split: ShardSplit, tokenizer: Any, *, batch_size: int, mode: str, load_images: bool, seed: int,
                 rank: int, world_size: int, workers: int, buffer: int = DEFAULT_BUFFER,
                 pin_memory: bool = False, worker_init_fn: Any = None) -> tuple[ShardStream, Any]:
    """A `ShardStream` and the DataLoader over it (workers restart every epoch, so each sees the
    epoch and skip set on the stream). The loader has its own generator: starting an epoch draws
    nothing from the global RNG, which only the training steps use (exact resume)."""
    import torch
    from torch.utils.data import DataLoader

    stream = ShardStream(split, tokenizer, batch_size=batch_size, mode=mode, load_images=load_images, seed=seed,
                         rank=rank, world_size=world_size, buffer=buffer, num_workers=workers)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=False, worker_init_fn=worker_init_fn,
                        generator=torch.Generator().manual_seed(int(seed)))
    return stream, loader
