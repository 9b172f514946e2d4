"""Large CPU tensors without fresh pages at every step.

glibc's malloc serves each request above its mmap threshold (at most 32 MB) with a new mapping and
unmaps it on free, so every such tensor costs the kernel a page fault per 4 KB when it is first written:
measured 15 ms for a fresh 37 MB tensor against 4 ms for writing one that is reused (docs/benchmarks.md).
A CPU training step makes several: at batch 32 the paper's conv1 output and its LRN's (37 MB each),
and at any batch the gradient of fc6's weights and the optimiser's temporaries (151 MB each). Told to
map nothing and to keep what is freed, glibc hands the same memory back at the next step.

The cost: the process keeps its peak memory (up to 2 GB of it freed) instead of returning it to the system.
Set REPRO_KEEP_FREED_MEMORY=0 to leave the allocator as it is. Only glibc has these settings
(mallopt); elsewhere nothing changes and `keep_freed_memory` says why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV = "REPRO_KEEP_FREED_MEMORY"
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
_KEEP = 2 ** 31 - 1  # bytes of free heap top kept before glibc returns any (mallopt takes an int)

_done: str | None = None


def keep_freed_memory() -> str:
    """Ask glibc to serve every size from its heap and keep freed memory (once per process; a forked
    data worker inherits it). Returns what happened, in words, for a run's log."""
    global _done
    if _done is not None:
        return _done
    if os.environ.get(ENV, "1") == "0":
        _done = f"the allocator left as it is ({ENV}=0)"
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # glibc only: musl and macOS lack it
    except (OSError, AttributeError):
        _done = "the allocator left as it is (not glibc: no mallopt to keep freed memory)"
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, _KEEP) == 1
    gnu_get_libc_version.restype = ctypes.c_char_p
    version = gnu_get_libc_version().decode()
    _done = (f"glibc {version} keeps freed memory for reuse (no fresh pages per large tensor; {ENV}=0 to turn off)"
             if ok else f"glibc {version} refused the mallopt settings; the allocator left as it is")
    return _done
