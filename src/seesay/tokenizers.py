"""The tokenizer contract, and checkpoint tokenizer directories.

A captioner's tokenizer turns text into ids and back and names its special ids. seesay's word /
char / byte / jieba `Vocab` (`seesay.data.tokenize`) is one implementation; a SentencePiece or
Hugging Face tokenizer can be another. Code outside a tokenizer never assumes `<pad>` = 0 or any
other fixed id: it asks the tokenizer.

    pad_id, bos_id, eos_id, unk_id   special ids (bos starts every caption, eos ends it)
    len(tokenizer)                   vocabulary size (ids are 0 .. len - 1)
    encode(text) -> [int]            ids of a caption, without bos / eos
    decode(ids) -> str               text of ids up to the first eos, pad / bos dropped
    id_to_token(id) -> str           one id's token as text (for attention pictures: one word each)
    encode_prompt(text) -> [int]     ids of a caption prefix, kept exactly as typed where the
                                     tokenizer can (e.g. a trailing space for byte/char)
    kind                             a short name ("word", "char", "sentencepiece", ...)
    save_pretrained(dir)             writes DIR/tokenizer.json (+ any files it needs)

`load_tokenizer(dir)` reads such a directory back: tokenizer.json's "type" names the loader
(`register_tokenizer`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from seesay.errors import SeesayError

TOKENIZER_FILE = "tokenizer.json"


@runtime_checkable
class Tokenizer(Protocol):
    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    kind: str

    def __len__(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def id_to_token(self, index: int) -> str: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def save_pretrained(self, directory: str | os.PathLike) -> None: ...


_LOADERS: dict[str, Callable[[Path, dict[str, Any]], Any]] = {}


def register_tokenizer(type_name: str) -> Callable[[Callable[[Path, dict[str, Any]], Any]], Callable[..., Any]]:
    """Register `loader(directory, tokenizer_json) -> Tokenizer` for tokenizer.json's "type"."""

    def wrap(loader: Callable[[Path, dict[str, Any]], Any]) -> Callable[..., Any]:
        _LOADERS[type_name] = loader
        return loader

    return wrap


def _ensure_builtin_loaders() -> None:
    import seesay.data.tokenize  # noqa: F401  (registers "seesay-vocab")
    import seesay.multimodal  # noqa: F401  (registers "seesay-bytes"; titans_pytorch stays unimported)
    import seesay.spm  # noqa: F401  (registers "sentencepiece"; sentencepiece is imported when one loads)


def load_tokenizer(directory: str | os.PathLike) -> Any:
    """The tokenizer saved in `directory` (one-line SeesayError naming the file when bad)."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SeesayError(f"{path}: no such file (not a tokenizer directory)") from None
    except (OSError, ValueError) as e:
        raise SeesayError(f"{path}: unreadable tokenizer ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise SeesayError(f"{path}: not a tokenizer file (expected an object with a \"type\")")
    _ensure_builtin_loaders()
    loader = _LOADERS.get(data["type"])
    if loader is None:
        raise SeesayError(f"{path}: unknown tokenizer type {data['type']!r} (known: {', '.join(sorted(_LOADERS))})")
    try:
        return loader(directory, data)
    except SeesayError as e:
        raise SeesayError(f"{path}: {e}") from None


def check_tokenizer(tokenizer: Any, where: str = "tokenizer") -> None:
    """One-line error when `tokenizer` lacks part of the contract."""
    missing = [a for a in ("pad_id", "bos_id", "eos_id", "unk_id", "encode", "decode", "encode_prompt", "id_to_token",
                           "save_pretrained", "__len__") if not hasattr(tokenizer, a)]
    if missing:
        raise SeesayError(f"{where}: {type(tokenizer).__name__} is not a tokenizer (missing {', '.join(missing)})")
