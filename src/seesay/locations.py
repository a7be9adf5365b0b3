"""Location tokens: boxes as `<loc_i>` tokens, and the scores of grounding.

A box is (x0, y0, x1, y1) in pixels of an image `width` x `height`, x1/y1 the exclusive right and
bottom edges (the built-in shapes' stored boxes; COCO's [x, y, w, h] becomes [x, y, x + w, y + h]).
Each coordinate, relative to its image side, falls into one of `num_bins` equal bins:

    bin(v) = clamp(floor(v / side * num_bins), 0, num_bins - 1)      v = side lands in the last bin
    back:  v' = (bin + 0.5) / num_bins * side                         the bin's centre

so a box survives box -> tokens -> box to within half a bin (side / (2 * num_bins)) per
coordinate when it lies inside the image (coordinates outside are clamped to it first). The four
tokens are written x0 y0 x1 y1, as in Pix2Seq / OFA / Unified-IO (`<loc_a> <loc_b> <loc_c> <loc_d>`).

While decoding a target of one kind, the others are masked out: `allowed_token_ids(..., kind)`
lists the ids a word answer, a location answer or an image answer may use.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

Box = tuple[float, float, float, float]
TokenKind = Literal["word", "loc", "img"]

_LOC = re.compile(r"^<loc_(\d+)>$")
_IMG = re.compile(r"^<img_(\d+)>$")


def loc_token(i: int) -> str:
    return f"<loc_{i}>"


def img_token(i: int) -> str:
    return f"<img_{i}>"


def loc_tokens(n: int) -> list[str]:
    """`<loc_0>` .. `<loc_{n-1}>`: the names to add to a tokenizer's vocabulary."""
    return [loc_token(i) for i in range(n)]


def img_tokens(k: int) -> list[str]:
    """`<img_0>` .. `<img_{k-1}>`: one per VQ code."""
    return [img_token(i) for i in range(k)]


def token_kind(token: str) -> TokenKind:
    """"loc" for `<loc_i>`, "img" for `<img_i>`, "word" for anything else."""
    if _LOC.match(token):
        return "loc"
    if _IMG.match(token):
        return "img"
    return "word"


def parse_loc_token(token: str) -> int | None:
    """i of `<loc_i>`, else None."""
    m = _LOC.match(token)
    return int(m.group(1)) if m else None


# ---- boxes <-> bins <-> tokens ------------------------------------------------------------------


def _check(width: float, height: float, num_bins: int) -> None:
    if not (width > 0 and height > 0):
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an integer >= 1, got {num_bins!r}")


def quantize_coord(v: float, side: float, num_bins: int) -> int:
    """The bin of coordinate `v` along an image side of `side` pixels."""
    return min(max(math.floor(v / side * num_bins), 0), num_bins - 1)


def dequantize_coord(b: int, side: float, num_bins: int) -> float:
    """The centre of bin `b`, in pixels."""
    return (b + 0.5) / num_bins * side


def box_to_bins(box: Sequence[float], width: float, height: float, num_bins: int) -> tuple[int, int, int, int]:
    _check(width, height, num_bins)
    x0, y0, x1, y1 = (float(v) for v in box)
    return (quantize_coord(x0, width, num_bins), quantize_coord(y0, height, num_bins),
            quantize_coord(x1, width, num_bins), quantize_coord(y1, height, num_bins))


def bins_to_box(bins: Sequence[int], width: float, height: float, num_bins: int) -> Box:
    _check(width, height, num_bins)
    a, b, c, d = (int(v) for v in bins)
    return (dequantize_coord(a, width, num_bins), dequantize_coord(b, height, num_bins),
            dequantize_coord(c, width, num_bins), dequantize_coord(d, height, num_bins))


def box_to_tokens(box: Sequence[float], width: float, height: float, num_bins: int) -> list[str]:
    """Four `<loc_i>` tokens, x0 y0 x1 y1."""
    return [loc_token(b) for b in box_to_bins(box, width, height, num_bins)]


def tokens_to_box(tokens: Sequence[str] | str, width: float, height: float, num_bins: int) -> Box | None:
    """The box of the first four `<loc_i>` tokens of a generated answer (a string is split on spaces);
    None when there are fewer than four or one is out of range (a wrong answer, not an error)."""
    if isinstance(tokens, str):
        tokens = re.findall(r"<loc_\d+>", tokens)
    bins = [parse_loc_token(t) for t in tokens]
    bins = [b for b in bins if b is not None][:4]
    if len(bins) < 4 or any(b >= num_bins for b in bins):
        return None
    return bins_to_box(bins, width, height, num_bins)


# ---- scores -------------------------------------------------------------------------------------


def box_area(box: Sequence[float]) -> float:
    x0, y0, x1, y1 = box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (0 when either is empty, and when they do not meet)."""
    inter = box_area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def grounding_scores(predicted: Sequence[Sequence[float] | None], targets: Sequence[Sequence[float]],
                     threshold: float = 0.5) -> dict[str, float]:
    """{"accuracy": share with IoU >= threshold, "mean_iou", "n"}; a None prediction (no four
    location tokens) has IoU 0."""
    if len(predicted) != len(targets):
        raise ValueError(f"{len(predicted)} predictions for {len(targets)} targets")
    ious = [0.0 if p is None else box_iou(p, t) for p, t in zip(predicted, targets)]
    n = len(ious)
    return {
        "accuracy": sum(i >= threshold for i in ious) / n if n else 0.0,
        "mean_iou": sum(ious) / n if n else 0.0,
        "n": n,
    }


# ---- logit masks --------------------------------------------------------------------------------


def allowed_token_ids(id_to_token: Callable[[int], str] | Sequence[str], vocab_size: int | None, kind: TokenKind,
                      always: Iterable[int] = ()) -> list[int]:
    """Ids of a vocabulary that an answer of `kind` may contain, plus `always` (e.g. the end id).

    "word": every token that is neither `<loc_i>` nor `<img_i>` (a caption cannot contain image
    codes or places); "loc": only `<loc_i>`; "img": only `<img_i>`. `id_to_token` is a tokenizer's
    `id_to_token` (with `vocab_size`) or the list of tokens by id (`vocab_size` None).
    """
    if kind not in ("word", "loc", "img"):
        raise ValueError(f"kind must be word, loc or img, got {kind!r}")
    if callable(id_to_token):
        if vocab_size is None:
            raise ValueError("vocab_size is needed with an id_to_token function")
        names = [id_to_token(i) for i in range(vocab_size)]
    else:
        names = list(id_to_token)
    ids = {i for i, t in enumerate(names) if token_kind(str(t)) == kind}
    return sorted(ids | {int(i) for i in always})
