"""Training data plumbing of the captioning task: text-only captions, samplers that resume
inside an epoch, and the mixing of text-only batches among image batches.

# r - caption rows, t - time
"""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from seesay.errors import SeesayError

# ---------------------------------------------------------------------------------------------
# Text-only captions (the Titans extension's `text_data_path`): language-model rows with no image.


def read_text_data(path: str | Path, vocab: Any, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Captions of a text file (one per line) or a JSON list of strings / {"text": ...} objects,
    encoded with the dataset's tokenizer (unknown words -> <unk>) as int64 [M, max_len + 2]
    (bos tokens eos, padded with the tokenizer's pad id) and lengths [M]; longer captions are cut
    to `max_len` tokens."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SeesayError(f"{path}: cannot read text data ({e.strerror})") from None
    except UnicodeDecodeError:
        raise SeesayError(f"{path}: text data is not UTF-8") from None
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(raw)
        except ValueError as e:
            raise SeesayError(f"{path}: malformed JSON ({e})") from None
        if not isinstance(items, list):
            raise SeesayError(f"{path}: expected a JSON list of strings or {{\"text\": ...}} objects")
        texts = []
        for k, it in enumerate(items):
            if isinstance(it, dict) and isinstance(it.get("text"), str):
                texts.append(it["text"])
            elif isinstance(it, str):
                texts.append(it)
            else:
                raise SeesayError(f"{path}: item {k} is neither a string nor an object with a \"text\" string")
    else:
        texts = raw.splitlines()
    encoded = [ids[:max_len] for ids in (vocab.encode(t) for t in texts) if ids]
    if not encoded:
        raise SeesayError(f"{path}: no non-empty captions in the text data")
    tokens = np.full((len(encoded), max_len + 2), vocab.pad_id, dtype=np.int64)
    lengths = np.zeros(len(encoded), dtype=np.int64)
    for r, ids in enumerate(encoded):
        row = [vocab.bos_id, *ids, vocab.eos_id]
        tokens[r, : len(row)] = row
        lengths[r] = len(row)
    return tokens, lengths


def encode_references(store: Any, tokenizer: Any, max_len: int, captions_per_image: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """A split's raw references encoded with a captioner's own tokenizer: int64 [N, C, max_len + 2]
    (bos tokens eos, padded with its pad id) and lengths [N, C]. Images with fewer than C references
    repeat them; longer captions are cut to `max_len` tokens."""
    n = len(store)
    tokens = np.full((n, captions_per_image, max_len + 2), tokenizer.pad_id, dtype=np.int64)
    lengths = np.zeros((n, captions_per_image), dtype=np.int64)
    for i, refs in enumerate(store.references):
        refs = list(refs) or [""]
        for c in range(captions_per_image):
            row = [tokenizer.bos_id, *list(tokenizer.encode(refs[c % len(refs)]))[:max_len], tokenizer.eos_id]
            tokens[i, c, : len(row)] = row
            lengths[i, c] = len(row)
    return tokens, lengths


def worker_leaves_signals_to_trainer(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C and SIGTERM (a terminal or a scheduler sends them to every
    process): the training process finishes its step, saves and stops, and then ends them.

    Because they ignore SIGTERM, multiprocessing's exit handler (terminate = SIGTERM, then join)
    cannot end them: a run that fails must end them itself (`end_data_workers`), or it waits
    for them forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def end_data_workers(timeout_s: float = 5.0) -> int:
    """Kill this process's multiprocessing children (the DataLoader workers) after an error: they
    ignore SIGTERM, so without this the interpreter's exit would wait for them forever. Returns
    how many were ended."""
    import multiprocessing
    import threading

    if threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler would turn the workers' ends into a second error ("DataLoader
        # worker is killed by signal") raised over the one being reported
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = multiprocessing.active_children()
    for child in children:
        try:
            child.kill()  # SIGKILL: cannot be ignored
        except (OSError, ValueError):  # pragma: no cover - already gone
            pass
    for child in children:
        child.join(timeout_s)
    return len(children)


class SkippingSampler(Sampler):
    """A DistributedSampler that can start an epoch part-way (resuming inside an epoch).

    `skip` leading samples are dropped from the epoch's order (which depends only on the seed
    and the epoch), so with consecutive batches of the same size the remaining batches are
    exactly those an uninterrupted epoch would have gone on with.
    """

    def __init__(self, inner: DistributedSampler) -> None:
        self.inner = inner
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    @property
    def epoch(self) -> int:
        return self.inner.epoch

    def __iter__(self) -> Iterator[int]:
        order = iter(self.inner)
        for _ in range(min(self.skip, len(self.inner))):
            next(order)
        return order

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)


class MixedBatches:
    """An epoch of image-caption batches (`loader`) with text-only batches spread evenly among them.

    The text rows of an epoch are drawn without replacement (cycling when more are asked for than
    exist) from a generator seeded by (seed, epoch), so every process and a resumed run draw the
    same rows and the global RNG is not touched; each process takes every world_size-th row (padded
    like DistributedSampler), so all processes have the same number of text batches at the same
    positions (DDP needs that).
    """

    def __init__(self, loader: DataLoader, tokens: np.ndarray, lengths: np.ndarray, *, rows_per_epoch: int,
                 batch_size: int, seed: int, epoch: int, rank: int, world_size: int, image_batches: int | None = None,
                 start: int = 0) -> None:
        """`image_batches`: image batches of a whole epoch (default len(loader)); `start`: skip the
        epoch's first `start` batches (text and image slots alike), `loader` already starting at
        the first image batch after them (see `image_batches_before`)."""
        self.loader = loader
        self.image_batches = len(loader) if image_batches is None else image_batches
        self.start = start
        per_rank = math.ceil(rows_per_epoch / world_size) if rows_per_epoch > 0 else 0
        total = per_rank * world_size
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        m = len(tokens)
        draws = [torch.randperm(m, generator=g) for _ in range(math.ceil(total / m))] if total else []
        index = torch.cat(draws)[:total].numpy() if draws else np.zeros(0, dtype=np.int64)
        mine = index[rank::world_size]
        self.text_batches = [mine[i: i + batch_size] for i in range(0, len(mine), batch_size)]
        self.tokens, self.lengths = tokens, lengths

    def __len__(self) -> int:
        return self.image_batches + len(self.text_batches) - self.start

    def image_batches_before(self, k: int) -> int:
        """How many of the first k batches of the epoch are image batches."""
        total = self.image_batches + len(self.text_batches)
        return k - (k * len(self.text_batches) // total if total else 0)

    def _text_batch(self, rows: np.ndarray) -> dict[str, Any]:
        lengths = self.lengths[rows]
        tokens = self.tokens[rows][:, : int(lengths.max())]
        return {"captions": torch.from_numpy(np.ascontiguousarray(tokens)), "lengths": torch.from_numpy(lengths),
                "text_only": True}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n_text = len(self.text_batches)
        total = self.image_batches + n_text
        images = iter(self.loader)
        j = self.start - self.image_batches_before(self.start)  # text batches already given
        for k in range(self.start, total):
            if n_text and (k + 1) * n_text // total > k * n_text // total:  # n_text evenly spread slots
                yield self._text_batch(self.text_batches[j])
                j += 1
            else:
                yield next(images)
