"""A SentencePiece tokenizer (the `spm` extra) implementing `seesay.tokenizers.Tokenizer`.

Two sources:

- T5's own `spiece.model` (a local T5 directory, or the file): T5's ids, pad 0, eos 1 ("</s>"),
  unk 2, its pieces, then the 100 sentinels as T5 numbers them, `<extra_id_0>` at the top
  (id 32099 for T5's 32000 pieces, `<extra_id_99>` at 32000). seesay's captions need a bos
  distinct from pad (`<bos> w.. <eos> <pad>..`), and T5 has none: `<s>` is added after the
  sentinels (id 32100; 32101 tokens in all). The `t5` decoder never feeds it to T5: its first
  decoder input is always T5's decoder_start (pad), so pretrained T5 sees exactly its own inputs.
  The model's 32128-row embedding is resized to the tokenizer's 32101 (logged).
- trained by seesay (`train_sentencepiece`, in-process, offline, seconds): unigram, N pieces,
  pad 0, eos 1 ("</s>"), unk 2, bos 3 ("<s>"), and `<extra_id_0>` .. `<extra_id_99>` as
  user-defined symbols (ids 4..103, never split, never produced from plain text).

Tokens beyond the model's pieces (T5's sentinels and `<s>`, `add_tokens([...])` such as issue
13's `<img_i>` / `<loc_i>`) get ids after the pieces, in order; text containing them encodes
each as one id. `decode` stops at eos and drops pad and bos; sentinels and added tokens stay as
text (span-corruption targets read back as `<extra_id_0> ...`). Saved as DIR/tokenizer.json
(type "sentencepiece", special ids, added tokens) + DIR/spiece.model.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from seesay.errors import SeesayError, missing_extra
from seesay.tokenizers import TOKENIZER_FILE, register_tokenizer

log = logging.getLogger(__name__)

MODEL_FILE = "spiece.model"
NUM_SENTINELS = 100
PAD, EOS, UNK, BOS = "<pad>", "</s>", "<unk>", "<s>"


_ANGLED = re.compile(r"<[^<>\s]+>")


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


def _require_sentencepiece() -> Any:
    try:
        import sentencepiece
    except ImportError as e:
        raise missing_extra("sentencepiece", "spm") from e
    return sentencepiece


class SentencePieceTokenizer:
    """A SentencePiece model plus tokens added after its pieces; see the module doc."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, added_tokens: Sequence[str] = (), *, source: str = "trained") -> None:
        spm = _require_sentencepiece()
        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_proto)
        except (RuntimeError, OSError) as e:
            raise SeesayError(f"not a SentencePiece model ({str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
        self.source = source
        self.added: list[str] = []
        self._added_ids: dict[str, int] = {}
        self._pattern: re.Pattern[str] | None = None
        for t in added_tokens:
            self._add(t)
        self.pad_id = self._special(PAD, self.sp.pad_id())
        self.eos_id = self._special(EOS, self.sp.eos_id())
        self.unk_id = self.sp.unk_id()
        self.bos_id = self._special(BOS, self.sp.bos_id())
        if len({self.pad_id, self.eos_id, self.unk_id, self.bos_id}) != 4:
            raise SeesayError("the SentencePiece model's pad, eos, unk and bos ids are not distinct")

    # -- vocabulary --------------------------------------------------------------------------------
    def _special(self, piece: str, sp_id: int) -> int:
        if sp_id >= 0:
            return int(sp_id)
        found = self.token_to_id(piece)
        return found if found is not None else self._add(piece)

    def _add(self, token: str) -> int:
        if token in self._added_ids:
            return self._added_ids[token]
        self._added_ids[token] = self.sp.get_piece_size() + len(self.added)
        self.added.append(token)
        self._pattern = None
        return self._added_ids[token]

    def add_tokens(self, tokens: Iterable[str]) -> list[int]:
        """Ids of `tokens`, adding the ones the vocabulary lacks after the last id (in order)."""
        out = []
        for t in tokens:
            if not isinstance(t, str) or not t or t != t.strip():
                raise SeesayError(f"add_tokens: {t!r} is not a token (a non-empty string without surrounding spaces)")
            known = self.token_to_id(t)
            out.append(known if known is not None else self._add(t))
        return out

    def token_to_id(self, token: str) -> int | None:
        if token in self._added_ids:
            return self._added_ids[token]
        i = self.sp.piece_to_id(token)
        return int(i) if i != self.sp.unk_id() or token == self.sp.id_to_piece(self.sp.unk_id()) else None

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of `<extra_id_0>`, `<extra_id_1>`, ... (span corruption), `<extra_id_0>` first."""
        out = []
        for i in range(10_000):
            j = self.token_to_id(sentinel(i))
            if j is None:
                break
            out.append(j)
        return out

    def __len__(self) -> int:
        return self.sp.get_piece_size() + len(self.added)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SentencePieceTokenizer) and self.model_proto == other.model_proto
                and self.added == other.added)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(size={len(self)}, source={self.source!r})"

    def id_to_token(self, index: int) -> str:
        index = int(index)
        n = self.sp.get_piece_size()
        if 0 <= index < n:
            return self.sp.id_to_piece(index)
        if n <= index < len(self):
            return self.added[index - n]
        return self.sp.id_to_piece(self.unk_id)

    # -- encoding ------------------------------------------------------------------------------------
    def _split_added(self, text: str) -> list[tuple[str, bool]]:
        """Text cut at added tokens: [(chunk, is_added_token)]."""
        if not self.added:
            return [(text, False)]
        if self._pattern is None:  # `<...>` tokens (sentinels, thousands of <img_i>/<loc_i>) by one rule + a dict
            other = [re.escape(t) for t in sorted(self.added, key=len, reverse=True) if not _ANGLED.fullmatch(t)]
            self._pattern = re.compile("(" + "|".join([_ANGLED.pattern, *other]) + ")")
        out: list[tuple[str, bool]] = []
        for i, part in enumerate(self._pattern.split(text)):
            if not part:
                continue
            added = i % 2 == 1 and part in self._added_ids
            if not added and out and not out[-1][1]:  # an unknown `<word>` stays in its text
                out[-1] = (out[-1][0] + part, False)
            else:
                out.append((part, added))
        return out

    def tokenize(self, text: str) -> list[str]:
        """Pieces of `text` (added tokens whole): what `seesay prepare` stores and counts."""
        out: list[str] = []
        for part, added in self._split_added(text):
            if added:
                out.append(part)
            elif part.strip():
                out.extend(self.sp.encode(part, out_type=str))
        return out

    def encode_tokens(self, tokens: Iterable[str], add_special: bool = False) -> list[int]:
        ids = [self._added_ids[t] if t in self._added_ids else int(self.sp.piece_to_id(t)) for t in tokens]
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        ids: list[int] = []
        for part, added in self._split_added(text):
            if added:
                ids.append(self._added_ids[part])
            elif part.strip():
                ids.extend(int(i) for i in self.sp.encode(part))
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt (a prefix, or T5's input text): as `encode`, no bos / eos."""
        return self.encode(text or "")

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` up to the first eos; pad and bos dropped, added tokens (sentinels) kept."""
        n = self.sp.get_piece_size()
        words: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            if 0 <= i < n:
                run.append(i)
                continue
            if run:
                words.append(self.sp.decode(run))
                run = []
            words.append(self.id_to_token(i))
        if run:
            words.append(self.sp.decode(run))
        return " ".join(w.strip() for w in words if w.strip())

    # -- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """DIR/tokenizer.json ({"type": "sentencepiece", ...}) + DIR/spiece.model."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_FILE).write_bytes(self.model_proto)
        data = {"type": "sentencepiece", "model_file": MODEL_FILE, "source": self.source, "added_tokens": self.added,
                "pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "unk_id": self.unk_id,
                "size": len(self)}
        (directory / TOKENIZER_FILE).write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")


@register_tokenizer("sentencepiece")
def _load(directory: Path, data: dict[str, Any]) -> SentencePieceTokenizer:
    path = directory / str(data.get("model_file", MODEL_FILE))
    try:
        proto = path.read_bytes()
    except OSError as e:
        raise SeesayError(f"{path}: cannot read the SentencePiece model ({e.strerror or e})") from None
    added = data.get("added_tokens", [])
    if not isinstance(added, list) or not all(isinstance(t, str) for t in added):
        raise SeesayError("added_tokens must be a list of strings")
    tok = SentencePieceTokenizer(proto, added, source=str(data.get("source", "trained")))
    for key in ("pad_id", "bos_id", "eos_id", "unk_id", "size"):
        want = data.get(key)
        got = len(tok) if key == "size" else getattr(tok, key)
        if want is not None and int(want) != got:
            raise SeesayError(f"{key} is {want} in the file but {got} in {path.name}")
    return tok


# ---------------------------------------------------------------------------------------------
# Sources: T5's spiece.model, a trained model.


def load_sentencepiece(path: str | os.PathLike, option: str = "--tokenizer-model") -> SentencePieceTokenizer:
    """A SentencePiece tokenizer from a seesay tokenizer directory, a T5 directory (spiece.model),
    or a .model file. A model without `<extra_id_0>` among its pieces (T5's) gets T5's 100
    sentinels and, lacking one, a `<s>` bos after its pieces."""
    path = Path(path).expanduser()
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file() and _is_seesay_dir(path / TOKENIZER_FILE):
            from seesay.tokenizers import load_tokenizer

            return load_tokenizer(path)
        model = path / MODEL_FILE
        if not model.is_file():
            raise SeesayError(f"{option} {path}: no {MODEL_FILE} in this directory (a T5 model directory has one)")
        path = model
    try:
        proto = path.read_bytes()
    except FileNotFoundError:
        raise SeesayError(f"{option} {path}: no such file or directory") from None
    except OSError as e:
        raise SeesayError(f"{option} {path}: cannot read ({e.strerror or e})") from None
    try:
        probe = SentencePieceTokenizer(proto)
    except SeesayError as e:
        raise SeesayError(f"{option} {path}: {e}") from None
    if probe.token_to_id(sentinel(0)) is not None:
        return probe  # seesay-trained: sentinels are pieces
    added = [sentinel(i) for i in reversed(range(NUM_SENTINELS))]  # T5: <extra_id_0> at the top
    return SentencePieceTokenizer(proto, added, source="t5")


def _is_seesay_dir(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("type") == "sentencepiece"
    except (OSError, ValueError, AttributeError):
        return False


def train_sentencepiece(sentences: Iterable[str], vocab_size: int, *, model_type: str = "unigram",
                        character_coverage: float = 0.9995) -> SentencePieceTokenizer:
    """A SentencePiece model trained in-process on `sentences` (see the module doc for the ids).

    `vocab_size` counts every piece (the 4 specials and 100 sentinels too); on a small corpus
    SentencePiece may stop below it (a soft limit). Deterministic for the same sentences."""
    spm = _require_sentencepiece()
    import io

    if isinstance(vocab_size, bool) or int(vocab_size) != vocab_size or vocab_size < 4 + NUM_SENTINELS + 1:
        raise SeesayError(f"--vocab-size must be an integer above {4 + NUM_SENTINELS} (4 specials and "
                          f"{NUM_SENTINELS} sentinels are pieces too), not {vocab_size!r}")
    text = [s.strip() for s in sentences if s and s.strip()]
    if not text:
        raise SeesayError("no captions to train the SentencePiece model on")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text), model_writer=buf, vocab_size=int(vocab_size), model_type=model_type,
            character_coverage=character_coverage, pad_id=0, eos_id=1, unk_id=2, bos_id=3, pad_piece=PAD,
            eos_piece=EOS, unk_piece=UNK, bos_piece=BOS,
            user_defined_symbols=[sentinel(i) for i in range(NUM_SENTINELS)], hard_vocab_limit=False,
            num_threads=1, minloglevel=2, train_extremely_large_corpus=False)
    except (RuntimeError, OSError) as e:
        raise SeesayError(f"training the SentencePiece model failed ({str(e).strip().splitlines()[0]})") from None
    tok = SentencePieceTokenizer(buf.getvalue(), source="trained")
    log.info("trained a %s SentencePiece model on %d captions: %d pieces", model_type, len(text), len(tok))
    return tok


def prepare_options(vocab_size: int | None, tokenizer_model: str | os.PathLike | None) -> dict[str, Any]:
    """`seesay prepare --tokenizer sentencepiece` options as they enter the dataset's fingerprint:
    the --tokenizer-model file's absolute path and SHA-256, or the --vocab-size to train with."""
    import hashlib

    if tokenizer_model is not None:
        path = Path(tokenizer_model).expanduser().absolute()
        model = path / MODEL_FILE if path.is_dir() else path
        if not model.is_file():
            raise SeesayError(f"--tokenizer-model {tokenizer_model}: no such file, and not a directory with "
                              f"{MODEL_FILE} (a T5 model directory has one)")
        try:
            digest = hashlib.sha256(model.read_bytes()).hexdigest()
        except OSError as e:
            raise SeesayError(f"--tokenizer-model {model}: cannot read ({e.strerror or e})") from None
        return {"tokenizer_model": str(path), "tokenizer_model_sha256": digest}
    if vocab_size is None:
        raise SeesayError("--tokenizer sentencepiece needs --vocab-size N (to train one on the training captions) "
                          "or --tokenizer-model PATH (a T5 directory or a .model file)")
    if isinstance(vocab_size, bool) or int(vocab_size) != vocab_size or vocab_size <= 4 + NUM_SENTINELS:
        raise SeesayError(f"--vocab-size must be an integer above {4 + NUM_SENTINELS} (4 specials and "
                          f"{NUM_SENTINELS} sentinels are pieces too), not {vocab_size!r}")
    return {"spm_vocab_size": int(vocab_size)}


def sentencepiece_for_prepare(records: Sequence[Any], options: dict[str, Any], split: str = "train"
                              ) -> SentencePieceTokenizer:
    """The tokenizer `prepare_options` describes: the --tokenizer-model's, or one trained on the
    `split` captions (every caption of the split's records, before images are checked)."""
    if options.get("tokenizer_model"):
        return load_sentencepiece(options["tokenizer_model"])
    sentences = [s for r in records if r.split == split for s in r.sentences]
    if not sentences:
        raise SeesayError(f"--tokenizer sentencepiece: the {split!r} split has no captions to train it on")
    return train_sentencepiece(sentences, int(options["spm_vocab_size"]))
