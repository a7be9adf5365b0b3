"""Setting up a training run before the task exists: the objective's settings, weights from
`--init`, and data that must be prepared first (`--coco-dir`, Titans-style pairs configs)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from seesay.checkpoint import read_weights
from seesay.config import Config
from seesay.errors import SeesayError

log = logging.getLogger(__name__)


def check_objective(cfg: Config) -> None:
    """One line for a bad objective setting, before data is prepared or a model built."""
    t = cfg.train
    if t.objective not in ("xe", "scst"):
        raise SeesayError(f"--objective must be xe or scst, not {t.objective!r}")
    if t.amp_dtype not in ("float16", "fp16", "bfloat16", "bf16"):
        raise SeesayError(f"--amp-dtype must be float16 or bfloat16, not {t.amp_dtype!r}")
    if t.batch_by not in ("caption", "image"):
        raise SeesayError(f"--batch-by must be caption or image, not {t.batch_by!r}")
    if t.scst_baseline not in ("mean", "greedy"):
        raise SeesayError(f"--scst-baseline must be mean or greedy, not {t.scst_baseline!r}")
    low = 2 if t.scst_baseline == "mean" else 1
    if isinstance(t.scst_samples, bool) or not isinstance(t.scst_samples, int) or t.scst_samples < low:
        raise SeesayError(f"--scst-samples must be an integer >= {low} with --scst-baseline {t.scst_baseline}, "
                          f"not {t.scst_samples!r}")
    w = t.scst_bleu_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise SeesayError(f"--scst-bleu-weight must be a number >= 0, not {w!r}")
    if t.init is not None and not (Path(t.init) / "model.safetensors").is_file():
        raise SeesayError(f"--init {t.init}: not a checkpoint directory (no model.safetensors)")


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _token_table(tokenizer: Any) -> tuple[Any, ...]:
    """What a tokenizer maps ids to, through the tokenizer contract only."""
    return (len(tokenizer), tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id,
            tuple(tokenizer.id_to_token(i) for i in range(len(tokenizer))))


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted keys where two JSON values differ (for a one-line message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))]
    return [] if a == b else [f"{where or 'value'} {a!r} vs {b!r}"]


def init_weights(model: Any, path: str | Path, device: torch.device | str = "cpu") -> None:
    """`--init PATH`: start from a checkpoint's weights. Its model spec, preprocessing and tokenizer
    must be this run's (else one line saying what differs); nothing else (optimizer, step) is taken."""
    from seesay.checkpoint import read_checkpoint_files

    path = Path(path)
    config, tokenizer, preprocess = read_checkpoint_files(path)
    saved = _plain(config.get("model"))
    if isinstance(saved, dict):
        saved.setdefault("captioner", "encoder_decoder")  # checkpoints from before the captioner families
    diffs = _differences(saved, _plain(model.spec()))
    diffs += [f"preprocess.{d}" for d in _differences(_plain(preprocess), _plain(model.preprocess_config()))]
    if _token_table(tokenizer) != _token_table(model.tokenizer):
        diffs.append("the tokenizer (vocabulary)")
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise SeesayError(f"--init {path}: the checkpoint's model differs from this run's: {'; '.join(diffs[:3])}{more} "
                          "(checkpoint vs run: use the recipe the checkpoint was trained with)")
    try:
        model.load_state_dict(read_weights(path / "model.safetensors", device=str(device)), strict=True)
    except RuntimeError as e:
        raise SeesayError(f"--init {path}: weights do not match the model ({str(e).strip().splitlines()[0]})") from None
    log.info("initialised the model from %s", path)


def prepare_if_needed(cfg: Config) -> None:
    """--coco-dir and Titans-style pairs configs: prepare the data once into RUN_DIR/data (the raw
    dataset folder is only read), then train on it."""
    from seesay.data.prepare import prepare_dataset

    if cfg.data.path is None and cfg.data.coco_dir is not None:
        target = Path(cfg.train.output) / "data"
        legacy = Path(cfg.data.coco_dir) / "prepared"  # where older versions prepared it
        if not (target / "manifest.json").is_file() and (legacy / "manifest.json").is_file():
            target = legacy
            log.info("using the COCO data prepared earlier in %s", target)
        elif not (target / "manifest.json").is_file():
            log.info("preparing COCO from %s into %s (other runs can use it with --data %s)", cfg.data.coco_dir,
                     target, target)
            prepare_dataset("coco", target, coco_dir=cfg.data.coco_dir, progress=cfg.train.progress)
        else:
            log.info("using the COCO data prepared in %s", target)
        cfg.data.path = str(target)
    if cfg.data.path is None and cfg.data.pairs_config is not None:
        from seesay.config import load_yaml

        pairs = load_yaml(cfg.data.pairs_config)
        base = Path(cfg.data.pairs_config).parent
        target = Path(cfg.train.output) / "data"
        if not (target / "manifest.json").is_file():
            log.info("preparing image/text pairs from %s into %s", cfg.data.pairs_config, target)
            prepare_dataset("pairs", target, annotations=base / pairs["annotations_file"],
                            images=base / pairs["image_dir"], min_word_freq=int(pairs.get("min_word_freq", 1)),
                            progress=cfg.train.progress)
        cfg.data.path = str(target)
    if cfg.data.path is None:
        raise SeesayError("no training data: pass --data DATA_DIR (a prepared dataset) or --coco-dir DIR")


def resolve_pairs_text(cfg: Config) -> None:
    """A pairs config's optional `text_data_path` (relative to the config file) becomes
    `data.text_data_path` unless that is set already; runs on every process (cheap)."""
    if cfg.data.pairs_config is None or cfg.data.text_data_path:
        return
    from seesay.config import load_yaml

    pairs = load_yaml(cfg.data.pairs_config)
    if pairs.get("text_data_path"):
        cfg.data.text_data_path = str(Path(cfg.data.pairs_config).parent / str(pairs["text_data_path"]))
