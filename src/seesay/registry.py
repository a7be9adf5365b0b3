"""Name -> builder registries for encoders and decoders.

Families register themselves with a decorator in their own file; the package
`seesay.encoders` / `seesay.decoders` imports every family file explicitly, so the
registries are complete once those packages are imported (no import-time magic beyond that).
Builders take plain keyword arguments; configs never reach constructors.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from seesay.errors import SeesayError

_ENCODERS: dict[str, Callable[..., Any]] = {}
_DECODERS: dict[str, Callable[..., Any]] = {}


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
    return table[name](**kwargs)


def build_decoder(name: str, **kwargs: Any) -> Any:
    table = _load("decoders")
    if name not in table:
        raise SeesayError(f"unknown decoder {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name](**kwargs)
