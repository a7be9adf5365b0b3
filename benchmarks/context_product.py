"""Soft attention's decoding context, alpha @ grid, in the two orientations, printed as JSON.

A beam step's context is one small product per image: G rows of alpha (M, G, N) against that
image's grid (N, D). At the tutorial's sizes (100 images, beam 5, 14x14x2048) the grid is 160 MB,
read once per step, so the product is bound by how well it streams the grid. Timed here, best of
`--repeats`, alternating:
- "alpha_grid": torch.bmm(alpha, grid) (what decoding does);
- "grid_t_alpha": torch.bmm(grid_t, alpha^T), with grid_t (M, D, N) made once per decoding call,
  and the (M, D, G) result transposed to (M * G, D) (tried for decoding; docs/performance.md
  says why it was not kept);
- "sum": grid.sum(), a plain read of the same bytes (how fast the machine streams them).

    python benchmarks/context_product.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def best(fn, repeats: int) -> float:
    fn()
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--regions", type=int, default=196)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the variants")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    M, G, N, D = args.images, args.beam, args.regions, args.width
    gen = torch.Generator().manual_seed(0)
    grid = torch.randn(M, N, D, generator=gen)
    grid_t = grid.transpose(1, 2).contiguous()
    alpha = torch.softmax(torch.randn(M, G, N, generator=gen), dim=-1)
    variants = {
        "alpha_grid": lambda: torch.bmm(alpha, grid).view(M * G, D),
        "grid_t_alpha": lambda: torch.bmm(grid_t, alpha.transpose(1, 2)).transpose(1, 2).reshape(M * G, D),
        "sum": lambda: grid.sum(),
    }
    err = (variants["alpha_grid"]() - variants["grid_t_alpha"]()).abs().max().item()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, fn in variants.items():
            times[k].append(best(fn, args.repeats))
    s = {k: min(v) for k, v in times.items()}
    gb = grid.numel() * grid.element_size() / 1e9
    print(json.dumps({"threads": torch.get_num_threads(), "sizes": {"images": M, "beam": G, "regions": N, "width": D},
                      "grid_mb": round(gb * 1000, 1), "ms": {k: round(1000 * v, 3) for k, v in s.items()},
                      "all_ms": {k: [round(1000 * t, 3) for t in v] for k, v in times.items()},
                      "grid_gb_per_s": {k: round(gb / v, 2) for k, v in s.items()},
                      "speedup": round(s["alpha_grid"] / s["grid_t_alpha"], 2), "max_abs_difference": err}, indent=1))


if __name__ == "__main__":
    main()
