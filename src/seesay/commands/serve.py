"""`seesay serve`: caption images over HTTP (JSON API and a web page) with a trained checkpoint."""

from __future__ import annotations

import argparse

HELP = "serve a checkpoint over HTTP: a JSON captioning API with request batching, and a web page"

DESCRIPTION = """\
Runs the captioning API (POST /v1/caption, GET /v1/model, GET /healthz) and a page at / on uvicorn.
Requests that arrive within --max-wait-ms of each other are decoded together, up to --max-batch.
Binds the loopback address unless --host says otherwise; put a reverse proxy (TLS, auth) in front
of anything reachable from other machines. See docs/serve.md.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, e.g. RUN_DIR/best")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (0.0.0.0: every interface; only behind a reverse proxy)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--max-batch", type=int, default=16,
                   help="most images (times captions per image) decoded in one batch; 1 turns batching off")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long the oldest waiting request waits for others to share its batch")
    p.add_argument("--queue-size", type=int, default=64,
                   help="requests in the server at once (being read, waiting or decoding); more get 503")
    p.add_argument("--timeout-s", type=float, default=30.0, help="per-request time limit; past it, 504")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MiB; larger get 413")
    p.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="largest image (width x height, read from its header before decoding); larger get 413")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--workers", type=int, default=4, help="threads decoding and resizing uploaded images")


def settings_from_args(args: argparse.Namespace) -> object:
    from seesay.errors import SeesayError
    from seesay.serve.app import Settings

    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--queue-size", args.queue_size, 1),
                             ("--max-pixels", args.max_pixels, 1), ("--workers", args.workers, 1),
                             ("--port", args.port, 0)):
        if value < low:
            raise SeesayError(f"{flag} must be >= {low}, not {value}")
    if args.port > 65535:
        raise SeesayError(f"--port must be at most 65535, not {args.port}")
    for flag, value in (("--timeout-s", args.timeout_s), ("--max-upload-mb", args.max_upload_mb)):
        if not value > 0:
            raise SeesayError(f"{flag} must be > 0, not {value}")
    if not args.max_wait_ms >= 0:
        raise SeesayError(f"--max-wait-ms must be >= 0, not {args.max_wait_ms}")
    return Settings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
                    timeout_s=args.timeout_s, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                    workers=args.workers)


def run(args: argparse.Namespace) -> int:
    import logging

    from seesay.checkpoint import load_checkpoint
    from seesay.errors import missing_extra
    from seesay.model import pick_device

    settings = settings_from_args(args)
    try:
        import uvicorn
    except ModuleNotFoundError as e:
        raise missing_extra("uvicorn", "serve") from e
    from seesay.serve.app import create_app, model_info

    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, map_location=device)
    settings.info = model_info(ckpt, args.checkpoint)
    app = create_app(ckpt.model.eval(), settings)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("seesay.serve").warning(
            "binding %s: reachable from other machines; put a reverse proxy with TLS and auth in front", args.host)
    sock = listen(args.host, args.port)  # here, so a port in use is one line, not uvicorn's exit
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"seesay serve: http://{host}:{sock.getsockname()[1]}/ (Ctrl+C to stop)", flush=True)
    server.run(sockets=[sock])
    return 0


def listen(host: str, port: int):
    """A socket bound to host:port (SeesayError naming the flags when that is not possible)."""
    import socket

    from seesay.errors import SeesayError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise SeesayError(f"--host {host} --port {port}: cannot listen ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock
