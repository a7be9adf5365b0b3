"""The caption loss on padded logits against packed ones, printed as JSON.

The recurrent decoders compute their output layer on the real positions only, step-major
(`decoders/common.py`). Before, they scattered those rows into a zero-filled (B, T-1, V)
tensor, and the cross-entropy gathered the real positions back out of it, so each training
step made a padded tensor, a gathered copy and the gradients of both. With `forward(...,
packed=True)` (what `seesay train`'s cross-entropy asks for, decoders/base.py) the loss reads
the rows as they are, with their positions.

This times both routes from the output layer's rows to their gradient (unpack or not, the
cross-entropy with its top-5 count, backward), alternating in one process, each repetition
with a new batch of captions of 8-16 words; and gives the size of the padded (B, T-1, V)
tensor the packed route never makes (its gradient and the gathered copy are as large again).

    python benchmarks/loss_layout.py [--threads 1] [--reps 30] [--batch 32] [--vocab 10000]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from seesay.allocator import keep_freed_memory
from seesay.decoders.common import decode_order, step_positions, unpack_steps
from seesay.train.objectives import token_cross_entropy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import _captions  # noqa: E402 - the benchmarks' caption lengths


def _route(packed: bool, rows: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, order: torch.Tensor,
           rows_per_step: list[int]) -> float:
    rows = rows.detach().requires_grad_()
    t0 = time.perf_counter()
    T1 = tokens.shape[1] - 1
    if packed:
        loss, _, _ = token_cross_entropy(rows, tokens, lengths, positions=step_positions(order, rows_per_step, T1))
    else:
        loss, _, _ = token_cross_entropy(unpack_steps(rows, order, rows_per_step, T1), tokens, lengths)
    loss.backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions of each route (after 5 warm-up)")
    ap.add_argument("--batch", type=int, default=32, help="captions per batch (the tutorial's 32)")
    ap.add_argument("--vocab", type=int, default=10000, help="vocabulary size (the tutorial's 10k)")
    args = ap.parse_args()
    kept = keep_freed_memory()  # as the command line does
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    padded_mib = []
    for rep in range(args.reps + 5):
        tokens, lengths = _captions(args.batch, args.vocab, gen)
        order, _, rows_per_step = decode_order(lengths)
        rows = torch.randn(sum(rows_per_step), args.vocab, generator=gen)
        padded_mib.append(args.batch * (tokens.shape[1] - 1) * args.vocab * 4 / 2**20)
        for name in (("padded", "packed") if rep % 2 else ("packed", "padded")):
            dt = _route(name == "packed", rows, tokens, lengths, order, rows_per_step)
            if rep >= 5:
                times[name].append(dt)
    ms = {k: {"median": round(1000 * statistics.median(v), 2), "min": round(1000 * min(v), 2),
              "max": round(1000 * max(v), 2)} for k, v in times.items()}
    print(json.dumps({"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "allocator_kept_freed_memory": kept, "batch": args.batch, "vocab": args.vocab,
                      "reps": args.reps, "ms": ms,
                      "padded_over_packed": round(ms["padded"]["median"] / ms["packed"]["median"], 2),
                      "padded_logits_mib_median": round(statistics.median(padded_mib), 3)}, indent=1))


if __name__ == "__main__":
    main()
