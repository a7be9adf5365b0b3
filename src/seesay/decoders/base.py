"""The decoder contract (the per-step "core" idea, as a typed protocol).

# b - batch, t - time, v - vocabulary, n - regions
- `forward(enc, tokens, lengths) -> DecoderOutput` for teacher forcing. `tokens` [B,T] are
  whole encoded captions `<start> w1 .. wn <end> <pad>..`, `lengths` [B] count `<start>`
  and `<end>`. `logits[:, t]` predicts `tokens[:, t + 1]`, so logits are [B, T-1, V];
  positions t >= lengths-1 are padding and must not influence the loss (or each other).
  `extras["aux_loss"]` (optional scalar) is added to the cross-entropy by the trainer,
  already weighted (e.g. alpha_c * doubly-stochastic term).
  Decoders with `packs_logits = True` also take `forward(..., packed=True)`: `logits` is then
  (K, V), one row per real position only, and `positions` [K] says where each row is in the
  padded layout (b * (T-1) + t). The cross-entropy asks for it: padded logits cost a (B, T-1, V)
  tensor, its gradient and two copies at every step (`seesay.train.objectives`).
- `init_state(enc) -> state`; `step(prev_tokens [B], state) -> (logprobs [B,V], state,
  attention [B,A] | None)`; `reorder_state(state, index)` picks rows (beams, batch
  expansion, finished images leaving the batch). A is N (regions), or N+1 for decoders with
  `has_sentinel = True`, whose last column is the weight given to the visual sentinel rather
  than the image. `reorder_beams(state, index)` is `reorder_state` for an index that keeps
  every row within its image and every image's number of rows (beam search, at every step); the
  default calls `reorder_state`, and decoders may skip the work that such an index cannot need.
- Decoding functions only reorder rows within images or keep a subset of whole images, in
  image order (`seesay.decoding`). The dict-state decoders use that: per-image memory stays
  one row per image while the step runs K rows (beams) per image (`decoders/common.py`).
- `enc.prompt` [B,P] (ids, right-padded with the tokenizer's pad id, or None) is a text given to
  the model as input; only decoders with `reads_prompt = True` (T5) read it, others ignore it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor, nn

from seesay.encoders.base import EncoderOutput

State = Any


class DecoderOutput(NamedTuple):
    logits: Tensor  # (B, T-1, V); (K, V) when `positions` is given
    attention: Tensor | None  # (B, T-1, A) or None
    extras: dict[str, Tensor]
    positions: Tensor | None = None  # [K] b * (T-1) + t of each logits row (forward(..., packed=True))


class Decoder(nn.Module):
    vocab_size: int
    has_sentinel: bool = False
    # True: the decoder reads `enc.prompt` (a text given as input, e.g. T5's encoder side) instead of
    # having a prompt forced as the caption's first tokens (`CaptionModel.generate`)
    reads_prompt: bool = False
    # True: forward(enc, tokens, lengths, image_rows=None) takes `enc` with one row per image and
    # `image_rows` [B] naming each caption's image, so per-image work is done once per image
    takes_image_rows: bool = False
    # True: forward(..., packed=True) gives the logits of real positions only, with their `positions`
    packs_logits: bool = False

    def forward(self, enc: EncoderOutput, tokens: Tensor, lengths: Tensor) -> DecoderOutput:  # pragma: no cover
        raise NotImplementedError

    def init_state(self, enc: EncoderOutput) -> State:  # pragma: no cover
        raise NotImplementedError

    def step(self, prev_tokens: Tensor, state: State) -> tuple[Tensor, State, Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def reorder_state(self, state: State, index: Tensor) -> State:  # pragma: no cover
        raise NotImplementedError

    def reorder_beams(self, state: State, index: Tensor) -> State:
        return self.reorder_state(state, index)
