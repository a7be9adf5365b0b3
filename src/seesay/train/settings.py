"""The loop's settings (`train.*`), checked up front with one-line errors, before any slow set-up."""

from __future__ import annotations

from collections.abc import Iterable

from seesay.config import TrainConfig
from seesay.errors import SeesayError
from seesay.train.optim import OPTIMIZERS, SCHEDULERS

DEFAULT_EPOCHS = 30  # when neither train.epochs nor train.num_steps is set
COCO_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")

# integer settings: (field, lowest value, what leaving it unset means; "" = it must be set)
_INTEGERS = (("warmup_steps", 0, ""), ("num_steps", 1, "unset"), ("epochs", 1, "unset"),
             ("save_interval", 1, "unset: off"), ("val_interval", 1, "unset: every epoch"),
             ("grad_accum", 1, ""), ("lr_decay_patience", 1, ""), ("save_every_steps", 0, "0: off"))


def max_epochs(cfg: TrainConfig) -> int | None:
    """The epoch limit: train.epochs; unset, 30 epochs, or none when num_steps is set."""
    if cfg.epochs is not None:
        return cfg.epochs
    return None if cfg.num_steps is not None else DEFAULT_EPOCHS


def check_config(cfg: TrainConfig, metric_names: Iterable[str] | None = None) -> None:
    """One-line errors for loop settings that cannot work (callers may check before slow set-up).
    `metric_names`: what validation can return (default: the COCO metrics)."""
    if cfg.optimizer not in OPTIMIZERS:
        raise SeesayError(f"--optimizer (train.optimizer) must be {' or '.join(OPTIMIZERS)}, not {cfg.optimizer!r}")
    if cfg.lr_scheduler not in SCHEDULERS:
        raise SeesayError(f"--lr-scheduler (train.lr_scheduler) must be one of {', '.join(SCHEDULERS)}, "
                          f"not {cfg.lr_scheduler!r}")
    for field, low, unset in _INTEGERS:
        value = getattr(cfg, field)
        if value is None and unset.startswith("unset"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SeesayError(f"--{field.replace('_', '-')} (train.{field}) must be an integer >= {low}"
                              f"{f' ({unset})' if unset else ''}, not {value!r}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise SeesayError(f"--label-smoothing (train.label_smoothing) must be in [0, 1), not {cfg.label_smoothing}")
    if cfg.save_every_minutes is not None and cfg.save_every_minutes <= 0:
        raise SeesayError(f"--save-every-minutes (train.save_every_minutes) must be > 0, not {cfg.save_every_minutes}")
    names = list(COCO_METRICS if metric_names is None else metric_names)
    if cfg.select_metric not in names:
        raise SeesayError(f"--select-metric (train.select_metric) {cfg.select_metric!r} is not a validation metric "
                          f"(use one of {', '.join(names)})")
