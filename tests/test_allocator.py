"""seesay.allocator: glibc keeps the memory a step frees for the next step (the command line sets it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from seesay import allocator, cli

# In a fresh interpreter (no torch): set the thresholds or not, then malloc, touch and free 24 MiB
# (above glibc's first mmap threshold of 128 KiB, below the 32 MiB set) and report where it lived.
PROBE = """
import ctypes, json
from seesay.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
kept = keep_freed_memory()
size = 24 << 20
before = libc.mallinfo2()
p = libc.malloc(size)
ctypes.memset(p, 1, size)
during = libc.mallinfo2()
libc.free(p)
after = libc.mallinfo2()
print(json.dumps({"kept": kept, "mapped": during.hblkhd - before.hblkhd, "free_after": after.fordblks, "size": size}))
"""

glibc_only = pytest.mark.skipif(allocator._glibc() is None or not hasattr(allocator._glibc(), "mallinfo2"),
                                reason="needs glibc >= 2.33 (mallinfo2)")


def _probe(**env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in (allocator.ENV, "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**clean, **env}).stdout
    return json.loads(out)


@glibc_only
def test_freed_tensor_sized_blocks_stay_in_the_heap():
    r = _probe()
    assert r["kept"] is True
    assert r["mapped"] == 0  # served from the heap, not a fresh mapping
    assert r["free_after"] >= r["size"]  # freed, and kept for the next allocation (not trimmed)


@glibc_only
def test_glibc_defaults_map_and_return_the_same_block():
    """What the setting changes: by default the block is its own mapping, unmapped when freed."""
    r = _probe(**{allocator.ENV: "0"})
    assert r["kept"] is False
    assert r["mapped"] >= r["size"]
    assert r["free_after"] < r["size"]


@glibc_only
@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_the_users_own_malloc_settings_win(env):
    r = _probe(**env)
    assert r["kept"] is False
    assert r["mapped"] >= r["size"]


def test_elsewhere_than_glibc_it_does_nothing(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    for k in allocator.USER_SETTINGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator._glibc() is None
    assert allocator.keep_freed_memory() is False


def test_the_command_line_sets_it_before_running_a_verb(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["caption", str(tmp_path / "missing.jpg"), "--checkpoint", str(tmp_path / "no_model")]) == 2
    assert calls == [1]
    calls.clear()
    cli.main([])  # no verb: help only
    assert calls == []
