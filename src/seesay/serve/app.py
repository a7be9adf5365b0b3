"""The HTTP API: a Starlette app around a captioner (`create_app(captioner, settings)`).

    POST /v1/caption   an image -> captions, tokens, scores (and per-word attention when asked)
    GET  /v1/model     what the model is (`model_info`) and what the batcher has formed
    GET  /healthz      {"status": "ok"} once the batcher runs
    GET  /             the page (page.html): drop an image, read its captions, see where each word looks

An image comes as the raw body (`Content-Type: image/*`), as multipart form data (`file` fields)
or as JSON (`{"image": base64}` or `{"images": [...]}`); options as query parameters or as form /
JSON fields (seesay.serve.options). A request goes through, in order: admission (at most
`queue_size` requests in the server at once, else 503 + Retry-After: this bounds memory to about
queue_size x max_upload bytes), the upload limit (Content-Length, then counted while the body
streams in: 413 before the body is ever held whole), options (422), image decoding in a thread
pool (413 too many pixels, 415 not an image this server reads, 400 broken), then the batcher
(seesay.serve.batcher). `timeout_s` covers all of it: 504 when it runs out. Every error is JSON
`{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from seesay.errors import SeesayError
from seesay.serve.batcher import Batcher, Expired, Job
from seesay.serve.options import Limits, OptionError, collect, parse_options

log = logging.getLogger(__name__)


@dataclass
class Settings:
    max_batch: int = 16  # cost units per batch (images x captions per image)
    max_wait_ms: float = 5.0  # how long the oldest request waits for company
    queue_size: int = 64  # requests in the server at once (reading, decoding, queued or running)
    timeout_s: float = 30.0  # per request, from admission to answer
    max_upload_mb: float = 10.0  # request body
    max_pixels: int = 40_000_000  # width x height of one image
    workers: int = 4  # threads decoding and resizing images
    retry_after_s: int = 1
    limits: Limits = field(default_factory=Limits)
    info: dict[str, Any] = field(default_factory=dict)  # GET /v1/model (model_info)

    def check(self) -> None:
        for name, low in (("max_batch", 1), ("queue_size", 1), ("max_pixels", 1), ("workers", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
        for name in ("timeout_s", "max_upload_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, not {self.max_wait_ms!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------------------
# Images in


def read_upload(captioner: Any, data: bytes, *, max_pixels: int, label: str) -> tuple[Any, dict[str, Any]]:
    """(the captioner's image tensor, {width, height, format}) for uploaded bytes; `ApiError` when bad.

    The header is read first, so a picture with too many pixels is refused before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ApiError(400, f"{label}: empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                (w, h), fmt = im.size, im.format
    except UnidentifiedImageError:
        raise ApiError(415, f"{label}: not an image in a format this server reads (JPEG, PNG, WebP, GIF, ...)") from None
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"{label}: decompression bomb ({e})") from None
    except Exception as e:  # noqa: BLE001 - any reader failure is this upload's problem
        raise ApiError(400, f"{label}: broken image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if w * h > max_pixels:
        raise ApiError(413, f"{label}: too many pixels ({w}x{h} = {w * h} > this server's limit of {max_pixels})")
    try:
        tensor = captioner.preprocess(data)
    except SeesayError as e:
        msg = str(e).replace("image bytes", label, 1)
        status = 413 if "decompression bomb" in msg else 415 if "not an image" in msg else 400
        raise ApiError(status, msg) from None
    except Exception as e:  # noqa: BLE001
        raise ApiError(400, f"{label}: unreadable image ({type(e).__name__}: {e})") from None
    return tensor, {"width": int(w), "height": int(h), "format": fmt}


async def read_body(request: Any, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known or seen to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"bad Content-Length {declared!r}") from None
        if size > limit:
            raise ApiError(413, f"upload of {size} bytes is more than this server's limit of {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"upload is more than this server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _b64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise ApiError(400, f"{where} must be base64 text, not {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{where}: not valid base64") from None


async def split_request(request: Any, body: bytes) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    """([(label, image bytes)], body options) by Content-Type."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith("image/"):
        return [("image", body)], {}
    if ctype == "application/json":
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body is not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise ApiError(400, "JSON body must be an object: {\"image\": base64, ...options}")
        if "image" in doc and "images" in doc:
            raise ApiError(422, 'give "image" or "images", not both')
        if "images" in doc:
            images = doc.pop("images")
            if not isinstance(images, list):
                raise ApiError(400, '"images" must be a list of base64 strings')
            files = [(f"images[{i}]", _b64(v, f"images[{i}]")) for i, v in enumerate(images)]
        elif "image" in doc:
            files = [("image", _b64(doc.pop("image"), "image"))]
        else:
            raise ApiError(422, 'no image: send {"image": base64} (or "images": [...])')
        return files, doc
    if ctype == "multipart/form-data":
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def replay():
            yield body

        try:
            form = await MultiPartParser(request.headers, replay(), max_files=64, max_fields=64).parse()
        except MultiPartException as e:
            raise ApiError(400, f"bad multipart body ({e.message})") from None
        files, fields = [], {}
        try:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name != "file":
                        raise ApiError(422, f"multipart field {name!r} is a file: images go in 'file' fields")
                    files.append((value.filename or "file", await value.read()))
                elif name in fields:
                    raise ApiError(422, f"option {name} given twice")
                else:
                    fields[name] = value
        finally:
            await form.close()
        if not files:
            raise ApiError(422, "no image: send it in a multipart field named 'file'")
        return files, fields
    what = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
    raise ApiError(415, f"{what}: send an image (image/*), multipart/form-data with a 'file' field, or "
                        "application/json with base64 'image'")


# ---------------------------------------------------------------------------------------------
# Captions out


def caption_json(tokenizer: Any, cap: Any, attention: bool) -> dict[str, Any]:
    out = {"caption": cap.caption, "score": round(float(cap.score), 5), "tokens": list(cap.tokens),
           "words": [tokenizer.id_to_token(int(t)) for t in cap.tokens]}
    if attention and cap.attention is not None:
        out["attention"] = [[round(float(v), 5) for v in row] for row in cap.attention.tolist()]
    return out


def image_json(tokenizer: Any, caps: list[Any], meta: dict[str, Any], attention: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"caption": caps[0].caption, "captions": [caption_json(tokenizer, c, attention) for c in caps],
                           "image": meta}
    if attention:
        hw = caps[0].grid_hw
        att = caps[0].attention
        out["grid"] = None if hw is None or att is None else {
            "height": int(hw[0]), "width": int(hw[1]), "sentinel": int(att.shape[-1]) == hw[0] * hw[1] + 1}
    return out


# ---------------------------------------------------------------------------------------------


def create_app(captioner: Any, settings: Settings | None = None) -> Any:
    """The Starlette app serving `captioner` (see the module doc); the batcher starts with the app."""
    try:
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import HTMLResponse, JSONResponse
        from starlette.routing import Route
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        from seesay.errors import missing_extra

        raise missing_extra("starlette", "serve") from e

    settings = settings or Settings()
    settings.check()
    tokenizer = captioner.tokenizer
    batcher = Batcher(captioner, max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000)
    state: dict[str, Any] = {"inflight": 0, "requests": 0, "errors": {}, "pool": None}
    page = resources.files("seesay.serve").joinpath("page.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        state["pool"] = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="seesay-images")
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()
            state["pool"].shutdown(wait=False, cancel_futures=True)

    async def caption(request: Any) -> Any:
        if state["inflight"] >= settings.queue_size:
            return _error(503, f"server busy ({settings.queue_size} requests in progress); retry shortly",
                          {"Retry-After": str(settings.retry_after_s)})
        state["inflight"] += 1
        state["requests"] += 1
        submitted: list[Job] = []
        try:
            return JSONResponse(await asyncio.wait_for(_caption(request, submitted), settings.timeout_s))
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            for job in submitted:
                job.future.cancel()  # still queued: never runs; running: its result is dropped
            return _error(504, f"no answer within this server's timeout of {settings.timeout_s:g} s")
        except ApiError as e:
            return _error(e.status, e.message, e.headers)
        finally:
            state["inflight"] -= 1

    async def _caption(request: Any, submitted: list[Job]) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            query = collect(dict(request.query_params))
        except OptionError as e:
            raise ApiError(422, str(e)) from None
        body = await read_body(request, settings.max_upload_bytes)
        files, body_options = await split_request(request, body)
        del body
        try:
            fields = collect(body_options)
            if set(query) & set(fields):
                raise OptionError(f"option {', '.join(sorted(set(query) & set(fields)))} given twice")
            decoding, attention = parse_options({**query, **fields}, tokenizer, settings.limits)
        except OptionError as e:
            raise ApiError(422, str(e)) from None
        if len(files) > settings.max_batch:
            raise ApiError(422, f"{len(files)} images in one request; this server takes at most {settings.max_batch}")
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(*(loop.run_in_executor(
            state["pool"], lambda d=data, n=name: read_upload(captioner, d, max_pixels=settings.max_pixels, label=n))
            for name, data in files), return_exceptions=True)
        del files
        for r in decoded:
            if isinstance(r, BaseException):
                raise r
        t1 = time.perf_counter()
        seeded = getattr(decoding.strategy, "seed", None) is not None
        job = Job(images=[t for t, _ in decoded], decoding=decoding,
                  key=object() if seeded else decoding,  # a seeded sample is its own batch: reproducible
                  deadline=time.monotonic() + settings.timeout_s, cost=len(decoded) * decoding.num_captions)
        submitted.append(job)
        try:
            batcher.submit(job)
            result = await asyncio.wrap_future(job.future)
        except Expired:
            raise asyncio.TimeoutError from None
        except (SeesayError, ValueError) as e:  # options the model itself refuses
            raise ApiError(422, str(e)) from None
        t2 = time.perf_counter()
        from seesay.decoding import describe

        images = [image_json(tokenizer, caps, meta, attention) for caps, (_, meta) in zip(result, decoded)]
        options = {**describe(decoding.strategy), "max_length": decoding.max_len, "num_captions": decoding.num_captions,
                   "prompt": decoding.prompt}
        timing = {"read_ms": round((t1 - t0) * 1000, 2), "decode_ms": round((t2 - t1) * 1000, 2)}
        out = {**images[0]} if len(images) == 1 else {"results": images}
        return {**out, "options": options, "timing": timing}

    def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
        state["errors"][str(status)] = state["errors"].get(str(status), 0) + 1
        return error_response(status, message, headers)

    async def healthz(request: Any) -> Any:
        return JSONResponse({"status": "ok"})

    async def model(request: Any) -> Any:
        serving = {**batcher.stats(), "requests": state["requests"], "in_progress": state["inflight"],
                   "errors": dict(state["errors"]), "queue_size": settings.queue_size,
                   "timeout_s": settings.timeout_s, "max_upload_mb": settings.max_upload_mb,
                   "max_pixels": settings.max_pixels}
        return JSONResponse({**settings.info, "serving": serving})

    async def index(request: Any) -> Any:
        return HTMLResponse(page)

    async def http_error(request: Any, exc: Any) -> Any:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    async def server_error(request: Any, exc: Exception) -> Any:
        log.exception("unexpected error")
        return _error(500, f"internal error ({type(exc).__name__})")

    routes = [Route("/", index), Route("/healthz", healthz), Route("/v1/model", model),
              Route("/v1/caption", caption, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.batcher = batcher
    return app


# ---------------------------------------------------------------------------------------------


def model_info(checkpoint: Any, path: str | Path) -> dict[str, Any]:
    """What GET /v1/model says about a loaded `seesay.checkpoint.Checkpoint` read from `path`."""
    path = Path(path)
    model, config = checkpoint.model, checkpoint.config
    spec = config.get("model") or {}
    tok = checkpoint.tokenizer

    def count(module: Any) -> int | None:
        return None if module is None else int(sum(p.numel() for p in module.parameters()))

    part = {k: (spec.get(k) or {}).get("name") if isinstance(spec.get(k), dict) else spec.get(k)
            for k in ("encoder", "decoder")}
    info: dict[str, Any] = {
        "checkpoint": f"{path.parent.name}/{path.name}" if path.parent.name else path.name,
        "family": spec.get("captioner", "encoder_decoder"),
        **part,
        "parameters": {"total": count(model), "encoder": count(getattr(model, "encoder", None)),
                       "decoder": count(getattr(model, "decoder", None))},
        "tokenizer": {"kind": getattr(tok, "kind", type(tok).__name__), "size": len(tok)},
        "preprocess": checkpoint.preprocess,
        "training_data": _training_data(config),
        "metrics": _metrics(path.parent / "metrics.jsonl", (config.get("train") or {}).get("select_metric", "CIDEr")),
    }
    return info


def _training_data(config: dict[str, Any]) -> dict[str, Any] | None:
    data = config.get("data")
    if not isinstance(data, dict) or not data.get("path"):
        return None
    root = Path(str(data["path"]))
    out: dict[str, Any] = {"name": root.name, "train_split": data.get("train_split"), "val_split": data.get("val_split")}
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out
    if isinstance(manifest, dict):
        out.update({k: manifest[k] for k in ("format", "source", "lang", "splits", "vocab_size") if k in manifest})
    return out


def _metrics(jsonl: Path, select: str) -> dict[str, Any] | None:
    """The best and the last validation of the run (RUN_DIR/metrics.jsonl beside the checkpoint)."""
    try:
        lines = jsonl.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    records = []
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("val"), dict):
            records.append(r)
    if not records:
        return None

    def brief(r: dict[str, Any]) -> dict[str, Any]:
        return {"epoch": r.get("epoch"), "step": r.get("step"), "val": r["val"]}

    best = max(records, key=lambda r: float(r["val"].get(select, float("-inf"))))
    return {"select_metric": select, "best": brief(best), "last": brief(records[-1])}
