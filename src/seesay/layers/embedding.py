"""Word embeddings, optionally initialised from GloVe vectors.

GloVe 6B vectors are 50-d. With `embed_dim == 50` they are copied in; otherwise they are
mapped through a fixed random orthogonal 50 x embed_dim matrix (for embed_dim >= 50 this keeps
every distance and inner product between words; below 50 it is a random projection). The
parameter layout never depends on GloVe, so a checkpoint loads without the vectors. Words
missing from GloVe (and the special tokens) keep their random initialisation; all vectors
are fine-tuned with the decoder.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class WordEmbedding(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int, *, glove: str | None = None,
                 glove_itos: Sequence[str] | None = None) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab_size, embed_dim)
        nn.init.uniform_(self.table.weight, -0.1, 0.1)
        if glove:
            if glove_itos is None:
                # Loading a checkpoint rebuilds the model and then overwrites these weights.
                log.info("glove=%s without a vocabulary: embedding left random (weights expected from a checkpoint)", glove)
            else:
                from seesay.layers.glove import glove_init

                with torch.no_grad():
                    glove_init(self.table.weight, glove, list(glove_itos))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table(tokens)
