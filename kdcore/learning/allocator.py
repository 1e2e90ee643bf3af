"""Keep glibc from handing freed tensor memory back to the OS between training steps.

glibc serves blocks above its mmap threshold (128 KiB at start, then adapting) with fresh
mappings and returns freed memory at the top of the heap once more than twice that is free.
A training step allocates and frees the same few hundred-KiB tensors every time, so each step
can pay for thousands of page faults, more or fewer depending on what the process did before.
On a 2-vCPU VM this was 30-40% of a batch-1024 loss step and made its timing swing by 1.5x
(benchmarks/README.md). Fixed thresholds keep those blocks in the heap; the cost is that a
process holds on to its peak heap, which is what a training job uses anyway.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # blocks up to 32 MiB (glibc's cap) come from the heap
TRIM_THRESHOLD = 128 << 20  # give memory back once 128 MiB at the top of the heap is free


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def heap_trimmer() -> Callable[[], object]:
    """glibc's ``malloc_trim(0)`` (a no-op elsewhere). Decoded images and the model's tensors
    of each batch interleave in glibc's heap, whose adaptive mmap threshold then leaves
    freed pages stranded between live blocks: without a trim, RSS grew by about 10 KB per
    image (about +100 MB over 6,000 32x32 images); trimming every TRIM_EVERY batches keeps
    it flat, at no measurable cost (benchmarks/bench_predict.py; kdcore.learning.predict)."""
    if sys.platform.startswith("linux"):
        try:
            trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            return lambda: None
        trim.argtypes = (ctypes.c_size_t,)
        trim.restype = ctypes.c_int
        return lambda: trim(0)
    return lambda: None
