"""Word embeddings; `seesay.layers.glove.init_word_embeddings` can fill them from GloVe vectors
after the model is built (the vocabulary never passes through a decoder's constructor).

GloVe 6B vectors are 50-d. With `embed_dim == 50` they are copied in; otherwise they are
mapped through a fixed random orthogonal 50 x embed_dim matrix (for embed_dim >= 50 this keeps
every distance and inner product between words; below 50 it is a random projection). The
parameter layout never depends on GloVe, so a checkpoint loads without the vectors. Words
missing from GloVe (and the special tokens) keep their random initialisation; all vectors
are fine-tuned with the decoder.
"""

from __future__ import annotations

from torch import Tensor, nn


class WordEmbedding(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab_size, embed_dim)
        nn.init.uniform_(self.table.weight, -0.1, 0.1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table(tokens)
