"""The LRN's native CPU kernels: lrn_native.c, built with the machine's C compiler at first use and called
through ctypes. One pass over memory each way (forward: read x, write y; backward: read the gradient and
x, write dx) with the denominator recomputed instead of stored, so training saves only x for the
backward. Measured against lrn_cpu.py's inductor kernels and the eager code in docs/benchmarks.md.

Why a C file and not torch.compile: the same passes, but one build of a few seconds serves every layer
shape, batch size and dtype (inductor compiles each shape, 12-27 s on a 2-core machine with a cold
cache), so even a short run such as the main job gains from it.

The library is cached under REPRO_CACHE_DIR (default: $XDG_CACHE_HOME/repro or ~/.cache/repro), named by a
hash of the source, the compiler and its version, the flags and the CPU's flags: code built with
-march=native for one CPU is never loaded on another that shares the home directory. It is written to a
temporary name and renamed, so ranks building at once never load half a file. CC chooses the compiler
(default cc). Where none works, `load` raises NativeUnavailable with the compiler's message.

float32 and bfloat16 serve the network (bfloat16 computed in float, rounded once when stored);
float64 exists so that the tests can hold the C code to the reference to 1e-12 and gradcheck it.
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

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("lrn_native.c")
CACHE_ENV = "REPRO_CACHE_DIR"
FLAGS = ("-O3", "-fno-math-errno", "-fPIC", "-shared")  # no fast-math: NaN, rounding and sqrt stay IEEE
CPU_FLAGS = ("-march=native",)  # dropped where the compiler does not take it
CL_PIXELS, NCHW_PIXELS = 16, 256  # pixels per tile, as lrn_native.c's CL_PIXELS and NCHW_PIXELS
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
DTYPES = tuple(_SUFFIX)


class NativeUnavailable(RuntimeError):
    """No C compiler, or it could not build lrn_native.c here."""


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


def library_path() -> Path:
    """Where the library built for this source, compiler and CPU lives (built or not)."""
    cc = _compiler()
    version = _run([cc, "--version"]).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS + CPU_FLAGS), platform.machine(),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    return cache_dir() / f"lrn_native-{key}.so"


def build() -> Path:
    """The library's path, compiling it first unless the cache holds it."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".lrn_native-", suffix=".so")
    os.close(fd)
    try:
        errors = []
        for cpu_flags in (CPU_FLAGS, ()):
            done = _run([_compiler(), *FLAGS, *cpu_flags, "-o", tmp, str(SOURCE), "-lm"])
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: another rank sees no file or the whole file
                return target
            errors.append(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        raise NativeUnavailable(f"{_compiler()} could not build {SOURCE.name}: {errors[-1]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_lib = None
_lock = threading.Lock()


def load() -> ctypes.CDLL:
    """The built library (built on the first call of the process)."""
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL(str(build()))  # CDLL, not PyDLL: every call releases the GIL
            i64, c_int, c_double, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
            shape = [i64, i64, i64, c_int, i64, i64, c_int, c_double, c_double, c_double, c_int]
            for suffix in _SUFFIX.values():
                for name, pointers in (("forward", 2), ("backward", 3)):
                    fn = getattr(lib, f"lrn_{suffix}_{name}")
                    fn.argtypes = [ptr] * pointers + shape
                    fn.restype = c_int
                pool = getattr(lib, f"lrn_{suffix}_forward_pool")
                pool.argtypes = [ptr, ptr] + [i64] * 6 + [c_int, c_double, c_double, c_double] + [c_int] * 3
                pool.restype = c_int
            _lib = lib
        return _lib


def is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _layout(x: Tensor) -> tuple[Tensor, bool]:
    """x as the kernels read it: NCHW- or channels_last-contiguous (whichever x nearly is)."""
    if is_channels_last(x):
        return x, True
    return x.contiguous(), False


_pool: ThreadPoolExecutor | None = None


def _tile_ranges(tiles: int) -> list[tuple[int, int]]:
    """The tiles cut into one range per intra-op thread that torch would use (at most one per tile)."""
    parts = max(1, min(torch.get_num_threads(), tiles))
    bounds = [tiles * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def _call(fn, pointers: list[int], x: Tensor, channels_last: bool, size: int, scale: float, beta: float, k: float,
          groups: int, relu: bool) -> None:
    b, c, h, w = x.shape
    per = CL_PIXELS if channels_last else NCHW_PIXELS
    _in_threads(lambda lo, hi: fn(*pointers, c, h * w, groups, int(channels_last), lo, hi, size, scale, beta, k,
                                  int(relu)), b * -(-(h * w) // per))


def _in_threads(run, tiles: int) -> None:
    """run(lo, hi) over tiles 0 .. tiles - 1, cut into one range per intra-op thread."""
    global _pool
    ranges = _tile_ranges(tiles)
    if len(ranges) == 1:
        codes = [run(*ranges[0])]
    else:  # the C code holds no GIL: threads run it side by side, as torch's intra-op threads would
        if _pool is None or _pool._max_workers < len(ranges):
            _pool = ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="repro-lrn")
        codes = list(_pool.map(lambda lo_hi: run(*lo_hi), ranges))
    if any(codes):
        raise MemoryError("lrn_native: the kernel could not allocate its tile buffers")


def _check(x: Tensor, groups: int) -> None:
    if x.device.type != "cpu" or x.dim() != 4 or x.dtype not in _SUFFIX:
        raise ValueError(f"lrn_native takes 4-D CPU tensors of {', '.join(map(str, DTYPES))}; got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    if x.shape[1] % groups:
        raise ValueError(f"LRN over {groups} groups needs channels divisible by it, got {x.shape[1]}")


def forward(x: Tensor, size: int, scale: float, beta: float, k: float, groups: int, relu: bool,
            inplace: bool = False) -> Tensor:
    """y = a * (k + scale * window_sum(a^2))^-beta, a = relu(x) or x; in x's memory format. With `inplace`,
    y is written over x (each tile is read whole before it is written): no new tensor, and the lines
    written are the ones just read."""
    _check(x, groups)
    x, channels_last = _layout(x)
    y = x if inplace else torch.empty_like(x)
    fn = getattr(load(), f"lrn_{_SUFFIX[x.dtype]}_forward")
    _call(fn, [x.data_ptr(), y.data_ptr()], x, channels_last, size, scale, beta, k, groups, relu)
    return y


def backward(grad_y: Tensor, x: Tensor, size: int, scale: float, beta: float, k: float, groups: int,
             relu: bool) -> Tensor:
    """dL/dx from dL/dy and the forward's input x (the denominator is recomputed from x)."""
    _check(x, groups)
    x, channels_last = _layout(x)
    grad_y = grad_y.to(x.dtype).contiguous(memory_format=torch.channels_last if channels_last
                                           else torch.contiguous_format)
    grad_x = torch.empty_like(x)
    fn = getattr(load(), f"lrn_{_SUFFIX[x.dtype]}_backward")
    _call(fn, [grad_y.data_ptr(), x.data_ptr(), grad_x.data_ptr()], x, channels_last, size, scale, beta, k,
          groups, relu)
    return grad_x


def pooled_size(n: int, kernel: int, stride: int) -> int:
    return (n - kernel) // stride + 1


def forward_pool(x: Tensor, size: int, scale: float, beta: float, k: float, groups: int, relu: bool, kernel: int,
                 stride: int) -> Tensor:
    """max_pool2d(forward(x, ...), kernel, stride) for a channels_last x, without the LRN's output ever
    written to memory: each image row's LRN goes to a small ring of rows that the pooling reads. The same
    bits as the two calls (the LRN is computed as `forward` computes it). Evaluation only: no backward."""
    _check(x, groups)
    if not is_channels_last(x):
        raise ValueError("lrn_native.forward_pool takes a channels_last tensor (others: forward, then max_pool2d)")
    b, c, h, w = x.shape
    if kernel < 1 or stride < 1 or h < kernel or w < kernel:
        raise ValueError(f"max pooling {kernel}/{stride} does not fit a {h}x{w} input")
    oh, ow = pooled_size(h, kernel, stride), pooled_size(w, kernel, stride)
    out = torch.empty(b, c, oh, ow, dtype=x.dtype, memory_format=torch.channels_last)
    fn = getattr(load(), f"lrn_{_SUFFIX[x.dtype]}_forward_pool")
    _in_threads(lambda lo, hi: fn(x.data_ptr(), out.data_ptr(), c, h, w, groups, lo, hi, size, scale, beta, k,
                                  int(relu), kernel, stride), b * oh)
    return out
