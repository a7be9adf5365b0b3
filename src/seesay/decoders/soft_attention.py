"""Show, Attend and Tell (Xu et al. 2015): an LSTM with soft additive attention over the grid.

# b - batch, t - time, n - regions, d - encoder width, h - decoder width, v - vocabulary
Each step attends with the previous hidden state, gates the context with
beta = sigmoid(f_beta(h)), and feeds [word embedding; gated context] to an LSTMCell.
h and c start from the mean region feature. The doubly stochastic regulariser
alpha_c * mean_b (1 - sum_t alpha_bt)^2 is returned as extras["aux_loss"].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seesay.decoders.base import Decoder, DecoderOutput
from seesay.decoders.common import decode_order, image_ids, reorder_rows, restore_order
from seesay.encoders.base import EncoderOutput
from seesay.layers.attention import AdditiveAttention
from seesay.layers.embedding import WordEmbedding
from seesay.registry import register_decoder


class SoftAttentionDecoder(Decoder):
    def __init__(self, *, vocab_size: int, enc_dim: int, embed_dim: int = 512, attention_dim: int = 512,
                 decoder_dim: int = 512, dropout: float = 0.5, alpha_c: float = 0.0) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.alpha_c = alpha_c
        self.embedding = WordEmbedding(vocab_size, embed_dim)
        self.attention = AdditiveAttention(enc_dim, decoder_dim, attention_dim)
        self.init_h = nn.Linear(enc_dim, decoder_dim)
        self.init_c = nn.Linear(enc_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, enc_dim)
        self.lstm = nn.LSTMCell(embed_dim + enc_dim, decoder_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(decoder_dim, vocab_size)
        nn.init.uniform_(self.fc.weight, -0.1, 0.1)
        nn.init.zeros_(self.fc.bias)

    def _start(self, grid: Tensor) -> dict[str, Tensor]:
        mean = grid.mean(dim=1)
        return {"h": self.init_h(mean), "c": self.init_c(mean), "mem_grid": grid, "mem_proj": self.attention.project(grid),
                "img": image_ids(grid.shape[0], grid.device)}

    def _core(self, emb: Tensor, s: dict[str, Tensor], rows: int) -> tuple[Tensor, Tensor, Tensor]:
        h, c = s["h"][:rows], s["c"][:rows]
        context, alpha = self.attention(s["mem_grid"][:rows], s["mem_proj"][:rows], h)
        context = torch.sigmoid(self.f_beta(h)) * context
        h, c = self.lstm(torch.cat([emb, context], dim=-1), (h, c))
        return h, c, alpha

    def forward(self, enc: EncoderOutput, tokens: Tensor, lengths: Tensor) -> DecoderOutput:
        B, T = tokens.shape
        order, steps, rows_per_step = decode_order(lengths)
        s = self._start(enc.grid.index_select(0, order))
        emb = self.embedding(tokens.index_select(0, order)[:, :steps])  # (B, t, E)
        logits = emb.new_zeros(B, T - 1, self.vocab_size)
        alphas = emb.new_zeros(B, T - 1, enc.grid.shape[1])
        for t, rows in enumerate(rows_per_step):  # rows still decoding at step t (sorted longest first)
            h, c, alpha = self._core(emb[:rows, t], s, rows)
            s["h"], s["c"] = h, c
            logits[:rows, t] = self.fc(self.dropout(h))
            alphas[:rows, t] = alpha
        logits, alphas = restore_order(order, logits, alphas)
        extras = {}
        if self.alpha_c > 0:
            extras["aux_loss"] = self.alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean()
        return DecoderOutput(logits, alphas, extras)

    def init_state(self, enc: EncoderOutput) -> dict[str, Tensor]:
        return self._start(enc.grid)

    def step(self, prev_tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        h, c, alpha = self._core(self.embedding(prev_tokens), state, prev_tokens.shape[0])
        state = {**state, "h": h, "c": c}
        return torch.log_softmax(self.fc(self.dropout(h)), dim=-1), state, alpha

    def reorder_state(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return reorder_rows(state, index)


# alpha_c 0 by default: Xu et al.'s 1.0 asks every grid cell for a total attention of 1 over the caption,
# which spreads each word's attention on grids with more cells than words (docs/visualize.md, docs/demo.md)
@register_decoder("soft_attention")
def build(*, vocab_size: int, enc_dim: int, embed_dim: int = 512, attention_dim: int = 512, decoder_dim: int = 512,
          dropout: float = 0.5, alpha_c: float = 0.0) -> SoftAttentionDecoder:
    return SoftAttentionDecoder(vocab_size=vocab_size, enc_dim=enc_dim, embed_dim=embed_dim, attention_dim=attention_dim,
                                decoder_dim=decoder_dim, dropout=dropout, alpha_c=alpha_c)
