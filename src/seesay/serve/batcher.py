"""The request batcher: requests that arrive close together are decoded together, on one thread.

The web server's event loop never runs the model. `submit(job)` puts a job (preprocessed image
tensors + their `Decoding` options) in a queue and returns a `concurrent.futures.Future`; one
worker thread takes the oldest job, waits up to `max_wait_s` from that job's arrival for more
jobs with the same options (the *group key*), and decodes the group as one batch through
`caption_images` (one `generate` call while the images share a shape, as they do for a model
with a fixed input size). A group holds at most `max_batch` cost units, a job costing its images
times its captions per image; a job bigger than that runs alone. Jobs with other options wait
for the next round, in arrival order, so no option mix starves.

Timeouts and cancelled requests never run: a job whose future was cancelled (its client gave
up) or whose deadline has passed is dropped when the worker picks it; a job that times out while
running is finished, and its result is dropped with the future. If a batch fails, each of its
jobs is retried alone, so one request's failure never becomes another's.

`stats()` counts what was formed (batches, images, the mean batch size) for /v1/model and the
load benchmark.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from seesay.layers import gemm

log = logging.getLogger(__name__)


class Expired(Exception):
    """The job's deadline passed before the worker reached it."""


@dataclass(eq=False)
class Job:
    images: list[Any]  # preprocessed image tensors [3, H, W]
    decoding: Any  # seesay.serve.options.Decoding
    key: Hashable  # jobs with equal keys may share a batch
    deadline: float  # time.monotonic() after which the result is no use
    cost: int = 1
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


def run_group(captioner: Any, jobs: Sequence[Job], batch_size: int) -> list[list[Any]]:
    """Decode jobs that share options in one `caption_images` call: per job, per image, its captions."""
    from seesay.captioner import caption_images

    d = jobs[0].decoding
    images = [im for job in jobs for im in job.images]
    out = caption_images(captioner, images, d.strategy, prompt=d.prompt, max_len=d.max_len,
                         batch_size=max(batch_size, len(images)), constraints=d.constraints,
                         num_captions=d.num_captions)
    per_image = [r if d.num_captions > 1 else [r] for r in out]
    results, start = [], 0
    for job in jobs:
        results.append(per_image[start: start + len(job.images)])
        start += len(job.images)
    return results


class Batcher:
    """One worker thread decoding queued jobs in groups (see the module doc)."""

    def __init__(self, captioner: Any, *, max_batch: int = 16, max_wait_s: float = 0.005,
                 run: Callable[[Any, Sequence[Job], int], list[Any]] = run_group) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, not {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, not {max_wait_s}")
        self.captioner = captioner
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self._run = run
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._stats = {"batches": 0, "images": 0, "jobs": 0, "largest_batch": 0, "expired": 0, "cancelled": 0,
                       "failed": 0, "running": 0}

    # -- the server's side -----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="seesay-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for job in pending:
            job.future.cancel()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._stop:
                raise RuntimeError("the batcher is stopped")
            self._pending.append(job)
            self._cond.notify_all()
        return job.future

    def pending(self) -> int:
        with self._cond:
            return len(self._pending)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            s = dict(self._stats)
        s["mean_batch_size"] = round(s["images"] / s["batches"], 3) if s["batches"] else 0.0
        s["max_batch"], s["max_wait_ms"] = self.max_batch, round(self.max_wait_s * 1000, 3)
        return s

    # -- the worker ------------------------------------------------------------------------

    def _loop(self) -> None:
        # the served weights never change: on a CPU each one is packed for oneDNN once for the
        # server's life rather than once per decoding call (`seesay.layers.gemm`)
        with gemm.packing():
            while True:
                group = self._next_group()
                if group is None:
                    return
                self._decode(group)

    def _next_group(self) -> list[Job] | None:
        """The oldest job and those with its key, once the group is full or its wait is over."""
        with self._cond:
            while not self._pending and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            first = self._pending[0]
            until = first.arrived + self.max_wait_s
            while not self._stop:
                cost = sum(j.cost for j in self._pending if j.key == first.key)
                left = until - time.monotonic()
                if cost >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            group, cost = [], 0
            for job in self._pending:
                if job.key != first.key:
                    continue
                if group and cost + job.cost > self.max_batch:
                    break
                group.append(job)
                cost += job.cost
            taken = set(map(id, group))
            self._pending = [j for j in self._pending if id(j) not in taken]
            return group

    def _decode(self, group: list[Job]) -> None:
        now = time.monotonic()
        live = []
        for job in group:
            if not job.future.set_running_or_notify_cancel():
                self._count("cancelled")
            elif now > job.deadline:
                job.future.set_exception(Expired())
                self._count("expired")
            else:
                live.append(job)
        if not live:
            return
        with self._cond:
            self._stats["running"] = len(live)
        try:
            try:
                results = self._run(self.captioner, live, self.max_batch)
            except Exception as e:  # noqa: BLE001 - retried alone below, so only the culprit fails
                if len(live) == 1:
                    raise
                log.warning("a batch of %d requests failed (%s: %s); decoding them one at a time", len(live),
                            type(e).__name__, e)
                for job in live:
                    self._decode_alone(job)
                return
            self._record(live)
            for job, res in zip(live, results):
                job.future.set_result(res)
        except Exception as e:  # noqa: BLE001 - the request gets the error, the worker goes on
            self._count("failed")
            for job in live:
                if not job.future.done():
                    job.future.set_exception(e)
        finally:
            with self._cond:
                self._stats["running"] = 0

    def _decode_alone(self, job: Job) -> None:
        try:
            res = self._run(self.captioner, [job], self.max_batch)[0]
        except Exception as e:  # noqa: BLE001
            self._count("failed")
            job.future.set_exception(e)
            return
        self._record([job])
        job.future.set_result(res)

    def _record(self, jobs: Sequence[Job]) -> None:
        n = sum(len(j.images) for j in jobs)
        with self._cond:
            self._stats["batches"] += 1
            self._stats["images"] += n
            self._stats["jobs"] += len(jobs)
            self._stats["largest_batch"] = max(self._stats["largest_batch"], n)

    def _count(self, what: str) -> None:
        with self._cond:
            self._stats[what] += 1
