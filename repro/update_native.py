"""The paper's SGD update on the CPU in one pass over memory: update_native.c, built by repro/native.py.

optim.paper_update calls `update` where every parameter, gradient and velocity is a float32 or float64 CPU
tensor laid out alike (the same strides, no gaps or overlaps) and the library builds; the result is the
same bits as its four eager multi-tensor kernels, which stay the code everywhere else (GPUs, bfloat16,
odd layouts, no C compiler). Measured in docs/benchmarks.md: the update is a large share of a CPU
training step, since it touches all 61 million parameters three times over.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from repro import native

SOURCE = Path(__file__).with_name("update_native.c")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
CHUNK = 1 << 16  # elements per unit of work handed to a thread

def _declare(lib: ctypes.CDLL) -> None:
    for suffix in _SUFFIX.values():
        fn = getattr(lib, f"update_{suffix}")
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_double] * 3 + [ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.update_openmp.restype = ctypes.c_int


_library = native.LazyLibrary(SOURCE, _declare)


def load() -> ctypes.CDLL | None:
    """The built library, or None where it cannot be built (the reason kept in `unavailable()`)."""
    return _library.load()


def unavailable() -> str | None:
    """Why the native update does not run here (None: it does, or has not been tried yet)."""
    return _library.unavailable()


def _dense(t: Tensor) -> bool:
    """Whether t's elements fill its storage span exactly once, in some order (contiguous, channels_last)."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def applies(params: list[Tensor], grads: list[Tensor], velocity: list[Tensor]) -> bool:
    """Whether `update` takes these lists: CPU, float32 or float64, each triple of one dtype and layout."""
    for p, g, v in zip(params, grads, velocity, strict=True):
        if p.device.type != "cpu" or p.dtype not in _SUFFIX or g.is_sparse:
            return False
        if not (g.device == v.device == p.device and g.dtype == v.dtype == p.dtype):
            return False
        if not (_dense(p) and g.stride() == v.stride() == p.stride() and g.shape == v.shape == p.shape):
            return False
        if _overlap(p, g) or _overlap(p, v) or _overlap(g, v):  # the C loop assumes three separate arrays
            return False
    return load() is not None


def _overlap(a: Tensor, b: Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def update(params: list[Tensor], grads: list[Tensor], velocity: list[Tensor], lr: float, momentum: float,
           weight_decay: float) -> None:
    """paper_update's step, in place, for lists `applies` accepted."""
    lib = load()
    openmp = lib.update_openmp()
    for p, g, v in zip(params, grads, velocity):
        fn = getattr(lib, f"update_{_SUFFIX[p.dtype]}")
        n = p.numel()
        pointers = (p.data_ptr(), g.data_ptr(), v.data_ptr())

        def run(lo: int, hi: int, fn=fn, n=n, pointers=pointers) -> int:  # chunks lo .. hi - 1, this thread
            return fn(*pointers, lo * CHUNK, min(hi * CHUNK, n), lr, momentum, weight_decay, 1)

        def run_all(threads: int, fn=fn, n=n, pointers=pointers) -> int:  # every element, OpenMP's threads
            return fn(*pointers, 0, n, lr, momentum, weight_decay, threads)
        native.in_threads(run, -(-n // CHUNK), run_all if openmp else None)
    # as torch's in-place kernels do: autograd sees that the parameters and velocities changed
    for t in params + velocity:  # one at a time: torch 2.11 and 2.14 both take that
        torch.autograd.graph.increment_version(t)
