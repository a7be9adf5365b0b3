"""Downloading public captioning datasets: `seesay download coco|flickr8k|flickr30k|aichallenger`.

Only the standard library talks HTTP (urllib), so there is no extra dependency.

URLs
    Only http and https URLs are fetched (built-in lists, `--manifest` entries, `--mirror`);
    `file://`, `ftp://` and any other scheme are refused with one line naming the manifest
    entry, since urllib would otherwise copy any local file (`file:///etc/passwd`) into the
    output directory. `allow_file_urls` (`--allow-file-urls`) lets `file://` URLs through, for a
    local copy of the archives; other schemes stay refused.

Downloads
    Each file is written to `NAME.part` beside its final name and renamed only once it is
    complete and verified (size, and MD5 where known). An interrupted download — a dropped
    connection or a killed process — resumes from the bytes already in `NAME.part` with an
    HTTP `Range` request (a server that ignores Range is handled by starting over).
    Transient failures (connection errors, timeouts, HTTP 408/425/429/5xx) are retried with
    exponential backoff (`retry_delay * 2**k`, capped at 60 s); the retry count starts over
    whenever an attempt made progress, so a flaky but working server always finishes. After
    `retries` failures in a row the command stops with one line naming the URL and the last
    error, keeping the partial file for the next run. A verified file gets a small marker in
    `OUTPUT/.seesay-download/` recording its size and mtime, so a second run skips it
    without hashing it again.

Extraction (`extract=True`)
    Each archive (zip or tar, optionally compressed) is checked first: every member must
    land inside the output directory — absolute paths, `..` components, symlinks, hard links
    and device files are refused before anything is written — and its data must be intact
    (zip CRCs via `testzip`, tar by reading every member). Members are written to a temp
    name and renamed, and a member already present with the right size is skipped, so an
    interrupted extraction resumes. A marker per archive makes a re-run skip it, including
    its download when the archive was deleted after extraction (the default unless
    `keep_archives`).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import socket
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from seesay.errors import SeesayError
from seesay.files import write_json_atomic
from seesay.progress import progress as progress_display

log = logging.getLogger(__name__)

STATE_DIR = ".seesay-download"
_CHUNK = 1 << 20
_MAX_DELAY = 60.0
_RETRY_CODES = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RemoteFile:
    """A file to download: saved under its URL's base name; size/md5 checked when known."""

    url: str
    size: int | None = None
    md5: str | None = None

    @property
    def name(self) -> str:
        return posixpath.basename(urllib.parse.urlsplit(self.url).path)


# Sizes: HTTP Content-Length reported by images.cocodataset.org (as logged by wget in public
# notebooks); MD5s: published in public download scripts (the annotations' MD5 equals the S3
# ETag). caption_datasets.zip and the Flickr8k zip: unknown, so only completeness is checked.
COCO_BASE = "http://images.cocodataset.org"
COCO_IMAGES: dict[str, RemoteFile] = {
    "train2014": RemoteFile(
        f"{COCO_BASE}/zips/train2014.zip", 13510573713, "0da8c0bd3d6becc4dcb32757491aca88"
    ),
    "val2014": RemoteFile(f"{COCO_BASE}/zips/val2014.zip", 6645013297, "a3d79f5ed8d289b7a7554ce06a5782b3"),
    "test2014": RemoteFile(f"{COCO_BASE}/zips/test2014.zip", 6660437059, "04127eef689ceac55e3a572c2c92f264"),
}
COCO_ANNOTATIONS = RemoteFile(
    f"{COCO_BASE}/annotations/annotations_trainval2014.zip", 252872794, "0a379cfc70b0e71301e0f377548639bd"
)
KARPATHY_SPLITS = RemoteFile("https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip")
FLICKR8K_IMAGES = RemoteFile(
    "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip"
)
DEFAULT_COCO_SPLITS = ("train2014", "val2014")
DATASETS = ("coco", "flickr8k", "flickr30k", "aichallenger")


class _Transient(Exception):
    """A failure worth retrying (connection dropped, timeout, 5xx)."""


# ----------------------------------------------------------------------------- file lists


def coco_files(splits: Iterable[str] = DEFAULT_COCO_SPLITS) -> list[RemoteFile]:
    """COCO 2014 image zips for `splits`, the caption annotations and Karpathy's split file."""
    files = []
    for s in splits:
        if s not in COCO_IMAGES:
            raise SeesayError(f"unknown COCO split {s!r}; choose from {', '.join(COCO_IMAGES)}")
        files.append(COCO_IMAGES[s])
    return [*files, COCO_ANNOTATIONS, KARPATHY_SPLITS]


def dataset_files(name: str, splits: Iterable[str] | None = None) -> list[RemoteFile]:
    if name == "coco":
        return coco_files(splits or DEFAULT_COCO_SPLITS)
    if name == "flickr8k":
        return [KARPATHY_SPLITS, FLICKR8K_IMAGES]
    if name == "flickr30k":
        return [KARPATHY_SPLITS]
    if name == "aichallenger":
        return []
    raise SeesayError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def check_url(url: str, where: str, *, allow_file_urls: bool = False) -> None:
    """Refuse a URL whose scheme is not http(s) (or file, with `allow_file_urls`)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    allowed = ("http", "https", "file") if allow_file_urls else ("http", "https")
    if scheme in allowed:
        return
    shown = f"{scheme}://" if scheme else "no scheme"
    hint = "; --allow-file-urls lets file:// URLs through" if scheme == "file" else ""
    raise SeesayError(f"{where}: refusing URL {url!r} ({shown}): only http:// and https:// URLs are "
                      f"downloaded{hint}")


def with_mirror(files: Sequence[RemoteFile], mirror: str | None) -> list[RemoteFile]:
    """Replace each URL's base (everything before the file name) with `mirror`."""
    if not mirror:
        return list(files)
    base = mirror.rstrip("/")
    return [RemoteFile(f"{base}/{f.name}", f.size, f.md5) for f in files]


def load_manifest(path: str | os.PathLike, *, allow_file_urls: bool = False) -> list[RemoteFile]:
    """Read a manifest: a JSON list of {"url": str, "size": int|null, "md5": str|null} (http(s) URLs;
    file:// too with `allow_file_urls`)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SeesayError(f"{p}: manifest not found") from None
    except json.JSONDecodeError as e:
        raise SeesayError(f"{p}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SeesayError(f"{p}: cannot read manifest: {e}") from None
    if not isinstance(data, list):
        raise SeesayError(f"{p}: a manifest is a JSON list of {{'url', 'size', 'md5'}} objects")
    files, names = [], set()
    for i, item in enumerate(data):
        where = f"{p}: entry {i}"
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            raise SeesayError(f"{where}: needs a string 'url'")
        check_url(item["url"], where, allow_file_urls=allow_file_urls)
        size, md5 = item.get("size"), item.get("md5")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise SeesayError(f"{where}: 'size' must be a non-negative integer or null")
        if md5 is not None and (not isinstance(md5, str) or not re.fullmatch(r"[0-9a-fA-F]{32}", md5)):
            raise SeesayError(f"{where}: 'md5' must be 32 hex digits or null")
        f = RemoteFile(item["url"], size, md5.lower() if md5 else None)
        if not f.name or f.name in (".", "..") or not re.fullmatch(r"[\w.+-]+", f.name):
            raise SeesayError(f"{where}: cannot use {f.name!r} (from the URL) as a file name")
        if f.name in names:
            raise SeesayError(f"{where}: two entries save to the same name {f.name!r}")
        names.add(f.name)
        files.append(f)
    return files


# ----------------------------------------------------------------------------- helpers


def _state_dir(output: Path) -> Path:
    d = output / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    write_json_atomic(path, data, sort_keys=True)


def md5_of(path: Path, *, progress: bool = False) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with _bar(path.stat().st_size, f"md5 {path.name}", progress) as bar, open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _bar(total: int | None, desc: str, progress: bool, initial: int = 0):
    """Bytes progress: a bar on a terminal, periodic log lines otherwise (`seesay.progress`)."""
    bar = progress_display(total, desc=desc, unit="B", initial=initial, enabled=progress, leave=True)
    if hasattr(bar, "unit_scale"):  # a tqdm bar: KiB/MiB rather than raw byte counts
        bar.unit_scale, bar.unit_divisor = True, 1024
    return bar


def _human(n: int | None) -> str:
    if n is None:
        return "unknown size"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _verify(path: Path, f: RemoteFile, progress: bool) -> str | None:
    """None when `path` matches the known size/md5, else the reason it does not."""
    size = path.stat().st_size
    if f.size is not None and size != f.size:
        return f"size {size} bytes, expected {f.size}"
    if f.md5 is not None:
        got = md5_of(path, progress=progress)
        if got != f.md5:
            return f"md5 {got}, expected {f.md5}"
    return None


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ----------------------------------------------------------------------------- download


def fetch(
    f: RemoteFile,
    output: str | os.PathLike,
    *,
    retries: int = 5,
    retry_delay: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
    allow_file_urls: bool = False,
) -> Path:
    """Download `f` into `output` (resuming, retrying, verifying); return the final path.

    Only http(s) URLs (and file:// with `allow_file_urls`) are fetched."""
    check_url(f.url, f.name or f.url, allow_file_urls=allow_file_urls)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f.name
    marker = _state_dir(out) / f"{f.name}.done"
    part = out / f"{f.name}.part"

    if dest.exists():
        done = _read_json(marker)
        if done is not None and done.get("stamp") == _stamp(dest) and done.get("url_md5") == f.md5:
            log.info("%s: already downloaded", dest)
            return dest
        reason = _verify(dest, f, progress)
        if reason is None:
            _write_json(marker, {"stamp": _stamp(dest), "url_md5": f.md5, "url": f.url})
            log.info("%s: already present and verified", dest)
            return dest
        if f.size is not None and dest.stat().st_size < f.size and not part.exists():
            log.warning("%s: incomplete (%s); resuming it", dest, reason)
            os.replace(dest, part)
        else:
            log.warning("%s: does not match (%s); downloading it again", dest, reason)
            dest.unlink()
    marker.unlink(missing_ok=True)

    failures = 0  # consecutive attempts without progress
    mismatches = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            _attempt(f, part, timeout=timeout, progress=progress)
        except _Transient as e:
            after = part.stat().st_size if part.exists() else 0
            failures = 0 if after > before else failures + 1
            if failures > retries:
                kept = f"; {_human(after)} kept in {part}, run again to resume" if after else ""
                raise SeesayError(
                    f"{f.url}: giving up after {retries + 1} failed attempts in a row: {e}{kept}"
                ) from None
            delay = min(_MAX_DELAY, retry_delay * 2 ** max(0, failures - 1))
            log.warning("%s: %s; retrying in %.1fs", f.name, e, delay)
            time.sleep(delay)
            continue
        reason = _verify(part, f, progress)
        if reason is None:
            break
        part.unlink()
        mismatches += 1
        if mismatches >= 2:
            raise SeesayError(f"{f.url}: downloaded file is corrupt ({reason}) twice; not saved")
        log.warning("%s: downloaded file is corrupt (%s); downloading it again", f.name, reason)
    os.replace(part, dest)
    _write_json(marker, {"stamp": _stamp(dest), "url_md5": f.md5, "url": f.url})
    return dest


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(start, total) from 'bytes START-END/TOTAL' or 'bytes */TOTAL'."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _attempt(f: RemoteFile, part: Path, *, timeout: float, progress: bool) -> None:
    """One HTTP request appending to `part`; raises _Transient or SeesayError."""
    offset = part.stat().st_size if part.exists() else 0
    if f.size is not None and offset > f.size:
        part.unlink()
        offset = 0
    if f.size is not None and offset == f.size:
        return  # complete already; the caller verifies it
    from seesay import __version__

    headers = {"User-Agent": f"seesay/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(f.url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            _, total = _content_range(e.headers.get("Content-Range"))
            if total is not None and total == offset:
                return  # the .part is complete
            part.unlink()
            raise _Transient(f"server refused to resume at byte {offset} (HTTP 416); starting over") from None
        if e.code in _RETRY_CODES or e.code >= 500:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise SeesayError(f"{f.url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise _Transient(f"timed out after {timeout:g}s") from None
        raise _Transient(f"cannot connect: {reason}") from None
    except (OSError, http.client.HTTPException) as e:
        raise _Transient(f"{type(e).__name__}: {e}") from None

    with resp:
        status = getattr(resp, "status", None) or 200
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if offset and status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Transient(f"server resumed at byte {start}, not {offset}; starting over")
            mode = "ab"
        else:
            if offset:
                log.info("%s: server ignored the range request; starting over", f.name)
            offset, mode = 0, "wb"
            total = length
        if total is None and length is not None:
            total = offset + length
        if f.size is not None and total is not None and total != f.size:
            raise SeesayError(
                f"{f.url}: server reports {total} bytes, expected {f.size}; the file differs from the "
                "known one (wrong mirror?)"
            )
        got = offset
        try:
            with open(part, mode) as out, _bar(total or f.size, f.name, progress, initial=offset) as bar:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, OSError) and e.errno is not None and e.errno == errno.ENOSPC:
                raise SeesayError(f"{part}: disk full") from None
            raise _Transient(f"connection lost after {_human(got)}: {type(e).__name__}: {e}") from None
        if total is not None and got < total:
            raise _Transient(f"connection closed after {got} of {total} bytes")


# ----------------------------------------------------------------------------- extraction


def _archive_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if re.search(r"\.(tar|tgz|tbz2?|txz|tar\.(gz|bz2|xz))$", name):
        return "tar"
    return None


def _check_member(archive: Path, name: str, root: Path, *, link: bool = False, special: bool = False) -> Path:
    """The member's target path, or SeesayError when it would land outside `root`."""

    def refuse(why: str) -> SeesayError:
        return SeesayError(f"{archive}: refusing unsafe member {name!r} ({why}); nothing was extracted")

    if link:
        raise refuse("links are not extracted")
    if special:
        raise refuse("not a regular file or directory")
    if not name or "\x00" in name:
        raise refuse("empty or invalid name")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise refuse("absolute path")
    parts = re.split(r"[\\/]+", name)
    if ".." in parts:
        raise refuse("'..' in path")
    target = (root / name).resolve()
    if target != root and root not in target.parents:
        raise refuse("resolves outside the output directory")
    return target


def _write_member(src, target: Path, size: int | None) -> None:
    """Copy `src` to `target` via a temp name; skip when already there with the right size."""
    if size is not None and target.is_file() and target.stat().st_size == size:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".seesay-part")
    with open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)
    os.replace(tmp, target)


def _corrupt(archive: Path, why: str) -> SeesayError:
    return SeesayError(f"{archive}: archive is corrupt ({why}); delete it and run again to download it anew")


def _count(items: list, desc: str, progress: bool):
    """Iterate `items` with a per-item progress display (bar or periodic log lines)."""
    with progress_display(len(items), desc=desc, unit="file", enabled=progress) as bar:
        for item in items:
            yield item
            bar.update(1)


def extract_archive(archive: str | os.PathLike, output: str | os.PathLike, *, progress: bool = True) -> bool:
    """Safely extract a zip/tar archive into `output`; False when already extracted earlier."""
    archive, out = Path(archive), Path(output)
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    marker = _state_dir(out) / f"{archive.name}.extracted"
    if marker.exists():
        return False
    kind = _archive_kind(archive)
    if kind is None:
        raise SeesayError(f"{archive}: not a zip or tar archive (by its name)")
    n = 0
    if kind == "zip":
        try:
            zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise _corrupt(archive, f"not a readable zip: {e}") from None
        with zf:
            infos = zf.infolist()
            targets = []
            for info in infos:
                mode = info.external_attr >> 16
                targets.append(
                    _check_member(
                        archive,
                        info.filename,
                        root,
                        link=stat.S_ISLNK(mode),
                        special=stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR),
                    )
                )
            log.info("%s: checking %d members", archive.name, len(infos))
            try:
                bad = zf.testzip()
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, ValueError) as e:
                raise _corrupt(archive, str(e)) from None
            if bad is not None:
                raise _corrupt(archive, f"bad CRC in member {bad!r}")
            for info, target in _count(list(zip(infos, targets)), f"extract {archive.name}", progress):
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                try:
                    with zf.open(info) as src:
                        _write_member(src, target, info.file_size)
                except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                    raise _corrupt(archive, f"{info.filename}: {e}") from None
                n += 1
    else:
        try:
            with tarfile.open(archive, "r:*") as tf:
                members = tf.getmembers()
                targets = [
                    _check_member(
                        archive,
                        m.name,
                        root,
                        link=m.issym() or m.islnk(),
                        special=not (m.isfile() or m.isdir()),
                    )
                    for m in members
                ]
                log.info("%s: checking %d members", archive.name, len(members))
                for m in members:  # read all data once: truncation and CRC errors show here
                    if m.isfile():
                        src = tf.extractfile(m)
                        while src.read(_CHUNK):
                            pass
                for m, target in _count(list(zip(members, targets)), f"extract {archive.name}", progress):
                    if m.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    _write_member(tf.extractfile(m), target, m.size)
                    n += 1
        except (tarfile.TarError, zlib.error, EOFError, OSError) as e:
            if isinstance(e, OSError) and getattr(e, "errno", None) == errno.ENOSPC:
                raise SeesayError(f"{out}: disk full while extracting {archive.name}") from None
            raise _corrupt(archive, f"{type(e).__name__}: {e}") from None
    _write_json(marker, {"archive": archive.name, "size": archive.stat().st_size, "files": n})
    return True


# ----------------------------------------------------------------------------- datasets


_KARPATHY_JSONS = ("dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json")


def _lift_karpathy_jsons(out: Path) -> None:
    """Karpathy's zip may hold its JSONs in a subfolder: move them to the top of `out`."""
    for name in _KARPATHY_JSONS:
        if (out / name).exists():
            continue
        found = sorted(p for p in out.rglob(name) if STATE_DIR not in p.parts)
        if found:
            os.replace(found[0], out / name)


def aichallenger_instructions(output: str | os.PathLike = "data/aichallenger") -> str:
    out = Path(output)
    return (
        "AI Challenger 2017 image captioning (Chinese) cannot be downloaded automatically: it needs a\n"
        "registration and its original site (challenger.ai) is offline. Get the two archives\n"
        "  ai_challenger_caption_train_20170902.zip\n"
        "  ai_challenger_caption_validation_20170910.zip\n"
        "from the organisers or a copy your institution keeps, unzip them and lay them out as:\n"
        f"  {out}/ai_challenger_caption_train_20170902/caption_train_annotations_20170902.json\n"
        f"  {out}/ai_challenger_caption_train_20170902/caption_train_images_20170902/*.jpg\n"
        f"  {out}/ai_challenger_caption_validation_20170910/caption_validation_annotations_20170910.json\n"
        f"  {out}/ai_challenger_caption_validation_20170910/caption_validation_images_20170910/*.jpg\n"
        "then prepare it (jieba segmentation: pip install 'seesay[zh]'):\n"
        "  seesay prepare --format aichallenger \\\n"
        f"    --annotations {out}/ai_challenger_caption_train_20170902/caption_train_annotations_20170902.json \\\n"
        f"    --images {out}/ai_challenger_caption_train_20170902/caption_train_images_20170902 \\\n"
        "    --output data/aichallenger_prepared"
    )


def _next_steps(name: str, out: Path, extracted: bool) -> str:
    if not extracted:
        return f"archives are in {out}; run again with --extract to unpack them"
    if name == "coco":
        need = [
            out / "annotations" / "captions_train2014.json",
            out / "annotations" / "captions_val2014.json",
            out / "train2014",
            out / "val2014",
            out / "dataset_coco.json",
        ]
        missing = [str(p) for p in need if not p.exists()]
        if missing:
            return "layout incomplete, missing: " + ", ".join(missing)
        return f"ready: seesay prepare --format coco --coco-dir {out} --output data/coco_prepared"
    if name == "flickr8k":
        images = out / "Flicker8k_Dataset"  # the zip's own (misspelt) folder name
        if not images.exists():
            images = out / "Flickr8k_Dataset"
        return (
            f"ready: seesay prepare --format karpathy --annotations {out / 'dataset_flickr8k.json'} "
            f"--images {images} --output data/flickr8k_prepared"
        )
    if name == "flickr30k":
        return (
            "Karpathy's split is in "
            f"{out / 'dataset_flickr30k.json'}. The Flickr30k images need a request form "
            "(https://shannon.cs.illinois.edu/DenotationGraph/); unpack them into "
            f"{out / 'flickr30k-images'}/ and run: seesay prepare --format karpathy --annotations "
            f"{out / 'dataset_flickr30k.json'} --images {out / 'flickr30k-images'} --output data/flickr30k_prepared"
        )
    return f"files are in {out}"


def download_dataset(
    name: str,
    output: str | os.PathLike,
    *,
    splits: Iterable[str] | None = None,
    extract: bool = False,
    keep_archives: bool = False,
    mirror: str | None = None,
    manifest: str | os.PathLike | None = None,
    retries: int = 5,
    retry_delay: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
    allow_file_urls: bool = False,
) -> str:
    """Download (and with `extract`, unpack) dataset `name` into `output`; return a summary.

    `manifest` replaces the built-in file list; `mirror` replaces each URL's base. Only http(s)
    URLs are fetched unless `allow_file_urls` (then file:// too); others are refused up front.
    """
    out = Path(output)
    if name == "aichallenger" and manifest is None:
        return aichallenger_instructions(out)
    if mirror:
        check_url(mirror, "--mirror", allow_file_urls=allow_file_urls)
    # with a mirror, the manifest's own URLs only name the files (fetch checks the mirror's URLs)
    files = (load_manifest(manifest, allow_file_urls=allow_file_urls or bool(mirror)) if manifest is not None
             else dataset_files(name, splits))
    files = with_mirror(files, mirror)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SeesayError(f"{out}: cannot create output directory: {e.strerror or e}") from None
    state = _state_dir(out)

    # an archive extracted by an earlier run counts as done, even when it was then deleted
    pending = [
        f
        for f in files
        if not (state / f"{f.name}.extracted").exists() and not (state / f"{f.name}.done").exists()
    ]
    need = sum(f.size or 0 for f in pending) * (2 if extract else 1)
    free = shutil.disk_usage(out).free
    if need > free:
        log.warning(
            "%s has %s free; these downloads%s need about %s",
            out,
            _human(free),
            " and their extraction" if extract else "",
            _human(need),
        )

    lines = []
    for f in files:
        if (state / f"{f.name}.extracted").exists() and (extract or not (out / f.name).exists()):
            lines.append(f"{f.name}: already extracted")
            continue
        path = fetch(f, out, retries=retries, retry_delay=retry_delay, timeout=timeout, progress=progress,
                     allow_file_urls=allow_file_urls)
        if extract and _archive_kind(path) is not None:
            extract_archive(path, out, progress=progress)
            if not keep_archives:
                path.unlink()
                (state / f"{f.name}.done").unlink(missing_ok=True)
            lines.append(f"{f.name}: downloaded and extracted")
        else:
            lines.append(f"{f.name}: downloaded ({_human(path.stat().st_size)})")
    if extract:
        _lift_karpathy_jsons(out)
    lines.append(_next_steps(name, out, extract))
    return "\n".join(lines)
