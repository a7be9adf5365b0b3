"""CaptionModel: an encoder and a step decoder composed into a captioner (`seesay.captioner`).

# b - images, r - caption rows, t - time
`spec()` = {"captioner": "encoder_decoder", "encoder": {"name": ..., **kwargs},
"decoder": {"name": ..., "vocab_size": V, **kwargs}} is plain JSON, saved in checkpoints;
`build_model(spec)` (or `seesay.registry.build_captioner`) rebuilds the same architecture.
The model holds its tokenizer and the size its training images were prepared at, so
`preprocess` and `generate` need nothing else.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import Tensor, nn

from seesay.decoders.base import Decoder, DecoderOutput
from seesay.decoding import Constraints, DecodeResult, Greedy, Strategy, decode
from seesay.encoders.base import Encoder, EncoderOutput
from seesay.errors import SeesayError
from seesay.registry import build_decoder, build_encoder, register_captioner, takes_option

_DEVICE_TYPES = ("cpu", "cuda", "mps")


def pick_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """"auto" (or None) is CUDA when available, else CPU; bare "cuda" means this process's GPU.

    A device that is not there (`--device cuda` without a GPU, cuda:3 on a machine with two) or
    a name torch does not know is one line up front, not a driver error once work has started."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in _DEVICE_TYPES:
        raise SeesayError(f"--device {name}: unknown device (use auto, cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SeesayError(f"--device {name}: no CUDA GPU is available (torch.cuda.is_available() is False)")
        index = local_rank if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise SeesayError(f"--device {name}: there is no CUDA GPU {index} "
                              f"(this machine has {torch.cuda.device_count()})")
        return torch.device("cuda", index)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SeesayError(f"--device {name}: no Apple MPS device is available")
    return dev


class CaptionModel(nn.Module):
    """Encoder + step decoder; implements the captioner contract (see `seesay.captioner`)."""

    def __init__(self, encoder: Encoder, decoder: Decoder, spec: dict[str, Any] | None = None,
                 tokenizer: Any = None, image_size: int | None = None) -> None:
        super().__init__()
        from seesay.data.images import ImageLoader

        self.encoder = encoder
        self.decoder = decoder
        self._spec = copy.deepcopy(spec) if spec is not None else {}
        self._spec.setdefault("captioner", "encoder_decoder")
        self.tokenizer = tokenizer
        self.image_loader = ImageLoader(image_size)

    # -- the captioner contract ----------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        return copy.deepcopy(self._spec)

    def preprocess(self, image: Any) -> Tensor:
        """Path, bytes, PIL image or array -> uint8 [3, S, S] at the training data's size."""
        return self.image_loader(image)

    def preprocess_config(self) -> dict[str, Any]:
        return {"encoder": self.encoder.preprocess.to_dict(), "image_size": self.image_loader.image_size or 0}

    def encode(self, images: Tensor, bool_masked_pos: Tensor | None = None) -> EncoderOutput:
        """uint8 [B,3,H,W] (0..255) or float [B,3,H,W] (0..1) images -> EncoderOutput.
        `bool_masked_pos` [B, patches] hides patches (masked image modelling, `seesay.train.mim`)."""
        x = self.encoder.preprocess(images.to(self._device()))
        if bool_masked_pos is None:
            return self.encoder(x)
        if not getattr(self.encoder, "masks_patches", False):
            raise SeesayError(f"masked image modelling needs an encoder that masks patches (swinv2), not "
                              f"{type(self.encoder).__name__}")
        return self.encoder(x, bool_masked_pos=bool_masked_pos.to(x.device))

    def forward(self, src: Tensor | EncoderOutput, tokens: Tensor, lengths: Tensor,
                image_rows: Tensor | None = None, prompt: Tensor | None = None,
                bool_masked_pos: Tensor | None = None, packed: bool = False) -> DecoderOutput:
        """Teacher forcing. Each image is encoded once; `image_rows` [R] names the image of each caption row;
        `prompt` [R, P] (ids, right-padded with pad) is each row's input text for decoders that read one;
        `bool_masked_pos` [B, patches] masks image patches (`seesay.train.mim`); `packed`: logits of real
        positions only, where the decoder `packs_logits` (decoders/base.py; others give padded logits)."""
        enc = src if isinstance(src, EncoderOutput) else self.encode(src, bool_masked_pos)
        return self.forward_features(enc, tokens, lengths, image_rows, prompt=prompt, packed=packed)

    def forward_features(self, enc: EncoderOutput, tokens: Tensor, lengths: Tensor,
                         image_rows: Tensor | None = None, prompt: Tensor | None = None,
                         packed: bool = False) -> DecoderOutput:
        kw = {"packed": True} if packed and self.packs_logits else {}
        if image_rows is not None:
            # per-image work once per image (features stay one row per image; prompts are per row)
            if getattr(self.decoder, "takes_image_rows", False) and prompt is None:
                return self.decoder(enc, tokens, lengths, image_rows=image_rows.to(enc.grid.device), **kw)
            enc = enc.index_select(image_rows.to(enc.grid.device))
        if prompt is not None:  # one per caption row, so after the row selection
            enc = enc._replace(prompt=prompt.to(enc.grid.device))
        return self.decoder(enc, tokens, lengths, **kw)

    @torch.no_grad()
    def generate(self, src: Tensor | EncoderOutput, strategy: Strategy = Greedy(), *, prompt: Any = None,
                 max_len: int = 50, generator: torch.Generator | None = None, constraints: Constraints | None = None,
                 num_captions: int = 1) -> DecodeResult:
        """Caption images (or their `encode` features) with `strategy`; `prompt` (text or ids) is
        forced at the start of every caption; `max_len` counts tokens after it. `constraints`
        (bad endings as words or ids) hold for every caption; `num_captions` N gives B*N rows,
        image-major, best first (`seesay.decoding.grouped` regroups them).

        A decoder that reads prompts (`reads_prompt`, T5) gets the prompt as input instead
        (`enc.prompt`): one text or ids for every image, or a list with one per image; captions
        then start from bos as usual. Its `max_target_length` caps `max_len`."""
        from seesay.captioner import prompt_ids, resolve_constraints

        tok = self._require_tokenizer()
        constraints = resolve_constraints(tok, constraints)
        enc = src if isinstance(src, EncoderOutput) else self.encode(src)
        if getattr(self.decoder, "reads_prompt", False):
            max_len = min(max_len, int(getattr(self.decoder, "max_target_length", max_len)))
            if prompt is not None:
                enc = enc._replace(prompt=_prompt_rows(tok, prompt, enc.grid.shape[0], enc.grid.device))
            prompt = None
        ids = prompt_ids(tok, prompt)
        prefix = torch.tensor(ids, dtype=torch.long, device=enc.grid.device) if ids else None
        return decode(self.decoder, enc, strategy, bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id,
                      max_len=max_len, prefix=prefix, generator=generator, constraints=constraints,
                      num_captions=num_captions)

    # -- training capabilities -----------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"decoder": [p for p in self.decoder.parameters() if p.requires_grad],
                "encoder": [p for p in self.encoder.parameters() if p.requires_grad]}

    def set_fine_tune(self, flag: bool) -> None:
        self.encoder.set_fine_tune(flag)

    @property
    def features_trainable(self) -> bool:
        return self.encoder.is_trainable

    @property
    def image_model_pretrained(self) -> bool:
        """Whether the encoder came with pretrained weights (training's auto fine-tuning trains it when not)."""
        return bool(getattr(self.encoder, "pretrained", True))

    @property
    def reads_prompt(self) -> bool:
        """Whether the prompt is the model's input text (T5) rather than a forced caption prefix."""
        return bool(getattr(self.decoder, "reads_prompt", False))

    @property
    def packs_logits(self) -> bool:
        """Whether `forward(..., packed=True)` gives the logits of real positions only (decoders/base.py)."""
        return bool(getattr(self.decoder, "packs_logits", False))

    @property
    def ddp_find_unused_parameters(self) -> bool:
        return bool(getattr(self.decoder, "ddp_find_unused_parameters", False)
                    or getattr(self.encoder, "ddp_find_unused_parameters", False))

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise SeesayError("this CaptionModel has no tokenizer: pass tokenizer= to build_model (or load a checkpoint)")
        return self.tokenizer

    def _device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


def _prompt_rows(tok: Any, prompt: Any, batch: int, device: torch.device) -> Tensor | None:
    """A generate() prompt as (B, P) ids right-padded with the pad id: one prompt (text, ids, a 1-D
    tensor) for every image, or one per image (a list of texts / id lists, a 2-D tensor)."""
    from seesay.captioner import prompt_ids

    if isinstance(prompt, Tensor) and prompt.dim() == 2:
        rows = [prompt_ids(tok, r) for r in prompt]
    elif isinstance(prompt, list | tuple) and prompt and isinstance(prompt[0], str | list | tuple | Tensor):
        rows = [prompt_ids(tok, p) for p in prompt]
    else:
        rows = [prompt_ids(tok, prompt)] * batch
    if len(rows) != batch:
        raise SeesayError(f"prompt: {len(rows)} prompts for {batch} images (give one, or one per image)")
    width = max((len(r) for r in rows), default=0)
    if width == 0:
        return None
    out = torch.full((batch, width), int(tok.pad_id), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def build_model(spec: dict[str, Any], *, tokenizer: Any = None, image_size: int | None = None,
                external_weights: bool = True) -> CaptionModel:
    """Build the encoder and decoder named in `spec`.

    The decoder receives `enc_dim` from the encoder's `out_dim`. `external_weights=False` builds
    without reading pretrained files (a checkpoint's weights follow): every encoder that takes
    `weights` gets "none", every decoder that takes `pretrained` gets False. A part built from a
    hub name or directory (`resolved_options()`, e.g. swinv2 / t5) adds what it read (its full
    config) to the spec, so a checkpoint rebuilds it offline.
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
    for legacy in ("glove", "glove_itos"):  # GloVe is applied after construction (layers/glove.py)
        dec_spec.pop(legacy, None)
    if not external_weights and takes_option("encoder", enc_name, "weights"):
        enc_spec["weights"] = "none"
    if not external_weights and takes_option("decoder", dec_name, "pretrained"):
        dec_spec["pretrained"] = False
    encoder = build_encoder(enc_name, **enc_spec)
    dec_spec["enc_dim"] = encoder.out_dim
    decoder = build_decoder(dec_name, **dec_spec)
    if tokenizer is not None and len(tokenizer) != int(dec_spec["vocab_size"]):
        raise SeesayError(f"the tokenizer has {len(tokenizer)} tokens but the model spec says vocab_size "
                          f"{dec_spec['vocab_size']}")
    spec = json.loads(json.dumps(spec))
    for part, module in (("encoder", encoder), ("decoder", decoder)):
        if hasattr(module, "resolved_options"):
            spec[part].update(module.resolved_options())
    return CaptionModel(encoder, decoder, spec, tokenizer=tokenizer, image_size=image_size)


@register_captioner("encoder_decoder")
def _build(spec: dict[str, Any], tokenizer: Any, preprocess: dict[str, Any] | None,
           external_weights: bool) -> CaptionModel:
    size = (preprocess or {}).get("image_size") or None
    return build_model(spec, tokenizer=tokenizer, image_size=size, external_weights=external_weights)
