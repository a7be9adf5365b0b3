"""A request's decoding options: the names, types, defaults and limits of `seesay caption`'s flags.

An option is a caption flag without its dashes (`--beam-size` is `beam_size`, `beam-size` is
accepted too), given as a query parameter, a multipart field or a JSON field. Types and defaults
come from `seesay.commands.caption.add_arguments` itself, so the two cannot drift apart; the
checks between options are `decoding_from_args`, the same rules the command applies. Serving
adds two things: `attention` (return per-word attention, off by default) and upper bounds on the
work one request may ask for (`Limits`), since a server shares its memory between clients.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from typing import Any

from seesay.errors import SeesayError

# `seesay caption` flags a request may set (the rest are about files and devices)
DECODING_OPTIONS = ("prompt", "beam_size", "length_penalty", "temperature", "top_k", "top_p", "seed", "max_length",
                    "min_length", "no_repeat_ngram_size", "bad_endings", "num_captions", "diverse_groups",
                    "diversity_penalty")
SERVE_OPTIONS = ("attention",)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class OptionError(SeesayError):
    """A bad request option (the app answers 422)."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds per request, so one client cannot take the server's memory."""

    max_beam_size: int = 16
    max_captions: int = 16
    max_length: int = 100
    max_prompt_chars: int = 1000


@dataclass(frozen=True)
class Decoding:
    """What the batcher needs to decode a request (hashable: requests with equal values batch together)."""

    strategy: Any
    constraints: Any
    max_len: int
    prompt: str | None
    num_captions: int


@functools.lru_cache(maxsize=1)
def _caption_actions() -> dict[str, argparse.Action]:
    from seesay.commands.caption import add_arguments

    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    return {a.dest: a for a in p._actions if a.dest in DECODING_OPTIONS}


def _flag(name: str) -> str:
    return _caption_actions()[name].option_strings[0]


def defaults() -> dict[str, Any]:
    """{option: default} as `seesay caption` has them, plus attention=False."""
    return {**{k: a.default for k, a in _caption_actions().items()}, "attention": False}


def _convert(name: str, value: Any) -> Any:
    if name == "attention":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in (*_TRUE, *_FALSE):
            return value.strip().lower() in _TRUE
        raise OptionError(f"attention must be true or false, not {value!r}")
    kind = _caption_actions()[name].type or str
    if value is None:
        return None
    if kind is str:
        if not isinstance(value, str):
            raise OptionError(f"{name} must be text, not {type(value).__name__}")
        return value
    if isinstance(value, bool):
        raise OptionError(f"{name} must be a number, not {value!r}")
    if kind is int and isinstance(value, float):
        if value != int(value):
            raise OptionError(f"{name} must be an integer, not {value!r}")
        return int(value)
    if kind is int and isinstance(value, int) or kind is float and isinstance(value, (int, float)):
        return kind(value)
    if isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    what = "an integer" if kind is int else "a number"
    raise OptionError(f"{name} must be {what}, not {value!r}")


def collect(*sources: dict[str, Any]) -> dict[str, Any]:
    """Options from several sources (query, form / JSON fields), typed; unknown or repeated names
    are errors. Names are the caption flags without dashes; `-` and `_` are the same."""
    known = (*DECODING_OPTIONS, *SERVE_OPTIONS)
    out: dict[str, Any] = {}
    for source in sources:
        for raw, value in source.items():
            name = raw.replace("-", "_")
            if name not in known:
                raise OptionError(f"unknown option {raw!r} (options: {', '.join(known)})")
            if name in out:
                raise OptionError(f"option {name} given twice")
            out[name] = _convert(name, value)
    return out


def parse_options(given: dict[str, Any], tokenizer: Any, limits: Limits = Limits()) -> tuple[Decoding, bool]:
    """(decoding, attention) for a request's options (`collect`'s output); `OptionError` when bad."""
    from seesay.captioner import resolve_constraints

    args = argparse.Namespace(**{**defaults(), **given})
    try:
        strategy, constraints, n = decoding_from_args(args)
        if args.prompt is not None and len(args.prompt) > limits.max_prompt_chars:
            raise SeesayError(f"--prompt is longer than this server's limit of {limits.max_prompt_chars} characters")
        beam = getattr(strategy, "size", 1)
        for value, limit, flag in ((beam, limits.max_beam_size, "--beam-size"), (n, limits.max_captions, "--num-captions"),
                                   (args.max_length, limits.max_length, "--max-length")):
            if value > limit:
                raise SeesayError(f"{flag} {value} is more than this server's limit of {limit}")
        constraints = resolve_constraints(tokenizer, constraints) if constraints.active else None
        if args.prompt:
            from seesay.captioner import prompt_ids

            prompt_ids(tokenizer, args.prompt)  # a prompt the tokenizer cannot encode is this request's error
    except (SeesayError, ValueError) as e:
        raise OptionError(_option_names(str(e))) from None
    return Decoding(strategy, constraints, int(args.max_length), args.prompt or None, n), bool(args.attention)


def _option_names(message: str) -> str:
    """An error in the command's words ("--beam-size") in the API's ("beam_size")."""
    for name in sorted(DECODING_OPTIONS, key=lambda k: -len(_flag(k))):
        message = message.replace(_flag(name), name)
    return message


def decoding_from_args(args: argparse.Namespace) -> tuple[Any, Any, int]:
    """(strategy, constraints, num_captions) with `seesay caption`'s own checks and messages."""
    from seesay.commands.caption import decoding_from_args as caption_decoding

    return caption_decoding(args)
