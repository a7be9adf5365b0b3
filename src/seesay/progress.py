"""Progress for long work: a tqdm bar on a terminal, plain log lines every so often elsewhere.

A bar redraws itself with carriage returns; in a log file, a CI console or a cluster job's output
that is thousands of `\\r` updates on one "line" (one COCO epoch wrote about 2 MB). So
`progress(...)` returns a tqdm bar only when standard error is a terminal; otherwise a `LogLines`
with the same small API (`update`, `set_postfix`, `set_description`, `close`, context manager)
that writes one plain line through `logging` at most every `every_s` seconds (and at the end).
`enabled=False` (`--no-progress`) shows neither.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("seesay.progress")

DEFAULT_EVERY_S = 30.0


def is_terminal(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LogLines:
    """tqdm's small API, writing "desc: n/total unit (pct) rate, postfix" lines at most every `every_s`."""

    def __init__(self, total: int | None = None, *, desc: str = "", unit: str = "it", initial: int = 0,
                 every_s: float = DEFAULT_EVERY_S, enabled: bool = True, logger: logging.Logger | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = int(initial)
        self.every_s = float(every_s)
        self.enabled = enabled
        self.postfix = ""
        self.logger = logger or log
        self._t0 = time.monotonic()
        self._last = self._t0
        self._n0 = self.n
        self._closed = False

    def update(self, k: int = 1) -> None:
        self.n += int(k)
        now = time.monotonic()
        if self.enabled and now - self._last >= self.every_s:
            self._last = now
            self._emit()

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = (self.n - self._n0) / elapsed
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100.0 * self.n / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc}: {done} {self.unit}{pct}, {rate:.1f} {self.unit}/s"
        return f"{text}, {self.postfix}" if self.postfix else text

    def _emit(self) -> None:
        self.logger.info("%s", self.line())

    def close(self) -> None:
        if self.enabled and not self._closed and self.n != self._n0:
            self._emit()
        self._closed = True

    def __enter__(self) -> LogLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self):  # pragma: no cover - tqdm(iterable) style is not used with LogLines
        raise TypeError("LogLines wraps counts, not iterables")


def progress(total: int | None = None, *, desc: str = "", unit: str = "it", initial: int = 0, enabled: bool = True,
             leave: bool = False, every_s: float = DEFAULT_EVERY_S) -> Any:
    """A progress display for `total` units: tqdm on a terminal, `LogLines` otherwise, silent when
    `enabled` is False."""
    if enabled and is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
    return LogLines(total, desc=desc, unit=unit, initial=initial, every_s=every_s, enabled=enabled)
