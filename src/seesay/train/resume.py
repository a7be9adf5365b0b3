"""The loop's state, and putting a run back where RUN_DIR/last left it (exact resume)."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seesay.checkpoint import load_train_state
from seesay.errors import SeesayError
from seesay.train.distributed import DistInfo
from seesay.train.logs import RunningMeans
from seesay.train.optim import LRSchedule
from seesay.train.state import set_rng_state

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    best_score: float = -math.inf
    best_epoch: float = -1  # the "epoch" of the best validation's record (fractional inside an epoch)
    best_step: int = -1
    bad_validations: int = 0  # validations since the selected metric last improved
    stopped_early: bool = False
    batches_done: int = 0  # batches of epoch `epoch` (0-based: the next one) already trained; 0 between epochs
    stopped_by_signal: bool = False  # this run ended on Ctrl-C / SIGTERM (cleared on resume)
    val_step: int = -1  # the step of the last validation

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        saved = dict(saved)
        if "bad_epochs" in saved:  # checkpoints from when only epochs were validated
            saved["bad_validations"] = saved.pop("bad_epochs")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


def load_last(last_dir: Path, task: Any, main: bool) -> tuple[LoopState, dict[str, Any] | None]:
    """The loop state and train state of RUN_DIR/last, its weights loaded into the task (before
    DDP broadcasts rank 0's); a fresh state when the run has no checkpoint in any form yet.
    (`resume_point` has already finished or undone an interrupted save of RUN_DIR/last.)"""
    if not (last_dir / "train_state").is_dir():
        check_nothing_to_resume(last_dir.parent)
        if main:
            log.info("--resume: no %s yet, starting from scratch", last_dir)
        return LoopState(), None
    saved = load_train_state(last_dir)
    task.load_weights(last_dir)
    state = LoopState.from_dict(saved["loop"])
    state.stopped_by_signal = False
    if main and state.batches_done:
        log.info("resuming from %s in epoch %d after %d of its batches (step %d)", last_dir, state.epoch + 1,
                 state.batches_done, state.step)
    elif main:
        log.info("resuming from %s after epoch %d (step %d)", last_dir, state.epoch, state.step)
    return state, saved


def check_layout(saved: dict[str, Any], layout: dict[str, Any], state: LoopState, last_dir: Path) -> None:
    """A save inside an epoch resumes only with the same batches (skipping the trained ones)."""
    saved_layout = saved.get("layout") or {}
    changed = [f"{k} {saved_layout[k]} -> {v}" for k, v in layout.items() if k in saved_layout and saved_layout[k] != v]
    if state.batches_done and changed:
        raise SeesayError(f"{last_dir} was saved inside an epoch; resume it with the same batches "
                          f"({', '.join(changed)})")


def restore(saved: dict[str, Any], dist: DistInfo, *, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, schedule: LRSchedule, window: RunningMeans) -> float:
    """Optimizer, scaler, schedule, this rank's RNG and the open validation window from a
    train state; returns the window's training seconds before the save."""
    optimizer.load_state_dict(saved["optimizer"])
    if saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    if saved.get("schedule"):
        schedule.load_state_dict(saved["schedule"])
    else:  # checkpoints from before schedules were saved
        schedule.factor_from_rates([g["lr"] for g in optimizer.param_groups])
    set_rng_state(saved["rng"][min(dist.rank, len(saved["rng"]) - 1)])
    windows = saved.get("window")
    if windows is None and saved.get("totals"):  # checkpoints from before any-metric objectives
        windows = [RunningMeans.from_totals(t) for t in saved["totals"]]
    if windows:
        if len(windows) == dist.world_size:
            window.load_state_dict(windows[dist.rank])
        elif dist.rank == 0:  # another number of processes: rank 0 carries every saved sum
            merged: dict[str, list[float]] = {}
            for w in windows:
                for k, (s, n) in w.items():
                    old = merged.get(k, [0.0, 0.0])
                    merged[k] = [old[0] + s, old[1] + n]
            window.load_state_dict(merged)
    return float(saved.get("window_seconds", saved.get("epoch_seconds")) or 0.0)


def resume_point(run_dir: Path) -> None:
    """Before a resume reads RUN_DIR/last (rank 0): finish or undo a checkpoint save that a kill
    interrupted between its renames (`seesay.checkpoint.recover_checkpoint`), for last/ and best/."""
    from seesay.checkpoint import recover_checkpoint

    for name in ("last", "best"):
        recover_checkpoint(run_dir / name)


def check_nothing_to_resume(run_dir: Path) -> None:
    """--resume with no usable RUN_DIR/last: refuse (one line) when the run holds a checkpoint in any
    other form, instead of silently starting from scratch over it."""
    last = run_dir / "last"
    found = [p for p in (last, run_dir / "best") if p.exists()]
    found += sorted(run_dir.glob(".last.*")) + sorted(run_dir.glob(".best.*"))
    if found:
        raise SeesayError(f"--resume: {last} has no training state, but {run_dir} holds "
                          f"{', '.join(p.name for p in found)}; refusing to start from scratch over it "
                          f"(resume needs RUN_DIR/last/train_state; use another --output to start over)")
