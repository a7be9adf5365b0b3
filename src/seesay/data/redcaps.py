"""The RedCaps reader (Desai et al. 2021: 12M image-text pairs from Reddit).

Layout, as the RedCaps downloader leaves it::

    ROOT/annotations/<subreddit>_<year>.json   {"info": {...}, "annotations": [{"image_id", "subreddit",
                                               "url", "caption", "raw_caption", "author", ...}, ...]}
    ROOT/images/<subreddit>/<image_id>.jpg

`text` picks the caption field: "caption" (RedCaps' cleaned text, the default) or "raw_caption"
(the post title as written). One record per annotation: image id = the annotation's image_id,
split by `formats.deterministic_split` over the image ids (5% val, 5% test), and the other fields
(subreddit, url, author, ...) kept in `extra`. Annotations without an image_id or text, or with a
subreddit that is not a plain folder name, are bad items (`Record.bad`: `seesay prepare` lists and
counts them); images that were never downloaded are skipped by prepare as "file not found" (RedCaps
URLs die: raise `--max-skip-fraction` for partial downloads). A file that is not JSON, or has no
"annotations" list, is a one-line SeesayError naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

from seesay.data.formats import Record, deterministic_split, load_json
from seesay.errors import SeesayError

TEXT_FIELDS = ("caption", "raw_caption")


def read_redcaps(root: str | os.PathLike, *, text: str = "caption", annotations: str | os.PathLike | None = None
                 ) -> list[Record]:
    """Records of every annotation file under ROOT/annotations (or only `annotations`, one file)."""
    if text not in TEXT_FIELDS:
        raise SeesayError(f"--redcaps-text must be one of {', '.join(TEXT_FIELDS)}, not {text!r}")
    root = Path(root)
    if annotations is not None:
        files = [Path(annotations)]
    else:
        folder = root / "annotations"
        if not folder.is_dir():
            raise SeesayError(f"{root}: no annotations/ folder (expected annotations/<subreddit>_<year>.json)")
        files = sorted(folder.glob("*.json"))
        if not files:
            raise SeesayError(f"{folder}: no <subreddit>_<year>.json annotation files")
    images = root / "images"
    records: list[Record] = []
    seen: set[str] = set()
    for path in files:
        data = load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
            raise SeesayError(f'{path}: not a RedCaps annotation file (expected {{"info", "annotations": [...]}})')
        for i, a in enumerate(data["annotations"]):
            where = f"{path.name}#{i}"
            if not isinstance(a, dict):
                records.append(Record(str(path), where, "train", [], {}, 0, str(images), bad="annotation is not an object"))
                continue
            image_id, sub = a.get("image_id"), a.get("subreddit")
            caption = a.get(text)
            why = None
            if not isinstance(image_id, str) or not image_id.strip() or "/" in image_id or image_id in (".", ".."):
                why = "missing image_id"
            elif not isinstance(sub, str) or not sub or "/" in sub or "\\" in sub or sub in (".", ".."):
                why = "missing subreddit"
            elif not isinstance(caption, str) or not caption.strip():
                why = f"missing {text}"
            elif image_id in seen:
                why = "duplicate image_id"
            if why is not None:
                iid = image_id if isinstance(image_id, str) and image_id else where
                records.append(Record(str(path), iid, "train", [], {}, 0, str(images), bad=why))
                continue
            seen.add(image_id)
            extra = {k: v for k, v in a.items() if k not in ("image_id", "caption", "raw_caption")}
            records.append(Record(str(images / sub / f"{image_id}.jpg"), image_id, "train",
                                  [" ".join(caption.split())], extra, 0, str(images)))
    assign = deterministic_split([r.image_id for r in records if r.bad is None])
    for r in records:
        if r.bad is None:
            r.split = assign[r.image_id]
    if not records:
        raise SeesayError(f"{root}: the RedCaps annotation files hold no annotations")
    return records
