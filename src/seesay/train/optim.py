"""The optimizer and the learning-rate schedule of the training loop.

A schedule is a multiplier of each parameter group's own base learning rate, a pure function
of the number of optimizer steps taken (`lr_multiplier`), times a plateau factor that
validations lower (`LRSchedule.factor`). So the whole schedule state is the step (kept by the
loop) and that one factor, and a resumed run sets exactly the rates an uninterrupted one had.

    group lr after `step` optimizer steps = base_lr(group) * warmup(step) * decay(step) * factor

`warmup` rises linearly from 0 to 1 over `warmup_steps` (the rate after k < warmup_steps steps
is base * k / warmup_steps, as Hugging Face's and LambdaLR's schedules have it: the first step
runs at rate 0 and only fills Adam's moments); `decay` is 1 (none, plateau), or falls from 1
after the warm-up to 0 at `total` steps, linearly or along a half cosine.
"""

from __future__ import annotations

import math
from typing import Any

import torch

OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("none", "plateau", "linear", "cosine")


def build_optimizer(name: str, groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    """adam: torch.optim.Adam, `weight_decay` added to the gradient (L2, what seesay always did);
    adamw: AdamW, decoupled decay (each step shrinks the weights by lr * weight_decay * w).
    Each group keeps its own "lr".

    The fused implementation (one kernel over all parameters) is used when every parameter is a
    floating-point tensor on the CPU or a CUDA device: the same update, 3.3x faster than the
    per-parameter loop on this project's CPU (21 M parameters: 86 -> 26 ms a step,
    docs/performance.md). Its state dict is the same, so checkpoints resume either way.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r} (use {', '.join(OPTIMIZERS)})")
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(groups, weight_decay=weight_decay, fused=fusable(groups) or None)


def fusable(groups: list[dict[str, Any]]) -> bool:
    """Whether torch's fused Adam(W) takes these parameters: floating point, on the CPU or CUDA."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def lr_multiplier(kind: str, step: int, *, warmup: int = 0, total: int | None = None) -> float:
    """The schedule's multiplier of a base rate after `step` optimizer steps (factor excluded)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    if kind in ("none", "plateau"):
        return 1.0
    if total is None:
        raise ValueError(f"the {kind} schedule needs the total number of steps")
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate scheduler {kind!r} (use {', '.join(SCHEDULERS)})")


class LRSchedule:
    """Sets every group's rate for the current step, relative to the group's own base rate.

    `base_lrs` are read from the optimizer when the schedule is made (before any state is
    loaded into it), so they are the task's configured rates."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, *, warmup: int = 0,
                 total: int | None = None) -> None:
        self.optimizer = optimizer
        self.kind, self.warmup, self.total = kind, warmup, total
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.factor = 1.0  # the plateau decay so far

    def multiplier(self, step: int) -> float:
        return lr_multiplier(self.kind, step, warmup=self.warmup, total=self.total) * self.factor

    def apply(self, step: int) -> None:
        """Give each group its rate for the step after `step` steps taken."""
        m = self.multiplier(step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * m

    def plateau(self, decay: float, step: int) -> bool:
        """A validation ran out of patience: lower the rates by `decay` (plateau schedule only)."""
        if self.kind != "plateau":
            return False
        self.factor *= decay
        self.apply(step)
        return True

    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "factor": self.factor, "warmup": self.warmup, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The plateau factor is state; warm-up and total come from the (same) configuration."""
        self.factor = float(state.get("factor", 1.0))

    def factor_from_rates(self, lrs: list[float]) -> None:
        """Checkpoints from before schedules were saved: the plateau factor is the ratio of the
        saved rate to the base rate (they were only ever multiplied by lr_decay)."""
        if lrs and self.base_lrs and self.base_lrs[0] > 0:
            self.factor = float(lrs[0]) / self.base_lrs[0]
