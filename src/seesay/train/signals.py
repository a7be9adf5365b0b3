"""Stopping on Ctrl-C / SIGTERM, and what ranks agree on before acting (stops, saves)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch

from seesay.train.distributed import DistInfo, all_reduce_sum

log = logging.getLogger(__name__)


class StopSignal:
    """Ctrl-C / SIGTERM during training: the first asks the loop to stop after the current
    optimizer step (writing RUN_DIR/last so --resume continues exactly); a second one stops at
    once (KeyboardInterrupt). Handlers are only installed from the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s: stopping after this optimizer step and saving RUN_DIR/last (send it again to stop now)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag, true when it is true on any rank (ranks act on stops and saves together)."""
    t = torch.tensor([float(f) for f in flags], device=device)
    all_reduce_sum(t)
    return [bool(v > 0) for v in t.tolist()]


def gather(mine: Any, dist: DistInfo) -> list[Any]:
    """Every rank's `mine` (RNG states, loss sums: they differ per rank under DDP), on every rank."""
    if not dist.enabled:
        return [mine]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, mine)
    return out
