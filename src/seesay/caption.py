"""Caption image files with a trained captioner, going on past bad files (`seesay caption`).

Each file goes through the captioner's own `preprocess` (the size and reading rules saved with
the checkpoint), so inference sees exactly what training saw; decoding is
`seesay.captioner.caption_images`, the same call the server makes on uploaded bytes.

Folders and lists (`find_images`): a folder is walked recursively, image extensions only
(`IMAGE_EXTENSIONS`, any case), in sorted order of the path relative to it, so two runs see the
same order; a list file names one image per line. `caption_stream` reads the images of the next
batches in worker threads (decoding and resizing happen there, outside the model) while the
model decodes the current batch, and yields each batch's results as soon as it is done, so a
caller that writes them before asking for the next batch loses at most that batch when stopped.
`CaptionOutput` writes them (JSON lines, CSV, COCO results JSON or text) so that a re-run with
the same output skips the images already captioned.
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch

from seesay.captioner import caption_images
from seesay.decoding import Beam, Constraints, Strategy
from seesay.errors import SeesayError
from seesay.model import pick_device

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


class CaptionResult(NamedTuple):
    image: str
    caption: str | None  # None when the image could not be read
    score: float | None  # sum of log-probabilities (length-normalised with a beam length penalty)
    tokens: list[int]
    error: str | None = None  # one-line reason when the image failed
    attention: Any = None  # (L, A) tensor for decoders with attention, else None
    rank: int = 0  # with num_captions > 1: 0 for an image's best caption, 1 for the next, ...


class ImageItem(NamedTuple):
    path: str  # as given, or the folder joined with `rel`
    rel: str  # the path relative to the folder it was found in (as given for files and lists)


# ---------------------------------------------------------------------------------------------
# Which images


def walk_images(folder: str | os.PathLike) -> list[ImageItem]:
    """Every image file below `folder` (recursively; `IMAGE_EXTENSIONS`, any case), sorted by the
    path relative to it; hidden files and folders (".name") are skipped; symlinked folders are not
    followed (no cycles)."""
    root = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                rel = Path(dirpath, name).relative_to(root).as_posix()
                found.append(ImageItem(str(Path(dirpath, name)), rel))
    return sorted(found, key=lambda it: it.rel)


def read_image_list(list_file: str | os.PathLike) -> list[ImageItem]:
    """One path per line (blank lines and lines starting with "#" are skipped), as given."""
    try:
        text = Path(list_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SeesayError(f"--list {list_file}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SeesayError(f"--list {list_file}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    lines = (line.strip() for line in text.splitlines())
    return [ImageItem(line, line) for line in lines if line and not line.startswith("#")]


def find_images(inputs: Sequence[str | os.PathLike] = (), list_file: str | os.PathLike | None = None
                ) -> list[ImageItem]:
    """Files as given, folders walked (`walk_images`), then the `list_file`'s paths; each path once."""
    items: list[ImageItem] = []
    for x in inputs:
        items.extend(walk_images(x) if Path(x).is_dir() else [ImageItem(str(x), str(x))])
    if list_file is not None:
        items.extend(read_image_list(list_file))
    seen: set[str] = set()
    return [it for it in items if not (it.path in seen or seen.add(it.path))]


def coco_image_id(item: ImageItem) -> int | str:
    """COCO results' image_id: the last group of digits in the file name
    (COCO_val2014_000000391895.jpg -> 391895), else the relative path."""
    digits = re.findall(r"\d+", Path(item.rel).stem)
    return int(digits[-1]) if digits else item.rel


# ---------------------------------------------------------------------------------------------
# Captioning


def load_captioner(checkpoint: str | os.PathLike | Any, *, runtime: str = "torch",
                   device: str | torch.device | None = None) -> Any:
    """A captioner ready to caption: a loaded one as it is, a checkpoint directory (runtime
    "torch") or an ONNX export directory (runtime "onnx", `seesay.export.runtime.OnnxCaptioner`)."""
    if hasattr(checkpoint, "generate"):
        return checkpoint
    if hasattr(checkpoint, "model"):  # a loaded seesay.checkpoint.Checkpoint
        return checkpoint.model.to(pick_device(device)).eval()
    from seesay.export.onnx import is_export_dir

    if runtime == "onnx":
        from seesay.export.runtime import OnnxCaptioner

        if device is not None and str(device) not in ("auto", "cpu"):
            raise SeesayError(f"--device {device}: the ONNX runtime runs on the CPU only")
        return OnnxCaptioner(checkpoint)
    if runtime != "torch":
        raise SeesayError(f"--runtime {runtime}: unknown runtime (use torch or onnx)")
    if is_export_dir(checkpoint):
        raise SeesayError(f"--checkpoint {checkpoint}: an ONNX export, not a checkpoint (add --runtime onnx)")
    from seesay.checkpoint import load_checkpoint

    dev = pick_device(device)
    return load_checkpoint(checkpoint, map_location=dev).model.to(dev).eval()


def _read(captioner: Any, path: str) -> Any:
    """The image as the captioner's tensor, or the one-line reason it cannot be read."""
    try:
        return captioner.preprocess(path)
    except SeesayError as e:
        return SeesayError(str(e))
    except Exception as e:  # noqa: BLE001 - any decoder failure is that image's problem only
        return SeesayError(f"{path}: unreadable image ({type(e).__name__}: {e})")


def caption_stream(captioner: Any, paths: Sequence[str | os.PathLike], strategy: Strategy = Beam(5), *,
                   max_len: int = 50, batch_size: int = 16, workers: int = 2, prompt: str | None = None,
                   constraints: Constraints | None = None, num_captions: int = 1) -> Iterator[list[CaptionResult]]:
    """Caption `paths`, `batch_size` at a time, yielding each batch's results (in input order)
    once decoded. `workers` threads read the images of the next two batches meanwhile (0: read
    in this thread). Unreadable images get `error` set; the others go on."""
    bs = max(int(batch_size), 1)
    paths = [str(p) for p in paths]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="seesay-read") if workers > 0 else None
    pending: deque[Future | Any] = deque()
    ahead = 0  # paths handed to the readers so far

    def fill(limit: int) -> None:
        nonlocal ahead
        while ahead < min(limit, len(paths)):
            p = paths[ahead]
            pending.append(pool.submit(_read, captioner, p) if pool is not None else p)
            ahead += 1

    try:
        for start in range(0, len(paths), bs):
            fill(start + 3 * bs)  # this batch and the next two
            chunk = paths[start: start + bs]
            loaded = []
            for p in chunk:
                job = pending.popleft()
                loaded.append(job.result() if pool is not None else _read(captioner, p))
            ok = [i for i, x in enumerate(loaded) if not isinstance(x, SeesayError)]
            done = caption_images(captioner, [loaded[i] for i in ok], strategy, prompt=prompt, max_len=max_len,
                                  batch_size=bs, constraints=constraints, num_captions=num_captions) if ok else []
            by_index = dict(zip(ok, done))
            results: list[CaptionResult] = []
            for i, p in enumerate(chunk):
                if i not in by_index:
                    log.debug("skipping %s", loaded[i])
                    results.append(CaptionResult(p, None, None, [], str(loaded[i])))
                    continue
                r_all = by_index[i] if num_captions != 1 else [by_index[i]]
                for rank, r in enumerate(r_all):
                    results.append(CaptionResult(p, r.caption, r.score, r.tokens, None, r.attention, rank))
            yield results
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def caption_files(checkpoint: str | os.PathLike | Any, paths: Sequence[str | os.PathLike],
                  strategy: Strategy = Beam(5), *, max_len: int = 50, batch_size: int = 16,
                  device: str | torch.device | None = None, prompt: str | None = None,
                  constraints: Constraints | None = None, num_captions: int = 1, workers: int = 0,
                  runtime: str = "torch") -> list[CaptionResult]:
    """Caption image files, `batch_size` at a time; unreadable images get `error` set, others go on.

    `checkpoint` is a checkpoint directory (e.g. RUN_DIR/best), an ONNX export directory with
    `runtime="onnx"`, an already loaded `seesay.checkpoint.Checkpoint` or a captioner. `prompt`
    forces every caption to start with that text; `constraints` (`seesay.decoding.Constraints`,
    bad endings as words) hold for every caption. With `num_captions` N > 1 each readable image
    has N results in a row (`rank` 0..N-1, best score first); an unreadable one has a single
    result with `error`. `workers` threads read images ahead (`caption_stream`).
    """
    model = load_captioner(checkpoint, runtime=runtime, device=device)
    results: list[CaptionResult] = []
    for batch in caption_stream(model, paths, strategy, max_len=max_len, batch_size=batch_size, workers=workers,
                                prompt=prompt, constraints=constraints, num_captions=num_captions):
        results.extend(batch)
    return results


# ---------------------------------------------------------------------------------------------
# Outputs: written batch by batch, resumable

OUTPUT_FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".json": "coco", ".txt": "text", ".tsv": "text"}


def output_format(path: str | os.PathLike | None, json_lines: bool = False) -> str:
    """The format `--output PATH` asks for, by extension: .jsonl JSON lines, .csv, .json COCO
    results, .txt/.tsv text (JSON lines with `json_lines`); standard output: text or JSON lines."""
    if path is None:
        return "jsonl" if json_lines else "text"
    ext = Path(path).suffix.lower()
    if ext not in OUTPUT_FORMATS:
        raise SeesayError(f"--output {path}: unknown extension {ext or '(none)'!s} (use .jsonl for JSON lines, .csv, "
                          ".json for COCO results, or .txt)")
    fmt = OUTPUT_FORMATS[ext]
    return "jsonl" if fmt == "text" and json_lines else fmt


def image_rows(results: Sequence[CaptionResult], num_captions: int = 1) -> list[dict[str, Any]]:
    """One row per captioned image: {image, caption, score} (+ "captions": [{caption, score}],
    best first, with num_captions > 1); failed images have none."""
    rows = []
    for i, r in enumerate(results):
        if r.error is not None or r.rank:
            continue
        row: dict[str, Any] = {"image": r.image, "caption": r.caption, "score": round(float(r.score), 4)}
        if num_captions > 1:
            row["captions"] = [{"caption": x.caption, "score": round(float(x.score), 4)}
                               for x in results[i: i + num_captions]]
        rows.append(row)
    return rows


def _text_lines(row: dict[str, Any], single: bool) -> list[str]:
    if "captions" in row:
        return [f"{row['image']}\t{k + 1}\t{c['caption']}" for k, c in enumerate(row["captions"])]
    return [row["caption"] if single else f"{row['image']}\t{row['caption']}"]


def _csv_text(rows: Sequence[dict[str, Any]], header: bool) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(["image", "rank", "caption", "score"])
    for row in rows:
        for k, c in enumerate(row.get("captions") or [row]):
            w.writerow([row["image"], k + 1, c["caption"], c["score"]])
    return buf.getvalue()


def _cut_unfinished_line(path: Path) -> bytes:
    """The file's bytes up to its last newline; anything after it (a crash mid-write) is cut off the file."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return data[:end]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a JSON lines file; an unfinished last line (a crash mid-write) is cut off."""
    import json

    rows = []
    for line in _cut_unfinished_line(path).decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("image"), str):
            rows.append(row)
    return rows


class CaptionOutput:
    """Where `seesay caption` writes, batch by batch, so a stopped run loses at most one batch.

    JSON lines and text are appended to the output (flushed and synced after each batch). CSV
    and COCO results JSON are whole files: each batch is appended to a sidecar,
    `.<name>.partial.jsonl` beside the output, and `close()` rewrites the output atomically with
    the rows it held plus the sidecar's, then removes the sidecar. On opening, an existing output
    (and sidecar) names the images already captioned: `done(item)` is True for them, so a re-run
    goes on where the last one stopped (`fresh=True` starts over instead). COCO results are
    matched by image_id (`coco_image_id`), the others by the image path as given.
    """

    def __init__(self, path: str | os.PathLike | None, fmt: str, *, single: bool = False, fresh: bool = False,
                 stream: Any = None, rel_of: dict[str, str] | None = None) -> None:
        import sys

        self.path = None if path is None else Path(path)
        self.fmt, self.single = fmt, single
        self.rel_of = rel_of or {}  # image path -> path relative to its folder (COCO image ids)
        self.stream = stream if stream is not None else sys.stdout
        self.done_paths: set[str] = set()
        self.done_ids: set[Any] = set()
        self.kept: Any = None  # csv: text of the existing file; coco: its list of results
        self.partial = None if self.path is None else self.path.parent / f".{self.path.name}.partial.jsonl"
        self.file: Any = None
        self.written = 0
        if self.path is None:
            return
        if fresh:
            for p in (self.path, self.partial):
                if p.exists():
                    p.unlink()
        self._read_existing()

    @property
    def whole_file(self) -> bool:
        return self.fmt in ("csv", "coco")

    def _read_existing(self) -> None:
        import json

        path = self.path
        if path.is_file() and path.stat().st_size:
            try:
                if self.fmt == "jsonl":
                    self.done_paths.update(r["image"] for r in _read_jsonl(path))
                elif self.fmt == "text":
                    for line in _cut_unfinished_line(path).decode("utf-8", errors="replace").splitlines():
                        if "\t" in line:
                            self.done_paths.add(line.split("\t", 1)[0])
                elif self.fmt == "csv":
                    import csv

                    self.kept = path.read_text(encoding="utf-8")
                    self.done_paths.update(r["image"] for r in csv.DictReader(self.kept.splitlines())
                                           if r.get("image"))
                else:
                    self.kept = json.loads(path.read_text(encoding="utf-8"))
                    if not isinstance(self.kept, list):
                        raise ValueError("not a list of results")
                    self.done_ids.update(r.get("image_id") for r in self.kept if isinstance(r, dict))
            except (OSError, ValueError, KeyError) as e:
                raise SeesayError(f"--output {path}: exists but cannot be read to resume "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                  "move it away or pass --overwrite") from None
        if self.whole_file and self.partial.is_file():
            self.done_paths.update(r["image"] for r in _read_jsonl(self.partial))

    def done(self, item: ImageItem) -> bool:
        if item.path in self.done_paths:
            return True
        return self.fmt == "coco" and coco_image_id(item) in self.done_ids

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append one batch's rows (and make them durable before the next batch starts)."""
        import json

        if not rows:
            return
        if self.fmt == "text":
            text = "".join(line + "\n" for row in rows for line in _text_lines(row, self.single))
        elif self.whole_file and self.path is not None:  # the sidecar keeps what the image id needs
            text = "".join(json.dumps({**row, "rel": self.rel_of.get(row["image"], row["image"])}, ensure_ascii=False)
                           + "\n" for row in rows)
        else:
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        self.written += len(rows)
        if self.path is None:
            if self.fmt == "csv":  # pragma: no cover - standard output is text or JSON lines
                text = _csv_text(rows, header=self.written == len(rows))
            self.stream.write(text)
            self.stream.flush()
            return
        if self.file is None:
            target = self.partial if self.whole_file else self.path
            target.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(target, "a", encoding="utf-8")  # kept open across batches
        self.file.write(text)
        self.file.flush()
        os.fsync(self.file.fileno())

    def abort(self) -> None:
        """Stop without finishing (Ctrl-C): what was written stays, the sidecar included."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def close(self) -> None:
        """Finish: CSV and COCO results are written (atomically) from the kept rows and the sidecar."""
        import json

        from seesay.files import write_text_atomic

        if self.file is not None:
            self.file.close()
            self.file = None
        if self.path is None or not self.whole_file:
            return
        new = _read_jsonl(self.partial) if self.partial.is_file() else []
        if not new and self.path.exists():
            return
        if self.fmt == "csv":
            kept = self.kept or ""
            text = kept + ("" if not kept or kept.endswith("\n") else "\n") + _csv_text(new, header=not kept)
        else:
            results = list(self.kept or [])
            results += [{"image_id": coco_image_id(ImageItem(r["image"], r.get("rel", r["image"]))),
                         "caption": r["caption"]} for r in new]
            text = json.dumps(results, ensure_ascii=False, indent=0) + "\n"
        try:
            write_text_atomic(self.path, text)
        except OSError as e:
            raise SeesayError(f"--output {self.path}: cannot write ({e.strerror or e}); the captions are kept in "
                              f"{self.partial}") from None
        self.partial.unlink(missing_ok=True)
