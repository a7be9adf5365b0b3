"""Attention maps: the image, then one panel per generated word with its attention as a heat map.

# L - words, A - attention columns, h/w - encoder grid, H/W - image pixels
Decoders return attention [L, A] per caption: A = h*w regions in row-major order over the
encoder grid, or h*w + 1 for decoders with a visual sentinel (adaptive attention), whose last
column is the weight given to the sentinel rather than the image. Transformer / Titans
decoders already return the last layer's cross-attention averaged over heads.

The region part is renormalised to sum to 1 per word and upsampled smoothly to the image's
size by Gaussian kernel interpolation between grid-cell centres (`upsample_attention`): each
pixel is a Gaussian-weighted average of the cell values around it, so the map is smooth,
non-negative, and its peak stays on the attended cell. The grid covers the whole image (the
model saw the image squashed to a square, so a grid cell maps to the same fraction of any
rendering of the image, whatever its aspect ratio).

matplotlib is imported lazily with the Agg backend: nothing ever opens a window.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seesay.errors import SeesayError, missing_extra


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (never a window); a one-line error when missing."""
    try:
        import matplotlib
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise missing_extra("matplotlib", "viz") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def split_attention(
    attention: np.ndarray, grid_hw: tuple[int, int], sentinel: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Region maps [L, h, w] (each summing to 1) and the per-word sentinel weight [L] or None.

    `attention` is [L, h*w] or [L, h*w+1]; in the latter case the last column is the sentinel
    weight (unless `sentinel` is given explicitly, which then wins).
    """
    att = np.asarray(attention, dtype=np.float64)
    if att.ndim == 1:
        att = att[None]
    if att.ndim != 2:
        raise ValueError(f"attention must be [L, A], got shape {att.shape}")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    n = h * w
    if att.shape[1] == n + 1:
        if sentinel is None:
            sentinel = att[:, n]
        att = att[:, :n]
    elif att.shape[1] != n:
        raise ValueError(f"attention has {att.shape[1]} columns; grid {h}x{w} needs {n} (or {n + 1} with a sentinel)")
    att = np.clip(np.nan_to_num(att, nan=0.0), 0.0, None)
    total = att.sum(axis=1, keepdims=True)
    uniform = np.full_like(att, 1.0 / n)
    regions = np.where(total > 0, att / np.where(total > 0, total, 1.0), uniform)
    sent = None
    if sentinel is not None:
        sent = np.clip(np.asarray(sentinel, dtype=np.float64).reshape(-1)[: att.shape[0]], 0.0, 1.0)
        if sent.shape[0] != att.shape[0]:
            raise ValueError(f"sentinel has {sent.shape[0]} values for {att.shape[0]} words")
    return regions.reshape(-1, h, w), sent


def _gauss_weights(n_out: int, n_cells: int, sigma_cells: float) -> np.ndarray:
    """[n_out, n_cells] row-normalised Gaussian weights between pixel and cell centres."""
    pix = (np.arange(n_out) + 0.5) / n_out * n_cells  # pixel centres in cell units
    cells = np.arange(n_cells) + 0.5
    d = pix[:, None] - cells[None, :]
    k = np.exp(-0.5 * (d / sigma_cells) ** 2)
    return k / k.sum(axis=1, keepdims=True)


def upsample_attention(grid: np.ndarray, out_hw: tuple[int, int], *, sigma_cells: float = 0.6) -> np.ndarray:
    """Smoothly upsample one [h, w] map to [H, W] (Gaussian kernel interpolation), divided by its max.

    Scaled by the maximum only (0 stays 0), so a flat attention looks flat instead of having
    its small differences stretched into false contrast.
    """
    g = np.asarray(grid, dtype=np.float64)
    ky = _gauss_weights(int(out_hw[0]), g.shape[0], sigma_cells)
    kx = _gauss_weights(int(out_hw[1]), g.shape[1], sigma_cells)
    up = np.clip(ky @ g @ kx.T, 0.0, None)
    hi = float(up.max())
    return up / hi if hi > 1e-12 else np.zeros_like(up)


def overlay(image: np.ndarray, heat: np.ndarray, *, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3]: `heat` ([H, W] in [0, 1]) coloured with `cmap` and blended onto `image`."""
    try:
        from matplotlib import colormaps
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise missing_extra("matplotlib", "viz") from e
    colours = colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3]
    out = (1.0 - alpha) * np.asarray(image, dtype=np.float64) / 255.0 + alpha * colours
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def word_panels(
    image: np.ndarray,
    attention: np.ndarray,
    grid_hw: tuple[int, int],
    *,
    sentinel: np.ndarray | None = None,
    size: int = 112,
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """One overlay image per attention row (longer side `size` px) and the sentinel weights.

    A fast, matplotlib-figure-free rendering used by the HTML report.
    """
    small = display_image(image, max_side=size)
    regions, sent = split_attention(attention, grid_hw, sentinel)
    H, W = small.shape[:2]
    return [overlay(small, upsample_attention(r, (H, W))) for r in regions], sent


def peak_cell(grid: np.ndarray) -> tuple[int, int]:
    """(row, col) of the strongest cell of one [h, w] map."""
    r, c = np.unravel_index(int(np.argmax(grid)), grid.shape)
    return int(r), int(c)


def attention_figure(
    image: np.ndarray,
    words: Sequence[str],
    attention: np.ndarray,
    grid_hw: tuple[int, int],
    *,
    sentinel: np.ndarray | None = None,
    cols: int = 5,
    title: str | None = None,
    panel_inches: float = 2.2,
    cmap: str = "jet",
    alpha: float = 0.5,
) -> Any:
    """A matplotlib Figure: the image, then one panel per word with its attention overlaid.

    Panels wrap onto rows of `cols`. With a sentinel (adaptive attention) each word's panel
    also says how much the model looked at the image (1 - sentinel weight) and draws it as a bar.
    """
    plt = pyplot()
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got shape {img.shape}")
    words = [str(w) for w in words]
    att = np.asarray(attention)
    if att.ndim == 1:
        att = att[None]
    if att.shape[0] < len(words):
        raise ValueError(f"attention has {att.shape[0]} rows for {len(words)} words")
    regions, sent = split_attention(att[: len(words)], grid_hw, sentinel)
    H, W = img.shape[:2]
    cols = max(1, int(cols))
    n_panels = len(words) + 1
    rows = math.ceil(n_panels / cols)
    ncols = min(cols, n_panels)
    aspect = H / max(W, 1)
    extra = 0.35 if sent is not None else 0.0
    fig, axes = plt.subplots(
        rows,
        ncols,
        figsize=(panel_inches * ncols, (panel_inches * aspect + 0.45 + extra) * rows + (0.4 if title else 0.0)),
        squeeze=False,
    )
    for ax in axes.flat:
        ax.axis("off")
    axes[0][0].imshow(img)
    axes[0][0].set_title("image", fontsize=10)
    for i, word in enumerate(words):
        ax = axes[(i + 1) // ncols][(i + 1) % ncols]
        ax.imshow(overlay(img, upsample_attention(regions[i], (H, W)), cmap=cmap, alpha=alpha))
        ax.set_title(word, fontsize=11)
        if sent is not None:
            looked = 1.0 - float(sent[i])
            ax.text(
                0.5,
                -0.04,
                f"image {looked:.0%} / sentinel {1 - looked:.0%}",
                transform=ax.transAxes,
                ha="center",
                va="top",
                fontsize=8,
            )
            # a thin bar under the panel: filled part = weight on the image
            ax.add_patch(
                plt.Rectangle((0.0, -0.16), 1.0, 0.05, transform=ax.transAxes, clip_on=False, color="#dddddd")
            )
            ax.add_patch(
                plt.Rectangle((0.0, -0.16), looked, 0.05, transform=ax.transAxes, clip_on=False, color="#1f77b4")
            )
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return fig


def figure_png(fig: Any, *, dpi: int = 100) -> bytes:
    """PNG bytes of a figure, which is then closed."""
    plt = pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def save_attention_map(
    output: str | Path,
    image: np.ndarray,
    words: Sequence[str],
    attention: np.ndarray,
    grid_hw: tuple[int, int],
    *,
    sentinel: np.ndarray | None = None,
    cols: int = 5,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Write `attention_figure(...)` to `output` (PNG; parent folders are created)."""
    out = Path(output)
    fig = attention_figure(image, words, attention, grid_hw, sentinel=sentinel, cols=cols, title=title)
    data = figure_png(fig, dpi=dpi)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    except OSError as e:
        raise SeesayError(f"{out}: cannot write the attention map ({e.strerror or e})") from e
    return out


def attention_map_paths(output: str | Path, image_paths: Sequence[str | Path]) -> list[Path]:
    """Where `seesay caption --attention-map OUT.png` writes: OUT.png for one image, else
    OUT-<image stem>.png per image (OUT-<stem>-<k>.png when two images share a stem)."""
    out = Path(output)
    if len(image_paths) == 1:
        return [out]
    suffix = out.suffix or ".png"
    seen: dict[str, int] = {}
    paths = []
    for p in image_paths:
        stem = Path(p).stem
        k = seen.get(stem, 0)
        seen[stem] = k + 1
        name = f"{out.stem}-{stem}{suffix}" if k == 0 else f"{out.stem}-{stem}-{k}{suffix}"
        paths.append(out.with_name(name))
    return paths


def display_image(image: np.ndarray, max_side: int = 448) -> np.ndarray:
    """A copy of `image` scaled down (aspect kept) so its longer side is at most `max_side`."""
    from PIL import Image

    img = np.asarray(image, dtype=np.uint8)
    H, W = img.shape[:2]
    if max(H, W) <= max_side:
        return img
    scale = max_side / max(H, W)
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0))
