"""Load test of `seesay serve` on loopback: N concurrent clients sending real photos.

Starts `seesay serve` in a subprocess on 127.0.0.1 (a free port), once with `--max-batch B` and
once with `--max-batch 1` (batching off), and drives each with `--clients` concurrent clients
that send JPEG photos (scikit-image's sample photos, at their own sizes, so the server decodes
and resizes real uploads; random pictures when scikit-image is missing) until `--requests`
answers or `--seconds` have passed, whichever comes first. Prints one JSON object:

    throughput_images_per_s, latency_ms {p50, p90, p99, max}, requests, errors (by status: must
    be empty while --clients <= --queue-size), mean_batch_size (what the server's batcher formed,
    from GET /v1/model), peak RSS of the server process (VmHWM) after the first 100 answers and
    at the end, and batched / unbatched throughput.

The model is `--checkpoint` or, by default, a randomly initialised captioner of the demo's size
(small_cnn 64 px, 8x8 grid, soft attention 128, a shapes-sized vocabulary) whose `<end>` cannot
come before `--max-length`, so every caption does the same work.

    python benchmarks/serve_load.py                                   # 64 clients, 2,000 requests
    python benchmarks/serve_load.py --clients 16 --requests 300 --seconds 30   # a quick check
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def sample_photos(n: int) -> list[bytes]:
    """JPEG bytes of up to `n` real photos (scikit-image's samples), cycled to `n`."""
    from PIL import Image

    arrays = []
    try:
        import skimage.data as d

        for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "colorwheel",
                     "hubble_deep_field"):
            try:
                arrays.append(np.asarray(getattr(d, name)()))
            except Exception:  # noqa: BLE001 - a sample that needs a download: skip it
                continue
    except ModuleNotFoundError:
        pass
    if not arrays:
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 256, (rng.integers(200, 600), rng.integers(200, 600), 3), dtype=np.uint8)
                  for _ in range(8)]
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).convert("RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def demo_size_checkpoint(root: Path) -> Path:
    import torch

    from seesay.checkpoint import save_checkpoint
    from seesay.data.tokenize import SPECIALS, Vocab
    from seesay.model import build_model

    torch.manual_seed(0)
    vocab = Vocab([*SPECIALS, *[f"w{i}" for i in range(56)]])
    spec = {"encoder": {"name": "small_cnn", "width": 64, "encoded_size": 8, "image_size": 64},
            "decoder": {"name": "soft_attention", "vocab_size": len(vocab), "embed_dim": 64, "attention_dim": 64,
                        "decoder_dim": 128, "dropout": 0.0}}
    model = build_model(spec, tokenizer=vocab, image_size=64).eval()
    with torch.no_grad():
        model.decoder.fc.bias[vocab.end_id] = -1e4  # every caption runs to --max-length
    return save_checkpoint(root / "run" / "best", model=model, config={})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_peak_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def drive(url: str, photos: list[bytes], args: argparse.Namespace, pid: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    rss_100: list[float | None] = []
    sent = 0
    deadline = time.perf_counter() + args.seconds
    query = f"beam_size={args.beam_size}&max_length={args.max_length}"

    async def client(c: httpx.AsyncClient, k: int) -> None:
        nonlocal sent
        while sent < args.requests and time.perf_counter() < deadline:
            body = photos[sent % len(photos)]
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await c.post(f"{url}/v1/caption?{query}", content=body, headers={"Content-Type": "image/jpeg"})
                status = str(r.status_code)
            except httpx.HTTPError as e:
                status = type(e).__name__
            if status == "200":
                latencies.append(time.perf_counter() - t0)
                if len(latencies) == 100:
                    rss_100.append(rss_peak_mb(pid))
            else:
                errors[status] = errors.get(status, 0) + 1

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, k) for k in range(args.clients)))
        elapsed = time.perf_counter() - t0
        stats = (await c.get(f"{url}/v1/model")).json()["serving"]
    lat = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {
        "requests": len(latencies) + sum(errors.values()), "answered": len(latencies), "seconds": round(elapsed, 2),
        "throughput_images_per_s": round(len(latencies) / elapsed, 2),
        "latency_ms": {q: round(float(np.percentile(lat, p)), 1) for q, p in
                       (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "errors": errors, "mean_batch_size": stats["mean_batch_size"], "largest_batch": stats["largest_batch"],
        "batches": stats["batches"],
        "peak_rss_mb_after_100": rss_100[0] if rss_100 else None, "peak_rss_mb_at_end": rss_peak_mb(pid),
    }


def run_server(checkpoint: Path, max_batch: int, args: argparse.Namespace, photos: list[bytes]) -> dict:
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "seesay", "serve", "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--queue-size", str(args.queue_size), "--workers", str(args.workers), "--device", args.device,
           "--timeout-s", "120"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise SystemExit(f"seesay serve exited: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise SystemExit("seesay serve did not start within a minute")
        for body in photos[:4]:  # warm-up, not timed
            httpx.post(f"{url}/v1/caption?max_length=2", content=body, headers={"Content-Type": "image/jpeg"},
                       timeout=120)
        return {"max_batch": max_batch, **asyncio.run(drive(url, photos, args, proc.pid))}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint to serve (default: a random demo-size model)")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients")
    p.add_argument("--requests", type=int, default=2000, help="stop after this many answers")
    p.add_argument("--seconds", type=float, default=120.0, help="or after this many seconds")
    p.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's --max-wait-ms")
    p.add_argument("--queue-size", type=int, default=128, help="the server's --queue-size (>= --clients: no 503s)")
    p.add_argument("--workers", type=int, default=2, help="the server's image-decoding threads")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    p.add_argument("--device", default="cpu", help="the server's --device")
    p.add_argument("--beam-size", type=int, default=3, help="beam size asked by every request")
    p.add_argument("--max-length", type=int, default=16, help="caption length asked by every request")
    p.add_argument("--no-compare", action="store_true", help="skip the --max-batch 1 run")
    args = p.parse_args()
    photos = sample_photos(16)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else demo_size_checkpoint(Path(tmp))
        runs = [run_server(ckpt, args.max_batch, args, photos)]
        if not args.no_compare and args.max_batch != 1:
            runs.append(run_server(ckpt, 1, args, photos))
    out = {
        "benchmark": "serve_load", "machine": platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "checkpoint": args.checkpoint or "random demo-size model",
        "clients": args.clients, "beam_size": args.beam_size, "max_length": args.max_length,
        "photos": {"count": len(set(photos)), "mean_kb": round(float(np.mean([len(b) for b in set(photos)])) / 1024, 1)},
        "runs": runs,
    }
    if len(runs) == 2 and runs[1]["throughput_images_per_s"]:
        out["batched_vs_unbatched_throughput"] = round(runs[0]["throughput_images_per_s"]
                                                       / runs[1]["throughput_images_per_s"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
