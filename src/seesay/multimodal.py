"""The Titans multimodal extension's Python API (`MultimodalMAC`, `ImageProcessor`), working for
real, and the same model as a seesay captioner (family "multimodal_mac").

    from seesay import MultimodalMAC, ImageProcessor
    model = MultimodalMAC(image_size=224, patch_size=16, vision_dim=768, vision_depth=12, vision_heads=12,
                          vision_mlp_dim=3072, vision_dropout=0.1, num_tokens=256, text_dim=384, depth=8,
                          segment_len=32)
    image = model.image_processor.preprocess(pil_image).unsqueeze(0)          # [1, 3, 224, 224]
    prompt = torch.tensor([[ord(c) for c in "This is an image of "] + [model.image_token_id]])
    out = model.generate(prompt, images=image.unsqueeze(1),                    # [B, num_images, 3, H, W]
                         image_positions=torch.tensor([[prompt.shape[1] - 1]]), max_length=100, temperature=0.8)

# b - batch, i - images per sample, k - tokens per image, t - text positions, d - text width
Each image-token position (listed in `image_positions`, or every `image_token_id` when no
positions are given) is replaced by the K tokens of its image: the image is encoded (a
`VisionTransformerEncoder`, or any module given as `vision_encoder=`), projected to the text
width and compressed to K tokens, and the tokens enter titans-pytorch's
`MemoryAsContextTransformer` through its `token_emb` (seesay's `PrefixEmbedding`). Unlike the
public code this API comes from, `generate` conditions on the images (it keeps them in the
sequence and in the library's cache), stops at `eos_token_id`, and treats temperature 0 as
greedy. See docs/titans.md.

Two call styles, told apart by one rule (`is_token_level`): when the first argument of
`generate` or `forward` is token ids (an integer tensor [B, T] or [T]), the call is the
token-level API above (`generate_tokens` / `forward_tokens`, the extension's interface);
images [B,3,H,W] or `encode`'s `EncoderOutput` first make it a captioner call
(`seesay.captioner`): `generate(images, Greedy() | Beam(..) | Sample(..), prompt=, max_len=)
-> DecodeResult`, `forward(src, tokens, lengths) -> DecoderOutput`, `spec()`, checkpoints.
Both styles generate through `seesay.decoding.decode` over one step adapter (`MACStepDecoder`).

As a captioner the sequence is the image's K tokens, then `bos`, the caption and `eos`, as the
`titans_mac` decoder lays it out. The tokenizer (`ByteTokenizer`) maps text to UTF-8 bytes; its
special ids are bytes too, ASCII control codes by default: pad NUL (0), bos STX (2), eos ETX (3),
unk SUB (26) (constructor options `pad_token_id`, `bos_token_id`, `eos_token_id`, `unk_token_id`:
text ids below `num_tokens`; with `num_tokens` > 256 they may be ids beyond the bytes).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seesay.decoders.base import DecoderOutput
from seesay.decoders.titans_mac import (
    PrefixEmbedding,
    build_compressor,
    build_mac,
    mac_extend,
    mac_prefill,
    reorder_mac_cache,
    set_accelerated_scan,
)
from seesay.decoding import Constraints, DecodeResult, Greedy, Sample, Strategy, decode
from seesay.encoders.base import IMAGENET_MEAN, IMAGENET_STD, EncoderOutput
from seesay.errors import SeesayError
from seesay.registry import register_captioner
from seesay.tokenizers import TOKENIZER_FILE, register_tokenizer


class ImageProcessor:
    """An image -> normalised float tensor [3, S, S], what the vision encoder takes.

    Paths, image bytes, PIL images and uint8 arrays are read as `seesay prepare` reads images
    (`seesay.data.images.read_image`: EXIF orientation, any mode to RGB with transparency on
    white, bicubic squash to S x S); [3,H,W] tensors (uint8, or float in [0, 1]) are resized with
    antialiased bicubic interpolation. Then the pixels are scaled to [0, 1] and normalised with
    `mean` / `std` (ImageNet's by default, as the ViT encoder expects).
    """

    def __init__(self, image_size: int = 224, mean: Iterable[float] = IMAGENET_MEAN,
                 std: Iterable[float] = IMAGENET_STD) -> None:
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def preprocess(self, image: Any) -> Tensor:
        if isinstance(image, Tensor):
            x = image.unsqueeze(0) if image.dim() == 2 else image
            if x.dim() != 3 or x.shape[0] not in (1, 3):
                raise SeesayError(f"ImageProcessor: expected a [3,H,W] tensor, got shape {tuple(image.shape)}")
            return self.normalize(x[None])[0]
        from PIL import Image

        from seesay.data.images import read_image

        if not isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image)):
            raise SeesayError(f"ImageProcessor: cannot read an image from {type(image).__name__}")
        arr = read_image(image, self.image_size)[0]  # uint8 (S, S, 3)
        return self.normalize(torch.from_numpy(arr.copy()).permute(2, 0, 1)[None])[0]

    __call__ = preprocess

    def preprocess_batch(self, images: list[Any]) -> Tensor:
        return torch.stack([self.preprocess(im) for im in images])

    def normalize(self, images: Tensor) -> Tensor:
        """Images [B,C,H,W] (C 1 or 3; uint8, or float in [0, 1]) -> normalised float [B,3,S,S]."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        s = self.image_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


# ---- the tokenizer -------------------------------------------------------------------------------

_SPACE_RE = re.compile(r"\s+")
_REPLACEMENT = "\ufffd".encode()


class ByteTokenizer:
    """Text <-> UTF-8 byte ids: `MultimodalMAC`'s tokenizer (the `seesay.tokenizers` contract).

    Ids 0..255 are bytes; with `num_tokens` > 256 the ids beyond the bytes belong to no text (a
    model may use them as dedicated special ids). A byte of the text that is the pad, bos or eos
    id, or not below `num_tokens`, is encoded as unk. `encode` collapses runs of white space and
    strips the ends (as seesay's byte `Vocab` does); `encode_prompt` keeps a trailing space.
    `decode` stops at eos, drops pad, bos and non-byte ids, shows unk as U+FFFD and decodes the
    bytes as UTF-8 (invalid sequences replaced); `id_to_token` names one id (attention pictures).
    """

    kind = "byte"
    TYPE = "seesay-bytes"  # tokenizer.json "type"

    def __init__(self, num_tokens: int = 256, *, pad_id: int = 0x00, bos_id: int = 0x02, eos_id: int = 0x03,
                 unk_id: int = 0x1A) -> None:
        self.num_tokens = int(num_tokens)
        ids = {"pad": pad_id, "bos": bos_id, "eos": eos_id, "unk": unk_id}
        for name, i in ids.items():
            if isinstance(i, bool) or int(i) != i or not 0 <= i < self.num_tokens:
                raise SeesayError(f"{name} id {i!r} is not a text id (an integer in 0..{self.num_tokens - 1}, "
                                  "below num_tokens)")
        if len(set(ids.values())) != len(ids):
            raise SeesayError(f"the special ids must differ, got {ids}")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (int(i) for i in ids.values())
        reserved = {self.pad_id, self.bos_id, self.eos_id}
        self._byte_ids = [b if b < self.num_tokens and b not in reserved else self.unk_id for b in range(256)]

    def __len__(self) -> int:
        return self.num_tokens

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (f"ByteTokenizer(num_tokens={self.num_tokens}, pad_id={self.pad_id}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, unk_id={self.unk_id})")

    def encode(self, text: str) -> list[int]:
        return [self._byte_ids[b] for b in _SPACE_RE.sub(" ", text).strip().encode("utf-8")]

    def encode_prompt(self, text: str) -> list[int]:
        return [self._byte_ids[b] for b in _SPACE_RE.sub(" ", text).lstrip().encode("utf-8")]

    def decode(self, ids: Iterable[int]) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i == self.unk_id:
                out += _REPLACEMENT
            elif 0 <= i < 256 and i not in (self.pad_id, self.bos_id):
                out.append(i)
        return out.decode("utf-8", errors="replace")

    def id_to_token(self, index: int) -> str:
        """Printable ASCII as itself, other bytes as <0xAB>, special ids as <pad> <start> <end> <unk>."""
        index = int(index)
        names = {self.pad_id: "<pad>", self.bos_id: "<start>", self.eos_id: "<end>", self.unk_id: "<unk>"}
        if index in names:
            return names[index]
        if 0x20 <= index < 0x7F:
            return chr(index)
        return f"<0x{index:02X}>" if 0 <= index < min(256, self.num_tokens) else "<unk>"

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "num_tokens": self.num_tokens, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "unk_id": self.unk_id}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """DIR/tokenizer.json; `seesay.tokenizers.load_tokenizer(DIR)` reads it back."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(json.dumps(self.to_dict(), indent=0) + "\n", encoding="utf-8")


@register_tokenizer(ByteTokenizer.TYPE)
def _load_byte_tokenizer(directory: Path, data: dict[str, Any]) -> ByteTokenizer:
    try:
        return ByteTokenizer(int(data["num_tokens"]), **{k: int(data[k]) for k in ("pad_id", "bos_id", "eos_id",
                                                                                   "unk_id")})
    except (KeyError, TypeError, ValueError) as e:
        raise SeesayError(f"not a byte tokenizer ({type(e).__name__}: {e})") from None


# ---- generation through the step contract -------------------------------------------------------


@dataclass
class MACState:
    ids: Tensor  # (R, t) ids fed so far, image placeholders included
    image: Tensor | None  # (R, M, D) image tokens for the placeholders
    cache: tuple | None  # titans-pytorch cache; None: every step recomputes the sequence
    pending: Tensor | None = None  # (R, V) logits the next step returns without feeding its token


class MACStepDecoder:
    """A `MultimodalMAC` through the decoder step contract (`seesay.decoders.base`), for
    `seesay.decoding.decode`.

    Captioner calls (`prompt=None`): `init_state(enc)` prefills the K image tokens of `enc`'s
    images; `decode` then feeds bos (and forces any prompt) through `step`. Token-level calls
    (`prompt=(ids, image_tokens)`, an expanded prompt from `MultimodalMAC._layout`): `init_state`
    prefills the prompt and keeps its last logits, which the first `step` returns without feeding
    `decode`'s bos (a dummy there). `step` feeds one token (`mac_extend` on the library's cache,
    or a full recompute when `use_cache=False`); `reorder_state` picks rows of the ids, image
    tokens and cache. No attention maps (None).
    """

    def __init__(self, model: MultimodalMAC, prompt: tuple[Tensor, Tensor | None] | None = None, *,
                 use_cache: bool = True) -> None:
        self.model = model
        self.prompt = prompt
        self.use_cache = use_cache

    def init_state(self, enc: EncoderOutput) -> MACState:
        m = self.model
        if self.prompt is None:
            image = m.image_tokens(enc)  # (B, K, D)
            ids = torch.full(image.shape[:2], m.image_token_id, dtype=torch.long, device=image.device)
        else:
            ids, image = self.prompt
        mac = m.text_model
        set_accelerated_scan(mac, ids.device)
        with mac.token_emb.images(image):
            if self.use_cache:
                logits, cache = mac_prefill(mac, ids)
            else:
                logits, cache = mac(ids, disable_flex_attn=True)[:, -1], None
        return MACState(ids, image, cache, None if self.prompt is None else logits)

    def step(self, prev_tokens: Tensor, state: MACState) -> tuple[Tensor, MACState, None]:
        if state.pending is not None:
            return F.log_softmax(state.pending.float(), dim=-1), replace(state, pending=None), None
        ids = torch.cat([state.ids, prev_tokens.long().view(-1, 1)], dim=1)
        mac = self.model.text_model
        with mac.token_emb.images(state.image):
            if state.cache is None:
                logits, cache = mac(ids, disable_flex_attn=True)[:, -1], None
            else:
                logits, cache = mac_extend(mac, ids, state.cache)
        return F.log_softmax(logits.float(), dim=-1), MACState(ids, state.image, cache), None

    def reorder_state(self, state: MACState, index: Tensor) -> MACState:
        return MACState(
            state.ids.index_select(0, index),
            None if state.image is None else state.image.index_select(0, index),
            reorder_mac_cache(state.cache, index, self.model.neural_mem_heads),
            None if state.pending is None else state.pending.index_select(0, index),
        )


def is_token_level(first: Any) -> bool:
    """The one rule telling `MultimodalMAC`'s two call styles apart: a first argument that is token
    ids (an integer tensor [B, T] or [T]) makes `generate` / `forward` the token-level API
    (`generate_tokens` / `forward_tokens`); images [B,3,H,W] (any dtype) or an `EncoderOutput`
    make them captioner calls."""
    return isinstance(first, Tensor) and first.dim() <= 2 and not (first.is_floating_point() or first.is_complex())


def _refuse_token_options(where: str, options: dict[str, Any]) -> None:
    if options:
        raise SeesayError(
            f"MultimodalMAC.{where}: {', '.join(sorted(options))} belong to the token-level call, whose first "
            "argument is token ids [B, T]; this call starts with images or features (captioner style)"
        )


# ---- the model -----------------------------------------------------------------------------------


class MultimodalMAC(nn.Module):
    """Vision encoder + Titans MAC transformer over byte (or any) tokens with interleaved images.

    Vision: image_size, patch_size, in_channels (3), vision_dim, vision_depth, vision_heads,
    vision_mlp_dim, vision_dropout build a `VisionTransformerEncoder`; or pass any module as
    `vision_encoder=` (it maps [N,3,H,W] to an `EncoderOutput`, tokens [N,S,D] or vectors [N,D];
    its width is its `out_dim` attribute or `vision_dim`; such a model has no JSON `spec()`, so
    it cannot be saved as a checkpoint). `projection_dim` (optional) adds an MLP before the
    compressor; `fusion_dropout` drops image-token features in training.
    Fusion: `num_image_tokens` (K) tokens per image, `compressor` "pool" or "resampler".
    Text: the remaining keywords go to titans-pytorch's MemoryAsContextTransformer (num_tokens,
    text_dim -> dim, depth, segment_len, heads, dim_head, num_persist_mem_tokens,
    num_longterm_mem_tokens, neural_memory_layers, neural_memory_segment_len, ...), with the
    neural memory's `max_grad_norm` set (1.0) and the issue-#64 parameter fix applied.
    Captioner: `pad_token_id`, `bos_token_id`, `eos_token_id`, `unk_token_id` (bytes NUL, STX,
    ETX, SUB by default) are the special ids of `tokenizer` (a `ByteTokenizer`).

    `image_token_id` = num_tokens: one id beyond the text vocabulary (all 256 bytes stay usable);
    the model never generates it.
    """

    # the neural memory's parameters do not all get a gradient in every step
    ddp_find_unused_parameters = True

    def __init__(
        self,
        *,
        image_size: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        vision_dim: int = 768,
        vision_depth: int = 12,
        vision_heads: int = 12,
        vision_mlp_dim: int = 3072,
        vision_dropout: float = 0.1,
        vision_encoder: nn.Module | None = None,
        num_tokens: int,
        text_dim: int,
        depth: int,
        segment_len: int,
        num_image_tokens: int = 16,
        compressor: str = "pool",
        projection_dim: int | None = None,
        fusion_dropout: float = 0.0,
        dim_head: int = 64,
        heads: int = 8,
        num_persist_mem_tokens: int = 0,
        num_longterm_mem_tokens: int = 0,
        neural_memory_layers: tuple[int, ...] | None = None,
        neural_mem_heads: int = 1,
        max_grad_norm: float | None = 1.0,
        neural_memory_segment_len: int | None = None,
        neural_memory_batch_size: int | None = None,
        neural_memory_kwargs: dict[str, Any] | None = None,
        use_accelerated_scan: bool | str = "auto",
        pad_token_id: int = 0x00,
        bos_token_id: int = 0x02,
        eos_token_id: int = 0x03,
        unk_token_id: int = 0x1A,
        **mac_kwargs: Any,
    ) -> None:
        # every constructor option but the module, for spec(): read before any other local exists
        options = dict(locals())
        for name in ("self", "__class__", "vision_encoder", "mac_kwargs"):
            options.pop(name, None)
        super().__init__()
        self._options = {**options, **mac_kwargs}
        self._custom_vision = vision_encoder is not None
        try:
            self.tokenizer = ByteTokenizer(num_tokens, pad_id=pad_token_id, bos_id=bos_token_id,
                                           eos_id=eos_token_id, unk_id=unk_token_id)
        except SeesayError as e:
            raise SeesayError(f"MultimodalMAC: {e} (options pad/bos/eos/unk_token_id)") from None
        if vision_encoder is None:
            if in_channels != 3:
                raise SeesayError(f"MultimodalMAC: the ViT encoder takes 3-channel images, not {in_channels}")
            from seesay.encoders.vit import VisionTransformerEncoder

            vision_encoder = VisionTransformerEncoder(
                image_size=image_size, patch_size=patch_size, dim=vision_dim, depth=vision_depth,
                heads=vision_heads, mlp_dim=vision_mlp_dim, dropout=vision_dropout,
            )
        self.vision_encoder = vision_encoder
        enc_dim = int(getattr(vision_encoder, "out_dim", vision_dim))
        pre = getattr(vision_encoder, "preprocess", None)
        self.image_processor = ImageProcessor(
            image_size=getattr(pre, "size", image_size),
            mean=getattr(pre, "mean", IMAGENET_MEAN),
            std=getattr(pre, "std", IMAGENET_STD),
        )
        if projection_dim:
            self.image_projection: nn.Module = nn.Sequential(
                nn.Linear(enc_dim, projection_dim), nn.LayerNorm(projection_dim), nn.GELU()
            )
            enc_dim = projection_dim
        else:
            self.image_projection = nn.Identity()
        self.compress = build_compressor(compressor, enc_dim, text_dim, num_image_tokens, heads=min(heads, 8))
        self.fusion_dropout = nn.Dropout(fusion_dropout)
        self.num_tokens = int(num_tokens)
        self.num_image_tokens = int(num_image_tokens)
        self.image_token_id = self.num_tokens
        self.neural_mem_heads = int(neural_mem_heads)
        self.segment_len = int(segment_len)
        self._warned_long = False
        self.text_model = build_mac(
            num_tokens=self.num_tokens,
            dim=text_dim,
            depth=depth,
            segment_len=segment_len,
            token_emb=PrefixEmbedding(self.num_tokens + 1, text_dim, self.image_token_id),
            heads=heads,
            dim_head=dim_head,
            num_persist_mem_tokens=num_persist_mem_tokens,
            num_longterm_mem_tokens=num_longterm_mem_tokens,
            neural_memory_layers=neural_memory_layers,
            neural_mem_heads=neural_mem_heads,
            max_grad_norm=max_grad_norm,
            neural_memory_segment_len=neural_memory_segment_len,
            neural_memory_batch_size=neural_memory_batch_size,
            neural_memory_kwargs=neural_memory_kwargs,
            use_accelerated_scan=use_accelerated_scan,
            **mac_kwargs,
        )

    # ---- images ----
    def preprocess(self, image: Any) -> Tensor:
        """A path, image bytes, a PIL image, an array or a [3,H,W] tensor -> normalised [3, S, S]."""
        return self.image_processor.preprocess(image)

    def preprocess_config(self) -> dict[str, Any]:
        return {"image_processor": self.image_processor.to_dict(), "image_size": self.image_processor.image_size}

    def encode(self, images: Tensor) -> EncoderOutput:
        """Images [B,3,H,W] -> the vision encoder's features (what a feature cache may store).

        uint8 images (0..255, as a prepared split stores them) are normalised by
        `image_processor` first; float images are taken as normalised already (`preprocess`'s
        output), unlike `CaptionModel`, whose float images are in [0, 1].
        """
        x = images.to(self._device())
        if x.dtype == torch.uint8:
            x = self.image_processor.normalize(x)
        return self._vision(x)

    def _vision(self, images: Tensor) -> EncoderOutput:
        out = self.vision_encoder(images)
        if isinstance(out, EncoderOutput):
            return out
        if hasattr(out, "grid"):
            hw = None if out.grid_hw is None else tuple(out.grid_hw)
            pooled = getattr(out, "pooled", None)
            return EncoderOutput(out.grid, out.grid.mean(1) if pooled is None else pooled, hw)
        if isinstance(out, Tensor) and out.dim() == 3:
            return EncoderOutput(out, out.mean(1), None)
        if isinstance(out, Tensor) and out.dim() == 2:
            return EncoderOutput(out.unsqueeze(1), out, None)
        raise SeesayError("MultimodalMAC: the vision encoder must return an EncoderOutput, [N,S,D] or [N,D]")

    def image_tokens(self, enc: EncoderOutput) -> Tensor:
        """Vision features -> the K image tokens [N, K, text_dim] that stand for each image."""
        hw = None if enc.grid_hw is None else tuple(int(v) for v in enc.grid_hw)
        return self.fusion_dropout(self.compress(self.image_projection(enc.grid), hw))

    def encode_images(self, images: Tensor) -> Tensor:
        """Normalised images [N,3,H,W] -> image tokens [N, K, text_dim]."""
        return self.image_tokens(self._vision(images))

    # ---- the captioner contract (see seesay.captioner) ----
    def forward(self, src: Any, tokens: Tensor | None = None, lengths: Tensor | None = None,
                image_rows: Tensor | None = None, **token_level: Any) -> DecoderOutput | Tensor:
        """`forward(src, tokens, lengths, image_rows=None) -> DecoderOutput`: teacher forcing of
        caption rows `bos w1 .. wn eos pad..` after their image's K tokens; logits [R, T-1,
        num_tokens] (logits[:, t] predicts tokens[:, t+1]). `src` is images [B,3,H,W] or
        `encode`'s features; `image_rows` [R] names each row's image (None: row i is image i).

        With token ids first (`is_token_level`) this is `forward_tokens(tokens, images=...,
        image_positions=..., return_loss=True, lengths=None)`, the token-level API (its images
        may also come second, positionally)."""
        if is_token_level(src):
            if image_rows is not None:
                raise SeesayError("MultimodalMAC.forward: image_rows belongs to captioner calls (images first)")
            if tokens is not None:
                if "images" in token_level:
                    raise SeesayError("MultimodalMAC.forward: images given twice")
                token_level["images"] = tokens
            return self.forward_tokens(src, lengths=lengths, **token_level)
        _refuse_token_options("forward", token_level)
        if tokens is None or lengths is None:
            raise SeesayError("MultimodalMAC.forward(src, tokens, lengths): tokens and lengths are required")
        enc = src if isinstance(src, EncoderOutput) else self.encode(src)
        image = self.image_tokens(enc)  # (B, K, D): once per image
        if image_rows is not None:
            image = image.index_select(0, image_rows.to(image.device))
        tokens = tokens.long().to(image.device)
        r, t = tokens.shape
        k = self.num_image_tokens
        self._warn_long(k + t - 1)
        ids = torch.cat([tokens.new_full((r, k), self.image_token_id), tokens[:, :-1]], dim=1)
        return DecoderOutput(self._run(ids, image)[:, k:], None, {})

    @torch.no_grad()
    def generate(self, src: Any, strategy: Strategy | Tensor = Greedy(), *, prompt: Any = None, max_len: int = 50,
                 generator: torch.Generator | None = None, constraints: Constraints | None = None,
                 num_captions: int = 1, **token_level: Any) -> DecodeResult | Tensor:
        """`generate(images or features, strategy=Greedy(), *, prompt=None, max_len=50) ->
        DecodeResult`: captions of `tokenizer`'s ids, each starting with `prompt` (text or ids);
        `max_len` counts the tokens after the prompt; stops at the tokenizer's eos.

        With token ids first (`is_token_level`) this is `generate_tokens(prompt, images=...,
        image_positions=..., max_length=..., temperature=..., eos_token_id=..., top_k=...,
        top_p=..., use_cache=..., generator=...)`, the token-level API, which returns the new
        tokens [B, <= max_length - T] (its images may also come second, positionally)."""
        if is_token_level(src):
            if isinstance(strategy, Tensor):
                if "images" in token_level:
                    raise SeesayError("MultimodalMAC.generate: images given twice")
                token_level["images"] = strategy
            elif (strategy != Greedy() or prompt is not None or max_len != 50 or constraints is not None
                  or num_captions != 1):
                raise SeesayError("MultimodalMAC.generate: with token ids first (the token-level call) the "
                                  "options are images=, image_positions=, max_length=, temperature=, top_k=, "
                                  "top_p=, eos_token_id=; strategy, prompt and max_len need images first "
                                  "(so do constraints and num_captions)")
            return self.generate_tokens(src, generator=generator, **token_level)
        _refuse_token_options("generate", token_level)
        from seesay.captioner import prompt_ids, resolve_constraints

        tok = self.tokenizer
        constraints = resolve_constraints(tok, constraints)
        ids = prompt_ids(tok, prompt)
        bad = sorted({i for i in ids if not 0 <= i < self.num_tokens or i in (tok.eos_id, tok.pad_id)})
        if bad:
            raise SeesayError(f"MultimodalMAC.generate: prompt ids {bad[:5]} are not caption text ids "
                              f"(0..{self.num_tokens - 1}, not eos {tok.eos_id} or pad {tok.pad_id})")
        with self._eval_mode():
            enc = src if isinstance(src, EncoderOutput) else self.encode(src)
            prefix = torch.tensor(ids, dtype=torch.long, device=enc.grid.device) if ids else None
            return decode(MACStepDecoder(self), enc, strategy, bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id,
                          max_len=max_len, prefix=prefix, generator=generator, constraints=constraints,
                          num_captions=num_captions)

    def spec(self) -> dict[str, Any]:
        """{"captioner": "multimodal_mac", **constructor options}: plain JSON that rebuilds it."""
        if self._custom_vision:
            raise SeesayError("MultimodalMAC: a model built with a custom vision_encoder= module cannot be saved "
                              "as a checkpoint (its architecture is not plain JSON)")
        try:
            return json.loads(json.dumps({"captioner": "multimodal_mac", **self._options}, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise SeesayError(f"MultimodalMAC: the constructor options are not plain JSON ({e}), so this "
                              "model cannot be saved as a checkpoint") from None

    def step_decoder(self, *, use_cache: bool = True) -> MACStepDecoder:
        """This model through the decoder step contract (captioner layout: image tokens, bos, caption)."""
        return MACStepDecoder(self, use_cache=use_cache)

    # ---- training capabilities (seesay.captioner) ----
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        vision = {id(p) for p in self.vision_encoder.parameters()}
        return {"encoder": [p for p in self.vision_encoder.parameters() if p.requires_grad],
                "decoder": [p for p in self.parameters() if p.requires_grad and id(p) not in vision]}

    def set_fine_tune(self, flag: bool) -> None:
        """Train (True) or freeze (False) the vision encoder; projection, compressor and text model always train."""
        if hasattr(self.vision_encoder, "set_fine_tune"):
            self.vision_encoder.set_fine_tune(flag)
        else:
            for p in self.vision_encoder.parameters():
                p.requires_grad_(flag)

    @property
    def features_trainable(self) -> bool:
        return any(p.requires_grad for p in self.vision_encoder.parameters())

    @property
    def image_model_pretrained(self) -> bool:
        """Whether the vision encoder came with pretrained weights (training's auto fine-tuning
        trains it when not)."""
        return bool(getattr(self.vision_encoder, "pretrained", False))

    # ---- the token-level API (the Titans multimodal extension's interface) ----
    def _layout(self, tokens: Tensor, images: Tensor | None, image_positions: Tensor | None):
        """Expand image markers to K placeholders. Returns (ids [B,T'], lengths [B], image tokens
        [B, M*K, D] | None, last [B,T] expanded index of each original position, is_marker [B,T])."""
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        b, t = tokens.shape
        k = self.num_image_tokens
        tokens = tokens.long()
        is_marker = torch.zeros_like(tokens, dtype=torch.bool)
        image_tokens = None
        if images is not None:
            if images.dim() == 4:  # [B,3,H,W]: one image per sample
                images = images.unsqueeze(1)
            if images.dim() != 5 or images.shape[0] != b:
                raise SeesayError(
                    f"MultimodalMAC: images must be [B, num_images, 3, H, W] with B={b}, got {tuple(images.shape)}"
                )
            n_img = images.shape[1]
            if image_positions is None:
                is_marker = tokens == self.image_token_id
                counts = is_marker.sum(1)
                if bool((counts != n_img).any()):
                    raise SeesayError(
                        f"MultimodalMAC: {counts.tolist()} image tokens per sample but {n_img} images each; "
                        "pass image_positions"
                    )
                order = torch.arange(n_img, device=tokens.device).expand(b, -1)
            else:
                pos = torch.as_tensor(image_positions, device=tokens.device).long()
                if pos.dim() == 1:
                    pos = pos.unsqueeze(1)
                if pos.shape != (b, n_img):
                    raise SeesayError(
                        f"MultimodalMAC: image_positions must be [B, num_images] = {(b, n_img)}, got {tuple(pos.shape)}"
                    )
                if bool((pos >= t).any()):
                    raise SeesayError(f"MultimodalMAC: image position {int(pos.max())} beyond the {t} tokens")
                valid = pos >= 0
                rows = torch.arange(b, device=tokens.device)[:, None].expand_as(pos)
                is_marker[rows[valid], pos[valid]] = True
                if int(is_marker.sum()) != int(valid.sum()):
                    raise SeesayError("MultimodalMAC: two images at the same position")
                stray = (tokens == self.image_token_id) & ~is_marker
                if bool(stray.any()):
                    raise SeesayError("MultimodalMAC: image_token_id at a position not listed in image_positions")
                # images of a row in the order of their positions; invalid (-1) ones last
                order = torch.where(valid, pos, t + torch.arange(n_img, device=pos.device)).argsort(dim=1)
            flat = self.encode_images(images.flatten(0, 1))  # (B*I, K, D)
            per = flat.view(b, n_img, k, -1)
            per = per.gather(1, order[:, :, None, None].expand(-1, -1, k, per.shape[-1]))
            image_tokens = per.flatten(1, 2)  # (B, I*K, D): rows' images in position order
        elif image_positions is not None or bool((tokens == self.image_token_id).any()):
            raise SeesayError("MultimodalMAC: image tokens or positions given without images")
        reps = torch.where(is_marker, k, 1)
        last = reps.cumsum(1) - 1  # expanded index of the last element of each original position
        lengths = reps.sum(1)
        width = int(lengths.max())
        ids = tokens.new_zeros(b, width)
        src = tokens.masked_fill(is_marker, self.image_token_id)
        for r in range(b):  # B rows, each one vectorised repeat_interleave
            ids[r, : int(lengths[r])] = src[r].repeat_interleave(reps[r])
        return ids, lengths, image_tokens, last, is_marker

    def _run(self, ids: Tensor, image_tokens: Tensor | None) -> Tensor:
        set_accelerated_scan(self.text_model, ids.device)
        with self.text_model.token_emb.images(image_tokens):
            return self.text_model(ids, disable_flex_attn=not ids.is_cuda)

    def forward_tokens(self, tokens: Tensor, images: Tensor | None = None, image_positions: Tensor | None = None,
                       return_loss: bool = True, lengths: Tensor | None = None) -> Tensor:
        """return_loss=True: mean cross-entropy of every text token predicted from what precedes
        it (image tokens and padding beyond `lengths` are never targets). Otherwise logits
        [B, T, num_tokens] aligned with `tokens` (logits[:, t] predicts tokens[:, t+1]; at an
        image position they come from the image's last token)."""
        ids, exp_len, image_tokens, last, is_marker = self._layout(tokens, images, image_positions)
        logits = self._run(ids, image_tokens)
        logits = logits.gather(1, last.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, T, V)
        if not return_loss:
            return logits
        tokens = tokens.long() if tokens.dim() == 2 else tokens.long().unsqueeze(0)
        target_ok = ~is_marker[:, 1:]
        if lengths is not None:
            pos = torch.arange(1, tokens.shape[1], device=tokens.device)
            target_ok = target_ok & (pos[None, :] < lengths.to(tokens.device)[:, None])
        targets = tokens[:, 1:].masked_fill(~target_ok, 0)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, reduction="none")
        return (ce * target_ok).sum() / target_ok.sum().clamp(min=1)

    @torch.no_grad()
    def generate_tokens(
        self,
        prompt: Tensor,
        images: Tensor | None = None,
        image_positions: Tensor | None = None,
        max_length: int = 100,
        temperature: float = 1.0,
        eos_token_id: int | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue `prompt` [B, T] up to `max_length` tokens in all and return the new tokens
        [B, <= max_length - T].

        `max_length` counts the prompt as given (each image marker once), as the public code did;
        a `max_length` not above T is refused (SeesayError) rather than returning nothing: for N
        new tokens pass max_length = T + N. temperature 0 is greedy (`Sample(temperature=0)`);
        otherwise the logits are divided by it and filtered by top_k / top_p before sampling.
        With `eos_token_id`, a row stops at it (later positions repeat it) and generation ends
        when every row has stopped; None never stops early (the tokenizer's eos plays no part
        here). Runs through `seesay.decoding.decode` (`MACStepDecoder` with the prompt prefilled).
        """
        if prompt.dim() == 1:
            prompt = prompt.unsqueeze(0)
        b, t = prompt.shape
        steps = int(max_length) - t
        if steps <= 0:
            raise SeesayError(
                f"MultimodalMAC.generate: max_length={max_length} counts the prompt's {t} tokens (each image "
                f"marker once), so it must be above {t}; for N new tokens pass max_length={t} + N"
            )
        try:
            strategy = Sample(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
        except ValueError as e:
            raise SeesayError(f"MultimodalMAC.generate: {e}") from None
        with self._eval_mode():  # before encoding the images: no dropout in generation
            ids, lengths, image_tokens, _, _ = self._layout(prompt, images, image_positions)
            if bool((lengths != lengths[0]).any()):  # rows of different expanded length: one at a time
                outs = [
                    self.generate_tokens(
                        prompt[r: r + 1],
                        None if images is None else images[r: r + 1],
                        None if image_positions is None else torch.as_tensor(image_positions)[r: r + 1],
                        max_length, temperature, eos_token_id, top_k, top_p, use_cache, generator,
                    )
                    for r in range(b)
                ]
                width = max(o.shape[1] for o in outs)
                fill = 0 if eos_token_id is None else eos_token_id
                return torch.cat([F.pad(o, (0, width - o.shape[1]), value=fill) for o in outs])
            # decode needs a batch size and a device; the image tokens travel in the prompt
            enc = EncoderOutput(ids.new_zeros(b, 0, 1, dtype=torch.float32), ids.new_zeros(b, 1, dtype=torch.float32),
                                None)
            eos = -1 if eos_token_id is None else int(eos_token_id)  # -1: never produced
            res = decode(MACStepDecoder(self, (ids, image_tokens), use_cache=use_cache), enc, strategy,
                         bos=0, eos=eos, pad=max(eos, 0), max_len=steps, generator=generator)
        return res.tokens

    # ---- helpers ----
    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    def _warn_long(self, n: int) -> None:
        if n > self.segment_len and not self._warned_long:
            warnings.warn(
                f"MultimodalMAC: {self.num_image_tokens} image tokens + {n - self.num_image_tokens} caption inputs "
                f"exceed segment_len={self.segment_len}; words beyond the first window see the image only "
                "through the neural memory",
                stacklevel=3,
            )
            self._warned_long = True

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


@register_captioner("multimodal_mac")
def _build(spec: dict[str, Any], tokenizer: Any, preprocess: dict[str, Any] | None,
           external_weights: bool) -> MultimodalMAC:
    """`MultimodalMAC(**spec)` without "captioner"; a checkpoint's tokenizer and image settings
    replace the defaults. Any other tokenizer (a prepared dataset's word vocabulary, when
    `seesay train --set captioner.family=multimodal_mac` builds one) is not used: the model keeps
    its own byte tokenizer, and training re-encodes the captions with it. `external_weights` has no effect: the ViT is built without pretrained files."""
    options = {k: v for k, v in spec.items() if k != "captioner"}
    if "vision_encoder" in options:
        raise SeesayError("multimodal_mac spec: vision_encoder (a module) cannot come from a spec")
    model = MultimodalMAC(**options)
    proc = (preprocess or {}).get("image_processor")
    if proc:
        try:
            model.image_processor = ImageProcessor(int(proc["image_size"]), proc["mean"], proc["std"])
        except (KeyError, TypeError, ValueError) as e:
            raise SeesayError(f"multimodal_mac: bad image_processor settings {proc!r} ({e})") from None
    if tokenizer is not None and isinstance(tokenizer, ByteTokenizer):  # a checkpoint's own tokenizer
        if len(tokenizer) != model.num_tokens:
            raise SeesayError(f"multimodal_mac: the tokenizer has {len(tokenizer)} ids but the spec says "
                              f"num_tokens {model.num_tokens}")
        model.tokenizer = tokenizer
    return model
