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

Constraints (`Constraints(no_repeat_ngram_size, min_length, bad_ending_ids, allowed_ids=)`, `decode(...,
constraints=)`) hold for every strategy alike: `apply_constraints` masks the step's
log-probabilities (batched, one call per step) before the strategy picks, so a forbidden token
is never chosen and scores stay the model's own log-probabilities. N-gram blocking counts the
prompt as history; `min_length` counts tokens generated after the prompt (eos is masked before);
a bad ending is a token after which eos is masked (ruotianluo's bad-endings rule); `allowed_ids`
(None: all) masks every other token but eos at every step (a location answer of `<loc_i>`
tokens only, a caption without `<img_i>` tokens). Words are
turned into ids by the captioner (`seesay.captioner.resolve_constraints`), never here. A row
whose every token is ruled out ends (eos is allowed back) rather than producing garbage.

Several captions per image (`decode(..., num_captions=N)`): the result has B*N rows in
image-major order (row i*N + j is image i's j-th caption, best score first), so
`res.tokens.view(B, N, -1)` / `res.scores.view(B, N)` regroup them; `grouped(res, N)` does it for
every field. Beam search returns its N best hypotheses (N <= beam size), sampling N independent
samples sorted by score; greedy decoding has one caption (N > 1 is an error). N=1 is today's
result, unchanged. `DiverseBeam(size, groups, diversity_penalty)` is diverse beam search
(Vijayakumar et al. 2016, see `beam_search`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from seesay.encoders.base import EncoderOutput
from seesay.layers import gemm


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


@dataclass(frozen=True)
class DiverseBeam:
    """Diverse beam search (Vijayakumar et al. 2016): `size` beams in `groups` groups of
    size // groups beams, each group a beam search of its own; at each step a group's candidates
    are ranked by log-probability minus `diversity_penalty` times the number of beams of earlier
    groups that chose the same token at this step (Hamming diversity). Scores are the model's
    log-probabilities (the penalty only steers the choice); `length_penalty` as in `Beam`.
    With groups=1 this is `Beam(size, length_penalty)`."""

    size: int = 6
    groups: int = 3
    diversity_penalty: float = 0.5
    length_penalty: float = 0.0

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"beam size must be an integer >= 1, not {self.size!r}")
        if int(self.groups) != self.groups or self.groups < 1:
            raise ValueError(f"diverse beam groups must be an integer >= 1, not {self.groups!r}")
        if self.size % self.groups:
            raise ValueError(f"beam size {self.size} is not divisible by {self.groups} diverse beam groups")
        if not self.diversity_penalty >= 0:
            raise ValueError(f"diversity_penalty must be >= 0, not {self.diversity_penalty!r}")
        if not self.length_penalty >= 0:
            raise ValueError(f"length_penalty must be >= 0 (0: none), not {self.length_penalty!r}")


Strategy = Greedy | Beam | DiverseBeam | Sample


@dataclass(frozen=True)
class Constraints:
    """What a caption may not do, for every strategy (see the module doc).

    no_repeat_ngram_size  N > 0: no n-gram of N tokens twice in a caption (the prompt included)
    min_length            eos is masked until this many tokens follow the prompt
    bad_ending_ids        token ids that may not be the last token before eos
    bad_endings           the same as words, for a captioner to turn into ids with its tokenizer
                          (`seesay.captioner.resolve_constraints`); `decode` refuses unresolved words
    allowed_ids           None: every token; else the only token ids a caption may contain (eos is
                          always allowed), e.g. only `<loc_i>` tokens for a location answer
    """

    no_repeat_ngram_size: int = 0
    min_length: int = 0
    bad_ending_ids: tuple[int, ...] = ()
    bad_endings: tuple[str, ...] = ()
    allowed_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("no_repeat_ngram_size", "min_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: off), not {v!r}")
            object.__setattr__(self, name, int(v))
        ids = self.bad_ending_ids
        ids = (ids,) if isinstance(ids, int) else tuple(ids)
        if any(isinstance(i, bool) or int(i) != i or i < 0 for i in ids):
            raise ValueError(f"bad_ending_ids must be token ids >= 0, not {self.bad_ending_ids!r}")
        object.__setattr__(self, "bad_ending_ids", tuple(dict.fromkeys(int(i) for i in ids)))
        words = self.bad_endings
        words = [w for w in words.split(",")] if isinstance(words, str) else list(words)
        object.__setattr__(self, "bad_endings", tuple(dict.fromkeys(str(w).strip() for w in words if str(w).strip())))
        if self.allowed_ids is not None:
            allowed = self.allowed_ids
            allowed = (allowed,) if isinstance(allowed, int) else tuple(allowed)
            if any(isinstance(i, bool) or int(i) != i or i < 0 for i in allowed):
                raise ValueError(f"allowed_ids must be token ids >= 0, not {self.allowed_ids!r}")
            object.__setattr__(self, "allowed_ids", tuple(dict.fromkeys(int(i) for i in allowed)))

    @property
    def active(self) -> bool:
        return bool(self.no_repeat_ngram_size or self.min_length or self.bad_ending_ids or self.bad_endings
                    or self.allowed_ids is not None)


def strategy_from_options(*, beam_size: int = 1, length_penalty: float = 0.0, temperature: float | None = None,
                          top_k: int = 0, top_p: float = 1.0, seed: int | None = None, diverse_groups: int = 1,
                          diversity_penalty: float = 0.5) -> Strategy:
    """Command-line style options -> a strategy: sampling when `temperature`, `top_k` or `top_p`
    is set, otherwise beam search with `beam_size` (greedy for 1); diverse beam search when
    `diverse_groups` > 1."""
    sampling = temperature is not None or top_k or top_p < 1.0
    if diverse_groups != 1:
        if sampling:
            raise ValueError("diverse beam search cannot be combined with sampling")
        return DiverseBeam(int(beam_size), int(diverse_groups), float(diversity_penalty), float(length_penalty))
    if sampling:
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
           max_len: int = 50, prefix: Tensor | None = None, generator: torch.Generator | None = None,
           constraints: Constraints | None = None, num_captions: int = 1) -> DecodeResult:
    """Run `strategy` over the decoder step contract (see the module doc): B*num_captions rows,
    image-major, best first, every one obeying `constraints`."""
    if isinstance(strategy, Sample) and strategy.temperature == 0:
        strategy = Greedy()  # the one place where temperature 0 means greedy
    n = _check_controls(strategy, constraints, num_captions, max_len)
    if isinstance(strategy, Greedy):
        if n > 1:
            raise ValueError(f"num_captions={n}: greedy decoding gives one caption per image "
                             "(use beam search or sampling for several)")
        return greedy(decoder, enc, bos=bos, eos=eos, pad=pad, max_len=max_len, prefix=prefix, constraints=constraints)
    if isinstance(strategy, Beam | DiverseBeam):
        groups = strategy.groups if isinstance(strategy, DiverseBeam) else 1
        penalty = strategy.diversity_penalty if isinstance(strategy, DiverseBeam) else 0.0
        return beam_search(decoder, enc, bos=bos, eos=eos, pad=pad, beam_size=strategy.size, max_len=max_len,
                           length_penalty=strategy.length_penalty, prefix=prefix, constraints=constraints,
                           num_captions=n, groups=groups, diversity_penalty=penalty)
    if isinstance(strategy, Sample):
        if generator is None and strategy.seed is not None:
            generator = torch.Generator(device=enc.grid.device).manual_seed(int(strategy.seed))
        return sample(decoder, enc, bos=bos, eos=eos, pad=pad, max_len=max_len, temperature=strategy.temperature,
                      top_k=strategy.top_k, top_p=strategy.top_p, generator=generator, prefix=prefix,
                      constraints=constraints, num_captions=n)
    raise TypeError(f"not a decoding strategy: {strategy!r} (use Greedy(), Beam(...), DiverseBeam(...) or Sample(...))")


def _check_controls(strategy: Any, constraints: Constraints | None, num_captions: int, max_len: int) -> int:
    if isinstance(num_captions, bool) or int(num_captions) != num_captions or num_captions < 1:
        raise ValueError(f"num_captions must be an integer >= 1, not {num_captions!r}")
    n = int(num_captions)
    size = getattr(strategy, "size", None)
    if size is not None and n > size:
        raise ValueError(f"num_captions={n} is more than the beam size {size} (beam search keeps {size} hypotheses)")
    if constraints is not None:
        if not isinstance(constraints, Constraints):
            raise TypeError(f"constraints must be a seesay.decoding.Constraints, not {type(constraints).__name__}")
        if constraints.bad_endings:
            raise ValueError("Constraints.bad_endings are words: a captioner turns them into ids "
                             "(seesay.captioner.resolve_constraints); decode takes bad_ending_ids")
        if constraints.min_length > max_len:
            raise ValueError(f"min_length={constraints.min_length} is more than max_len={max_len}")
    return n


def grouped(res: DecodeResult, num_captions: int) -> DecodeResult:
    """A B*N-row result (image-major) as [B, N, ...] fields: tokens (B, N, L), lengths and scores
    (B, N), attention (B, N, L, A)."""
    n = int(num_captions)
    if res.tokens.shape[0] % n:
        raise ValueError(f"{res.tokens.shape[0]} rows are not a multiple of num_captions={n}")
    b = res.tokens.shape[0] // n
    return DecodeResult(res.tokens.view(b, n, *res.tokens.shape[1:]), res.lengths.view(b, n), res.scores.view(b, n),
                        None if res.attention is None else res.attention.view(b, n, *res.attention.shape[1:]))


def apply_constraints(logprobs: Tensor, constraints: Constraints | None, *, eos: int, generated: int, prev: Tensor,
                      history: Tensor | None = None, bad_ids: Tensor | None = None) -> Tensor:
    """`logprobs` (R, V) with the tokens `constraints` forbid at this step set to -inf.

    `prev` (R,) is each row's last token (bos before the first), `history` (R, T) every token of
    the row so far (prompt included, bos not; needed for n-gram blocking), `generated` the tokens
    generated after the prompt so far (one count: rows advance together). `bad_ids` is
    `constraints.bad_ending_ids` as a tensor on the device (made here when not given). A row left
    with no allowed token gets eos back: the caption ends rather than pick a forbidden token.
    """
    c = constraints
    if c is None or not c.active:
        return logprobs
    V = logprobs.shape[-1]
    out = logprobs
    if c.allowed_ids is not None:
        out = out.masked_fill(~allowed_mask(c.allowed_ids, V, eos, logprobs.device), float("-inf"))
    n = c.no_repeat_ngram_size
    if n and history is not None and history.shape[1] >= n:
        out = out.masked_fill(_repeated_ngram_mask(history, n, V), float("-inf"))
    if 0 <= eos < V:
        end_ban: Tensor | None = None
        if generated < c.min_length:
            end_ban = torch.ones_like(prev, dtype=torch.bool)
        elif c.bad_ending_ids:
            if bad_ids is None:
                bad_ids = torch.tensor(c.bad_ending_ids, dtype=torch.long, device=prev.device)
            end_ban = torch.isin(prev, bad_ids)
        if end_ban is not None:
            out = out.clone() if out is logprobs else out
            out[:, eos] = out[:, eos].masked_fill(end_ban, float("-inf"))
        if out is not logprobs:
            stuck = ~torch.isfinite(out).any(dim=-1)
            out[:, eos] = torch.where(stuck, logprobs[:, eos], out[:, eos])
    return out


def allowed_mask(allowed_ids: tuple[int, ...], vocab: int, eos: int, device: torch.device) -> Tensor:
    """(V,) True for the tokens `Constraints.allowed_ids` lets a caption use (eos always)."""
    if any(i >= vocab for i in allowed_ids):
        raise ValueError(f"Constraints.allowed_ids: {max(allowed_ids)} is not a token id of this "
                         f"{vocab}-token vocabulary")
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[torch.tensor([*allowed_ids, eos] if 0 <= eos < vocab else allowed_ids, dtype=torch.long, device=device)] = True
    return mask


def _repeated_ngram_mask(history: Tensor, n: int, vocab: int) -> Tensor:
    """(R, V) True for each token that would complete an n-gram already in the row's history."""
    windows = history.unfold(1, n, 1)  # (R, W, n): every n-gram so far
    suffix = history[:, history.shape[1] - (n - 1):]  # (R, n - 1): the n-gram being started
    match = (windows[:, :, : n - 1] == suffix[:, None, :]).all(dim=-1)  # (R, W)
    hits = torch.zeros(history.shape[0], vocab, device=history.device)
    hits.scatter_add_(1, windows[:, :, n - 1].clamp(0, vocab - 1), match.float())
    return hits > 0


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

    def remove(self, done: Tensor, decoder: Any, state: Any, prev: Tensor, rows_per_image: int,
               history: Tensor | None = None) -> tuple[Any, Tensor, Tensor | None]:
        """Drop the images with `done` (over the active ones) from the decoder state, `prev` and
        `history` (per-row tensors)."""
        keep = (~done).nonzero().squeeze(1)
        ids = torch.arange(self.batch, device=self.device) if self.ids is None else self.ids
        self.ids = ids.index_select(0, keep)
        K = rows_per_image
        rows = (keep[:, None] * K + torch.arange(K, device=self.device)).view(-1)
        return (decoder.reorder_state(state, rows), prev.index_select(0, rows),
                None if history is None else history.index_select(0, rows))


def _autoregressive(decoder: Any, enc: EncoderOutput, pick, *, bos: int, eos: int, max_len: int,
                    prefix: Tensor | None = None, pad: int = 0, constraints: Constraints | None = None,
                    copies: int = 1) -> DecodeResult:
    """One token per row per step; `copies` rows per image (image-major), sorted by score at the end."""
    B = enc.grid.shape[0]
    device = enc.grid.device
    prefix = _check_prefix(prefix, B, eos, device, pad)
    state = decoder.init_state(enc)
    prev = torch.full((B,), bos, dtype=torch.long, device=device)
    scores = torch.zeros(B, device=device)
    tokens: list[Tensor] = []
    attention: list[Tensor | None] = []
    if prefix is not None:
        state, prev, scores, tokens, attention = force_prefix(decoder, state, prefix, bos=bos)
    if copies > 1:  # the prompt is fed once per image, then each image's rows go their own way
        rows = torch.arange(B, device=device).repeat_interleave(copies)
        state = decoder.reorder_state(state, rows)
        prev, scores = prev.index_select(0, rows), scores.index_select(0, rows)
        tokens = [t.index_select(0, rows) for t in tokens]
        attention = [None if a is None else a.index_select(0, rows) for a in attention]
        B = B * copies
    P = len(tokens)
    lengths = torch.full((B,), P, dtype=torch.long, device=device)
    constrained = constraints is not None and constraints.active
    bad_ids = _bad_ids(constraints, device)
    history = None  # (active rows, t): for n-gram blocking only
    if constrained and constraints.no_repeat_ngram_size:
        history = torch.stack(tokens, dim=1) if tokens else torch.zeros(B, 0, dtype=torch.long, device=device)
    active = _Active(B, device)  # finished captions leave the decoder's batch
    # the active rows' running scores, lengths and whether they still run; written back to the
    # full-size `scores` and `lengths` when rows leave and at the end
    scores_a, lengths_a = scores, lengths
    alive = torch.ones(B, dtype=torch.bool, device=device)
    for s in range(max_len):
        logprobs, state, att = decoder.step(prev, state)
        if constrained:
            logprobs = apply_constraints(logprobs, constraints, eos=eos, generated=s, prev=prev, history=history,
                                         bad_ids=bad_ids)
        tok = pick(logprobs)
        scores_a = scores_a + torch.where(alive, logprobs.gather(1, tok[:, None]).squeeze(1), 0.0)  # float32 sum
        lengths_a = lengths_a + alive
        tok = torch.where(alive, tok, pad)
        tokens.append(active.spread(tok) if pad == 0 else active.put(torch.full((B,), pad, device=device), tok))
        attention.append(None if att is None else active.spread(att * alive[:, None]))
        if history is not None:
            history = torch.cat([history, tok[:, None]], dim=1)
        alive = alive & (tok != eos)
        prev = tok
        n_alive = int(alive.sum())  # one host sync per step, as the stopping test needs anyway
        if n_alive == 0:
            break
        if active.should_remove(alive.numel() - n_alive, alive.numel()):
            scores, lengths = active.put(scores, scores_a), active.put(lengths, lengths_a)
            state, prev, history = active.remove(~alive, decoder, state, prev, 1, history)
            scores_a, lengths_a = active.take(scores), active.take(lengths)
            alive = torch.ones(scores_a.shape[0], dtype=torch.bool, device=device)
    scores, lengths = active.put(scores, scores_a), active.put(lengths, lengths_a)
    res = _stack(tokens, attention, scores, lengths)
    if copies > 1:  # each image's rows, best score first (stable: ties keep their order)
        order = torch.sort(res.scores.view(-1, copies), dim=1, descending=True, stable=True).indices
        rows = (order + torch.arange(0, B, copies, device=device)[:, None]).view(-1)
        res = DecodeResult(*(None if x is None else x.index_select(0, rows) for x in res))
    return res


def _bad_ids(constraints: Constraints | None, device: torch.device) -> Tensor | None:
    if constraints is None or not constraints.bad_ending_ids:
        return None
    return torch.tensor(constraints.bad_ending_ids, dtype=torch.long, device=device)


@torch.no_grad()
@gemm.packing()
def greedy(decoder: Any, enc: EncoderOutput, *, bos: int, eos: int, max_len: int = 50,
           prefix: Tensor | None = None, pad: int = 0, constraints: Constraints | None = None) -> DecodeResult:
    """Most likely word at each step (after the forced `prefix`, if any)."""
    return _autoregressive(decoder, enc, lambda lp: lp.argmax(dim=-1), bos=bos, eos=eos, max_len=max_len,
                           prefix=prefix, pad=pad, constraints=constraints)


@torch.no_grad()
@gemm.packing()
def sample(decoder: Any, enc: EncoderOutput, *, bos: int, eos: int, max_len: int = 50, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
           prefix: Tensor | None = None, pad: int = 0, constraints: Constraints | None = None,
           num_captions: int = 1) -> DecodeResult:
    """Ancestral sampling from the filtered distribution; scores are the model's own log-probabilities.
    `num_captions` N: N independent samples per image (B*N rows, image-major, best score first)."""

    def pick(logprobs: Tensor) -> Tensor:
        probs = torch.softmax(filter_logits(logprobs.float(), temperature=temperature, top_k=top_k, top_p=top_p), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _autoregressive(decoder, enc, pick, bos=bos, eos=eos, max_len=max_len, prefix=prefix, pad=pad,
                           constraints=constraints, copies=int(num_captions))


def _length_penalty(length: Tensor | int, alpha: float) -> Tensor | float:
    if alpha == 0:
        return 1.0
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
@gemm.packing()
def beam_search(decoder: Any, enc: EncoderOutput, *, bos: int, eos: int, beam_size: int = 5, max_len: int = 50,
                length_penalty: float = 0.0, prefix: Tensor | None = None, pad: int = 0,
                constraints: Constraints | None = None, num_captions: int = 1, groups: int = 1,
                diversity_penalty: float = 0.0) -> DecodeResult:
    """Beam search batched over images and beams.

    Each step ranks the 2K best extensions of the K live beams of every image. An extension
    ending in <end> that ranks within the top K becomes a finished hypothesis (a per-image pool
    of the K best); the K best other extensions stay live. An image is done when its pool is
    full and no live beam can still beat the pool's worst (log-probabilities only fall, so
    score / lp(max_len) bounds a live beam). If no hypothesis ever finishes, the best live beam
    at max_len is returned. With beam_size=1 this is exactly greedy decoding. `num_captions` N
    returns the N best of the pool and the live beams (B*N rows, image-major, best first).

    Diverse beam search (`groups` G > 1, Vijayakumar et al. 2016): each image runs G searches
    of K/G beams (pool, stopping test and all), one after the other within a step: group g
    ranks its extensions by score minus `diversity_penalty` times how many live beams of groups
    0..g-1 picked that token at this step. Only the ranking is penalised: scores (and the final
    choice among all groups' hypotheses) are log-probabilities. An image is done when all its
    groups are. G=1 is plain beam search, computed the same way.

    With a `prefix` [B, P], <start> and the prefix are fed once per image (B rows, not B*K),
    then every image's first beam (of each group) starts from that state with the prefix's
    log-probability as its score; lengths (and the length penalty) count the prefix.

    Bookkeeping is by back-pointers: each step keeps only its candidates' tokens, source beams,
    where each pool slot came from and the live beams' attention rows (O(B*K) per step, plus
    O(B*K*A) attention). Copying every hypothesis's whole token and attention history each step
    (O(B*K*t*A)) cost more than the decoder's step at small model sizes. The results are rebuilt
    by walking the pointers back once at the end, on the host. A step's bookkeeping is about 20
    small tensor operations and one host sync (the stopping test); on a GPU, and on a CPU at small
    model sizes, their count sets the speed more than the decoder's arithmetic. (N-gram blocking
    does keep each live beam's tokens, as it must look at them.)
    """
    if beam_size < 1:
        raise ValueError("beam_size must be >= 1")
    if length_penalty < 0:
        raise ValueError("length_penalty must be >= 0 (0: none)")
    if groups < 1 or beam_size % groups:
        raise ValueError(f"beam size {beam_size} is not divisible by {groups} diverse beam groups")
    if not 1 <= num_captions <= beam_size:
        raise ValueError(f"num_captions must be in 1..beam size {beam_size}, not {num_captions}")
    B = enc.grid.shape[0]
    K, G, N = beam_size, groups, int(num_captions)
    Kg = K // G  # beams per group
    device = enc.grid.device
    prefix = _check_prefix(prefix, B, eos, device, pad)
    P = 0 if prefix is None else prefix.shape[1]
    total = P + max_len  # longest result, prefix included
    state = decoder.init_state(enc)
    live_scores = torch.full((B, G, Kg), float("-inf"), device=device)
    live_scores[:, :, 0] = 0.0  # a group's beams start identical: only its first may expand at step 0
    prefix_att: list[Tensor | None] = []
    prev = torch.full((B * K,), bos, dtype=torch.long, device=device)
    if prefix is not None:
        state, prev_b, prefix_scores, _, prefix_att = force_prefix(decoder, state, prefix, bos=bos)
        live_scores[:, :, 0] = prefix_scores[:, None]
        prev = prev_b.repeat_interleave(K)
    state = decoder.reorder_state(state, torch.arange(B, device=device).repeat_interleave(K))
    constrained = constraints is not None and constraints.active
    bad_ids = _bad_ids(constraints, device)
    history = None  # (active rows, t) tokens of each live beam, for n-gram blocking only
    if constrained and constraints.no_repeat_ngram_size:
        history = (prefix.repeat_interleave(K, dim=0) if prefix is not None
                   else torch.zeros(B * K, 0, dtype=torch.long, device=device))
    pool_scores = torch.full((B, G, Kg), float("-inf"), device=device)
    # per step t (index t - P): candidate tokens / source beams (B, G, 2Kg), live picks (B, G, Kg), where
    # each pool slot came from (B, G, Kg: an earlier slot below Kg, else Kg + the rank of a new
    # hypothesis of this step) and the live beams' attention (B, G, Kg, A)
    hist_tok: list[Tensor] = []
    hist_src: list[Tensor] = []
    hist_pick: list[Tensor] = []
    hist_keep: list[Tensor] = []
    hist_att: list[Tensor] = []
    lp_total = _length_penalty(total, length_penalty)
    steps = P
    active = _Active(B, device)  # images whose search is over leave the decoder's batch
    reorder_beams = getattr(decoder, "reorder_beams", decoder.reorder_state)
    # loop invariants, made once: a beam step is dozens of small operations, and at small model sizes
    # (and on a GPU at any size) their count, not the decoder's arithmetic, sets the speed
    same_slots = torch.arange(Kg, device=device).expand(B, G, Kg).contiguous()  # a pool left as it was
    group_base = torch.arange(G, device=device)[None, :, None] * Kg
    base = torch.arange(B, device=device)[:, None, None] * K + group_base  # first row of each (image, group)
    lowest = torch.finfo(torch.float32).min
    for t in range(P, total):
        logprobs, state, att = decoder.step(prev, state)
        if constrained:
            logprobs = apply_constraints(logprobs, constraints, eos=eos, generated=t - P, prev=prev, history=history,
                                         bad_ids=bad_ids)
        if logprobs.dtype != torch.float32:
            logprobs = logprobs.float()
        V = logprobs.shape[-1]
        scores_a = active.take(live_scores)  # (Ba, G, Kg)
        Ba = scores_a.shape[0]
        cand = (logprobs.view(Ba, G, Kg, V) + scores_a[..., None]).view(Ba, G, Kg * V)
        top_scores, tok, src, pick = _rank_groups(cand, V, Kg, eos, diversity_penalty)
        hist_tok.append(active.spread(tok))
        hist_src.append(active.spread(src))
        if att is not None:
            hist_att.append(active.spread((att if att.dtype == torch.float32 else att.float()).view(Ba, G, Kg, -1)))
        # finished hypotheses: <end> extensions ranked within the top Kg of their group (candidates
        # ranked below Kg never finish)
        new_fin = top_scores[..., :Kg].masked_fill(tok[..., :Kg] != eos, float("-inf"))
        if length_penalty:
            new_fin = new_fin / _length_penalty(t + 1, length_penalty)
        pool_a, keep = torch.topk(torch.cat([active.take(pool_scores), new_fin], dim=2), Kg, dim=2)
        pool_scores = active.put(pool_scores, pool_a)
        hist_keep.append(active.put(same_slots, keep))
        # live beams: the Kg best extensions of each group that did not end
        live_a = top_scores.gather(2, pick)
        live_scores = active.put(live_scores, live_a)
        hist_pick.append(active.spread(pick))
        rows = (base + src.gather(2, pick)).view(-1)
        state = reorder_beams(state, rows)
        prev = tok.gather(2, pick).view(-1)
        if history is not None:
            history = torch.cat([history.index_select(0, rows), prev[:, None]], dim=1)
        steps = t + 1
        # done: in every group the pool is full and no live beam can still beat its worst entry
        # (log-probabilities only fall, so a live beam's score over lp(total) bounds it). A live
        # score of -inf is raised to the lowest float, so that an empty pool (-inf) is never beaten.
        bound = live_a.amax(dim=2)
        if length_penalty:
            bound = bound / lp_total
        done = bound.clamp(min=lowest) <= pool_a[..., -1]
        done = done[:, 0] if G == 1 else done.all(dim=1)
        n_done = int(done.sum())  # one host sync per step, as the stopping test needs anyway
        if n_done == done.numel():
            break
        if active.should_remove(n_done, done.numel()):
            # their live beams can no longer win: rule them out of the final choice
            live_scores = active.put(live_scores, live_a.masked_fill(done[:, None, None], float("-inf")))
            state, prev, history = active.remove(done, decoder, state, prev, K, history)
            base = torch.arange(Ba - n_done, device=device)[:, None, None] * K + group_base
    return _trace_back(hist_tok, hist_src, hist_pick, hist_keep, hist_att, pool_scores,
                       live_scores / _length_penalty(steps, length_penalty), steps=steps, total=total, n=N, pad=pad,
                       prefix=prefix, prefix_att=prefix_att)


def _rank_groups(cand: Tensor, V: int, Kg: int, eos: int, diversity_penalty: float
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per group, the 2Kg best extensions (by score minus the diversity penalty) and the Kg live picks.

    cand (Ba, G, Kg*V) summed log-probabilities. Returns candidate scores (unpenalised), tokens
    and source beams (Ba, G, 2Kg) in ranking order, and the live picks (Ba, G, Kg) among them.
    """
    Ba, G, _ = cand.shape
    n_cand = min(2 * Kg, Kg * V)
    if G == 1:
        top_scores, top_idx = torch.topk(cand, n_cand, dim=2)  # sorted
        tok = top_idx % V
        # the Kg best that do not end: a stable sort puts the others first, in ranking order
        pick = torch.sort(tok == eos, dim=2, stable=True).indices[..., :Kg]
        return top_scores, tok, top_idx // V, pick
    counts = torch.zeros(Ba, V, device=cand.device)  # live picks of earlier groups per token, this step
    out = []
    for g in range(G):  # groups in turn (G is small); every image at once
        ranked = cand[:, g]
        if g and diversity_penalty:
            ranked = (ranked.view(Ba, Kg, V) - diversity_penalty * counts[:, None, :]).view(Ba, Kg * V)
        top_ranked, top_idx = torch.topk(ranked, n_cand, dim=1)
        tok = top_idx % V
        live, pick = torch.topk(top_ranked.masked_fill(tok == eos, float("-inf")), Kg, dim=1)
        counts.scatter_add_(1, tok.gather(1, pick), (live > float("-inf")).float())
        out.append((cand[:, g].gather(1, top_idx), tok, top_idx // V, pick))
    return tuple(torch.stack(x, dim=1) for x in zip(*out))  # type: ignore[return-value]


def _trace_back(hist_tok: list[Tensor], hist_src: list[Tensor], hist_pick: list[Tensor], hist_keep: list[Tensor],
                hist_att: list[Tensor], pool_scores: Tensor, live_norm: Tensor, *, steps: int, total: int, n: int,
                pad: int, prefix: Tensor | None, prefix_att: list[Tensor | None]) -> DecodeResult:
    """The n best of the pool and the live beams (normalised at their current length) per image,
    rebuilt by walking the back-pointers from each hypothesis's last token.

    The pointers are a few integers per beam and step: they are walked on the host (numpy), in one
    copy from the device, rather than by a dozen small device operations per step; the attention
    rows are then picked on the device in one indexing operation.
    """
    B, G, Kg = pool_scores.shape
    K = G * Kg
    device = pool_scores.device
    P = 0 if prefix is None else prefix.shape[1]
    S = len(hist_tok)  # steps - P
    all_scores = torch.cat([pool_scores.view(B, K), live_norm.view(B, K)], dim=1)  # (B, 2K): pool, then live
    # stable: among equal scores the first wins (argmax's choice), pool before live
    best_scores, best = torch.sort(all_scores, dim=1, descending=True, stable=True)
    best_scores = best_scores[:, :n].reshape(-1)  # (M = B*n,)
    best = best[:, :n].reshape(-1).cpu().numpy()
    M = best.shape[0]
    img = np.repeat(np.arange(B), n)
    in_pool = best < K
    slot = np.where(in_pool, best, best - K)
    grp, slot = slot // Kg, slot % Kg
    if S:
        tok_h, src_h, pick_h, keep_h = (torch.stack(h).cpu().numpy() for h in (hist_tok, hist_src, hist_pick, hist_keep))
    # a pool entry's length and candidate: follow its slot back to the step that filled it (none: an
    # empty slot, length 0)
    pool_len = np.zeros(M, dtype=np.int64)
    pool_cand = np.zeros(M, dtype=np.int64)
    j = slot.copy()
    open_ = in_pool.copy()  # still looking
    for i in range(S - 1, -1, -1):
        if not open_.any():
            break
        k = keep_h[i, img, grp, j]
        new = open_ & (k >= Kg)
        pool_len[new] = P + i + 1
        pool_cand[new] = k[new] - Kg
        open_ &= ~new
        j = np.where(open_, k, j)
    live_cand = pick_h[S - 1, img, grp, slot] if S else np.zeros(M, dtype=np.int64)
    all_len = np.where(in_pool, pool_len, steps)  # (M,)
    cursor = np.where(in_pool, pool_cand, live_cand)  # candidate at step len - 1
    L = int(all_len.max()) if M else 0
    tokens = np.full((M, total), pad, dtype=np.int64)
    beam_at = np.zeros((M, S), dtype=np.int64)  # the live beam each hypothesis extends at each step
    for s in range(steps - 1, P - 1, -1):
        i = s - P
        reach = s < all_len  # (M,) the hypothesis reaches position s
        tokens[:, s] = np.where(reach, tok_h[i, img, grp, cursor], pad)
        beam = src_h[i, img, grp, cursor]  # (M,) live beam of step s - 1 (in its group) it extends
        beam_at[:, i] = beam
        if i > 0:
            # hypotheses reaching s follow their pointer; shorter ones keep their last candidate
            cursor = np.where(reach, pick_h[i - 1, img, grp, beam], cursor)
    lengths = torch.from_numpy(all_len).to(device)
    out_tokens = torch.from_numpy(tokens[:, :L]).to(device)
    if prefix is not None:
        has = (lengths > 0)[:, None]
        img_t = torch.from_numpy(img).to(device)
        out_tokens[:, :P] = torch.where(has, prefix.index_select(0, img_t), pad)[:, :L]
    attention = None
    if hist_att:
        attention = torch.zeros(M, L, hist_att[0].shape[-1], device=device, dtype=torch.float32)
        if L > P:
            at = (np.arange(L - P)[None, :], img[:, None], grp[:, None], beam_at[:, : L - P])
            rows = torch.stack(hist_att[: L - P])[tuple(torch.from_numpy(a).to(device) for a in at)]  # (M, L - P, A)
            reach = torch.from_numpy(np.arange(P, L)[None, :] < all_len[:, None]).to(device)
            attention[:, P:] = torch.where(reach[..., None], rows, 0.0)
        if prefix is not None and prefix_att and prefix_att[0] is not None and L:
            has = (lengths > 0)[:, None, None]
            attention[:, :P] = torch.where(has, torch.stack(prefix_att, dim=1).float().index_select(0, img_t), 0.0)[:, :L]
    return DecodeResult(out_tokens, lengths, best_scores, attention)
