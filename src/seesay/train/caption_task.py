"""The captioning task the generic loop trains: a captioner, its data, its objective, and
validation by real decoding.

# b - images, r - caption rows, t - time, v - vocabulary
The task talks to the model only through the captioner contract (`seesay.captioner`), so every
family trains here: `CaptionModel` (encoder + decoder), the Titans `MultimodalMAC`, or any
registered family. Two ways to feed it, chosen by whether its image features train:

- frozen features (default for a frozen encoder): every image of train and val is encoded
  once (`train.features`), and training runs on caption-level batches that look the features
  up by image index, or (`train.batch_by: image`) on whole images with all their captions, whose
  features the decoder reads once per image (`image_rows`). The image model never runs during
  the epochs.
- features that train (`--fine-tune-encoder`, or `--no-cache-features`): batches are made of
  whole images with all their captions (`batch_size` counts captions, so a batch holds
  `batch_size // captions_per_image` images), each image is encoded once per step and its
  features are repeated for its captions (`image_rows`).

Data comes from the data layer (`seesay.data.store.PreparedData`/`SplitStore`, and
`seesay.data.loader` datasets with their numpy collates); text-only captions
(`data.text_data_path`) are mixed in as extra batches with an all-zero "no image" encoding
(`train.data.MixedBatches`). The loss is an objective object (`train.objectives`): cross-entropy
(`train.objective: xe`), or self-critical training on CIDEr-D (`scst`, usually with `train.init`
naming the cross-entropy model's checkpoint), which takes whole images (`batch_size //
scst_samples` per batch, cached features or images) with their raw references and samples its
own caption rows. Validation decodes the val images for real (`seesay.captioner.decode_split`)
and scores them in the language `seesay.captioner.evaluation_lang` picks, the same rule
`seesay evaluate` uses.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler

from seesay.captioner import decode_split, evaluation_lang
from seesay.checkpoint import read_weights, save_checkpoint
from seesay.config import Config
from seesay.data.loader import CaptionDataset, ImageCaptionDataset, collate_captions, collate_images
from seesay.data.shards import ShardSplit, check_resume_workers, is_sharded, shard_loader
from seesay.data.store import PreparedData, SplitStore
from seesay.data.tasks import (
    ConcatFeatures,
    MixtureSampler,
    Tagged,
    dataset_paths,
    image_prompts,
    open_sources,
    reads_prompt,
    resolve_datasets,
    tagged_collate,
    task_rows,
)
from seesay.decoding import strategy_from_options
from seesay.encoders.base import EncoderOutput
from seesay.errors import SeesayError
from seesay.files import write_json_atomic
from seesay.registry import build_captioner
from seesay.train.data import (
    MixedBatches,
    SkippingSampler,
    encode_references,
    end_data_workers,
    read_text_data,
    worker_leaves_signals_to_trainer,
)
from seesay.train.distributed import DistInfo, barrier
from seesay.train.features import FeatureStore, build_feature_cache, cache_key, encoder_fingerprint
from seesay.train.mim import build_mim, extends
from seesay.train.objectives import CrossEntropy, SelfCritical
from seesay.train.setup import check_objective, init_weights, prepare_if_needed, resolve_pairs_text

log = logging.getLogger(__name__)


def captioner_spec(cfg: Config, tokenizer: Any) -> dict[str, Any]:
    """The spec of the captioner `cfg` asks for (see `seesay.captioner`)."""
    if cfg.captioner.family != "encoder_decoder":
        return {"captioner": cfg.captioner.family, **cfg.captioner.options}
    enc = {"name": cfg.encoder.name, **cfg.encoder.options}
    if cfg.encoder.weights is not None:
        enc["weights"] = cfg.encoder.weights
    dec = {"name": cfg.decoder.name, **cfg.decoder.options, "vocab_size": len(tokenizer)}
    return {"captioner": "encoder_decoder", "encoder": enc, "decoder": dec}


def metric_names() -> list[str]:
    """What validation can return. Region data validates on its own scores
    (`seesay.data.region_tasks.region_scores`): a grounding run selects on grounding_accuracy."""
    from seesay.data.region_tasks import REGION_METRICS

    return ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", *REGION_METRICS]


class CaptionTask:
    """Builds the captioner and data for `cfg` and implements the loop's task interface."""

    def __init__(self, cfg: Config, dist: DistInfo, run_dir: str | Path, config_dict: dict[str, Any] | None = None,
                 model: Any = None) -> None:
        self.cfg, self.dist, self.run_dir = cfg, dist, Path(run_dir)
        self.config_dict = config_dict if config_dict is not None else cfg.to_dict()
        self.device = dist.device
        self.data_dir = Path(cfg.data.path or "")
        self.prepared = PreparedData(self.data_dir)
        self.manifest = self.prepared.manifest
        self.tokenizer = self.prepared.vocab
        self.sharded = is_sharded(self.manifest, cfg.data.train_split)  # WebDataset shards: seesay.data.shards
        self.train_data: Any = (ShardSplit(self.prepared, cfg.data.train_split) if self.sharded
                                else self.prepared.split(cfg.data.train_split))
        self.val_data: SplitStore = self.prepared.split(cfg.data.val_split)
        # every training dataset with its task and prompt (seesay.data.tasks); the first is validated on
        self.sources = open_sources(dataset_paths(cfg.data), self.prepared, cfg.data.task)
        if self.sharded and len(self.sources) > 1:
            raise SeesayError(f"{self.data_dir}: sharded data trains alone (several --data need prepared stores)")
        if len(self.train_data) == 0 or len(self.val_data) == 0:
            raise SeesayError(f"{self.data_dir}: the {cfg.data.train_split!r} and {cfg.data.val_split!r} splits need images")
        self._image_and_location_tokens()
        self.model = self._build_model(model)
        self.tokenizer = self.model.tokenizer  # a family may bring its own (T5's SentencePiece, ...)
        self.reads_prompt = reads_prompt(self.model)  # rows then carry their dataset's prompt (seesay.data.tasks)
        self.prompt_ids: dict[int, list[int]] = {}  # dataset index -> its prompt's ids (encoded once)
        self.eval_lang = evaluation_lang(self.tokenizer, self.manifest, self.val_data.references)
        self.objective: CrossEntropy | SelfCritical = self._build_objective()
        self.cached = not getattr(self.model, "features_trainable", True) and cfg.train.cache_features
        self.module: torch.nn.Module = self.model  # what trains (DDP wraps it)
        if self.cached:
            self.train_feats = self._features(self.train_data) if len(self.sources) == 1 else ConcatFeatures(
                [self._features(s.prepared.split(cfg.data.train_split), s.root) for s in self.sources])
            self.val_feats = self._features(self.val_data)
        self._build_loader()
        self.mim = build_mim(self)  # masked image modelling rows (seesay.train.mim), or None
        self._add_text_data()
        # DDP must search for parameters without a gradient when some go unused in a step: families
        # that say so (titans_mac's neural memory), and the image model during text-only steps when
        # it trains in the loop.
        self.ddp_find_unused_parameters = bool(getattr(self.model, "ddp_find_unused_parameters", False)
                                               or (self.text_rows_per_epoch > 0 and not self.cached))

    # -- set-up ---------------------------------------------------------------------------------
    def _image_and_location_tokens(self) -> None:
        """`<img_i>` for a recipe with a VQ (`data.vae_ckpt_path`), and the recipe's `loc_vocab_size`
        checked against the region data's (docs/vlm.md)."""
        data = self.cfg.data
        for s in self.sources:
            if data.loc_vocab_size is not None and s.task.loc_vocab_size not in (None, data.loc_vocab_size):
                raise SeesayError(f"loc_vocab_size {data.loc_vocab_size} does not match --data {s.root}, prepared "
                                  f"with --loc-vocab-size {s.task.loc_vocab_size}")
        if data.vae_ckpt_path:
            from seesay.train.mim import load_checked_vq, with_image_tokens

            vq = load_checked_vq(data.vae_ckpt_path, data.image_vocab_size)
            self.tokenizer = with_image_tokens(self.tokenizer, int(vq.codebook_size))

    def _build_objective(self) -> CrossEntropy | SelfCritical:
        t = self.cfg.train
        check_objective(self.cfg)
        if t.objective == "xe":
            return CrossEntropy(label_smoothing=t.label_smoothing)
        from seesay.train.reward import CaptionReward, describe

        refs = self.train_data.references
        kwargs = dict(lang=self.eval_lang, bleu_weight=t.scst_bleu_weight)
        if self.dist.is_main:  # rank 0 counts (once per dataset) and caches; the others read its file
            reward = CaptionReward.for_training_data(self.data_dir, self.cfg.data.train_split, refs, **kwargs)
        barrier()
        if not self.dist.is_main:
            reward = CaptionReward.for_training_data(self.data_dir, self.cfg.data.train_split, refs, write=False,
                                                     **kwargs)
        if self.dist.is_main:
            log.info("self-critical training: %d samples per image, %s baseline, reward %s, samples up to %d tokens",
                     t.scst_samples, t.scst_baseline, describe(reward), t.val_max_len)
        return SelfCritical(reward, samples=t.scst_samples, baseline=t.scst_baseline, max_len=t.val_max_len)

    def _build_model(self, model: Any) -> Any:
        cfg = self.cfg
        if model is None:
            preprocess = {"image_size": int(self.manifest.get("image_size", 0))}
            model = build_captioner(captioner_spec(cfg, self.tokenizer), self.tokenizer, preprocess)
            if cfg.decoder.glove and not cfg.train.resume:
                from seesay.layers.glove import init_word_embeddings

                init_word_embeddings(model, self.tokenizer, cfg.decoder.glove)
        if getattr(model, "tokenizer", None) is None:
            model.tokenizer = self.tokenizer
        model = model.to(self.device)
        if hasattr(model, "set_fine_tune"):
            fine_tune = cfg.encoder.fine_tune
            if fine_tune is None:  # auto: a random image model must learn, a pretrained one stays frozen
                fine_tune = getattr(model, "image_model_pretrained", True) is False
                if fine_tune and self.dist.is_main:
                    log.info("the image model has no pretrained weights: training it with the rest "
                             "(encoder.fine_tune auto; --freeze-encoder keeps it frozen)")
            model.set_fine_tune(bool(fine_tune))
        if cfg.train.init:  # before resume (which replaces the weights) and before features (cache key)
            init_weights(model, cfg.train.init, self.device)
        last = self.run_dir / "last" / "model.safetensors"
        if cfg.train.resume and last.is_file():  # before features: a frozen encoder's cache key uses its weights
            model.load_state_dict(read_weights(last, device=str(self.device)))
        return model

    def _build_loader(self) -> None:
        cfg, dist = self.cfg, self.dist
        if self.sharded:
            self._build_shard_loader()
            return
        encoded = None
        own = not extends(self.tokenizer, self.prepared.vocab)  # not the data's (plus <img_i>): re-encode
        if own and any(s.task.loc_vocab_size for s in self.sources):
            raise SeesayError(f"{self.data_dir}: region data trains with the tokenizer it was prepared with (its "
                              "<loc_i> tokens), not the model's own; drop language_model_name's tokenizer or prepare "
                              "the data with --tokenizer-model pointing at it")
        if own:  # the captioner's own tokenizer: re-encode the references
            max_len = int(self.manifest.get("max_len", self.train_data.captions.shape[-1] - 2))
            encoded = encode_references(self.train_data, self.tokenizer, max_len, self.train_data.captions_per_image)
            if dist.is_main:
                log.info("captions re-encoded with the model's %s tokenizer (%d tokens)",
                         getattr(self.tokenizer, "kind", type(self.tokenizer).__name__), len(self.tokenizer))
        pad = self.tokenizer.pad_id
        if self.objective.by_image:  # self-critical: whole images with their references; it samples the rows
            self.train_set = ImageCaptionDataset(self.prepared, cfg.data.train_split, encoded=encoded,
                                                 load_images=not self.cached)
            batch_size = max(1, cfg.train.batch_size // cfg.train.scst_samples)
            collate = functools.partial(collate_images, pad_id=pad)
        elif self.cached and cfg.train.batch_by == "caption":
            self.train_set: Dataset = CaptionDataset(self.prepared, cfg.data.train_split, load_images=False,
                                                     encoded=encoded)
            batch_size, collate = cfg.train.batch_size, functools.partial(collate_captions, pad_id=pad)
        else:  # whole images with their captions: images in the loop, or cached features batched by image
            self.train_set = ImageCaptionDataset(self.prepared, cfg.data.train_split, encoded=encoded,
                                                 load_images=not self.cached)
            batch_size = max(1, cfg.train.batch_size // self.train_data.captions_per_image)
            collate = functools.partial(collate_images, pad_id=pad)
        if len(self.sources) > 1:  # several datasets: tagged rows, mixed by size or weights (seesay.data.tasks)
            inner: Any = self._mix_datasets(encoded is not None)
            collate = tagged_collate(collate)
        else:
            inner = DistributedSampler(self.train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                       seed=cfg.train.seed, drop_last=False)
        self.sampler = SkippingSampler(inner)
        self.batch_size = batch_size
        workers = cfg.data.workers
        # the loader's own generator (worker seeds) keeps it off the global RNG, which then only
        # the training steps draw from: that is what makes resuming (even inside an epoch) exact
        self.loader = DataLoader(self.train_set, batch_size=batch_size, sampler=self.sampler, collate_fn=collate,
                                 num_workers=workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=workers > 0, drop_last=False,
                                 generator=torch.Generator().manual_seed(cfg.train.seed),
                                 worker_init_fn=worker_leaves_signals_to_trainer)

    def _mix_datasets(self, reencode: bool) -> MixtureSampler:
        """self.train_set becomes every dataset's training set (the same kind as the first's), tagged."""
        cfg = self.cfg
        parts, offset = [], 0
        for k, src in enumerate(self.sources):
            ds = self.train_set
            if k:
                store, encoded = src.prepared.split(cfg.data.train_split), None
                if reencode:
                    max_len = int(src.prepared.manifest.get("max_len", store.captions.shape[-1] - 2))
                    encoded = encode_references(store, self.tokenizer, max_len, store.captions_per_image)
                ds = type(self.train_set)(src.prepared, cfg.data.train_split, load_images=self.train_set.load_images,
                                          encoded=encoded)
            parts.append(Tagged(ds, k, offset))
            offset += len(ds.store)
        self.train_set = ConcatDataset(parts)
        return MixtureSampler([len(p) for p in parts], cfg.data.data_weights, seed=cfg.train.seed,
                              rank=self.dist.rank, world_size=self.dist.world_size)

    def _build_shard_loader(self) -> None:
        """Train batches streamed from the shards, with the store loaders' keys (`seesay.data.shards`):
        `self.sampler` is the stream, whose `set_epoch(epoch, skip)` resumes inside an epoch exactly."""
        cfg, dist = self.cfg, self.dist
        per = cfg.train.scst_samples if self.objective.by_image else self.train_data.captions_per_image
        mode = ("by_image" if self.objective.by_image else "captions" if self.cached and cfg.train.batch_by == "caption"
                else "images")
        self.batch_size = max(1, cfg.train.batch_size // per)  # images per batch
        if cfg.train.resume:
            check_resume_workers(self.run_dir, cfg.data.workers)
        self.sampler, self.loader = shard_loader(
            self.train_data, self.tokenizer, batch_size=self.batch_size, mode=mode, load_images=not self.cached,
            seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size, workers=cfg.data.workers,
            buffer=int(getattr(cfg.data, "shuffle_buffer", 1000)), pin_memory=self.device.type == "cuda",
            worker_init_fn=worker_leaves_signals_to_trainer)
        self.train_set = self.sampler

    def _add_text_data(self) -> None:
        """Text-only captions: language-model rows given an all-zero ("no image") encoding."""
        cfg = self.cfg
        self.text_tokens: np.ndarray | None = None
        self.text_rows_per_epoch = 0
        self.text_rows_seen = 0  # by this process, for logs and tests
        if not cfg.data.text_data_path:
            return
        if self.objective.by_image:
            raise SeesayError("data.text_data_path (text-only captions) trains with --objective xe only, "
                              f"not {cfg.train.objective}")
        if cfg.data.text_ratio < 0:
            raise SeesayError(f"data.text_ratio must be >= 0, not {cfg.data.text_ratio}")
        max_len = int(self.manifest.get("max_len", self.train_data.captions.shape[-1] - 2))
        self.text_tokens, self.text_lengths = read_text_data(cfg.data.text_data_path, self.tokenizer, max_len)
        n_captions = len(self.train_data) * self.train_data.captions_per_image
        self.text_rows_per_epoch = int(round(cfg.data.text_ratio * n_captions))
        self._blank = self._blank_shape()
        if self.dist.is_main:
            log.info("text-only data %s: %d captions; %d mixed into each epoch (data.text_ratio %g x %d "
                     "train captions)", cfg.data.text_data_path, len(self.text_tokens),
                     self.text_rows_per_epoch, cfg.data.text_ratio, n_captions)

    def _blank_shape(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, int]]:
        """(grid [N, D], pooled [D], grid_hw) of one image's encoding, for the all-zero "no image" input."""
        if self.cached:
            return tuple(self.train_feats.grid.shape[1:]), tuple(self.train_feats.pooled.shape[1:]), \
                tuple(self.train_feats.grid_hw)
        was_training = self.model.training
        self.model.eval()  # no dropout RNG draws, no BatchNorm statistics updates
        try:
            with torch.no_grad():
                image = torch.from_numpy(np.array(self.train_data.images[:1])).permute(0, 3, 1, 2).to(self.device)
                out = self.model.encode(image)
        finally:
            self.model.train(was_training)
        return tuple(out.grid.shape[1:]), tuple(out.pooled.shape[1:]), tuple(out.grid_hw)

    def blank_encoding(self, rows: int) -> EncoderOutput:
        """All-zero EncoderOutput for `rows` caption rows: the "no image" input of text-only rows."""
        grid, pooled, hw = self._blank
        return EncoderOutput(torch.zeros((rows, *grid), device=self.device),
                             torch.zeros((rows, *pooled), device=self.device), hw)

    def _features(self, data: SplitStore, data_dir: Path | None = None) -> FeatureStore:
        model = self.model
        spec = model.spec()
        image_model = getattr(model, "encoder", model)
        data_dir = Path(data_dir or self.data_dir)
        key = cache_key(data=str(data_dir.resolve()), split=data.split, n=len(data),
                        spec=spec.get("encoder", spec), preprocess=model.preprocess_config(),
                        weights=encoder_fingerprint(image_model))
        root = Path(self.cfg.train.feature_cache_dir or self.run_dir / "features")
        directory = root / f"{data.split}-{key}"
        if self.dist.is_main:
            model.eval()
            build_feature_cache(model.encode, data.images, directory, device=self.device,
                                progress=self.cfg.train.progress,
                                meta={"data": str(data_dir), "split": data.split, "model": spec.get("encoder", spec)})
        barrier()
        return FeatureStore(directory, device=self.device)

    # -- loop interface ---------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        named = self.model.param_groups() if hasattr(self.model, "param_groups") else {
            "decoder": [p for p in self.model.parameters() if p.requires_grad]}
        lrs = {"decoder": self.cfg.decoder.lr, "encoder": self.cfg.encoder.lr}
        groups = []
        for name, params in named.items():
            params = [p for p in params if p.requires_grad]
            if params and not (self.cached and name == "encoder"):
                groups.append({"params": params, "lr": lrs.get(name, self.cfg.decoder.lr), "name": name})
        return groups

    def batch_layout(self) -> dict[str, Any]:
        """What an epoch's batches depend on besides the loop's batch size and process count: a run
        saved inside an epoch resumes only with the same (the loop checks, `train.resume.check_layout`)."""
        layout: dict[str, Any] = {"datasets": [str(s.root) for s in self.sources],
                                  "data_weights": self.cfg.data.data_weights}
        if self.sharded:  # a stream's order depends on how it is split across workers
            layout["data_workers"] = max(1, int(self.cfg.data.workers))
        if self.cached and self.cfg.train.batch_by != "caption":
            layout["batch_by"] = self.cfg.train.batch_by
        return layout

    def metric_names(self) -> list[str]:
        return metric_names()

    def train_batches(self, epoch: int, start: int = 0) -> DataLoader | MixedBatches:
        """This process's batches of `epoch`, from its `start`-th batch on."""
        self.epoch = epoch  # seeds pretraining's span corruption (seesay.data.tasks.task_rows)
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
        image_rows = None
        if self.objective.by_image:
            src = self.train_feats.get(batch["image_index"]) if self.cached else batch["images"].to(dev, non_blocking=True)
            prompt = image_prompts(batch, len(batch["references"]), self.sources, self.tokenizer, self.reads_prompt,
                                   self.prompt_ids)
            if prompt is not None:
                return self.objective(model, src, batch["references"], prompt=prompt.to(dev))
            return self.objective(model, src, batch["references"])
        if batch.get("text_only"):
            self.text_rows_seen += int(tokens.size(0))
            src: Any = self.blank_encoding(int(tokens.size(0)))
        elif self.cached:
            src = self.train_feats.get(batch["image_index"])
            if "image_rows" in batch:  # batched by image: one feature row per image (train.batch_by)
                image_rows = batch["image_rows"].to(dev, non_blocking=True)
        else:
            src = batch["images"].to(dev, non_blocking=True)
            image_rows = batch["image_rows"].to(dev, non_blocking=True)
        prompt, tokens, lengths = task_rows(batch, tokens, lengths, image_rows, self.sources, self.tokenizer,
                                            prompts=self.reads_prompt, seed=self.cfg.train.seed,
                                            epoch=getattr(self, "epoch", 0), cache=self.prompt_ids)
        if self.mim is not None and image_rows is not None:  # + a masked-image row per pretrain image
            src, masked, tokens, lengths, image_rows, prompt = self.mim.extend(
                batch, src, tokens, lengths, image_rows, prompt, getattr(self, "epoch", 0))
            if masked is not None:
                return self.objective(model, src, tokens, lengths, image_rows, prompt=prompt, bool_masked_pos=masked)
        if prompt is not None:  # the rows' input texts (seesay.data.tasks), for models that read one
            return self.objective(model, src, tokens, lengths, image_rows, prompt=prompt.to(dev))
        return self.objective(model, src, tokens, lengths, image_rows)

    def validate(self) -> dict[str, float]:
        from seesay.metrics import compute_scores

        cfg = self.cfg
        strategy = strategy_from_options(beam_size=cfg.train.val_beam_size)
        task = self.sources[0].task
        if task.task in ("region", "grounding"):  # every region of the val images (seesay.data.region_tasks)
            from seesay.data.region_tasks import decode_regions, region_scores

            rows = decode_regions(self.model, self.val_data, task.task, task.prompt or "", int(task.loc_vocab_size),
                                  strategy=strategy, max_len=cfg.train.val_max_len, batch_size=64,
                                  limit=cfg.data.val_max_images)
            return {k: v for k, v in region_scores(rows, task.task, lang=self.eval_lang).items() if k != "regions"}
        text = self.sources[0].task.prompt if self.reads_prompt else None
        if text and 0 not in self.prompt_ids:
            self.prompt_ids[0] = list(self.tokenizer.encode_prompt(text))
        prompt = self.prompt_ids[0] if text else None
        if prompt is None:
            results = decode_split(self.model, self.val_data, strategy, limit=cfg.data.val_max_images,
                                   features=self.val_feats if self.cached else None, max_len=cfg.train.val_max_len,
                                   batch_size=64)
        else:  # the first dataset's input text
            from seesay.captioner import decode_batches
            from seesay.data.region_tasks import answer_constraints

            words_only = answer_constraints(self.tokenizer, task.task)  # no <loc_i> / <img_i> in a caption
            n = len(self.val_data) if cfg.data.val_max_images is None else min(cfg.data.val_max_images,
                                                                                len(self.val_data))
            results = {str(self.val_data.image_ids[i]): c.caption
                       for b in decode_batches(self.model, self.val_data, strategy, indices=range(n), prompt=prompt,
                                               features=self.val_feats if self.cached else None,
                                               max_len=cfg.train.val_max_len, batch_size=64,
                                               constraints=words_only)
                       for i, c in zip(b.indices, b.captions)}
        refs = {data_id: r for data_id, r in zip(self.val_data.image_ids, self.val_data.references) if data_id in results}
        report = compute_scores(results, refs, full=False, lang=self.eval_lang)
        return {k: float(v) for k, v in report.corpus.items() if v is not None}

    def save(self, path: str | Path, train_state: dict[str, Any] | None) -> None:
        save_checkpoint(path, model=self.model, tokenizer=self.tokenizer, config=self.config_dict,
                        train_state=train_state)

    def load_weights(self, path: str | Path) -> None:
        self.model.load_state_dict(read_weights(Path(path) / "model.safetensors", device=str(self.device)))


# ---------------------------------------------------------------------------------------------


def train_captioner(cfg: Config) -> Any:
    """Train a captioner as `cfg` says; returns the loop's final state. Handles torchrun DDP."""
    from seesay.config import check_model_options, check_ranges
    from seesay.files import check_output_dir
    from seesay.train.distributed import barrier, cleanup_distributed, setup_distributed
    from seesay.train.loop import check_config, fit
    from seesay.train.state import seed_everything

    # every setting a user can get wrong, as one line before data is prepared or features computed
    check_config(cfg.train, metric_names())  # the loop's settings
    check_ranges(cfg)
    check_model_options(cfg)
    check_objective(cfg)
    check_output_dir(cfg.train.output)
    dist = setup_distributed(cfg.train.device)  # --device cuda without a GPU: one line too
    try:
        resolve_datasets(cfg)  # recipe `datasets` under `root_dir`; data.path becomes the first
        resolve_pairs_text(cfg)
        if dist.is_main:
            prepare_if_needed(cfg)
        cfg.data.path = _broadcast_path(cfg.data.path)
        run_dir = Path(cfg.train.output)
        if cfg.train.resume and dist.is_main:
            from seesay.train.resume import resume_point

            resume_point(run_dir)  # an interrupted checkpoint save is finished or undone first
        barrier()
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
            family = (f"{cfg.encoder.name} + {cfg.decoder.name}" if cfg.captioner.family == "encoder_decoder"
                      else cfg.captioner.family)
            log.info("model %s: %.2fM parameters (%.2fM trained); %s; %d train images x %d captions; "
                     "evaluation language %s; device %s%s", family, n_params / 1e6, n_train / 1e6,
                     "cached image features" if task.cached else "image model in the loop",
                     len(task.train_data), task.train_data.captions_per_image, task.eval_lang, dist.device,
                     f" x {dist.world_size} processes" if dist.enabled else "")
            encoder = getattr(task.model, "encoder", None)
            if (encoder is not None and not encoder.is_trainable and getattr(encoder, "pretrained", True) is False
                    and not cfg.train.init):  # --init: the image model learnt in the run it comes from
                log.warning("the %s encoder has random weights and is frozen: its features carry little; "
                            "pass --fine-tune-encoder (or pretrained weights)", cfg.encoder.name)
        try:
            state = fit(task, cfg.train, dist, run_dir, config_dict)
        except BaseException:
            # an error mid-epoch (disk full, out of memory, a second Ctrl-C): the data workers
            # ignore SIGTERM, so end them here or the process would wait for them at exit forever
            ended = end_data_workers()
            if ended:
                log.debug("ended %d data loader workers after an error", ended)
            raise
        if dist.is_main:
            if state.best_step >= 0 and (run_dir / "best").is_dir():
                log.info("done: best %s %.4f at epoch %g (step %d); checkpoints in %s/best and %s/last",
                         cfg.train.select_metric, state.best_score, state.best_epoch, state.best_step, run_dir, run_dir)
            elif state.val_step >= 0:  # validated, but the metric never gave a score to keep (NaN, ...)
                log.info("done: no best/ checkpoint (no validation gave a usable %s); the last state is in %s/last",
                         cfg.train.select_metric, run_dir)
            else:
                log.info("done: no validation ran; the last state is in %s/last", run_dir)
        barrier()  # a normal end: no rank tears the process group down while another still uses it
        return state
    finally:
        cleanup_distributed()


def _broadcast_path(path: str | None) -> str | None:
    from seesay.train.distributed import broadcast_object

    return broadcast_object(path)
