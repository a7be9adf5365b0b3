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

Loss: cross-entropy over the real (non-padding) positions, averaged over every token of the
global batch (so 2 processes with half the batch each give the same gradient as one process
with all of it), plus the decoder's own regulariser (`extras["aux_loss"]`). Validation
decodes the val images for real (greedy or beam `val_beam_size`, no teacher forcing) and
scores the captions against all references with `seesay.metrics.compute_scores`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from seesay.checkpoint import save_checkpoint
from seesay.config import Config
from seesay.errors import SeesayError
from seesay.model import CaptionModel, build_model
from seesay.train.distributed import DistInfo, all_reduce_sum, barrier
from seesay.train.features import FeatureStore, build_feature_cache, cache_key, encoder_fingerprint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Data: one split of a prepared DATA_DIR, as arrays (see seesay.data.store).


class SplitData:
    """One split of DATA_DIR: images uint8 [n,S,S,3] (memory-mapped, opened lazily so it pickles
    cheaply into DataLoader workers), captions int [n,C,L], lengths [n,C], image ids, references.

    Reads the layout `seesay prepare` writes: DATA_DIR/<split>/{images,captions,lengths}.npy
    and references.jsonl ({"image_id", "references"} per line).
    """

    def __init__(self, data_dir: str | Path, split: str) -> None:
        self.data_dir, self.split = str(data_dir), split
        root = Path(data_dir) / split
        if not (root / "captions.npy").is_file():
            raise SeesayError(f"{data_dir}: no {split!r} split (missing {root / 'captions.npy'})")
        self.captions = np.load(root / "captions.npy")
        self.lengths = np.load(root / "lengths.npy")
        self._images = None
        self._refs: list[list[str]] | None = None
        self._ids: list[str] | None = None

    def _read_refs(self) -> None:
        ids, refs = [], []
        with open(Path(self.data_dir) / self.split / "references.jsonl", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    ids.append(str(d["image_id"]))
                    refs.append([str(r) for r in d["references"]])
        self._ids, self._refs = ids, refs

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(Path(self.data_dir) / self.split / "images.npy", mmap_mode="r")
        return self._images

    @property
    def image_ids(self) -> list[str]:
        if self._ids is None:
            self._read_refs()
        return self._ids  # type: ignore[return-value]

    @property
    def references(self) -> list[list[str]]:
        if self._refs is None:
            self._read_refs()
        return self._refs  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def captions_per_image(self) -> int:
        return int(self.captions.shape[1])

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the memory map
        return {"data_dir": self.data_dir, "split": self.split}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["data_dir"], state["split"])


class CaptionRows(Dataset):
    """One item per caption: (image index, tokens, length); features are looked up later."""

    def __init__(self, data: SplitData) -> None:
        self.captions, self.lengths = data.captions, data.lengths
        self.cpi = data.captions_per_image

    def __len__(self) -> int:
        return len(self.captions) * self.cpi

    def __getitem__(self, k: int) -> tuple[int, np.ndarray, int]:
        i, c = divmod(int(k), self.cpi)
        return i, self.captions[i, c], int(self.lengths[i, c])


def collate_rows(items: list[tuple[int, np.ndarray, int]]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([it[2] for it in items], dtype=torch.long)
    tokens = torch.from_numpy(np.stack([it[1] for it in items]).astype(np.int64))[:, : int(lengths.max())]
    return {"image_index": torch.tensor([it[0] for it in items], dtype=torch.long), "tokens": tokens,
            "lengths": lengths}


class ImageGroups(Dataset):
    """One item per image: (image uint8 [S,S,3], all its captions [C,L], lengths [C])."""

    def __init__(self, data: SplitData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.array(self.data.images[i]), self.data.captions[i], self.data.lengths[i]


def collate_images(items: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    images = torch.from_numpy(np.stack([it[0] for it in items])).permute(0, 3, 1, 2).contiguous()  # (B,3,S,S)
    lengths = torch.from_numpy(np.concatenate([it[2] for it in items]).astype(np.int64))  # (R,)
    tokens = torch.from_numpy(np.concatenate([it[1] for it in items]).astype(np.int64))[:, : int(lengths.max())]
    cpi = [len(it[2]) for it in items]
    image_rows = torch.repeat_interleave(torch.arange(len(items)), torch.tensor(cpi))  # (R,)
    return {"images": images, "tokens": tokens, "lengths": lengths, "image_rows": image_rows}


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
        from seesay.data.tokenize import Vocab

        self.cfg, self.dist, self.run_dir = cfg, dist, Path(run_dir)
        self.config_dict = config_dict if config_dict is not None else cfg.to_dict()
        self.device = dist.device
        data_dir = Path(cfg.data.path or "")
        if not (data_dir / "manifest.json").is_file():
            raise SeesayError(f"{data_dir}: not a prepared dataset (no manifest.json); run `seesay prepare` first")
        self.data_dir = data_dir
        self.manifest = json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
        self.vocab = Vocab.load(data_dir / "vocab.json")
        self.train_data = SplitData(data_dir, cfg.data.train_split)
        self.val_data = SplitData(data_dir, cfg.data.val_split)
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
        self.module = self.model.decoder if self.cached else self.model

        if self.cached:
            self.train_feats = self._features(self.train_data)
            self.val_feats = self._features(self.val_data)
            self.train_set: Dataset = CaptionRows(self.train_data)
            batch_size, collate = cfg.train.batch_size, collate_rows
        else:
            self.train_set = ImageGroups(self.train_data)
            batch_size = max(1, cfg.train.batch_size // self.train_data.captions_per_image)
            collate = collate_images
        self.sampler = DistributedSampler(self.train_set, num_replicas=dist.world_size, rank=dist.rank,
                                          shuffle=True, seed=cfg.train.seed, drop_last=False)
        workers = cfg.data.workers
        self.loader = DataLoader(self.train_set, batch_size=batch_size, sampler=self.sampler, collate_fn=collate,
                                 num_workers=workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=workers > 0, drop_last=False)

    # -- features -------------------------------------------------------------------------------
    def _features(self, data: SplitData) -> FeatureStore:
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

    def train_batches(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        return self.loader

    def training_step(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, Any]:
        dev = self.device
        tokens = batch["tokens"].to(dev, non_blocking=True)
        lengths = batch["lengths"].to(dev, non_blocking=True)
        if self.cached:
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
    def decode_split(self, data: SplitData, feats: FeatureStore | None, *, beam_size: int, max_len: int,
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
        if pairs.get("text_data_path"):
            log.warning("%s: text_data_path (text-only captions) is not used for training yet; ignored",
                        cfg.data.pairs_config)
        if not (target / "manifest.json").is_file():
            log.info("preparing image/text pairs from %s into %s", cfg.data.pairs_config, target)
            prepare_dataset("pairs", target, annotations=base / pairs["annotations_file"],
                            images=base / pairs["image_dir"], min_word_freq=int(pairs.get("min_word_freq", 1)))
        cfg.data.path = str(target)
    if cfg.data.path is None:
        raise SeesayError("no training data: pass --data DATA_DIR (a prepared dataset) or --coco-dir DIR")


def train_captioner(cfg: Config) -> Any:
    """Train a captioner as `cfg` says; returns the loop's final state. Handles torchrun DDP."""
    from seesay.train.distributed import cleanup_distributed, setup_distributed
    from seesay.train.loop import fit
    from seesay.train.state import seed_everything

    dist = setup_distributed(cfg.train.device)
    try:
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
            (run_dir / "config.json").write_text(json.dumps(config_dict, indent=2))
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
        return state
    finally:
        cleanup_distributed()


def _broadcast_path(path: str | None) -> str | None:
    from seesay.train.distributed import broadcast_object

    return broadcast_object(path)
