"""The paper's 3x3 convolutions (conv3, conv4, conv5: stride 1, padding 1) on the CPU by Winograd's
minimal filtering F(2x2, 3x3), forward and backward: the same function as the direct convolution, with
16 multiplications per 2x2 output tile and channel pair instead of 36 (Lavin and Gray, 2015; cuDNN picks
such algorithms on a GPU). The transforms are winograd_native.c, the 16 matrix products per group
torch's (MKL); at 13x13 maps the products do 1.9x fewer FLOPs than the direct sum, and oneDNN, whose x86
convolutions are all direct, runs those at about the same rate per FLOP as torch's matrix products
(docs/benchmarks.md).

Numerics: the transforms add and halve, so the rounding differs from the direct sum's by a few units in
the last place of float32 (tests/test_winograd.py holds float32 to the float64 direct convolution as
tightly as oneDNN's own result, and float64 to 1e-12). Where it does not apply (a GPU, bfloat16
autocast, other kernel sizes, no C compiler) the direct convolution runs.

Which convolution runs is a process-wide choice, like the LRN's kernel: REPRO_CONV_CPU=winograd or
=direct, else set_kernel (a training run's --cpu-conv, kept in its checkpoints).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from repro import native

SOURCE = Path(__file__).with_name("winograd_native.c")
KERNEL_ENV = "REPRO_CONV_CPU"  # "direct" or "winograd": overrides set_kernel for the whole process
KERNELS = ("direct", "winograd")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


class _Shape(ctypes.Structure):  # winograd_native.c's Shape
    _fields_ = [(name, ctypes.c_int64) for name in
                ("batch", "height", "width", "channels", "groups", "s_b", "s_h", "s_w")]


class _Filters(ctypes.Structure):  # winograd_native.c's Filters
    _fields_ = [(name, ctypes.c_int64) for name in ("filters", "channels", "groups", "s_k", "s_c", "s_h", "s_w")]


_kernel = "direct"


def set_kernel(kernel: str) -> None:
    """Which convolution runs the 3x3 layers on the CPU from now on in this process: 'direct' or 'winograd'."""
    global _kernel
    if kernel not in KERNELS:
        raise ValueError(f"the CPU convolution is one of {', '.join(KERNELS)}; got {kernel!r}")
    _kernel = kernel


def kernel() -> str:
    chosen = os.environ.get(KERNEL_ENV) or _kernel
    if chosen not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}={chosen!r}: set it to one of {', '.join(KERNELS)}, or unset it")
    return chosen


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in _SUFFIX.values():
        for name, args in (("input", [ptr, _Shape, ptr, ptr]), ("output", [ptr, ptr, _Shape, ptr]),
                           ("grad_output", [ptr, _Shape, ptr, ptr]), ("grad_input", [ptr, _Shape, ptr]),
                           ("weight", [ptr, _Filters, ptr]), ("grad_weight", [ptr, _Filters, ptr])):
            fn = getattr(lib, f"wino_{name}_{suffix}")
            fn.argtypes = args + [i64, i64, c_int]  # items first .. last - 1, split over `threads`
            fn.restype = c_int
    lib.wino_openmp.restype = c_int


_library = native.LazyLibrary(SOURCE, _declare)


def load() -> ctypes.CDLL | None:
    """The built library, or None where it cannot be built (the reason kept in `unavailable()`)."""
    return _library.load()


def unavailable() -> str | None:
    """Why the Winograd convolution does not run here (None: it does, or has not been tried yet)."""
    return _library.unavailable()


def applies(x: Tensor, weight: Tensor, stride, padding, dilation) -> bool:
    """Whether conv2d(x, weight, ...) runs by Winograd here: the kernel chosen, a CPU float32/float64 input
    outside autocast, a 3x3 filter at stride 1, padding 1, dilation 1, and the library built."""
    if x.device.type != "cpu" or x.dtype not in _SUFFIX or weight.dtype != x.dtype or x.dim() != 4:
        return False
    if tuple(weight.shape[2:]) != (3, 3) or _pair(stride) != (1, 1) or _pair(padding) != (1, 1) \
            or _pair(dilation) != (1, 1) or torch.is_autocast_enabled("cpu"):
        return False
    return kernel() == "winograd" and load() is not None


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int = 1) -> Tensor:
    """conv2d(x, weight, bias, padding=1, groups=groups) by F(2x2, 3x3), for inputs `applies` accepted; the
    output is channels_last."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _WinogradConv.apply(x, weight, bias, groups)
    return _forward(_channels_last(x), transform_weight(weight, groups), bias, groups)[0]


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters and state dict) whose 3x3, stride-1, padding-1 case runs by
    F(2x2, 3x3) where `applies` says so: conv3, conv4 and conv5 of both forms (spec.make_layer).
    The filters are transformed at every call, in evaluation too: keeping the transform beside a copy of
    the filters to compare with saved about 1.5 ms of a 330 ms forward (docs/benchmarks.md)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode == "zeros" and not torch.compiler.is_compiling() \
                and applies(input, weight, self.stride, self.padding, self.dilation):
            return conv3x3(input, weight, bias, self.groups)
        return super()._conv_forward(input, weight, bias)


def _channels_last(x: Tensor) -> Tensor:
    return x if x.stride(1) == 1 else x.contiguous(memory_format=torch.channels_last)


def _shape(x: Tensor, groups: int) -> _Shape:
    b, c, h, w = x.shape
    return _Shape(b, h, w, c, groups, x.stride(0), x.stride(2), x.stride(3))


def _filters(weight: Tensor, groups: int) -> _Filters:
    return _Filters(weight.shape[0], weight.shape[1], groups, *weight.stride())


def _dense(weight: Tensor) -> Tensor:
    """The filters as they are where contiguous or channels_last (the C code takes their strides; the
    network's are channels_last under --channels-last), else a contiguous copy."""
    return weight if weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last) \
        else weight.contiguous()


def transform_weight(weight: Tensor, groups: int) -> Tensor:
    """U, (groups, 16, C / groups, K / groups), from the filters (K, C / groups, 3, 3)."""
    k, cg = weight.shape[:2]
    weight = _dense(weight)
    u = weight.new_empty(groups, 16, cg, k // groups)
    _run("weight", weight.dtype, cg, weight.data_ptr(), _filters(weight, groups), u.data_ptr())
    return u


def _tiles(x: Tensor) -> int:
    b, _, h, w = x.shape
    return b * ((h + 1) // 2) * ((w + 1) // 2)


def _run(name: str, dtype: torch.dtype, count: int, *args) -> None:
    """winograd_native.c's `name` over items 0 .. count - 1 (images, or input channels), split over torch's threads."""
    lib = load()
    fn = getattr(lib, f"wino_{name}_{_SUFFIX[dtype]}")
    run_all = (lambda threads: fn(*args, 0, count, threads)) if lib.wino_openmp() else None
    if any(native.in_threads(lambda lo, hi: fn(*args, lo, hi, 1), count, run_all)):
        raise RuntimeError(f"winograd_native.c: {name} failed")


def _products(a: Tensor, b: Tensor, out: Tensor, transpose_a: bool = False, transpose_b: bool = False) -> Tensor:
    """out[g, e] = a[g, e] @ b[g, e] (with either transposed) for every group g and point e, as one batched
    product written into `out` (5-26% faster than one torch.mm per matrix: docs/benchmarks.md)."""
    left, right = a.flatten(0, 1), b.flatten(0, 1)
    torch.bmm(left.transpose(1, 2) if transpose_a else left, right.transpose(1, 2) if transpose_b else right,
              out=out.flatten(0, 1))
    return out


def _forward(x: Tensor, u: Tensor, bias: Tensor | None, groups: int) -> tuple[Tensor, Tensor]:
    """(y, V): the convolution of channels_last x with transformed filters u, and x's transform."""
    b, c, h, w = x.shape
    k = u.shape[3] * groups
    tiles = _tiles(x)
    v = x.new_empty(groups, 16, tiles, c // groups)
    zero = x.new_zeros(c)
    _run("input", x.dtype, b, x.data_ptr(), _shape(x, groups), v.data_ptr(), zero.data_ptr())
    m = _products(v, u, x.new_empty(groups, 16, tiles, k // groups))
    y = torch.empty((b, k, h, w), dtype=x.dtype, memory_format=torch.channels_last)
    bias = bias.contiguous() if bias is not None else None
    _run("output", x.dtype, b, m.data_ptr(), bias.data_ptr() if bias is not None else None, _shape(y, groups),
         y.data_ptr())
    return y, v


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        weight = _dense(weight)
        u = transform_weight(weight, groups)
        y, v = _forward(_channels_last(x), u, bias, groups)
        ctx.save_for_backward(v, u)
        ctx.groups, ctx.x_shape, ctx.has_bias = groups, x.shape, bias is not None
        ctx.weight_layout = weight.stride(), weight.shape  # the gradient is written in the filters' layout
        return y

    @staticmethod
    @once_differentiable  # the C transforms have no derivative of their own: a second derivative raises
    def backward(ctx, grad_y: Tensor):
        v, u = ctx.saved_tensors
        groups = ctx.groups
        grad_y = _channels_last(grad_y)
        b, k, h, w = grad_y.shape
        tiles = v.shape[2]
        dm = grad_y.new_empty(groups, 16, tiles, k // groups)
        zero = grad_y.new_zeros(k)
        _run("grad_output", grad_y.dtype, b, grad_y.data_ptr(), _shape(grad_y, groups), dm.data_ptr(), zero.data_ptr())
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            dv = _products(dm, u, torch.empty_like(v), transpose_b=True)  # dV = dM U^T
            grad_x = torch.empty(ctx.x_shape, dtype=grad_y.dtype, memory_format=torch.channels_last)
            _run("grad_input", grad_y.dtype, b, dv.data_ptr(), _shape(grad_x, groups), grad_x.data_ptr())
        if ctx.needs_input_grad[1]:
            du = _products(v, dm, torch.empty_like(u), transpose_a=True)  # dU = V^T dM
            stride, shape = ctx.weight_layout
            grad_weight = torch.empty_strided(shape, stride, dtype=du.dtype)
            _run("grad_weight", du.dtype, shape[1], du.data_ptr(), _filters(grad_weight, groups), grad_weight.data_ptr())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None
