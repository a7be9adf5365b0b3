"""`seesay evaluate`: caption a prepared split with a checkpoint and score it as COCO does.

Decodes the split in batches (beam search by default), writes COCO-format results
``[{"image_id", "caption"}]`` (with ``num_captions`` N > 1 each entry also lists the image's N
captions, best first: ``"captions": [{"caption", "score"}, ...]``; the metrics score the best), ``metrics.json`` (Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE; null
for metrics not computed) and a per-image file sorted worst first (lowest CIDEr-D, then lowest
BLEU-4), so the failures are at the top.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

from seesay.captioner import decode_batches, decode_split, evaluation_lang
from seesay.decoding import Beam, Constraints, Strategy
from seesay.errors import SeesayError

log = logging.getLogger("seesay.evaluate")


class Evaluation(NamedTuple):
    report: Any  # seesay.metrics.ScoreReport
    captions: dict[str, str]  # image id -> generated caption
    references: dict[str, list[str]]
    seconds: float


def _json_id(key: str) -> int | str:
    """COCO tools want integer image ids: decimal strings are written as integers."""
    return int(key) if key.isdigit() and str(int(key)) == key else key


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    strategy: Strategy = Beam(3),
    max_length: int = 50,
    batch_size: int = 32,
    metrics: str = "fast",
    output: str | Path | None = None,
    results: str | Path | None = None,
    per_image: str | Path | None = None,
    lang: str = "auto",
    tokenizer: str = "auto",
    spice_models: str | None = None,
    device: str | None = "auto",
    limit: int | None = None,
    progress: bool = False,
    num_captions: int = 1,
    constraints: Constraints | None = None,
) -> Evaluation:
    """Caption ``split`` of the prepared dataset ``data`` with ``checkpoint`` and score it.

    The language is `seesay.captioner.evaluation_lang`'s (the rule training's validation uses)
    unless ``lang`` names one. Files are written only where ``output`` (metrics.json),
    ``results`` and ``per_image`` say; they are checked before any decoding, and if writing still
    fails at the end the captions are saved to the temp folder (the error says where).
    ``num_captions`` N > 1 puts each image's N captions and scores in the results file (the
    metrics score the first, best one); ``constraints`` hold for every caption."""
    import torch

    from seesay.checkpoint import load_checkpoint
    from seesay.data.store import PreparedData
    from seesay.files import check_outputs, write_json_or_keep
    from seesay.metrics import compute_scores
    from seesay.metrics.io import metrics_body, per_image_rows
    from seesay.model import pick_device

    if metrics not in ("fast", "full"):
        raise SeesayError(f"--metrics must be fast or full, not {metrics!r}")
    for flag, value in (("--batch-size", batch_size), ("--max-length", max_length), ("--limit", limit),
                        ("--num-captions", num_captions)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SeesayError(f"{flag} must be an integer >= 1, not {value!r}")
    check_outputs({"--output": output, "--results": results, "--per-image": per_image})
    dev = pick_device(device)
    prepared = PreparedData(data)
    store = prepared.split(split)
    ck = load_checkpoint(checkpoint, map_location=dev)
    tok = ck.tokenizer
    if hasattr(prepared.vocab, "itos") and getattr(tok, "itos", None) != prepared.vocab.itos:
        log.warning("the checkpoint's vocabulary differs from %s/vocab.json; using the checkpoint's", data)
    if lang == "auto":
        lang = evaluation_lang(tok, prepared.manifest, store.references)
    t0 = time.perf_counter()
    ranked: dict[str, list[dict[str, Any]]] = {}
    with torch.inference_mode():
        if num_captions == 1 and (constraints is None or not constraints.active):
            captions = decode_split(ck.model, store, strategy, limit=limit, max_len=max_length,
                                    batch_size=batch_size, progress=progress)
        else:
            captions = {}
            n_images = len(store) if limit is None else min(int(limit), len(store))
            for batch in decode_batches(ck.model, store, strategy, indices=range(n_images), max_len=max_length,
                                        batch_size=batch_size, progress=progress, constraints=constraints,
                                        num_captions=num_captions):
                for j, i in enumerate(batch.indices):
                    key = str(store.image_ids[i])
                    captions[key] = batch.captions[j].caption
                    if batch.ranked is not None:
                        ranked[key] = [{"caption": c.caption, "score": round(c.score, 4)} for c in batch.ranked[j]]
    decode_s = time.perf_counter() - t0
    all_refs = store.references
    refs = {str(i): list(r) for i, r in zip(store.image_ids, all_refs) if str(i) in captions}
    report = compute_scores(
        captions, refs, full=metrics == "full", lang=lang, spice_models=spice_models, tokenizer=tokenizer
    )
    log.info(
        "captioned %d images in %.1f s; scored in %.1f s",
        len(captions),
        decode_s,
        time.perf_counter() - t0 - decode_s,
    )
    rows = [{"image_id": _json_id(k), "caption": c, **({"captions": ranked[k]} if k in ranked else {})}
            for k, c in captions.items()]
    safe_in = None  # once the results file is written, the captions are safe there
    for path, make, dumps in ((results, lambda: rows, dict(indent=1, ensure_ascii=False)),
                              (output, lambda: metrics_body(report), dict(indent=2)),
                              (per_image, lambda: per_image_rows(report, captions, refs),
                               dict(indent=1, ensure_ascii=False))):
        if path:
            write_json_or_keep(path, make(), keep=rows, what="the captions", safe_in=safe_in, **dumps)
            safe_in = safe_in or (path if path is results else None)
    return Evaluation(report, captions, refs, time.perf_counter() - t0)
