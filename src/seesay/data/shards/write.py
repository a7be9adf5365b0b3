"""Writing shards (`seesay prepare --output-format shards`) and reading img2dataset-style shards
into a manifest (`seesay prepare --format webdataset`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from seesay.data.shards.common import (
    DEFAULT_SHARD_SIZE,
    JPEG_QUALITY,
    _dumps,
    _image_bytes,
    _is_url,
    _webdataset,
    expand_shards,
    iter_shard,
    sample_captions,
)
from seesay.errors import SeesayError
from seesay.files import write_text_atomic

log = logging.getLogger(__name__)



def _encode_jpeg(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _write_shard(task: tuple) -> tuple[int, list]:
    """One shard (a pool task): read, resize and write its images; [[ok, reason, [w, h]], ...]."""
    from seesay.data.formats import outside_root
    from seesay.data.images import read_image

    wds = _webdataset()
    k, path, items, size = task
    tmp = path + ".tmp"
    statuses = []
    with open(tmp, "wb") as f, contextlib.closing(wds.TarWriter(f, encoder=False, mtime=0)) as writer:
        for key, image, root, flag, meta in items:
            real = outside_root(image, root) if root is not None else None
            try:
                if real is not None:
                    raise SeesayError(f"{image}: path outside {flag} (resolves to {real})")
                arr, wh = read_image(image, size)
            except SeesayError as e:
                msg = str(e)
                statuses.append([False, msg[len(image) + 2:] if msg.startswith(f"{image}: ") else msg, None])
                continue
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad item
                statuses.append([False, f"broken image ({type(e).__name__}: {str(e)[:100]})", None])
                continue
            meta = {**meta, "extra": {**meta["extra"], "orig_size": list(wh)}}
            writer.write({"__key__": key, "jpg": _encode_jpeg(arr), "txt": meta["captions"][0].encode("utf-8"),
                          "json": _dumps(meta).encode("utf-8")})
            statuses.append([True, None, list(wh)])
    os.replace(tmp, path)
    return k, statuses


def _read_split_image(task: tuple) -> tuple[int, np.ndarray | None, str | None, list[int] | None]:
    from seesay.data.images import read_image

    i, source, size, root, flag = task
    try:
        if root is not None:
            from seesay.data.formats import outside_root

            real = outside_root(source, root)
            if real is not None:
                raise SeesayError(f"{source}: path outside {flag} (resolves to {real})")
        arr, wh = read_image(source, size, name=str(i))
    except SeesayError as e:
        msg = str(e)
        return i, None, msg.split(": ", 1)[1] if ": " in msg else msg, None
    except Exception as e:  # noqa: BLE001
        return i, None, f"broken image ({type(e).__name__}: {str(e)[:100]})", None
    return i, arr, None, list(wh)


def _pool(workers: int, tasks: int) -> Any:
    workers = min(workers, tasks)
    if workers <= 1:
        return None
    from seesay.data.prepare import _worker_init

    method = "fork" if sys.platform == "linux" and "torch" not in sys.modules else "spawn"
    return mp.get_context(method).Pool(workers, initializer=_worker_init)


def _imap(pool: Any, fn: Any, tasks: list) -> Iterator[Any]:
    return pool.imap_unordered(fn, tasks) if pool is not None and len(tasks) > 1 else map(fn, tasks)


def prepare_shards(
    fmt: str | None,
    output: str | os.PathLike,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    shards: str | None = None,
    val_shards: str | None = None,
    annotations: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    coco_dir: str | os.PathLike | None = None,
    keep_restval: bool = False,
    min_word_freq: int | None = 5,
    max_len: int = 50,
    captions_per_image: int | None = 5,
    image_size: int = 256,
    tokenizer: str | None = None,
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
    _stop_after_shards: int | None = None,
) -> dict[str, Any]:
    """Prepare a sharded DATA_DIR (see the module doc) and return its manifest.

    ``fmt="webdataset"`` reads existing img2dataset-style shards (`shards`, a pattern) and writes
    no images for them; any other format (or `records`) is written as new shards of `shard_size`
    train images, the other splits going to the memory-mapped store.
    """
    from seesay.data.formats import FORMATS, Record, read_records, records_fingerprint
    from seesay.data.prepare import FORMAT_VERSION, _check_output, _exclusive, _write_error
    from seesay.data.tokenize import TOKENIZERS

    _webdataset()
    from seesay.data.tasks import default_captions_per_image

    if captions_per_image is None:
        captions_per_image = default_captions_per_image(fmt, task)
    if min_word_freq is None:
        min_word_freq = 5
    if fmt is not None and fmt != "webdataset" and fmt not in FORMATS:
        raise SeesayError(f"unknown format {fmt!r}; choose one of {', '.join((*FORMATS, 'webdataset'))}")
    if tokenizer is None:
        tokenizer = "jieba" if fmt == "aichallenger" else "word"
    if tokenizer not in TOKENIZERS:
        raise SeesayError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZERS)}")
    for name, value, low in (("--max-len", max_len, 1), ("--captions-per-image", captions_per_image, 1),
                             ("--image-size", image_size, 1), ("--min-word-freq", min_word_freq, 0),
                             ("--shard-size", shard_size, 1)):
        if int(value) < low:
            raise SeesayError(f"{name} must be at least {low}, got {value}")
    if not 0.0 <= float(max_skip_fraction) <= 1.0:
        raise SeesayError(f"--max-skip-fraction must be between 0 and 1, got {max_skip_fraction}")
    workers = int(workers) if workers else (os.cpu_count() or 1)
    if workers < 1:
        raise SeesayError(f"--workers must be at least 1, got {workers}")
    out = Path(output)
    partial = out.with_name(out.name + ".partial")
    options: dict[str, Any] = {"format_version": FORMAT_VERSION, "image_size": int(image_size), "max_len": int(max_len),
                               "captions_per_image": int(captions_per_image), "tokenizer": tokenizer,
                               "min_word_freq": int(min_word_freq), "seed": int(seed), "format": "shards"}
    if fmt == "webdataset":
        if not shards:
            raise SeesayError("--format webdataset needs --shards PATTERN (e.g. 'corpus/{00000..00099}.tar')")
        train_urls = expand_shards(shards)
        if val_shards:
            val_urls = expand_shards(val_shards)
        elif len(train_urls) >= 2:
            train_urls, val_urls = train_urls[:-1], train_urls[-1:]
        else:
            raise SeesayError(f"--shards {shards!r} names one shard: give --val-shards, or more shards "
                              "(the last one is held out for validation)")
        train_urls = [u if _is_url(u) else str(Path(u).absolute()) for u in train_urls]
        val_urls = [u if _is_url(u) else str(Path(u).absolute()) for u in val_urls]
        options["source"] = {"format": "webdataset", "shards": train_urls, "val_shards": val_urls}
        fingerprint = hashlib.sha256(_dumps(options).encode("utf-8")).hexdigest()
        recs = None
    else:
        if records is not None:
            recs = [Record.from_any(r) for r in records]
            options["source"] = {"format": fmt or "records"}
        else:
            if fmt is None:
                raise SeesayError("give a format or records")
            annotations, images, coco_dir = (None if v is None else Path(v).absolute()
                                             for v in (annotations, images, coco_dir))
            recs = read_records(fmt, annotations=annotations, images=images, coco_dir=coco_dir,
                                keep_restval=keep_restval, partition=partition, redcaps_text=redcaps_text)
            options["source"] = {"format": fmt, **{k: str(v) for k, v in (("annotations", annotations),
                                 ("images", images), ("coco_dir", coco_dir)) if v is not None}}
            if partition is not None and fmt == "sun397":
                options["source"]["partition"] = int(partition)
            if fmt == "redcaps":
                options["source"]["redcaps_text"] = redcaps_text
        if not recs:
            raise SeesayError("the dataset has no images")
        options["shard_size"] = int(shard_size)
        if allow_outside_images:
            options["allow_outside_images"] = True
        fingerprint = hashlib.sha256((records_fingerprint(recs) + ":" + _dumps(options)).encode("utf-8")).hexdigest()
    from seesay.data.classify_formats import class_labels
    from seesay.data.tasks import manifest_fields

    options.update(manifest_fields(fmt, task, prompt, class_labels(recs) if recs else []))
    try:
        with _exclusive(out):
            done = _check_output(out, fingerprint, overwrite)
            if done is not None:
                log.info("%s is already prepared with these inputs and options", out)
                return done
            _start(partial, fingerprint)
            build = _Build(partial, options, fingerprint, workers=workers, progress=progress,
                           max_skip_fraction=float(max_skip_fraction))
            if recs is None:
                manifest = build.from_webdataset(train_urls, val_urls)
            else:
                manifest = build.from_records(recs, allow_outside=bool(allow_outside_images),
                                              root_flag="--coco-dir" if fmt == "coco" and records is None
                                              else "--images", stop_after=_stop_after_shards)
            from seesay.data.prepare import _publish

            _publish(partial, out)
            return manifest
    except OSError as e:
        raise _write_error(e, partial) from None


def _start(partial: Path, fingerprint: str) -> None:
    plan = partial / "plan.json"
    if partial.exists():
        try:
            old = json.loads(plan.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            old = None
        if old != fingerprint:
            log.info("discarding %s (built from other inputs or options)", partial)
            shutil.rmtree(partial)
        else:
            log.info("resuming %s", partial)
    (partial / "chunks").mkdir(parents=True, exist_ok=True)
    (partial / "shards").mkdir(exist_ok=True)
    if not plan.exists():
        write_text_atomic(plan, _dumps({"fingerprint": fingerprint}))


class _Build:
    """The steps of one sharded preparation inside DATA_DIR.partial."""

    def __init__(self, partial: Path, options: dict[str, Any], fingerprint: str, *, workers: int, progress: bool,
                 max_skip_fraction: float) -> None:
        self.partial, self.options, self.fingerprint = partial, options, fingerprint
        self.workers, self.progress, self.max_skip_fraction = workers, progress, max_skip_fraction
        self.size, self.max_len = options["image_size"], options["max_len"]
        self.cpi, self.seed, self.kind = options["captions_per_image"], options["seed"], options["tokenizer"]
        self.skipped: list[dict[str, Any]] = []
        self.reasons: Counter[str] = Counter()
        self.counts = Counter(long=0, empty=0, no_caption=0)

    def _kept(self, sentences: list[str], blank: int = 0) -> list[list[str]]:
        from seesay.data.tokenize import tokenize

        toks = [tokenize(s, self.kind) for s in sentences]
        self.counts["long"] += sum(len(t) > self.max_len for t in toks)
        self.counts["empty"] += blank + sum(not t for t in toks)
        return [t for t in toks if 1 <= len(t) <= self.max_len]

    def _bad(self, split: str, image_id: str, image: str, reason: str, counted: bool = True, **more: Any) -> None:
        self.skipped.append({"split": split, "image_id": image_id, "image": image, "reason": reason, **more})
        if counted:
            self.reasons[reason.split(" (")[0]] += 1

    def _check_skips(self, total: int) -> None:
        n_bad = sum(self.reasons.values())
        write_text_atomic(self.partial / "skipped.jsonl", "".join(_dumps(x) + "\n" for x in self.skipped))
        if total and n_bad / total > self.max_skip_fraction:
            raise SeesayError(
                f"{n_bad} of {total} images ({100 * n_bad / total:.1f}%) are bad, more than --max-skip-fraction "
                f"{self.max_skip_fraction}; see {self.partial / 'skipped.jsonl'} ("
                + ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) + ")")

    # -- records -> new shards ------------------------------------------------------------------
    def from_records(self, recs: list[Any], *, allow_outside: bool, root_flag: str,
                     stop_after: int | None) -> dict[str, Any]:
        from seesay.data.prepare import SPLIT_ORDER, _select_captions
        from seesay.data.tokenize import build_vocab

        kept = [[] if r.bad is not None else self._kept(r.sentences, r.blank_captions) for r in recs]
        for r in recs:
            if r.bad is not None:  # the reader's bad items (a label naming no class...)
                self._bad(r.split, r.image_id, r.image_path, r.bad)
        splits = sorted({r.split for r in recs},
                        key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))
        members = {s: [i for i, r in enumerate(recs) if r.split == s and kept[i]] for s in splits}
        train = members.get("train", [])
        size = int(self.options["shard_size"])
        tasks, statuses = [], {}
        for k, start in enumerate(range(0, len(train), size)):
            path = self.partial / "shards" / f"train-{k:06d}.tar"
            part = train[start:start + size]
            st = _done(self.partial / "chunks" / f"train-{k:06d}.json", len(part))
            if st is not None and path.is_file():  # a finished shard is kept; a partial one rebuilt
                statuses[k] = st
                continue
            items = []
            for i in part:
                r = recs[i]
                tokens = _select_captions(kept[i], self.cpi, self.seed, "train", r.image_id)
                meta = {"image_id": r.image_id, "split": "train", "image": r.image_path, "captions": r.sentences,
                        "tokens": tokens, "extra": r.extra}
                items.append((f"{i:09d}", r.image_path, None if allow_outside else r.root, root_flag, meta))
            tasks.append((k, str(path), items, self.size))
        from seesay.progress import progress as progress_display

        pool = _pool(self.workers, len(tasks))
        bar = progress_display(len(train), desc="prepare shards", unit="img",
                               initial=sum(len(v) for v in statuses.values()), enabled=self.progress)
        try:
            for n, (k, st) in enumerate(_imap(pool, _write_shard, tasks), 1):
                write_text_atomic(self.partial / "chunks" / f"train-{k:06d}.json", json.dumps(st))
                statuses[k] = st
                bar.update(len(st))
                if stop_after is not None and stop_after <= n < len(tasks):
                    from seesay.data.prepare import PrepareInterrupted

                    raise PrepareInterrupted(f"stopped after {n} shards (testing hook); run again to resume")
        finally:
            bar.close()
            if pool is not None:
                pool.terminate()
                pool.join()
        shard_list, good_train = [], []
        for k, start in enumerate(range(0, len(train), size)):
            part, n_ok = train[start:start + size], 0
            for i, (ok, reason, _wh) in zip(part, statuses[k]):
                if ok:
                    good_train.append(i)
                    n_ok += 1
                else:
                    self._bad("train", recs[i].image_id, recs[i].image_path, reason)
            shard_list.append({"url": f"shards/train-{k:06d}.tar", "samples": n_ok})
        if not good_train:
            raise SeesayError("the dataset has no usable training images (split 'train' is empty)")
        others = {s: members[s] for s in splits if s != "train"}
        stores = self._store_splits(recs, others, kept, allow_outside, root_flag)
        for i, k in enumerate(kept):
            if not k and recs[i].bad is None:
                self.counts["no_caption"] += 1
                self._bad(recs[i].split, recs[i].image_id, recs[i].image_path,
                          f"no caption of 1 to {self.max_len} tokens", counted=False)
        self._check_skips(sum(len(v) for v in members.values()) + sum(r.bad is not None for r in recs))
        vocab = build_vocab((t for i in good_train for t in kept[i]), self.kind, self.options["min_word_freq"])
        vocab.save(self.partial / "vocab.json")
        (self.partial / "train").mkdir(exist_ok=True)
        write_text_atomic(self.partial / "train" / "references.jsonl", "".join(
            _dumps({"image_id": recs[i].image_id, "references": recs[i].sentences}) + "\n" for i in good_train))
        counts = {"train": len(good_train)}
        for s, (rows, orig) in stores.items():
            self._write_store_split(s, recs, rows, kept, orig, vocab)
            counts[s] = len(rows)
        return self._manifest(counts, {"train": shard_list}, len(vocab))

    def _store_splits(self, recs: list[Any], members: dict[str, list[int]], kept: list[list[list[str]]],
                      allow_outside: bool, root_flag: str) -> dict[str, tuple[list[int], dict[int, list[int]]]]:
        """Images of the non-train splits into <split>/images.npy (small: not resumable)."""
        tasks = [(i, recs[i].image_path, self.size, None if allow_outside else recs[i].root, root_flag)
                 for idx in members.values() for i in idx]
        arrays: dict[int, np.ndarray] = {}
        orig: dict[int, list[int]] = {}
        pool = _pool(self.workers, len(tasks))
        try:
            for i, arr, reason, wh in _imap(pool, _read_split_image, tasks):
                if arr is None:
                    self._bad(recs[i].split, recs[i].image_id, recs[i].image_path, reason)
                else:
                    arrays[i], orig[i] = arr, wh
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        out = {}
        for s, idx in members.items():
            rows = [i for i in idx if i in arrays]
            (self.partial / s).mkdir(exist_ok=True)
            stack = np.zeros((len(rows), self.size, self.size, 3), np.uint8)
            for n, i in enumerate(rows):
                stack[n] = arrays.pop(i)
            np.save(self.partial / s / "images.npy", stack)
            out[s] = (rows, orig)
        return out

    def _write_store_split(self, split: str, recs: list[Any], rows: list[int], kept: list[list[list[str]]],
                           orig: dict[int, list[int]], vocab: Any) -> None:
        from seesay.data.prepare import _write_split

        _write_split(self.partial, split, recs, rows, kept, orig, vocab, captions_per_image=self.cpi,
                     max_len=self.max_len, seed=self.seed)

    def _manifest(self, counts: dict[str, int], shard_lists: dict[str, list[dict[str, Any]]],
                  vocab_size: int) -> dict[str, Any]:
        manifest = {
            **self.options,
            "splits": {s: {"images": n, "captions": n * self.cpi, **({"shards": len(shard_lists[s])}
                                                                       if s in shard_lists else {})}
                       for s, n in counts.items()},
            "shards": shard_lists,
            "caption_length": self.max_len + 2,
            "vocab_size": vocab_size,
            "skipped": sum(self.reasons.values()),
            "skipped_reasons": dict(sorted(self.reasons.items())),
            "no_caption_images": self.counts["no_caption"],
            "dropped_captions": self.counts["long"] + self.counts["empty"],
            "long_captions": self.counts["long"],
            "empty_captions": self.counts["empty"],
            "fingerprint": self.fingerprint,
        }
        write_text_atomic(self.partial / "manifest.json", json.dumps(manifest, ensure_ascii=False, sort_keys=True,
                                                                     indent=1) + "\n")
        return manifest

    # -- existing img2dataset shards ------------------------------------------------------------------
    def from_webdataset(self, train_urls: list[str], val_urls: list[str]) -> dict[str, Any]:
        from seesay.data.formats import Record
        from seesay.data.tokenize import build_vocab

        tasks = [(k, u, None) for k, u in enumerate(train_urls)] + \
                [(len(train_urls) + k, u, self.size) for k, u in enumerate(val_urls)]
        results: dict[int, tuple] = {}
        pool = _pool(self.workers, len(tasks))
        try:
            for k, samples, errors in _imap(pool, _scan_shard, tasks):
                results[k] = (samples, errors)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        shard_list, train_good, vocab_tokens, total = [], [], [], 0
        val_recs, val_kept, val_orig, val_images = [], [], {}, []
        for k, url in enumerate(train_urls + val_urls):
            samples, errors = results[k]
            split = "train" if k < len(train_urls) else "val"
            for e in errors:  # the tar broke part-way: what follows in it is lost
                self._bad(split, "", url, f"corrupt shard ({e})", shard=url)
            n_ok = 0
            for key, caps, reason, wh, arr in samples:
                total += 1
                if reason is not None:
                    self._bad(split, key, url, reason, shard=url, key=key)
                    continue
                kept = self._kept(caps)
                if not kept:
                    self.counts["no_caption"] += 1
                    self._bad(split, key, url, f"no caption of 1 to {self.max_len} tokens", counted=False,
                              shard=url, key=key)
                    continue
                if split == "train":
                    n_ok += 1
                    train_good.append({"image_id": key, "references": caps})
                    vocab_tokens.extend(kept)
                else:
                    val_orig[len(val_recs)] = wh
                    val_recs.append(Record(f"{url}#{key}", key, "val", caps))
                    val_kept.append(kept)
                    val_images.append(arr)
            if split == "train":
                shard_list.append({"url": url, "samples": n_ok})
        self._check_skips(total)
        if not train_good:
            raise SeesayError("the shards hold no usable training samples (an image and a caption each)")
        if not val_recs:
            raise SeesayError(f"the validation shards ({', '.join(val_urls)}) hold no usable samples")
        vocab = build_vocab(vocab_tokens, self.kind, self.options["min_word_freq"])
        vocab.save(self.partial / "vocab.json")
        (self.partial / "train").mkdir(exist_ok=True)
        write_text_atomic(self.partial / "train" / "references.jsonl",
                          "".join(_dumps(x) + "\n" for x in train_good))
        (self.partial / "val").mkdir(exist_ok=True)
        np.save(self.partial / "val" / "images.npy", np.stack(val_images))
        self._write_store_split("val", val_recs, list(range(len(val_recs))), val_kept, val_orig, vocab)
        return self._manifest({"train": len(train_good), "val": len(val_recs)}, {"train": shard_list}, len(vocab))


def _scan_shard(task: tuple) -> tuple[int, list, list[str]]:
    """One existing shard (a pool task): [(key, captions, reason or None, [w, h], image or None)] and
    the tar-level errors. Every image is decoded once to find the corrupt ones; `size` keeps the
    resized image (validation shards, which go to the store)."""
    from seesay.data.images import read_image

    k, url, size = task
    errors: list[str] = []
    out = []
    for s in iter_shard(url, errors=errors):
        key = str(s.get("__key__"))
        caps = sample_captions(s)
        img = _image_bytes(s)
        reason, wh, arr = None, None, None
        if img is None:
            reason = "no image (no .jpg/.jpeg/.png/.webp member)"
        else:
            try:
                a, wh = read_image(img[1], size, name=key)
                wh = list(wh)
                arr = a if size is not None else None
            except SeesayError as e:
                msg = str(e)
                reason = msg[len(key) + 2:] if msg.startswith(f"{key}: ") else msg
            except Exception as e:  # noqa: BLE001
                reason = f"broken image ({type(e).__name__}: {str(e)[:100]})"
        out.append((key, caps, reason, wh, arr))
    return k, out, errors


def _done(marker: Path, n: int) -> list | None:
    try:
        st = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return st if isinstance(st, list) and len(st) == n else None


# -- training: the stream ---------------------------------------------------------------------------
