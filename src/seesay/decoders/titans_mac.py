"""`titans_mac`: a Titans memory-as-context Transformer (Behrouz, Zhong and Mirrokni, "Titans:
Learning to Memorize at Test Time", arXiv:2501.00663) as a caption decoder.

Built on PyPI's `titans-pytorch` (`MemoryAsContextTransformer`, imported lazily: install with
`pip install 'seesay[titans]'`).

# b - batch, k - image tokens, t - caption time, d - text width, v - vocabulary
The image grid [B,N,D_enc] is projected to the text width and compressed to K tokens
(`compressor="pool"`: adaptive average pooling of the h x w grid, 2-D when K is a square;
`"resampler"`: K learned queries cross-attending to the grid). Those K tokens form a prefix
before the caption: the transformer's input ids are `[IMG]*K <start> w1 .. wn`, and the
library's `token_emb` is a seesay module (`PrefixEmbedding`) that puts the image tokens in place
of the `[IMG]` placeholders. Logits are read at caption positions only, so the loss covers
caption tokens only (never image or padding positions).

`segment_len` (the attention window) defaults to K + max_len, so one window holds the whole
prefix + caption and every caption position attends to every image token.

Generation uses the library's own cache (attention KV cache + neural-memory state) through
seesay's step contract, so `seesay.decoding.greedy / beam_search / sample` work and stop at
<end>. `reorder_state` indexes every tensor of that cache, neural-memory weights, momentum and
pending store segment included (those are laid out (batch * heads) first).

Attention maps: `step()` / `forward()` return layer `attention_layer`'s (default: the last)
attention from each caption position to the K image tokens, averaged over heads, renormalised
over the image tokens and spread back over the encoder grid through the compressor's
`image_map` (exact pooling weights; the resampler's last cross-attention, an approximation).
The probabilities come from a forward hook on the library's `Attend` (`AttentionProbe`).

Library problems handled here (see docs/titans.md):
- titans-pytorch issue #64: the per-head memory parameters are stride-0 views sharing storage
  with `memory_model`'s weights, so optimizer steps / `load_state_dict` fail with
  neural-memory heads > 1 and safetensors refuses to save even with heads = 1. They are
  cloned into independent parameters after building (`untie_memory_parameters`).
- `use_accelerated_scan` needs CUDA: it is switched on per call only for CUDA inputs.
- NaNs in long runs (issues #22, #29): the neural memory's `max_grad_norm` is set (default 1.0).
- The library's cache after a multi-token forward keeps the last `window` keys even when they
  straddle two windows (wrong once the prompt is longer than a window); seesay prefills at most
  one window with a full forward and feeds the rest one token at a time.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seesay.decoders.base import Decoder, DecoderOutput
from seesay.encoders.base import EncoderOutput
from seesay.errors import SeesayError, missing_extra
from seesay.registry import register_decoder


def import_titans() -> Any:
    """The titans_pytorch module, or a one-line SeesayError naming the extra to install."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script deprecation in its dependencies
            import titans_pytorch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise missing_extra("titans-pytorch", "titans") from e
    return titans_pytorch


# ---- image prefix ------------------------------------------------------------------------------


class PrefixEmbedding(nn.Module):
    """The MAC transformer's `token_emb`: word embeddings, with image tokens put in place of
    the `placeholder_id` positions.

    The image tokens are handed over for the duration of a call with `with emb.images(x):`,
    x [B, M, D]: the j-th placeholder of row b (counting from the left) takes x[b, j]. Rows may
    hold fewer than M placeholders (a prefix of the sequence while generating, or fewer images
    in that row). Outside such a block, placeholders are an error.
    """

    def __init__(self, num_embeddings: int, dim: int, placeholder_id: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_embeddings, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.placeholder_id = placeholder_id
        self.pending: Tensor | None = None

    @contextmanager
    def images(self, tokens: Tensor | None):
        previous, self.pending = self.pending, tokens
        try:
            yield self
        finally:
            self.pending = previous

    def forward(self, ids: Tensor) -> Tensor:
        is_img = ids == self.placeholder_id
        emb = self.embed(ids.masked_fill(is_img, 0))
        if not bool(is_img.any()):
            return emb
        src = self.pending
        if src is None:
            raise RuntimeError("image placeholders in the input but no image tokens were given")
        rank = is_img.long().cumsum(1) - 1  # j for the j-th placeholder of each row
        if int(rank.max()) >= src.shape[1] or src.shape[0] != ids.shape[0]:
            raise RuntimeError(
                f"{int(rank.max()) + 1} image placeholders in a row but image tokens of shape {tuple(src.shape)}"
            )
        picked = src.gather(1, rank.clamp(min=0).unsqueeze(-1).expand(-1, -1, src.shape[-1]))
        return torch.where(is_img.unsqueeze(-1), picked.to(emb.dtype), emb)


class PoolCompressor(nn.Module):
    """Project the grid to the text width, then adaptive-average-pool it to K tokens.

    With a square K and a known h x w grid the pooling is 2-D (K = s x s cells), otherwise 1-D
    over the flattened grid. A learned per-token embedding marks each pooled token's slot.
    """

    def __init__(self, enc_dim: int, dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(enc_dim, dim)
        self.slot = nn.Parameter(torch.zeros(num_tokens, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, grid: Tensor, grid_hw: tuple[int, int] | None) -> Tensor:
        x = self.proj(grid)  # (B, N, D)
        b, n, d = x.shape
        k = self.num_tokens
        side = math.isqrt(k)
        if grid_hw is not None and grid_hw[0] * grid_hw[1] == n and side * side == k:
            h, w = grid_hw
            x = F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(b, d, h, w), (side, side))
            x = x.flatten(2).transpose(1, 2)
        else:
            x = F.adaptive_avg_pool1d(x.transpose(1, 2), k).transpose(1, 2)
        return self.norm(x + self.slot)

    def image_map(self, grid: Tensor, grid_hw: tuple[int, int] | None) -> Tensor:
        """M [B, K, N]: image token k is sum_n M[k, n] * proj(grid[n]) (before slot + norm).

        The pooling weights themselves (each row sums to 1), found by pooling the identity, so
        attention to token k spreads over exactly the cells it averages.
        """
        b, n = grid.shape[:2]
        k = self.num_tokens
        eye = torch.eye(n, device=grid.device, dtype=torch.float32)  # (N cells, N channels)
        side = math.isqrt(k)
        if grid_hw is not None and grid_hw[0] * grid_hw[1] == n and side * side == k:
            m = F.adaptive_avg_pool2d(eye.reshape(n, *grid_hw), (side, side)).flatten(1)  # (N, K)
        else:
            m = F.adaptive_avg_pool1d(eye.unsqueeze(0), k).squeeze(0)  # (N, K)
        return m.t().unsqueeze(0).expand(b, -1, -1)  # (B, K, N)


class ResamplerCompressor(nn.Module):
    """K learned queries cross-attending to the projected grid (a small Perceiver resampler):
    `depth` blocks of (cross-attention, feed-forward), pre-norm, residual."""

    def __init__(self, enc_dim: int, dim: int, num_tokens: int, heads: int = 4, depth: int = 1) -> None:
        super().__init__()
        if dim % heads:
            heads = 1
        self.num_tokens = num_tokens
        self.proj = nn.Linear(enc_dim, dim)
        self.queries = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "norm_q": nn.LayerNorm(dim),
                    "norm_kv": nn.LayerNorm(dim),
                    "attn": nn.MultiheadAttention(dim, heads, batch_first=True),
                    "ff": nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
                }
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, grid: Tensor, grid_hw: tuple[int, int] | None, *, return_map: bool = False
                ) -> Tensor | tuple[Tensor, Tensor]:
        kv = self.proj(grid)
        q = self.queries.unsqueeze(0).expand(grid.shape[0], -1, -1)
        weights = None
        for i, blk in enumerate(self.blocks):
            ctx = blk["norm_kv"](kv)
            want = return_map and i == len(self.blocks) - 1
            y, w = blk["attn"](blk["norm_q"](q), ctx, ctx, need_weights=want, average_attn_weights=True)
            weights = w if want else weights
            q = q + y
            q = q + blk["ff"](q)
        return (self.norm(q), weights) if return_map else self.norm(q)

    def image_map(self, grid: Tensor, grid_hw: tuple[int, int] | None) -> Tensor:
        """[B, K, N]: the last block's cross-attention of each query over the grid, averaged over
        heads (rows sum to 1). An approximation of where token k's content comes from: earlier
        blocks and the residual path also shape it."""
        return self.forward(grid, grid_hw, return_map=True)[1]


def build_compressor(kind: str, enc_dim: int, dim: int, num_tokens: int, heads: int = 4, depth: int = 1) -> nn.Module:
    if num_tokens < 1:
        raise SeesayError(f"titans_mac: num_image_tokens must be >= 1, not {num_tokens}")
    if kind == "pool":
        return PoolCompressor(enc_dim, dim, num_tokens)
    if kind == "resampler":
        return ResamplerCompressor(enc_dim, dim, num_tokens, heads=heads, depth=depth)
    raise SeesayError(f"titans_mac: compressor must be 'pool' or 'resampler', not {kind!r}")


# ---- the library model and its cache -----------------------------------------------------------


def untie_memory_parameters(mac: nn.Module) -> int:
    """titans-pytorch #64: give every neural memory's per-head parameters their own storage.

    `NeuralMemory` wraps `einops.repeat` views (stride 0 over heads, sharing storage with
    `memory_model`'s weights) in nn.Parameter; in-place optimizer updates, load_state_dict and
    safetensors all fail on them. Returns the number of parameters replaced.
    """
    count = 0
    for module in mac.modules():
        params = getattr(module, "memory_model_parameters", None)
        if isinstance(params, nn.ParameterList):
            for i, p in enumerate(params):
                params[i] = nn.Parameter(p.detach().clone().contiguous(), requires_grad=p.requires_grad)
                count += 1
            # the memory is always read through functional_call with `memory_model_parameters`;
            # memory_model's own weights never get gradients, so they are frozen (DDP-friendly)
            for q in module.memory_model.parameters():
                q.requires_grad_(False)
    return count


def build_mac(
    *,
    num_tokens: int,
    dim: int,
    depth: int,
    segment_len: int,
    token_emb: nn.Module,
    heads: int = 4,
    dim_head: int = 64,
    num_persist_mem_tokens: int = 4,
    num_longterm_mem_tokens: int = 4,
    neural_memory_layers: tuple[int, ...] | None = None,
    neural_mem_heads: int = 1,
    neural_mem_dim_head: int | None = None,
    max_grad_norm: float | None = 1.0,
    neural_memory_segment_len: int | None = None,
    neural_memory_batch_size: int | None = None,
    neural_memory_kwargs: dict[str, Any] | None = None,
    use_accelerated_scan: bool | str = "auto",
    **mac_kwargs: Any,
) -> nn.Module:
    """A `MemoryAsContextTransformer` with seesay's fixes applied (see the module docstring)."""
    titans = import_titans()
    mem_kwargs = dict(neural_memory_kwargs or {})
    mem_kwargs.setdefault("heads", neural_mem_heads)
    if neural_mem_dim_head is not None:
        mem_kwargs.setdefault("dim_head", neural_mem_dim_head)
    elif mem_kwargs["heads"] > 1:
        mem_kwargs.setdefault("dim_head", max(1, dim // mem_kwargs["heads"]))
    if max_grad_norm is not None:
        mem_kwargs.setdefault("max_grad_norm", float(max_grad_norm))
    # built with the pure-torch scan; `set_accelerated_scan` switches per device at call time
    mem_kwargs["use_accelerated_scan"] = False
    if neural_memory_layers is not None:
        neural_memory_layers = tuple(int(i) for i in neural_memory_layers)
        bad = [i for i in neural_memory_layers if not 1 <= i <= depth]
        if bad:
            raise SeesayError(f"titans_mac: neural_memory_layers {bad} outside 1..depth={depth}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mac = titans.MemoryAsContextTransformer(
            num_tokens=num_tokens,
            dim=dim,
            depth=depth,
            segment_len=segment_len,
            heads=heads,
            dim_head=dim_head,
            num_persist_mem_tokens=num_persist_mem_tokens,
            num_longterm_mem_tokens=num_longterm_mem_tokens,
            neural_memory_layers=neural_memory_layers,
            neural_memory_segment_len=neural_memory_segment_len,
            neural_memory_batch_size=neural_memory_batch_size,
            neural_memory_kwargs=mem_kwargs,
            token_emb=token_emb,
            **mac_kwargs,
        )
    untie_memory_parameters(mac)
    mac.seesay_accelerated_scan = use_accelerated_scan
    return mac


def set_accelerated_scan(mac: nn.Module, device: torch.device) -> None:
    """Use accelerated-scan's kernels only for CUDA tensors (they cannot run on CPU)."""
    want = getattr(mac, "seesay_accelerated_scan", "auto")
    on = device.type == "cuda" and (want is True or (want == "auto" and _accelerated_scan_available()))
    for module in mac.modules():
        if hasattr(module, "assoc_scan") and hasattr(module.assoc_scan, "use_accelerated"):
            module.assoc_scan.use_accelerated = on
            module.use_accelerated_scan = on


def _accelerated_scan_available() -> bool:
    try:
        import accelerated_scan  # noqa: F401
    except ImportError:
        return False
    return True


def _index_tensordict(td: Any, index: Tensor, dim: int) -> Any:
    return type(td)({k: v.index_select(dim, index) for k, v in td.items()})


def reorder_mac_cache(cache: tuple | None, index: Tensor, mem_heads: int) -> tuple | None:
    """Rows `index` of a titans-pytorch MAC cache `(seq_index, kv, [NeuralMemState, ...])`.

    kv is [layers, 2, B, heads, n, d_head]. Each NeuralMemState holds `weights` and `updates`
    (TensorDicts with (B * mem_heads) first), `cache_store_segment` [2, B, r, D] (tokens waiting
    for a full chunk), `states` = (last update (B*h first), momentum [order, B*h, ...]).
    """
    if cache is None:
        return None
    seq_index, kv, mems = cache
    kv = kv.index_select(2, index) if torch.is_tensor(kv) else kv
    h = mem_heads
    bh = (index[:, None] * h + torch.arange(h, device=index.device)).reshape(-1)
    new_mems = []
    for st in mems or []:
        fields = {}
        if st.weights is not None:
            fields["weights"] = _index_tensordict(st.weights, bh, 0)
        if st.updates is not None:
            fields["updates"] = _index_tensordict(st.updates, bh, 0)
        if st.cache_store_segment is not None:
            fields["cache_store_segment"] = st.cache_store_segment.index_select(1, index)
        if st.states is not None:
            last_update, momentum = st.states
            fields["states"] = (
                _index_tensordict(last_update, bh, 0) if last_update is not None else None,
                _index_tensordict(momentum, bh, 1) if momentum is not None else None,
            )
        new_mems.append(st._replace(**fields))
    return (seq_index, kv, new_mems)


def mac_window(mac: nn.Module) -> int:
    return int(mac.segment_len)


def mac_prefill(mac: nn.Module, ids: Tensor) -> tuple[Tensor, tuple]:
    """Run `ids` [B, T] (T >= 1) through the MAC with caching; returns (last logits [B, V], cache).

    At most one window (segment_len tokens) goes through a full forward: the library's cache
    after a longer multi-token forward keeps keys from two windows. The rest is fed one token at
    a time, which the library handles correctly.
    """
    first = min(ids.shape[1], mac_window(mac))
    logits, cache = mac(ids[:, :first], cache=None, return_cache=True, disable_flex_attn=True)
    last = logits[:, -1]
    for t in range(first + 1, ids.shape[1] + 1):
        last, cache = mac_extend(mac, ids[:, :t], cache)
    return last, cache


def mac_extend(mac: nn.Module, ids: Tensor, cache: tuple) -> tuple[Tensor, tuple]:
    """Process the last token of `ids` given the cache of all earlier ones.

    The library inserts long-term memory tokens after every segment; a call that lands on one
    returns no logits and advances the cache, so it is repeated until the new token is reached.
    """
    for _ in range(int(getattr(mac, "num_longterm_mem_tokens", 0)) + 1):
        logits, cache = mac(ids, cache=cache, return_cache=True, disable_flex_attn=True)
        if logits is not None:
            return logits[:, -1], cache
    raise RuntimeError("titans_mac: the library cache did not reach the new token")  # pragma: no cover


# ---- attention to the image ---------------------------------------------------------------------


class AttentionProbe:
    """Reads the last attention layer's weights through a forward hook on its `Attend` module.

    The library discards the attention probabilities (`out, _ = self.attend(...)`); `Attend`
    itself returns them (x-transformers' `Intermediates.post_softmax_attn`, [(B*windows), heads,
    queries, persist + keys]). The hook keeps them while `capture()` is active and does nothing
    otherwise. If a configuration returns none (flash attention), they are recomputed from the
    hook's q, k (softmax(q k^T / sqrt(d)) with the call's mask and end-aligned causal mask).
    """

    def __init__(self, attn: nn.Module) -> None:
        self.persist = int(attn.persistent_memory.shape[2])  # persistent-memory keys come first
        self.sliding = bool(getattr(attn, "sliding", False))
        self.active = False
        self.last: Tensor | None = None
        attn.attend.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        if not self.active:
            return
        inter = out[1] if isinstance(out, tuple) and len(out) > 1 else None
        post = getattr(inter, "post_softmax_attn", None)
        if post is None:
            q, k = args[0], args[1]
            sim = (q @ k.transpose(-1, -2)).float() * (getattr(module, "scale", None) or q.shape[-1] ** -0.5)
            mask = kwargs.get("mask")
            if mask is not None:
                sim = sim.masked_fill(~mask, float("-inf"))
            i, j = sim.shape[-2:]
            if i > 1:
                sim = sim.masked_fill(torch.ones(i, j, dtype=torch.bool, device=sim.device).triu(j - i + 1), float("-inf"))
            post = sim.softmax(-1)
        self.last = post.detach()

    @contextmanager
    def capture(self):
        self.active, self.last = True, None
        try:
            yield self
        finally:
            self.active = False


def find_attention_layers(mac: nn.Module) -> list[nn.Module]:
    """The MAC transformer's `SegmentedAttention` modules, first layer first."""
    layers = [m for m in mac.modules() if hasattr(m, "attend") and hasattr(m, "persistent_memory")]
    if not layers:  # pragma: no cover - depends on the library version
        raise RuntimeError("titans_mac: no SegmentedAttention layer found in the MAC transformer")
    return layers


# ---- the decoder -------------------------------------------------------------------------------


@dataclass
class TitansState:
    ids: Tensor  # (B, t) ids fed so far: K placeholders, <start>, words
    image: Tensor  # (B, K, D) image tokens for the placeholders
    cache: tuple | None  # titans-pytorch cache; None = recompute (uncached)
    image_map: Tensor | None = None  # (B, K, N) how each image token draws on the grid cells


class TitansMACDecoder(Decoder):
    """Image-prefix captioner on titans-pytorch's MemoryAsContextTransformer (see module doc)."""

    # the neural memory's parameters do not all get a gradient in every step: DDP must look for them
    ddp_find_unused_parameters = True

    def __init__(
        self,
        *,
        vocab_size: int,
        enc_dim: int,
        dim: int = 384,
        depth: int = 4,
        segment_len: int | None = None,
        num_image_tokens: int = 16,
        compressor: str = "pool",
        resampler_depth: int = 1,
        heads: int = 4,
        dim_head: int = 64,
        num_persist_mem_tokens: int = 4,
        num_longterm_mem_tokens: int = 4,
        neural_memory_layers: tuple[int, ...] | list[int] | None = None,
        neural_mem_heads: int = 1,
        max_grad_norm: float | None = 1.0,
        max_len: int = 52,
        neural_memory_segment_len: int | None = None,
        use_accelerated_scan: bool | str = "auto",
        use_cache: bool = True,
        **mac_kwargs: Any,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.num_image_tokens = k = int(num_image_tokens)
        self.max_len = int(max_len)
        self.segment_len = int(segment_len) if segment_len else k + self.max_len
        self.neural_mem_heads = int(neural_mem_heads)
        self.use_cache = use_cache
        if neural_memory_layers is None:  # every second layer, as in titans-pytorch's train_mac.py
            neural_memory_layers = tuple(range(2, depth + 1, 2)) or (1,)
        self.compress = build_compressor(compressor, enc_dim, dim, k, heads=heads, depth=resampler_depth)
        self.placeholder_id = vocab_size  # one id beyond the vocabulary
        self.mac = build_mac(
            num_tokens=vocab_size,
            dim=dim,
            depth=depth,
            segment_len=self.segment_len,
            token_emb=PrefixEmbedding(vocab_size + 1, dim, self.placeholder_id),
            heads=heads,
            dim_head=dim_head,
            num_persist_mem_tokens=num_persist_mem_tokens,
            num_longterm_mem_tokens=num_longterm_mem_tokens,
            neural_memory_layers=tuple(neural_memory_layers),
            neural_mem_heads=neural_mem_heads,
            max_grad_norm=max_grad_norm,
            neural_memory_segment_len=neural_memory_segment_len,
            use_accelerated_scan=use_accelerated_scan,
            **mac_kwargs,
        )
        self._warned_long = False
        # one (inactive) probe per layer; `attention_layer` picks whose attention is returned
        self._probes = [AttentionProbe(a) for a in find_attention_layers(self.mac)]
        self.attention_layer = -1

    @property
    def _probe(self) -> AttentionProbe:
        n = len(self._probes)
        if not -n <= self.attention_layer < n:
            raise SeesayError(f"titans_mac: attention_layer {self.attention_layer} outside -{n}..{n - 1}")
        return self._probes[self.attention_layer]

    @property
    def token_emb(self) -> PrefixEmbedding:
        return self.mac.token_emb

    def image_tokens(self, enc: EncoderOutput) -> Tensor:
        """The K image tokens [B, K, D] that prefix the caption."""
        return self.compress(enc.grid, enc.grid_hw)

    def _run(self, ids: Tensor, image: Tensor) -> Tensor:
        set_accelerated_scan(self.mac, ids.device)
        with self.token_emb.images(image):
            return self.mac(ids, disable_flex_attn=not ids.is_cuda)

    def forward(self, enc: EncoderOutput, tokens: Tensor, lengths: Tensor) -> DecoderOutput:
        b, t = tokens.shape
        k = self.num_image_tokens
        if t - 1 > self.segment_len - k and not self._warned_long:
            warnings.warn(
                f"titans_mac: {k} image tokens + {t - 1} caption inputs exceed segment_len={self.segment_len}; "
                "words beyond the first window see the image only through the neural memory",
                stacklevel=2,
            )
            self._warned_long = True
        image = self.image_tokens(enc)
        prefix = tokens.new_full((b, k), self.placeholder_id)
        ids = torch.cat([prefix, tokens[:, :-1]], dim=1)
        with self._probe.capture() as probe:
            logits = self._run(ids, image)[:, k:]
        attention = None
        if probe.last is not None and t > 1:  # (B, T-1, N): as step() returns, one row per prediction
            to_image = self.image_attention(probe.last, torch.arange(k, ids.shape[1], device=ids.device), b, cached=False)
            image_map = self.compress.image_map(enc.grid, enc.grid_hw).to(to_image.dtype)
            attention = torch.einsum("btk,bkn->btn", to_image, image_map)
            steps = (lengths.to(ids.device) - 1).clamp(min=0)  # padding positions are exact zeros
            attention = attention * (torch.arange(t - 1, device=ids.device)[None] < steps[:, None]).unsqueeze(-1)
        return DecoderOutput(logits, attention, {})

    # ---- step contract ----
    def init_state(self, enc: EncoderOutput, *, use_cache: bool | None = None) -> TitansState:
        image = self.image_tokens(enc)
        b = image.shape[0]
        ids = torch.full((b, self.num_image_tokens), self.placeholder_id, dtype=torch.long, device=image.device)
        cache = None
        if self.use_cache if use_cache is None else use_cache:
            set_accelerated_scan(self.mac, image.device)
            with self.token_emb.images(image):
                _, cache = mac_prefill(self.mac, ids)
        image_map = self.compress.image_map(enc.grid, enc.grid_hw).to(image.dtype)  # (B, K, N)
        return TitansState(ids, image, cache, image_map)

    def step(self, prev_tokens: Tensor, state: TitansState) -> tuple[Tensor, TitansState, Tensor | None]:
        """One token; the attention returned is layer `attention_layer`'s (default: the last),
        from the new token to the image (see `image_attention`), spread over the encoder grid:
        [B, N]."""
        ids = torch.cat([state.ids, prev_tokens.long().view(-1, 1)], dim=1)
        set_accelerated_scan(self.mac, ids.device)
        with self.token_emb.images(state.image), self._probe.capture() as probe:
            if state.cache is None:
                logits = self.mac(ids, disable_flex_attn=True)[:, -1]
                cache = None
            else:
                logits, cache = mac_extend(self.mac, ids, state.cache)
        attention = None
        if state.image_map is not None and probe.last is not None:
            to_image = self.image_attention(probe.last, ids.shape[1] - 1, ids.shape[0], cached=state.cache is not None)
            attention = torch.einsum("bk,bkn->bn", to_image.to(state.image_map.dtype), state.image_map)  # (B, N)
        return F.log_softmax(logits.float(), dim=-1), TitansState(ids, state.image, cache, state.image_map), attention

    def image_attention(self, post: Tensor, pos: int | Tensor, batch: int, *, cached: bool) -> Tensor:
        """Attention of the tokens at input positions `pos` (an int, or [T] for a full forward)
        to the K image tokens: [B, K] (int) or [B, T, K]. Read from the attention layer's
        probabilities `post`, averaged over heads and renormalised over the image tokens (the
        share spent on text, persistent-memory and long-term-memory keys is dropped, so rows sum
        to 1). Rows are 0 where no image token is in the token's attention window (captions
        longer than a window: the image then reaches it only through the neural memory).

        Positions: the library puts `num_longterm_mem_tokens` memory tokens after every
        `segment_len` inputs, so input u sits at u + (u // segment_len) * L in its sequence. A
        full forward folds the sequence into windows of segment_len + L queries whose keys are
        the persistent memories then the window (the previous window too with sliding
        attention); a cached step has one query whose keys are the persistent memories then the
        cached keys, ending at the new token.
        """
        single = not torch.is_tensor(pos)
        dev = post.device
        pos_t = torch.as_tensor([pos] if single else pos, device=dev).long().view(-1)  # (T,)
        seg, lm = int(self.mac.segment_len), int(getattr(self.mac, "num_longterm_mem_tokens", 0))
        window = seg + lm
        img = torch.arange(self.num_image_tokens, device=dev)
        img = img + (img // seg) * lm  # (K,) image tokens' sequence positions
        s = pos_t + (pos_t // seg) * lm  # (T,) the queries' sequence positions
        pm = self._probe.persist
        if cached:
            if pos_t.numel() != 1:
                raise ValueError("a cached step has one query")
            row = post[:, :, -1:, :].transpose(1, 2)  # (B, 1, h, j)
            j = row.shape[-1]
            idx = pm + img[None] - s[:, None] + (j - pm) - 1  # (1, K)
            valid = idx >= pm
        else:
            nw = post.shape[0] // batch
            w = s // window
            row = post.reshape(batch, nw, *post.shape[1:]).transpose(2, 3)[:, w, s % window]  # (B, T, h, j)
            j = row.shape[-1]
            first = (w - 1) * window if self._probe.sliding else w * window  # (T,) first key's position
            idx = pm + img[None] - first[:, None]  # (T, K)
            valid = img[None] >= first[:, None]
        valid = valid & (idx < j) & (img[None] <= s[:, None])
        a = row.float().mean(dim=2)  # (B, T, j) averaged over heads
        out = a.gather(2, idx.clamp(0, j - 1).unsqueeze(0).expand(a.shape[0], -1, -1)) * valid.to(a.dtype)  # (B, T, K)
        total = out.sum(dim=-1, keepdim=True)
        out = torch.where(total > 0, out / total.clamp_min(1e-12), torch.zeros_like(out))
        return out[:, 0] if single else out

    def reorder_state(self, state: TitansState, index: Tensor) -> TitansState:
        return replace(
            state,
            ids=state.ids.index_select(0, index),
            image=state.image.index_select(0, index),
            cache=reorder_mac_cache(state.cache, index, self.neural_mem_heads),
            image_map=None if state.image_map is None else state.image_map.index_select(0, index),
        )


@register_decoder("titans_mac")
def build(**kwargs: Any) -> TitansMACDecoder:
    """Titans MAC decoder; takes TitansMACDecoder's keyword arguments. segment_len=None means
    num_image_tokens + max_len (one window holds the image prefix and the whole caption). Extra
    keyword arguments go to the library's MemoryAsContextTransformer (e.g. sliding_window_attn,
    ff_mult, num_residual_streams)."""
    return TitansMACDecoder(**kwargs)
