"""One training loop, read top to bottom (in the spirit of nanoGPT's train.py).

It knows nothing about captions. A *task* object supplies the model and the data:

    task.module                       the nn.Module whose parameters train (DDP wraps it)
    task.param_groups()               optimizer groups, each with its own "lr"
    task.train_batches(epoch)         an iterable of batches for this process and epoch
    task.training_step(batch, model)  -> {"loss": scalar tensor, "top5": float, "n": int}
    task.validate()                   -> {metric: float}; called on rank 0 only
    task.save(path, train_state)      writes a checkpoint directory
    task.ddp_find_unused_parameters   optional bool: DDP must look for parameters without a gradient
                                      (used when `train.ddp_find_unused_parameters` is auto/None)
    task.load_weights(path)           loads the weights of a checkpoint directory

The loop does the rest: DDP from the torchrun environment, gradient accumulation (with
`no_sync` on the micro-steps that do not end an accumulation), AMP with a GradScaler on
CUDA, gradient clipping, learning-rate decay and early stopping on the selected validation
metric, logging (tqdm, TensorBoard, metrics.jsonl, optional wandb), and checkpoints
RUN_DIR/last (every epoch, with the state needed for exact resume) and RUN_DIR/best.

Resume happens at epoch boundaries: RUN_DIR/last holds the weights, optimizer, scaler,
RNG states, epoch, step, best score and the epochs-without-improvement counter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from seesay.checkpoint import load_train_state
from seesay.config import TrainConfig
from seesay.errors import SeesayError, missing_extra
from seesay.train.distributed import DistInfo, all_reduce_sum, barrier, broadcast_object
from seesay.train.state import rng_state, set_rng_state

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the selected metric last improved
    stopped_early: bool = False


class _Loggers:
    """TensorBoard + metrics.jsonl (+ wandb when asked), rank 0 only."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, config_dict: dict[str, Any], enabled: bool) -> None:
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.jsonl = run_dir / "metrics.jsonl"
        if not enabled:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                log.warning("tensorboard is not installed; no TensorBoard logs")
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise missing_extra("wandb", "wandb") from None
            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(run_dir), config=config_dict,
                                    name=run_dir.name, resume="allow")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if v is not None}, step=step)

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _autocast(device: torch.device, cfg: TrainConfig) -> contextlib.AbstractContextManager:
    if cfg.amp and device.type == "cuda":
        dtype = torch.bfloat16 if cfg.amp_dtype in ("bf16", "bfloat16") else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def _set_lr_scale(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] *= factor


def fit(task: Any, cfg: TrainConfig, dist: DistInfo, run_dir: str | Path, config_dict: dict[str, Any]) -> LoopState:
    """Train `task` for `cfg.epochs` epochs (or until early stopping); return the final state."""
    run_dir = Path(run_dir)
    device = dist.device
    main = dist.is_main
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)

    # -- resume: weights first (before DDP broadcasts rank 0's), then optimizer/RNG below
    state = LoopState()
    resume_state = None
    last_dir = run_dir / "last"
    if cfg.resume:
        if (last_dir / "train_state").is_dir():
            resume_state = load_train_state(last_dir)
            task.load_weights(last_dir)
            state = LoopState(**resume_state["loop"])
            if main:
                log.info("resuming from %s after epoch %d (step %d)", last_dir, state.epoch, state.step)
        elif main:
            log.info("--resume: no %s yet, starting from scratch", last_dir)

    model = task.module
    ddp_model = model
    if dist.enabled:
        find_unused = cfg.ddp_find_unused_parameters
        if find_unused is None or find_unused == "auto":  # the task knows whether some parameters can go unused
            find_unused = bool(getattr(task, "ddp_find_unused_parameters", False))
        if main and find_unused:
            log.info("DDP with find_unused_parameters=True (some parameters get no gradient in some steps)")
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=bool(find_unused))
    optimizer = torch.optim.Adam(task.param_groups(), weight_decay=cfg.weight_decay)
    use_scaler = cfg.amp and device.type == "cuda" and cfg.amp_dtype not in ("bf16", "bfloat16")
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        if resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        set_rng_state(resume_state["rng"][min(dist.rank, len(resume_state["rng"]) - 1)])

    loggers = _Loggers(run_dir, cfg, config_dict, enabled=main)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    t_fit, epochs_run = time.perf_counter(), 0
    try:
        for epoch in range(state.epoch, cfg.epochs):
            if state.stopped_early:
                break
            t0 = time.perf_counter()
            ddp_model.train()
            totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, top5 * n, n (no per-step sync)
            batches = task.train_batches(epoch)
            n_batches = len(batches) if hasattr(batches, "__len__") else None
            if cfg.max_steps_per_epoch is not None and n_batches is not None:
                n_batches = min(n_batches, cfg.max_steps_per_epoch * cfg.grad_accum)
            bar = None
            if main and cfg.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                           dynamic_ncols=True)
            seen, t_window, n_window = 0, time.perf_counter(), 0
            optimizer.zero_grad(set_to_none=True)
            for i, batch in enumerate(batches):
                if n_batches is not None and i >= n_batches:
                    break
                last_micro = (i + 1) % cfg.grad_accum == 0 or (n_batches is not None and i + 1 == n_batches)
                sync = contextlib.nullcontext() if (last_micro or not dist.enabled) else ddp_model.no_sync()
                with sync:
                    with _autocast(device, cfg):
                        out = task.training_step(batch, ddp_model)
                    loss = out["loss"] / cfg.grad_accum
                    scaler.scale(loss).backward()
                n = int(out["n"])
                top5 = torch.as_tensor(out["top5"], dtype=torch.float64, device=device)
                totals += torch.stack([out["loss"].detach().double() * n, top5 * n, top5.new_tensor(float(n))])
                seen += n
                n_window += n
                if not last_micro:
                    continue
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                if bar is not None:
                    bar.update(cfg.grad_accum)
                    if state.step % max(cfg.log_every, 1) == 0 or i == 0:
                        loss_value = float(out["loss"].detach())
                        dt = max(time.perf_counter() - t_window, 1e-9)
                        rate = n_window * dist.world_size / dt
                        bar.set_postfix(loss=f"{loss_value:.3f}", top5=f"{float(out['top5']):.3f}",
                                        caps_s=f"{rate:.0f}")
                        loggers.scalars({"train/loss": loss_value, "train/top5": float(out["top5"]),
                                         "train/captions_per_s": rate}, state.step)
                        t_window, n_window = time.perf_counter(), 0
            if bar is not None:
                bar.close()
            all_reduce_sum(totals)
            totals = totals.cpu()
            count = max(totals[2].item(), 1.0)
            train_loss, train_top5 = totals[0].item() / count, totals[1].item() / count
            train_time = time.perf_counter() - t0

            # -- validation by real decoding on rank 0; everyone follows its decision
            val = task.validate() if main else None
            val = broadcast_object(val)
            score = val.get(cfg.select_metric)
            if score is None:
                raise SeesayError(f"--select-metric {cfg.select_metric!r} is not among the validation metrics "
                                  f"({', '.join(k for k, v in val.items() if v is not None)})")
            improved = score > state.best_score
            state.epoch = epoch + 1
            if improved:
                state.best_score, state.best_epoch, state.bad_epochs = float(score), epoch + 1, 0
            else:
                state.bad_epochs += 1
                if state.bad_epochs % cfg.lr_decay_patience == 0:
                    _set_lr_scale(optimizer, cfg.lr_decay)
                    if main:
                        log.info("no improvement for %d epochs: learning rates x%g", state.bad_epochs, cfg.lr_decay)
                if state.bad_epochs >= cfg.patience:
                    state.stopped_early = True

            record = {"epoch": epoch + 1, "step": state.step, "train_loss": train_loss, "train_top5": train_top5,
                      "lr": optimizer.param_groups[0]["lr"], "lrs": [g["lr"] for g in optimizer.param_groups],
                      "val": val, "time_s": time.perf_counter() - t0, "train_time_s": train_time,
                      "captions_per_s": count / max(train_time, 1e-9)}
            loggers.epoch(record)
            loggers.scalars({"epoch/train_loss": train_loss, "epoch/train_top5": train_top5,
                             "epoch/lr": record["lr"], **{f"val/{k}": v for k, v in val.items()}}, state.step)

            # -- checkpoints (rank 0). RNG states are gathered from every rank for exact resume.
            rngs = _gather_rng(dist)
            if main:
                if improved:
                    task.save(run_dir / "best", None)
                train_state = {"loop": asdict(state), "optimizer": optimizer.state_dict(),
                               "scaler": scaler.state_dict() if use_scaler else None, "rng": rngs}
                task.save(last_dir, train_state)
                log.info("epoch %d: loss %.4f top5 %.3f | %s %.4f (best %.4f @ %d) | %.0f captions/s",
                         epoch + 1, train_loss, train_top5, cfg.select_metric, score, state.best_score,
                         state.best_epoch, record["captions_per_s"])
            barrier()
            if state.stopped_early and main:
                log.info("early stop: %s did not improve for %d epochs", cfg.select_metric, state.bad_epochs)
            # -- time budget: stop at an epoch boundary (so resume stays exact) when the next epoch,
            # as long as the average one so far, would end past it; rank 0 decides for everyone.
            epochs_run += 1
            if cfg.max_minutes is not None and not state.stopped_early and epoch + 1 < cfg.epochs:
                elapsed = time.perf_counter() - t_fit
                out_of_time = broadcast_object(elapsed * (epochs_run + 1) / epochs_run > cfg.max_minutes * 60)
                if out_of_time:
                    if main:
                        log.info("time budget of %g min reached after %d epochs (%.1f min)", cfg.max_minutes,
                                 state.epoch, elapsed / 60)
                    break
    finally:
        loggers.close()
    return state


def _gather_rng(dist: DistInfo) -> list[dict[str, Any]]:
    """Each rank's RNG state, collected on rank 0 (dropout differs per rank under DDP)."""
    mine = rng_state()
    if not dist.enabled:
        return [mine]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, mine)
    return out
