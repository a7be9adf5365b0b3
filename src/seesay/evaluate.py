"""`seesay evaluate`: caption a prepared split with a checkpoint and score it as COCO does.

A region dataset (task "region" or "grounding", `seesay.data.region_tasks`) is scored per region
(`RegionEvaluation`): grounding by accuracy at IoU >= 0.5 and mean IoU, region captions by the
caption metrics against each region's text plus exact match; the per-item file is JSON lines.
A classification dataset (manifest task "classify", `seesay.data.tasks`) is scored by accuracy
instead (`evaluate_classification`): top-1 of the generated text against "a photo of <label>" and
closed-set accuracy (the likeliest label under teacher forcing); the per-image file is then JSON
lines (image, generated, predicted, closed_set, gold).

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

from seesay.captioner import decode_batches, decode_split, evaluation_lang, packed_request, sequence_logprobs
from seesay.decoding import Beam, Constraints, Strategy
from seesay.errors import SeesayError

log = logging.getLogger("seesay.evaluate")


class Evaluation(NamedTuple):
    report: Any  # seesay.metrics.ScoreReport
    captions: dict[str, str]  # image id -> generated caption
    references: dict[str, list[str]]
    seconds: float


def _classify(model: Any, prepared: Any, store: Any, *, output: Any, results: Any, per_image: Any,
              **kwargs: Any) -> ClassifyEvaluation:
    """`evaluate_classification`, then metrics.json, the results and the per-image JSON lines."""
    import json

    from seesay.files import write_json_or_keep, write_text_atomic

    ev = evaluate_classification(model, prepared, store, **kwargs)
    body = {"task": "classify", "images": len(ev.rows), "accuracy": ev.accuracy,
            "closed_set_accuracy": ev.closed_set_accuracy}
    captions = [{"image_id": _json_id(k), "caption": c} for k, c in ev.captions.items()]
    if results:
        write_json_or_keep(results, captions, keep=captions, what="the captions", indent=1, ensure_ascii=False)
    if output:
        write_json_or_keep(output, body, keep=ev.rows, what="the per-image results", indent=2)
    if per_image:
        write_text_atomic(per_image, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ev.rows))
    return ev


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
) -> Evaluation | ClassifyEvaluation | RegionEvaluation:
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
    if prepared.manifest.get("task") in ("region", "grounding"):  # per region (seesay.data.region_tasks)
        return evaluate_regions(ck.model, prepared, store, strategy=strategy, max_length=max_length,
                                batch_size=batch_size, limit=limit, output=output, results=results,
                                per_image=per_image, lang="en" if lang == "auto" else lang)
    if prepared.manifest.get("task") == "classify":  # accuracy instead of caption metrics
        return _classify(ck.model, prepared, store, strategy=strategy, max_length=max_length, batch_size=batch_size,
                         limit=limit, progress=progress, output=output, results=results, per_image=per_image)
    if lang == "auto":
        lang = evaluation_lang(tok, prepared.manifest, store.references)
    from seesay.data.region_tasks import answer_constraints
    from seesay.data.tasks import dataset_task, reads_prompt

    constraints = answer_constraints(tok, prepared.manifest.get("task"), constraints)  # no <loc_i>/<img_i> words
    # a prompt-reading model (t5) reads the dataset's prompt, as it did in training and validation
    prompt_text = dataset_task(prepared.manifest).prompt if reads_prompt(ck.model) else None
    prompt = list(tok.encode_prompt(prompt_text)) if prompt_text else None
    t0 = time.perf_counter()
    ranked: dict[str, list[dict[str, Any]]] = {}
    with torch.inference_mode():
        if num_captions == 1 and (constraints is None or not constraints.active) and prompt is None:
            captions = decode_split(ck.model, store, strategy, limit=limit, max_len=max_length,
                                    batch_size=batch_size, progress=progress)
        else:
            captions = {}
            n_images = len(store) if limit is None else min(int(limit), len(store))
            for batch in decode_batches(ck.model, store, strategy, indices=range(n_images), max_len=max_length,
                                        batch_size=batch_size, progress=progress, constraints=constraints,
                                        num_captions=num_captions, prompt=prompt):
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


class RegionEvaluation(NamedTuple):
    """`seesay evaluate` on a region dataset (task region or grounding, see seesay.data.region_tasks)."""

    task: str
    scores: dict[str, float]  # grounding_accuracy, mean_iou | caption metrics, exact_match; and regions
    rows: list[dict[str, Any]]  # per region: image_id, region, box, text, generated (+ predicted_box, iou)
    seconds: float

    @property
    def captions(self) -> dict[str, str]:
        return {f"{r['image_id']}#{r['region']}": r["generated"] for r in self.rows}


def evaluate_regions(model: Any, prepared: Any, store: Any, *, strategy: Strategy, max_length: int, batch_size: int,
                     limit: int | None = None, output: Any = None, results: Any = None, per_image: Any = None,
                     lang: str = "en") -> RegionEvaluation:
    """Answer every region of the split's images (the first `limit`), score them, write the files."""
    import json

    from seesay.data.region_tasks import decode_regions, region_scores
    from seesay.data.tasks import dataset_task
    from seesay.files import write_json_or_keep, write_text_atomic

    task = dataset_task(prepared.manifest)
    t0 = time.perf_counter()
    rows = decode_regions(model, store, task.task, task.prompt or "", int(task.loc_vocab_size), strategy=strategy,
                          max_len=max_length, batch_size=batch_size, limit=limit)
    scores = region_scores(rows, task.task, lang=lang)
    if results:
        write_json_or_keep(results, rows, keep=rows, what="the answers", indent=1, ensure_ascii=False)
    if output:
        write_json_or_keep(output, {"task": task.task, **scores}, keep=rows, what="the answers", indent=2)
    if per_image:
        write_text_atomic(per_image, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return RegionEvaluation(task.task, scores, rows, time.perf_counter() - t0)


class ClassifyEvaluation(NamedTuple):
    """`seesay evaluate` on a classification dataset (task classify, see seesay.data.tasks)."""

    accuracy: float  # top-1: the generated text is "a photo of <gold label>" (normalised)
    closed_set_accuracy: float  # the label whose target text is likeliest (teacher forcing) is the gold one
    captions: dict[str, str]  # image id -> generated text
    rows: list[dict[str, Any]]  # per image: image, image_id, generated, predicted, gold, correct, closed_set_correct
    seconds: float


def _label_logprobs(model: Any, enc: Any, targets: Any, target_lengths: Any, prompt: Any, max_rows: int) -> Any:
    """[B, L] log-likelihood (summed over tokens, eos included) of each of L target rows for each of B images."""
    import torch

    n_images, n_labels = enc.grid.shape[0], targets.shape[0]
    out = torch.empty((n_images, n_labels), dtype=torch.float32)
    step = max(1, max_rows // max(n_images, 1))
    for start in range(0, n_labels, step):
        tok, lens = targets[start: start + step], target_lengths[start: start + step]
        k = tok.shape[0]
        image_rows = torch.arange(n_images, device=tok.device).repeat_interleave(k)  # (B*k,) image-major
        rows_tok, rows_len = tok.repeat(n_images, 1), lens.repeat(n_images)
        extra = packed_request(model)  # the real positions' logits only, where the model can
        if prompt is not None:
            extra["prompt"] = prompt.index_select(0, image_rows.to(prompt.device))
        res = model(enc, rows_tok, rows_len, image_rows, **extra)
        logp = sequence_logprobs(res.logits, rows_tok, rows_len, getattr(res, "positions", None))  # (B*k,)
        out[:, start: start + k] = logp.view(n_images, k).cpu()
    return out


def evaluate_classification(model: Any, prepared: Any, store: Any, *, strategy: Strategy, max_length: int,
                            batch_size: int, limit: int | None = None, progress: bool = False,
                            max_rows: int = 512) -> ClassifyEvaluation:
    """Top-1 accuracy of the generated text and closed-set accuracy over the dataset's labels.

    Each image is decoded (with the dataset's prompt for models that read one) and its text compared,
    normalised (`seesay.data.tasks.normalise`), with "a photo of <gold label>"; then every label's
    target text is scored under teacher forcing, `max_rows` caption rows at a time, and the likeliest
    (sum of token log-probabilities, eos included) is the closed-set prediction."""
    import torch

    from seesay.captioner import decode_batches
    from seesay.data.classify_formats import target_text
    from seesay.data.tasks import dataset_task, normalise, pad_rows, reads_prompt

    task = dataset_task(prepared.manifest)
    labels = list(task.labels or [])
    if not labels:
        raise SeesayError(f"{prepared.root}/manifest.json: a classify dataset without labels; prepare it again")
    tok = model.tokenizer
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    texts = [target_text(label) for label in labels]
    ids = [[tok.bos_id, *tok.encode(t), tok.eos_id] for t in texts]
    targets = pad_rows(ids, tok.pad_id, 2).to(device)
    target_lengths = torch.tensor([len(r) for r in ids], dtype=torch.long, device=device)
    by_text = {normalise(t): label for t, label in zip(texts, labels)}
    prompt_text = task.prompt if reads_prompt(model) else None
    prompt_ids = list(tok.encode_prompt(prompt_text)) if prompt_text else None
    gold = [(m.get("extra") or {}).get("label") for m in store.meta]
    n = len(store) if limit is None else min(int(limit), len(store))
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    captions: dict[str, str] = {}
    for batch in decode_batches(model, store, strategy, indices=range(n), max_len=max_length, batch_size=batch_size,
                                prompt=prompt_ids, progress=progress):
        x = torch.from_numpy(batch.images.transpose(0, 3, 1, 2).copy()).to(device)
        with torch.no_grad():
            was = model.training
            model.eval()
            try:
                enc = model.encode(x)
                prompt = None if prompt_ids is None else pad_rows([prompt_ids] * len(batch.indices),
                                                                  tok.pad_id).to(device)
                scores = _label_logprobs(model, enc, targets, target_lengths, prompt, max_rows)
            finally:
                model.train(was)
        best = scores.argmax(1).tolist()
        for j, i in enumerate(batch.indices):
            text = batch.captions[j].caption
            image_id = str(store.image_ids[i])
            captions[image_id] = text
            predicted = by_text.get(normalise(text))
            rows.append({"image": store.meta[i].get("image"), "image_id": image_id, "generated": text,
                         "predicted": predicted, "closed_set": labels[best[j]], "gold": gold[i],
                         "correct": predicted is not None and predicted == gold[i],
                         "closed_set_correct": labels[best[j]] == gold[i]})
    total = max(len(rows), 1)
    return ClassifyEvaluation(sum(r["correct"] for r in rows) / total, sum(r["closed_set_correct"] for r in rows) / total,
                              captions, rows, time.perf_counter() - t0)
