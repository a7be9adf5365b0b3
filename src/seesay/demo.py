"""`seesay demo`: the whole pipeline on the built-in shapes dataset, on a CPU, in minutes.

Why it exists: a newcomer (or `make demo` on a fresh machine) should see seesay make data,
prepare it, train a soft-attention captioner, evaluate it and explain its captions, with no
download and no GPU, and should be able to judge the result: the test scores are printed
beside a trivial baseline that gives every test image the single most common training
caption. A model that learned nothing about the pictures scores about as well as that.

Steps and what they leave in OUTPUT (default `demo_out/`):

1. `shapes/`   the built-in dataset (`seesay.data.synth.make_shapes`; Karpathy JSON + PNGs).
               Skipped when a dataset with the same image count and seed is already there.
2. `data/`     the prepared dataset (`seesay.data.prepare.prepare_dataset`), which itself
               skips work already done with the same inputs and resumes an interrupted run.
3. `run/`      training (`seesay.train.caption_task.train_captioner`) with `DEMO_RECIPE`,
               stopped on a wall-clock budget (`minutes`). Starts fresh unless `resume`.
4. `test_metrics.json`, `test_captions.json`, `test_per_image.json`: the test split captioned
   with `run/best` (`seesay.evaluate.evaluate_checkpoint`) and scored.
   `baseline_metrics.json`: the most-common-caption baseline, scored the same way.
5. `attention/<image id>.png`: attention maps for a few test images.
6. `demo_summary.json`: everything `run_demo` returns (scores, baseline, samples, paths).

Training budget: `train.max_minutes` (the loop starts no epoch that would end past it, so
the run stops at an epoch boundary and `--resume` stays exact).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seesay.errors import SeesayError
from seesay.files import write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_NUM_IMAGES = 2000
DEFAULT_MINUTES = 5.0
DEFAULT_THREADS = 1  # see run_demo
SYNTH_SIZE = 128  # drawn size: attention pictures look better at 128 px than at the model's 64
SCORE_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")

# The demo's recipe; configs/shapes_demo.yaml holds the same values (a test keeps them equal),
# so `seesay train --config configs/shapes_demo.yaml` reproduces the demo's model.
DEMO_RECIPE: dict[str, dict[str, Any]] = {
    "data": {"workers": 0},
    "encoder": {
        "name": "small_cnn",
        "fine_tune": True,
        "lr": 1.0e-3,
        "width": 64,
        "encoded_size": 8,
        "image_size": 64,
    },
    "decoder": {
        "name": "soft_attention",
        "lr": 2.0e-3,
        # not Xu et al.'s 1.0: with ~10 words over 64 cells it spreads every word's attention
        # (docs/visualize.md: 43 % vs 20 % of peaks in the object; test CIDEr 2.56 vs 2.18 in 5 min)
        "alpha_c": 0.0,
        "embed_dim": 64,
        "attention_dim": 64,
        "decoder_dim": 128,
        "dropout": 0.3,
    },
    "train": {
        "epochs": 40,
        "batch_size": 80,
        "grad_clip": 5.0,
        "patience": 6,
        "lr_decay_patience": 2,
        "lr_decay": 0.5,
        "select_metric": "CIDEr",
        "val_beam_size": 1,
        "val_max_len": 20,
        "seed": 0,
    },
}
PREPARED_SIZE = 64  # prepared image side; equals the encoder's image_size above


def demo_config(overrides: Sequence[str] = (), config: str | os.PathLike | None = None) -> Any:
    """The demo's training `Config`: DEMO_RECIPE, then a YAML recipe, then `section.key=value`s."""
    from seesay.config import Config, apply_overrides, load_yaml, merge_into

    cfg = Config()
    merge_into(cfg, copy.deepcopy(DEMO_RECIPE), source="demo recipe")
    if config is not None:
        merge_into(cfg, load_yaml(config), source=str(config))
    return apply_overrides(cfg, list(overrides))


# ---------------------------------------------------------------------------------------------
# steps


def _write_json(path: Path, obj: Any) -> None:
    write_json_atomic(path, obj, indent=1, ensure_ascii=False)


def _existing_shapes(path: Path, num_images: int, seed: int, image_size: int) -> bool:
    """True when `path` is a complete shapes dataset made with these settings."""
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = data["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if data.get("seed") != seed or len(images) != num_images:
        return False
    if any(img.get("width") != image_size for img in images[:1]):
        return False
    image_dir = path.parent
    return all((image_dir / img["filepath"] / img["filename"]).is_file() for img in images)


def make_data(output: Path, *, num_images: int, seed: int, progress: bool) -> tuple[Path, dict[str, Any]]:
    """Steps 1 and 2: the shapes dataset and its prepared form; returns (DATA_DIR, manifest)."""
    from seesay.data.prepare import prepare_dataset
    from seesay.data.synth import JSON_NAME, make_shapes, split_counts

    raw = output / "shapes"
    annotations = raw / JSON_NAME
    if _existing_shapes(annotations, num_images, seed, SYNTH_SIZE):
        log.info("dataset: %s already has %d shapes images (seed %d); not remade", raw, num_images, seed)
    else:
        t0 = time.perf_counter()
        annotations = make_shapes(raw, num_images=num_images, seed=seed, image_size=SYNTH_SIZE)
        c = split_counts(annotations)
        log.info("dataset: drew %d shapes images (train %d / val %d / test %d, 5 captions each) in %s in %.0f s",
                 num_images, c["train"], c["val"], c["test"], raw, time.perf_counter() - t0)
    data_dir = output / "data"
    t0 = time.perf_counter()
    manifest = prepare_dataset("karpathy", data_dir, annotations=annotations, images=raw, image_size=PREPARED_SIZE,
                               min_word_freq=1, seed=seed, progress=progress,
                               workers=min(os.cpu_count() or 1, 4))
    counts = ", ".join(f"{k} {v['images']}" for k, v in manifest["splits"].items())
    log.info("prepared: %s (%s images at %d px; vocabulary %s words) in %.0f s", data_dir, counts, PREPARED_SIZE,
             manifest.get("vocab_size", "?"), time.perf_counter() - t0)
    return data_dir, manifest


class _DropSpiceNote(logging.Filter):
    """SPICE needs the Stanford CoreNLP models, which the demo never has: say so once, not per scoring."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SPICE not computed")


def train_demo_model(cfg: Any, minutes: float, *, resume: bool = False) -> dict[str, Any]:
    """Step 3: train `cfg` for about `minutes` of wall-clock time (see the module doc)."""
    from seesay.train.caption_task import train_captioner

    run_dir = Path(cfg.train.output)
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # the demo's own run folder: a fresh run leaves nothing stale
    budget = max(float(minutes), 0.0) * 60.0
    t0 = time.perf_counter()
    cfg.train.max_minutes = float(minutes)
    cfg.train.resume = resume
    state = train_captioner(cfg)
    if getattr(state, "stopped_by_signal", False):  # Ctrl-C: the training step finished and run/last was saved
        log.warning("training stopped; `seesay demo --resume` continues it")
        raise KeyboardInterrupt
    epochs = int(state.epoch)
    seconds = time.perf_counter() - t0
    best_score, best_epoch, stopped = state.best_score, state.best_epoch, state.stopped_early
    log.info("trained %d epochs in %.1f min (budget %.1f min); best val %s %.3f at epoch %d",
             epochs, seconds / 60, budget / 60, cfg.train.select_metric, best_score, best_epoch)
    return {"epochs": epochs, "seconds": round(seconds, 1), "best_epoch": int(best_epoch),
            "best_val": {cfg.train.select_metric: float(best_score)}, "stopped_early": bool(stopped),
            "run_dir": str(run_dir)}


def most_common_caption(references: Sequence[Sequence[str]]) -> str:
    """The caption given most often in `references` (ties: the one seen first).

    Captions are compared after lower-casing and collapsing white space, the way the
    scorers see them, and returned as first written.
    """
    counts: Counter[str] = Counter()
    first: dict[str, str] = {}
    for refs in references:
        for r in refs:
            key = " ".join(str(r).lower().split())
            if key:
                counts[key] += 1
                first.setdefault(key, str(r).strip())
    if not counts:
        raise SeesayError("no training captions to build the baseline from")
    return first[counts.most_common(1)[0][0]]


def baseline_scores(data_dir: Path, *, metrics: str, split: str = "test") -> dict[str, Any]:
    """Step 4b: every `split` image captioned with the most common training caption, scored."""
    from seesay.data.store import PreparedData
    from seesay.metrics import compute_scores

    prepared = PreparedData(data_dir)
    caption = most_common_caption(prepared.split("train").references)
    store = prepared.split(split)
    refs = {str(i): list(r) for i, r in zip(store.image_ids, store.references)}
    report = compute_scores(dict.fromkeys(refs, caption), refs, full=metrics == "full")
    return {"caption": caption, "scores": dict(report.corpus)}


def java_metrics_work() -> bool:
    """METEOR needs java and the pycocoevalcap jars; decide once instead of warning per run."""
    from seesay.metrics import java as jv

    return jv.java_path() is not None and jv.pycocoevalcap_dir() is not None


def caption_samples(checkpoint: Path, data_dir: Path, output: Path, captions: dict[str, str], *,
                    num_samples: int, beam_size: int, attention: bool) -> list[dict[str, Any]]:
    """Step 5: a few test images with their generated caption, one reference and an attention map."""
    from seesay.data.store import PreparedData
    from seesay.data.synth import HELD_OUT_PAIRS

    store = PreparedData(data_dir).split("test")
    n = min(num_samples, len(store))
    # spread over the split: the first test images all carry a held-out pair (see synth.py)
    picks = sorted({i * len(store) // n for i in range(n)}) if n else []
    held = {tuple(p) for p in HELD_OUT_PAIRS}
    samples = []
    ckpt = None
    if attention and n:
        from seesay.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint)
    for i in picks:
        image_id = str(store.image_ids[i])
        meta = store.meta[i]
        image = str(meta.get("image", ""))
        objects = (meta.get("extra") or {}).get("objects") or []
        item: dict[str, Any] = {"image_id": image_id, "image": image, "caption": captions.get(image_id, ""),
                                "reference": store.references[i][0], "attention": None,
                                "held_out_pair": any((o.get("color"), o.get("shape")) in held for o in objects)}
        if ckpt is not None:
            try:
                from seesay.viz.visualize import visualize_image

                out = output / "attention" / f"{Path(image).stem or image_id}.png"
                vis = visualize_image(ckpt, image, out, beam_size=beam_size, max_len=30)
                item["attention"] = str(vis.output)
            except (SeesayError, ImportError) as e:
                log.warning("no attention map for %s: %s", image, e)
        samples.append(item)
    return samples


# ---------------------------------------------------------------------------------------------


def run_demo(
    output: str | os.PathLike = "demo_out",
    *,
    minutes: float = DEFAULT_MINUTES,
    num_images: int = DEFAULT_NUM_IMAGES,
    seed: int = 0,
    progress: bool = True,
    resume: bool = False,
    metrics: str = "auto",
    beam_size: int = 3,
    num_samples: int = 4,
    attention: bool = True,
    config: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    threads: int | None = DEFAULT_THREADS,
) -> dict[str, Any]:
    """Make, prepare, train, evaluate and explain; return scores, baseline, samples and paths.

    `minutes` is the training budget (the other steps take well under a minute more at the
    default size). `metrics`: "fast" (BLEU, ROUGE-L, CIDEr in Python), "full" (adds METEOR
    via java) or "auto" (full when java and the pycocoevalcap jars are present). `config` and
    `overrides` change the training recipe (`DEMO_RECIPE`) like `seesay train` does.
    `threads`: torch intra-op threads while the demo runs (restored afterwards); None or 0
    keeps torch's default. One thread is the default because this model's operations are
    small: a second thread gains little on an idle machine and, on a busy one, costs several
    times the CPU in spin-waiting (measured: 0.1 vs 0.8-2.4 CPU-s per step).
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run_demo(output, minutes=minutes, num_images=num_images, seed=seed, progress=progress,
                         resume=resume, metrics=metrics, beam_size=beam_size, num_samples=num_samples,
                         attention=attention, config=config, overrides=overrides)
    finally:
        torch.set_num_threads(previous)


def _run_demo(output: str | os.PathLike, *, minutes: float, num_images: int, seed: int, progress: bool,
              resume: bool, metrics: str, beam_size: int, num_samples: int, attention: bool,
              config: str | os.PathLike | None, overrides: Sequence[str]) -> dict[str, Any]:
    from seesay.decoding import strategy_from_options
    from seesay.evaluate import evaluate_checkpoint

    if num_images < 20:
        raise SeesayError(f"--num-images must be at least 20 (train, val and test all need images), got {num_images}")
    if minutes <= 0:
        raise SeesayError(f"--minutes must be positive, got {minutes}")
    if metrics not in ("auto", "fast", "full"):
        raise SeesayError(f"--metrics must be auto, fast or full, not {metrics!r}")
    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SeesayError(f"{out}: cannot create the output directory ({e.strerror or e})") from None
    t_start = time.perf_counter()

    data_dir, manifest = make_data(out, num_images=num_images, seed=seed, progress=progress)

    cfg = demo_config(overrides, config)
    cfg.data.path = str(data_dir)
    cfg.train.output = str(out / "run")
    cfg.train.progress = progress
    cfg.train.seed = seed
    training = train_demo_model(cfg, minutes, resume=resume)

    if metrics == "auto":
        metrics = "full" if java_metrics_work() else "fast"
    best = out / "run" / "best"
    t0 = time.perf_counter()
    metrics_log = logging.getLogger("seesay.metrics")
    quiet = _DropSpiceNote()
    metrics_log.addFilter(quiet)
    try:
        ev = evaluate_checkpoint(best, data_dir, split="test", strategy=strategy_from_options(beam_size=beam_size),
                                 max_length=30, metrics=metrics,
                                 output=out / "test_metrics.json", results=out / "test_captions.json",
                                 per_image=out / "test_per_image.json", device="cpu")
        baseline = baseline_scores(data_dir, metrics=metrics)
    finally:
        metrics_log.removeFilter(quiet)
    scores = dict(ev.report.corpus)
    _write_json(out / "baseline_metrics.json", {"caption": baseline["caption"], **baseline["scores"]})
    log.info("evaluated %d test images (beam %d, %s metrics) in %.0f s", len(ev.captions), beam_size, metrics,
             time.perf_counter() - t0)

    samples = caption_samples(best, data_dir, out, ev.captions, num_samples=num_samples, beam_size=beam_size,
                              attention=attention)
    result = {
        "output": str(out),
        "dataset": {"num_images": num_images, "seed": seed, "image_size": PREPARED_SIZE,
                    "splits": {k: int(v["images"]) for k, v in manifest["splits"].items()},
                    "vocab_size": manifest.get("vocab_size"), "data_dir": str(data_dir)},
        "training": training,
        "checkpoint": str(best),
        "metrics": metrics,
        "beam_size": beam_size,
        "scores": scores,
        "baseline": baseline,
        "samples": samples,
        "files": {"metrics": str(out / "test_metrics.json"), "captions": str(out / "test_captions.json"),
                  "per_image": str(out / "test_per_image.json"), "baseline": str(out / "baseline_metrics.json"),
                  "summary": str(out / "demo_summary.json")},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    _write_json(out / "demo_summary.json", result)
    return result


def format_summary(result: dict[str, Any]) -> str:
    """The demo's closing report as text (what `seesay demo` prints)."""
    d, tr = result["dataset"], result["training"]
    lines = [
        "",
        f"seesay demo: done in {result['seconds'] / 60:.1f} min; everything is in {result['output']}/",
        f"data     {d['num_images']} shapes images -> " + ", ".join(f"{k} {v}" for k, v in d["splits"].items())
        + f" (prepared at {d['image_size']} px, {d['vocab_size']} words)",
        f"model    small CNN + soft attention, trained {tr['epochs']} epoch{'s' if tr['epochs'] != 1 else ''} in {tr['seconds'] / 60:.1f} min; "
        f"best val CIDEr {tr['best_val'].get('CIDEr', float('nan')):.3f} at epoch {tr['best_epoch']}",
        f"         checkpoint {result['checkpoint']}",
        "",
        f"test scores (beam {result['beam_size']}, {result['metrics']} metrics) vs the baseline that gives every "
        "test image the most common training caption:",
        f'         baseline caption: "{result["baseline"]["caption"]}"',
        f"  {'metric':<9}{'model':>9}{'baseline':>10}",
    ]
    scores, base = result["scores"], result["baseline"]["scores"]
    for key in SCORE_KEYS:
        if scores.get(key) is None:
            continue
        b = base.get(key)
        lines.append(f"  {key:<9}{scores[key]:>9.3f}{(f'{b:.3f}' if b is not None else '-'):>10}")
    m, b = scores.get("CIDEr"), base.get("CIDEr")
    if m is not None and b:
        lines.append(f"  CIDEr is {m / b:.1f}x the baseline's")
    if result["metrics"] == "fast":
        lines.append("  (METEOR needs java: --metrics full)")
    elif scores.get("SPICE") is None:
        lines.append("  (SPICE needs the Stanford CoreNLP models: see `seesay score --help`)")
    lines += ["", "sample test captions:"]
    for s in result["samples"]:
        note = "  (a colour + shape pair never seen in training)" if s.get("held_out_pair") else ""
        lines.append(f"  {Path(s['image']).name or s['image_id']}{note}")
        lines.append(f"    model:     {s['caption']}")
        lines.append(f"    reference: {s['reference']}")
        if s.get("attention"):
            lines.append(f"    attention: {s['attention']}")
    lines.append("")
    lines.append(f"all test captions: {result['files']['captions']}; scores: {result['files']['metrics']}; "
                 f"worst first: {result['files']['per_image']}")
    return "\n".join(lines)
