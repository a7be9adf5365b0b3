"""Checkpoint directories: what a trained captioner needs to be used or trained further.

A checkpoint is a directory (RUN_DIR/best, RUN_DIR/last):

    model.safetensors   the captioner's state dict (no pickle)
    config.json         the run's configuration; the captioner's spec() under "model"
    tokenizer/          the captioner's tokenizer (`save_pretrained`; tokenizer.json names its type)
    preprocess.json     the captioner's preprocess_config(), e.g. {"encoder": ..., "image_size": int}
    train_state/        only in training checkpoints: optimizer, scheduler, RNG states,
                        epoch, step, best score (state.safetensors + state.json)

It is written into a temporary directory beside the target and renamed over it, so a reader
never sees a half-written checkpoint even if training is killed while saving. The replacement
is three renames: `.NAME.tmp-X` (being written) -> `.NAME.new-X` (complete) once every file is
written and flushed; NAME -> `.NAME.old-X`; `.NAME.new-X` -> NAME; then the old one is removed.
A kill at any point leaves a complete checkpoint in some form; `recover_checkpoint(path)` (run
by `load_checkpoint` and before training resumes) puts the newest complete one back at NAME and
removes the leftovers. Files get the usual permissions (0666 / 0777 less the umask), like every
other file seesay writes.

Checkpoints written before the tokenizer had its own directory hold `vocab.json` instead; they
still load. Any captioner family loads (`seesay.registry.build_captioner` on the spec).

This module is used by `caption`, `evaluate` and `visualize` as well as by training, so it
must never import `seesay.train`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from seesay.errors import SeesayError

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"  # checkpoints written before tokenizer/
TOKENIZER_DIR = "tokenizer"
PREPROCESS_FILE = "preprocess.json"
TRAIN_STATE_DIR = "train_state"
REQUIRED_FILES = (MODEL_FILE, CONFIG_FILE, PREPROCESS_FILE)


class Checkpoint(NamedTuple):
    model: Any  # a captioner (seesay.captioner), in eval mode
    tokenizer: Any  # its tokenizer (also model.tokenizer)
    config: dict[str, Any]
    preprocess: dict[str, Any]

    @property
    def vocab(self) -> Any:
        """The tokenizer (the name older code used)."""
        return self.tokenizer


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


def _state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # clone so tied weights (shared storage) become separate tensors, which safetensors requires
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _leftovers(final: Path, kind: str) -> list[Path]:
    """`.NAME.<kind>-*` siblings of `final`, newest first."""
    found = [p for p in final.parent.glob(f".{final.name}.{kind}-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _fsync_tree(directory: Path) -> None:
    """Flush every file (and the directories) of a finished checkpoint to disk before it is renamed
    into place, so a power cut cannot leave a renamed but empty file."""
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [directory, *[p for p in directory.rglob("*") if p.is_dir()]]:
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:  # pragma: no cover - platforms without directory fds
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _set_permissions(directory: Path) -> None:
    """0666 / 0777 less the umask for everything in a checkpoint (some writers create 0600 files),
    so shared group directories on clusters work."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for p in directory.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _atomic_replace(tmp: Path, final: Path) -> None:
    tag = uuid.uuid4().hex[:8]
    new = final.parent / f".{final.name}.new-{tag}"
    os.replace(tmp, new)  # 1: complete, under a name recovery trusts
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{tag}"
        os.replace(final, old)  # 2
    os.replace(new, final)  # 3
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # 4


def publish_directory(tmp: Path, final: Path) -> None:
    """Make a finished temporary directory `final`, atomically and durably: permissions as any new
    file's, everything flushed to disk, then the recoverable rename (`recover_checkpoint`)."""
    _set_permissions(tmp)
    _fsync_tree(tmp)
    _atomic_replace(tmp, final)


def recover_checkpoint(path: str | Path) -> Path | None:
    """Finish or undo a checkpoint replacement that was interrupted (see the module doc).

    The newest complete copy (`.NAME.new-*`, else NAME, else `.NAME.old-*`) ends up at NAME;
    incomplete `.NAME.tmp-*` and superseded copies are removed. Returns NAME when a checkpoint
    exists afterwards, else None. Safe to call at any time when no save is running.
    """
    final = Path(path)
    if not final.parent.is_dir():
        return None
    new, old = _leftovers(final, "new"), _leftovers(final, "old")
    if new:
        if final.exists():
            aside = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, aside)
            old.insert(0, aside)
        os.replace(new[0], final)
        log.warning("%s: completed an interrupted checkpoint save (kept the newer copy)", final)
    elif not final.exists() and old:
        os.replace(old[0], final)
        old = old[1:]
        log.warning("%s: restored the previous checkpoint after an interrupted save", final)
    for leftover in [*new[1:], *old, *_leftovers(final, "tmp")]:
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
    return final if final.exists() else None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The captioner inside a DDP / torch.compile wrapper."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    config: dict[str, Any] | None = None,
    tokenizer: Any = None,
    preprocess: dict[str, Any] | None = None,
    train_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at `path` (replacing any previous one atomically).

    `model` is a captioner (its `spec()` goes into config["model"], its `preprocess_config()`
    into preprocess.json unless `preprocess` is given, its tokenizer into tokenizer/ unless
    `tokenizer` is given); a DDP/compiled wrapper is unwrapped. `train_state` is a nested dict
    of tensors/arrays/plain values (see `tree_to_json`); it goes to `train_state/` for exact
    resume.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise SeesayError(f"{path}: cannot save a checkpoint without a tokenizer")
    if preprocess is None:
        preprocess = model.preprocess_config()
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise SeesayError(f"{path}: cannot write the checkpoint ({e.strerror or e})") from None
    try:
        save_file(_state_dict_for_saving(model), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        config = dict(config or {})
        config["model"] = model.spec()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
        tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        (tmp / PREPROCESS_FILE).write_text(json.dumps(preprocess, indent=2))
        if train_state is not None:
            save_tree(tmp / TRAIN_STATE_DIR, train_state)
        publish_directory(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # disk full, a file size or quota limit: one line, and the previous checkpoint stays as it was
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
            reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
            kept = f"; the previous {path.name}/ is kept" if path.exists() else ""
            raise SeesayError(f"{path}: cannot write the checkpoint ({reason}){kept}") from None
        raise
    return path


def read_checkpoint_files(path: str | Path) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(config, tokenizer, preprocess) of a checkpoint, with one-line errors."""
    path = Path(path)
    if not path.is_dir():
        raise SeesayError(f"{path}: no such checkpoint directory")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if not (path / TOKENIZER_DIR).is_dir() and not (path / VOCAB_FILE).is_file():
        missing.append(f"{TOKENIZER_DIR}/")
    if missing:
        raise SeesayError(f"{path}: incomplete checkpoint (missing {', '.join(missing)})")
    out = []
    for name in (CONFIG_FILE, PREPROCESS_FILE):
        try:
            data = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SeesayError(f"{path / name}: unreadable ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise SeesayError(f"{path / name}: expected a JSON object, not {type(data).__name__}")
        out.append(data)
    preprocess = out[1]
    size = preprocess.get("image_size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise SeesayError(f"{path / PREPROCESS_FILE}: image_size must be an integer >= 0, not {size!r}")
    if "encoder" in preprocess and not isinstance(preprocess["encoder"], dict):
        raise SeesayError(f"{path / PREPROCESS_FILE}: encoder must be an object, "
                          f"not {type(preprocess['encoder']).__name__}")
    return out[0], read_tokenizer(path), preprocess


def read_tokenizer(path: Path) -> Any:
    """The tokenizer of checkpoint directory `path` (tokenizer/, or an older checkpoint's vocab.json)."""
    from seesay.tokenizers import load_tokenizer

    if (path / TOKENIZER_DIR).is_dir():
        return load_tokenizer(path / TOKENIZER_DIR)
    from seesay.data.tokenize import Vocab  # a checkpoint from before tokenizer/

    return Vocab.load(path / VOCAB_FILE)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory into its captioner (eval mode), with tokenizer and config."""
    from seesay.registry import build_captioner

    path = Path(path)
    if not path.is_dir():
        recover_checkpoint(path)  # a save interrupted between its renames
    config, tokenizer, preprocess = read_checkpoint_files(path)
    spec = config.get("model")
    if not isinstance(spec, dict):
        raise SeesayError(f"{path / CONFIG_FILE}: no model spec under 'model'")
    state = read_weights(path / MODEL_FILE)
    model = _load_without_init(spec, tokenizer, preprocess, state)
    if model is None:  # the plain way: build with random initial weights, then copy the saved ones in
        try:
            model = build_captioner(spec, tokenizer, preprocess, external_weights=False)
        except SeesayError as e:
            raise SeesayError(f"{path / CONFIG_FILE}: {e}") from None
        except (TypeError, ValueError, KeyError) as e:
            raise SeesayError(f"{path / CONFIG_FILE}: the model spec does not build ({type(e).__name__}: {e})") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise SeesayError(f"{path / MODEL_FILE}: weights do not match the model spec ({' '.join(first[:2])})") from None
    model.to(map_location)
    model.eval()
    return Checkpoint(model, tokenizer, config, preprocess)


def _load_without_init(spec: dict[str, Any], tokenizer: Any, preprocess: dict[str, Any], state: dict[str, torch.Tensor]
                       ) -> torch.nn.Module | None:
    """The captioner built on the meta device (no memory, no random initialisation) with the saved
    tensors assigned as its weights, or None when that cannot be done safely (the caller then
    builds it the plain way, which also reports what is wrong).

    Refused, so the plain way runs: a family that does not build on the meta device, shared
    (tied) parameters (assigning would untie them), weights that do not match, and any tensor
    left on the meta device after loading (a non-persistent buffer, or a tensor attribute made
    in a constructor), which the checkpoint cannot fill.
    """
    from seesay.registry import build_captioner

    try:
        with torch.device("meta"), _no_init():
            model = build_captioner(spec, tokenizer, preprocess, external_weights=False)
    except Exception:  # noqa: BLE001 - any failure here only means "use the plain way"
        return None
    if not isinstance(model, torch.nn.Module):
        return None
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    if len(names) != len(dict(model.named_parameters())):
        return None  # tied weights
    own = model.state_dict()
    if any(k in own and own[k].dtype != v.dtype for k, v in state.items()):
        return None  # the plain way converts them to the model's dtypes
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, TypeError, ValueError):
        return None
    return None if _has_meta_tensors(model) else model


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def _no_init():
    """torch.nn.init's functions as no-ops while a model is built on the meta device: drawing random
    numbers into meta tensors is pointless, and it is not free: torch implements random fills of
    meta tensors through torch._refs, whose first use imports torch._dynamo (seconds of cold start)."""
    import torch.nn.init as init

    saved = {name: getattr(init, name) for name in _INIT_FUNCTIONS if hasattr(init, name)}
    try:
        for name in saved:
            setattr(init, name, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _has_meta_tensors(model: torch.nn.Module) -> bool:
    def meta(value: Any) -> bool:
        if isinstance(value, torch.Tensor):
            return value.is_meta
        if isinstance(value, list | tuple):
            return any(meta(v) for v in value)
        if isinstance(value, dict):
            return any(meta(v) for v in value.values())
        return False

    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, torch.nn.Module):
                continue
            if meta(value) or (hasattr(value, "__dict__") and not isinstance(value, type)
                               and any(meta(v) for v in vars(value).values())):
                return True
    return False


def read_weights(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; one line naming the file when it is not a readable safetensors file
    (a pickle renamed to .safetensors is refused here, never unpickled)."""
    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:
        raise SeesayError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for corrupt headers
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SeesayError(f"{path}: not a readable safetensors file ({msg})") from None


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The `train_state/` of a checkpoint directory (raises SeesayError when absent)."""
    d = Path(path) / TRAIN_STATE_DIR
    if not d.is_dir():
        raise SeesayError(f"{path}: checkpoint has no train_state/ (not a training checkpoint)")
    return load_tree(d)
