"""Does torch.compile win for soft attention's teacher-forcing scores? Printed as JSON.

The additive scores w^T relu(P + q_t) + b of one teacher-forced batch (every step t, forward and
backward) are the largest elementwise work of soft-attention training. This times them three
ways at the tutorial's sizes (32 captions, 14x14 regions, attention width 512, 17 steps):

- "eager": the plain formula under autograd (one (R, N, A) activation and gradient per step);
- "loop_scores": seesay's `LoopScores` (what training uses);
- "compiled": the plain formula through `torch.compile` (inductor), with the first call's
  compile time reported apart (it needs a C++ compiler on the CPU, Triton on CUDA).

Each figure is the best of `--repeats` timings of one whole batch (all steps, forward and
backward). The scores are only part of a training step: compare `ms_per_batch` with the step
time of `train_throughput.py` (soft_attention, tutorial preset) to see what a win here is worth.

    python benchmarks/compile_check.py [--device cpu|cuda] [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from roofline import benchmark_device, best_of
from torch import nn

from seesay.layers.attention import LoopScores


def _plain(proj: torch.Tensor, query: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.relu(proj + query[:, None]) @ weight + bias


def _batch(kind: str, proj: torch.Tensor, queries: list[torch.Tensor], score: nn.Linear, fn) -> None:
    """Forward and backward of every step's scores, as one teacher-forced batch does."""
    if kind == "loop_scores":
        scores = LoopScores(proj, score)
        outs = [scores(q) for q in queries]
    else:
        outs = [fn(proj, q, score.weight[0], score.bias) for q in queries]
    torch.stack(outs).sum().backward()


def _time(kind: str, proj, queries, score, fn, repeats: int, device: torch.device) -> float:
    return best_of(lambda: _batch(kind, proj, queries, score, fn), repeats, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--regions", type=int, default=196)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--steps", type=int, default=17)
    ap.add_argument("--no-compile", action="store_true", help="time eager and LoopScores only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = benchmark_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(args.rows, args.regions, args.width, generator=gen).to(device).requires_grad_()
    queries = [torch.randn(args.rows, args.width, generator=gen).to(device).requires_grad_()
               for _ in range(args.steps)]
    score = nn.Linear(args.width, 1).to(device)

    out: dict = {"device": args.device, "machine": platform.machine(), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "rows": args.rows, "regions": args.regions,
                 "width": args.width, "steps": args.steps, "repeats": args.repeats}
    results = {}
    for kind in ("eager", "loop_scores"):
        _batch(kind, proj, queries, score, _plain)  # warm-up
        results[kind] = {"ms_per_batch": round(1e3 * _time(kind, proj, queries, score, _plain, args.repeats, device), 2)}
    try:
        if args.no_compile:
            raise RuntimeError("not run (--no-compile)")
        compiled = torch.compile(_plain)
        sync()
        t0 = time.perf_counter()
        _batch("compiled", proj, queries, score, compiled)  # compiles (forward and backward graphs)
        sync()
        compile_s = time.perf_counter() - t0
        ms = 1e3 * _time("compiled", proj, queries, score, compiled, args.repeats, device)
        results["compiled"] = {"ms_per_batch": round(ms, 2), "first_call_s": round(compile_s, 2)}
        saved = results["loop_scores"]["ms_per_batch"] - ms
        if saved > 0:  # batches after which the compile time has paid for itself
            results["compiled"]["batches_to_repay_vs_loop_scores"] = round(1e3 * compile_s / saved)
    except Exception as e:  # noqa: BLE001 - no compiler here: report why, keep the other figures
        results["compiled"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    for r in results.values():
        if "ms_per_batch" in r:
            r["vs_eager"] = round(results["eager"]["ms_per_batch"] / r["ms_per_batch"], 2)
    out["results"] = results
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
