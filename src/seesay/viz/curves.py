"""Training curves: loss, top-5 accuracy and validation metrics per epoch, several runs per chart.

Each run directory holds `metrics.jsonl`, one JSON object per epoch written by `seesay train`:
{"epoch", "step", "train_loss", "train_top5", "lr", "val": {"Bleu_1".."Bleu_4", "ROUGE_L",
"CIDEr", ...}, "time_s"}. `plot_runs` draws one subplot per quantity (train loss, train
top-5, then every validation metric any run logged) with one line per run and a legend.

Reading rules: a checkpoint folder (RUN_DIR/best, RUN_DIR/last) is accepted in place of the
run directory; a run that was resumed may log an epoch twice, the later line wins; an
unparseable *last* line (a run still writing it) is skipped with a warning, any other bad
line is a one-line error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seesay.errors import SeesayError
from seesay.viz.attention import figure_png, pyplot

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# the preferred order of validation metrics; others follow alphabetically
VAL_ORDER = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
TRAIN_KEYS = (("train_loss", "train loss"), ("train_top5", "train top-5 accuracy"))


def metrics_path(run_dir: str | Path) -> Path:
    """RUN_DIR/metrics.jsonl, also found from a checkpoint folder inside the run."""
    d = Path(run_dir)
    if d.is_file():
        return d
    for cand in (d / METRICS_FILE, d.parent / METRICS_FILE):
        if cand.is_file():
            return cand
    raise SeesayError(f"{d}: no {METRICS_FILE} here (is it a run directory written by `seesay train`?)")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run, sorted by epoch (last record wins for a repeated epoch)."""
    path = metrics_path(run_dir)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SeesayError(f"{path}: cannot read ({e})") from e
    by_epoch: dict[Any, dict[str, Any]] = {}
    numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
    for k, (lineno, line) in enumerate(numbered):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if k == len(numbered) - 1:
                log.warning("%s:%d: skipping an incomplete last line", path, lineno)
                continue
            raise SeesayError(f"{path}:{lineno}: not a JSON object per line ({e})") from e
        epoch = rec.get("epoch", len(by_epoch) + 1)
        by_epoch[epoch] = rec
    try:
        return [by_epoch[e] for e in sorted(by_epoch)]
    except TypeError as e:
        raise SeesayError(f"{path}: 'epoch' values are not all numbers") from e


def _number(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def run_series(records: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """{quantity: (epochs, values)} for train_loss, train_top5 and each val metric."""
    out: dict[str, tuple[list[float], list[float]]] = {}

    def add(key: str, epoch: float, value: Any) -> None:
        v = _number(value)
        if math.isnan(v):
            return
        xs, ys = out.setdefault(key, ([], []))
        xs.append(epoch)
        ys.append(v)

    for i, rec in enumerate(records):
        epoch = _number(rec.get("epoch", i + 1))
        for key, _ in TRAIN_KEYS:
            if key in rec:
                add(key, epoch, rec[key])
        val = rec.get("val") or {}
        if isinstance(val, dict):
            for key, value in val.items():
                add(f"val/{key}", epoch, value)
    return out


def _order(keys: set[str]) -> list[str]:
    train = [k for k, _ in TRAIN_KEYS if k in keys]
    val = [f"val/{m}" for m in VAL_ORDER if f"val/{m}" in keys]
    rest = sorted(k for k in keys if k not in train and k not in val)
    return train + val + rest


def run_labels(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[str]:
    """Legend labels: `labels` when given, else each run directory's name (made unique)."""
    if labels:
        if len(labels) != len(run_dirs):
            raise SeesayError(f"--labels has {len(labels)} names for {len(run_dirs)} runs")
        return [str(x) for x in labels]
    names = []
    for d in run_dirs:
        p = Path(d).resolve()
        if p.name in ("best", "last") or p.is_file():
            p = p.parent
        names.append(p.name)
    out = []
    for d, n in zip(run_dirs, names):
        out.append(n if names.count(n) == 1 else str(d))
    return out


def curves_figure(runs: Sequence[tuple[str, Sequence[dict[str, Any]]]], *, cols: int = 3, title: str | None = None) -> Any:
    """A matplotlib Figure: one subplot per quantity, one line per (label, records) run."""
    plt = pyplot()
    series = [(label, run_series(recs)) for label, recs in runs]
    keys = _order({k for _, s in series for k in s})
    if not keys:
        raise SeesayError("no epochs with train_loss, train_top5 or val metrics to plot")
    cols = max(1, min(cols, len(keys)))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
    names = dict(TRAIN_KEYS)
    colours = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    for ax, key in zip(axes.flat, keys):
        for j, (label, s) in enumerate(series):
            if key in s:
                xs, ys = s[key]
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label, color=colours[j % len(colours)])
        ax.set_title(names.get(key, key.replace("val/", "val ")), fontsize=11)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, lbls = [], []
    for ax in axes.flat:
        for h, lb in zip(*ax.get_legend_handles_labels()):
            if lb not in lbls:
                handles.append(h)
                lbls.append(lb)
    fig.legend(handles, lbls, loc="lower center", ncol=min(len(lbls), 4), frameon=False, bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title)
    legend_rows = math.ceil(len(lbls) / 4)
    fig.tight_layout(rect=(0, 0.03 + 0.035 * legend_rows / rows, 1, 0.97 if title else 1))
    return fig


def plot_runs(
    run_dirs: Sequence[str | Path],
    output: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    cols: int = 3,
    dpi: int = 110,
) -> Path:
    """Read each run's metrics.jsonl and write the curves to `output` (PNG, or PDF/SVG by suffix)."""
    if not run_dirs:
        raise SeesayError("give at least one run directory")
    names = run_labels(run_dirs, labels)
    runs = [(name, read_metrics(d)) for name, d in zip(names, run_dirs)]
    for (_name, recs), d in zip(runs, run_dirs):
        if not recs:
            log.warning("%s: metrics.jsonl has no epochs yet", d)
    fig = curves_figure(runs, cols=cols, title=title)
    out = Path(output)
    fmt = out.suffix.lower().lstrip(".") or "png"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "png":
            out.write_bytes(figure_png(fig, dpi=dpi))
        else:
            plt = pyplot()
            try:
                fig.savefig(out, format=fmt, bbox_inches="tight")
            finally:
                plt.close(fig)
    except ValueError as e:
        raise SeesayError(f"{out}: unsupported figure format {fmt!r} ({e})") from e
    except OSError as e:
        raise SeesayError(f"{out}: cannot write ({e.strerror or e})") from e
    return out
