"""Show, Attend and Tell (Xu et al. 2015): an LSTM with soft additive attention over the grid.

# b - batch, t - time, n - regions, d - encoder width, h - decoder width, v - vocabulary
Each step attends with the previous hidden state, gates the context with
beta = sigmoid(f_beta(h)), and feeds [word embedding; gated context] to an LSTMCell.
h and c start from the mean region feature. The doubly stochastic regulariser
alpha_c * mean_b (1 - sum_t alpha_bt)^2 is returned as extras["aux_loss"].

Teacher forcing does outside the step loop what does not depend on the recurrence: the grid's
attention projection once per image (`image_rows`: several captions of one image share it), the
words' share of the LSTM gates for every step in one product, and the output layer over every
step's hidden state in one product. The loop keeps the attention, the gate and the recurrence; the
weight gradients of the loop's linear maps are made once over all steps (`LoopLinear`), and the
context reads each image's grid once for all its captions (`slot_context`). Each step attends
with the rows still running only; with cached features (a grid without a gradient) the images are
numbered by their longest caption, so that a step reads only the grids of its running rows
(3-9 % more training captions/s at the tutorial's sizes, in-process A/B, docs/performance.md).
"""

from __future__ import annotations

import bisect

import torch
from torch import Tensor, nn

from seesay.decoders.base import Decoder, DecoderOutput
from seesay.decoders.common import (
    LSTMCell,
    decode_order,
    image_ids,
    input_gates,
    lstm_cell,
    reorder_beam_rows,
    reorder_rows,
    row_memory,
    split_input_weight,
    step_outputs,
    unpack_steps,
)
from seesay.encoders.base import EncoderOutput
from seesay.layers import gemm
from seesay.layers.attention import AdditiveAttention, LoopScores, image_slots, rank_images
from seesay.layers.embedding import WordEmbedding
from seesay.layers.loop import LoopLinear
from seesay.registry import register_decoder


class SoftAttentionDecoder(Decoder):
    takes_image_rows = True
    packs_logits = True

    def __init__(self, *, vocab_size: int, enc_dim: int, embed_dim: int = 512, attention_dim: int = 512,
                 decoder_dim: int = 512, dropout: float = 0.5, alpha_c: float = 0.0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.alpha_c = alpha_c
        self.embedding = WordEmbedding(vocab_size, embed_dim)
        self.attention = AdditiveAttention(enc_dim, decoder_dim, attention_dim)
        self.init_h = nn.Linear(enc_dim, decoder_dim)
        self.init_c = nn.Linear(enc_dim, decoder_dim)
        self.f_beta = gemm.Linear(decoder_dim, enc_dim)
        self.lstm = LSTMCell(embed_dim + enc_dim, decoder_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = gemm.Linear(decoder_dim, vocab_size)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def _start(self, grid: Tensor, rows: Tensor | None = None) -> dict[str, Tensor]:
        """grid (M, N, D), one row per image; `rows` [R] the image of each decoder row (None: one row each).

        In teacher forcing (`rows` given, sorted longest caption first) the grid stays one row per
        image, never copied per caption, and "slots" tells the attention where each row's image is
        (`image_slots`). When the grid needs no gradient its images are put in the order of their
        first row (`rank_images`), so that each step reads only the images of the rows still running
        ("first": the first row of each image); a grid with a gradient is read whole at each step (a
        slice per step would cost a gradient of the grid's full size)."""
        first = None
        if rows is not None and not (grid.requires_grad and torch.is_grad_enabled()):
            rows, ranked, first = rank_images(rows, grid.shape[0])
            grid = grid.index_select(0, ranked)
        # one row per image, now in row order (cached features): the per-image tensors serve the rows as they are
        per_row = None if rows is None or first == list(range(len(rows))) else rows
        mean = row_memory(grid.mean(dim=1), per_row)
        proj = row_memory(self.attention.project(grid), per_row)  # once per image, then copied to its rows
        s = {"h": self.init_h(mean), "c": self.init_c(mean), "mem_proj": proj,
             "img": image_ids(proj.shape[0], grid.device), "mem_grid": grid}
        if rows is not None:
            s["slots"] = image_slots(rows, grid.shape[0])
            if first is not None:
                s["first"] = first
        return s

    def _core(self, word_gates: Tensor, s: dict[str, Tensor], rows: int, lin: dict[str, LoopLinear]
              ) -> tuple[Tensor, Tensor, Tensor]:
        """One step for the first `rows` rows of the state; word_gates (rows, 4H) is the words' share
        of the LSTM gates (`input_gates`), `lin` the step's linear maps (`_linears`). Returns h for
        every row of the state (rows past `rows` unchanged), c and alpha for the first `rows`.

        The attention runs over the running rows only when P's gradient is the `LoopScores`' own (or
        there is none); otherwise (autocast) over every row of the state, the finished ones (sorted
        last) attended to and dropped, because slicing the per-row memory to the rows still running
        would cost a gradient of the memory's full size at every step.
        """
        h_all = s["h"]
        scores = s.get("scores")
        running = (scores is not None and scores.fused) or not torch.is_grad_enabled()
        first = s.get("first") if running else None  # ranked images: read only the running rows' ones
        att_h = h_all[:rows] if running else h_all
        context, alpha = self.attention(s["mem_grid"], s["mem_proj"], att_h, lin["query"](att_h), s.get("slots"),
                                        scores, None if first is None else bisect.bisect_left(first, rows))
        h = h_all[:rows]
        context = torch.sigmoid(lin["beta"](h)) * context[:rows]
        gates = word_gates + lin["context"](context) + lin["hh"](h)
        h, c = lstm_cell(gates, s["c"][:rows])
        if rows < h_all.shape[0]:
            h = torch.cat([h, h_all[rows:]])
        return h, c, alpha[:rows]

    def _linears(self, context_weight: Tensor) -> dict[str, LoopLinear]:
        """The teacher-forcing loop's linear maps, whose weight gradients `LoopLinear` makes once over
        all steps: W_ih[:, E:] for the context (`context_weight`, split once per forward: a slice taken
        per step would cost a full-size gradient of W_ih per step), W_hh, f_beta and the attention's
        query projection."""
        maps = {"context": (context_weight, None), "hh": (self.lstm.weight_hh, None),
                "beta": (self.f_beta.weight, self.f_beta.bias),
                "query": (self.attention.dec_proj.weight, self.attention.dec_proj.bias)}
        return {k: LoopLinear(w, b) for k, (w, b) in maps.items()}

    def forward(self, enc: EncoderOutput, tokens: Tensor, lengths: Tensor,
                image_rows: Tensor | None = None, packed: bool = False) -> DecoderOutput:
        """`enc` holds one row per image when `image_rows` [B] names each caption's image, else one per caption;
        `packed`: logits of real positions only (decoders/base.py)."""
        B, T = tokens.shape
        order, steps, rows_per_step = decode_order(lengths)
        rows = order if image_rows is None else image_rows.to(order.device).index_select(0, order)
        s = self._start(enc.grid, rows)
        E = self.embedding.table.embedding_dim
        words = self.embedding(tokens.index_select(0, order)[:, :steps].t())  # (t, B, E), time-major
        word_weight, context_weight = split_input_weight(self.lstm, E)
        word_gates = input_gates(self.lstm, words, weight=word_weight).unbind(0)  # t x (B, 4H): one product
        lin = self._linears(context_weight)
        s["scores"] = LoopScores(s["mem_proj"], self.attention.score)
        hs, alphas = [], []
        for t, n in enumerate(rows_per_step):  # n rows still decoding at step t (sorted longest first)
            s["h"], s["c"], alpha = self._core(word_gates[t][:n], s, n, lin)
            hs.append(s["h"][:n])
            alphas.append(alpha)
        logits = self.fc(self.dropout(torch.cat(hs))) if hs else s["h"].new_zeros(0, self.vocab_size)
        alphas = unpack_steps(torch.cat(alphas) if alphas else logits.new_zeros(0, enc.grid.shape[1]), order,
                              rows_per_step, T - 1)
        logits, positions = step_outputs(logits, order, rows_per_step, T - 1, packed)
        extras = {}
        if self.alpha_c > 0:
            extras["aux_loss"] = self.alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()
        return DecoderOutput(logits, alphas, extras, positions)

    def init_state(self, enc: EncoderOutput) -> dict[str, Tensor]:
        return self._start(enc.grid)

    def step(self, prev_tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """One decoding step (no teacher forcing): the step's few rows run torch's fused LSTM cell,
        fewer and larger operations than the teacher-forcing loop's split gates."""
        h = state["h"]
        context, alpha = self.attention(state["mem_grid"], state["mem_proj"], h)
        context = torch.sigmoid(self.f_beta(h)) * context
        h, c = self.lstm(torch.cat([self.embedding(prev_tokens), context], dim=-1), (h, state["c"]))
        state = {**state, "h": h, "c": c}
        return torch.log_softmax(self.fc(self.dropout(h)), dim=-1), state, alpha

    def reorder_state(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return reorder_rows(state, index)

    def reorder_beams(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return reorder_beam_rows(state, index)


# alpha_c 0 by default: Xu et al.'s 1.0 asks every grid cell for a total attention of 1 over the caption,
# which spreads each word's attention on grids with more cells than words (docs/visualize.md, docs/demo.md)
@register_decoder("soft_attention")
def build(*, vocab_size: int, enc_dim: int, embed_dim: int = 512, attention_dim: int = 512, decoder_dim: int = 512,
          dropout: float = 0.5, alpha_c: float = 0.0) -> SoftAttentionDecoder:
    return SoftAttentionDecoder(vocab_size=vocab_size, enc_dim=enc_dim, embed_dim=embed_dim, attention_dim=attention_dim,
                                decoder_dim=decoder_dim, dropout=dropout, alpha_c=alpha_c)
