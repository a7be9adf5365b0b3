"""`t5`: a T5 encoder-decoder (Raffel et al., 2020; Hugging Face `T5ForConditionalGeneration`)
reading the image grid and a text prompt.

# b - images, r - caption rows, n - regions, p - prompt tokens, s - n + p, t - time, d - d_model
T5's encoder reads [image tokens; prompt tokens]: the grid [B,N,enc_dim] (optionally through an
FFN: Linear-GELU-Linear + residual, LayerNorm) projected to d_model, and the prompt's ids through
T5's shared embedding; a learned type embedding (0 image, 1 text) is added to each, and with
`image_positions` a learned embedding of each image token's place in the grid (T5's attention
knows only relative positions and its cross-attention none, so without it absolute places, which
grounding's `<loc_i>` answers need, are hard to recover from a Swin grid). The attention
mask is 1 on image positions and real prompt tokens, 0 on the prompt's padding (the tokenizer's
`pad_id`, right padding). T5's decoder generates the caption. Any encoder's grid works (swinv2,
resnet, vit, ...).

The prompt (`EncoderOutput.prompt`, [B,P] ids, `reads_prompt = True`) is model *input*: the
caption does not start with it (`CaptionModel.generate` puts a prompt there for this family);
`max_source_length` caps its tokens.

Ids: seesay captions are `<bos> w.. <eos> <pad>..`; T5's decoder starts from its
`decoder_start_token_id` instead, so the first decoder input (teacher forcing: position 0;
decoding: the first step) is always decoder_start, whatever the bos id is (the SentencePiece
tokenizer's `<s>` past T5's sentinels, or a word vocabulary's `<start>`). The model's vocabulary
is the tokenizer's (`vocab_size`): a pretrained T5 with another size has its embeddings resized
(logged). Greedy, beam, sampling and constraints are seesay's (`seesay.decoding`), never HF
`generate`.

Decoding: `init_state` runs T5's encoder once per image and projects each decoder layer's
cross-attention keys/values once (per-image memory, one row per image, `decoders/common.py`);
`step` runs one position through T5's decoder with a past-key-values cache (self-attention
keys/values per row, reordered with the beams), so a step's cost does not grow with a re-run
of the prefix. `max_target_length` caps generated captions (`CaptionModel.generate`).

Sources (`seesay.hf`): `language_model_name` is a hub name ("t5-large") or a local
`save_pretrained` directory, `pretrained` says whether its weights are loaded (else only its
config); `language_model_name=None` builds from `config` alone. The resolved config goes into
the spec (`resolved_options`), so checkpoints rebuild offline (`pretrained=False`, full config).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seesay.decoders.base import Decoder, DecoderOutput
from seesay.decoders.common import image_ids, per_row, reorder_beam_rows, reorder_rows
from seesay.encoders.base import EncoderOutput
from seesay.errors import SeesayError
from seesay.hf import enable_checkpointing, load_config, load_model, plain_config, require_transformers
from seesay.registry import register_decoder

log = logging.getLogger(__name__)

DEFAULT_LANGUAGE_MODEL = "t5-large"
OPTION = "decoder t5 language_model_name"
IMAGE, TEXT = 0, 1  # type embedding rows


class FeatureFFN(nn.Module):
    """x + Linear(GELU(Linear(x))), then LayerNorm, at the image features' width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


def _cache_keyword(model: Any) -> str:
    """transformers 5.x renamed forward's `past_key_values` to `cache` (the old name is deprecated)."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class T5Decoder(Decoder):
    reads_prompt = True

    def __init__(self, t5: nn.Module, *, enc_dim: int, ffn: bool = False, max_source_length: int = 512,
                 max_target_length: int = 512, pad_id: int = 0, resolved: dict[str, Any] | None = None,
                 image_positions: int = 0) -> None:
        super().__init__()
        self.t5 = t5
        cfg = t5.config
        self.vocab_size = int(cfg.vocab_size)
        self.d_model = int(cfg.d_model)
        self.ffn = FeatureFFN(enc_dim) if ffn else None
        self.image_proj = nn.Linear(enc_dim, self.d_model)
        self.type_embedding = nn.Embedding(2, self.d_model)
        nn.init.normal_(self.type_embedding.weight, std=0.02)
        self.image_positions = None  # (grid positions, d): the grid's places, when asked for
        if image_positions:
            self.image_positions = nn.Embedding(int(image_positions), self.d_model)
            nn.init.normal_(self.image_positions.weight, std=0.02)
        # transformers 5 keeps decoder_start_token_id in the generation config; T5's is its pad id
        start = getattr(cfg, "decoder_start_token_id", None)
        gen = getattr(t5, "generation_config", None)
        if start is None and gen is not None:
            start = getattr(gen, "decoder_start_token_id", None)
        self.start_id = int(start if start is not None else (getattr(cfg, "pad_token_id", None) or 0))
        self.max_source_length, self.max_target_length = int(max_source_length), int(max_target_length)
        self.pad_id = int(pad_id)
        self._resolved = resolved or {}
        self._cache_kw = _cache_keyword(t5)

    def resolved_options(self) -> dict[str, Any]:
        """Options to add to the model spec so it rebuilds without the hub (see the module doc)."""
        return dict(self._resolved)

    # -- T5's encoder input -----------------------------------------------------------------------
    def _encoder_inputs(self, enc: EncoderOutput) -> tuple[Tensor, Tensor]:
        """[image tokens; prompt tokens] embeddings (B, S, d) and their attention mask (B, S)."""
        img = enc.grid if self.ffn is None else self.ffn(enc.grid)
        x = self.image_proj(img) + self.type_embedding.weight[IMAGE]  # (B, N, d)
        if self.image_positions is not None:
            if x.shape[1] > self.image_positions.num_embeddings:
                raise SeesayError(f"decoder t5: {x.shape[1]} image tokens but image_positions "
                                  f"{self.image_positions.num_embeddings}")
            x = x + self.image_positions.weight[: x.shape[1]]
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        prompt = getattr(enc, "prompt", None)
        if prompt is not None and prompt.numel():
            prompt = prompt[:, : self.max_source_length].to(x.device)
            real = prompt != self.pad_id  # (B, P), right padding
            keep = int(real.sum(dim=1).max())  # trailing columns that are padding everywhere go
            if keep:
                prompt, real = prompt[:, :keep], real[:, :keep]
                text = self.t5.shared(prompt) + self.type_embedding.weight[TEXT]
                x = torch.cat([x, text.to(x.dtype)], dim=1)
                mask = torch.cat([mask, real.long()], dim=1)
        return x, mask

    # -- teacher forcing ------------------------------------------------------------------------
    def forward(self, enc: EncoderOutput, tokens: Tensor, lengths: Tensor) -> DecoderOutput:
        B, T = tokens.shape
        steps = max(int(lengths.max()) - 1, 0) if B else 0
        if steps == 0:
            logits = enc.grid.new_zeros(B, max(T - 1, 0), self.vocab_size)
            return DecoderOutput(logits, None, {})
        x, mask = self._encoder_inputs(enc)
        inputs = tokens[:, :steps].clone()
        inputs[:, 0] = self.start_id  # seesay's bos -> T5's decoder start
        logits = self.t5(inputs_embeds=x, attention_mask=mask, decoder_input_ids=inputs, use_cache=False).logits
        valid = torch.arange(steps, device=tokens.device)[None, :] < (lengths.to(tokens.device) - 1)[:, None]
        logits = logits * valid[..., None].to(logits.dtype)  # padding positions are exact zeros
        if steps < T - 1:  # the contract's (B, T-1, V) shape
            logits = F.pad(logits, (0, 0, 0, T - 1 - steps))
        return DecoderOutput(logits, None, {})

    # -- decoding -----------------------------------------------------------------------------------
    def _cross_attentions(self) -> list[Any]:
        # T5Block.layer = [self-attention, cross-attention, feed-forward] in T5's decoder
        return [block.layer[1].EncDecAttention for block in self.t5.decoder.block]

    def init_state(self, enc: EncoderOutput) -> dict[str, Tensor]:
        x, mask = self._encoder_inputs(enc)
        hidden = self.t5.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state  # (B, S, d)
        B, S, _ = hidden.shape
        state = {"img": image_ids(B, hidden.device), "mem_hidden": hidden, "mem_mask": mask}
        for i, att in enumerate(self._cross_attentions()):  # as T5Attention computes them, once per image
            shape = (B, S, -1, att.key_value_proj_dim)
            state[f"mem_xk{i}"] = att.k(hidden).view(shape).transpose(1, 2)  # (B, H, S, k)
            state[f"mem_xv{i}"] = att.v(hidden).view(shape).transpose(1, 2)
        return state

    def step(self, prev_tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], None]:
        from transformers import DynamicCache, EncoderDecoderCache

        R = prev_tokens.shape[0]
        layers = len(self.t5.decoder.block)
        first = "k0" not in state
        ids = torch.full_like(prev_tokens, self.start_id) if first else prev_tokens  # bos -> decoder start
        past = DynamicCache() if first else DynamicCache([(state[f"k{i}"], state[f"v{i}"]) for i in range(layers)])
        cross = DynamicCache([(per_row(state[f"mem_xk{i}"], R), per_row(state[f"mem_xv{i}"], R))
                              for i in range(layers)])
        cache = EncoderDecoderCache(past, cross)  # cross keys/values present: T5 reuses them
        out = self.t5(encoder_outputs=(per_row(state["mem_hidden"], R),), attention_mask=per_row(state["mem_mask"], R),
                      decoder_input_ids=ids[:, None], use_cache=True, **{self._cache_kw: cache})
        state = dict(state)
        for i in range(layers):
            layer = cache.self_attention_cache.layers[i]
            state[f"k{i}"], state[f"v{i}"] = layer.keys, layer.values  # (R, H, t+1, k)
        return torch.log_softmax(out.logits[:, -1], dim=-1), state, None

    def reorder_state(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return reorder_rows(state, index)

    def reorder_beams(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return reorder_beam_rows(state, index)


def _build_t5(transformers: Any, *, vocab_size: int, name: str | None, overrides: dict[str, Any], pretrained: bool
              ) -> tuple[nn.Module, bool]:
    """(T5ForConditionalGeneration, whether its config was read from `name`)."""
    overrides = dict(overrides)
    overrides.pop("vocab_size", None)  # the tokenizer decides (resized below when it differs)
    full = "model_type" in overrides  # a whole config, as checkpoints keep it: nothing to read
    source = None if (full and not pretrained) else name
    if not pretrained:
        overrides["vocab_size"] = vocab_size
    cfg = load_config(transformers.T5Config, source, overrides, OPTION)
    if pretrained:
        t5 = load_model(transformers.T5ForConditionalGeneration, name, cfg, OPTION)
        if int(t5.config.vocab_size) != vocab_size:
            log.info("t5: resizing %s's vocabulary from %d to the tokenizer's %d tokens", name,
                     t5.config.vocab_size, vocab_size)
            t5.resize_token_embeddings(vocab_size)
    else:
        t5 = transformers.T5ForConditionalGeneration(cfg)
    return t5, source is not None


@register_decoder("t5")
def build(*, vocab_size: int, enc_dim: int, language_model_name: str | None = DEFAULT_LANGUAGE_MODEL,
          config: dict[str, Any] | None = None, pretrained: bool = True, ffn: bool = False,
          max_source_length: int = 512, max_target_length: int = 512, gradient_checkpointing: bool = False,
          dropout: float | None = None, pad_id: int = 0, image_positions: int = 0) -> T5Decoder:
    """T5 decoder over image features and a prompt; see the module doc. `dropout` sets T5's dropout_rate,
    `pad_id` is the tokenizer's pad id (the prompt's padding); `image_positions` N > 0 adds a learned
    embedding for each of up to N image tokens (their place in the grid; 0: none)."""
    if isinstance(image_positions, bool) or int(image_positions) < 0:
        raise SeesayError(f"decoder t5: image_positions must be an integer >= 0, not {image_positions!r}")
    transformers = require_transformers()
    for flag, value in (("max_source_length", max_source_length), ("max_target_length", max_target_length)):
        if isinstance(value, bool) or int(value) < 1:
            raise SeesayError(f"decoder t5: {flag} must be an integer >= 1, not {value!r}")
    overrides = dict(config or {})
    if dropout is not None:
        overrides["dropout_rate"] = float(dropout)
    pretrained = bool(pretrained) and language_model_name is not None
    t5, read = _build_t5(transformers, vocab_size=int(vocab_size), name=language_model_name, overrides=overrides,
                         pretrained=pretrained)
    if gradient_checkpointing:
        enable_checkpointing(t5)
    resolved = {"config": plain_config(t5.config)} if read else {}
    return T5Decoder(t5, enc_dim=int(enc_dim), ffn=bool(ffn), max_source_length=int(max_source_length),
                     max_target_length=int(max_target_length), pad_id=int(pad_id), resolved=resolved,
                     image_positions=int(image_positions))
