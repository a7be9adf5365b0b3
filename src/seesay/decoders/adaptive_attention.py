"""Knowing When to Look (Lu et al. 2017): adaptive attention with a visual sentinel.

# b - batch, t - time, n - regions, d - encoder width, h - decoder width, v - vocabulary
Regions are projected to the decoder width, V = relu(W_a grid); the LSTM input is
[word embedding; v_g] with v_g = relu(W_b mean(grid)). After the LSTM step, a sentinel
s_t = sigmoid(W_x x_t + W_h h_{t-1}) * tanh(c_t) competes with the regions in a softmax over
N+1 scores computed from h_t; its weight beta_t ("how much not to look") is the last column of
the returned attention. Words come from W_p(dropout(c_hat + h_t)). h and c start at zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seesay.decoders.base import Decoder, DecoderOutput
from seesay.decoders.common import decode_order, image_ids, per_row, reorder_rows, restore_order
from seesay.encoders.base import EncoderOutput
from seesay.layers.attention import SentinelAttention
from seesay.layers.embedding import WordEmbedding
from seesay.registry import register_decoder


class AdaptiveAttentionDecoder(Decoder):
    has_sentinel = True

    def __init__(self, *, vocab_size: int, enc_dim: int, embed_dim: int = 512, attention_dim: int = 512,
                 decoder_dim: int = 512, dropout: float = 0.5, alpha_c: float = 0.0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.alpha_c = alpha_c
        self.decoder_dim = decoder_dim
        self.embedding = WordEmbedding(vocab_size, embed_dim)
        self.region_proj = nn.Linear(enc_dim, decoder_dim)
        self.global_proj = nn.Linear(enc_dim, embed_dim)
        self.lstm = nn.LSTMCell(2 * embed_dim, decoder_dim)
        self.sentinel_x = nn.Linear(2 * embed_dim, decoder_dim, bias=False)
        self.sentinel_h = nn.Linear(decoder_dim, decoder_dim)
        self.attention = SentinelAttention(decoder_dim, attention_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(decoder_dim, vocab_size)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def _start(self, grid: Tensor) -> dict[str, Tensor]:
        regions = torch.relu(self.region_proj(grid))  # (B, N, H)
        zeros = grid.new_zeros(grid.shape[0], self.decoder_dim)
        return {"h": zeros, "c": zeros, "mem_regions": regions, "mem_proj": self.attention.project(regions),
                "mem_global": torch.relu(self.global_proj(grid.mean(dim=1))), "img": image_ids(grid.shape[0], grid.device)}

    def _core(self, emb: Tensor, s: dict[str, Tensor], rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        h_prev, c_prev = s["h"][:rows], s["c"][:rows]
        x = torch.cat([emb, per_row(s["mem_global"], rows)], dim=-1)
        h, c = self.lstm(x, (h_prev, c_prev))
        sentinel = torch.sigmoid(self.sentinel_x(x) + self.sentinel_h(h_prev)) * torch.tanh(c)
        context, alpha_hat = self.attention(s["mem_regions"][:rows], s["mem_proj"][:rows], h, sentinel)
        return h, c, self.fc(self.dropout(context + h)), alpha_hat

    def forward(self, enc: EncoderOutput, tokens: Tensor, lengths: Tensor) -> DecoderOutput:
        B, T = tokens.shape
        order, steps, rows_per_step = decode_order(lengths)
        s = self._start(enc.grid.index_select(0, order))
        emb = self.embedding(tokens.index_select(0, order)[:, :steps])
        logits = emb.new_zeros(B, T - 1, self.vocab_size)
        alphas = emb.new_zeros(B, T - 1, enc.grid.shape[1] + 1)
        for t, rows in enumerate(rows_per_step):
            s["h"], s["c"], logits[:rows, t], alphas[:rows, t] = self._core(emb[:rows, t], s, rows)
        logits, alphas = restore_order(order, logits, alphas)
        extras = {"sentinel_gate": alphas[..., -1]}
        if self.alpha_c > 0:  # Xu et al.'s regulariser on the spatial weights, renormalised without the sentinel
            spatial = alphas[..., :-1] / (1.0 - alphas[..., -1:]).clamp(min=1e-6)
            extras["aux_loss"] = self.alpha_c * ((1.0 - spatial.sum(dim=1)) ** 2).mean()
        return DecoderOutput(logits, alphas, extras)

    def init_state(self, enc: EncoderOutput) -> dict[str, Tensor]:
        return self._start(enc.grid)

    def step(self, prev_tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        h, c, logits, alpha_hat = self._core(self.embedding(prev_tokens), state, prev_tokens.shape[0])
        return torch.log_softmax(logits, dim=-1), {**state, "h": h, "c": c}, alpha_hat

    def reorder_state(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return reorder_rows(state, index)


@register_decoder("adaptive_attention")
def build(*, vocab_size: int, enc_dim: int, embed_dim: int = 512, attention_dim: int = 512, decoder_dim: int = 512,
          dropout: float = 0.5, alpha_c: float = 0.0) -> AdaptiveAttentionDecoder:
    return AdaptiveAttentionDecoder(vocab_size=vocab_size, enc_dim=enc_dim, embed_dim=embed_dim,
                                    attention_dim=attention_dim, decoder_dim=decoder_dim, dropout=dropout,
                                    alpha_c=alpha_c)
