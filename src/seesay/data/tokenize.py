"""Tokenisers and the vocabulary.

Four tokenisers (`--tokenizer`):

- ``word``: lower-case, then keep runs of letters/digits (Unicode ``\\w`` without ``_``), with an
  inner apostrophe kept (``man's``, ``don't``); every other character (punctuation, quotes,
  hyphens, underscores) separates words and is dropped. This is what the tokens of Karpathy's
  ``dataset_*.json`` look like, so a model trained here is scored the same way.
- ``char``: one token per character, case kept, runs of white space collapsed to one space.
- ``byte``: one token per UTF-8 byte; the vocabulary is fixed (4 specials + 256 bytes), no
  minimum frequency.
- ``jieba``: Chinese word segmentation with jieba (imported only when used); white space and
  pure punctuation tokens are dropped.

Vocabulary: ``<pad>``=0, ``<start>``=1, ``<end>``=2, ``<unk>``=3, then tokens by descending
frequency in the training split (ties broken by the token's text, so it is deterministic);
tokens seen fewer than ``min_word_freq`` times map to ``<unk>``.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from seesay.errors import SeesayError, missing_extra
from seesay.tokenizers import TOKENIZER_FILE, register_tokenizer

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
TOKENIZERS = ("word", "char", "byte", "jieba")

_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_SPACE_RE = re.compile(r"\s+")


def _byte_token(b: int) -> str:
    return f"<0x{b:02X}>"


_BYTE_TOKENS = tuple(_byte_token(b) for b in range(256))
_jieba = None


def _get_jieba() -> Any:
    global _jieba
    if _jieba is None:
        try:
            import jieba
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise missing_extra("jieba", "zh") from e
        import logging

        jieba.setLogLevel(logging.WARNING)
        _jieba = jieba
    return _jieba


def _is_punct(token: str) -> bool:
    return all(unicodedata.category(c)[0] in "PSZ" or c.isspace() for c in token)


def tokenize(text: str, kind: str = "word") -> list[str]:
    """Split one raw sentence into tokens with the given tokenizer (see the module doc)."""
    if kind == "word":
        return _WORD_RE.findall(text.lower())
    if kind == "char":
        return list(_SPACE_RE.sub(" ", text).strip())
    if kind == "byte":
        return [_BYTE_TOKENS[b] for b in _SPACE_RE.sub(" ", text).strip().encode("utf-8")]
    if kind == "jieba":
        jieba = _get_jieba()
        return [t for t in (w.strip() for w in jieba.lcut(text.strip())) if t and not _is_punct(t)]
    raise SeesayError(f"unknown tokenizer {kind!r}; choose one of {', '.join(TOKENIZERS)}")


def detokenize(tokens: Sequence[str], kind: str = "word") -> str:
    """Join tokens back into a sentence (words with spaces, characters and Chinese without)."""
    if kind == "word":
        return " ".join(tokens)
    if kind == "byte":
        data = bytes(int(t[3:5], 16) for t in tokens if len(t) == 6 and t.startswith("<0x"))
        return data.decode("utf-8", errors="replace")
    return "".join(tokens)


class Vocab:
    """Token <-> id mapping plus the tokenizer it was built with; implements the tokenizer
    contract of `seesay.tokenizers` (`bos_id` is `<start>`, `eos_id` is `<end>`).

    `encode(text)` gives ids without `<start>`/`<end>`; `encode(text, add_special=True)` wraps
    them. `decode(ids)` stops at `<end>`, drops `<pad>`/`<start>` and joins the tokens.
    """

    def __init__(self, itos: Sequence[str], tokenizer: str = "word", min_word_freq: int = 1,
                 counts: dict[str, int] | None = None) -> None:
        if tuple(itos[:4]) != SPECIALS:
            raise SeesayError(f"vocabulary must start with {', '.join(SPECIALS)}")
        if tokenizer not in TOKENIZERS:
            raise SeesayError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise SeesayError("vocabulary has duplicate tokens")
        self.tokenizer = tokenizer
        self.min_word_freq = int(min_word_freq)
        self.counts = dict(counts or {})

    pad_id = 0
    start_id = 1
    end_id = 2
    unk_id = 3
    bos_id = start_id
    eos_id = end_id

    @property
    def kind(self) -> str:
        return self.tokenizer

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos and self.tokenizer == other.tokenizer

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, tokenizer={self.tokenizer!r})"

    # -- encoding ------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.tokenizer)

    def encode_tokens(self, tokens: Iterable[str], add_special: bool = False) -> list[int]:
        ids = [self.stoi.get(t, self.unk_id) for t in tokens]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        return self.encode_tokens(self.tokenize(text), add_special=add_special)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a caption prompt (no `<start>`/`<end>`).

        Byte and char vocabularies keep the prompt's trailing white space ("This is an image of "
        must be followed by a word, not by another space); leading white space is dropped and runs
        of white space become one space, as in the training captions. Word and jieba vocabularies
        tokenize as in training; words missing from the vocabulary become `<unk>` (logged).
        """
        if not text:
            return []
        if self.tokenizer in ("byte", "char"):
            clean = _SPACE_RE.sub(" ", text).lstrip()
            tokens = [_BYTE_TOKENS[b] for b in clean.encode("utf-8")] if self.tokenizer == "byte" else list(clean)
        else:
            tokens = self.tokenize(text)
        ids = self.encode_tokens(tokens)
        unknown = [t for t, i in zip(tokens, ids) if i == self.unk_id]
        if unknown:
            import logging

            logging.getLogger(__name__).warning("prompt tokens not in the vocabulary (fed as <unk>): %s",
                                                " ".join(unknown))
        return ids

    def decode_tokens(self, ids: Iterable[int]) -> list[str]:
        """Tokens up to the first `<end>`, without `<pad>`/`<start>`; `<unk>` is kept."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else UNK)
        return out

    def id_to_token(self, index: int) -> str:
        return self.itos[index] if 0 <= index < len(self.itos) else UNK

    def decode(self, ids: Iterable[int]) -> str:
        return detokenize(self.decode_tokens(ids), self.tokenizer)

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": 1, "tokenizer": self.tokenizer, "min_word_freq": self.min_word_freq,
                "itos": self.itos, "counts": [self.counts.get(t, 0) for t in self.itos]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        try:
            itos = list(d["itos"])
            counts = dict(zip(itos, d.get("counts") or [], strict=False))
            return cls(itos, tokenizer=d.get("tokenizer", "word"), min_word_freq=d.get("min_word_freq", 1),
                       counts=counts)
        except (KeyError, TypeError) as e:
            raise SeesayError(f"not a seesay vocabulary ({e})") from None

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=0) + "\n", encoding="utf-8")

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """DIR/tokenizer.json ({"type": "seesay-vocab", ...}); see `seesay.tokenizers.load_tokenizer`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {"type": "seesay-vocab", **self.to_dict()}
        (directory / TOKENIZER_FILE).write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n",
                                                encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        from seesay.data.formats import load_json

        d = load_json(path)
        if not isinstance(d, dict):
            raise SeesayError(f"{path}: not a seesay vocabulary")
        try:
            return cls.from_dict(d)
        except SeesayError as e:
            raise SeesayError(f"{path}: {e}") from None


def build_vocab(token_lists: Iterable[Sequence[str]], tokenizer: str = "word", min_word_freq: int = 5) -> Vocab:
    """Vocabulary from tokenised training captions (see the module doc for the order).

    The byte tokenizer always gets the fixed 256-byte vocabulary.
    """
    counts: Counter[str] = Counter()
    for toks in token_lists:
        counts.update(toks)
    if tokenizer == "byte":
        return Vocab([*SPECIALS, *_BYTE_TOKENS], tokenizer="byte", min_word_freq=0, counts=dict(counts))
    min_word_freq = max(int(min_word_freq), 1)
    kept = sorted((t for t, c in counts.items() if c >= min_word_freq and t not in SPECIALS),
                  key=lambda t: (-counts[t], t))
    return Vocab([*SPECIALS, *kept], tokenizer=tokenizer, min_word_freq=min_word_freq,
                 counts={t: counts[t] for t in kept})


@register_tokenizer("seesay-vocab")
def _load_vocab(directory: Path, data: dict[str, Any]) -> Vocab:
    return Vocab.from_dict(data)
