"""Teacher forcing's step products: `LoopLinear` against plain autograd. Printed as JSON.

Soft attention's loop multiplies, at every step, the rows still running by four weights: the
context's share of W_ih (4H x D), W_hh (4H x H), f_beta (D x H) and the attention's query
projection (A x H). This times one teacher-forced batch of those products (every step's forward
and input gradient, and the weights' gradients) at the tutorial's sizes (H = A = 512, D = 2048,
32 captions of 9 to 17 steps), two ways:

- "autograd": `F.linear` at each step (autograd makes each weight's gradient per step);
- "loop_linear": seesay's `LoopLinear` (what training uses: one weight gradient per loop, and on
  a CPU the products through oneDNN with packed weights, `seesay.layers.gemm`).

Each figure is the best of `--repeats` timings of the whole batch; "gmacs" counts the forward,
input-gradient and weight-gradient products. To compare two versions of seesay, run this with
`PYTHONPATH` pointing at each version's `src/` in turn (alternate them on a shared machine).

    python benchmarks/loop_products.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from roofline import best_of

from seesay.layers.loop import LoopLinear


def shapes(hidden: int, enc: int, attention: int) -> dict[str, tuple[int, int, bool]]:
    """name -> (out, in, has bias) of soft attention's loop maps."""
    return {"context": (4 * hidden, enc, False), "hh": (4 * hidden, hidden, False), "beta": (enc, hidden, True),
            "query": (attention, hidden, True)}


def batch(kind: str, params: dict, inputs: dict, rows: list[int]) -> None:
    """Every step's products for the rows still running, then one backward."""
    maps = {k: LoopLinear(w, b) for k, (w, b) in params.items()} if kind == "loop_linear" else \
        {k: (lambda x, w=w, b=b: F.linear(x, w, b)) for k, (w, b) in params.items()}
    outs = [maps[k](inputs[k][t][:n]).sum() for t, n in enumerate(rows) for k in params]
    torch.stack(outs).sum().backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--enc", type=int, default=2048)
    ap.add_argument("--attention", type=int, default=512)
    ap.add_argument("--rows", type=int, nargs="+", default=[32] * 9 + [30, 28, 25, 20, 15, 10, 5, 2],
                    help="rows still running at each step (longest caption first)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    dims = shapes(args.hidden, args.enc, args.attention)
    params = {k: ((torch.randn(o, i, generator=gen) * 0.02).requires_grad_(),
                  torch.zeros(o, requires_grad=True) if bias else None) for k, (o, i, bias) in dims.items()}
    inputs = {k: [torch.randn(args.rows[0], i, generator=gen).requires_grad_() for _ in args.rows]
              for k, (_, i, _) in dims.items()}
    macs = 3 * sum(n * o * i for n in args.rows for (o, i, _) in dims.values())
    results = {}
    for kind in ("autograd", "loop_linear"):
        best = best_of(lambda k=kind: batch(k, params, inputs, args.rows), args.repeats, warmup=True)
        results[kind] = {"ms_per_batch": round(1e3 * best, 2), "gmacs": round(macs / best / 1e9, 2)}
    print(json.dumps({"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "steps": len(args.rows), "rows": args.rows, "macs_per_batch": macs,
                      "repeats": args.repeats, "results": results}, indent=1))


if __name__ == "__main__":
    main()
