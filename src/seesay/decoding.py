"""Caption generation as pure functions over the decoder step contract.

# b - images, k - beams, l - generated length, v - vocabulary, a - attention columns
Every function is batched over images (and beams): one decoder step per time step for the
whole batch, never a Python loop per image. Results are `DecodeResult`s: tokens exclude
<start>, include <end> when it was emitted, and are padded with `pad` (0 by default).

Length penalty (beam search): GNMT style, score = sum(logprob) / lp(len) with
lp(len) = ((5 + len) / 6) ** length_penalty and len counting <end>. 0 disables it.

Prompts: every function takes `prefix` (Long [P] or [B, P], no <start>/<end>/<pad>): the
first P tokens are forced, exactly as if the decoder had picked them (<start> then the prefix
go through `step()` to build the state), then decoding continues from there. The result is
that forced decoding: tokens start with the prefix, lengths and scores count it (the model's
log-probabilities of the forced tokens are part of the score), attention has a row per prefix
token. `max_len` limits the tokens generated after the prefix.

Strategies are values (`Greedy()`, `Beam(size, length_penalty)`, `Sample(temperature, top_k,
top_p, seed)`), never inferred from which keyword arguments are set; `decode(decoder, enc,
strategy, ...)` runs one. `Sample(temperature=0)` is greedy decoding: that rule lives in
`decode` and nowhere else. `strategy_from_options` turns command-line style options into a
strategy (sampling when a temperature, top-k or top-p is given, else beam / greedy).

Special ids come from the caller's tokenizer (`bos`, `eos`, `pad`); nothing here assumes
fixed ids. Results are padded with `pad`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from seesay.encoders.base import EncoderOutput


class DecodeResult(NamedTuple):
    tokens: Tensor  # (B, L) long, padded with the tokenizer's pad id
    lengths: Tensor  # (B,) long, tokens generated including <end>
    scores: Tensor  # (B,) sum of log-probabilities (length-normalised for beams with a penalty)
    attention: Tensor | None  # (B, L, A) or None


@dataclass(frozen=True)
class Greedy:
    """The most likely token at each step."""


@dataclass(frozen=True)
class Beam:
    """Beam search with `size` beams; GNMT length penalty `length_penalty` (0: none)."""

    size: int = 3
    length_penalty: float = 0.0

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"beam size must be an integer >= 1, not {self.size!r}")
        if not self.length_penalty >= 0:
            raise ValueError(f"length_penalty must be >= 0 (0: none), not {self.length_penalty!r}")


@dataclass(frozen=True)
class Sample:
    """Ancestral sampling: logits / temperature, then top-k, then nucleus (top-p) filtering.

    temperature 0 means greedy decoding. `seed` makes the draws reproducible (a generator on the
    decoding device seeded with it); None draws from the global RNG.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), not {self.temperature!r}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), not {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p!r}")


Strategy = Greedy | Beam | Sample


def strategy_from_options(*, beam_size: int = 1, length_penalty: float = 0.0, temperature: float | None = None,
                          top_k: int = 0, top_p: float = 1.0, seed: int | None = None) -> Strategy:
    """Command-line style options -> a strategy: sampling when `temperature`, `top_k` or `top_p`
    is set, otherwise beam search with `beam_size` (greedy for 1)."""
    if temperature is not None or top_k or top_p < 1.0:
        return Sample(temperature=1.0 if temperature is None else float(temperature), top_k=int(top_k),
                      top_p=float(top_p), seed=seed)
    if beam_size <= 1:
        if beam_size < 1:
            raise ValueError(f"beam size must be >= 1, not {beam_size}")
        return Greedy()
    return Beam(int(beam_size), float(length_penalty))


def describe(strategy: Strategy) -> dict[str, Any]:
    """A strategy as plain JSON (for logs, results files and the server)."""
    from dataclasses import asdict

    return {"strategy": type(strategy).__name__.lower(), **asdict(strategy)}


def decode(decoder: Any, enc: EncoderOutput, strategy: Strategy, *, bos: int, eos: int, pad: int = 0,
           max_len: int = 50, prefix: Tensor | None = None, generator: torch.Generator | None = None) -> DecodeResult:
    """Run `strategy` over the decoder step contract (see the module doc)."""
    if isinstance(strategy, Sample) and strategy.temperature == 0:
        strategy = Greedy()  # the one place where temperature 0 means greedy
    if isinstance(strategy, Greedy):
        return greedy(decoder, enc, bos=bos, eos=eos, pad=pad, max_len=max_len, prefix=prefix)
    if isinstance(strategy, Beam):
        return beam_search(decoder, enc, bos=bos, eos=eos, pad=pad, beam_size=strategy.size, max_len=max_len,
                           length_penalty=strategy.length_penalty, prefix=prefix)
    if isinstance(strategy, Sample):
        if generator is None and strategy.seed is not None:
            generator = torch.Generator(device=enc.grid.device).manual_seed(int(strategy.seed))
        return sample(decoder, enc, bos=bos, eos=eos, pad=pad, max_len=max_len, temperature=strategy.temperature,
                      top_k=strategy.top_k, top_p=strategy.top_p, generator=generator, prefix=prefix)
    raise TypeError(f"not a decoding strategy: {strategy!r} (use Greedy(), Beam(...) or Sample(...))")


def filter_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf.

    top_p keeps the smallest set of most likely tokens whose probability reaches top_p
    (always at least one token).
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        remove_sorted = mass_before >= top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def _stack(tokens: list[Tensor], attention: list[Tensor | None], scores: Tensor, lengths: Tensor) -> DecodeResult:
    toks = torch.stack(tokens, dim=1) if tokens else torch.zeros(scores.shape[0], 0, dtype=torch.long, device=scores.device)
    att = torch.stack(attention, dim=1) if attention and attention[0] is not None else None
    return DecodeResult(toks, lengths, scores, att)


def _check_prefix(prefix: Tensor | None, batch: int, eos: int, device: torch.device, pad: int = 0) -> Tensor | None:
    """`prefix` as Long [B, P] on `device` (None or P == 0: no prefix)."""
    if prefix is None:
        return None
    prefix = torch.as_tensor(prefix, dtype=torch.long, device=device)
    if prefix.dim() == 1:
        prefix = prefix.unsqueeze(0).expand(batch, -1)
    if prefix.dim() != 2 or prefix.shape[0] != batch:
        raise ValueError(f"prefix must be [P] or [B={batch}, P], got {tuple(prefix.shape)}")
    if prefix.shape[1] == 0:
        return None
    if bool((prefix == eos).any()) or bool((prefix == pad).any()):
        raise ValueError("prefix must not contain <end> or <pad>")
    return prefix


def force_prefix(decoder: Any, state: Any, prefix: Tensor, *, bos: int
                 ) -> tuple[Any, Tensor, Tensor, list[Tensor], list[Tensor | None]]:
    """Feed <start> and the prefix [B, P] through `decoder.step`, forcing each prefix token.

    Returns (state, prev [B], scores [B], tokens, attention): the state after the step that
    chose the last prefix token, that token (`prev`, fed by the next step, as after a normal
    pick), the summed log-probabilities of the forced tokens, the forced tokens (one [B] tensor
    per step) and each step's attention ([B, A] or None).
    """
    B = prefix.shape[0]
    prev = torch.full((B,), bos, dtype=torch.long, device=prefix.device)
    scores = torch.zeros(B, device=prefix.device)
    tokens: list[Tensor] = []
    attention: list[Tensor | None] = []
    for j in range(prefix.shape[1]):
        logprobs, state, att = decoder.step(prev, state)
        tok = prefix[:, j]
        scores = scores + logprobs.gather(1, tok[:, None]).squeeze(1).float()
        tokens.append(tok)
        attention.append(att)
        prev = tok
    return state, prev, scores, tokens, attention


class _Active:
    """Which images of a batch still decode, for removing finished ones from the decoder's batch.

    Per-image results stay full-size (B rows, original order); the decoder state holds only the
    active images' rows (`rows_per_image` each, image-major). Images leave in bulk: when at
    least a quarter of the active ones are done (`COMPACT_FRACTION`), so the reorder (which
    copies the per-image memory of those that stay) is paid a few times per batch, not per step.
    """

    COMPACT_FRACTION = 0.25

    def __init__(self, batch: int, device: torch.device) -> None:
        self.batch = batch
        self.ids: Tensor | None = None  # None: every image (no removal yet)
        self.device = device

    def take(self, full: Tensor) -> Tensor:
        """Active rows of a full-size (B, ...) tensor."""
        return full if self.ids is None else full.index_select(0, self.ids)

    def put(self, full: Tensor, part: Tensor) -> Tensor:
        """`full` with its active rows replaced by `part`."""
        return part if self.ids is None else full.index_copy(0, self.ids, part)

    def spread(self, part: Tensor) -> Tensor:
        """A full-size tensor holding `part` in the active rows and zeros elsewhere."""
        if self.ids is None:
            return part
        return part.new_zeros((self.batch, *part.shape[1:])).index_copy_(0, self.ids, part)

    def should_remove(self, n_done: int, n_active: int) -> bool:
        return n_done > 0 and n_done >= self.COMPACT_FRACTION * n_active

    def remove(self, done: Tensor, decoder: Any, state: Any, prev: Tensor, rows_per_image: int) -> tuple[Any, Tensor]:
        """Drop the images with `done` (over the active ones) from the decoder state and `prev`."""
        keep = (~done).nonzero().squeeze(1)
        ids = torch.arange(self.batch, device=self.device) if self.ids is None else self.ids
        self.ids = ids.index_select(0, keep)
        K = rows_per_image
        rows = (keep[:, None] * K + torch.arange(K, device=self.device)).view(-1)
        return decoder.reorder_state(state, rows), prev.index_select(0, rows)


def _autoregressive(decoder: Any, enc: EncoderOutput, pick, *, bos: int, eos: int, max_len: int,
                    prefix: Tensor | None = None, pad: int = 0) -> DecodeResult:
    B = enc.grid.shape[0]
    device = enc.grid.device
    prefix = _check_prefix(prefix, B, eos, device, pad)
    state = decoder.init_state(enc)
    prev = torch.full((B,), bos, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    scores = torch.zeros(B, device=device)
    tokens: list[Tensor] = []
    attention: list[Tensor | None] = []
    if prefix is not None:
        state, prev, scores, tokens, attention = force_prefix(decoder, state, prefix, bos=bos)
        lengths = lengths + prefix.shape[1]
    active = _Active(B, device)  # finished captions leave the decoder's batch
    for _ in range(max_len):
        logprobs, state, att = decoder.step(prev, state)
        tok = pick(logprobs)
        alive = ~active.take(finished)
        scores = active.put(scores, active.take(scores)
                            + torch.where(alive, logprobs.gather(1, tok[:, None]).squeeze(1).float(), 0.0))
        lengths = active.put(lengths, active.take(lengths) + alive.long())
        tok = torch.where(alive, tok, torch.full_like(tok, pad))
        tokens.append(active.spread(tok) if pad == 0 else active.put(torch.full((B,), pad, device=device), tok))
        attention.append(None if att is None else active.spread(att * alive[:, None].to(att.dtype)))
        done = ~alive | (tok == eos)
        finished = active.put(finished, done)
        prev = tok
        n_done = int(done.sum())  # one host sync per step, as the stopping test needs anyway
        if n_done == done.numel():
            break
        if active.should_remove(n_done, done.numel()):
            state, prev = active.remove(done, decoder, state, prev, 1)
    return _stack(tokens, attention, scores, lengths)


@torch.no_grad()
def greedy(decoder: Any, enc: EncoderOutput, *, bos: int, eos: int, max_len: int = 50,
           prefix: Tensor | None = None, pad: int = 0) -> DecodeResult:
    """Most likely word at each step (after the forced `prefix`, if any)."""
    return _autoregressive(decoder, enc, lambda lp: lp.argmax(dim=-1), bos=bos, eos=eos, max_len=max_len,
                           prefix=prefix, pad=pad)


@torch.no_grad()
def sample(decoder: Any, enc: EncoderOutput, *, bos: int, eos: int, max_len: int = 50, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
           prefix: Tensor | None = None, pad: int = 0) -> DecodeResult:
    """Ancestral sampling from the filtered distribution; scores are the model's own log-probabilities."""

    def pick(logprobs: Tensor) -> Tensor:
        probs = torch.softmax(filter_logits(logprobs.float(), temperature=temperature, top_k=top_k, top_p=top_p), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _autoregressive(decoder, enc, pick, bos=bos, eos=eos, max_len=max_len, prefix=prefix, pad=pad)


def _length_penalty(length: Tensor | int, alpha: float) -> Tensor | float:
    if alpha == 0:
        return 1.0
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def beam_search(decoder: Any, enc: EncoderOutput, *, bos: int, eos: int, beam_size: int = 5, max_len: int = 50,
                length_penalty: float = 0.0, prefix: Tensor | None = None, pad: int = 0) -> DecodeResult:
    """Beam search batched over images and beams.

    Each step ranks the 2K best extensions of the K live beams of every image. An extension
    ending in <end> that ranks within the top K becomes a finished hypothesis (a per-image pool
    of the K best); the K best other extensions stay live. An image is done when its pool is
    full and no live beam can still beat the pool's worst (log-probabilities only fall, so
    score / lp(max_len) bounds a live beam). If no hypothesis ever finishes, the best live beam
    at max_len is returned. With beam_size=1 this is exactly greedy decoding.

    With a `prefix` [B, P], <start> and the prefix are fed once per image (B rows, not B*K),
    then every image's first beam starts from that state with the prefix's log-probability as
    its score; lengths (and the length penalty) count the prefix.

    Bookkeeping is by back-pointers: each step keeps only its candidates' tokens, source beams
    and the live beams' attention rows (O(B*K) per step, plus O(B*K*A) attention), and a pool
    entry is just (step, candidate). Copying every hypothesis's whole token and attention
    history each step (O(B*K*t*A)) cost more than the decoder's step at small model sizes.
    The single result per image is rebuilt by walking the pointers back once at the end.
    """
    if beam_size < 1:
        raise ValueError("beam_size must be >= 1")
    if length_penalty < 0:
        raise ValueError("length_penalty must be >= 0 (0: none)")
    B = enc.grid.shape[0]
    K = beam_size
    device = enc.grid.device
    prefix = _check_prefix(prefix, B, eos, device, pad)
    P = 0 if prefix is None else prefix.shape[1]
    total = P + max_len  # longest result, prefix included
    state = decoder.init_state(enc)
    live_scores = torch.full((B, K), float("-inf"), device=device)
    live_scores[:, 0] = 0.0  # all beams start identical: only the first may expand at step 0
    prefix_att: list[Tensor | None] = []
    prev = torch.full((B * K,), bos, dtype=torch.long, device=device)
    if prefix is not None:
        state, prev_b, prefix_scores, _, prefix_att = force_prefix(decoder, state, prefix, bos=bos)
        live_scores[:, 0] = prefix_scores
        prev = prev_b.repeat_interleave(K)
    state = decoder.reorder_state(state, torch.arange(B, device=device).repeat_interleave(K))
    pool_scores = torch.full((B, K), float("-inf"), device=device)
    pool_len = torch.zeros(B, K, dtype=torch.long, device=device)  # 0: empty slot
    pool_cand = torch.zeros(B, K, dtype=torch.long, device=device)  # candidate index at step pool_len - 1
    # per step t (index t - P): candidate tokens / source beams (B, 2K), live picks (B, K), attention (B, K, A)
    hist_tok: list[Tensor] = []
    hist_src: list[Tensor] = []
    hist_pick: list[Tensor] = []
    hist_att: list[Tensor] = []
    bound_lp = _length_penalty(total, length_penalty)
    steps = P
    rank: Tensor | None = None
    new_len: Tensor | None = None
    active = _Active(B, device)  # images whose search is over leave the decoder's batch
    for t in range(P, total):
        logprobs, state, att = decoder.step(prev, state)
        V = logprobs.shape[-1]
        scores_a = active.take(live_scores)
        Ba = scores_a.shape[0]
        cand = (scores_a[:, :, None] + logprobs.float().view(Ba, K, V)).view(Ba, K * V)
        n_cand = min(2 * K, K * V)
        top_scores, top_idx = torch.topk(cand, n_cand, dim=1)  # (Ba, 2K), sorted
        src = top_idx // V  # source beam
        tok = top_idx % V
        if rank is None:
            rank = torch.arange(n_cand, device=device)[None, :].expand(B, -1)
            new_len = torch.empty(B, n_cand, dtype=torch.long, device=device)
        hist_tok.append(active.spread(tok))
        hist_src.append(active.spread(src))
        if att is not None:
            hist_att.append(active.spread(att.float().view(Ba, K, -1)))
        is_eos = tok == eos
        # finished hypotheses: <end> extensions ranked within the top K
        new_fin = torch.where(is_eos & (rank[:Ba] < K), top_scores / _length_penalty(t + 1, length_penalty),
                              float("-inf"))
        merged = torch.cat([active.take(pool_scores), new_fin], dim=1)  # (Ba, K + 2K)
        pool_a, keep = torch.topk(merged, K, dim=1)
        pool_scores = active.put(pool_scores, pool_a)
        pool_len = active.put(pool_len, torch.cat([active.take(pool_len), new_len[:Ba].fill_(t + 1)], dim=1).gather(1, keep))
        pool_cand = active.put(pool_cand, torch.cat([active.take(pool_cand), rank[:Ba]], dim=1).gather(1, keep))
        # live beams: the K best extensions that did not end
        live_a, pick = torch.topk(top_scores.masked_fill(is_eos, float("-inf")), K, dim=1)
        live_scores = active.put(live_scores, live_a)
        hist_pick.append(active.spread(pick))
        local = torch.arange(Ba, device=device)[:, None]
        state = decoder.reorder_state(state, (local * K + src.gather(1, pick)).view(-1))
        prev = tok.gather(1, pick).view(-1)
        steps = t + 1
        # done: the pool is full and no live beam can still beat its worst entry
        done = (pool_a[:, -1] > float("-inf")) & (live_a[:, 0] / bound_lp <= pool_a[:, -1])
        n_done = int(done.sum())  # one host sync per step, as the stopping test needs anyway
        if n_done == done.numel():
            break
        if active.should_remove(n_done, done.numel()):
            # their live beams can no longer win: rule them out of the final choice
            live_scores = active.put(live_scores, live_a.masked_fill(done[:, None], float("-inf")))
            state, prev = active.remove(done, decoder, state, prev, K)
    # the pool competes with the live beams (normalised at their current length)
    live_norm = live_scores / _length_penalty(steps, length_penalty)
    all_scores = torch.cat([pool_scores, live_norm], dim=1)
    best = all_scores.argmax(dim=1, keepdim=True)  # (B, 1)
    live_cand = hist_pick[-1] if hist_pick else torch.zeros(B, K, dtype=torch.long, device=device)
    all_len = torch.cat([pool_len, torch.full_like(pool_len, steps)], dim=1).gather(1, best).squeeze(1)  # (B,)
    cursor = torch.cat([pool_cand, live_cand], dim=1).gather(1, best).squeeze(1)  # candidate at step len - 1
    L = int(all_len.max()) if B else 0
    tokens = torch.full((B, total), pad, dtype=torch.long, device=device)
    with_att = bool(hist_att)
    attention = torch.zeros(B, total, hist_att[0].shape[-1], device=device, dtype=torch.float32) if with_att else None
    flat = torch.arange(B, device=device)
    for s in range(steps - 1, P - 1, -1):  # walk the back-pointers from each hypothesis's last token
        i = s - P
        active = s < all_len  # (B,) the hypothesis reaches position s
        c = cursor[:, None]
        tokens[:, s] = torch.where(active, hist_tok[i].gather(1, c).squeeze(1), pad)
        beam = hist_src[i].gather(1, c).squeeze(1)  # (B,) live beam of step s - 1 it extends
        if attention is not None:
            attention[:, s] = torch.where(active[:, None], hist_att[i][flat, beam], 0.0)
        if i > 0:
            # hypotheses reaching s follow their pointer; shorter ones keep their last candidate
            cursor = torch.where(active, hist_pick[i - 1].gather(1, beam[:, None]).squeeze(1), cursor)
    if prefix is not None:
        has = (all_len > 0)[:, None]
        tokens[:, :P] = torch.where(has, prefix, pad)
        if attention is not None and prefix_att and prefix_att[0] is not None:
            attention[:, :P] = torch.where(has[:, :, None], torch.stack(prefix_att, dim=1).float(), 0.0)
    return DecodeResult(tokens[:, :L], all_len, all_scores.gather(1, best).squeeze(1),
                        None if attention is None else attention[:, :L])
