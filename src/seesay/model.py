"""CaptionModel: an encoder and a decoder composed, plus the spec that rebuilds them.

# b - images, r - caption rows, t - time
`spec` = {"encoder": {"name": ..., **kwargs}, "decoder": {"name": ..., "vocab_size": V, **kwargs}}
is plain JSON, saved in checkpoints; `build_model(spec)` rebuilds the same architecture.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from seesay.decoders.base import Decoder, DecoderOutput
from seesay.decoding import DecodeResult, beam_search, greedy, sample
from seesay.encoders.base import Encoder, EncoderOutput, Preprocess
from seesay.errors import SeesayError
from seesay.registry import build_decoder, build_encoder


def pick_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """"auto" (or None) is CUDA when available, else CPU; bare "cuda" means this process's GPU."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)

class CaptionModel(nn.Module):
    def __init__(self, encoder: Encoder, decoder: Decoder, spec: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.spec = copy.deepcopy(spec) if spec is not None else {}

    @property
    def preprocess(self) -> Preprocess:
        return self.encoder.preprocess

    def encode(self, images: Tensor) -> EncoderOutput:
        """uint8 [B,3,H,W] (0..255) or float [B,3,H,W] (0..1) images -> EncoderOutput."""
        x = self.preprocess(images.to(self._device()))
        return self.encoder(x)

    def forward(self, images: Tensor, tokens: Tensor, lengths: Tensor, image_rows: Tensor | None = None) -> DecoderOutput:
        """Teacher forcing. Each image is encoded once; `image_rows` [R] names the image of each caption row."""
        return self.forward_features(self.encode(images), tokens, lengths, image_rows)

    def forward_features(self, enc: EncoderOutput, tokens: Tensor, lengths: Tensor,
                         image_rows: Tensor | None = None) -> DecoderOutput:
        if image_rows is not None:
            enc = enc.index_select(image_rows.to(enc.grid.device))
        return self.decoder(enc, tokens, lengths)

    @torch.no_grad()
    def generate(self, images_or_enc: Tensor | EncoderOutput, *, bos: int, eos: int, max_len: int = 50,
                 beam_size: int = 1, length_penalty: float = 0.0, temperature: float | None = None, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> DecodeResult:
        """Caption images (or cached encoder outputs).

        Sampling when `temperature` is given (or top_k/top_p filter), otherwise beam search
        (greedy for beam_size 1).
        """
        enc = images_or_enc if isinstance(images_or_enc, EncoderOutput) else self.encode(images_or_enc)
        if temperature is not None or top_k > 0 or top_p < 1.0:
            return sample(self.decoder, enc, bos=bos, eos=eos, max_len=max_len, temperature=temperature or 1.0,
                          top_k=top_k, top_p=top_p, generator=generator)
        if beam_size <= 1:
            return greedy(self.decoder, enc, bos=bos, eos=eos, max_len=max_len)
        return beam_search(self.decoder, enc, bos=bos, eos=eos, beam_size=beam_size, max_len=max_len,
                           length_penalty=length_penalty)

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


def build_model(spec: dict[str, Any], *, glove_itos: Sequence[str] | None = None) -> CaptionModel:
    """Build the encoder and decoder named in `spec`.

    The decoder receives `enc_dim` from the encoder's `out_dim`; `glove_itos` (the vocabulary's
    id -> word list) is passed to decoders configured with GloVe embeddings.
    """
    try:
        enc_spec = dict(spec["encoder"])
        dec_spec = dict(spec["decoder"])
        enc_name = enc_spec.pop("name")
        dec_name = dec_spec.pop("name")
    except (KeyError, TypeError) as e:
        raise SeesayError(f"model spec needs encoder.name and decoder.name ({e!r} missing)") from None
    if "vocab_size" not in dec_spec:
        raise SeesayError("model spec: decoder.vocab_size is required")
    encoder = build_encoder(enc_name, **enc_spec)
    dec_spec["enc_dim"] = encoder.out_dim
    if glove_itos is not None and dec_spec.get("glove"):
        dec_spec["glove_itos"] = list(glove_itos)
    decoder = build_decoder(dec_name, **dec_spec)
    return CaptionModel(encoder, decoder, spec)
