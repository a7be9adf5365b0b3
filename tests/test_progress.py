"""Progress: a bar on a terminal, periodic plain log lines elsewhere (no carriage returns in logs)."""

from __future__ import annotations

import io
import logging

import pytest

from seesay import progress as P


def test_not_a_terminal_gives_periodic_plain_lines(monkeypatch, caplog):
    clock = iter(float(t) for t in range(0, 10_000, 7))  # every call advances 7 s
    monkeypatch.setattr(P.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(P, "is_terminal", lambda stream=None: False)
    caplog.set_level(logging.INFO, logger="seesay.progress")
    bar = P.progress(100, desc="epoch 1/3", unit="batch", every_s=30)
    assert isinstance(bar, P.LogLines)
    for _ in range(100):
        bar.update(1)
    bar.set_postfix(loss="1.234")
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    # 100 updates 7 s apart: a line at most every 30 s (about 700 / 35), plus the final one
    assert 15 <= len(lines) <= 25, lines
    assert all("\r" not in line and line.startswith("epoch 1/3: ") for line in lines)
    assert lines[-1].startswith("epoch 1/3: 100/100 batch (100%)") and lines[-1].endswith("loss=1.234")


def test_disabled_prints_nothing_and_terminal_gets_tqdm(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="seesay.progress")
    quiet = P.progress(10, desc="x", enabled=False)
    for _ in range(10):
        quiet.update()
    quiet.close()
    assert caplog.records == []
    monkeypatch.setattr(P, "is_terminal", lambda stream=None: True)
    bar = P.progress(3, desc="y")
    assert type(bar).__name__ == "tqdm" or "tqdm" in type(bar).__module__
    bar.close()


@pytest.mark.parametrize("stream,expected", [(io.StringIO(), False)])
def test_is_terminal(stream, expected):
    assert P.is_terminal(stream) is expected
