"""One training loop, read top to bottom (in the spirit of nanoGPT's train.py).

It knows nothing about captions. A *task* object supplies the model and the data:

    task.module                       the nn.Module whose parameters train (DDP wraps it)
    task.param_groups()               optimizer groups, each with its own "lr"
    task.train_batches(epoch, start)  an iterable of this process's batches for the epoch, from batch
                                      `start` on (a resumed epoch skips what was trained before)
    task.training_step(batch, model)  -> dict: every key starting with "loss" a scalar tensor (the
                                      loop sums them for backward: {"loss": ...} or {"loss_ce": ...,
                                      "loss_attention": ...}); "n" (int) the batch's rows, the weight
                                      of its averages; any other key a metric (float or 0-dim tensor)
    task.validate()                   -> {metric: float}; called on rank 0 only
    task.metric_names()               optional: the metrics validate() can return (--select-metric
                                      is checked against them up front; default: the COCO metrics)
    task.save(path, train_state)      writes a checkpoint directory
    task.ddp_find_unused_parameters   optional bool: DDP must look for parameters without a gradient
                                      (used when `train.ddp_find_unused_parameters` is auto/None)
    task.load_weights(path)           loads the weights of a checkpoint directory

The loop does the rest: DDP from the torchrun environment, gradient accumulation (with
`no_sync` on the micro-steps that do not end an accumulation), AMP with a GradScaler on
CUDA, gradient clipping, the optimizer and learning-rate schedule (train/optim.py), training
for `epochs` and/or `num_steps` optimizer steps, validation after every epoch or every
`val_interval` steps with decay and early stopping on the selected metric, logging
(train/logs.py: tqdm, TensorBoard, metrics.jsonl with one record per validation, optional
wandb; every loss and metric the objective returns is averaged, n-weighted, over each
validation window), and checkpoints RUN_DIR/last, RUN_DIR/best and RUN_DIR/step-N.

RUN_DIR/last holds the weights, optimizer, scaler, schedule (its plateau factor; the rest
follows from the step), every rank's RNG state, epoch, step, best score, the validations-
without-improvement counter and the open validation window's sums. It is written after every
epoch and, with `save_every_steps` / `save_every_minutes`, a signal, or a `num_steps` stop,
inside an epoch (always after an optimizer step, so never with a half-accumulated gradient),
with the number of batches of the epoch already trained: `--resume` then skips those batches
(the batch order of an epoch depends only on the seed and the epoch) and ends with the same
weights as a run that was never interrupted. Ctrl-C (SIGINT) or SIGTERM (what schedulers send
before preempting a job) finishes the current optimizer step, writes RUN_DIR/last and stops; a
second signal stops at once. Validation runs with the RNG state saved and restored around it,
so when and how often it runs never changes the training itself.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from seesay.config import TrainConfig
from seesay.errors import SeesayError
from seesay.train.distributed import DistInfo, barrier, broadcast_object
from seesay.train.logs import TOTAL, Loggers, RunningMeans
from seesay.train.optim import LRSchedule, build_optimizer
from seesay.train.resume import LoopState, check_layout, load_last, restore
from seesay.train.settings import check_config, max_epochs
from seesay.train.signals import StopSignal, any_rank, gather
from seesay.train.state import rng_state, set_rng_state

__all__ = ["LoopState", "check_config", "fit", "max_epochs", "total_loss"]

log = logging.getLogger(__name__)


def fit(task: Any, cfg: TrainConfig, dist: DistInfo, run_dir: str | Path, config_dict: dict[str, Any]) -> LoopState:
    """Train `task` for `cfg.epochs` epochs and/or `cfg.num_steps` steps (or until early
    stopping, a signal or the time budget); return the final state."""
    names = getattr(task, "metric_names", None)
    check_config(cfg, names() if callable(names) else None)
    return _Trainer(task, cfg, dist, Path(run_dir), config_dict).run()


def total_loss(out: dict[str, Any]) -> torch.Tensor:
    """The sum of every "loss*" entry a training step returned (what backward runs on)."""
    losses = [v for k, v in out.items() if k.startswith("loss")]
    if not losses:
        raise KeyError(f"training_step returned no 'loss' entry (keys: {', '.join(out)})")
    return sum(losses[1:], losses[0])


def _bf16(cfg: TrainConfig) -> bool:
    return cfg.amp_dtype in ("bf16", "bfloat16")


def _autocast(device: torch.device, cfg: TrainConfig) -> contextlib.AbstractContextManager:
    """--amp: float16 (with a GradScaler) or bfloat16 autocast on CUDA; bfloat16 on the CPU, where
    float16 has no fast kernels and runs in float32 (`Trainer` says so once)."""
    if cfg.amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if _bf16(cfg) else torch.float16)
    if cfg.amp and device.type == "cpu" and _bf16(cfg):
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _epoch_label(epoch: int, done: int, n_batches: int | None) -> float:
    """A record's "epoch": epoch + 1 at its end, fractional inside it (curves plot against it)."""
    if n_batches and 0 < done < n_batches:
        return round(epoch + done / n_batches, 4)
    return epoch + 1


class _Trainer:
    """One fit(): set-up and resume here, then `run` -> `_train_epoch` -> `_micro_step` /
    `_optimizer_step` / `_after_step`, with `_validate` and `_save_last` for the decisions."""

    def __init__(self, task: Any, cfg: TrainConfig, dist: DistInfo, run_dir: Path, config_dict: dict[str, Any]):
        self.task, self.cfg, self.dist, self.run_dir = task, cfg, dist, run_dir
        self.device, self.main = dist.device, dist.is_main
        if self.main:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.last_dir = run_dir / "last"
        # what an epoch's batches depend on: a save inside an epoch resumes only with the same
        self.layout = {"batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "processes": dist.world_size,
                       **(task.batch_layout() if hasattr(task, "batch_layout") else {})}
        self.max_epochs = max_epochs(cfg)
        self.state, resume_state = LoopState(), None
        if cfg.resume:  # weights before DDP broadcasts rank 0's
            self.state, resume_state = load_last(self.last_dir, task, self.main)

        self.ddp_model = self._wrap_ddp(task.module)
        self.optimizer = build_optimizer(cfg.optimizer, task.param_groups(), cfg.weight_decay)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.schedule = LRSchedule(self.optimizer, cfg.lr_scheduler, warmup=cfg.warmup_steps,
                                   total=self._total_steps())
        self.use_scaler = cfg.amp and self.device.type == "cuda" and not _bf16(cfg)
        if cfg.amp and self.device.type == "cpu" and not _bf16(cfg) and self.main:
            log.warning("--amp on the CPU: float16 autocast has no fast CPU kernels, so training stays float32; "
                        "--amp-dtype bfloat16 trains with bfloat16 autocast (fast on CPUs with AVX512-BF16 or AMX)")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_scaler)
        self.window = RunningMeans(self.device)  # the current validation window's sums
        self.window_seconds = 0.0  # training seconds of the window before this process (resume)
        if resume_state is not None:
            check_layout(resume_state, self.layout, self.state, self.last_dir)
            self.window_seconds = restore(resume_state, dist, optimizer=self.optimizer, scaler=self.scaler,
                                          schedule=self.schedule, window=self.window)
        self.schedule.apply(self.state.step)

        self.loggers = Loggers(run_dir, cfg, config_dict, enabled=self.main)
        self.stop = StopSignal()
        self.t_fit = self.t_saved = self.t_window = self.t_log = time.perf_counter()
        self.rows_since_log, self.steps_this_run = 0, 0
        self.n_batches: int | None = None  # the current epoch's batch count, when known

    # -- set-up -------------------------------------------------------------------------------

    def _wrap_ddp(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.dist.enabled:
            return model
        find_unused = self.cfg.ddp_find_unused_parameters
        if find_unused is None or find_unused == "auto":  # the task knows whether some parameters can go unused
            find_unused = bool(getattr(self.task, "ddp_find_unused_parameters", False))
        if self.main and find_unused:
            log.info("DDP with find_unused_parameters=True (some parameters get no gradient in some steps)")
        device = self.device
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                   find_unused_parameters=bool(find_unused))

    def _total_steps(self) -> int | None:
        """Where linear and cosine schedules reach 0: num_steps, or epochs x optimizer steps per
        epoch (from a fresh epoch's batch count), whichever comes first."""
        cfg = self.cfg
        if cfg.lr_scheduler not in ("linear", "cosine"):
            return cfg.num_steps
        limits = [cfg.num_steps] if cfg.num_steps is not None else []
        if self.max_epochs is not None:
            batches = self.task.train_batches(self.state.epoch, 0)
            if hasattr(batches, "__len__"):
                n = len(batches)
                if cfg.max_steps_per_epoch is not None:
                    n = min(n, cfg.max_steps_per_epoch * cfg.grad_accum)
                limits.append(self.max_epochs * math.ceil(n / cfg.grad_accum))
        if not limits:
            raise SeesayError(f"--lr-scheduler {cfg.lr_scheduler} needs --num-steps here (the task's epochs have "
                              "no known length)")
        return min(limits)

    # -- the run ------------------------------------------------------------------------------

    def _finished(self, epoch: int) -> bool:
        cfg, state = self.cfg, self.state
        return (state.stopped_early or (self.max_epochs is not None and epoch >= self.max_epochs)
                or (cfg.num_steps is not None and state.step >= cfg.num_steps))

    def run(self) -> LoopState:
        state = self.state
        try:
            self.stop.__enter__()
            for epochs_run in itertools.count(1):
                epoch = state.epoch
                if self._finished(epoch):
                    break
                outcome = self._train_epoch(epoch)
                if outcome == "signal":
                    state.stopped_by_signal = True
                    if self.main:
                        log.warning("stopped by a signal in epoch %d; continue with --resume", epoch + 1)
                    break
                if outcome == "stop":  # num_steps reached (or an early stop) inside the epoch
                    if state.val_step != state.step:  # a final validation, so best/ reflects the end
                        self._validate(_epoch_label(epoch, state.batches_done, self.n_batches))
                    self._save_last()
                    if self.main:
                        log.info("stopped at step %d inside epoch %d; saved %s", state.step, epoch + 1, self.last_dir)
                    break
                state.epoch, state.batches_done = epoch + 1, 0
                if self.cfg.val_interval is None or (self._finished(epoch + 1) and state.val_step != state.step):
                    self._validate(epoch + 1)
                self._save_last()
                barrier()
                if any_rank([self.stop.requested], self.device)[0]:  # a signal during validation: last/ is this epoch's end
                    state.stopped_by_signal = True
                    if self.main:
                        log.warning("stopped by a signal after epoch %d; continue with --resume", epoch + 1)
                    break
                if state.stopped_early and self.main:
                    log.info("early stop: %s did not improve for %d validations", self.cfg.select_metric,
                             state.bad_validations)
                if self._out_of_time(epochs_run):
                    break
        finally:
            self.stop.__exit__()
            self.loggers.close()
        return state

    def _out_of_time(self, epochs_run: int) -> bool:
        """Stop at an epoch boundary (so resume stays exact) when the next epoch, as long as the
        average one so far, would end past the time budget; rank 0 decides for everyone."""
        if self.cfg.max_minutes is None or self._finished(self.state.epoch):
            return False
        elapsed = time.perf_counter() - self.t_fit
        out_of_time = broadcast_object(elapsed * (epochs_run + 1) / epochs_run > self.cfg.max_minutes * 60)
        if out_of_time and self.main:
            log.info("time budget of %g min reached after %d epochs (%.1f min)", self.cfg.max_minutes,
                     self.state.epoch, elapsed / 60)
        return out_of_time

    # -- an epoch -----------------------------------------------------------------------------

    def _train_epoch(self, epoch: int) -> str:
        """Train on `epoch`'s batches from state.batches_done on. Returns "end", "stop" (num_steps
        or an early stop inside the epoch: the caller validates and saves) or "signal" (saved)."""
        cfg, state = self.cfg, self.state
        self.ddp_model.train()
        start = state.batches_done
        batches = self.task.train_batches(epoch, start)
        n_batches = start + len(batches) if hasattr(batches, "__len__") else None
        if cfg.max_steps_per_epoch is not None and n_batches is not None:
            n_batches = min(n_batches, cfg.max_steps_per_epoch * cfg.grad_accum)
        self.n_batches = n_batches
        bar = None
        if self.main and cfg.progress:  # a bar on a terminal, a plain line every 30 s in logs
            from seesay.progress import progress

            bar = progress(n_batches, initial=start, desc=f"epoch {epoch + 1}/{self.max_epochs or '-'}",
                           unit="batch")
        self.optimizer.zero_grad(set_to_none=True)
        outcome = "end"
        try:
            for i, batch in enumerate(batches, start=start):
                if n_batches is not None and i >= n_batches:
                    break
                last_micro = (i + 1) % cfg.grad_accum == 0 or (n_batches is not None and i + 1 == n_batches)
                loss, out = self._micro_step(batch, last_micro)
                if not last_micro:
                    continue
                self._optimizer_step()
                state.batches_done = i + 1
                if bar is not None:
                    bar.update(cfg.grad_accum)
                outcome = self._after_step(epoch, n_batches, loss, out, bar)
                if outcome != "end":
                    break
        finally:
            if bar is not None:
                bar.close()
        return outcome

    def _micro_step(self, batch: Any, last_micro: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward and backward of one micro-batch (DDP syncs gradients only on the last one of
        an accumulation); its losses and metrics join the window's running means."""
        sync = contextlib.nullcontext() if (last_micro or not self.dist.enabled) else self.ddp_model.no_sync()
        with sync:
            with _autocast(self.device, self.cfg):
                out = self.task.training_step(batch, self.ddp_model)
            loss = total_loss(out)
            self.scaler.scale(loss / self.cfg.grad_accum).backward()
        n = int(out["n"])
        self.window.add({TOTAL: loss, **{k: v for k, v in out.items() if k != "n"}}, n)
        self.rows_since_log += n
        return loss, out

    def _optimizer_step(self) -> None:
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.steps_this_run += 1
        self.schedule.apply(self.state.step)  # the rate of the next step

    def _after_step(self, epoch: int, n_batches: int | None, loss: torch.Tensor, out: dict[str, Any],
                    bar: Any) -> str:
        """Logging, step-N checkpoints, interval validation, and RUN_DIR/last inside the epoch
        (every N steps, every M minutes, or on a stop signal). "end" to go on."""
        cfg, state, done = self.cfg, self.state, self.state.batches_done
        if self.main and (state.step % max(cfg.log_every, 1) == 0 or self.steps_this_run == 1):
            self._log_step(loss, out, bar)
        if self.main and cfg.save_interval and state.step % cfg.save_interval == 0:
            self.task.save(self.run_dir / f"step-{state.step}", None)
        if cfg.val_interval and state.step % cfg.val_interval == 0:
            self._validate(_epoch_label(epoch, done, n_batches))
        # ranks must agree on saves and stops: without DDP every step, with DDP every log_every steps
        due = bool(cfg.save_every_steps) and state.step % cfg.save_every_steps == 0
        timed = cfg.save_every_minutes is not None and time.perf_counter() - self.t_saved >= cfg.save_every_minutes * 60
        stop_now = False
        if not self.dist.enabled:
            stop_now, due = self.stop.requested, due or timed
        elif state.step % max(cfg.log_every, 1) == 0:  # one small all-reduce (and sync) per log_every steps
            stop_now, timed = any_rank([self.stop.requested, timed], self.device)
            due = due or timed
        at_end = n_batches is not None and done >= n_batches
        finishing = state.stopped_early or (cfg.num_steps is not None and state.step >= cfg.num_steps)
        if stop_now or (due and not at_end and not finishing):  # (at the end / finishing: the caller saves)
            state.stopped_by_signal = stop_now
            self._save_last()
            if self.main:
                log.info("saved %s inside epoch %d (%d batches, step %d)", self.last_dir, epoch + 1, done, state.step)
        if stop_now:
            return "signal"
        return "stop" if finishing and not at_end else "end"

    def _log_step(self, loss: torch.Tensor, out: dict[str, Any], bar: Any) -> None:
        """The last micro-batch's losses and metrics, the rates and captions/s (rank 0)."""
        now = time.perf_counter()
        rate = self.rows_since_log * self.dist.world_size / max(now - self.t_log, 1e-9)
        self.t_log, self.rows_since_log = now, 0
        values = {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()
                  if k != "n" and v is not None}
        values["loss"] = float(loss.detach())
        if bar is not None:
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()} | {"caps_s": f"{rate:.0f}"})
        lrs = {f"train/lr/{g.get('name', i)}": lr for i, (g, lr) in
               enumerate(zip(self.optimizer.param_groups, self.schedule.lrs()))}
        self.loggers.scalars({**{f"train/{k}": v for k, v in values.items()}, "train/captions_per_s": rate, **lrs},
                             self.state.step)

    # -- validation and checkpoints -----------------------------------------------------------

    def _validate(self, label: float) -> None:
        """Validate on rank 0 (everyone follows its decision): the selected metric picks best/,
        lowers the rates (plateau) and stops early; one metrics.jsonl record closes the window."""
        cfg, state = self.cfg, self.state
        t_val = time.perf_counter()
        train_time = self.window_seconds + t_val - self.t_window
        means, rows = self.window.means(self.dist)
        val = broadcast_object(self._run_validation() if self.main else None)
        score = val.get(cfg.select_metric)
        if score is None:
            raise SeesayError(f"--select-metric {cfg.select_metric!r} is not among the validation metrics "
                              f"({', '.join(k for k, v in val.items() if v is not None)})")
        state.val_step = state.step
        improved = score > state.best_score
        if improved:
            state.best_score, state.best_epoch, state.best_step = float(score), label, state.step
            state.bad_validations = 0
        else:
            state.bad_validations += 1
            if state.bad_validations % cfg.lr_decay_patience == 0 and self.schedule.plateau(cfg.lr_decay, state.step):
                if self.main:
                    log.info("no improvement for %d validations: learning rates x%g", state.bad_validations,
                             cfg.lr_decay)
            if state.bad_validations >= cfg.patience:
                state.stopped_early = True

        train_loss = means.pop(TOTAL, math.nan)
        lrs = self.schedule.lrs()
        record = {"epoch": label, "step": state.step, "train_loss": train_loss,
                  **({"train_top5": means["top5"]} if "top5" in means else {}),
                  "lr": lrs[0], "lrs": lrs, "val": val, "time_s": self.window_seconds + time.perf_counter() - self.t_window,
                  "train_time_s": train_time, "captions_per_s": rows / max(train_time, 1e-9), "train": means}
        self.loggers.record(record)
        self.loggers.scalars({**{f"epoch/train_{k}": v for k, v in means.items()}, "epoch/train_loss": train_loss,
                              "epoch/lr": lrs[0], **{f"val/{k}": v for k, v in val.items()}}, state.step)
        if self.main and improved:
            self.task.save(self.run_dir / "best", None)
        if self.main:
            log.info("epoch %s, step %d: loss %.4f | %s %.4f (best %.4f at step %d) | %.0f captions/s", label,
                     state.step, train_loss, cfg.select_metric, score, state.best_score, state.best_step,
                     record["captions_per_s"])
        self.window, self.window_seconds, self.t_window = RunningMeans(self.device), 0.0, time.perf_counter()

    def _run_validation(self) -> dict[str, float]:
        """task.validate() with the RNG state put back: validating never shifts training's random draws."""
        saved = rng_state()
        try:
            return self.task.validate()
        finally:
            set_rng_state(saved)

    def _save_last(self) -> None:
        """RUN_DIR/last with everything exact resume needs; every rank's RNG state and window sums
        are gathered on rank 0. All ranks must call it (only ever after an optimizer step)."""
        gathered = gather({"rng": rng_state(), "window": self.window.state_dict()}, self.dist)
        if self.main:
            train_state = {"loop": asdict(self.state), "optimizer": self.optimizer.state_dict(),
                           "scaler": self.scaler.state_dict() if self.use_scaler else None,
                           "schedule": self.schedule.state_dict(), "rng": [g["rng"] for g in gathered],
                           "window": [g["window"] for g in gathered],
                           "window_seconds": self.window_seconds + time.perf_counter() - self.t_window,
                           "layout": self.layout}
            self.task.save(self.last_dir, train_state)
        self.t_saved = time.perf_counter()
