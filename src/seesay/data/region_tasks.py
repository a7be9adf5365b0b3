"""Region captioning and grounding: prepared data with boxes, training rows, logit masks, scores.

# r - caption rows, c - regions kept per image
`seesay prepare --format shapes-regions|coco-instances --task region|grounding` reads
`seesay.data.regions` (one Region per object) into the ordinary prepared form, one image per
record and its regions as its "captions". Each stored caption row carries its box as four
location tokens in front of the text (`seesay.locations`, bins of the box relative to the image):

    captions.npy row   <bos> <loc_x0> <loc_y0> <loc_x1> <loc_y1> text... <eos>     (width max_len + 6)
    boxes.npy          float32 [N, C, 4]: the same rows' boxes, relative (x0, y0, x1, y1 in [0, 1])
    meta.jsonl extra   "boxes": every kept region's relative box, "texts": their texts (evaluation)

so the box travels with its row through every loader, mixture and cache unchanged, and region and
grounding data are the same arrays (only the manifest's task differs). `task_rows`
(`seesay.data.tasks`) splits a row by its dataset's task:

    region     prompt "What does the region describe? region: <loc_a> <loc_b> <loc_c> <loc_d>"
               target  <bos> text <eos>
    grounding  prompt "Which region does the text describe? text: <text>"
               target  <bos> <loc_a> <loc_b> <loc_c> <loc_d> <eos>

Decoding masks the other token kinds (`answer_constraints`): a grounding answer is exactly four
`<loc_i>` (min and max length 4, nothing else allowed), a text answer never holds `<loc_i>` or
`<img_i>`. The tokenizer must be SentencePiece (`--tokenizer sentencepiece`): the location tokens
are added to it (`add_tokens`), saved with the data and every checkpoint trained on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seesay.errors import SeesayError

REGION_TASKS = ("region", "grounding")
REGION_FORMATS = ("shapes-regions", "coco-instances")
REGION_PROMPT = "What does the region describe? region:"
GROUNDING_PROMPT = "Which region does the text describe? text:"
DEFAULT_LOC_VOCAB_SIZE = 1000
LOC_PREFIX = 4  # location tokens in front of each stored row's text


def default_prompt(task: str) -> str:
    return REGION_PROMPT if task == "region" else GROUNDING_PROMPT


def check_loc_vocab_size(n: Any, flag: str = "--loc-vocab-size") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise SeesayError(f"{flag} must be an integer >= 2, not {n!r}")
    return n


# -- prepare -------------------------------------------------------------------------------------
def region_records(fmt: str, *, images: Any = None, coco_dir: Any = None) -> list[Any]:
    """One `Record` per image with boxes: its region texts as sentences and, in `extra`, their
    relative boxes ("boxes") and texts ("texts"), in the same order."""
    from seesay.data.formats import Record
    from seesay.data.regions import read_coco_instances, read_shapes_regions

    if fmt == "shapes-regions":
        if images is None:
            raise SeesayError("--format shapes-regions needs --images: the folder `seesay synth shapes` wrote "
                              "(or its dataset_shapes.json, or a DATA_DIR prepared from it)")
        regions = read_shapes_regions(images)
        src = Path(images)
        root = str(src if src.is_dir() and not (src / "manifest.json").is_file() else src.parent)
        if (src / "manifest.json").is_file():
            root = None  # a prepared shapes dir: its meta names the original files
    elif fmt == "coco-instances":
        if coco_dir is None:
            raise SeesayError("--format coco-instances needs --coco-dir (annotations/instances_{train,val}2014.json)")
        regions = read_coco_instances(coco_dir)
        root = None
    else:
        raise SeesayError(f"not a format with boxes: {fmt!r} (choose {', '.join(REGION_FORMATS)})")
    by_image: dict[tuple[str, str], Any] = {}
    for r in regions:
        key = (r.split, r.image_path)
        rec = by_image.get(key)
        if rec is None:
            where = root if root is not None or fmt != "coco-instances" else str(Path(r.image_path).parent)
            rec = by_image[key] = Record(r.image_path, r.image_id, r.split, [],
                                         {"width": r.width, "height": r.height, "boxes": [], "texts": []}, root=where)
        rel = [round(min(max(v / s, 0.0), 1.0), 6) for v, s in zip(r.box, (r.width, r.height, r.width, r.height))]
        rec.sentences.append(r.text)
        rec.extra["boxes"].append(rel)
        rec.extra["texts"].append(r.text)
    return list(by_image.values())


def kept_boxes(recs: Sequence[Any], tokens: Sequence[Sequence[Sequence[str]]], max_len: int) -> list[list[list[float]]]:
    """Each record's boxes of the captions prepare keeps (1 to `max_len` tokens), aligned with them."""
    out = []
    for r, toks in zip(recs, tokens):
        boxes = (r.extra or {}).get("boxes") or []
        out.append([b for t, b in zip(toks, boxes) if 1 <= len(t) <= max_len])
    return out


def loc_ids(tokenizer: Any, num_bins: int) -> list[int]:
    """Ids of `<loc_0>` .. `<loc_{n-1}>` (one line when the tokenizer lacks them)."""
    from seesay.locations import loc_token

    for i in (0, num_bins - 1):
        if getattr(tokenizer, "token_to_id", lambda t: None)(loc_token(i)) is None:
            raise SeesayError(f"the tokenizer has no {loc_token(i)}: region data needs the tokenizer it was "
                              "prepared with (seesay prepare --task region|grounding --tokenizer sentencepiece)")
    first = tokenizer.token_to_id(loc_token(0))
    ids = [tokenizer.token_to_id(loc_token(i)) for i in range(num_bins)]
    if ids != list(range(first, first + num_bins)):
        raise SeesayError("the tokenizer's <loc_i> ids are not consecutive; prepare the data again")
    return ids


def box_ids(box: Sequence[float], num_bins: int, first_loc: int) -> list[int]:
    """The four location ids of a relative box."""
    from seesay.locations import box_to_bins

    return [first_loc + b for b in box_to_bins(box, 1.0, 1.0, num_bins)]


def encode_region_row(tokenizer: Any, toks: Sequence[str], box: Sequence[float], num_bins: int) -> list[int]:
    """`<bos> <loc> x4 text <eos>` of one region (`toks`: its text's pieces)."""
    first = tokenizer.token_to_id("<loc_0>")
    return [tokenizer.bos_id, *box_ids(box, num_bins, first), *tokenizer.encode_tokens(toks), tokenizer.eos_id]


def write_boxes(path: Path, boxes: Sequence[Sequence[Sequence[float]]], c: int) -> None:
    arr = np.zeros((len(boxes), c, 4), dtype=np.float32)
    for i, rows in enumerate(boxes):
        arr[i, : len(rows)] = np.asarray(rows, dtype=np.float32).reshape(-1, 4)
    np.save(path, arr)


def read_boxes(store: Any) -> np.ndarray:
    """A region split's boxes.npy: float32 [N, C, 4] relative, checked (one line otherwise)."""
    path = Path(store.dir) / "boxes.npy"
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise SeesayError(f"{path}: file not found (a region dataset prepared incompletely?)") from None
    except (ValueError, OSError, EOFError) as e:
        raise SeesayError(f"{path}: not a valid prepared array ({str(e).splitlines()[0]}); prepare again") from None
    if arr.dtype != np.float32 or arr.ndim != 3 or arr.shape[0] != len(store) or arr.shape[2] != 4:
        raise SeesayError(f"{path}: expected float32 [{len(store)}, C, 4], got {arr.dtype} {tuple(arr.shape)}")
    return arr


# -- training rows ---------------------------------------------------------------------------------
def split_region_row(row: Sequence[int], task: str, prompt: Sequence[int], bos: int, eos: int
                     ) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) of a stored row `<bos> l l l l text <eos>` for `task`."""
    locs, text = list(row[1: 1 + LOC_PREFIX]), [int(t) for t in row[1 + LOC_PREFIX:] if int(t) != eos]
    if task == "region":
        return [*prompt, *locs], [bos, *text, eos]
    return [*prompt, *text], [bos, *locs, eos]


# -- logit masks -------------------------------------------------------------------------------------
_ALLOWED: dict[tuple[int, int, str], tuple[int, ...]] = {}


def allowed_ids(tokenizer: Any, kind: str) -> tuple[int, ...]:
    """`seesay.locations.allowed_token_ids` of a tokenizer (cached per tokenizer and kind); eos included."""
    from seesay.locations import allowed_token_ids

    key = (id(tokenizer), len(tokenizer), kind)
    if key not in _ALLOWED:
        _ALLOWED[key] = tuple(allowed_token_ids(tokenizer.id_to_token, len(tokenizer), kind,  # type: ignore[arg-type]
                                                always=(tokenizer.eos_id,)))
    return _ALLOWED[key]


def answer_kind(task: str | None) -> str:
    """The kind of tokens a task's answer is made of: loc (grounding), img (mim), else word."""
    return {"grounding": "loc", "mim": "img"}.get(task or "", "word")


def answer_constraints(tokenizer: Any, task: str | None, base: Any = None) -> Any:
    """`seesay.decoding.Constraints` for decoding an answer of `task`, or `base` when the tokenizer
    has no location or image tokens (nothing to mask). Grounding: exactly four `<loc_i>`."""
    from seesay.captioner import resolve_constraints
    from seesay.decoding import Constraints

    kind = answer_kind(task)
    if kind == "word" and not has_special_kinds(tokenizer):
        return base
    allowed = allowed_ids(tokenizer, kind)
    b = resolve_constraints(tokenizer, base) or Constraints()  # bad-ending words as ids first
    min_length = LOC_PREFIX if kind == "loc" else b.min_length
    return Constraints(b.no_repeat_ngram_size if kind == "word" else 0, min_length,
                       b.bad_ending_ids if kind == "word" else (), (), allowed)


def has_special_kinds(tokenizer: Any) -> bool:
    """Whether the vocabulary holds `<loc_i>` or `<img_i>` tokens."""
    find = getattr(tokenizer, "token_to_id", None)
    return callable(find) and (find("<loc_0>") is not None or find("<img_0>") is not None)


# -- evaluation ---------------------------------------------------------------------------------------
def image_regions(store: Any, i: int) -> list[tuple[list[float], str]]:
    """Every (relative box, text) the prepared image `i` has (its meta), duplicates dropped."""
    extra = (store.meta[i].get("extra") or {}) if isinstance(store.meta[i], dict) else {}
    boxes, texts = extra.get("boxes") or [], extra.get("texts") or []
    out, seen = [], set()
    for b, t in zip(boxes, texts):
        key = (tuple(b), t)
        if key not in seen:
            seen.add(key)
            out.append((list(b), str(t)))
    return out


def decode_regions(model: Any, store: Any, task: str, prompt_text: str, num_bins: int, *, strategy: Any,
                   max_len: int = 20, batch_size: int = 32, limit: int | None = None) -> list[dict[str, Any]]:
    """Answer every region of the first `limit` images of a prepared split; one row per region:
    {"image_id", "region", "box" (relative), "text", "prompt", "generated", and for grounding
    "predicted_box" (relative, None without four location tokens) and "iou"}."""
    import torch

    from seesay.captioner import device_of
    from seesay.locations import box_iou, tokens_to_box

    tok = model.tokenizer
    first = loc_ids(tok, num_bins)[0]
    head = list(tok.encode_prompt(prompt_text)) if prompt_text else []
    constraints = answer_constraints(tok, task)
    if task == "grounding":
        max_len = LOC_PREFIX
    items: list[tuple[int, int, list[float], str]] = []
    n = len(store) if limit is None else min(int(limit), len(store))
    for i in range(n):
        items += [(i, k, b, t) for k, (b, t) in enumerate(image_regions(store, i))]
    device = device_of(model)
    was = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    try:
        for start in range(0, len(items), max(batch_size, 1)):
            chunk = items[start: start + batch_size]
            images = sorted({i for i, *_ in chunk})
            pos = {i: j for j, i in enumerate(images)}
            x = torch.from_numpy(np.stack([np.asarray(store.images[i]) for i in images]).transpose(0, 3, 1, 2).copy())
            with torch.no_grad():
                enc = model.encode(x.to(device))
                enc = enc.index_select(torch.tensor([pos[i] for i, *_ in chunk], device=enc.grid.device))
                prompts = [[*head, *box_ids(b, num_bins, first)] if task == "region" else [*head, *tok.encode(t)]
                           for _, _, b, t in chunk]
                res = model.generate(enc, strategy, prompt=prompts, max_len=max_len, constraints=constraints)
            toks, lens = res.tokens.cpu().tolist(), res.lengths.cpu().tolist()
            for (i, k, b, t), row, m in zip(chunk, toks, lens):
                text = tok.decode(row[:m])
                out = {"image_id": str(store.image_ids[i]), "region": k, "box": b, "text": t, "generated": text}
                if task == "grounding":
                    pred = tokens_to_box([tok.id_to_token(j) for j in row[:m]], 1.0, 1.0, num_bins)
                    out["predicted_box"] = None if pred is None else [round(v, 6) for v in pred]
                    out["iou"] = 0.0 if pred is None else box_iou(pred, b)
                rows.append(out)
    finally:
        model.train(was)
    return rows


def region_scores(rows: Sequence[dict[str, Any]], task: str, *, lang: str = "en") -> dict[str, float]:
    """grounding: {"grounding_accuracy" (IoU >= 0.5), "mean_iou", "regions"}; region: the caption
    metrics of the generated texts against each region's text, plus "exact_match" (normalised)."""
    from seesay.data.tasks import normalise
    from seesay.locations import grounding_scores

    if task == "grounding":
        pred = [r["predicted_box"] for r in rows]
        s = grounding_scores(pred, [r["box"] for r in rows])
        return {"grounding_accuracy": s["accuracy"], "mean_iou": s["mean_iou"], "regions": float(s["n"])}
    from seesay.metrics import compute_scores

    res = {f"{r['image_id']}#{r['region']}": r["generated"] for r in rows}
    refs = {f"{r['image_id']}#{r['region']}": [r["text"]] for r in rows}
    out: dict[str, float] = {}
    if rows:
        report = compute_scores(res, refs, full=False, lang=lang)
        out = {k: float(v) for k, v in report.corpus.items() if v is not None and not math.isnan(float(v))}
    out["exact_match"] = sum(normalise(r["generated"]) == normalise(r["text"]) for r in rows) / max(len(rows), 1)
    out["regions"] = float(len(rows))
    return out


REGION_METRICS = ("grounding_accuracy", "mean_iou", "exact_match")


def loc_vocab_size(tokenizer: Any) -> int:
    """How many `<loc_i>` tokens (consecutive from `<loc_0>`) the tokenizer has (0 when none)."""
    find = getattr(tokenizer, "token_to_id", None)
    n = 0
    while callable(find) and find(f"<loc_{n}>") is not None:
        n += 1
    return n


def task_prompt(tokenizer: Any, task: str, *, text: str | None = None, box: Sequence[float] | None = None,
                num_bins: int | None = None) -> list[int]:
    """The prompt ids of one question: grounding `text`, or region `box` (relative x0, y0, x1, y1)."""
    num_bins = num_bins or loc_vocab_size(tokenizer)
    if task == "grounding":
        if not text or not text.strip():
            raise SeesayError("--task grounding needs --text (what to find, e.g. \"a red circle\")")
        return list(tokenizer.encode_prompt(f"{GROUNDING_PROMPT} {text.strip()}"))
    if box is None:
        raise SeesayError("--task region needs --box x0,y0,x1,y1 (pixels of the image)")
    first = loc_ids(tokenizer, num_bins)[0]
    return [*tokenizer.encode_prompt(REGION_PROMPT), *box_ids(box, num_bins, first)]
