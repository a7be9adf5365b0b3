"""`seesay visualize` and `seesay caption --attention-map`: caption an image and draw where the
model looked for each word.

The model sees the image as the checkpoint's prepared size (squashed to a square, as
`seesay prepare` stored the training images); the figure shows the original picture (scaled
down to at most 448 px on its longer side, aspect kept) with each word's attention grid
stretched over it, which is the same correspondence since the squash is a per-axis scale.
Greedy decoding by default; with `beam_size > 1` the attention is the chosen beam's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seesay.errors import SeesayError
from seesay.viz.attention import display_image, save_attention_map


@dataclass
class Visualized:
    image: str
    caption: str
    words: list[str]
    output: Path
    score: float


def infer_grid_hw(num_columns: int, has_sentinel: bool | None = None) -> tuple[int, int]:
    """(h, w) of a square encoder grid from the attention width (h*w, or h*w+1 with a sentinel).

    Every seesay encoder sees a square input, so its grid is square. With `has_sentinel=None`
    it is inferred: for A > 1, A and A-1 are never both perfect squares.
    """
    a = int(num_columns)
    options = [has_sentinel] if has_sentinel is not None else [False, True]
    for sent in options:
        n = a - (1 if sent else 0)
        side = math.isqrt(max(n, 0))
        if n > 0 and side * side == n:
            return side, side
    raise SeesayError(f"cannot infer a square attention grid from {num_columns} attention columns")


def token_words(tokenizer: Any, tokens: Sequence[int], length: int | None = None) -> list[str]:
    """The generated tokens as words, `<end>` included when it was emitted (it has attention too)."""
    ids = [int(t) for t in list(tokens)[: (len(tokens) if length is None else int(length))]]
    return [tokenizer.id_to_token(i) for i in ids]


def save_caption_attention(
    output: str | Path,
    image: np.ndarray | str | Path,
    words: Sequence[str],
    attention: Any,
    *,
    grid_hw: tuple[int, int] | None = None,
    has_sentinel: bool | None = None,
    title: str | None = None,
    cols: int = 5,
) -> Path:
    """Attention map for one decoded caption (what `seesay caption --attention-map` calls).

    `image` is a uint8 [H, W, 3] array or a path (read at its own size); `attention` is the
    caption's [L, A] attention (tensor or array, L >= len(words)); `grid_hw` defaults to the
    square grid implied by A (minus a sentinel column, inferred when `has_sentinel` is None).
    """
    if attention is None:
        raise SeesayError("this decoder returns no attention (e.g. show_tell); there is no map to draw")
    att = attention.detach().float().cpu().numpy() if hasattr(attention, "detach") else np.asarray(attention, dtype=np.float64)
    if grid_hw is None:
        grid_hw = infer_grid_hw(att.shape[-1], has_sentinel)
    if not isinstance(image, np.ndarray):
        from seesay.data.images import load_image_rgb

        image = load_image_rgb(image, None)
    words = list(words)[: att.shape[0]]
    if title is None:
        title = " ".join(w for w in words if w not in ("<end>", "<start>", "<pad>"))
    return save_attention_map(output, display_image(image), words, att[: len(words)], grid_hw, cols=cols, title=title)


def set_attention_layer(decoder: Any, layer: int | None) -> None:
    """Ask a multi-layer decoder for another layer's cross-attention (None: leave its default)."""
    if layer is None:
        return
    if not hasattr(decoder, "attention_layer"):
        raise SeesayError(f"decoder {type(decoder).__name__} has no choice of attention layer")
    n = len(getattr(decoder, "layers", [])) or None
    if n is not None and not -n <= layer < n:
        raise SeesayError(f"--layer {layer}: the decoder has {n} layers")
    decoder.attention_layer = int(layer)


def save_attention_maps(output: str | Path, results: Sequence[Any], tokenizer: Any) -> list[Path]:
    """`seesay caption --attention-map OUT.png`: one figure per captioned image.

    `results` are `seesay.caption.CaptionResult`-like objects (image, caption, tokens,
    attention [L, A] or None, error); `tokenizer` a tokenizer or a checkpoint directory. Files are
    named by `attention_map_paths` over all the given images (OUT.png for one image, else
    OUT-<stem>.png), so a failed image does not shift the others' names. Images that failed
    to caption are skipped.
    """
    from seesay.viz.attention import attention_map_paths

    if isinstance(tokenizer, (str, Path)):
        from seesay.checkpoint import read_tokenizer

        tokenizer = read_tokenizer(Path(tokenizer))
    paths = attention_map_paths(output, [r.image for r in results])
    written = []
    for r, path in zip(results, paths):
        if getattr(r, "error", None) is not None:
            continue
        att = getattr(r, "attention", None)
        if att is None:
            raise SeesayError("this decoder returns no attention (e.g. show_tell); no attention maps written")
        words = token_words(tokenizer, r.tokens)
        written.append(save_caption_attention(path, r.image, words, att, title=r.caption))
    return written


def resolve_device(device: str | None) -> Any:
    """`seesay.model.pick_device`: auto, cpu, cuda, cuda:N, mps; one line when it is not there."""
    from seesay.model import pick_device

    return pick_device(device)


def check_decoding(*, beam_size: int, max_len: int, length_penalty: float = 0.0, batch_size: int = 1) -> None:
    """One line for decoding settings that cannot work, before a checkpoint is loaded."""
    for flag, value in (("--beam-size", beam_size), ("--max-length", max_len), ("--batch-size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SeesayError(f"{flag} must be an integer >= 1, not {value!r}")
    if not length_penalty >= 0:
        raise SeesayError(f"--length-penalty must be >= 0, not {length_penalty!r}")


def visualize_image(
    checkpoint: Any,
    image_path: str | Path,
    output: str | Path,
    *,
    beam_size: int = 1,
    max_len: int = 50,
    length_penalty: float = 0.0,
    cols: int = 5,
    device: str | None = None,
    layer: int | None = None,
) -> Visualized:
    """Caption `image_path` with a checkpoint (path or loaded `Checkpoint`) and save its attention map.

    `layer` picks which cross-attention layer a multi-layer decoder (transformer, titans_mac)
    returns (0-based, negative from the end; default: its last layer), for decoders that
    expose an `attention_layer` attribute.
    """
    from seesay.captioner import caption_images
    from seesay.checkpoint import load_checkpoint
    from seesay.data.images import load_image_rgb
    from seesay.decoding import strategy_from_options
    from seesay.files import check_output

    check_decoding(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty)
    if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
        raise SeesayError(f"--cols must be an integer >= 1, not {cols!r}")
    check_output(output)
    dev = resolve_device(device)
    original = load_image_rgb(image_path, None)  # a bad image: one line before the checkpoint loads
    ckpt = load_checkpoint(checkpoint, map_location=dev) if isinstance(checkpoint, (str, Path)) else checkpoint
    model = ckpt.model
    model.to(dev).eval()
    decoder = getattr(model, "decoder", model)
    set_attention_layer(decoder, layer)
    strategy = strategy_from_options(beam_size=beam_size, length_penalty=length_penalty)
    res = caption_images(model, [image_path], strategy, max_len=max_len)[0]
    if res.attention is None:
        name = model.spec().get("decoder", {}).get("name", type(decoder).__name__)
        raise SeesayError(f"decoder {name} returns no attention; nothing to visualise")
    words = token_words(model.tokenizer, res.tokens)
    out = save_caption_attention(
        output,
        original,
        words,
        res.attention,
        grid_hw=res.grid_hw,
        has_sentinel=bool(getattr(decoder, "has_sentinel", False)),
        title=res.caption,
        cols=cols,
    )
    return Visualized(str(image_path), res.caption, words, out, res.score)


# ---- VQ image tokenizers: an image beside its reconstruction (`seesay visualize --vq DIR IMAGE...`) ----


def reconstruction_figure(images: Any, vq: Any, predicted_codes: Any = None, titles: Sequence[str] | None = None) -> Any:
    """A matplotlib figure: one row per image, the image (at the tokenizer's size) | its VQ
    reconstruction (with PSNR) | with `predicted_codes` [B, h, w] (a masked-modelling model's
    prediction of the codes), their decoding and the share of codes it got right.

    `images` is uint8 [B, 3, H, W] (tensor or array) or a list of uint8 [H, W, 3] arrays."""
    import torch

    from seesay.viz.attention import pyplot

    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images]).transpose(0, 3, 1, 2)
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    codes = vq.encode(x)
    shown = ((vq.to_model_input(x) + 1) / 2).cpu()
    columns = [("image", shown), ("VQ reconstruction", vq.decode(codes).cpu())]
    if predicted_codes is not None:
        predicted_codes = torch.as_tensor(predicted_codes).to(codes.device).long()
        columns.append(("predicted codes", vq.decode(predicted_codes).cpu()))
    plt = pyplot()
    n, k = x.shape[0], len(columns)
    fig, axes = plt.subplots(n, k, figsize=(3 * k, 3 * n), squeeze=False)
    for i in range(n):
        for j, (label, batch) in enumerate(columns):
            ax = axes[i][j]
            ax.imshow(batch[i].permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            text = label if i == 0 else ""
            if j > 0:
                mse = float((batch[i] - shown[i]).pow(2).mean())
                text += f"\nPSNR {10 * math.log10(1 / max(mse, 1e-12)):.1f} dB"
            if j == 2:
                text += f", {float((predicted_codes[i] == codes[i]).float().mean()):.0%} codes right"
            if j == 0 and titles is not None:
                text += ("\n" if text else "") + titles[i]
            ax.set_title(text.strip(), fontsize=8)
    fig.suptitle(f"{type(vq).__name__}: {vq.codebook_size} codes, {vq.grid_size}x{vq.grid_size} per image", fontsize=9)
    fig.tight_layout()
    return fig


def visualize_vq(vq_dir: str | Path, image_paths: Sequence[str | Path], output: str | Path,
                 device: str | None = "cpu", checkpoint: str | Path | None = None, mask_ratio: float = 0.75,
                 prompt: str | None = None) -> Path:
    """`seesay visualize --vq DIR IMAGE... --output FILE`: each image beside its reconstruction; with
    `checkpoint` (a masked-image-modelling model, `seesay.train.mim`) also the codes it predicts for
    the image with `mask_ratio` of its patches masked (and `prompt` as its context), decoded."""
    import torch

    from seesay.data.images import load_image_rgb
    from seesay.files import check_output
    from seesay.viz.attention import figure_png
    from seesay.vq import load_vq

    if not image_paths:
        raise SeesayError("--vq: name at least one image to reconstruct")
    check_output(output)
    vq = load_vq(vq_dir, map_location=resolve_device(device))
    arrays = [load_image_rgb(p, vq.image_size) for p in image_paths]  # a bad image: one line naming it
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    predicted = None
    if checkpoint is not None:
        from seesay.checkpoint import load_checkpoint
        from seesay.train.mim import predict_codes

        model = load_checkpoint(checkpoint, map_location=resolve_device(device)).model.eval()
        if model.tokenizer.token_to_id(f"<img_{vq.codebook_size - 1}>") is None:
            raise SeesayError(f"--checkpoint {checkpoint}: no <img_i> tokens for the {vq.codebook_size} codes of "
                              f"--vq {vq_dir} (train it with vae_ckpt_path: {vq_dir})")
        images = torch.stack([model.preprocess(p) for p in image_paths])
        predicted = predict_codes(model, images, vq.codebook_size, vq.grid_size, ratio=mask_ratio, prompt=prompt)
    fig = reconstruction_figure(batch, vq, predicted_codes=predicted, titles=[Path(p).name for p in image_paths])
    data = figure_png(fig)
    out = Path(output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    except OSError as e:
        raise SeesayError(f"{out}: cannot write the figure ({e.strerror or e})") from e
    return out
