"""Attention figures and training curves on synthetic arrays and metrics.jsonl files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from seesay.errors import SeesayError  # noqa: E402
from seesay.viz import attention as A  # noqa: E402
from seesay.viz import curves as C  # noqa: E402


def _one_hot_attention(cells: list[int], n: int, sentinel: list[float] | None = None) -> np.ndarray:
    att = np.zeros((len(cells), n + (1 if sentinel is not None else 0)))
    for i, c in enumerate(cells):
        s = 0.0 if sentinel is None else sentinel[i]
        att[i, c] = 1.0 - s
        if sentinel is not None:
            att[i, n] = s
    return att


def test_split_attention_renormalises_and_extracts_sentinel():
    att = np.array([[0.1, 0.1, 0.2, 0.0, 0.6], [0.0, 0.0, 0.0, 0.0, 1.0]])
    regions, sent = A.split_attention(att, (2, 2))
    assert regions.shape == (2, 2, 2)
    np.testing.assert_allclose(regions.reshape(2, -1).sum(1), 1.0)
    np.testing.assert_allclose(regions[0].ravel(), [0.25, 0.25, 0.5, 0.0])
    np.testing.assert_allclose(regions[1].ravel(), 0.25)  # all weight on the sentinel -> uniform map
    np.testing.assert_allclose(sent, [0.6, 1.0])
    # without a sentinel column, an explicit sentinel is used as is
    regions, sent = A.split_attention(att[:, :4], (2, 2), sentinel=np.array([0.3, 0.7]))
    np.testing.assert_allclose(sent, [0.3, 0.7])
    with pytest.raises(ValueError, match="columns"):
        A.split_attention(np.ones((2, 7)), (2, 2))


@pytest.mark.parametrize("grid_hw", [(4, 4), (3, 5), (14, 14)])
def test_upsampled_peak_stays_on_the_attended_cell(grid_hw):
    h, w = grid_hw
    H, W = 90, 120
    for cell in [0, h * w - 1, (h // 2) * w + w // 3]:
        g = np.zeros((h, w))
        g.flat[cell] = 1.0
        up = A.upsample_attention(g, (H, W))
        assert up.shape == (H, W)
        assert up.min() >= 0.0 and math.isclose(up.max(), 1.0)
        y, x = np.unravel_index(np.argmax(up), up.shape)
        r, c = divmod(cell, w)
        assert int(y * h / H) == r and int(x * w / W) == c
    # smooth: neighbouring pixels differ little (no blocky nearest-neighbour steps)
    g = np.zeros((h, w))
    g.flat[0] = 1.0
    up = A.upsample_attention(g, (H, W))
    assert np.abs(np.diff(up, axis=1)).max() < 0.25
    # flat attention looks flat
    np.testing.assert_allclose(A.upsample_attention(np.full((h, w), 1 / (h * w)), (H, W)), 1.0, atol=1e-9)


def test_attention_figure_panels_wrap_and_show_sentinel():
    plt = A.pyplot()
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    words = "a small red circle to the left of a big blue square <end>".split()
    att = _one_hot_attention([i % 16 for i in range(len(words))], 16, sentinel=[0.1 * (i % 10) for i in range(len(words))])
    fig = A.attention_figure(img, words, att, (4, 4), cols=5)
    axes = fig.axes
    assert len(axes) == 15  # 3 rows x 5 columns: image + 12 words + 2 empty
    shown = [ax for ax in axes if ax.images]
    assert len(shown) == len(words) + 1
    titles = [ax.get_title() for ax in shown]
    assert titles == ["image", *words]
    texts = [t.get_text() for ax in shown for t in ax.texts]
    assert "image 90% / sentinel 10%" in texts[1]
    assert sum("sentinel" in t for t in texts) == len(words)
    plt.close(fig)
    # without a sentinel: no sentinel text
    fig = A.attention_figure(img, words[:3], att[:3, :16], (4, 4), cols=5)
    assert not [t for ax in fig.axes for t in ax.texts]
    assert len(fig.axes) == 4
    plt.close(fig)


def test_save_attention_map_writes_a_nonblank_png(tmp_path):
    img = np.full((64, 64, 3), 200, np.uint8)
    att = _one_hot_attention([5, 0, 15], 16)
    out = A.save_attention_map(tmp_path / "sub" / "att.png", img, ["x", "y", "z"], att, (4, 4), title="x y z")
    with Image.open(out) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[0] > 100 and arr.shape[1] > 300
    assert arr.std() > 10  # heat maps were drawn


def test_word_panels_for_the_report():
    img = np.zeros((40, 80, 3), np.uint8)
    att = _one_hot_attention([0, 3], 4, sentinel=[0.25, 0.5])
    panels, sent = A.word_panels(img, att, (2, 2), size=60)
    assert [p.shape for p in panels] == [(30, 60, 3), (30, 60, 3)]
    np.testing.assert_allclose(sent, [0.25, 0.5])
    # attended cell is the hottest corner (jet: red is hot)
    assert panels[0][2, 2, 0] > panels[0][-3, -3, 0]
    assert panels[1][-3, -3, 0] > panels[1][2, 2, 0]


def test_attention_map_paths():
    assert A.attention_map_paths("o/att.png", ["a/x.jpg"]) == [A.Path("o/att.png")]
    got = A.attention_map_paths("o/att.png", ["a/x.jpg", "b/y.png", "c/x.jpg"])
    assert [p.as_posix() for p in got] == ["o/att-x.png", "o/att-y.png", "o/att-x-1.png"]


# ---- curves -------------------------------------------------------------------------------


def _write_run(path, epochs, scale=1.0, extra_lines=()):
    path.mkdir(parents=True, exist_ok=True)
    lines = []
    for e in epochs:
        rec = {
            "epoch": e,
            "step": 10 * e,
            "train_loss": 3.0 / e * scale,
            "train_top5": 0.5 + 0.04 * e,
            "lr": 1e-3,
            "val": {"Bleu_1": 0.5, "Bleu_2": 0.4, "Bleu_3": 0.3, "Bleu_4": 0.1 * e * scale, "ROUGE_L": 0.4, "CIDEr": 0.2 * e},
            "time_s": 1.0,
        }
        lines.append(json.dumps(rec))
    lines.extend(extra_lines)
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_read_metrics_resumed_and_incomplete(tmp_path):
    run = _write_run(tmp_path / "r", [1, 2, 3, 2, 3, 4], extra_lines=['{"epoch": 5, "train_lo'])
    recs = C.read_metrics(run)
    assert [r["epoch"] for r in recs] == [1, 2, 3, 4]
    # a checkpoint folder inside the run finds the run's file
    (run / "best").mkdir()
    assert len(C.read_metrics(run / "best")) == 4
    bad = _write_run(tmp_path / "bad", [1, 2], extra_lines=["not json", json.dumps({"epoch": 3})])
    with pytest.raises(SeesayError, match=r"metrics.jsonl:3"):
        C.read_metrics(bad)
    with pytest.raises(SeesayError, match="no metrics.jsonl"):
        C.read_metrics(tmp_path / "nothing")


def test_plot_runs_draws_every_quantity_with_a_legend(tmp_path):
    runs = [
        _write_run(tmp_path / "no_attention", range(1, 6), 1.3),
        _write_run(tmp_path / "attention", range(1, 6), 1.0),
        _write_run(tmp_path / "fine_tune", range(1, 4), 0.8),
    ]
    runs_recs = [(n, C.read_metrics(r)) for n, r in zip(C.run_labels(runs), runs)]
    fig = C.curves_figure(runs_recs)
    titles = [ax.get_title() for ax in fig.axes if ax.lines]
    assert titles == [
        "train loss",
        "train top-5 accuracy",
        "val Bleu_1",
        "val Bleu_2",
        "val Bleu_3",
        "val Bleu_4",
        "val ROUGE_L",
        "val CIDEr",
    ]
    for ax in fig.axes:
        if ax.lines:
            assert [ln.get_label() for ln in ax.lines] == ["no_attention", "attention", "fine_tune"]
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts == ["no_attention", "attention", "fine_tune"]
    loss = next(ax for ax in fig.axes if ax.get_title() == "train loss")
    np.testing.assert_allclose(loss.lines[2].get_ydata(), [3.0 / e * 0.8 for e in (1, 2, 3)])
    A.pyplot().close(fig)

    out = C.plot_runs(runs, tmp_path / "plots" / "curves.png", labels=["a", "b", "c"])
    with Image.open(out) as im:
        assert im.size[0] > 800 and np.asarray(im.convert("L")).std() > 5
    with pytest.raises(SeesayError, match="--labels"):
        C.plot_runs(runs, tmp_path / "x.png", labels=["a"])


def test_run_labels_unique():
    assert C.run_labels(["x/a", "y/b/best"]) == ["a", "b"]
    assert C.run_labels(["x/a", "y/a"]) == ["x/a", "y/a"]
