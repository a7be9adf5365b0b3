"""Checkpoint directories: what a trained captioner needs to be used or trained further.

A checkpoint is a directory (RUN_DIR/best, RUN_DIR/last):

    model.safetensors   the CaptionModel's state dict (no pickle)
    config.json         the run's configuration; the model spec under "model"
    vocab.json          the vocabulary, as the data layer writes it
    preprocess.json     {"encoder": Preprocess.to_dict(), "image_size": int}
    train_state/        only in training checkpoints: optimizer, scheduler, RNG states,
                        epoch, step, best score (state.safetensors + state.json)

It is written into a temporary directory beside the target and renamed over it, so a reader
never sees a half-written checkpoint even if training is killed while saving.

This module is used by `caption`, `evaluate` and `visualize` as well as by training, so it
must never import `seesay.train`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from seesay.errors import SeesayError

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"
PREPROCESS_FILE = "preprocess.json"
TRAIN_STATE_DIR = "train_state"
REQUIRED_FILES = (MODEL_FILE, CONFIG_FILE, VOCAB_FILE, PREPROCESS_FILE)


class Checkpoint(NamedTuple):
    model: Any  # seesay.model.CaptionModel, in eval mode
    vocab: Any  # seesay.data.tokenize.Vocab (or the raw JSON when the data layer is absent)
    config: dict[str, Any]
    preprocess: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Nested state <-> (JSON, tensors), so optimizer/scheduler/RNG state is stored without pickle.


def tree_to_json(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """Replace tensors/arrays in a nested structure by references into `tensors`.

    Dicts with non-string keys (optimizer state is keyed by int) and tuples (RNG states,
    Adam betas) are tagged so `tree_from_json` restores them exactly.
    """
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") and k.endswith("__") for k in obj):
            return {k: tree_to_json(v, tensors, prefix) for k, v in obj.items()}
        return {"__dict__": [[tree_to_json(k, tensors, prefix), tree_to_json(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [tree_to_json(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [tree_to_json(v, tensors, prefix) for v in obj]
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint's train state")


def tree_from_json(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(tree_from_json(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {tree_from_json(k, tensors): tree_from_json(v, tensors) for k, v in obj["__dict__"]}
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: tree_from_json(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tree_from_json(v, tensors) for v in obj]
    return obj


def save_tree(directory: str | Path, state: dict[str, Any]) -> None:
    """Write a nested state to DIR/state.json + DIR/state.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = tree_to_json(state, tensors)
    save_file(tensors, str(directory / "state.safetensors"))
    (directory / "state.json").write_text(json.dumps(meta))


def load_tree(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    try:
        tensors = load_file(str(directory / "state.safetensors"))
        meta = json.loads((directory / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise SeesayError(f"{directory}: unreadable training state ({e})") from None
    return tree_from_json(meta, tensors)


# ---------------------------------------------------------------------------------------------
# Vocabulary: stored in whatever form the data layer uses for DATA_DIR/vocab.json.


def _vocab_to_json(vocab: Any) -> Any:
    for name in ("to_dict", "to_json_dict", "state_dict"):
        if hasattr(vocab, name):
            return getattr(vocab, name)()
    if hasattr(vocab, "itos"):
        return {"itos": list(vocab.itos)}
    if isinstance(vocab, (dict, list)):
        return vocab
    raise TypeError(f"cannot store vocabulary of type {type(vocab).__name__}")


def _vocab_from_json(data: Any, path: Path) -> Any:
    try:
        from seesay.data.tokenize import Vocab
    except ImportError:  # data layer not installed: give the raw JSON back
        return data
    for name in ("from_dict", "from_json_dict"):
        if hasattr(Vocab, name):
            return getattr(Vocab, name)(data)
    if hasattr(Vocab, "load"):
        return Vocab.load(path)
    return data


def _write_vocab(vocab: Any, path: Path) -> None:
    if hasattr(vocab, "save"):
        try:
            vocab.save(path)
            return
        except TypeError:
            pass
    path.write_text(json.dumps(_vocab_to_json(vocab), ensure_ascii=False))


# ---------------------------------------------------------------------------------------------


def _state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone so tied weights (shared storage) become separate tensors, which safetensors requires
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _atomic_replace(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    vocab: Any,
    config: dict[str, Any],
    preprocess: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at `path` (replacing any previous one atomically).

    `model` is a CaptionModel (its `.spec` goes into config["model"]); a DDP/compiled wrapper
    is unwrapped. `train_state` is a nested dict of tensors/arrays/plain values (see
    `tree_to_json`); it goes to `train_state/` for exact resume.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(_state_dict_for_saving(model), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        config = dict(config)
        spec = getattr(model, "spec", None)
        if spec is not None:
            config["model"] = spec
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        _write_vocab(vocab, tmp / VOCAB_FILE)
        (tmp / PREPROCESS_FILE).write_text(json.dumps(preprocess, indent=2))
        if train_state is not None:
            save_tree(tmp / TRAIN_STATE_DIR, train_state)
        _atomic_replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _spec_for_loading(spec: dict[str, Any]) -> dict[str, Any]:
    """The model spec with external weights switched off: the state dict supplies them."""
    spec = json.loads(json.dumps(spec))
    enc = spec.get("encoder", {})
    if enc.get("name") == "vit":  # vit takes weights=None|PATH
        enc.pop("weights", None)
    elif _builder_takes(enc.get("name"), "weights"):
        enc["weights"] = "none"  # e.g. efficientnet_lite0 would otherwise load its pretrained file
    dec = spec.get("decoder", {})
    if dec.get("glove"):
        dec["glove"] = None
    dec.pop("glove_itos", None)
    return spec


def _builder_takes(name: str | None, arg: str) -> bool:
    import inspect

    from seesay import registry

    try:
        builder = registry._load("encoders").get(name or "")
        return builder is not None and arg in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


def read_checkpoint_files(path: str | Path) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(config, vocab JSON, preprocess) of a checkpoint, with one-line errors."""
    path = Path(path)
    if not path.is_dir():
        raise SeesayError(f"{path}: no such checkpoint directory")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise SeesayError(f"{path}: incomplete checkpoint (missing {', '.join(missing)})")
    out = []
    for name in (CONFIG_FILE, VOCAB_FILE, PREPROCESS_FILE):
        try:
            out.append(json.loads((path / name).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            raise SeesayError(f"{path / name}: unreadable ({e})") from None
    return out[0], out[1], out[2]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory into a CaptionModel (eval mode) with its vocab and config."""
    path = Path(path)
    config, vocab_json, preprocess = read_checkpoint_files(path)
    if "model" not in config:
        raise SeesayError(f"{path / CONFIG_FILE}: no model spec under 'model'")
    from seesay.model import build_model

    model = build_model(_spec_for_loading(config["model"]))
    try:
        state = load_file(str(path / MODEL_FILE))
    except (OSError, ValueError, RuntimeError) as e:
        raise SeesayError(f"{path / MODEL_FILE}: unreadable ({e})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise SeesayError(f"{path / MODEL_FILE}: weights do not match the model spec ({' '.join(first[:2])})") from None
    model.spec = config["model"]
    model.to(map_location)
    model.eval()
    vocab = _vocab_from_json(vocab_json, path / VOCAB_FILE)
    return Checkpoint(model, vocab, config, preprocess)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The `train_state/` of a checkpoint directory (raises SeesayError when absent)."""
    d = Path(path) / TRAIN_STATE_DIR
    if not d.is_dir():
        raise SeesayError(f"{path}: checkpoint has no train_state/ (not a training checkpoint)")
    return load_tree(d)
