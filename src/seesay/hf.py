"""Building and loading Hugging Face `transformers` parts (the `hf` extra).

A part comes from one of three sources, the `from_pretrained(name_or_path)` convention:

- a local directory (`save_pretrained` output: config.json + weights), read offline;
- a hub name ("t5-large", "microsoft/swinv2-base-patch4-window8-256"), fetched (or taken from
  the Hugging Face cache) by `transformers` itself;
- no name, a config dict: a model built from scratch (tiny models in tests and CPU recipes).

Every failure is one line: transformers missing (`pip install 'seesay[hf]'`), a name that is
neither a directory nor a plausible hub name, or a name that could not be fetched (offline, a
typo, a private repository), with a hint to pass a local directory instead. `transformers` is
imported here only inside functions, so `import seesay` stays cheap.

`plain_config(config)` is the JSON form a family keeps in its model spec, so a checkpoint
rebuilds the architecture without the hub or the original directory.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from seesay.errors import SeesayError, missing_extra

log = logging.getLogger(__name__)

# owner/name or name, as the hub spells repositories (letters, digits, - _ .; at most one /)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# keys of a config's to_dict() that describe where or with what it was saved, not the architecture
_UNSTABLE_KEYS = ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype",
                  "_commit_hash", "_attn_implementation_autoset", "output_attentions", "output_hidden_states")


def require_transformers() -> Any:
    """The `transformers` module, or a one-line SeesayError naming the extra to install."""
    try:
        import transformers
    except ImportError as e:
        raise missing_extra("transformers", "hf") from e
    return transformers


def check_source(name: str | Path, option: str) -> str:
    """`name` as a string when it is a local directory or a plausible hub name; else one line."""
    text = str(name)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise SeesayError(f"{option} {text}: a file, not a model directory (give the folder that holds config.json, "
                          "or a Hugging Face hub name)")
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
    if looks_local or not _HUB_NAME.match(text):
        raise SeesayError(f"{option} {text}: no such directory, and not a Hugging Face hub name "
                          "(like t5-large or owner/name)")
    return text


def is_local(name: str | Path | None) -> bool:
    return name is not None and Path(str(name)).expanduser().is_dir()


def _fetch_error(option: str, name: str, e: Exception) -> SeesayError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if is_local(name):
        return SeesayError(f"{option} {name}: cannot load the model from this directory ({first})")
    return SeesayError(f"{option} {name}: could not fetch it from the Hugging Face hub ({first}); without "
                       "internet, download it elsewhere (save_pretrained) and pass the local directory")


def load_config(config_class: Any, name: str | None, overrides: dict[str, Any] | None, option: str) -> Any:
    """`config_class` from `name` (directory or hub) with `overrides`, or built from `overrides` alone."""
    overrides = dict(overrides or {})
    if name is None:
        try:
            return config_class(**overrides)
        except (TypeError, ValueError) as e:
            raise SeesayError(f"{option}: bad config ({str(e).splitlines()[0]})") from None
    name = check_source(name, option)
    try:
        return config_class.from_pretrained(name, **overrides)
    except (OSError, ValueError) as e:
        raise _fetch_error(option, name, e) from None


def load_model(model_class: Any, name: str, config: Any, option: str, **model_kwargs: Any) -> Any:
    """`model_class.from_pretrained(name, config=config)`: pretrained weights from a directory or the hub."""
    name = check_source(name, option)
    try:
        return model_class.from_pretrained(name, config=config, **model_kwargs)
    except (OSError, ValueError) as e:
        raise _fetch_error(option, name, e) from None


def plain_config(config: Any) -> dict[str, Any]:
    """A config as plain JSON without the keys that say where it came from (for model specs)."""
    d = json.loads(config.to_json_string(use_diff=False))
    for k in _UNSTABLE_KEYS:
        d.pop(k, None)
    return d


def read_json_file(directory: str | Path, filename: str) -> dict[str, Any] | None:
    """DIR/filename as a JSON object when the file is there, else None (a bad file is one line)."""
    path = Path(directory) / filename
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SeesayError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SeesayError(f"{path}: expected a JSON object")
    return data


def enable_checkpointing(model: Any) -> None:
    """Activation (gradient) checkpointing on a `PreTrainedModel`, non-reentrant (frozen inputs keep
    their gradients). transformers renamed `gradient_checkpointing_enable` in 5.x; either works."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
