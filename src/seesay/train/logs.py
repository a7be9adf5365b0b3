"""What the training loop records: running means of the objective's outputs, and the loggers
(TensorBoard, RUN_DIR/metrics.jsonl, optional wandb) that rank 0 writes them to."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from seesay.config import TrainConfig
from seesay.errors import missing_extra
from seesay.train.distributed import DistInfo, all_reduce_sum
from seesay.train.signals import gather

log = logging.getLogger(__name__)

TOTAL = "<loss>"  # the summed loss (all "loss*" keys); no objective key can look like this


class RunningMeans:
    """n-weighted sums of every loss and metric a training step returned, over one validation
    window. They stay on the device (no sync per step) until `means()`; `state_dict()` is what
    RUN_DIR/last keeps so a resumed window averages exactly as an uninterrupted one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}  # key -> [sum of value * n, sum of n]

    def add(self, values: dict[str, Any], n: int) -> None:
        for key, value in values.items():
            if value is None:
                continue
            v = value.detach() if isinstance(value, torch.Tensor) else value
            v = torch.as_tensor(v, dtype=torch.float64, device=self.device)
            acc = self.sums.get(key)
            if acc is None:
                acc = self.sums[key] = torch.zeros(2, dtype=torch.float64, device=self.device)
            acc += torch.stack((v * n, v.new_tensor(float(n))))

    def means(self, dist: DistInfo) -> tuple[dict[str, float], float]:
        """({key: mean over every rank}, rows), the summed loss under TOTAL. All ranks must call it."""
        keys = sorted(self.sums)
        if dist.enabled:  # a key some rank never saw (a metric of some batches only) counts as 0 rows there
            keys = sorted({k for rank_keys in gather(keys, dist) for k in rank_keys})
        zero = torch.zeros(2, dtype=torch.float64, device=self.device)
        table = torch.stack([self.sums.get(k, zero) for k in keys]) if keys else zero.new_zeros(0, 2)
        all_reduce_sum(table)
        rows = table.cpu().tolist()
        means = {k: s / n for k, (s, n) in zip(keys, rows) if n > 0}
        count = dict(zip(keys, rows)).get(TOTAL, [0.0, 0.0])[1]
        return means, float(count)

    def state_dict(self) -> dict[str, list[float]]:
        return {k: v.cpu().tolist() for k, v in self.sums.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.sums = {k: torch.tensor(v, dtype=torch.float64, device=self.device) for k, v in state.items()}

    @staticmethod
    def from_totals(totals: list[float]) -> dict[str, list[float]]:
        """The [loss * n, top5 * n, n] sums of checkpoints written before objectives could return
        any metric."""
        loss, top5, n = totals
        return {TOTAL: [loss, n], "loss": [loss, n], "top5": [top5, n]} if n else {}


class Loggers:
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

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        if not self.enabled:
            return
        values = {k: v for k, v in values.items() if v is not None}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def record(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl (one per validation)."""
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
