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


def test_decoding_a_split_reports_progress_in_logs(tmp_path, caplog, monkeypatch):
    import torch

    from conftest import prepared_shapes
    from seesay.captioner import decode_split
    from seesay.data.store import open_prepared
    from seesay.model import build_model

    monkeypatch.setattr(P, "is_terminal", lambda stream=None: False)
    data = open_prepared(prepared_shapes(tmp_path, num_images=12))
    torch.manual_seed(0)
    model = build_model({"encoder": {"name": "small_cnn", "width": 8, "encoded_size": 2, "image_size": 32},
                         "decoder": {"name": "show_tell", "vocab_size": len(data.vocab), "embed_dim": 8,
                                     "decoder_dim": 8}}, tokenizer=data.vocab, image_size=32).eval()
    store = data.split("train")
    caplog.set_level(logging.INFO, logger="seesay.progress")
    out = decode_split(model, store, max_len=4, batch_size=4, progress=True)
    assert len(out) == len(store)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        f"captioning: {len(store)}/{len(store)} img (100%)"]
    caplog.clear()
    decode_split(model, store, max_len=4, batch_size=4)  # off by default (validation inside training)
    assert caplog.records == []
