"""A self-contained HTML report: each image, its generated caption, references, scores, attention.

`build_report_html(items)` turns plain `ReportItem`s into one HTML string with every image
embedded as a base64 data: URI, inline CSS, no scripts and no external resources, so the
file can be mailed or opened offline. `write_report(...)` (what `seesay report` runs)
decodes a split of a prepared dataset with a checkpoint, scores each image with
`seesay.metrics.compute_scores(...).per_image` and writes the page.

Order on the page: items are ranked by one per-image score (`sort_metric`, CIDEr by
default). The lower half of the ranking comes first, worst first ("Worst examples"), then
the upper half, best first ("Best examples"): every image appears once, and the two ends
of the ranking (where the model fails and where it shines) are at the top of each section.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from seesay.errors import SeesayError
from seesay.files import write_text_atomic

log = logging.getLogger(__name__)

SCORE_ORDER = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
PER_IMAGE_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr")  # what the fast path scores


@dataclass
class ReportItem:
    """One image on the page. `attention` is [len(words), A] (see seesay.viz.attention)."""

    image_id: str
    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    references: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    words: list[str] = field(default_factory=list)
    attention: np.ndarray | None = None
    grid_hw: tuple[int, int] | None = None
    sentinel: np.ndarray | None = None


def encode_png(image: np.ndarray) -> str:
    """A data: URI holding `image` (uint8 [H, W, 3]) as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def encode_jpeg(image: np.ndarray, quality: int = 85) -> str:
    """A data: URI holding `image` (uint8 [H, W, 3]) as JPEG (small attention panels)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def split_ranking(items: Sequence[ReportItem], metric: str = "CIDEr") -> tuple[list[ReportItem], list[ReportItem]]:
    """(worst half, worst first; best half, best first) by `item.scores[metric]`.

    Items without that score rank as worst. Ties keep the input order (stable sort).
    """

    def key(it: ReportItem) -> float:
        v = it.scores.get(metric)
        return -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    ranked = sorted(items, key=key)
    n_worst = math.ceil(len(ranked) / 2)
    return ranked[:n_worst], ranked[n_worst:][::-1]


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 6px}
h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #ccc;padding-bottom:4px}
.meta{color:#555;font-size:13px;margin:2px 0}
table.corpus{border-collapse:collapse;margin:10px 0;font-size:13px}
table.corpus td,table.corpus th{border:1px solid #ccc;padding:3px 8px;text-align:right}
.item{display:flex;gap:18px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;margin:10px 0}
.item .photo img{width:224px;height:auto;image-rendering:auto;border-radius:3px}
.item .text{flex:1;min-width:0}
.caption{font-size:17px;font-weight:600;margin:0 0 6px}
.id{color:#777;font-size:12px}
.scores{font-size:12px;color:#333;margin:4px 0 8px}
.scores span{display:inline-block;margin-right:10px}
.scores .key{font-weight:700;color:#000}
ol.refs{margin:4px 0 8px 18px;padding:0;font-size:14px;color:#333}
.strip{display:flex;flex-wrap:wrap;gap:6px;margin-top:6px}
.strip figure{margin:0;text-align:center;font-size:12px}
.strip figure img{display:block;height:84px;width:auto;border-radius:2px}
.strip figcaption{margin-top:2px}
.looked{color:#1f5fa0;font-size:11px}
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return html.escape(str(v))


def _ordered_scores(scores: dict[str, Any]) -> list[tuple[str, Any]]:
    keys = [k for k in SCORE_ORDER if k in scores] + sorted(k for k in scores if k not in SCORE_ORDER)
    return [(k, scores[k]) for k in keys]


def _item_html(item: ReportItem, sort_metric: str, rank: str) -> str:
    e = html.escape
    parts = [f'<div class="item" id="img-{e(str(item.image_id))}">']
    parts.append(f'<div class="photo"><img src="{encode_png(item.image)}" alt="{e(str(item.image_id))}"></div>')
    parts.append('<div class="text">')
    parts.append(f'<p class="caption">{e(item.caption)}</p>')
    parts.append(f'<div class="id">{e(rank)} &middot; image {e(str(item.image_id))}</div>')
    if item.scores:
        spans = []
        for k, v in _ordered_scores(item.scores):
            cls = ' class="key"' if k == sort_metric else ""
            spans.append(f"<span{cls}>{e(k)} {_fmt(v)}</span>")
        parts.append(f'<div class="scores">{"".join(spans)}</div>')
    if item.references:
        refs = "".join(f"<li>{e(r)}</li>" for r in item.references)
        parts.append(f'<div class="meta">references</div><ol class="refs">{refs}</ol>')
    if item.attention is not None and item.grid_hw is not None and item.words:
        from seesay.viz.attention import word_panels

        att = np.asarray(item.attention)[: len(item.words)]
        panels, sent = word_panels(item.image, att, item.grid_hw, sentinel=item.sentinel)
        figs = []
        for i, (word, panel) in enumerate(zip(item.words, panels)):
            looked = ""
            if sent is not None:
                looked = f'<div class="looked" title="weight on the image rather than the sentinel">image {1 - float(sent[i]):.0%}</div>'
            figs.append(
                f'<figure><img src="{encode_jpeg(panel)}" alt="attention for {e(word)}">'
                f"<figcaption>{e(word)}</figcaption>{looked}</figure>"
            )
        parts.append(f'<div class="strip">{"".join(figs)}</div>')
    parts.append("</div></div>")
    return "".join(parts)


def build_report_html(
    items: Sequence[ReportItem],
    *,
    title: str = "seesay report",
    sort_metric: str = "CIDEr",
    info: dict[str, Any] | None = None,
    corpus_scores: dict[str, Any] | None = None,
) -> str:
    """The whole page as one string (UTF-8, no external resources)."""
    e = html.escape
    worst, best = split_ranking(items, sort_metric)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for k, v in (info or {}).items():
        out.append(f'<p class="meta"><b>{e(str(k))}</b>: {e(str(v))}</p>')
    if corpus_scores:
        row = _ordered_scores(corpus_scores)
        head = "".join(f"<th>{e(k)}</th>" for k, _ in row)
        vals = "".join(f"<td>{_fmt(v)}</td>" for _, v in row)
        out.append(f'<table class="corpus"><tr>{head}</tr><tr>{vals}</tr></table>')
    out.append(
        f'<p class="meta">{len(items)} images ranked by per-image {e(sort_metric)}: the lower half '
        "first (worst first), then the upper half (best first).</p>"
    )
    n = len(items)
    for name, section, ranks in (
        ("Worst examples", worst, range(n, n - len(worst), -1)),
        ("Best examples", best, range(1, len(best) + 1)),
    ):
        if not section:
            continue
        out.append(f"<h2>{name}</h2>")
        for it, r in zip(section, ranks):
            out.append(_item_html(it, sort_metric, f"rank {r} of {n}"))
    out.append("</body></html>")
    return "\n".join(out)


def save_report_html(output: str | Path, page: str) -> Path:
    out = Path(output)
    try:
        write_text_atomic(out, page)
    except OSError as e:
        raise SeesayError(f"{out}: cannot write the report ({e.strerror or e})") from e
    return out


# ---------------------------------------------------------------------------------------------
# `seesay report`: decode a split with a checkpoint, score each image, write the page.


@dataclass
class ReportSummary:
    output: Path
    num_images: int
    corpus: dict[str, Any]
    worst: list[tuple[str, float | None]]
    best: list[tuple[str, float | None]]


def pick_indices(n_total: int, num_images: int, seed: int | None = None) -> list[int]:
    """The first `num_images` images of the split (all when 0), or a random sample with `seed`."""
    k = n_total if num_images <= 0 else min(num_images, n_total)
    if seed is None:
        return list(range(k))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_total, size=k, replace=False))


def decode_split_items(
    model: Any,
    store: Any,
    indices: Sequence[int],
    strategy: Any = None,
    *,
    max_len: int = 50,
    batch_size: int = 32,
    progress: bool = False,
) -> list[ReportItem]:
    """Decode the chosen images of a prepared split into `ReportItem`s (scores not yet filled)."""
    from seesay.captioner import decode_batches
    from seesay.decoding import Beam
    from seesay.viz.visualize import token_words

    has_att = True
    items: list[ReportItem] = []
    refs_all = store.references
    ids_all = store.image_ids
    for batch in decode_batches(model, store, strategy or Beam(3), indices=indices, max_len=max_len,
                                batch_size=batch_size, progress=progress):
        for j, i in enumerate(batch.indices):
            c = batch.captions[j]
            has_att = has_att and c.attention is not None
            items.append(
                ReportItem(
                    image_id=str(ids_all[i]),
                    image=batch.images[j],
                    caption=c.caption,
                    references=list(refs_all[i]),
                    words=token_words(model.tokenizer, c.tokens) if c.attention is not None else [],
                    attention=None if c.attention is None else c.attention.numpy(),
                    grid_hw=c.grid_hw,
                )
            )
    if not has_att:
        log.info("this decoder returns no attention: the report has no attention strips")
    return items


def write_report(
    checkpoint: Any,
    data_dir: str | Path,
    output: str | Path,
    *,
    split: str = "test",
    num_images: int = 50,
    beam_size: int = 3,
    max_len: int = 50,
    length_penalty: float = 0.0,
    batch_size: int = 32,
    sort_metric: str = "CIDEr",
    seed: int | None = None,
    device: str | None = None,
    title: str | None = None,
    progress: bool = False,
) -> ReportSummary:
    """Decode `num_images` images of a prepared split, score them and write the HTML report.

    Per-image scores come from `seesay.metrics.compute_scores` (fast path: BLEU, ROUGE-L,
    CIDEr-D) over the images in the report, so CIDEr-D's document frequencies are those of
    these images' references (`seesay evaluate` over a whole split can differ slightly).
    """
    from seesay.captioner import evaluation_lang
    from seesay.checkpoint import load_checkpoint
    from seesay.data.store import open_prepared
    from seesay.decoding import strategy_from_options
    from seesay.files import check_output
    from seesay.metrics import compute_scores
    from seesay.viz.visualize import check_decoding, resolve_device

    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
        raise SeesayError(f"--num-images must be an integer >= 0 (0: the whole split), not {num_images!r}")
    check_decoding(beam_size=beam_size, max_len=max_len, length_penalty=length_penalty, batch_size=batch_size)
    if sort_metric not in PER_IMAGE_METRICS:
        raise SeesayError(f"--sort-metric {sort_metric!r} is not a per-image score (use one of "
                          f"{', '.join(PER_IMAGE_METRICS)})")
    check_output(output)
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, map_location=dev) if isinstance(checkpoint, (str, Path)) else checkpoint
    model = ckpt.model
    model.to(dev).eval()
    data = open_prepared(data_dir)
    store = data.split(split)
    ckpt_size = ckpt.preprocess.get("image_size")
    if ckpt_size and int(ckpt_size) != data.image_size:
        log.warning("%s was prepared at %d px, the checkpoint at %s px", data_dir, data.image_size, ckpt_size)
    if len(store) == 0:
        raise SeesayError(f"{data_dir}: split {split!r} has no images")
    indices = pick_indices(len(store), num_images, seed)
    strategy = strategy_from_options(beam_size=beam_size, length_penalty=length_penalty)
    items = decode_split_items(model, store, indices, strategy, max_len=max_len, batch_size=batch_size,
                               progress=progress)
    keys = [str(k) for k in range(len(items))]  # image ids need not be unique across sources
    lang = evaluation_lang(model.tokenizer, data.manifest, store.references)
    report = compute_scores({k: it.caption for k, it in zip(keys, items)},
                            {k: it.references for k, it in zip(keys, items)}, lang=lang)
    for k, it in zip(keys, items):
        it.scores = {m: float(v) for m, v in (report.per_image.get(k) or {}).items() if v is not None}
    if items and sort_metric not in items[0].scores:
        have = ", ".join(sorted(items[0].scores)) or "none"
        raise SeesayError(f"no per-image {sort_metric!r} score to sort by (have: {have})")
    corpus = {m: v for m, v in report.corpus.items() if v is not None}
    spec = model.spec()
    family = spec.get("captioner", "encoder_decoder")
    model_text = (f"encoder {spec.get('encoder', {}).get('name', '?')}, decoder {spec.get('decoder', {}).get('name', '?')}"
                  if family == "encoder_decoder" else family)
    info = {
        "checkpoint": str(checkpoint) if isinstance(checkpoint, (str, Path)) else "(in memory)",
        "model": model_text,
        "data": f"{data_dir} (split {split}, {len(items)} of {len(store)} images"
        + (f", random sample with seed {seed})" if seed is not None else ", the first ones)"),
        "decoding": f"beam size {beam_size}" + (" (greedy)" if beam_size <= 1 else "") + f", max length {max_len}",
        "scores": f"per image, over the {len(items)} images shown (fast path: BLEU, ROUGE-L, CIDEr-D)",
    }
    page = build_report_html(items, title=title or f"seesay report: {split} split", sort_metric=sort_metric,
                             info=info, corpus_scores=corpus)
    out = save_report_html(output, page)
    worst, best = split_ranking(items, sort_metric)
    return ReportSummary(
        out,
        len(items),
        corpus,
        [(it.image_id, it.scores.get(sort_metric)) for it in worst[:3]],
        [(it.image_id, it.scores.get(sort_metric)) for it in best[:3]],
    )
