"""The captioning task the generic loop trains: data, loss, validation by real decoding.

# b - images, r - caption rows, t - time, v - vocabulary
Two ways to feed the model, chosen by whether the encoder trains:

- frozen encoder (default): every image of train and val is encoded once
  (`train.features`), and the decoder trains on caption-level batches that look the
  features up by image index. The encoder never runs during the epochs.
- `--fine-tune-encoder`: batches are made of whole images with all their captions
  (`batch_size` counts captions, so a batch holds `batch_size // captions_per_image`
  images), each image goes through the encoder once per step and its output is repeated
  for its captions (`image_rows`), instead of once per caption.

Data comes from the data layer (`seesay.data.store.PreparedData`/`SplitStore`, and
`seesay.data.loader.CaptionDataset` / `ImageCaptionDataset` with their numpy collates).
Optional text-only captions (`data.text_data_path`) are mixed in as extra batches whose input
is an all-zero "no image" encoding (`MixedBatches`, `CaptionTask.blank_encoding`).

Loss: cross-entropy over the real (non-padding) positions, averaged over every token of the
global batch (so 2 processes with half the batch each give the same gradient as one process
with all of it), plus the decoder's own regulariser (`extras["aux_loss"]`). Validation
decodes the val images for real (greedy or beam `val_beam_size`, no teacher forcing) and
scores the captions against all references with `seesay.metrics.compute_scores`.
"""

from __future__ import annotations

import json
import logging
import math
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from seesay.checkpoint import save_checkpoint
from seesay.config import Config
from seesay.data.loader import CaptionDataset, ImageCaptionDataset, collate_captions, collate_images
from seesay.data.store import PreparedData, SplitStore
from seesay.encoders.base import EncoderOutput
from seesay.errors import SeesayError
from seesay.files import write_json_atomic
from seesay.model import CaptionModel, build_model
from seesay.train.distributed import DistInfo, all_reduce_sum, barrier
from seesay.train.features import FeatureStore, build_feature_cache, cache_key, encoder_fingerprint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Text-only captions (the Titans extension's `text_data_path`): language-model rows with no image.


def read_text_data(path: str | Path, vocab: Any, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Captions of a text file (one per line) or a JSON list of strings / {"text": ...} objects,
    encoded with the dataset's vocabulary (unknown words -> <unk>) as int64 [M, max_len + 2]
    (<start> tokens <end>, 0-padded) and lengths [M]; longer captions are cut to `max_len` tokens."""
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
    tokens = np.zeros((len(encoded), max_len + 2), dtype=np.int64)
    lengths = np.zeros(len(encoded), dtype=np.int64)
    for r, ids in enumerate(encoded):
        row = [vocab.start_id, *ids, vocab.end_id]
        tokens[r, : len(row)] = row
        lengths[r] = len(row)
    return tokens, lengths


def _worker_leaves_signals_to_trainer(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C and SIGTERM (a terminal or a scheduler sends them to every
    process): the training process finishes its step, saves and stops, and then ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


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


class _ImagesOrFeatures(torch.nn.Module):
    """Wraps the whole model when the encoder runs in the loop and text-only rows are mixed in, so
    DDP sees one module that takes either images (encoded) or a ready EncoderOutput (the blank one)."""

    def __init__(self, model: CaptionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Any, tokens: torch.Tensor, lengths: torch.Tensor,
                image_rows: torch.Tensor | None = None) -> Any:
        if isinstance(src, EncoderOutput):
            return self.model.forward_features(src, tokens, lengths, image_rows)
        return self.model(src, tokens, lengths, image_rows)


# ---------------------------------------------------------------------------------------------


def model_spec(cfg: Config, vocab_size: int) -> dict[str, Any]:
    enc = {"name": cfg.encoder.name, **cfg.encoder.options}
    if cfg.encoder.weights is not None:
        enc["weights"] = cfg.encoder.weights
    dec = {"name": cfg.decoder.name, **cfg.decoder.options, "vocab_size": int(vocab_size)}
    if cfg.decoder.name == "soft_attention" and "alpha_c" not in dec:  # others: only when set in options
        dec["alpha_c"] = cfg.decoder.alpha_c
    return {"encoder": enc, "decoder": dec}


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
                 normalise_globally: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, token count, top-5 hits) over real positions; logits[:, t] predicts tokens[:, t+1]."""
    steps = logits.size(1)
    targets = tokens[:, 1: steps + 1]
    mask = torch.arange(steps, device=logits.device)[None, :] < (lengths.to(logits.device) - 1)[:, None]  # (R, T-1)
    sel = logits[mask].float()  # (K, V)
    tgt = targets[mask]
    ce = F.cross_entropy(sel, tgt, reduction="sum")
    n_local = mask.sum()
    with torch.no_grad():
        hits = (sel.topk(min(5, sel.size(-1)), dim=-1).indices == tgt[:, None]).any(-1).sum()
    n_global = n_local.detach().clone().double()
    world = 1
    if normalise_globally and torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        all_reduce_sum(n_global)
    loss = ce * world / n_global.clamp(min=1).to(ce.dtype)
    return loss, n_local, hits


class CaptionTask:
    """Builds the model and data for `cfg` and implements the loop's task interface."""

    def __init__(self, cfg: Config, dist: DistInfo, run_dir: str | Path, config_dict: dict[str, Any] | None = None,
                 model: CaptionModel | None = None) -> None:
        self.cfg, self.dist, self.run_dir = cfg, dist, Path(run_dir)
        self.config_dict = config_dict if config_dict is not None else cfg.to_dict()
        self.device = dist.device
        data_dir = Path(cfg.data.path or "")
        self.data_dir = data_dir
        self.prepared = PreparedData(data_dir)
        self.manifest = self.prepared.manifest
        self.vocab = self.prepared.vocab
        self.train_data: SplitStore = self.prepared.split(cfg.data.train_split)
        self.val_data: SplitStore = self.prepared.split(cfg.data.val_split)
        if len(self.train_data) == 0 or len(self.val_data) == 0:
            raise SeesayError(f"{data_dir}: the {cfg.data.train_split!r} and {cfg.data.val_split!r} splits need images")

        if model is None:
            model = build_model(model_spec(cfg, len(self.vocab)), glove_itos=self.vocab.itos)
        self.model = model.to(self.device)
        self.model.encoder.set_fine_tune(cfg.encoder.fine_tune)
        last = self.run_dir / "last" / "model.safetensors"
        if cfg.train.resume and last.is_file():  # before features: a frozen encoder's cache key uses its weights
            self.load_weights(last.parent)
        self.cached = not self.model.encoder.is_trainable and cfg.train.cache_features
        self.module: torch.nn.Module = self.model.decoder if self.cached else self.model

        if self.cached:
            self.train_feats = self._features(self.train_data)
            self.val_feats = self._features(self.val_data)
            self.train_set: Dataset = CaptionDataset(self.prepared, cfg.data.train_split, load_images=False)
            batch_size, collate = cfg.train.batch_size, collate_captions
        else:
            self.train_set = ImageCaptionDataset(self.prepared, cfg.data.train_split)
            batch_size = max(1, cfg.train.batch_size // self.train_data.captions_per_image)
            collate = collate_images
        self.sampler = SkippingSampler(DistributedSampler(self.train_set, num_replicas=dist.world_size, rank=dist.rank,
                                                          shuffle=True, seed=cfg.train.seed, drop_last=False))
        self.batch_size = batch_size
        workers = cfg.data.workers
        # the loader's own generator (worker seeds) keeps it off the global RNG, which then only
        # the training steps draw from: that is what makes resuming (even inside an epoch) exact
        self.loader = DataLoader(self.train_set, batch_size=batch_size, sampler=self.sampler, collate_fn=collate,
                                 num_workers=workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=workers > 0, drop_last=False,
                                 generator=torch.Generator().manual_seed(cfg.train.seed),
                                 worker_init_fn=_worker_leaves_signals_to_trainer)

        # -- text-only captions: language-model rows given an all-zero ("no image") encoding
        self.text_tokens: np.ndarray | None = None
        self.text_rows_per_epoch = 0
        self.text_rows_seen = 0  # by this process, for logs and tests
        if cfg.data.text_data_path:
            if cfg.data.text_ratio < 0:
                raise SeesayError(f"data.text_ratio must be >= 0, not {cfg.data.text_ratio}")
            max_len = int(self.manifest.get("max_len", self.train_data.captions.shape[-1] - 2))
            self.text_tokens, self.text_lengths = read_text_data(cfg.data.text_data_path, self.vocab, max_len)
            n_captions = len(self.train_data) * self.train_data.captions_per_image
            self.text_rows_per_epoch = int(round(cfg.data.text_ratio * n_captions))
            self._blank = self._blank_shape()
            if not self.cached:
                self.module = _ImagesOrFeatures(self.model)
            if dist.is_main:
                log.info("text-only data %s: %d captions; %d mixed into each epoch (data.text_ratio %g x %d "
                         "train captions)", cfg.data.text_data_path, len(self.text_tokens),
                         self.text_rows_per_epoch, cfg.data.text_ratio, n_captions)
        # DDP must search for parameters without a gradient when some go unused in a step: decoders
        # that say so (titans_mac: the neural memory's parameters do not all get a gradient), and the
        # encoder during text-only steps when it trains in the loop.
        dec = self.model.decoder
        self.ddp_find_unused_parameters = bool(
            getattr(dec, "ddp_find_unused_parameters", cfg.decoder.name == "titans_mac")
            or (self.text_rows_per_epoch > 0 and not self.cached))

    def _blank_shape(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, int]]:
        """(grid [N, D], pooled [D], grid_hw) of one image's encoding, for the all-zero "no image" input."""
        if self.cached:
            return tuple(self.train_feats.grid.shape[1:]), tuple(self.train_feats.pooled.shape[1:]), \
                tuple(self.train_feats.grid_hw)
        enc = self.model.encoder
        was_training = enc.training
        enc.eval()  # no dropout RNG draws, no BatchNorm statistics updates
        try:
            with torch.no_grad():
                image = torch.from_numpy(np.array(self.train_data.images[:1])).permute(0, 3, 1, 2).to(self.device)
                out = self.model.encode(image)
        finally:
            enc.train(was_training)
        return tuple(out.grid.shape[1:]), tuple(out.pooled.shape[1:]), tuple(out.grid_hw)

    def blank_encoding(self, rows: int) -> EncoderOutput:
        """All-zero EncoderOutput for `rows` caption rows: the "no image" input of text-only rows."""
        grid, pooled, hw = self._blank
        return EncoderOutput(torch.zeros((rows, *grid), device=self.device),
                             torch.zeros((rows, *pooled), device=self.device), hw)

    # -- features -------------------------------------------------------------------------------
    def _features(self, data: SplitStore) -> FeatureStore:
        enc = self.model.encoder
        key = cache_key(data=str(Path(self.data_dir).resolve()), split=data.split, n=len(data),
                        spec=self.model.spec.get("encoder"), preprocess=enc.preprocess.to_dict(),
                        weights=encoder_fingerprint(enc))
        root = Path(self.cfg.train.feature_cache_dir or self.run_dir / "features")
        directory = root / f"{data.split}-{key}"
        if self.dist.is_main:
            enc.eval()
            build_feature_cache(self.model.encode, data.images, directory, device=self.device,
                                progress=self.cfg.train.progress,
                                meta={"data": str(self.data_dir), "split": data.split, "encoder": self.model.spec.get("encoder")})
        barrier()
        return FeatureStore(directory, device=self.device)

    # -- loop interface ---------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": [p for p in self.model.decoder.parameters() if p.requires_grad],
                   "lr": self.cfg.decoder.lr, "name": "decoder"}]
        if not self.cached:
            enc_params = [p for p in self.model.encoder.parameters() if p.requires_grad]
            if enc_params:
                groups.append({"params": enc_params, "lr": self.cfg.encoder.lr, "name": "encoder"})
        return groups

    def train_batches(self, epoch: int, start: int = 0) -> DataLoader | MixedBatches:
        """This process's batches of `epoch`, from its `start`-th batch on."""
        self.sampler.set_epoch(epoch)
        full_image_batches = len(self.loader)
        if self.text_tokens is None or self.text_rows_per_epoch == 0:
            self.sampler.set_epoch(epoch, skip=start * self.batch_size)
            return self.loader
        mixed = MixedBatches(self.loader, self.text_tokens, self.text_lengths, rows_per_epoch=self.text_rows_per_epoch,
                             batch_size=self.cfg.train.batch_size, seed=self.cfg.train.seed, epoch=epoch,
                             rank=self.dist.rank, world_size=self.dist.world_size, image_batches=full_image_batches,
                             start=start)
        self.sampler.set_epoch(epoch, skip=mixed.image_batches_before(start) * self.batch_size)
        return mixed

    def training_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, Any]:
        dev = self.device
        tokens = batch["captions"].to(dev, non_blocking=True)
        lengths = batch["lengths"].to(dev, non_blocking=True)
        if batch.get("text_only"):
            self.text_rows_seen += int(tokens.size(0))
            out = model(self.blank_encoding(int(tokens.size(0))), tokens, lengths)
        elif self.cached:
            enc = self.train_feats.get(batch["image_index"])
            out = model(enc, tokens, lengths)
        else:
            out = model(batch["images"].to(dev, non_blocking=True), tokens, lengths,
                        batch["image_rows"].to(dev, non_blocking=True))
        ce, n_tok, hits = caption_loss(out.logits, tokens, lengths)
        loss = ce
        aux = out.extras.get("aux_loss") if out.extras else None
        if aux is not None:
            loss = loss + aux
        return {"loss": loss, "top5": hits.double() / n_tok.clamp(min=1), "n": int(tokens.size(0))}

    @torch.no_grad()
    def decode_split(self, data: SplitStore, feats: FeatureStore | None, *, beam_size: int, max_len: int,
                     max_images: int | None = None, batch_size: int = 64) -> dict[str, str]:
        """Real decoding (no teacher forcing): {image_id: caption}."""
        was_training = self.model.training
        self.model.eval()
        n = len(data) if max_images is None else min(len(data), max_images)
        results: dict[str, str] = {}
        try:
            for start in range(0, n, batch_size):
                idx = torch.arange(start, min(start + batch_size, n))
                if feats is not None:
                    src: Any = feats.get(idx)
                else:
                    imgs = np.array(data.images[start: start + len(idx)])
                    src = torch.from_numpy(imgs).permute(0, 3, 1, 2).to(self.device)
                res = self.model.generate(src, bos=self.vocab.start_id, eos=self.vocab.end_id, max_len=max_len,
                                          beam_size=beam_size)
                for j, row in enumerate(res.tokens.tolist()):
                    results[data.image_ids[start + j]] = self.vocab.decode(row[: int(res.lengths[j])])
        finally:
            self.model.train(was_training)
        return results

    def validate(self) -> dict[str, float]:
        from seesay.metrics import compute_scores

        cfg = self.cfg
        results = self.decode_split(self.val_data, self.val_feats if self.cached else None,
                                    beam_size=cfg.train.val_beam_size, max_len=cfg.train.val_max_len,
                                    max_images=cfg.data.val_max_images)
        refs = {data_id: r for data_id, r in zip(self.val_data.image_ids, self.val_data.references) if data_id in results}
        lang = "zh" if self.vocab.tokenizer == "jieba" else "en"
        report = compute_scores(results, refs, full=False, lang=lang)
        return {k: (float(v) if v is not None else None) for k, v in report.corpus.items() if v is not None}

    def preprocess_dict(self) -> dict[str, Any]:
        return {"encoder": self.model.preprocess.to_dict(), "image_size": int(self.manifest.get("image_size", 0))}

    def save(self, path: str | Path, train_state: dict[str, Any] | None) -> None:
        save_checkpoint(path, model=self.model, vocab=self.vocab, config=self.config_dict,
                        preprocess=self.preprocess_dict(), train_state=train_state)

    def load_weights(self, path: str | Path) -> None:
        state = load_file(str(Path(path) / "model.safetensors"), device=str(self.device))
        self.model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------


def _prepare_if_needed(cfg: Config) -> None:
    """--coco-dir and Titans-style pairs configs: prepare the data once, then train on it."""
    from seesay.data.prepare import prepare_dataset

    if cfg.data.path is None and cfg.data.coco_dir is not None:
        target = Path(cfg.data.coco_dir) / "prepared"
        if not (target / "manifest.json").is_file():
            log.info("preparing COCO from %s into %s", cfg.data.coco_dir, target)
            prepare_dataset("coco", target, coco_dir=cfg.data.coco_dir)
        cfg.data.path = str(target)
    if cfg.data.path is None and cfg.data.pairs_config is not None:
        from seesay.config import load_yaml

        pairs = load_yaml(cfg.data.pairs_config)
        base = Path(cfg.data.pairs_config).parent
        target = Path(cfg.train.output) / "data"
        if not (target / "manifest.json").is_file():
            log.info("preparing image/text pairs from %s into %s", cfg.data.pairs_config, target)
            prepare_dataset("pairs", target, annotations=base / pairs["annotations_file"],
                            images=base / pairs["image_dir"], min_word_freq=int(pairs.get("min_word_freq", 1)))
        cfg.data.path = str(target)
    if cfg.data.path is None:
        raise SeesayError("no training data: pass --data DATA_DIR (a prepared dataset) or --coco-dir DIR")


def _resolve_pairs_text(cfg: Config) -> None:
    """A pairs config's optional `text_data_path` (relative to the config file) becomes
    `data.text_data_path` unless that is set already; runs on every process (cheap)."""
    if cfg.data.pairs_config is None or cfg.data.text_data_path:
        return
    from seesay.config import load_yaml

    pairs = load_yaml(cfg.data.pairs_config)
    if pairs.get("text_data_path"):
        cfg.data.text_data_path = str(Path(cfg.data.pairs_config).parent / str(pairs["text_data_path"]))


def train_captioner(cfg: Config) -> Any:
    """Train a captioner as `cfg` says; returns the loop's final state. Handles torchrun DDP."""
    from seesay.train.distributed import barrier, cleanup_distributed, setup_distributed
    from seesay.train.loop import check_config, fit
    from seesay.train.state import seed_everything

    check_config(cfg.train)  # before features are computed, which can take long
    dist = setup_distributed(cfg.train.device)
    try:
        _resolve_pairs_text(cfg)
        if dist.is_main:
            _prepare_if_needed(cfg)
        cfg.data.path = _broadcast_path(cfg.data.path)
        run_dir = Path(cfg.train.output)
        if dist.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        # same seed on every rank: identical initial weights (DDP also broadcasts them)
        seed_everything(cfg.train.seed)
        config_dict = cfg.to_dict()
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.train.resume and (run_dir / "metrics.jsonl").exists():
                (run_dir / "metrics.jsonl").unlink()
            write_json_atomic(run_dir / "config.json", config_dict, indent=2)
        task = CaptionTask(cfg, dist, run_dir, config_dict)
        if dist.is_main:
            n_params = sum(p.numel() for p in task.model.parameters())
            n_train = sum(p.numel() for g in task.param_groups() for p in g["params"])
            log.info("model %s + %s: %.2fM parameters (%.2fM trained); %s; %d train images x %d captions; device %s%s",
                     cfg.encoder.name, cfg.decoder.name, n_params / 1e6, n_train / 1e6,
                     "cached encoder features" if task.cached else "encoder in the loop",
                     len(task.train_data), task.train_data.captions_per_image, dist.device,
                     f" x {dist.world_size} processes" if dist.enabled else "")
            if not task.model.encoder.is_trainable and getattr(task.model.encoder, "pretrained", True) is False:
                log.warning("the %s encoder has random weights and is frozen: its features carry little; "
                            "pass --fine-tune-encoder (or pretrained weights)", cfg.encoder.name)
        state = fit(task, cfg.train, dist, run_dir, config_dict)
        if dist.is_main:
            log.info("done: best %s %.4f at epoch %d; checkpoints in %s/best and %s/last", cfg.train.select_metric,
                     state.best_score, state.best_epoch, run_dir, run_dir)
        barrier()  # a normal end: no rank tears the process group down while another still uses it
        return state
    finally:
        cleanup_distributed()


def _broadcast_path(path: str | None) -> str | None:
    from seesay.train.distributed import broadcast_object

    return broadcast_object(path)
