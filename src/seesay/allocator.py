"""glibc's malloc set for tensor work: memory a step frees stays in the process for the next step.

Training and decoding steps allocate and free the same large tensors at every step (logits
over the vocabulary, the attention's sums, gradients). glibc's defaults give such memory back
to the kernel when it is freed: blocks above the mmap threshold (128 KiB at first, adjusted
upward as blocks are freed) through `munmap`, and the heap's free top above the trim threshold.
The next step's tensors are then fresh pages, which the kernel maps and zero-fills one page
fault at a time. At the tutorial's sizes (2 threads) keeping them made batched beam 5 over 100
images 1.14x faster and the Transformer's greedy decoding 1.28x (medians, page faults near
zero); training steps changed less than their run-to-run spread (`benchmarks/allocator.py`,
docs/performance.md).

`keep_freed_memory()` sets both thresholds to 1 GiB, as `MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=1073741824` in the environment would: blocks up to 1 GiB come from the heap
and are reused, and up to 1 GiB of free heap is kept. (glibc versions that cap the mmap threshold
at 32 MiB get that.) The cost: memory freed after a peak is kept for reuse rather than returned
to the system, so the process's resident size stays near its peak.

The command line (`seesay ...`) calls it at start; importing seesay never touches the
allocator, so Python programs call it themselves if they want it. It does nothing where the C
library is not glibc, where the environment already sets these thresholds (`MALLOC_*_`,
`GLIBC_TUNABLES`), or with SEESAY_KEEP_FREED_MEMORY=0.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

ENV = "SEESAY_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # the second where glibc caps it (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no such function)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (module docstring); True if this call set them."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(k in os.environ for k in USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False  # the user's own settings win
    libc = _glibc()
    if libc is None:
        return False
    ok = any(libc.mallopt(M_MMAP_THRESHOLD, t) for t in MMAP_THRESHOLDS) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                               TRIM_THRESHOLD))
    if not ok:
        log.debug("mallopt refused the thresholds; glibc's defaults stay")
    return ok
