"""Name -> builder registries for encoders, decoders and captioner families.

Families register themselves with a decorator in their own file; the package
`seesay.encoders` / `seesay.decoders` imports every family file explicitly, so the
registries are complete once those packages are imported (no import-time magic beyond that).
Builders take plain keyword arguments; configs never reach constructors. Keyword arguments a
builder does not take are refused with one line naming the option and the family.

Captioner families (`register_captioner`) are what a checkpoint's spec["captioner"] names:
"encoder_decoder" (`seesay.model.CaptionModel`) and "multimodal_mac" (`seesay.multimodal`) are
built in; a builder takes `(spec, tokenizer, preprocess, external_weights)`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from seesay.errors import SeesayError

_ENCODERS: dict[str, Callable[..., Any]] = {}
_DECODERS: dict[str, Callable[..., Any]] = {}
_CAPTIONERS: dict[str, Callable[..., Any]] = {}
_CAPTIONER_MODULES = ("seesay.model", "seesay.multimodal")


def register_encoder(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _ENCODERS:
            raise ValueError(f"encoder {name!r} registered twice")
        _ENCODERS[name] = builder
        return builder

    return wrap


def register_decoder(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _DECODERS:
            raise ValueError(f"decoder {name!r} registered twice")
        _DECODERS[name] = builder
        return builder

    return wrap


def register_captioner(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _CAPTIONERS and _CAPTIONERS[name] is not builder:
            raise ValueError(f"captioner family {name!r} registered twice")
        _CAPTIONERS[name] = builder
        return builder

    return wrap


def list_captioners() -> list[str]:
    for module in _CAPTIONER_MODULES:
        importlib.import_module(module)
    return sorted(_CAPTIONERS)


def build_captioner(spec: dict[str, Any], tokenizer: Any = None, preprocess: dict[str, Any] | None = None,
                    *, external_weights: bool = True) -> Any:
    """The captioner `spec` describes (spec["captioner"], default "encoder_decoder").

    `external_weights=False` (loading a checkpoint) builds without reading pretrained files
    (ImageNet weights, GloVe): the checkpoint's state dict supplies every weight.
    """
    if not isinstance(spec, dict):
        raise SeesayError(f"model spec must be a JSON object, not {type(spec).__name__}")
    name = spec.get("captioner", "encoder_decoder")
    names = list_captioners()
    if name not in _CAPTIONERS:
        raise SeesayError(f"unknown captioner family {name!r}; choose one of: {', '.join(names)}")
    return _CAPTIONERS[name](spec, tokenizer, preprocess, external_weights)


def builder_options(builder: Callable[..., Any]) -> tuple[set[str], bool]:
    """(keyword arguments a builder takes, whether it also takes **kwargs)."""
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def check_options(kind: str, name: str, options: dict[str, Any], builder: Callable[..., Any]) -> None:
    names, open_ended = builder_options(builder)
    unknown = sorted(k for k in options if k not in names)
    if unknown and not open_ended:
        raise SeesayError(f"{kind} {name!r} has no option {', '.join(repr(k) for k in unknown)} "
                          f"(its options: {', '.join(sorted(names)) or 'none'})")


def get_builder(kind: str, name: str) -> Callable[..., Any] | None:
    """The registered builder of encoder/decoder `name` (`kind` "encoder" or "decoder"), or None."""
    return _load(f"{kind}s").get(name)


def takes_option(kind: str, name: str, option: str) -> bool:
    """Whether the registered `kind` ("encoder"/"decoder") `name` takes keyword `option`."""
    table = _load(f"{kind}s")
    builder = table.get(name)
    return builder is not None and option in builder_options(builder)[0]


def _load(kind: str) -> dict[str, Callable[..., Any]]:
    importlib.import_module(f"seesay.{kind}")  # fills the registry through explicit imports
    return _ENCODERS if kind == "encoders" else _DECODERS


def list_encoders() -> list[str]:
    return sorted(_load("encoders"))


def list_decoders() -> list[str]:
    return sorted(_load("decoders"))


def build_encoder(name: str, **kwargs: Any) -> Any:
    table = _load("encoders")
    if name not in table:
        raise SeesayError(f"unknown encoder {name!r}; choose one of: {', '.join(sorted(table))}")
    check_options("encoder", name, kwargs, table[name])
    return table[name](**kwargs)


def build_decoder(name: str, **kwargs: Any) -> Any:
    table = _load("decoders")
    if name not in table:
        raise SeesayError(f"unknown decoder {name!r}; choose one of: {', '.join(sorted(table))}")
    check_options("decoder", name, kwargs, table[name])
    return table[name](**kwargs)
