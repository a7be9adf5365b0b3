"""Training objectives: objects that score one batch and return a dict of losses and metrics.

# r - caption rows, t - time, v - vocabulary
An objective is called as `objective(model, src, tokens, lengths, image_rows)` (`model` is the
captioner, possibly inside DDP; `src` images or cached features; `tokens` [R,T] `bos w.. eos pad..`
rows with `lengths` [R]; `image_rows` [R] or None) and returns:

    "loss_<name>"   scalar tensors; the loop backpropagates their sum
    "n"             rows in the batch (the weight of this batch in the logged averages)
    anything else   a metric (float or 0-dim tensor), logged as a running mean

A family's own regulariser arrives in the model output's `extras["aux_loss"]` (already weighted,
e.g. soft attention's alpha_c * doubly-stochastic term) and is returned as "loss_regulariser".
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from seesay.errors import SeesayError
from seesay.train.distributed import all_reduce_sum


def token_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, *,
                        label_smoothing: float = 0.0, normalise_globally: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, token count, top-5 hits) over real positions; logits[:, t] predicts tokens[:, t+1].

    The loss is averaged over every real token of the *global* batch (so 2 processes with half
    the batch each give the same gradient as one process with all of it); padding never counts.
    """
    steps = logits.size(1)
    targets = tokens[:, 1: steps + 1]
    mask = torch.arange(steps, device=logits.device)[None, :] < (lengths.to(logits.device) - 1)[:, None]  # (R, T-1)
    sel = logits[mask].float()  # (K, V)
    tgt = targets[mask]
    ce = F.cross_entropy(sel, tgt, reduction="sum", label_smoothing=label_smoothing)
    n_local = mask.sum()
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

    def __call__(self, model: Any, src: Any, tokens: torch.Tensor, lengths: torch.Tensor,
                 image_rows: torch.Tensor | None = None) -> dict[str, Any]:
        out = model(src, tokens, lengths, image_rows)
        ce, n_tok, hits = token_cross_entropy(out.logits, tokens, lengths, label_smoothing=self.label_smoothing)
        result: dict[str, Any] = {"loss_ce": ce, "top5": hits.double() / n_tok.clamp(min=1),
                                  "n": int(tokens.size(0))}
        aux = out.extras.get("aux_loss") if out.extras else None
        if aux is not None:
            result["loss_regulariser"] = aux
        return result
