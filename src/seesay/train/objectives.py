"""Training objectives: objects that score one batch and return a dict of losses and metrics.

# r - caption rows, t - time, v - vocabulary
An objective is called as `objective(model, src, tokens, lengths, image_rows)` (`model` is the
captioner, possibly inside DDP; `src` images or cached features; `tokens` [R,T] `bos w.. eos pad..`
rows with `lengths` [R]; `image_rows` [R] or None), plus `prompt=` [R,P] ids (each row's input text,
`seesay.data.tasks`) for models that read one, and returns:

    "loss_<name>"   scalar tensors; the loop backpropagates their sum
    "n"             rows in the batch (the weight of this batch in the logged averages)
    anything else   a metric (float or 0-dim tensor), logged as a running mean

A family's own regulariser arrives in the model output's `extras["aux_loss"]` (already weighted,
e.g. soft attention's alpha_c * doubly-stochastic term) and is returned as "loss_regulariser".

An objective with `by_image = True` (`SelfCritical`) needs whole images instead of caption rows:
it is called as `objective(model, src, references)`, `src` one row per image (images or cached
features) and `references` each image's raw reference sentences, and makes its own caption rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from seesay.captioner import packed_request, sequence_logprobs
from seesay.errors import SeesayError
from seesay.train.distributed import all_reduce_sum


def token_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, *,
                        label_smoothing: float = 0.0, normalise_globally: bool = True,
                        positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, token count, top-5 hits) over real positions; logits[:, t] predicts tokens[:, t+1].

    The loss is averaged over every real token of the *global* batch (so 2 processes with half
    the batch each give the same gradient as one process with all of it); padding never counts.
    With `positions` [K] (a decoder's packed output, decoders/base.py) `logits` is (K, V), the
    real positions only, row k at b * (T-1) + t: the same loss without a padded (R, T-1, V) tensor.
    """
    if positions is not None:
        sel = logits.float()
        tgt = tokens[:, 1:].reshape(-1).index_select(0, positions.to(tokens.device)).to(logits.device)
        n_local = torch.tensor(sel.shape[0], device=logits.device)
    else:
        steps = logits.size(1)
        targets = tokens[:, 1: steps + 1]
        mask = torch.arange(steps, device=logits.device)[None, :] < (lengths.to(logits.device) - 1)[:, None]  # (R, T-1)
        sel = logits[mask].float()  # (K, V)
        tgt = targets[mask]
        n_local = mask.sum()
    ce = F.cross_entropy(sel, tgt, reduction="sum", label_smoothing=label_smoothing)
    with torch.no_grad():
        hits = (sel.topk(min(5, sel.size(-1)), dim=-1).indices == tgt[:, None]).any(-1).sum()
    n_global = n_local.detach().clone().double()
    world = 1
    if normalise_globally and torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        all_reduce_sum(n_global)
    loss = ce * world / n_global.clamp(min=1).to(ce.dtype)
    return loss, n_local, hits


class CrossEntropy:
    """Teacher-forced cross-entropy over the caption tokens, with optional label smoothing
    (the target keeps 1 - eps of the mass, eps is spread uniformly over the vocabulary)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise SeesayError(f"--label-smoothing must be in [0, 1), not {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    by_image = False

    def __call__(self, model: Any, src: Any, tokens: torch.Tensor, lengths: torch.Tensor,
                 image_rows: torch.Tensor | None = None, prompt: torch.Tensor | None = None,
                 bool_masked_pos: torch.Tensor | None = None) -> dict[str, Any]:
        extra = packed_request(model)
        if bool_masked_pos is not None:  # masked image modelling
            extra["bool_masked_pos"] = bool_masked_pos
        if prompt is not None:
            extra["prompt"] = prompt
        out = model(src, tokens, lengths, image_rows, **extra)
        ce, n_tok, hits = token_cross_entropy(out.logits, tokens, lengths, label_smoothing=self.label_smoothing,
                                              positions=getattr(out, "positions", None))
        result: dict[str, Any] = {"loss_ce": ce, "top5": hits.double() / n_tok.clamp(min=1),
                                  "n": int(tokens.size(0))}
        aux = out.extras.get("aux_loss") if out.extras else None
        if aux is not None:
            result["loss_regulariser"] = aux
        return result


# ---------------------------------------------------------------------------------------------
# Self-critical sequence training (Rennie et al. 2017), with the baseline of Luo 2020.


def mean_of_others(reward: torch.Tensor, samples: int) -> torch.Tensor:
    """Each sample's baseline: the mean reward of the other samples of its image (Luo 2020, "A
    Better Variant of Self-Critical Sequence Training"). `reward` [b * samples], image-major."""
    if samples < 2:
        raise SeesayError("the mean baseline needs --scst-samples >= 2")
    r = reward.view(-1, samples)  # (b, samples)
    return ((r.sum(1, keepdim=True) - r) / (samples - 1)).reshape(-1)


class SelfCritical:
    """REINFORCE with a baseline on a sequence-level reward (CIDEr-D, `train.reward.CaptionReward`).

    Per step: `samples` captions per image are drawn with the captioner's own `generate`
    (`Sample(temperature=1)`, its cache / recurrent state, no autograd, eval mode so that they come
    from the policy validation decodes with, from the global RNG the loop saves for exact resume);
    they are scored; one teacher-forced `forward` over all of them (train mode, dropout on) gives
    their log-probabilities; loss = -mean((reward - baseline) * logprob). Baselines: "mean" (the
    other samples of the image, no extra decoding) or "greedy" (the reward of the image's greedy
    caption, one more no-grad decode: Rennie et al.'s original).

    With DDP each process scores its own images; the loss is divided by the global number of
    samples (times the world size, which DDP's gradient averaging undoes), like cross-entropy.
    The loss is negative whenever the well-rewarded samples are the likely ones: watch "reward".
    """

    by_image = True

    def __init__(self, reward: Any, *, samples: int = 5, baseline: str = "mean", max_len: int = 20) -> None:
        if baseline not in ("mean", "greedy"):
            raise SeesayError(f"--scst-baseline must be mean or greedy, not {baseline!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < (2 if baseline == "mean" else 1):
            raise SeesayError(f"--scst-samples must be an integer >= {2 if baseline == 'mean' else 1} with the "
                              f"{baseline} baseline, not {samples!r}")
        self.reward, self.samples, self.baseline, self.max_len = reward, samples, baseline, int(max_len)

    @torch.no_grad()
    def _decode(self, captioner: Any, enc: Any, strategy: Any, prompt: torch.Tensor | None = None
                ) -> tuple[Any, list[str], list[bool]]:
        res = (captioner.generate(enc, strategy, max_len=self.max_len) if prompt is None
               else captioner.generate(enc, strategy, max_len=self.max_len, prompt=prompt))
        tok = captioner.tokenizer
        rows, lengths = res.tokens.cpu().tolist(), res.lengths.cpu().tolist()
        texts = [tok.decode(row[:n]) for row, n in zip(rows, lengths)]
        finished = [n > 0 and row[n - 1] == tok.eos_id for row, n in zip(rows, lengths)]
        return res, texts, finished

    def __call__(self, model: Any, src: Any, references: list[list[str]], prompt: torch.Tensor | None = None
                 ) -> dict[str, Any]:
        from seesay.captioner import device_of
        from seesay.checkpoint import unwrap
        from seesay.decoding import Greedy, Sample

        captioner = unwrap(model)
        tok = captioner.tokenizer
        n_images, k = len(references), self.samples
        device = device_of(captioner)
        image_rows = torch.arange(n_images, device=device).repeat_interleave(k)  # (R,) image-major
        was_training = captioner.training
        captioner.eval()
        try:
            with torch.no_grad():
                enc = captioner.encode(src) if isinstance(src, torch.Tensor) else src
                rows_prompt = None if prompt is None else prompt.index_select(0, image_rows.to(prompt.device))
                res, texts, finished = self._decode(captioner, enc.index_select(image_rows), Sample(temperature=1.0),
                                                    rows_prompt)
                greedy = self._decode(captioner, enc, Greedy(), prompt) if self.baseline == "greedy" else None
        finally:
            captioner.train(was_training)
        rows = image_rows.tolist()
        reward = torch.as_tensor(self.reward(references, texts, finished, rows), dtype=torch.float32, device=device)
        if greedy is not None:
            greedy_reward = torch.as_tensor(self.reward(references, greedy[1], greedy[2], list(range(n_images))),
                                            dtype=torch.float32, device=device)
            base = greedy_reward[image_rows]
        else:
            base = mean_of_others(reward, k)

        # one teacher-forced pass over the samples: bos + sampled tokens (eos included when emitted)
        bos = torch.full((res.tokens.size(0), 1), tok.bos_id, dtype=res.tokens.dtype, device=res.tokens.device)
        tokens = torch.cat([bos, res.tokens], 1).to(device)
        lengths = (res.lengths + 1).to(device)
        extra = packed_request(model)
        if prompt is not None:
            extra["prompt"] = prompt.index_select(0, image_rows.to(prompt.device))
        out = model(src, tokens, lengths, image_rows, **extra)
        logprob = sequence_logprobs(out.logits, tokens, lengths, getattr(out, "positions", None))
        advantage = (reward - base).detach()
        n_global = torch.tensor(float(logprob.numel()), dtype=torch.float64, device=device)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            all_reduce_sum(n_global)
        loss = -(advantage * logprob).sum() * world / n_global.clamp(min=1).float()
        result: dict[str, Any] = {"loss_scst": loss, "n": int(logprob.numel()),
                                  "reward": reward.mean().detach(), "baseline": base.mean().detach(),
                                  "sample_length": lengths.float().mean() - 1,
                                  "finished": sum(finished) / max(len(finished), 1)}
        if greedy is not None:
            result["greedy_reward"] = greedy_reward.mean().detach()
        aux = out.extras.get("aux_loss") if out.extras else None
        if aux is not None:
            result["loss_regulariser"] = aux
        return result
