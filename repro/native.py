"""C code of this package built with the machine's C compiler at first use, called through ctypes: what
lrn_native.c (the CPU LRN), update_native.c (the paper's SGD update) and winograd_native.c (conv1-conv5's
transforms) share.

A library is cached under REPRO_CACHE_DIR (default: $XDG_CACHE_HOME/repro or ~/.cache/repro), named by a
hash of its source, the compiler and its version, the flags and the CPU's flags: code built with
-march=native for one CPU is never loaded on another that shares the home directory. It is written to a
temporary name and renamed, so ranks building at once never load half a file. CC chooses the compiler
(default cc). Where none works, `build` raises NativeUnavailable with the compiler's message.

The kernels hold no GIL (ctypes.CDLL releases it for each call), so `in_threads` runs one range of work per
intra-op thread that torch would use, side by side. Where torch's OpenMP runtime is GNU libgomp (the pip
wheels), the libraries are built with -fopenmp and link the libgomp.so.1 already loaded, so the ranges
run on torch's own threads: after each of torch's operators those spin for a while waiting for more
work, and on a machine with as many cores as threads they would otherwise take the cores from Python's.
Measured in docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

CACHE_ENV = "REPRO_CACHE_DIR"
FLAGS = ("-O3", "-fno-math-errno", "-fPIC", "-shared")  # no fast-math: NaN, rounding and sqrt stay IEEE
CPU_FLAGS = ("-march=native",)  # dropped where the compiler does not take it
HEADER = Path(__file__).with_name("native.h")  # the kernels' shared macros (IN_THREADS)


class NativeUnavailable(RuntimeError):
    """No C compiler, or it could not build the source here."""


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "repro"


def _compiler() -> str:
    cc = os.environ.get("CC", "cc")
    path = shutil.which(cc.split()[0]) if cc else None
    if not path:
        raise NativeUnavailable(f"no C compiler: {cc!r} is not on PATH (set CC to one, or install gcc or clang)")
    return path


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def torch_uses_libgomp() -> bool:
    """Whether torch's OpenMP runtime is GNU libgomp under the soname libgomp.so.1 (loaded with torch), so
    that a library built with -fopenmp shares its threads rather than loading a second runtime."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return False
    try:
        with open("/proc/self/maps") as f:
            return any(line.rstrip().endswith("/libgomp.so.1") for line in f)
    except OSError:
        return False


def _openmp_flags() -> tuple[str, ...]:
    return ("-fopenmp",) if torch_uses_libgomp() else ()


def library_path(source: Path) -> Path:
    """Where the library built from `source` for this compiler, CPU and OpenMP runtime lives (built or not)."""
    cc = _compiler()
    version = _run([cc, "--version"]).stdout
    key = hashlib.sha256("\0".join([source.read_text(), HEADER.read_text(), cc, version,
                                    " ".join(FLAGS + CPU_FLAGS + _openmp_flags()), platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    return cache_dir() / f"{source.stem}-{key}.so"


def build(source: Path) -> Path:
    """The library's path, compiling `source` first unless the cache holds it."""
    target = library_path(source)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{source.stem}-", suffix=".so")
    os.close(fd)
    try:
        errors = []
        omp = _openmp_flags()
        tries = [(*CPU_FLAGS, *omp), omp, CPU_FLAGS, ()]  # without what the compiler does not take
        for extra in dict.fromkeys(tries):
            done = _run([_compiler(), *FLAGS, *extra, f"-I{HEADER.parent}", "-o", tmp, str(source), "-lm"])
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: another rank sees no file or the whole file
                return target
            errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        raise NativeUnavailable(f"{_compiler()} could not build {source.name}: {errors[-1]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class LazyLibrary:
    """The library built from `source`, loaded at the first `load()` of the process with `declare` giving
    its functions' argument and result types; None from then on where it cannot be built, with the
    compiler's reason kept for `unavailable()`. One instance per C file."""

    def __init__(self, source: Path, declare: Callable[[ctypes.CDLL], None]):
        self.source, self._declare = source, declare
        self._lib: ctypes.CDLL | None = None
        self._unavailable: str | None = None
        self._lock = threading.Lock()

    def load(self) -> ctypes.CDLL | None:
        with self._lock:
            if self._lib is None and self._unavailable is None:
                try:
                    lib = ctypes.CDLL(str(build(self.source)))  # CDLL: each call releases the GIL
                except NativeUnavailable as exc:
                    self._unavailable = str(exc)
                    return None
                self._declare(lib)
                self._lib = lib
            return self._lib

    def unavailable(self) -> str | None:
        """Why the library does not run here (None: it does, or has not been tried yet)."""
        return self._unavailable


_pool: ThreadPoolExecutor | None = None


def tile_ranges(tiles: int) -> list[tuple[int, int]]:
    """Tiles 0 .. tiles - 1 cut into one range per intra-op thread that torch would use (at most one per tile)."""
    parts = max(1, min(torch.get_num_threads(), tiles))
    bounds = [tiles * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def in_threads(run: Callable[[int, int], int], tiles: int,
               run_all: Callable[[int], int] | None = None) -> list[int]:
    """run(lo, hi) over tiles 0 .. tiles - 1, one range per intra-op thread; the codes run returned.
    run_all(threads), where given, is the library's own split of all tiles over that many OpenMP threads
    (a kernel's *_all entry, built with OpenMP): it runs instead of Python's threads."""
    global _pool
    ranges = tile_ranges(tiles)
    if len(ranges) == 1:
        return [run(*ranges[0])]
    if run_all is not None:
        return [run_all(len(ranges))]
    if _pool is None or _pool._max_workers < len(ranges):
        _pool = ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="repro-native")
    return list(_pool.map(lambda lo_hi: run(*lo_hi), ranges))
