"""Training configuration: dataclasses, YAML recipes and dotted overrides.

Precedence, lowest first: the defaults below, a YAML recipe (`--config recipe.yaml`),
`--set section.key=value` overrides, then explicit command-line flags.

Keys under `encoder:` and `decoder:` that are not fields here (e.g. `encoded_size`,
`embed_dim`) are collected into `options` and passed to the registered builder as keyword
arguments, so a recipe can set any hyper-parameter a family accepts without this file
knowing about it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seesay.errors import SeesayError

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    path: str | None = None  # a prepared DATA_DIR (see `seesay prepare`)
    coco_dir: str | None = None  # raw COCO: prepared into COCO_DIR/prepared when needed
    pairs_config: str | None = None  # Titans-style config.json (image_dir, annotations_file, ...)
    workers: int = 2  # DataLoader worker processes
    train_split: str = "train"
    val_split: str = "val"
    val_max_images: int | None = None  # validate on the first N images only (None: all)
    # extra text-only captions (one per line, or a JSON list of strings / {"text": ...}) trained as
    # language-model rows with an all-zero "no image" encoding; see docs/training.md
    text_data_path: str | None = None
    text_ratio: float = 0.25  # text-only rows per epoch, as a fraction of the train split's caption count
    shuffle_buffer: int = 1000  # samples in the shuffle buffer when training streams WebDataset shards
    # several prepared datasets trained together (`--data A --data B`, the recipe's `datasets`); relative
    # names are under root_dir; the first is validated on. See seesay.data.tasks and docs/vlm.md
    datasets: list[str] = field(default_factory=list)
    data_weights: list[float] | None = None  # mixing weights (None: in proportion to the datasets' sizes)
    root_dir: str | None = None
    task: str | None = None  # train every dataset as this task (the recipe's `pretrain: true`); None: their own
    # image and location tokens (issue 13, docs/vlm.md): a VQ directory (seesay train-vq / convert vqgan)
    # turns on masked image modelling for pretrain datasets and adds <img_i> to the tokenizer
    vae_ckpt_path: str | None = None
    image_vocab_size: int = 16384  # must equal the VQ's codebook size
    loc_vocab_size: int | None = None  # location bins; None: the region data's (prepare --loc-vocab-size)


@dataclass
class EncoderConfig:
    name: str = "small_cnn"
    weights: str | None = None  # e.g. "imagenet", "pretrained", "none", or a local file
    # train the encoder too; None (auto): train encoders without pretrained weights (a frozen random
    # encoder's features carry little), keep pretrained ones frozen (their features are cached)
    fine_tune: bool | None = None
    lr: float = 1e-4  # used only when the encoder trains
    options: dict[str, Any] = field(default_factory=dict)  # builder keyword arguments


@dataclass
class DecoderConfig:
    name: str = "soft_attention"
    lr: float = 4e-4
    # GloVe vectors for the word embeddings ("6B.50d" or a glove.*.txt path), applied after the
    # model is built (seesay.layers.glove.init_word_embeddings); None: random embeddings
    glove: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # builder keyword arguments (e.g. alpha_c)


@dataclass
class CaptionerConfig:
    """Which captioner family to train: "encoder_decoder" builds `encoder` + `decoder` (the
    sections above); another registered family (seesay.registry.register_captioner) is built
    from `options` (+ the tokenizer's vocab_size)."""

    family: str = "encoder_decoder"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    output: str = "runs/run"
    epochs: int | None = None  # None: 30, or no epoch limit when num_steps is set (both set: the first reached)
    num_steps: int | None = None  # train for this many optimizer steps (may stop inside an epoch)
    batch_size: int = 32  # captions per optimiser step (per process with DDP: global / world)
    grad_accum: int = 1  # micro-batches per optimizer step (--accumulation-steps)
    grad_clip: float | None = 5.0
    optimizer: str = "adam"  # adam (weight_decay as L2, added to the gradient) | adamw (decoupled decay)
    weight_decay: float = 0.0
    label_smoothing: float = 0.0  # cross-entropy label smoothing (0: none)
    objective: str = "xe"  # xe (teacher-forced cross-entropy) | scst (self-critical training on CIDEr-D)
    init: str | None = None  # a checkpoint directory whose weights start the model (same spec; fresh optimizer)
    scst_samples: int = 5  # scst: captions sampled per image
    scst_baseline: str = "mean"  # scst: mean (of the image's other samples) | greedy (one greedy caption per image)
    scst_bleu_weight: float = 0.0  # scst: reward = CIDEr-D + w * BLEU-4
    lr_scheduler: str = "plateau"  # none | plateau (x lr_decay on no improvement) | linear | cosine (to 0 at the end)
    warmup_steps: int = 0  # linear warm-up of every group's rate from 0 over this many optimizer steps
    patience: int = 20  # early stop after this many validations without improvement
    lr_decay_patience: int = 8  # plateau: decay learning rates after this many validations without improvement
    lr_decay: float = 0.8
    val_interval: int | None = None  # validate every N optimizer steps (None: after every epoch)
    save_interval: int | None = None  # also write RUN_DIR/step-N checkpoints every N optimizer steps (None: off)
    select_metric: str = "CIDEr"
    val_beam_size: int = 1
    val_max_len: int = 50
    seed: int = 0
    amp: bool = False  # mixed precision: float16 or bfloat16 autocast on CUDA, bfloat16 on the CPU
    amp_dtype: str = "float16"  # or "bfloat16"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    wandb: bool = False
    wandb_project: str = "seesay"
    tensorboard: bool = True
    resume: bool = False
    cache_features: bool = True  # frozen encoder: compute features once and cache them
    # cached features: caption (random caption batches) | image (batches of whole images with all
    # their captions, so per-image work runs once per image; images in the loop always batch by image)
    batch_by: str = "caption"
    feature_cache_dir: str | None = None  # default RUN_DIR/features
    max_steps_per_epoch: int | None = None  # for smoke tests
    image_mask_ratio: float = 0.75  # masked image modelling: share of Swin patches masked (seesay.train.mim)
    max_minutes: float | None = None  # wall-clock budget: no new epoch that would end past it
    save_every_steps: int = 0  # also write RUN_DIR/last every N optimizer steps inside an epoch (0: off)
    save_every_minutes: float | None = None  # ... or every M minutes (None: off)
    progress: bool = True
    log_every: int = 20
    # DDP find_unused_parameters: None = auto (on for decoders that leave parameters without a
    # gradient in some steps, e.g. titans_mac, and for text-only rows with the encoder in the loop)
    ddp_find_unused_parameters: bool | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        cfg = cls()
        merge_into(cfg, d)
        return cfg


_SECTIONS = {"data": DataConfig, "encoder": EncoderConfig, "decoder": DecoderConfig, "train": TrainConfig,
             "captioner": CaptionerConfig}


_TRI_STATE = {("encoder", "fine_tune")}  # bool fields whose None default means "auto"


def _coerce(value: Any, current: Any, where: str) -> Any:
    """Make YAML/CLI values fit the field they replace (ints for floats, strings for paths)."""
    if isinstance(current, bool) and not isinstance(value, bool):
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise SeesayError(f"{where}: expected true/false, got {value!r}")
    if isinstance(current, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise SeesayError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise SeesayError(f"{where}: expected an integer, got {value!r}") from None
    return value


def merge_into(cfg: Config, d: dict[str, Any], source: str = "config") -> Config:
    """Merge a nested dict {section: {key: value}} into `cfg` in place."""
    if not isinstance(d, dict):
        raise SeesayError(f"{source}: expected a mapping of sections, got {type(d).__name__}")
    for section, values in d.items():
        if section == "model":  # the model spec saved in checkpoints: informational
            continue
        if section in RECIPE_ALIASES:
            merge_into(cfg, recipe_alias(section, values, f"{source}: {section}"), source=source)
            continue
        if section not in _SECTIONS:
            raise SeesayError(f"{source}: unknown section {section!r} (use {', '.join(_SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise SeesayError(f"{source}: section {section!r} must be a mapping")
        obj = getattr(cfg, section)
        names = {f.name for f in dataclasses.fields(obj)}
        for key, value in values.items():
            where = f"{source}: {section}.{key}"
            if key == "options" and "options" in names:
                obj.options.update(value or {})
            elif key in names:
                current = getattr(obj, key)
                if (section, key) in _TRI_STATE and value is not None and not isinstance(value, bool):
                    current = False  # parse "true"/"false" like any bool field
                setattr(obj, key, _coerce(value, current, where))
            elif "options" in names:  # a family's option: checked against its builder (check_model_options)
                obj.options[key] = value
            else:
                close = difflib.get_close_matches(key, sorted(names), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise SeesayError(f"{where}: unknown key ({hint}known: {', '.join(sorted(names))})")
    return cfg


# The vision-language recipe set's parameter names (issue 12; docs/vlm.md), accepted as top-level recipe
# keys and as `--set key=value`: each maps to seesay's own keys.
RECIPE_ALIASES: dict[str, str] = {
    "image_model_name": "encoder.name = swinv2, encoder.image_model_name",
    "image_model_train": "encoder.fine_tune",
    "language_model_name": "decoder.name = t5, decoder.language_model_name",
    "ffn": "decoder.ffn",
    "max_source_length": "decoder.max_source_length",
    "max_target_length": "decoder.max_target_length",
    "pretrain": "data.task = pretrain",
    "seed": "train.seed",
    "lr": "decoder.lr and encoder.lr",
    "optimizer": "train.optimizer",
    "lr_scheduler": "train.lr_scheduler",
    "batch_size": "train.batch_size",
    "accumulation_steps": "train.grad_accum",
    "num_epochs": "train.epochs",
    "num_steps": "train.num_steps",
    "warmup_steps": "train.warmup_steps",
    "save_interval": "train.save_interval",
    "datasets": "data.datasets",
    "root_dir": "data.root_dir",
    "result_dir": "train.output",
    "image_vocab_size": "data.image_vocab_size",
    "loc_vocab_size": "data.loc_vocab_size",
    "vae_ckpt_path": "data.vae_ckpt_path",
    "image_mask_ratio": "train.image_mask_ratio",
}
_ALIAS_FIELDS = {"image_model_train": ("encoder", "fine_tune"), "ffn": ("decoder", "ffn"),
                 "max_source_length": ("decoder", "max_source_length"),
                 "max_target_length": ("decoder", "max_target_length"), "seed": ("train", "seed"),
                 "batch_size": ("train", "batch_size"), "accumulation_steps": ("train", "grad_accum"),
                 "num_epochs": ("train", "epochs"), "num_steps": ("train", "num_steps"),
                 "warmup_steps": ("train", "warmup_steps"), "save_interval": ("train", "save_interval"),
                 "root_dir": ("data", "root_dir"), "result_dir": ("train", "output"),
                 "image_vocab_size": ("data", "image_vocab_size"), "loc_vocab_size": ("data", "loc_vocab_size"),
                 "vae_ckpt_path": ("data", "vae_ckpt_path"), "image_mask_ratio": ("train", "image_mask_ratio")}
_ALIAS_OPTIONAL = {"num_epochs", "num_steps", "save_interval", "root_dir", "image_model_train", "vae_ckpt_path",
                   "loc_vocab_size"}


def recipe_alias(key: str, value: Any, where: str) -> dict[str, Any]:
    """One recipe key of `RECIPE_ALIASES` as seesay's {section: {key: value}} ("-" or null: the default)."""
    if value == "-" or (value is None and key not in _ALIAS_OPTIONAL and key != "lr_scheduler"):
        return {}
    if key == "image_model_name":
        return {"encoder": {"name": "swinv2", "image_model_name": value}}
    if key == "language_model_name":
        return {"decoder": {"name": "t5", "language_model_name": value}}
    if key == "pretrain":
        return {"data": {"task": "pretrain" if _coerce(value, False, where) else None}}
    if key == "lr":
        return {"decoder": {"lr": value}, "encoder": {"lr": value}}
    if key in ("optimizer", "lr_scheduler"):
        return {"train": {key: "none" if value is None else str(value).lower()}}
    if key == "datasets":
        names = value.replace(",", " ").split() if isinstance(value, str) else value
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise SeesayError(f"{where}: expected a list of dataset names, got {value!r}")
        return {"data": {"datasets": list(names)}}
    section, name = _ALIAS_FIELDS[key]
    return {section: {name: value}}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SeesayError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as e:
        raise SeesayError(f"{path}: malformed {'JSON' if path.suffix == '.json' else 'YAML'} ({str(e).splitlines()[0]})") from None
    return data or {}


def is_pairs_config(d: dict[str, Any]) -> bool:
    """The Titans multimodal extension's config.json: image_dir + annotations_file."""
    return isinstance(d, dict) and "image_dir" in d and "annotations_file" in d


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.epochs=3` -> (["train", "epochs"], 3); values are parsed as YAML scalars."""
    if "=" not in item:
        raise SeesayError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if (len(parts) < 2 and parts[0] not in RECIPE_ALIASES) or not all(parts):
        raise SeesayError(f"--set {item!r}: key must look like section.key (e.g. train.epochs) or be a recipe key "
                          f"({', '.join(RECIPE_ALIASES)})")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(cfg: Config, items: list[str]) -> Config:
    """Apply `--set section.key=value` items in order (unknown sections and fields: one line each)."""
    for item in items or []:
        parts, value = parse_override(item)
        nested: Any = value
        for p in reversed(parts[1:]):
            nested = {p: nested}
        merge_into(cfg, {parts[0]: nested}, source=f"--set {item}")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    cfg = Config()
    if path is not None:
        merge_into(cfg, load_yaml(path), source=str(path))
    return apply_overrides(cfg, overrides or [])


# -- checks before any data is read ---------------------------------------------------------------


def override_option_keys(items: list[str], section: str) -> set[str]:
    """The `section.options` keys that `--set` items set explicitly (`decoder.embed_dim=8`,
    `decoder.options.embed_dim=8` or `decoder.options={embed_dim: 8}`)."""
    keys: set[str] = set()
    for item in items or []:
        parts, value = parse_override(item)
        if parts[0] != section:
            continue
        if parts[1] == "options":
            if len(parts) > 2:
                keys.add(parts[2])
            elif isinstance(value, dict):
                keys.update(str(k) for k in value)
        else:
            keys.add(parts[1])
    return keys


def _builder(kind: str, name: str) -> Any:
    """The registered builder of encoder/decoder `name`, or None."""
    from seesay.registry import get_builder

    return get_builder(kind, name)


def drop_foreign_options(cfg: Config, recipe: Config, explicit: dict[str, set[str]]) -> dict[str, list[str]]:
    """When the command line changes a recipe's encoder or decoder family (`--encoder`, `--set
    encoder.name=`), drop the recipe's options for its own family that the new builder does not
    take (`width` of small_cnn when switching to efficientnet_lite0), and log them on one line.
    Options the new family also takes stay, and so do the `explicit` ones (set on the command
    line: those are checked against the new family, and refused if it does not take them).
    Returns {section: dropped option names}."""
    from seesay.registry import builder_options

    dropped: dict[str, list[str]] = {}
    for kind in ("encoder", "decoder"):
        now, before = getattr(cfg, kind), getattr(recipe, kind)
        builder = _builder(kind, now.name) if now.name != before.name else None
        if builder is None:  # the same family, or an unknown one (check_model_options says so)
            continue
        takes = builder_options(builder)[0]
        gone = sorted(k for k in before.options if k in now.options and k not in takes
                      and k not in explicit.get(kind, set()))
        for k in gone:
            del now.options[k]
        if gone:
            dropped[kind] = gone
            log.info("%s %s replaces the recipe's %s: dropped the recipe's %s options %s (%s does not take them)",
                     kind, now.name, before.name, before.name, ", ".join(gone), now.name)
    return dropped


def check_model_options(cfg: Config) -> None:
    """Unknown encoder/decoder/captioner families and options their builders do not take, as one
    line before any data is read (the builders would refuse them only once the model is built)."""
    from seesay import registry

    if cfg.captioner.family != "encoder_decoder":
        names = registry.list_captioners()
        if cfg.captioner.family not in names:
            raise SeesayError(f"captioner.family: unknown captioner family {cfg.captioner.family!r}; "
                              f"choose one of: {', '.join(names)}")
        return
    for kind, section, listing in (("encoder", cfg.encoder, registry.list_encoders),
                                   ("decoder", cfg.decoder, registry.list_decoders)):
        builder = _builder(kind, section.name)
        if builder is None:
            raise SeesayError(f"unknown {kind} {section.name!r} (--{kind}, {kind}.name); "
                              f"choose one of: {', '.join(listing())}")
        options = dict(section.options)
        if kind == "encoder" and section.weights is not None:
            options["weights"] = section.weights
        registry.check_options(kind, section.name, options, builder)


# (section, field, flag, lowest allowed, whether the lowest itself is refused, whether None is allowed)
_RANGES = (
    ("data", "workers", "--workers", 0, False, False),
    ("data", "val_max_images", "--val-max-images", 1, False, True),
    ("data", "text_ratio", "--set data.text_ratio", 0, False, False),
    ("encoder", "lr", "--encoder-lr", 0, True, False),
    ("decoder", "lr", "--decoder-lr", 0, True, False),
    ("train", "batch_size", "--batch-size", 1, False, False),
    ("train", "val_beam_size", "--val-beam-size", 1, False, False),
    ("train", "val_max_len", "--set train.val_max_len", 1, False, False),
    ("train", "max_minutes", "--max-minutes", 0, True, True),
    ("train", "max_steps_per_epoch", "--max-steps-per-epoch", 1, False, True),
    ("train", "patience", "--patience", 1, False, False),
    ("train", "lr_decay", "--lr-decay", 0, True, False),
    ("train", "weight_decay", "--weight-decay", 0, False, False),
    ("train", "log_every", "--set train.log_every", 1, False, False),
)
_INTEGER_FIELDS = {"workers", "val_max_images", "batch_size", "val_beam_size", "val_max_len", "max_steps_per_epoch",
                   "patience", "log_every"}


def check_ranges(cfg: Config) -> None:
    """One line for a value outside its range (a zero batch size, a negative learning rate or
    worker count, a zero time budget), before any data is read or model built. The loop's own
    settings (epochs, steps, grad_accum, select_metric, ...) are `seesay.train.settings.check_config`'s."""
    for section, name, flag, low, exclusive, optional in _RANGES:
        value = getattr(getattr(cfg, section), name)
        if value is None and optional:
            continue
        integer = name in _INTEGER_FIELDS
        ok = (not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
              and math.isfinite(value) and (value > low if exclusive else value >= low))
        if not ok:
            raise SeesayError(f"{flag} ({section}.{name}) must be {'an integer' if integer else 'a number'} "
                              f"{'>' if exclusive else '>='} {low}{' (or unset)' if optional else ''}, not {value!r}")
