"""Tasks of prepared datasets, and what training does with them (see docs/vlm.md).

# r - caption rows, p - prompt tokens
Every dataset `seesay prepare` writes records its task in manifest.json:

    "task"     "caption" (describe the image), "classify" (say "a photo of <label>") or "pretrain"
               (T5 span corruption of the caption: `seesay.span_corruption`)
    "prompt"   the input text a prompt-reading model (the t5 decoder) gets with the image; default
               "What does the image describe?" for caption and classify, null for pretrain (whose
               input is the corrupted caption itself)
    "labels"   classify only: the readable class labels, sorted (the closed set of the evaluation)
    "loc_vocab_size"  region / grounding only: the location bins (`seesay.data.region_tasks`: region
               captioning and grounding on data with boxes, `--format shapes-regions|coco-instances`)

Defaults per format: imagefolder, imagenet and sun397 classify (one caption per image); the others,
redcaps included, caption; `seesay prepare --task/--prompt` override. Data prepared before tasks
existed has none of these fields and reads as task caption with no prompt (exactly as before).

Training with several datasets (`seesay train --data A --data B [--data-weights 0.7,0.3]`): each
epoch is `MixtureSampler`'s shuffle of all their training rows (as many as all the datasets hold
together), drawn in proportion to the datasets' sizes, or to the weights (a dataset is then cycled
or cut to its share); each row keeps its dataset's task and prompt.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from seesay.errors import SeesayError

if TYPE_CHECKING:
    import torch

TASKS = ("caption", "classify", "pretrain", "region", "grounding")
REGION_TASKS = ("region", "grounding")
DEFAULT_PROMPT = "What does the image describe?"
CLASSIFY_FORMATS = ("imagefolder", "imagenet", "sun397")


@dataclass(frozen=True)
class DatasetTask:
    task: str = "caption"
    prompt: str | None = None  # None: no input text (old data, pretrain)
    labels: tuple[str, ...] | None = None  # classify: the closed set
    loc_vocab_size: int | None = None  # region / grounding: location bins


def default_task(fmt: str | None) -> str:
    return "classify" if fmt in CLASSIFY_FORMATS else "caption"


def default_captions_per_image(fmt: str | None, task: str | None = None) -> int:
    """1 for classification formats and pretraining (one target per image), 3 regions per image for
    region / grounding, 5 otherwise."""
    if task in REGION_TASKS:
        return 3
    return 1 if fmt in CLASSIFY_FORMATS or fmt == "redcaps" or task == "pretrain" else 5


def manifest_fields(fmt: str | None, task: str | None, prompt: str | None, labels: Sequence[str],
                    loc_vocab_size: int | None = None) -> dict[str, Any]:
    """{"task", "prompt"[, "labels" | "loc_vocab_size"]} for a dataset prepared from `fmt` (see the module doc)."""
    from seesay.data.region_tasks import REGION_FORMATS, check_loc_vocab_size, default_prompt

    task = task or ("region" if fmt in REGION_FORMATS else default_task(fmt))
    if task not in TASKS:
        raise SeesayError(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
    if (task in REGION_TASKS) != (fmt in REGION_FORMATS):
        raise SeesayError(f"--task region and grounding go with a format with boxes ({', '.join(REGION_FORMATS)}), "
                          f"not --format {fmt} --task {task}")
    if task in REGION_TASKS:
        if prompt is not None and not prompt.strip():
            raise SeesayError("--prompt must not be empty")
        return {"task": task, "prompt": prompt if prompt is not None else default_prompt(task),
                "loc_vocab_size": check_loc_vocab_size(1000 if loc_vocab_size is None else loc_vocab_size)}
    if task == "classify" and not labels:
        raise SeesayError(f"--task classify needs a classification format ({', '.join(CLASSIFY_FORMATS)}), "
                          f"not --format {fmt}")
    if prompt is not None and not prompt.strip():
        raise SeesayError("--prompt must not be empty")
    if task == "pretrain":
        if prompt is not None:
            raise SeesayError("--prompt does not apply to --task pretrain (its input is the corrupted caption)")
        return {"task": task, "prompt": None}
    out: dict[str, Any] = {"task": task, "prompt": prompt if prompt is not None else DEFAULT_PROMPT}
    if task == "classify":
        out["labels"] = sorted(set(labels))
    return out


def dataset_task(manifest: dict[str, Any], override: str | None = None) -> DatasetTask:
    """A prepared dataset's task (`override`, e.g. the recipe's `pretrain: true`, replaces it)."""
    task = manifest.get("task", "caption")
    if task not in TASKS:
        raise SeesayError(f"manifest.json: unknown task {task!r} (known: {', '.join(TASKS)})")
    prompt = manifest.get("prompt")
    labels = manifest.get("labels")
    loc = manifest.get("loc_vocab_size")
    if task in REGION_TASKS and (isinstance(loc, bool) or not isinstance(loc, int) or loc < 2):
        raise SeesayError(f"manifest.json: task {task} needs an integer loc_vocab_size >= 2; prepare the data again")
    if override is not None:
        if override not in TASKS:
            raise SeesayError(f"data.task must be one of {', '.join(TASKS)}, not {override!r}")
        if (override in REGION_TASKS) != (task in REGION_TASKS):
            raise SeesayError(f"data.task {override} cannot train a dataset prepared for task {task} "
                              "(region and grounding data hold boxes; prepare it with the task)")
        if override in REGION_TASKS:
            from seesay.data.region_tasks import default_prompt

            prompt = default_prompt(override) if override != task else prompt
        if override == "classify" and not labels:
            raise SeesayError("data.task classify needs a dataset prepared from a classification format")
        task = override
        if task != "pretrain" and prompt is None:
            prompt = DEFAULT_PROMPT
    return DatasetTask(task, None if task == "pretrain" else prompt, tuple(labels) if labels else None,
                       int(loc) if task in REGION_TASKS else None)


_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: how classification compares texts."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


# -- several datasets --------------------------------------------------------------------------------
def parse_weights(text: Any, n: int) -> list[float] | None:
    """`--data-weights 0.7,0.3` (or a list) -> [0.7, 0.3]; one positive number per dataset."""
    if text is None or text == "" or text == []:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        weights = [float(w) for w in items]
    except (TypeError, ValueError):
        raise SeesayError(f"--data-weights: expected numbers separated by commas, got {text!r}") from None
    if len(weights) != n:
        raise SeesayError(f"--data-weights: {len(weights)} weights for {n} datasets")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise SeesayError(f"--data-weights must be non-negative with a positive sum, got {text!r}")
    return weights


def mixture_counts(sizes: Sequence[int], weights: Sequence[float] | None) -> list[int]:
    """Rows each dataset gives to an epoch of sum(sizes) rows: its size, or its weight's share."""
    total = int(sum(sizes))
    if weights is None:
        return [int(s) for s in sizes]
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    counts = np.floor(w * total).astype(np.int64)
    rest = total - int(counts.sum())
    for k in np.argsort(-(w * total - counts), kind="stable")[:rest]:  # largest remainders
        counts[k] += 1
    return [int(c) for c in counts]


class MixtureSampler:
    """Indices into a ConcatDataset of datasets of `sizes` for one epoch, for one process.

    The order depends only on (seed, epoch): `set_epoch` like DistributedSampler (so
    `train.data.SkippingSampler` can resume inside an epoch); processes take every world_size-th
    index of the same order, padded to equal lengths as DistributedSampler pads."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None = None, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if any(s <= 0 for s in sizes):
            raise SeesayError("every training dataset needs at least one image")
        self.sizes, self.weights = [int(s) for s in sizes], weights
        self.counts = mixture_counts(self.sizes, weights)
        self.offsets = np.cumsum([0, *self.sizes[:-1]])
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0
        total = sum(self.counts)
        self.per_rank = math.ceil(total / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> np.ndarray:
        """The epoch's global order (every process's indices, before the split by rank)."""
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        parts = []
        for size, count, offset in zip(self.sizes, self.counts, self.offsets):
            draws = [torch.randperm(size, generator=g) for _ in range(math.ceil(count / size))] if count else []
            if draws:
                parts.append(torch.cat(draws)[:count].numpy() + int(offset))
        index = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        index = index[torch.randperm(len(index), generator=g).numpy()]
        pad = self.per_rank * self.world_size - len(index)
        if pad > 0 and len(index):
            index = np.concatenate([index, np.resize(index, pad)])
        return index

    def __iter__(self) -> Iterator[int]:
        return iter(int(i) for i in self.order()[self.rank::self.world_size])

    def __len__(self) -> int:
        return self.per_rank


class Tagged:
    """A training dataset whose items say which dataset (`dataset`) they come from, with
    `image_index` shifted by `offset` (so indices are unique across the mixed datasets)."""

    def __init__(self, inner: Any, index: int, offset: int = 0) -> None:
        self.inner, self.index, self.offset = inner, int(index), int(offset)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.inner[i])
        item["dataset"] = self.index
        item["image_index"] = int(item["image_index"]) + self.offset
        return item


class tagged_collate:  # noqa: N801 - used like a function: tagged_collate(collate)
    """`collate` plus "dataset": Long [B] (the dataset of each item); picklable for DataLoader workers."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        out = self.collate(batch)
        out["dataset"] = torch.tensor([b.get("dataset", 0) for b in batch], dtype=torch.long)
        return out


# -- prompts and pretraining rows ----------------------------------------------------------------------
def sentinel_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's `<extra_id_k>` ids (k = 0, 1, ...), or [] when it has none."""
    ids = getattr(tokenizer, "sentinel_ids", None)
    if callable(ids):
        ids = ids()
    return [int(i) for i in ids] if ids else []


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, min_width: int = 1) -> torch.Tensor:
    """Long [R, P] of id rows right-padded with `pad_id`."""
    import torch

    width = max([min_width, *(len(r) for r in rows)])
    out = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = list(r)
    return torch.from_numpy(out)


def row_rng(seed: int, epoch: int, dataset: int, image_index: int, row: int) -> np.random.Generator:
    """The generator of one training row's corruption: the same on a resumed run."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(dataset), int(image_index), int(row)])


def pretrain_rows(tokens: torch.Tensor, lengths: torch.Tensor, tokenizer: Any, rngs: Sequence[np.random.Generator]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Span-corrupt caption rows `bos w.. eos` (tokens [R, T], lengths [R]): (prompt [R, P] = the
    corrupted words, targets [R, T'] = `bos <extra_id_0> span0 <extra_id_1> ... eos`, their lengths [R])."""
    import torch

    from seesay.span_corruption import span_corrupt

    sentinels = sentinel_ids(tokenizer)
    if not sentinels:
        raise SeesayError(f"pretraining needs a tokenizer with <extra_id_*> sentinels; the "
                          f"{getattr(tokenizer, 'kind', type(tokenizer).__name__)} tokenizer has none "
                          "(seesay prepare --tokenizer sentencepiece, or a T5 language_model_name)")
    prompts, targets = [], []
    rows = tokens.cpu().tolist()
    for row, n, rng in zip(rows, lengths.cpu().tolist(), rngs):
        words = row[1: max(int(n) - 1, 1)]  # without bos / eos
        inputs, target = span_corrupt(words, sentinels, rng)
        prompts.append(inputs)
        targets.append([tokenizer.bos_id, *target, tokenizer.eos_id])
    return (pad_rows(prompts, tokenizer.pad_id), pad_rows(targets, tokenizer.pad_id, 2),
            torch.tensor([len(t) for t in targets], dtype=torch.long))


# -- training sources ----------------------------------------------------------------------------------
def dataset_paths(data: Any) -> list[str]:
    """The prepared datasets a `DataConfig` names: `datasets` (relative names under `root_dir`), else `path`."""
    from pathlib import Path

    if data.datasets:
        root = data.root_dir
        return [str(Path(root) / d) if root and not Path(d).is_absolute() else str(d) for d in data.datasets]
    return [data.path] if data.path else []


def resolve_datasets(cfg: Any) -> None:
    """`data.datasets` made paths (under `data.root_dir`) and `data.path` its first: the validated one."""
    paths = dataset_paths(cfg.data)
    if cfg.data.datasets:
        cfg.data.datasets = paths
        cfg.data.path = paths[0]
    if cfg.data.data_weights is not None:
        cfg.data.data_weights = parse_weights(cfg.data.data_weights, max(len(paths), 1))


@dataclass
class Source:
    """One training dataset: where it is, its data and its task."""

    root: Any  # Path
    prepared: Any  # seesay.data.store.PreparedData
    task: DatasetTask


def _same_tokenizer(a: Any, b: Any) -> bool:
    if a == b:
        return True
    da, db = getattr(a, "to_dict", None), getattr(b, "to_dict", None)
    return callable(da) and callable(db) and da() == db()


def open_sources(paths: Sequence[str], first: Any, task_override: str | None = None) -> list[Source]:
    """Every training dataset (`first` is paths[0], already open), checked to share the first one's
    tokenizer and image size: one line naming both otherwise."""
    from pathlib import Path

    from seesay.data.store import PreparedData

    sources = []
    for k, p in enumerate(paths):
        prepared = first if k == 0 else PreparedData(p)
        if k:
            if not _same_tokenizer(prepared.vocab, first.vocab):
                raise SeesayError(f"--data {p} and --data {paths[0]} have different vocabularies (tokenizers); "
                                  "prepare them with the same tokenizer and vocabulary to train on both")
            if prepared.image_size != first.image_size:
                raise SeesayError(f"--data {p} has {prepared.image_size}-pixel images but --data {paths[0]} has "
                                  f"{first.image_size}; prepare them with the same --image-size")
        sources.append(Source(Path(p), prepared, dataset_task(prepared.manifest, task_override)))
    return sources


class ConcatFeatures:
    """Cached features of several datasets as one store: image i of dataset k is offsets[k] + i."""

    def __init__(self, stores: Sequence[Any]) -> None:
        self.stores = list(stores)
        self.offsets = np.cumsum([0, *(s.num_images for s in self.stores)])
        self.grid_hw = self.stores[0].grid_hw
        self.grid, self.pooled = self.stores[0].grid, self.stores[0].pooled  # shapes, for blank encodings

    def get(self, index: torch.Tensor) -> Any:
        import torch

        from seesay.encoders.base import EncoderOutput

        idx = index.cpu().numpy()
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        grid = pooled = None
        for k, store in enumerate(self.stores):
            rows = np.nonzero(which == k)[0]
            if not len(rows):
                continue
            part = store.get(torch.from_numpy(idx[rows] - self.offsets[k]))
            if grid is None:
                grid = part.grid.new_zeros((len(idx), *part.grid.shape[1:]))
                pooled = part.pooled.new_zeros((len(idx), *part.pooled.shape[1:]))
            pos = torch.from_numpy(rows).to(grid.device)
            grid[pos], pooled[pos] = part.grid, part.pooled
        return EncoderOutput(grid, pooled, self.grid_hw)


def reads_prompt(captioner: Any) -> bool:
    """Whether a captioner reads an input text (the optional `reads_prompt` capability)."""
    return bool(getattr(captioner, "reads_prompt", False))


def task_rows(batch: dict[str, Any], tokens: torch.Tensor, lengths: torch.Tensor, image_rows: torch.Tensor | None,
              sources: Sequence[Source], tokenizer: Any, *, prompts: bool, seed: int, epoch: int,
              cache: dict[int, list[int]] | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(prompt [R, P] or None, tokens, lengths) of a training batch's caption rows, by their datasets' tasks.

    caption / classify rows get their dataset's prompt ids (`tokenizer.encode_prompt`) when the
    model reads prompts (`prompts`); pretrain rows are span-corrupted (seeded per (seed, epoch,
    dataset, image, row): a resumed run corrupts the same way): prompt = the corrupted caption,
    target = `bos <extra_id_0> span0 ... eos`. region / grounding rows (`<bos> <loc> x4 text <eos>`,
    `seesay.data.region_tasks`) become prompt + box -> text, or prompt + text -> box.
    Rows without a dataset (text-only) are the first's.
    `cache` keeps each dataset's prompt ids between calls (dataset index -> ids)."""
    import torch

    n = int(tokens.size(0))
    per_image = batch.get("dataset")
    ds = torch.zeros(n, dtype=torch.long) if per_image is None else per_image.cpu()
    img = batch.get("image_index")
    img = torch.full((n,), -1, dtype=torch.long) if img is None or batch.get("text_only") else img.cpu()
    if image_rows is not None:
        ds, img = ds[image_rows.cpu()], img[image_rows.cpu()]
    ds_rows, img_rows = ds.tolist(), img.tolist()
    pretrain = [sources[k].task.task == "pretrain" for k in ds_rows]
    regions = [sources[k].task.task in REGION_TASKS for k in ds_rows]
    if not any(pretrain) and not any(regions) and not prompts:
        return None, tokens, lengths
    if any(pretrain) and not prompts:
        raise SeesayError("pretraining (task pretrain) needs a model that reads prompts, such as the t5 decoder "
                          "(--decoder t5)")
    if any(regions) and not prompts:
        raise SeesayError("region captioning and grounding need a model that reads prompts, such as the t5 "
                          "decoder (--decoder t5)")
    from seesay.data.region_tasks import split_region_row
    from seesay.span_corruption import span_corrupt

    sentinels = sentinel_ids(tokenizer) if any(pretrain) else []
    if any(pretrain) and not sentinels:
        pretrain_rows(tokens[:0], lengths[:0], tokenizer, [])  # the one-line error naming the tokenizer
    cache = {} if cache is None else cache
    prompt_rows: list[list[int]] = []
    target_rows: list[list[int]] | None = [] if any(pretrain) or any(regions) else None
    rows, lens = tokens.cpu().tolist(), lengths.cpu().tolist()
    for r in range(n):
        k = ds_rows[r]
        if pretrain[r]:
            words = rows[r][1: max(int(lens[r]) - 1, 1)]  # without bos / eos
            inputs, target = span_corrupt(words, sentinels, row_rng(seed, epoch, k, img_rows[r], r))
            prompt_rows.append(inputs)
            target_rows.append([tokenizer.bos_id, *target, tokenizer.eos_id])
            continue
        if k not in cache:
            text = sources[k].task.prompt
            cache[k] = list(tokenizer.encode_prompt(text)) if text else []
        if regions[r]:
            inputs, target = split_region_row(rows[r][: int(lens[r])], sources[k].task.task, cache[k],
                                              tokenizer.bos_id, tokenizer.eos_id)
            prompt_rows.append(inputs)
            target_rows.append(target)
            continue
        prompt_rows.append(cache[k])
        if target_rows is not None:
            target_rows.append(rows[r][: int(lens[r])])
    prompt = pad_rows(prompt_rows, tokenizer.pad_id)
    if target_rows is None:
        return prompt, tokens, lengths
    device = tokens.device
    return (prompt, pad_rows(target_rows, tokenizer.pad_id, 2).to(device),
            torch.tensor([len(t) for t in target_rows], dtype=torch.long, device=device))


def image_prompts(batch: dict[str, Any], n_images: int, sources: Sequence[Source], tokenizer: Any,
                  prompts: bool, cache: dict[int, list[int]] | None = None) -> torch.Tensor | None:
    """[B, P] prompt ids per image of a whole-image batch (self-critical training), or None when the
    model reads no prompt. Pretraining samples no captions: its datasets refuse self-critical training."""

    per_image = batch.get("dataset")
    ds = [0] * n_images if per_image is None else [int(k) for k in per_image.tolist()]
    if any(sources[k].task.task == "pretrain" for k in ds):
        raise SeesayError("pretraining (task pretrain) trains with --objective xe only")
    if any(sources[k].task.task in REGION_TASKS for k in ds):
        raise SeesayError("region captioning and grounding train with --objective xe only")
    if not prompts:
        return None
    cache = {} if cache is None else cache
    for k in set(ds) - set(cache):
        text = sources[k].task.prompt
        cache[k] = list(tokenizer.encode_prompt(text)) if text else []
    return pad_rows([cache[k] for k in ds], tokenizer.pad_id)
