"""The LRN's native CPU kernels: lrn_native.c, built with the machine's C compiler at first use and called
through ctypes. One pass over memory each way (forward: read x, write y; backward: read the gradient and
x, write dx) with the denominator recomputed instead of stored, so training saves only x for the
backward. Measured against lrn_cpu.py's inductor kernels and the eager code in docs/benchmarks.md.

Why a C file and not torch.compile: the same passes, but one build of a few seconds serves every layer
shape, batch size and dtype (inductor compiles each shape, 12-27 s on a 2-core machine with a cold
cache), so even a short run such as the main job gains from it.

Built and cached by repro/native.py (once per machine, keyed by the source, compiler and CPU); CC chooses
the compiler, and where none works `load` raises NativeUnavailable with the compiler's message.

float32 and bfloat16 serve the network (bfloat16 computed in float, rounded once when stored);
float64 exists so that the tests can hold the C code to the reference to 1e-12 and gradcheck it.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import torch
from torch import Tensor

from repro import native
from repro.native import CACHE_ENV, NativeUnavailable, cache_dir  # noqa: F401 (this module's callers use them)

SOURCE = Path(__file__).with_name("lrn_native.c")
CL_PIXELS, NCHW_PIXELS = 16, 256  # pixels per tile, as lrn_native.c's CL_PIXELS and NCHW_PIXELS
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
DTYPES = tuple(_SUFFIX)


def library_path() -> Path:
    """Where the library built for this source, compiler and CPU lives (built or not)."""
    return native.library_path(SOURCE)


def build() -> Path:
    """The library's path, compiling it first unless the cache holds it."""
    return native.build(SOURCE)


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
            pool_shape = [i64] * 6 + [c_int, c_double, c_double, c_double] + [c_int] * 3
            for suffix in _SUFFIX.values():
                for name, args in (("forward", [ptr] * 2 + shape), ("backward", [ptr] * 3 + shape),
                                   ("forward_pool", [ptr] * 2 + pool_shape)):
                    for kernel, threads in ((name, []), (f"{name}_all", [c_int])):  # a range; all, split
                        fn = getattr(lib, f"lrn_{suffix}_{kernel}")
                        fn.argtypes = args + threads
                        fn.restype = c_int
            lib.lrn_openmp.restype = c_int
            _lib = lib
        return _lib


def is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _layout(x: Tensor) -> tuple[Tensor, bool]:
    """x as the kernels read it: NCHW- or channels_last-contiguous (whichever x nearly is)."""
    if is_channels_last(x):
        return x, True
    return x.contiguous(), False


def _call(name: str, pointers: list[int], x: Tensor, channels_last: bool, size: int, scale: float, beta: float,
          k: float, groups: int, relu: bool) -> None:
    b, c, h, w = x.shape
    per = CL_PIXELS if channels_last else NCHW_PIXELS
    shape = (c, h * w, groups, int(channels_last))
    _in_threads(name, x.dtype, lambda fn, lo, hi, *threads: fn(*pointers, *shape, lo, hi, size, scale, beta, k,
                                                               int(relu), *threads), b * -(-(h * w) // per))


def _in_threads(name: str, dtype: torch.dtype, call, tiles: int) -> None:
    """Kernel `name` over tiles 0 .. tiles - 1: call(fn, lo, hi) runs fn over one range; with an OpenMP
    build, call(fn_all, 0, tiles, threads) splits them all on torch's threads (repro/native.py)."""
    lib = load()
    fn, fn_all = (getattr(lib, f"lrn_{_SUFFIX[dtype]}_{kernel}") for kernel in (name, f"{name}_all"))
    run_all = (lambda threads: call(fn_all, 0, tiles, threads)) if lib.lrn_openmp() else None
    if any(native.in_threads(lambda lo, hi: call(fn, lo, hi), tiles, run_all)):
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
    _call("forward", [x.data_ptr(), y.data_ptr()], x, channels_last, size, scale, beta, k, groups, relu)
    return y


def backward(grad_y: Tensor, x: Tensor, size: int, scale: float, beta: float, k: float, groups: int,
             relu: bool) -> Tensor:
    """dL/dx from dL/dy and the forward's input x (the denominator is recomputed from x)."""
    _check(x, groups)
    x, channels_last = _layout(x)
    grad_y = grad_y.to(x.dtype).contiguous(memory_format=torch.channels_last if channels_last
                                           else torch.contiguous_format)
    grad_x = torch.empty_like(x)
    _call("backward", [grad_y.data_ptr(), x.data_ptr(), grad_x.data_ptr()], x, channels_last, size, scale, beta, k,
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
    _in_threads("forward_pool", x.dtype, lambda fn, lo, hi, *threads: fn(
        x.data_ptr(), out.data_ptr(), c, h, w, groups, lo, hi, size, scale, beta, k, int(relu), kernel, stride,
        *threads), b * oh)
    return out
