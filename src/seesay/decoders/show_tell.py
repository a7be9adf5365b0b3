"""Show and Tell (Vinyals et al. 2015): an LSTM conditioned on the pooled image only.

# b - batch, t - time, d - encoder width, e - embedding width, h - decoder width
As in the paper, the image is the LSTM's first input: x_{-1} = BatchNorm(Linear(pooled)),
and the state after that step is the initial state for the words. No attention.

Teacher forcing computes the words' share of the LSTM gates for every step in one product and
the output layer over every step at once; the loop runs only the recurrence, and W_hh's gradient
is made once over all steps (`LoopLinear`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seesay.decoders.base import Decoder, DecoderOutput
from seesay.decoders.common import (
    LSTMCell,
    decode_order,
    input_gates,
    lstm_cell,
    reorder_beam_rows,
    reorder_rows,
    row_memory,
    step_outputs,
)
from seesay.encoders.base import EncoderOutput
from seesay.layers import gemm
from seesay.layers.embedding import WordEmbedding
from seesay.layers.loop import LoopLinear
from seesay.registry import register_decoder


class ShowTellDecoder(Decoder):
    takes_image_rows = True
    packs_logits = True

    def __init__(self, *, vocab_size: int, enc_dim: int, embed_dim: int = 512, decoder_dim: int = 512,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = WordEmbedding(vocab_size, embed_dim)
        self.image_proj = nn.Linear(enc_dim, embed_dim)
        self.image_norm = nn.BatchNorm1d(embed_dim)
        self.lstm = LSTMCell(embed_dim, decoder_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = gemm.Linear(decoder_dim, vocab_size)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def _start(self, pooled: Tensor) -> dict[str, Tensor]:
        h, c = self.lstm(self.image_norm(self.image_proj(pooled)))  # image fed as step -1, from a zero state
        return {"h": h, "c": c}

    def forward(self, enc: EncoderOutput, tokens: Tensor, lengths: Tensor,
                image_rows: Tensor | None = None, packed: bool = False) -> DecoderOutput:
        """`enc` holds one row per image when `image_rows` [B] names each caption's image, else one per caption;
        `packed`: logits of real positions only (decoders/base.py)."""
        B, T = tokens.shape
        order, steps, rows_per_step = decode_order(lengths)
        rows = order if image_rows is None else image_rows.to(order.device).index_select(0, order)
        # per caption row, not per image: BatchNorm's batch statistics count each caption
        s = self._start(row_memory(enc.pooled, rows))
        words = self.embedding(tokens.index_select(0, order)[:, :steps].t())  # (t, B, E), time-major
        word_gates = input_gates(self.lstm, words).unbind(0)  # t x (B, 4H): one product for all steps
        h, c = s["h"], s["c"]
        hh = LoopLinear(self.lstm.weight_hh)  # W_hh's gradient in one product over all steps
        hs = []
        for t, n in enumerate(rows_per_step):  # n rows still decoding at step t (sorted longest first)
            h, c = lstm_cell(word_gates[t][:n] + hh(h[:n]), c[:n])
            hs.append(h)
        logits = self.fc(self.dropout(torch.cat(hs))) if hs else h.new_zeros(0, self.vocab_size)
        logits, positions = step_outputs(logits, order, rows_per_step, T - 1, packed)
        return DecoderOutput(logits, None, {}, positions)

    def init_state(self, enc: EncoderOutput) -> dict[str, Tensor]:
        return self._start(enc.pooled)

    def step(self, prev_tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], None]:
        h, c = self.lstm(self.embedding(prev_tokens), (state["h"], state["c"]))
        return torch.log_softmax(self.fc(self.dropout(h)), dim=-1), {"h": h, "c": c}, None

    def reorder_state(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return reorder_rows(state, index)

    def reorder_beams(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return reorder_beam_rows(state, index)


@register_decoder("show_tell")
def build(*, vocab_size: int, enc_dim: int, embed_dim: int = 512, decoder_dim: int = 512, dropout: float = 0.5) -> ShowTellDecoder:
    return ShowTellDecoder(vocab_size=vocab_size, enc_dim=enc_dim, embed_dim=embed_dim, decoder_dim=decoder_dim,
                           dropout=dropout)
