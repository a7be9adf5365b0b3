"""What this machine's matrix products reach (GMAC/s), the roofline other benchmarks compare with.

Prints JSON: multiply-adds per second of float32 products at a large shape (the rate a
well-batched training step can approach) and at 5-row shapes (one image's beam-5 decoding
step: the LSTM's and the output layer's products at tutorial sizes), measured in this run.
`train_throughput.py` and `decode_throughput.py` import `measure` and report the fraction of
the large-shape rate their decoders achieve, counting each decoder's multiply-adds per caption.

On the CPU each shape is timed twice: torch's product (`torch.mm`: MKL in float32) and oneDNN's
with the weight packed once ("onednn_" keys; what seesay's decoding uses, `seesay.layers.gemm`).
The roofline ("peak") is the faster of the two large products, so that a fraction never counts
a backend's gain as the decoder's.

    python benchmarks/roofline.py [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

# (rows, inner, out): a large product, and the 5-row products of a beam-5 step at tutorial sizes
SHAPES = {
    "large_500x3072x2048": (500, 3072, 2048),
    "lstm_5x2560x2048": (5, 2560, 2048),
    "output_5x512x10000": (5, 512, 10000),
    "lstm_500x2560x2048": (500, 2560, 2048),
}
GPU_SHAPES = {"large_8192x8192x8192": (8192, 8192, 8192)}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously): every timing ends with it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gmacs(rows: int, inner: int, out: int, *, device: torch.device, dtype: torch.dtype = torch.float32,
          min_seconds: float = 0.2, repeats: int = 3, backend: str = "torch") -> float:
    """Best-of-`repeats` GMAC/s of (rows x inner) @ (inner x out), each timing at least `min_seconds`.
    `backend` "onednn": the weight packed once, the product by `seesay.layers.gemm` (CPU float32)."""
    a = torch.randn(rows, inner, device=device, dtype=dtype)
    b = torch.randn(inner, out, device=device, dtype=dtype)
    c = torch.empty(rows, out, device=device, dtype=dtype)
    if backend == "onednn":
        from seesay.layers import gemm

        w = gemm.pack(b.t())

        def product() -> None:
            gemm.product(a, w)
    else:

        def product() -> None:
            torch.mm(a, b, out=c)

    product()
    n = 1
    best = 0.0
    for _ in range(repeats):
        while True:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                product()
            sync(device)
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                break
            n *= 2
        best = max(best, rows * inner * out * n / dt / 1e9)
    return best


def best_of(fn, repeats: int, device: torch.device | None = None, *, warmup: bool = False) -> float:
    """Seconds of the fastest of `repeats` calls of `fn` (on a shared machine the least disturbed),
    after one untimed call if `warmup`; on CUDA each timing waits for the device's work. The
    benchmarks' one timing loop."""
    device = torch.device("cpu") if device is None else device
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def benchmark_device(name: str) -> torch.device:
    """--device for the benchmarks: seesay's own resolution (auto, cpu, cuda, cuda:N), and a one-line
    exit instead of a traceback when the device is not there."""
    from seesay.errors import SeesayError
    from seesay.model import pick_device

    try:
        return pick_device(name)
    except SeesayError as e:
        raise SystemExit(str(e)) from None


def measure(device: torch.device | str = "cpu", *, quick: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """GMAC/s per shape name (and per "onednn_" shape name on a CPU with oneDNN), plus "peak": the
    faster backend's large-product rate (the roofline) and "peak_backend".

    On CUDA a 500-row product is too small to fill the GPU, so the large products there also
    include GPU_SHAPES, and the peak is the fastest of them. `dtype`: the products' type (float16
    or bfloat16 for a mixed-precision roofline; their tensor-core rate is many times float32's)."""
    from seesay.layers import gemm

    device = torch.device(device)
    kw = {"min_seconds": 0.05, "repeats": 2} if quick else {}
    shapes = {**SHAPES, **(GPU_SHAPES if device.type == "cuda" else {})}
    out = {name: round(gmacs(*shape, device=device, dtype=dtype, **kw), 2) for name, shape in shapes.items()}
    large = [name for name in shapes if name.startswith("large_")]
    out["peak"] = max(out[name] for name in large)
    out["peak_backend"], out["dtype"] = "torch", str(dtype).removeprefix("torch.")
    if device.type == "cpu" and dtype == torch.float32 and gemm.available():
        for name, shape in SHAPES.items():
            out[f"onednn_{name}"] = round(gmacs(*shape, device=device, backend="onednn", **kw), 2)
        if out["onednn_large_500x3072x2048"] > out["peak"]:
            out["peak"], out["peak_backend"] = out["onednn_large_500x3072x2048"], "onednn"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    device = benchmark_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "gmacs": measure(device)}, indent=1))


if __name__ == "__main__":
    main()
