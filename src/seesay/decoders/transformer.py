"""A standard Transformer decoder (Vaswani et al. 2017) cross-attending to the image grid.

# b - batch, t - time, n - regions, d - model width, h - heads, k - head width, v - vocabulary
Pre-norm layers: masked self-attention, cross-attention to the projected grid (+ 2-D
sinusoidal positions), feed-forward. Attention runs through scaled_dot_product_attention,
except the last layer's cross-attention, computed explicitly so its weights (averaged over
heads) can be returned as the decoder's attention (`attention_layer` picks another layer).

Teacher forcing uses a causal mask; captions are right-padded, so the causal mask already
hides every padding key from every real position (a key-padding mask would change nothing
there) and the batch is trimmed to the longest caption. Decoding keeps a KV cache: each step
runs one position through the layers, with the grid's cross-attention keys/values computed
once in init_state. `use_cache=False` recomputes the whole prefix each step (for tests and
the benchmark). Teacher forcing with `image_rows` computes the keys/values once per image too:
an image's caption rows query its memory together when they come image-major (as the
image-grouped batches do), else each row gets a copy of its image's keys/values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seesay.decoders.base import Decoder, DecoderOutput
from seesay.decoders.common import image_ids, reorder_beam_rows, reorder_rows
from seesay.encoders.base import EncoderOutput
from seesay.layers import gemm
from seesay.layers.attention import rows_per_image
from seesay.layers.embedding import WordEmbedding
from seesay.layers.positional import sinusoid, sinusoid_2d
from seesay.registry import register_decoder


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model {d_model} is not divisible by heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = gemm.Linear(d_model, 3 * d_model)
        self.self_out = gemm.Linear(d_model, d_model)
        self.cross_q = gemm.Linear(d_model, d_model)
        self.cross_kv = gemm.Linear(d_model, 2 * d_model)
        self.cross_out = gemm.Linear(d_model, d_model)
        self.ff = nn.Sequential(gemm.Linear(d_model, ff_dim), nn.GELU(), nn.Dropout(dropout), gemm.Linear(ff_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, K)
        B, T, D = x.shape
        return x.view(B, T, self.heads, D // self.heads).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:  # (B, H, T, K) -> (B, T, D)
        B, H, T, K = x.shape
        return x.transpose(1, 2).reshape(B, T, H * K)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        k, v = self.cross_kv(memory).chunk(2, dim=-1)
        return self._split(k), self._split(v)  # (B, H, N, K)

    def _cross_attend(self, q: Tensor, mem_k: Tensor, mem_v: Tensor, p: float, want_attention: bool
                      ) -> tuple[Tensor, Tensor | None]:
        """q (R, H, T, K) against one memory row per image, mem_k/mem_v (M, H, N, K), R = G * M.

        The G rows of an image (beams) become G * T queries of that image's memory, so beams
        share the keys and values instead of each holding a copy. Returns y (R, H, T, K) and,
        if asked, the weights averaged over heads (R, T, N).
        """
        R, H, T, K = q.shape
        M = mem_k.shape[0]
        G = rows_per_image(M, R)
        if G > 1:
            q = q.view(M, G, H, T, K).transpose(1, 2).reshape(M, H, G * T, K)
        attention = None
        if want_attention:
            weights = torch.softmax((q @ mem_k.transpose(-2, -1)) / math.sqrt(K), dim=-1)  # (M, H, G*T, N)
            attention = weights.mean(dim=1).reshape(R, T, -1)
            y = F.dropout(weights, p) @ mem_v
        else:
            y = F.scaled_dot_product_attention(q, mem_k, mem_v, dropout_p=p)
        if G > 1:
            y = y.view(M, H, G, T, K).transpose(1, 2).reshape(R, H, T, K)
        return y, attention

    def forward(self, x: Tensor, mem_k: Tensor, mem_v: Tensor, *, cache: tuple[Tensor, Tensor] | None = None,
                causal: bool = True, want_attention: bool = False) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor | None]:
        """x (B, T, D). With `cache` (past keys/values) x holds only the new positions."""
        p = self.dropout if self.training else 0.0
        q, k, v = (self._split(z) for z in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        # with a cache, the new query is the last position and may see every cached key
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal and cache is None and q.shape[2] > 1)
        x = x + self.drop(self.self_out(self._merge(y)))
        y, attention = self._cross_attend(self._split(self.cross_q(self.norm2(x))), mem_k, mem_v, p, want_attention)
        x = x + self.drop(self.cross_out(self._merge(y)))
        x = x + self.drop(self.ff(self.norm3(x)))
        return x, (k, v), attention


class TransformerDecoder(Decoder):
    takes_image_rows = True
    packs_logits = True

    def __init__(self, *, vocab_size: int, enc_dim: int, d_model: int = 512, heads: int = 8, layers: int = 3,
                 ff_dim: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.use_cache = True
        self.attention_layer = -1  # whose cross-attention step()/forward() return (default: the last)
        self.embedding = WordEmbedding(vocab_size, d_model)
        self.memory_proj = gemm.Linear(enc_dim, d_model)
        self.memory_norm = nn.LayerNorm(d_model)
        self.layers = nn.ModuleList(DecoderLayer(d_model, heads, ff_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)
        self.fc = gemm.Linear(d_model, vocab_size)

    def _memory(self, enc: EncoderOutput) -> list[tuple[Tensor, Tensor]]:
        mem = self.memory_proj(enc.grid)  # (B, N, D)
        h, w = enc.grid_hw
        if h * w == mem.shape[1]:
            mem = mem + sinusoid_2d(h, w, self.d_model, mem.device).to(mem.dtype)
        mem = self.memory_norm(mem)
        return [layer.memory_kv(mem) for layer in self.layers]

    def _embed(self, tokens: Tensor, start: int) -> Tensor:
        x = self.embedding(tokens) * math.sqrt(self.d_model)
        pos = sinusoid(torch.arange(start, start + tokens.shape[1], device=tokens.device), self.d_model)
        return self.drop(x + pos.to(x.dtype))

    def _run(self, x: Tensor, memory: list[tuple[Tensor, Tensor]], caches: list | None,
             head: bool = True) -> tuple[Tensor, list, Tensor]:
        """(logits, or with `head` False the normalised states before the output layer, caches, attention)."""
        new_caches, attention = [], None
        shown = self.attention_layer % len(self.layers)
        for i, layer in enumerate(self.layers):
            x, kv, att = layer(x, *memory[i], cache=None if caches is None else caches[i], want_attention=i == shown)
            new_caches.append(kv)
            if i == shown:
                attention = att
        x = self.norm(x)
        return (self.fc(x) if head else x), new_caches, attention

    def forward(self, enc: EncoderOutput, tokens: Tensor, lengths: Tensor,
                image_rows: Tensor | None = None, packed: bool = False) -> DecoderOutput:
        """`enc` holds one row per image when `image_rows` [B] names each caption's image, else one per caption;
        `packed`: the output layer runs on real positions only, whose logits come back alone (decoders/base.py)."""
        B, T = tokens.shape
        steps = max(int(lengths.max()) - 1, 0) if B else 0
        if steps == 0:  # no caption has a word to predict (every length <= 1): nothing to run
            attention = enc.grid.new_zeros(B, T - 1, enc.grid.shape[1])
            if packed:
                return DecoderOutput(enc.grid.new_zeros(0, self.vocab_size), attention, {}, tokens.new_zeros(0))
            return DecoderOutput(enc.grid.new_zeros(B, T - 1, self.vocab_size), attention, {})
        memory = self._memory(enc)
        if image_rows is not None:
            image_rows = image_rows.to(tokens.device)
            M = enc.grid.shape[0]
            G = B // M if M and B % M == 0 else 0
            if not (G and torch.equal(image_rows, torch.arange(M, device=tokens.device).repeat_interleave(G))):
                memory = [(k.index_select(0, image_rows), v.index_select(0, image_rows)) for k, v in memory]
        hidden, _, attention = self._run(self._embed(tokens[:, :steps], 0), memory, None, head=False)
        real = torch.arange(steps, device=tokens.device)[None, :] < (lengths.to(tokens.device) - 1)[:, None]
        attention = attention * real[..., None].to(attention.dtype)  # padding positions are exact zeros
        if steps < T - 1:  # keep the contract's (B, T-1, .) shape
            attention = F.pad(attention, (0, 0, 0, T - 1 - steps))
        if packed:
            b, t = real.nonzero(as_tuple=True)
            return DecoderOutput(self.fc(hidden[b, t]), attention, {}, b * (T - 1) + t)
        logits = self.fc(hidden)
        logits = logits * real[..., None].to(logits.dtype)
        if steps < T - 1:
            logits = F.pad(logits, (0, 0, 0, T - 1 - steps))
        return DecoderOutput(logits, attention, {})

    def init_state(self, enc: EncoderOutput) -> dict[str, Tensor]:
        B = enc.grid.shape[0]
        state = {"img": image_ids(B, enc.grid.device), "tokens": enc.grid.new_zeros(B, 0, dtype=torch.long)}
        for i, (k, v) in enumerate(self._memory(enc)):
            state[f"mem_k{i}"], state[f"mem_v{i}"] = k, v
        return state

    def step(self, prev_tokens: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        memory = [(state[f"mem_k{i}"], state[f"mem_v{i}"]) for i in range(len(self.layers))]
        tokens = torch.cat([state["tokens"], prev_tokens[:, None]], dim=1)  # (B, t+1)
        state = {**state, "tokens": tokens}
        if self.use_cache:
            t = tokens.shape[1] - 1
            caches = [(state[f"k{i}"], state[f"v{i}"]) for i in range(len(self.layers))] if t > 0 else None
            logits, new_caches, attention = self._run(self._embed(prev_tokens[:, None], t), memory, caches)
            for i, (k, v) in enumerate(new_caches):
                state[f"k{i}"], state[f"v{i}"] = k, v
        else:  # full recompute of the prefix
            logits, _, attention = self._run(self._embed(tokens, 0), memory, None)
        return torch.log_softmax(logits[:, -1], dim=-1), state, attention[:, -1]

    def reorder_state(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return reorder_rows(state, index)

    def reorder_beams(self, state: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
        return reorder_beam_rows(state, index)


@register_decoder("transformer")
def build(*, vocab_size: int, enc_dim: int, d_model: int = 512, heads: int = 8, layers: int = 3, ff_dim: int = 2048,
          dropout: float = 0.1, embed_dim: int | None = None) -> TransformerDecoder:
    """`embed_dim`, when given, is an alias of `d_model` (the word embedding width is the model width)."""
    if embed_dim is not None:
        d_model = embed_dim
    return TransformerDecoder(vocab_size=vocab_size, enc_dim=enc_dim, d_model=d_model, heads=heads, layers=layers,
                              ff_dim=ff_dim, dropout=dropout)
