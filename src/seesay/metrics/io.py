"""Reading results and reference files, writing metrics.json and the per-image file."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from seesay.errors import SeesayError
from seesay.files import check_outputs, write_json_atomic, write_json_or_keep
from seesay.metrics.core import METRIC_KEYS, ScoreReport, compute_scores

log = logging.getLogger("seesay.metrics")


def _read_json(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise SeesayError(f"{p}: no such file")
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SeesayError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from e
    except UnicodeDecodeError as e:
        raise SeesayError(f"{p}: not UTF-8 text") from e


def load_results(path: str | Path) -> dict[str, str]:
    """A COCO-format results file ``[{"image_id": ..., "caption": "..."}]`` -> id -> caption.

    Image ids are compared as strings. A duplicate image id is an error (COCO evaluation
    would fail on it too)."""
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data = data["annotations"]
    if not isinstance(data, list):
        raise SeesayError(f'{path}: expected a JSON list of {{"image_id", "caption"}} objects')
    out: dict[str, str] = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "image_id" not in item or not isinstance(item.get("caption"), str):
            raise SeesayError(f'{path}: entry {i} is not an object with "image_id" and a string "caption"')
        key = str(item["image_id"])
        if key in out:
            raise SeesayError(f"{path}: image_id {key} appears more than once")
        out[key] = item["caption"]
    if not out:
        raise SeesayError(f"{path}: no results")
    return out


class References:
    """Reference captions (id -> list of captions) and aliases (other names of an image)."""

    def __init__(
        self, captions: dict[str, list[str]], aliases: dict[str, str] | None = None, source: str = ""
    ):
        self.captions = captions
        self.aliases = aliases or {}
        self.source = source

    def resolve(self, key: str) -> str | None:
        if key in self.captions:
            return key
        return self.aliases.get(key)


def load_references(path: str | Path, split: str | None = None) -> References:
    """References from a COCO captions annotation file (``{"annotations": [{"image_id",
    "caption"}]}``), a Karpathy split file (``{"images": [{"sentences": [{"raw"}], "split",
    "cocoid"|"imgid", "filename"}]}``, restricted to ``split`` when given), an AI Challenger
    file (``[{"image_id", "caption": [...]}]``) or a plain ``{image_id: [captions]}`` object."""
    data = _read_json(path)
    caps: dict[str, list[str]] = {}
    aliases: dict[str, str] = {}
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise SeesayError(f'{path}: annotation {i} lacks "image_id" or a string "caption"')
            caps.setdefault(str(ann["image_id"]), []).append(ann["caption"])
        for img in data.get("images", []) or []:
            if isinstance(img, dict) and "id" in img and img.get("file_name"):
                aliases[str(img["file_name"])] = str(img["id"])
        kind = "COCO annotations"
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict) or not isinstance(img.get("sentences"), list):
                raise SeesayError(f'{path}: image {i} lacks a "sentences" list (not a Karpathy split file?)')
            if split is not None and img.get("split") != split:
                continue
            ident = img.get("cocoid", img.get("imgid", img.get("filename")))
            if ident is None:
                raise SeesayError(f"{path}: image {i} has no cocoid, imgid or filename")
            key = str(ident)
            sents = []
            for s in img["sentences"]:
                raw = s.get("raw") if isinstance(s, dict) else None
                if raw is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                    raw = " ".join(s["tokens"])
                if not isinstance(raw, str):
                    raise SeesayError(f'{path}: image {key} has a sentence without "raw" text')
                sents.append(raw)
            caps[key] = sents
            for alias_field in ("imgid", "filename", "id"):
                if alias_field in img and str(img[alias_field]) != key:
                    aliases[str(img[alias_field])] = key
            if img.get("filename"):
                aliases[Path(str(img["filename"])).stem] = key
        kind = f"Karpathy split {split}" if split else "Karpathy file (all splits)"
        if split is not None and not caps:
            raise SeesayError(f"{path}: no images in split {split!r}")
    elif isinstance(data, list):
        for i, item in enumerate(data):
            if not isinstance(item, dict) or "image_id" not in item:
                raise SeesayError(f'{path}: entry {i} lacks "image_id"')
            c = item.get("caption")
            c = [c] if isinstance(c, str) else c
            if not isinstance(c, list) or not all(isinstance(x, str) for x in c):
                raise SeesayError(f"{path}: entry {i} has no caption list")
            caps.setdefault(str(item["image_id"]), []).extend(c)
            aliases[Path(str(item["image_id"])).stem] = str(item["image_id"])
        kind = "list of {image_id, caption}"
    elif isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        caps = {str(k): list(v) for k, v in data.items()}
        kind = "{image_id: [captions]}"
    else:
        raise SeesayError(
            f"{path}: not a COCO captions annotation file, a Karpathy split file or an {{image_id: [captions]}} object"
        )
    if not caps:
        raise SeesayError(f"{path}: no reference captions")
    return References(caps, aliases, kind)


def match_results(results: Mapping[str, str], refs: References, *, path: str = "results") -> dict[str, str]:
    """Results keyed by the reference ids (aliases resolved); unknown ids are an error."""
    out: dict[str, str] = {}
    unknown = []
    for key, cap in results.items():
        k = refs.resolve(key)
        if k is None:
            unknown.append(key)
        else:
            out[k] = cap
    if unknown:
        more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise SeesayError(
            f"{path}: {len(unknown)} image id(s) not in the references: {', '.join(unknown[:3])}{more}"
        )
    missing = len(refs.captions) - len(out)
    if missing > 0:
        log.warning(
            "%d of %d reference images have no result and are not scored", missing, len(refs.captions)
        )
    return out


def _clean(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def metrics_body(report: ScoreReport) -> dict[str, float | None]:
    """metrics.json's content: keys Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE (null when not computed)."""
    return {k: _clean(report.corpus.get(k)) for k in METRIC_KEYS}


def write_metrics(path: str | Path, report: ScoreReport) -> None:
    """metrics.json: the corpus scores, keys Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE (null when not computed)."""
    write_json_atomic(path, metrics_body(report), indent=2)


def per_image_rows(
    report: ScoreReport, results: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> list[dict[str, Any]]:
    """One row per image: id, caption, references and its scores, worst first (lowest CIDEr-D,
    then lowest BLEU-4)."""
    rows = []
    for key, scores in report.per_image.items():
        row: dict[str, Any] = {"image_id": key, "caption": results[key], "references": list(references[key])}
        row.update({m: _clean(scores[m]) for m in METRIC_KEYS if m in scores})
        rows.append(row)
    rows.sort(key=lambda r: (r.get("CIDEr") or 0.0, r.get("Bleu_4") or 0.0, r["image_id"]))
    return rows


def write_per_image(path: str | Path, rows: list[dict[str, Any]]) -> None:
    write_json_atomic(path, rows, indent=1, ensure_ascii=False)


# -- output files: refused up front when they cannot be written; the work kept when writing fails --


def format_report(report: ScoreReport) -> str:
    """A small table of the corpus scores for the terminal."""
    lines = []
    for k in METRIC_KEYS:
        v = report.corpus.get(k)
        lines.append(f"{k:8s} {'-' if v is None else f'{v:.4f}'}")
    return "\n".join(lines)


def score_files(
    results_path: str | Path,
    references_path: str | Path,
    *,
    split: str | None = None,
    full: bool = False,
    lang: str = "en",
    tokenizer: str = "auto",
    spice_models: str | None = None,
    output: str | Path | None = None,
    per_image: str | Path | None = None,
) -> ScoreReport:
    """Score a COCO-format results file against a reference file (what ``seesay score`` does).

    The output files are checked before scoring; if writing them still fails, the scores are
    saved to the temp folder and the error says where."""
    check_outputs({"--output": output, "--per-image": per_image})
    results = load_results(results_path)
    refs = load_references(references_path, split)
    matched = match_results(results, refs, path=str(results_path))
    report = compute_scores(
        matched, refs.captions, full=full, lang=lang, spice_models=spice_models, tokenizer=tokenizer
    )
    body = metrics_body(report)
    rows = per_image_rows(report, matched, refs.captions) if per_image else None
    keep = {"metrics": body, **({"per_image": rows} if rows is not None else {})}
    if output:
        write_json_or_keep(output, body, keep=keep, what="the scores", indent=2)
    if per_image:
        write_json_or_keep(per_image, rows, keep=keep, what="the scores", indent=1, ensure_ascii=False)
    return report
