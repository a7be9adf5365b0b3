"""`seesay prepare`: read a dataset, check and resize its images, build the vocabulary and
write the prepared form (layout in `seesay.data.store` and docs/data.md).

How it runs:

- Everything is built in ``DATA_DIR.partial/`` and renamed to ``DATA_DIR`` at the very end,
  so a ``DATA_DIR`` with a manifest is always complete.
- Images are processed in fixed chunks of consecutive images of one split by a pool of worker
  processes (``workers``, default all cores). Each worker writes its rows straight into the
  split's preallocated ``images.npy`` (at fixed offsets, so the order of work does not matter)
  and the main process then records the chunk as done in ``chunks/<split>-<k>.json``.
- Killed and run again with the same inputs and options, a run skips the chunks already
  done; the result is byte-identical to an uninterrupted run (nothing depends on timing,
  worker count or order). Chunks that held bad images are processed again, so repaired files
  are picked up. With other inputs or options the stale ``.partial`` is discarded.
- Bad images (missing, empty, truncated, not an image, decompression bomb) are skipped and
  listed in ``skipped.jsonl``; when more than ``max_skip_fraction`` of the images are bad the
  run stops with an error (the list is left in ``DATA_DIR.partial/skipped.jsonl``). When some
  images are skipped, each split's array is rewritten once without their rows.
- Image paths from an annotation file must resolve inside ``--images`` (``--coco-dir``'s image
  folders for COCO): ``../x.jpg``, absolute paths elsewhere and symlinks leading out are
  skipped as "path outside --images" without being opened, unless ``allow_outside_images``.
- Writing errors (a full disk, a quota) stop the run with one line; what is done stays in
  ``DATA_DIR.partial`` and the same command resumes it.
- ``DATA_DIR.lock`` records the owner's pid and host; a lock left by a killed run (its owner no
  longer runs) is taken over with a log line, a live one refuses a second run.
- Progress is `seesay.progress.progress`: a bar on a terminal, periodic log lines otherwise,
  nothing with ``progress=False``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import socket
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from seesay.data.formats import FORMATS, Record, outside_root, read_records, records_fingerprint
from seesay.data.images import read_image
from seesay.data.tokenize import TOKENIZERS, Vocab, build_vocab, tokenize
from seesay.errors import SeesayError
from seesay.files import write_text_atomic
from seesay.progress import progress as progress_display

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLIT_ORDER = ("train", "val", "test", "restval")
CHUNK_SIZE = 64
STOP_ENV = "SEESAY_PREPARE_STOP_AFTER_CHUNKS"  # testing hook: hard-exit after N chunks


class PrepareInterrupted(SeesayError):
    """Raised by the `_stop_after_chunks` testing hook; the partial build stays resumable."""


# -- small helpers -------------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0]


def _write_error(e: OSError, partial: Path) -> SeesayError:
    """One line for a failed write; the partial build is kept, so the same command resumes."""
    where = e.filename or partial
    full = {errno.ENOSPC: "no space left on device", getattr(errno, "EDQUOT", -1): "disk quota exceeded"}
    if e.errno in full:
        why, then = full[e.errno], "free some space"
    else:
        why, then = f"cannot write ({e.strerror or e})", "fix that"
    return SeesayError(f"{where}: {why} (while preparing {partial}); what is done is kept: "
                       f"{then} and run the same command again to resume")


def summary_line(manifest: dict[str, Any], output: str | os.PathLike) -> str:
    splits = manifest["splits"]
    parts = " / ".join(f"{s} {v['images']}" for s, v in splits.items())
    total = sum(v["images"] for v in splits.values())
    bad, no_caption = manifest["skipped"], manifest.get("no_caption_images", 0)
    line = f"prepared {total} images ({parts}), skipped {bad}"
    if no_caption:
        without = f"without a caption of 1 to {manifest['max_len']} tokens"
        line = (f"prepared {total} images ({parts}), skipped {bad} bad images and {no_caption} {without}" if bad
                else f"prepared {total} images ({parts}), skipped {no_caption} images {without}")
    if bad or no_caption:
        line += f": see {Path(output) / 'skipped.jsonl'}"
    why = []
    if manifest.get("empty_captions"):
        why.append(f"{manifest['empty_captions']} empty")
    if manifest.get("long_captions"):
        why.append(f"{manifest['long_captions']} longer than {manifest['max_len']} tokens")
    if why:
        line += f"; dropped captions: {', '.join(why)}"
    return line


# -- worker side ---------------------------------------------------------------------------------
def _process_chunk(task: tuple) -> tuple[str, int, list]:
    split, k, file, offset, row_bytes, start, items, size = task
    statuses = []
    fd = os.open(file, os.O_WRONLY)
    try:
        for j, (path, root, flag) in enumerate(items):
            pos = offset + (start + j) * row_bytes
            real = outside_root(path, root) if root is not None else None
            try:
                if real is not None:  # never opened
                    raise SeesayError(f"{path}: path outside {flag} (resolves to {real})")
                arr, wh = read_image(path, size)
            except SeesayError as e:
                msg = str(e)
                prefix = f"{path}: "
                reason = msg[len(prefix):] if msg.startswith(prefix) else msg
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad item, not a crash
                reason = f"broken image ({type(e).__name__}: {str(e)[:100]})"
            else:
                os.pwrite(fd, arr.tobytes(), pos)  # write errors (disk full) are not bad items: they stop the run
                statuses.append([True, None, list(wh)])
                continue
            os.pwrite(fd, bytes(row_bytes), pos)
            statuses.append([False, reason, None])
    finally:
        os.close(fd)
    return split, k, statuses


def _worker_init() -> None:
    # Ctrl-C goes to the main process only (it stops the pool); on Linux a worker also dies with
    # its parent, so a killed run leaves no orphans behind.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _tokenize_batch(args: tuple[list[str], str]) -> list[list[str]]:
    texts, kind = args
    return [tokenize(t, kind) for t in texts]


# -- main ----------------------------------------------------------------------------------------
def _tokenize_all(records: list[Record], kind: str, pool: Any) -> list[list[list[str]]]:
    flat = [s for r in records for s in r.sentences]
    if pool is not None and kind == "jieba" and len(flat) > 20000:
        step = 5000
        batches = [(flat[i:i + step], kind) for i in range(0, len(flat), step)]
        toks = [t for part in pool.imap(_tokenize_batch, batches) for t in part]
    else:
        toks = [tokenize(s, kind) for s in flat]
    out, i = [], 0
    for r in records:
        out.append(toks[i:i + len(r.sentences)])
        i += len(r.sentences)
    return out


def _open_images_file(path: Path, n: int, size: int) -> tuple[int, int, bool, bool]:
    """Preallocate (or reuse) a split's uint8 [n,size,size,3] .npy.

    Returns (header offset, bytes per row, whether the file was already compacted by an
    interrupted finalize, in which case no row may be written any more, whether the file is new).
    """
    row_bytes = size * size * 3
    if path.exists():
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            ok = arr.dtype == np.uint8 and arr.shape[1:] == (size, size, 3) and arr.shape[0] <= n
            offset, rows = arr.offset, arr.shape[0]
            del arr
            if ok:
                return offset, row_bytes, rows < n, False
        except (ValueError, OSError, EOFError):
            pass
        path.unlink()
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    offset = arr.offset
    arr.flush()
    del arr
    return offset, row_bytes, False, True


def _compact(path: Path, good: list[int], size: int) -> None:
    src = np.load(path, mmap_mode="r")
    if src.shape[0] == len(good):  # already compacted by an earlier, interrupted finalize
        return
    tmp = path.with_name("images.compact.npy")
    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(good), size, size, 3))
    idx = np.asarray(good, dtype=np.int64)
    for i in range(0, len(idx), 256):
        dst[i:i + 256] = src[idx[i:i + 256]]
    dst.flush()
    del dst, src
    os.replace(tmp, path)


def _select_captions(kept: list[list[str]], n: int, seed: int, split: str, image_id: str) -> list[list[str]]:
    """Exactly n captions: the first n, or all of them plus random repeats (seeded per image)."""
    if len(kept) >= n:
        return kept[:n]
    rng = random.Random(f"{seed}:{split}:{image_id}")
    return kept + [rng.choice(kept) for _ in range(n - len(kept))]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (Linux), to tell a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(owner: dict[str, Any]) -> bool:
    """Whether the process recorded in a lock still runs (unknowable on another host: assume it does)."""
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname():
        return True
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    except OSError:
        return False
    started = owner.get("started")
    return started is None or _start_time(pid) in (None, started)


def _read_owner(fd: int) -> dict[str, Any] | None:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "null")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _describe(owner: dict[str, Any] | None) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "owner unknown"


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Refuse a second `seesay prepare` writing the same DATA_DIR at the same time.

    `DATA_DIR.lock` is held with flock (POSIX) and records {"pid", "host", "started"}. A lock file
    left by a killed run is free (the kernel dropped its flock) and its owner is gone: it is taken
    over with a log line. The pid check also covers file systems that do not enforce flock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the pid record alone
        fcntl = None  # type: ignore[assignment]
    lock = out.with_name(out.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())}
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise SeesayError(f"{out}: another seesay prepare is writing it ({_describe(_read_owner(fd))}; "
                                      f"lock {lock})") from None
                try:  # the previous owner may have removed the file meanwhile: lock the current one
                    same = os.path.samestat(os.fstat(fd), os.stat(lock))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            old = _read_owner(fd)
            if old is not None and (old.get("pid"), old.get("host")) != (me["pid"], me["host"]):
                if _owner_alive(old) and (fcntl is None or old.get("host") == me["host"]):
                    raise SeesayError(f"{out}: another seesay prepare is writing it ({_describe(old)}; lock {lock})")
                log.info("removing stale lock %s (left by %s, which no longer runs)", lock, _describe(old))
            os.ftruncate(fd, 0)
            os.pwrite(fd, _dumps(me).encode("utf-8"), 0)
        except BaseException:
            os.close(fd)
            raise
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def _check_output(out: Path, fingerprint: str, overwrite: bool) -> dict[str, Any] | None:
    """The manifest when `out` is already prepared from the same inputs; raises when it would be clobbered."""
    if (out / "manifest.json").is_file():
        try:
            old = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
        if not isinstance(old, dict):
            old = {}
        if old.get("fingerprint") == fingerprint and not overwrite:
            return old
        if not overwrite:
            raise SeesayError(f"{out} already holds a prepared dataset built from other inputs or options; "
                              "use --overwrite or another --output")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise SeesayError(f"{out} exists and is not a prepared dataset; use --overwrite or another --output")
    return None


def _start_partial(partial: Path, fingerprint: str, chunk_size: int) -> None:
    """Resume `partial` when it was started with the same inputs and options, else start afresh."""
    plan_path = partial / "plan.json"
    if partial.exists():
        try:
            plan = json.loads(plan_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            plan = {}
        if not isinstance(plan, dict):
            plan = {}
        if plan.get("fingerprint") != fingerprint or plan.get("chunk_size") != chunk_size:
            log.info("discarding %s (built from other inputs or options)", partial)
            shutil.rmtree(partial)
        else:
            log.info("resuming %s", partial)
    (partial / "chunks").mkdir(parents=True, exist_ok=True)
    if not plan_path.exists():
        write_text_atomic(plan_path, _dumps({"fingerprint": fingerprint, "chunk_size": chunk_size}))


def _chunk_statuses(marker: Path, n: int) -> list | None:
    """A done chunk's statuses [[ok, reason, [w, h]], ...], or None when the marker is missing or bad."""
    try:
        st = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(st, list) or len(st) != n or not all(isinstance(x, list) and len(x) == 3 for x in st):
        return None
    return st


def _process_images(partial: Path, recs: list[Record], members: dict[str, list[int]], *, image_size: int,
                    chunk_size: int, pool: Any, progress: bool, stop_after: int | None,
                    hard_stop: bool, allow_outside: bool = False,
                    root_flag: str = "--images") -> dict[tuple[str, int], list]:
    """Process every chunk not done yet; returns the per-image statuses of every chunk."""
    tasks, statuses = [], {}
    total = done_images = 0
    for s, idx in members.items():
        (partial / s).mkdir(exist_ok=True)
        img_file = partial / s / "images.npy"
        offset, row_bytes, compacted, fresh = _open_images_file(img_file, len(idx), image_size)
        if fresh:  # rows recorded as done in an older file are gone with it
            for old in (partial / "chunks").glob(f"{s}-*.json"):
                old.unlink()
        for k, start in enumerate(range(0, len(idx), chunk_size)):
            part = idx[start:start + chunk_size]
            total += len(part)
            st = _chunk_statuses(partial / "chunks" / f"{s}-{k:06d}.json", len(part))
            # a chunk with bad images is tried again (they may have been repaired meanwhile)
            if st is not None and (compacted or all(x[0] for x in st)):
                statuses[(s, k)] = st
                done_images += len(part)
                continue
            items = [(recs[i].image_path, None if allow_outside else recs[i].root, root_flag) for i in part]
            tasks.append((s, k, str(img_file), offset, row_bytes, start, items, image_size))
    bar = progress_display(total, desc="prepare", unit="img", initial=done_images, enabled=progress)
    try:
        results = (pool.imap_unordered(_process_chunk, tasks) if pool is not None and len(tasks) > 1
                   else map(_process_chunk, tasks))
        for n_done, (s, k, st) in enumerate(results, 1):
            write_text_atomic(partial / "chunks" / f"{s}-{k:06d}.json", json.dumps(st))
            statuses[(s, k)] = st
            bar.update(len(st))
            if stop_after is not None and stop_after <= n_done < len(tasks):
                if hard_stop:  # the environment hook: die like a killed process
                    os._exit(3)
                raise PrepareInterrupted(f"stopped after {n_done} chunks (testing hook); run again to resume")
    except OSError as e:
        raise _write_error(e, partial) from None
    finally:
        bar.close()
    return statuses


def _write_split(partial: Path, split: str, recs: list[Record], rows: list[int], kept: list[list[list[str]]],
                 orig: dict[int, list[int]], vocab: Vocab, *, captions_per_image: int, max_len: int,
                 seed: int, boxes: list[list[list[float]]] | None = None, loc_bins: int | None = None) -> None:
    """captions.npy, lengths.npy, references.jsonl and meta.jsonl of one split (and boxes.npy for
    region data: each row then starts with its box's four location tokens, `seesay.data.region_tasks`)."""
    extra_width = 4 if boxes is not None else 0
    caps = np.zeros((len(rows), captions_per_image, max_len + 2 + extra_width), dtype=np.int32)
    lens = np.zeros((len(rows), captions_per_image), dtype=np.int32)
    row_boxes: list[list[list[float]]] = []
    refs, meta = [], []
    for n, i in enumerate(rows):
        r = recs[i]
        if boxes is not None:  # the same seeded choice, made on positions so each row keeps its box
            from seesay.data.region_tasks import encode_region_row

            picked = _select_captions(list(range(len(kept[i]))), captions_per_image, seed, split, r.image_id)
            row_boxes.append([boxes[i][k] for k in picked])
            for c, k in enumerate(picked):
                ids = encode_region_row(vocab, kept[i][k], boxes[i][k], int(loc_bins))
                caps[n, c, :len(ids)] = ids
                lens[n, c] = len(ids)
        for c, toks in enumerate([] if boxes is not None else
                                 _select_captions(kept[i], captions_per_image, seed, split, r.image_id)):
            ids = vocab.encode_tokens(toks, add_special=True)
            caps[n, c, :len(ids)] = ids
            lens[n, c] = len(ids)
        refs.append(_dumps({"image_id": r.image_id, "references": r.sentences}) + "\n")
        meta.append(_dumps({"index": n, "image_id": r.image_id, "image": r.image_path,
                            "extra": {**r.extra, "orig_size": orig[i]}}) + "\n")
    np.save(partial / split / "captions.npy", caps)
    np.save(partial / split / "lengths.npy", lens)
    if boxes is not None:
        from seesay.data.region_tasks import write_boxes

        write_boxes(partial / split / "boxes.npy", row_boxes, captions_per_image)
    write_text_atomic(partial / split / "references.jsonl", "".join(refs))
    write_text_atomic(partial / split / "meta.jsonl", "".join(meta))


def _publish(partial: Path, out: Path) -> None:
    """Rename the finished build to `out` (replacing an old one only once the new one is complete)."""
    shutil.rmtree(partial / "chunks")
    (partial / "plan.json").unlink()
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, out)


def prepare_dataset(
    fmt: str | None,
    output: str | os.PathLike,
    *,
    annotations: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    coco_dir: str | os.PathLike | None = None,
    keep_restval: bool = False,
    min_word_freq: int | None = None,
    max_len: int = 50,
    captions_per_image: int | None = None,
    image_size: int = 256,
    tokenizer: str | None = None,
    vocab_size: int | None = None,
    tokenizer_model: str | os.PathLike | None = None,
    workers: int | None = None,
    max_skip_fraction: float = 0.01,
    progress: bool = True,
    seed: int = 0,
    records: Any = None,
    overwrite: bool = False,
    allow_outside_images: bool = False,
    task: str | None = None,
    prompt: str | None = None,
    partition: int | None = None,
    redcaps_text: str = "caption",
    loc_vocab_size: int | None = None,
    output_format: str = "store",
    shard_size: int = 1000,
    shards: str | None = None,
    val_shards: str | None = None,
    _chunk_size: int = CHUNK_SIZE,
    _stop_after_chunks: int | None = None,
) -> dict[str, Any]:
    """Prepare a dataset into `output` and return its manifest (see the module doc).

    `records` (an iterable of `Record`s or dicts with image/image_path, image_id, split,
    sentences, extra) replaces reading `fmt` from files. `tokenizer=None` means jieba for
    aichallenger and word otherwise. `--images` defaults to the annotation file's folder.
    Image paths from annotation files must resolve inside `--images` (COCO: `coco_dir/train2014`,
    `coco_dir/val2014`); others are skipped unopened unless `allow_outside_images`.
    `task` / `prompt` go to the manifest (`seesay.data.tasks`; defaults per format, as do
    `captions_per_image=None`: 1 for classification formats and redcaps, else 5, and
    `min_word_freq=None`: 1 for classification formats, else 5).
    """
    from seesay.data.classify_formats import class_labels
    from seesay.data.region_tasks import REGION_FORMATS
    from seesay.data.tasks import CLASSIFY_FORMATS, default_captions_per_image, manifest_fields

    region_source = None
    if fmt in REGION_FORMATS:  # data with boxes: one record per image, its regions as captions (region_tasks)
        from seesay.data.region_tasks import region_records

        task = task or "region"
        if tokenizer != "sentencepiece":
            raise SeesayError(f"--format {fmt} needs --tokenizer sentencepiece (the <loc_i> location tokens are "
                              "added to it)")
        if output_format != "store":
            raise SeesayError(f"--format {fmt} is prepared as a store, not --output-format {output_format}")
        records = region_records(fmt, images=images, coco_dir=coco_dir)
        region_source = {"format": fmt, **{k: str(Path(v).absolute()) for k, v in
                                           (("images", images), ("coco_dir", coco_dir)) if v is not None}}
    elif loc_vocab_size is not None:
        raise SeesayError("--loc-vocab-size goes with --format shapes-regions or coco-instances")
    if captions_per_image is None:
        captions_per_image = default_captions_per_image(fmt, task)
    if min_word_freq is None:
        min_word_freq = 1 if fmt in CLASSIFY_FORMATS else 5
    if output_format not in ("store", "shards"):
        raise SeesayError(f"--output-format must be store or shards, not {output_format!r}")
    if output_format == "shards" or fmt == "webdataset":  # WebDataset tars: seesay.data.shards, docs/shards.md
        from seesay.data.shards import prepare_shards

        if tokenizer == "sentencepiece":  # the shard writer builds word/char/byte/jieba vocabularies only
            raise SeesayError("--tokenizer sentencepiece is not supported for shards yet (--output-format shards, "
                              "--format webdataset): use word, char, byte or jieba, or prepare a store")

        return prepare_shards(fmt, output, shard_size=shard_size, shards=shards, val_shards=val_shards,
                              annotations=annotations, images=images, coco_dir=coco_dir, keep_restval=keep_restval,
                              min_word_freq=min_word_freq, max_len=max_len, captions_per_image=captions_per_image,
                              image_size=image_size, tokenizer=tokenizer, workers=workers,
                              max_skip_fraction=max_skip_fraction, progress=progress, seed=seed, records=records,
                              overwrite=overwrite, allow_outside_images=allow_outside_images, task=task,
                              prompt=prompt, partition=partition, redcaps_text=redcaps_text)
    # -- options and records ----------------------------------------------------------------------
    if fmt is not None and fmt not in FORMATS and fmt not in REGION_FORMATS:
        raise SeesayError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if tokenizer is None:
        tokenizer = "jieba" if fmt == "aichallenger" else "word"
    if tokenizer not in (*TOKENIZERS, "sentencepiece"):
        raise SeesayError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}, sentencepiece")
    if tokenizer != "sentencepiece" and (vocab_size is not None or tokenizer_model is not None):
        raise SeesayError("--vocab-size and --tokenizer-model go with --tokenizer sentencepiece")
    for name, value, low in (("--max-len", max_len, 1), ("--captions-per-image", captions_per_image, 1),
                             ("--image-size", image_size, 1), ("--min-word-freq", min_word_freq, 0)):
        if int(value) < low:
            raise SeesayError(f"{name} must be at least {low}, got {value}")
    max_len, captions_per_image, image_size = int(max_len), int(captions_per_image), int(image_size)
    if not 0.0 <= float(max_skip_fraction) <= 1.0:
        raise SeesayError(f"--max-skip-fraction must be between 0 and 1, got {max_skip_fraction}")
    workers = int(workers) if workers else (os.cpu_count() or 1)
    if workers < 1:
        raise SeesayError(f"--workers must be at least 1, got {workers}")
    out = Path(output)
    partial = out.with_name(out.name + ".partial")

    where_images = "the records' image paths"
    if records is not None:
        recs = [Record.from_any(r) for r in records]
        source: dict[str, Any] = region_source or {"format": fmt or "records"}
    else:
        if fmt is None:
            raise SeesayError("give a format or records")
        annotations, images, coco_dir = (None if v is None else Path(v).absolute()
                                         for v in (annotations, images, coco_dir))
        recs = read_records(fmt, annotations=annotations, images=images, coco_dir=coco_dir,
                            keep_restval=keep_restval, partition=partition, redcaps_text=redcaps_text)
        source = {"format": fmt}
        if partition is not None and fmt == "sun397":
            source["partition"] = int(partition)
        if fmt == "redcaps":
            source["redcaps_text"] = redcaps_text
        for k, v in (("annotations", annotations), ("images", images), ("coco_dir", coco_dir)):
            if v is not None:
                source[k] = str(v)
        if fmt == "coco":
            where_images = f"{coco_dir}/train2014 and val2014 (check --coco-dir)"
        elif images is None and annotations is not None:
            where_images = (f"{annotations.parent} (the folder of --annotations, as --images was not given): "
                            "give the image folder with --images DIR")
        else:
            where_images = f"{images} (--images): check --images and the file names in {annotations}"
    if not recs:
        raise SeesayError("the dataset has no images")
    task_info = manifest_fields(fmt, task, prompt, class_labels(recs), loc_vocab_size)
    for r in recs:
        if not r.split or any(c in r.split for c in "/\\.") or r.split != r.split.strip():
            raise SeesayError(f"image {r.image_id!r}: bad split name {r.split!r}")

    options = {"format_version": FORMAT_VERSION, "image_size": image_size, "max_len": max_len,
               "captions_per_image": captions_per_image, "tokenizer": tokenizer,
               "min_word_freq": int(min_word_freq), "seed": int(seed), "source": source}
    if task_info.get("loc_vocab_size"):  # region data: the same arrays for region and grounding
        options["loc_vocab_size"] = task_info["loc_vocab_size"]
    if allow_outside_images:  # only when set, so datasets prepared before the option keep their fingerprint
        options["allow_outside_images"] = True
    if tokenizer == "sentencepiece":  # --vocab-size or the --tokenizer-model file: part of the fingerprint
        from seesay.spm import prepare_options

        options.update(prepare_options(vocab_size, tokenizer_model))
    fingerprint = hashlib.sha256((records_fingerprint(recs) + ":" + _dumps(options)).encode("utf-8")).hexdigest()
    try:
        with _exclusive(out):
            done = _check_output(out, fingerprint, overwrite)
            if done is not None:
                log.info("%s is already prepared with these inputs and options", out)
                if any(done.get(k) != v for k, v in task_info.items()):  # only the task or prompt changed
                    done = {**{k: v for k, v in done.items() if k != "labels"}, **task_info}
                    write_text_atomic(out / "manifest.json",
                                      json.dumps(done, ensure_ascii=False, sort_keys=True, indent=1) + "\n")
                return done
            _start_partial(partial, fingerprint, _chunk_size)
            return _build(recs, partial, out, options, fingerprint, workers=workers, tokenizer=tokenizer,
                          max_len=max_len, captions_per_image=captions_per_image, image_size=image_size,
                          min_word_freq=int(min_word_freq), max_skip_fraction=float(max_skip_fraction),
                          seed=int(seed), progress=progress, chunk_size=_chunk_size,
                          stop_after_chunks=_stop_after_chunks, allow_outside=bool(allow_outside_images),
                          root_flag="--coco-dir" if fmt == "coco" and records is None else "--images",
                          where_images=where_images, task_info=task_info)
    except OSError as e:  # writing failed (disk full, quota, permissions): one line, the partial build kept
        raise _write_error(e, partial) from None


def _missing_hint(reasons: Counter[str], total: int, where_images: str) -> str:
    """A pointer to the image folder when (nearly) every image is missing, else ""."""
    missing = reasons.get("file not found", 0)
    if total and missing >= max(1, 0.9 * total):
        return f"; {missing} of {total} images were not found under {where_images}"
    return ""


def _build(recs: list[Record], partial: Path, out: Path, options: dict[str, Any], fingerprint: str, *,
           workers: int, tokenizer: str, max_len: int, captions_per_image: int, image_size: int,
           min_word_freq: int, max_skip_fraction: float, seed: int, progress: bool, chunk_size: int,
           stop_after_chunks: int | None, allow_outside: bool = False, root_flag: str = "--images",
           where_images: str = "the records' image paths", task_info: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    _chunk_size, _stop_after_chunks = chunk_size, stop_after_chunks

    # -- tokens and images (in parallel) ----------------------------------------------------------
    stop_env = os.environ.get(STOP_ENV)
    stop_after = _stop_after_chunks if _stop_after_chunks is not None else (int(stop_env) if stop_env else None)
    pool = None
    try:
        workers = min(workers, -(-len(recs) // _chunk_size))
        if workers > 1:
            # fork is fast; spawn when torch (and its threads) is already loaded in this process
            method = "fork" if sys.platform == "linux" and "torch" not in sys.modules else "spawn"
            pool = mp.get_context(method).Pool(workers, initializer=_worker_init)
        spm = None
        if tokenizer == "sentencepiece":  # trained on the train split's captions, or --tokenizer-model
            from seesay.spm import sentencepiece_for_prepare

            spm = sentencepiece_for_prepare(recs, options)
            if options.get("loc_vocab_size"):  # region data: <loc_0> .. <loc_{n-1}> (seesay.locations)
                from seesay.locations import loc_tokens

                spm.add_tokens(loc_tokens(int(options["loc_vocab_size"])))
            tokens = [[spm.tokenize(s) for s in r.sentences] for r in recs]
        else:
            tokens = _tokenize_all(recs, tokenizer, pool)
        # captions: drop empty and too long ones; images left with none are skipped
        kept = [[t for t in toks if 1 <= len(t) <= max_len] for toks in tokens]
        rejected = [i for i, r in enumerate(recs) if r.bad is not None]  # the reader's bad items
        for i in rejected:
            kept[i] = []
        boxes = None
        if options.get("loc_vocab_size"):  # each kept region's box, aligned with kept
            from seesay.data.region_tasks import kept_boxes

            boxes = kept_boxes(recs, [tokens[i] if kept[i] else [] for i in range(len(recs))], max_len)
        long_captions = sum(len(t) > max_len for toks in tokens for t in toks)
        empty_captions = sum(r.blank_captions for r in recs) + sum(not t for toks in tokens for t in toks)
        no_caption = [i for i, k in enumerate(kept) if not k and recs[i].bad is None]
        split_names = sorted({r.split for r in recs},
                             key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))
        members: dict[str, list[int]] = {s: [] for s in split_names}
        for i, r in enumerate(recs):
            if kept[i]:
                members[r.split].append(i)
        statuses = _process_images(partial, recs, members, image_size=image_size, chunk_size=_chunk_size,
                                   pool=pool, progress=progress, stop_after=stop_after,
                                   hard_stop=_stop_after_chunks is None, allow_outside=allow_outside,
                                   root_flag=root_flag)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    # -- bad images ---------------------------------------------------------------------------
    ok: dict[str, list[bool]] = {}
    orig: dict[int, list[int]] = {}
    skipped_lines = []
    reasons: Counter[str] = Counter()
    for s, idx in members.items():
        flags = ok[s] = []
        for k, start in enumerate(range(0, len(idx), _chunk_size)):
            for j, (good, reason, wh) in enumerate(statuses[(s, k)]):
                i = idx[start + j]
                flags.append(bool(good))
                if good:
                    orig[i] = wh
                else:
                    reasons[_reason_kind(reason)] += 1
                    skipped_lines.append({"split": s, "image_id": recs[i].image_id, "image": recs[i].image_path,
                                          "reason": reason})
    for i in rejected:
        reasons[_reason_kind(recs[i].bad)] += 1
        skipped_lines.append({"split": recs[i].split, "image_id": recs[i].image_id, "image": recs[i].image_path,
                              "reason": recs[i].bad})
    for i in no_caption:
        skipped_lines.append({"split": recs[i].split, "image_id": recs[i].image_id, "image": recs[i].image_path,
                              "reason": f"no caption of 1 to {max_len} tokens"})
    write_text_atomic(partial / "skipped.jsonl", "".join(_dumps(x) + "\n" for x in skipped_lines))
    n_bad, total = sum(reasons.values()), sum(len(v) for v in members.values()) + len(rejected)
    hint = _missing_hint(reasons, total, where_images)
    if total and n_bad / total > max_skip_fraction:
        raise SeesayError(
            f"{n_bad} of {total} images ({100 * n_bad / total:.1f}%) are bad, more than --max-skip-fraction "
            f"{max_skip_fraction}; see {partial / 'skipped.jsonl'} ("
            + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) + ")" + hint)
    if hint:
        log.warning("%s", hint[2:])
    if reasons.get(f"path outside {root_flag}"):
        log.warning("%d images were skipped because their path leads outside %s (see %s; "
                    "--allow-outside-images lets them through)", reasons[f"path outside {root_flag}"], root_flag,
                    out / "skipped.jsonl")

    # -- vocabulary, captions, references; then publish ------------------------------------------------
    good_rows = {s: [i for i, f in zip(members[s], ok[s]) if f] for s in split_names}
    if not good_rows.get("train"):
        raise SeesayError("the dataset has no usable training images (split 'train' is empty)" + hint)
    if spm is not None:  # DATA_DIR/tokenizer/ (tokenizer.json + spiece.model) instead of vocab.json
        vocab = spm
        spm.save_pretrained(partial / "tokenizer")
    else:
        vocab = build_vocab((t for i in good_rows["train"] for t in kept[i]), tokenizer, min_word_freq)
        vocab.save(partial / "vocab.json")
    for s in split_names:
        if len(good_rows[s]) < len(members[s]):
            _compact(partial / s / "images.npy", [j for j, f in enumerate(ok[s]) if f], image_size)
        _write_split(partial, s, recs, good_rows[s], kept, orig, vocab, captions_per_image=captions_per_image,
                     max_len=max_len, seed=int(seed), boxes=boxes, loc_bins=options.get("loc_vocab_size"))
    manifest = {
        **options,
        "splits": {s: {"images": len(good_rows[s]), "captions": len(good_rows[s]) * captions_per_image}
                   for s in split_names},
        "caption_length": max_len + 2 + (4 if boxes is not None else 0),
        "vocab_size": len(vocab),
        "skipped": n_bad,
        "skipped_reasons": dict(sorted(reasons.items())),
        "no_caption_images": len(no_caption),
        "dropped_captions": long_captions + empty_captions,
        "long_captions": long_captions,  # more than max_len tokens
        "empty_captions": empty_captions,  # blank, or no tokens left after tokenisation
        "fingerprint": fingerprint,
        **(task_info or {}),
    }
    write_text_atomic(partial / "manifest.json", json.dumps(manifest, ensure_ascii=False, sort_keys=True, indent=1) + "\n")
    _publish(partial, out)
    log.debug("%s", summary_line(manifest, out))
    return manifest
