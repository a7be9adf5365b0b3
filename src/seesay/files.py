"""Atomic file writes: a reader (or a crash) never sees a half-written file.

Every file seesay writes for users or for itself to resume from goes through here: the text is
written to a temporary file in the same directory, then renamed over the target. Outputs are
checked before the work that fills them (`check_output`), and when a write still fails at the
end the result is kept in the system's temporary folder (`write_json_or_keep`) and the one-line
error says where.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from seesay.errors import SeesayError

log = logging.getLogger(__name__)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, creating its folder when missing."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return p


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """`json.dumps(obj, **dumps_kwargs)` plus a newline, written atomically."""
    return write_text_atomic(path, json.dumps(obj, **dumps_kwargs) + "\n")


# ---- outputs: checked before the work, never lost after it ------------------------------------


def check_output(path: str | Path, flag: str = "--output") -> Path:
    """One line now, not an error after the work: `path` must be a file that can be created or
    replaced (not a directory, not below a file, in a folder that takes new files). Missing
    folders are fine (the atomic writers create them) when their nearest existing parent is writable."""
    p = Path(path)
    if p.is_dir():
        raise SeesayError(f"{flag} {p}: is a directory, not a file")
    folder = p.parent
    while not folder.exists() and folder.parent != folder:  # the nearest folder that exists
        folder = folder.parent
    if not folder.is_dir():
        raise SeesayError(f"{flag} {p}: {folder} is a file, not a folder")
    if folder == p.parent:  # try it: permissions, read-only file systems and quotas all show here
        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{p.name}.", suffix=".probe")
        except OSError as e:
            raise SeesayError(f"{flag} {p}: cannot write in {folder} ({e.strerror or e})") from None
        os.close(fd)
        os.remove(probe)
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise SeesayError(f"{flag} {p}: cannot create folders in {folder} (permission denied)")
    return p


def check_output_dir(path: str | Path, flag: str = "--output") -> Path:
    """`check_output` for a folder to create or reuse (a run directory): not a file, not below a
    file, and its nearest existing folder writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SeesayError(f"{flag} {p}: is a file, not a folder")
    folder = p
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        raise SeesayError(f"{flag} {p}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SeesayError(f"{flag} {p}: cannot write in {folder} (permission denied)")
    return p


def check_outputs(outputs: Mapping[str, str | Path | None]) -> None:
    """`check_output` for each {flag: path} given, and no two flags naming the same file."""
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if not path:
            continue
        p = check_output(path, flag)
        key = Path(os.path.abspath(p))
        if key in seen:
            raise SeesayError(f"{flag} {p}: the same file as {seen[key]} (one would overwrite the other)")
        seen[key] = flag


def keep_in_temp(obj: Any, name: str) -> Path:
    """Write `obj` as JSON to a new file in the system temp folder (atomically); return its path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(tempfile.gettempdir()) / f"seesay-{name}-{stamp}-{os.getpid()}.json"
    return write_json_atomic(path, obj, indent=1, ensure_ascii=False)


def write_json_or_keep(path: str | Path, obj: Any, *, keep: Any, what: str, safe_in: str | Path | None = None,
                       **dumps_kwargs: Any) -> Path:
    """`write_json_atomic(path, obj)`; when that fails at the end of a long job (disk full, the
    folder gone), the work is not lost: `keep` (`what`, e.g. "the captions") is saved to the temp
    folder first, unless it is already safe in `safe_in`, and the one-line error says where."""
    try:
        return write_json_atomic(path, obj, **dumps_kwargs)
    except OSError as e:
        reason = e.strerror or str(e)
    if safe_in is not None:
        raise SeesayError(f"{path}: cannot write ({reason}); {what} are in {safe_in}")
    try:
        kept = keep_in_temp(keep, what.split()[-1])
    except OSError as e:
        raise SeesayError(f"{path}: cannot write ({reason}), and {what} could not be kept in "
                          f"{tempfile.gettempdir()} either ({e.strerror or e})") from None
    raise SeesayError(f"{path}: cannot write ({reason}); {what} were saved to {kept}")
