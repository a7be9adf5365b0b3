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
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seesay.errors import SeesayError


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


@dataclass
class EncoderConfig:
    name: str = "small_cnn"
    weights: str | None = None  # e.g. "imagenet", "pretrained", "none", or a local file
    fine_tune: bool = False
    lr: float = 1e-4  # used only with fine_tune
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
    amp: bool = False  # mixed precision on CUDA
    amp_dtype: str = "float16"  # or "bfloat16"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    wandb: bool = False
    wandb_project: str = "seesay"
    tensorboard: bool = True
    resume: bool = False
    cache_features: bool = True  # frozen encoder: compute features once and cache them
    feature_cache_dir: str | None = None  # default RUN_DIR/features
    max_steps_per_epoch: int | None = None  # for smoke tests
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
                setattr(obj, key, _coerce(value, getattr(obj, key), where))
            elif "options" in names:
                obj.options[key] = value
            else:
                raise SeesayError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    return cfg


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
    if len(parts) < 2 or not all(parts):
        raise SeesayError(f"--set {item!r}: key must look like section.key (e.g. train.epochs)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(cfg: Config, items: list[str]) -> Config:
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
