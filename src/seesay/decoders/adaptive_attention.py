"""Knowing When to Look (Lu et al. 2017): adaptive attention with a visual sentinel.

# b - batch, t - time, n - regions, d - encoder width, h - decoder width, v - vocabulary
Regions are projected to the decoder width, V = relu(W_a grid); the LSTM input is
[word embedding; v_g] with v_g = relu(W_b mean(grid)). After the LSTM step, a sentinel
s_t = sigmoid(W_x x_t + W_h h_{t-1}) * tanh(c_t) competes with the regions in a softmax over
N+1 scores computed from h_t; its weight beta_t ("how much not to look") is the last column of
the returned attention. Words come from W_p(dropout(c_hat + h_t)). h and c start at zero.

Teacher forcing computes the regions and their attention projection once per image
(`image_rows`), the LSTM input's and the sentinel's products with [words; v_g] for every step in
one product each, and the output layer over every step at once; the loop keeps the recurrence.
Each step attends with the rows still running only: the scores' autograd node
(`LoopTanhScores`) reads the first rows of the per-row projection itself, and the context
(`LoopContext`) reads each image's regions once for all its captions, only for the images of the
rows still running (ranked by their first caption).
"""

from __future__ import annotations

import bisect
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seesay.decoders.base import Decoder, DecoderOutput
from seesay.decoders.common import (
    LSTMCell,
    decode_order,
    image_ids,
    input_gates,
    lstm_cell,
    per_row,
    reorder_beam_rows,
    reorder_rows,
    row_memory,
    step_outputs,
    unpack_steps,
)
from seesay.encoders.base import EncoderOutput
from seesay.layers import gemm
from seesay.layers.attention import LoopContext, LoopTanhScores, SentinelAttention, image_slots, rank_images
from seesay.layers.embedding import WordEmbedding
from seesay.layers.loop import LoopLinear
from seesay.registry import register_decoder


class AdaptiveAttentionDecoder(Decoder):
    has_sentinel = True
    takes_image_rows = True
    packs_logits = True

    def __init__(self, *, vocab_size: int, enc_dim: int, embed_dim: int = 512, attention_dim: int = 512,
                 decoder_dim: int = 512, dropout: float = 0.5, alpha_c: float = 0.0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.alpha_c = alpha_c
        self.decoder_dim = decoder_dim
        self.embedding = WordEmbedding(vocab_size, embed_dim)
        self.region_proj = gemm.Linear(enc_dim, decoder_dim)
        self.global_proj = gemm.Linear(enc_dim, embed_dim)
        self.lstm = LSTMCell(2 * embed_dim, decoder_dim)
        self.sentinel_x = nn.Linear(2 * embed_dim, decoder_dim, bias=False)
        self.sentinel_h = gemm.Linear(decoder_dim, decoder_dim)
        self.attention = SentinelAttention(decoder_dim, attention_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = gemm.Linear(decoder_dim, vocab_size)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def _start(self, grid: Tensor, rows: Tensor | None = None) -> dict[str, Tensor]:
        """grid (M, N, D), one row per image; `rows` [R] the image of each decoder row (None: one row each).

        In teacher forcing (`rows` given, sorted longest caption first) the regions stay one row per
        image, never copied per caption, put in the order of their first row (`rank_images`:
        "first" is each image's first row), so that each step reads only the regions of the rows
        still running; "slots" tells the attention where each row's image is (`image_slots`)."""
        regions = torch.relu(self.region_proj(grid))  # (M, N, H), once per image
        glob = torch.relu(self.global_proj(grid.mean(dim=1)))
        first = None
        if rows is not None:
            rows, ranked, first = rank_images(rows, grid.shape[0])
            regions, glob = regions.index_select(0, ranked), glob.index_select(0, ranked)
        # one row per image, now in row order (caption batches): the per-image tensors serve the rows as they are
        per_row = None if rows is None or first == list(range(len(rows))) else rows
        proj = row_memory(self.attention.project(regions), per_row)
        glob = row_memory(glob, per_row)
        zeros = grid.new_zeros(proj.shape[0], self.decoder_dim)
        s = {"h": zeros, "c": zeros, "mem_regions": regions, "mem_proj": proj, "mem_global": glob,
             "img": image_ids(proj.shape[0], grid.device)}
        if rows is not None:
            s["slots"], s["first"] = image_slots(rows, grid.shape[0]), first
        return s

    def _inputs(self, emb: Tensor, glob: Tensor) -> tuple[Tensor, Tensor]:
        """The LSTM gates' and the sentinel's shares of x = [emb; v_g]: emb ([t,] R, E), glob (R, E)."""
        E = self.embedding.table.embedding_dim
        D = self.lstm.weight_ih.shape[1]  # 2E
        g_gates = gemm.linear(glob, self.lstm.weight_ih, cols=(E, D))
        g_sent = gemm.linear(glob, self.sentinel_x.weight, cols=(E, D))
        if emb.dim() == 3:  # (t, R, E): every step of teacher forcing
            g_gates, g_sent = g_gates[None], g_sent[None]
        return input_gates(self.lstm, emb, 0, E) + g_gates, gemm.linear(emb, self.sentinel_x.weight, cols=(0, E)) + g_sent

    def _linears(self, loop: bool) -> dict[str, Any]:
        """The step's recurrent linear maps, W_hh, the sentinel's W_h and the attention's query
        projection W_g; `loop`: teacher forcing, whose weight gradients `LoopLinear` makes once over
        all steps."""
        maps = {"hh": (self.lstm.weight_hh, None), "sentinel": (self.sentinel_h.weight, self.sentinel_h.bias),
                "query": (self.attention.g_proj.weight, self.attention.g_proj.bias)}
        if loop:
            return {k: LoopLinear(w, b) for k, (w, b) in maps.items()}
        return {k: functools.partial(gemm.linear, weight=w, bias=b) for k, (w, b) in maps.items()}

    def _core(self, x_gates: Tensor, x_sent: Tensor, s: dict[str, Tensor], rows: int, lin: dict[str, Any]
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One step for the first `rows` rows of the state; x_gates (rows, 4H), x_sent (rows, H) from
        `_inputs`, `lin` from `_linears`. Returns h for every row of the state (rows past `rows`
        unchanged), and c, c_hat + h (the output layer's input) and alpha_hat for the first `rows`.

        As in soft attention, the attention runs over the running rows only when P's gradient is
        the `LoopTanhScores`' own (or there is none); otherwise (autocast) over every row of the
        state, the finished ones attended to and dropped, because slicing the per-row projection to
        the rows still running would cost a gradient of its full size at every step.
        """
        h_all = s["h"]
        h_prev, c_prev = h_all[:rows], s["c"][:rows]
        h, c = lstm_cell(x_gates + lin["hh"](h_prev), c_prev)
        sentinel = torch.sigmoid(x_sent + lin["sentinel"](h_prev)) * torch.tanh(c)
        R = h_all.shape[0]
        scores = s.get("scores")
        running = (scores is not None and scores.fused) or not torch.is_grad_enabled()
        h_q, sentinel_q = h, sentinel
        if rows < R and not running:  # finished rows: their old h and no sentinel; their results are dropped
            h_q, sentinel_q = torch.cat([h, h_all[rows:]]), F.pad(sentinel, (0, 0, 0, R - rows))
        first = s.get("first") if running else None  # ranked images: read only the running rows' ones
        context, alpha_hat = self.attention(s["mem_regions"], s["mem_proj"], h_q, sentinel_q, lin["query"](h_q),
                                            scores, s.get("context"),
                                            None if first is None else bisect.bisect_left(first, rows))
        if rows < R:
            h = torch.cat([h, h_all[rows:]])
        return h, c, context[:rows] + h[:rows], alpha_hat[:rows]

    def forward(self, enc: EncoderOutput, tokens: Tensor, lengths: Tensor,
                image_rows: Tensor | None = None, packed: bool = False) -> DecoderOutput:
        """`enc` holds one row per image when `image_rows` [B] names each caption's image, else one per caption;
        `packed`: logits of real positions only (decoders/base.py)."""
        B, T = tokens.shape
        order, steps, rows_per_step = decode_order(lengths)
        rows = order if image_rows is None else image_rows.to(order.device).index_select(0, order)
        s = self._start(enc.grid, rows)
        words = self.embedding(tokens.index_select(0, order)[:, :steps].t())  # (t, B, E), time-major
        x_gates, x_sent = self._inputs(words, s["mem_global"])
        x_gates, x_sent = x_gates.unbind(0), x_sent.unbind(0)  # per step, from one product for all steps
        lin = self._linears(loop=True)
        s["scores"] = LoopTanhScores(s["mem_proj"], self.attention.score)
        s["context"] = LoopContext(s["mem_regions"], s["slots"])
        outs, alphas = [], []
        for t, n in enumerate(rows_per_step):  # n rows still decoding at step t (sorted longest first)
            s["h"], s["c"], out, alpha = self._core(x_gates[t][:n], x_sent[t][:n], s, n, lin)
            outs.append(out)
            alphas.append(alpha)
        logits = self.fc(self.dropout(torch.cat(outs))) if outs else s["h"].new_zeros(0, self.vocab_size)
        alphas = unpack_steps(torch.cat(alphas) if alphas else logits.new_zeros(0, enc.grid.shape[1] + 1), order,
                              rows_per_step, T - 1)
        logits, positions = step_outputs(logits, order, rows_per_step, T - 1, packed)
        extras = {"sentinel_gate": alphas[..., -1]}
        if self.alpha_c > 0:  # Xu et al.'s regulariser on the spatial weights, renormalised without the sentinel
            spatial = alphas[..., :-1] / (1.0 - alphas[..., -1:]).clamp(min=1e-6)
            extras["aux_loss"] = self.alpha_c * ((1.0 - spatial.sum(dim=1)) ** 2).mean()
        return DecoderOutput(logits, alphas, extras, positions)

    def init_state(self, enc: EncoderOutput) -> dict[str, Tensor]:
        return self._start(enc.grid)

    def step(self, prev_tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        rows = prev_tokens.shape[0]
        x_gates, x_sent = self._inputs(self.embedding(prev_tokens), per_row(state["mem_global"], rows))
        h, c, out, alpha_hat = self._core(x_gates, x_sent, state, rows, self._linears(loop=False))
        return torch.log_softmax(self.fc(self.dropout(out)), dim=-1), {**state, "h": h, "c": c}, alpha_hat

    def reorder_state(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return reorder_rows(state, index)

    def reorder_beams(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return reorder_beam_rows(state, index)


@register_decoder("adaptive_attention")
def build(*, vocab_size: int, enc_dim: int, embed_dim: int = 512, attention_dim: int = 512, decoder_dim: int = 512,
          dropout: float = 0.5, alpha_c: float = 0.0) -> AdaptiveAttentionDecoder:
    return AdaptiveAttentionDecoder(vocab_size=vocab_size, enc_dim=enc_dim, embed_dim=embed_dim,
                                    attention_dim=attention_dim, decoder_dim=decoder_dim, dropout=dropout,
                                    alpha_c=alpha_c)
