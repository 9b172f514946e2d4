"""The paper's convolutions on the CPU by Winograd's minimal filtering (Lavin and Gray, 2015; cuDNN picks
such algorithms on a GPU): conv3, conv4 and conv5 (3x3, padding 1) by F(2x2, 3x3), forward and backward,
with 16 multiplications per 2x2 output tile and channel pair instead of 36; conv2 (5x5, padding 2) by
F(2x2, 5x5), 36 instead of 100, in its forward only; conv1 (11x11 at stride 4) cut into 4x4 blocks of
pixels, which makes it an unpadded 3x3 convolution of 48-channel blocks (`strided_conv`), by F(2x2, 3x3),
forward and filter gradient. The transforms are winograd_native.c, the matrix
products between them torch's (MKL); oneDNN, whose x86 convolutions are all direct sums, runs at about
the same rate per FLOP as those products, so fewer FLOPs is less time (docs/benchmarks.md).

Blocks: a batch's transformed input and products are 4-9x the size of its activations (tens of MB), so
the forward runs block by block of tiles, each block's transform, products and output transform in turn
while they are in the cache (BLOCK_BYTES). Each layer's choices below were measured in the network
(docs/benchmarks.md): conv2's backward by Winograd was no faster in a training step than oneDNN's direct
backward, so conv2's gradients are the direct convolution's (BACKWARD_BY_WINOGRAD); conv3-conv5 keep
their input's transform for the backward in float32 (KEEP_TRANSFORM), not in bfloat16 (KEEP_TRANSFORM_BF16),
conv2 would keep 9x its input, and conv1
transforms its blocks again in the backward (KEEP_STRIDED_TRANSFORM: faster than keeping 16 MB a image).

Numerics: the 3x3 transforms add and halve; the 5x5 ones take the points 0, 1, -1, 2, -1/2, whose
float32 rounding of conv2's output is 1.2-1.5x oneDNN's direct sum's largest error, where the usual 0,
+-1, +-2 is 3x. The 3x3 outputs and input gradients round better than oneDNN's (0.3-0.6x), their filter
gradients worse (1.5-2.8x: sums over every tile of transformed values); conv1's output 0.3-0.4x, its
filter gradient 0.1x. tests/test_winograd.py holds float32 to twice oneDNN's largest error (four times for
the 3x3 filter gradients) and float64 to 1e-12.

bfloat16 (autocast, as `--amp bf16` runs): the 3x3 layers' transforms (conv1's blocks' too) are stored
in bfloat16 and their products are torch's bfloat16 ones (oneDNN, twice float32's rate where the CPU has
AVX-512 BF16 or AMX), the sums between them in float32; V, U and the products are each rounded to bfloat16 once, which
autocast's direct convolution does not do, so its outputs and gradients carry 1.5-1.9x autocast's own
largest error (tests hold 2.5x). conv2 keeps oneDNN under autocast: F(2x2, 5x5) would carry 6.5x.
Where it does not apply (a GPU, float16, other kernel sizes or strides, no C compiler) the direct
convolution runs.

Layers that read one input can share its transform (`convs`): the two towers' conv1 in one process on one
CPU read the same image, so `shared_input` cuts and transforms it once for both towers' filters (on two
devices each tower does this itself, as each GPU of the paper did).

Which convolution runs is a process-wide choice, like the LRN's kernel: REPRO_CONV_CPU=winograd or
=direct, else set_kernel (a training run's --cpu-conv, kept in its checkpoints).
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from repro import native

SOURCE = Path(__file__).with_name("winograd_native.c")
KERNEL_ENV = "REPRO_CONV_CPU"  # "direct" or "winograd": overrides set_kernel for the whole process
KERNELS = ("direct", "winograd")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}  # how the activations are stored
SIZES = (3, 5)  # filter sizes r with an F(2x2, rxr) in winograd_native.c, each at padding r // 2
BF16_SIZES = (3,)  # bfloat16 products: F(2x2, 5x5)'s error would be 6.5x autocast's direct sum's, F(2x2, 3x3)'s is 1.7x
BLOCK_BYTES = 1 << 22  # a block's transformed input and products: 4 MB (64-128 tiles at conv2's shapes)
MIN_BLOCK_TILES = 16  # below this the products are too small for MKL to run at speed
WEIGHT_BLOCKS_PER_DU = 4  # each block adds to the whole filter gradient dU: blocks of at least 4x its size
ALL = 1 << 62  # a budget that makes one block of every tile
KEEP_TRANSFORM = {3: True, 5: False}  # the forward keeps V for the backward (4x the input; 9x for 5x5)
KEEP_TRANSFORM_BF16 = False  # bfloat16: making V again was 1-2% faster a training step than keeping it
STRIDED_THREADS = 1  # conv1 by blocks only at this many torch threads: at 2 it made the step slower (docs)
KEEP_STRIDED_TRANSFORM = False  # conv1's V is 16 MB a image in float32: made again, block by block, it was faster
BACKWARD_BY_WINOGRAD = {3: True, 5: False}  # else the direct convolution's backward (oneDNN)


class _Shape(ctypes.Structure):  # winograd_native.c's Shape
    _fields_ = [(name, ctypes.c_int64) for name in
                ("batch", "height", "width", "channels", "groups", "s_b", "s_h", "s_w", "tiles_h", "tiles_w", "pad")]


class _Filters(ctypes.Structure):  # winograd_native.c's Filters
    _fields_ = [(name, ctypes.c_int64) for name in ("filters", "channels", "groups", "s_k", "s_c", "s_h", "s_w")]


_kernel = "direct"


def set_kernel(kernel: str) -> None:
    """Which convolution runs conv1-conv5 on the CPU from now on in this process: 'direct' or 'winograd'."""
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
    block = [i64, i64]  # the activations' kernels: tiles t0 .. t1 - 1
    activations = (("input", [ptr, _Shape, ptr, ptr] + block), ("output", [ptr, ptr, _Shape, ptr] + block),
                   ("grad_output", [ptr, _Shape, ptr, ptr] + block), ("grad_input", [ptr, _Shape, ptr] + block))
    filters = (("weight", [ptr, _Filters, ptr]), ("grad_weight", [ptr, _Filters, ptr]))
    for dtype, suffix in _SUFFIX.items():
        floating = dtype != torch.bfloat16  # bfloat16: the activations' kernels only, for BF16_SIZES
        for name, args in activations + (filters if floating else ()):
            for size in SIZES if floating else BF16_SIZES:
                fn = getattr(lib, f"wino{size}_{name}_{suffix}")
                fn.argtypes = args + [i64, i64, c_int]  # items first .. last - 1, split over `threads`
                fn.restype = c_int
        getattr(lib, f"wino_width_{suffix}").restype = c_int
    for suffix in (*_SUFFIX.values(), "f32_bf16"):  # f32_bf16: a float32 image cut into bfloat16 blocks
        to_depth = getattr(lib, f"wino_space_to_depth_{suffix}")
        to_depth.argtypes, to_depth.restype = [ptr, _Shape, i64, ptr, i64, i64, c_int], c_int
    lib.wino_openmp.restype = c_int


_library = native.LazyLibrary(SOURCE, _declare)


def load() -> ctypes.CDLL | None:
    """The built library, or None where it cannot be built (the reason kept in `unavailable()`)."""
    return _library.load()


def unavailable() -> str | None:
    """Why the Winograd convolution does not run here (None: it does, or has not been tried yet)."""
    return _library.unavailable()


def storage(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype conv2d(x, weight) computes in on the CPU, where this module has kernels for it: x's own
    (float32, float64, bfloat16, the filters alike), or bfloat16 under CPU bfloat16 autocast (float32 or
    bfloat16 in, as autocast casts them); None otherwise (float16, other autocast dtypes, mixed dtypes)."""
    if torch.is_autocast_enabled("cpu"):
        halves = torch.get_autocast_dtype("cpu") == torch.bfloat16
        return torch.bfloat16 if halves and {x.dtype, weight.dtype} <= {torch.float32, torch.bfloat16} else None
    return x.dtype if x.dtype in _SUFFIX and weight.dtype == x.dtype else None


def applies(x: Tensor, weight: Tensor, stride, padding, dilation) -> bool:
    """Whether conv2d(x, weight, ...) runs by Winograd here: the kernel chosen, a CPU input in float32 or
    float64 with a 3x3 or 5x5 filter, or in bfloat16 (bfloat16 autocast included) with a 3x3 filter, at
    stride 1, padding 1 or 2 ("same"), dilation 1, and the library built."""
    dtype = storage(x, weight) if x.device.type == "cpu" and x.dim() == 4 else None
    if dtype is None:
        return False
    r = weight.shape[2]
    if r not in (BF16_SIZES if dtype == torch.bfloat16 else SIZES) or tuple(weight.shape[2:]) != (r, r) \
            or _pair(stride) != (1, 1) or _pair(padding) != (r // 2, r // 2) or _pair(dilation) != (1, 1):
        return False
    return kernel() == "winograd" and load() is not None


def applies_strided(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> bool:
    """Whether conv2d(x, weight, stride=stride) runs as `strided_conv` here: conv1's case, an unpadded
    square filter of k pixels at stride s > 1 with ceil(k / s) = 3, no groups, float32, float64 or
    bfloat16 (autocast included), the kernel chosen, the library built, and torch at STRIDED_THREADS
    threads (one, as each torchrun rank runs: at two the evaluation forward was 7-21% slower with it)."""
    s, k = _pair(stride), weight.shape[2]
    if x.device.type != "cpu" or x.dim() != 4 or storage(x, weight) is None or s[0] != s[1] or s[0] < 2:
        return False
    f = s[0]
    if tuple(weight.shape[2:]) != (k, k) or -(-k // f) != 3 or _pair(padding) != (0, 0) \
            or _pair(dilation) != (1, 1) or groups != 1:
        return False
    if any(-(-n // f) - -(-k // f) + 1 != (n - k) // f + 1 for n in x.shape[2:]):
        return False  # the blocks' convolution would have another size (strided_conv says which)
    return torch.get_num_threads() == STRIDED_THREADS and kernel() == "winograd" and load() is not None


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv(x: Tensor, weight: Tensor, bias: Tensor | None, groups: int = 1, padding: int | None = None,
         keep: bool | None = None) -> Tensor:
    """conv2d(x, weight, bias, padding=padding, groups=groups) for r x r filters by F(2x2, rxr), for inputs
    `applies` accepted (padding r // 2, "same", unless given: 0 is the stride-1 form of conv1, below); the
    output is channels_last. `keep`: whether the backward reuses the forward's transform of x (default
    KEEP_TRANSFORM, KEEP_TRANSFORM_BF16 in bfloat16). Under bfloat16 autocast x, the filters and the bias
    are first rounded to bfloat16, as autocast's conv2d rounds them (their gradients flow back through
    those casts, as through autocast's)."""
    return convs(x, [weight], [bias], groups, padding, keep)[0]


def convs(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None], groups: int = 1,
          padding: int | None = None, keep: bool | None = None) -> list[Tensor]:
    """[conv(x, w, b, ...) for w, b in zip(weights, biases)] with x transformed once for all of them, block
    by block (and once more in the backward, where V is not kept): several layers that read one input,
    as both towers' conv1 read the image when they share a CPU. The filters share a size; x's gradient,
    where wanted, is the sum of theirs."""
    dtype = storage(x, weights[0])
    if dtype == torch.bfloat16:
        x, weights = x.to(dtype), [w.to(dtype) for w in weights]
        biases = [b.to(dtype) if b is not None else None for b in biases]
    r = weights[0].shape[2]
    pad = r // 2 if padding is None else padding
    if keep is None:
        keep = KEEP_TRANSFORM_BF16 if x.dtype == torch.bfloat16 else KEEP_TRANSFORM[r]
    params = [t for pair in zip(weights, biases) for t in pair]  # w0, b0, w1, b1, ...
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)):
        return list(_WinogradConv.apply(x, groups, pad, keep, *params))
    return _forward(_channels_last(x), [transform_weight(w, groups) for w in weights], biases, groups, pad)[0]


def _to_depth(t: Tensor, f: int) -> Tensor:
    """(N, C, H, W) -> (N, f*f*C, ceil(H / f), ceil(W / f)) by torch's reshapes (differentiable): channel
    (dy * f + dx) * C + c of block (h, w) is t[c, f h + dy, f w + dx], zeros past the edge."""
    n, c, h, w = t.shape
    hb, wb = -(-h // f), -(-w // f)
    blocks = F.pad(t, (0, wb * f - w, 0, hb * f - h)).reshape(n, c, hb, f, wb, f)
    return blocks.permute(0, 3, 5, 1, 2, 4).reshape(n, f * f * c, hb, wb)


def space_to_depth(x: Tensor, f: int, dtype: torch.dtype | None = None) -> Tensor:
    """`_to_depth(x.to(dtype), f)`, channels_last: by winograd_native.c (one pass, a run of f pixels at a time;
    a float32 x cut into bfloat16 blocks is rounded in the same pass) where no gradient to x is wanted, as
    for a network's images; else by torch's cast and reshapes."""
    dtype = x.dtype if dtype is None else dtype
    if torch.is_grad_enabled() and x.requires_grad:
        return _to_depth(x.to(dtype), f).contiguous(memory_format=torch.channels_last)
    if x.dtype != dtype and (x.dtype, dtype) != (torch.float32, torch.bfloat16):
        x = x.to(dtype)  # no C kernel for this pair: torch casts first
    x = _channels_last(x)
    b, c, h, w = x.shape
    out = torch.empty((b, f * f * c, -(-h // f), -(-w // f)), dtype=dtype, memory_format=torch.channels_last)
    kernel = _SUFFIX[x.dtype] if x.dtype == dtype else "f32_bf16"
    _run_function(f"wino_space_to_depth_{kernel}", b, x.data_ptr(), _shape(x, 1, (0, 0)), f, out.data_ptr())
    return out


def strided_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int) -> Tensor:
    """conv2d(x, weight, bias, stride=stride) without padding, for inputs `applies_strided` accepted: conv1.
    Cut into stride x stride blocks (`space_to_depth`), the image is a map of stride^2 * C channels and
    the filters are ceil(k / stride)^2 blocks of them (zero past the filter's edge), so the strided
    convolution is an unpadded stride-1 3x3 convolution of the blocks, by F(2x2, 3x3): conv1 becomes a
    48-channel 3x3 convolution on a 57x57 map, 1.19x the multiply-adds of the direct sum before the
    transforms divide them by 2.25. The filters' gradient flows back through the reshapes."""
    return strided_convs(x, [weight], [bias], stride)[0]


def strided_convs(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor | None], stride: int) -> list[Tensor]:
    """[strided_conv(x, w, b, stride) for w, b in zip(weights, biases)], x cut into blocks and transformed
    once for all of them (`convs`)."""
    k = weights[0].shape[2]
    direct = [(n - k) // stride + 1 for n in x.shape[2:]]
    blocks = [-(-n // stride) - -(-k // stride) + 1 for n in x.shape[2:]]
    if direct != blocks:
        raise ValueError(f"strided_conv: a {k}x{k} filter at stride {stride} gives {direct[0]}x{direct[1]} outputs, "
                         f"its {stride}x{stride} blocks {blocks[0]}x{blocks[1]}; use torch's conv2d "
                         "(applies_strided is false)")
    blocks = space_to_depth(x, stride, storage(x, weights[0]))  # under autocast rounded to bfloat16, as autocast would
    return convs(blocks, [_to_depth(w, stride) for w in weights], biases, 1, padding=0, keep=KEEP_STRIDED_TRANSFORM)


def shared_input(layers: Sequence[nn.Module], x: Tensor) -> list[Tensor] | None:
    """[layer(x) for layer in layers], x cut and transformed once, where every layer would run as
    `strided_conv` on x with the same stride and filter size: both towers' conv1 in one process on one CPU,
    which read the same image (two devices each cut their own). None where any would not."""
    first = layers[0]
    if torch.compiler.is_compiling() or not all(
            isinstance(m, Conv2d) and m.padding_mode == "zeros" and m.weight.device == x.device
            and (m.stride, m.padding, m.dilation, m.groups, m.kernel_size)
            == (first.stride, first.padding, first.dilation, first.groups, first.kernel_size)
            and applies_strided(x, m.weight, m.stride, m.padding, m.dilation, m.groups) for m in layers):
        return None
    return strided_convs(x, [m.weight for m in layers], [m.bias for m in layers], first.stride[0])


class Conv2d(nn.Conv2d):
    """nn.Conv2d (the same parameters and state dict) whose stride-1 "same" 3x3 and 5x5 cases run by
    Winograd where `applies` says so (conv2-conv5 of both forms; spec.make_layer builds every layer so), and
    whose conv1 runs as a stride-1 convolution of its 4x4 blocks where `applies_strided` says so.
    The filters are transformed at every call, in evaluation too: keeping the transform beside a copy of
    the filters to compare with saved about 1.5 ms of a 330 ms forward (docs/benchmarks.md)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode == "zeros" and not torch.compiler.is_compiling() \
                and applies(input, weight, self.stride, self.padding, self.dilation):
            return conv(input, weight, bias, self.groups)
        if self.padding_mode == "zeros" and not torch.compiler.is_compiling() \
                and applies_strided(input, weight, self.stride, self.padding, self.dilation, self.groups):
            return strided_conv(input, weight, bias, self.stride[0])
        return super()._conv_forward(input, weight, bias)


def _channels_last(x: Tensor) -> Tensor:
    return x if x.stride(1) == 1 else x.contiguous(memory_format=torch.channels_last)


def _shape(x: Tensor, groups: int, out: tuple[int, int], pad: int = 0) -> _Shape:
    """x's Shape for the kernels of a convolution whose output is out = (height, width) pixels: its 2x2 tiles
    (numbered over x's batch), and x's padding where x is the input."""
    b, c, h, w = x.shape
    return _Shape(b, h, w, c, groups, x.stride(0), x.stride(2), x.stride(3), (out[0] + 1) // 2, (out[1] + 1) // 2, pad)


def _out_size(x: Tensor, r: int, pad: int) -> tuple[int, int]:
    return x.shape[2] + 2 * pad - r + 1, x.shape[3] + 2 * pad - r + 1


def _filters(weight: Tensor, groups: int) -> _Filters:
    return _Filters(weight.shape[0], weight.shape[1], groups, *weight.stride())


def _dense(weight: Tensor) -> Tensor:
    """The filters as they are where contiguous or channels_last (the C code takes their strides; the
    network's are channels_last under --channels-last), else a contiguous copy."""
    return weight if weight.is_contiguous() or weight.is_contiguous(memory_format=torch.channels_last) \
        else weight.contiguous()


def transform_weight(weight: Tensor, groups: int) -> Tensor:
    """U, (groups, n*n, C / groups, K / groups), from the filters (K, C / groups, r, r); n = r + 1. Filters
    in bfloat16 are transformed in float32 (exactly widened), and U rounded to bfloat16 once."""
    k, cg, r = weight.shape[:3]
    rounded = weight.dtype == torch.bfloat16
    weight = _dense(weight.float() if rounded else weight)
    u = weight.new_empty(groups, (r + 1) ** 2, cg, k // groups)
    _run("weight", r, weight.dtype, cg, weight.data_ptr(), _filters(weight, groups), u.data_ptr())
    return u.to(torch.bfloat16) if rounded else u


def _sums(dtype: torch.dtype) -> torch.dtype:
    """The dtype the transforms sum in and gradients accumulate in, for activations stored as `dtype`."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _tiles(shape: _Shape) -> int:
    return shape.batch * shape.tiles_h * shape.tiles_w


def _size(u: Tensor) -> int:
    """r, from transformed filters U (groups, (r + 1) ** 2, ...)."""
    return math.isqrt(u.shape[1]) - 1


def _run(name: str, size: int, dtype: torch.dtype, count: int, *args) -> None:
    """winograd_native.c's filter kernel `name` over input channels 0 .. count - 1, split over torch's threads."""
    _run_function(f"wino{size}_{name}_{_SUFFIX[dtype]}", count, *args)


def _run_function(name: str, count: int, *args) -> None:
    """winograd_native.c's function `name` over items 0 .. count - 1, split over torch's threads."""
    lib = load()
    fn = getattr(lib, name)
    run_all = (lambda threads: fn(*args, 0, count, threads)) if lib.wino_openmp() else None
    if any(native.in_threads(lambda lo, hi: fn(*args, lo, hi, 1), count, run_all)):
        raise RuntimeError(f"winograd_native.c: {name} failed")


class _Kernels:
    """winograd_native.c's kernels for one filter size and dtype, looked up once per convolution: the block
    loops call them hundreds of times, where each lookup and thread split in `_run` would cost more than
    a small block's transform."""

    def __init__(self, size: int, dtype: torch.dtype):
        self.lib = load()
        self.prefix = f"wino{size}_"
        self.suffix = f"_{_SUFFIX[dtype]}"
        self.width = getattr(self.lib, f"wino_width_{_SUFFIX[dtype]}")()
        self.threads = torch.get_num_threads()
        self.openmp = self.lib.wino_openmp()
        self.functions: dict[str, object] = {}

    def block(self, name: str, channels: int, t0: int, t1: int, *args) -> None:
        """The activations' kernel `name` on tiles t0 .. t1 - 1, its channels split over threads a vector at
        a time."""
        units = -(-channels // self.width)
        fn = self.functions.get(name)
        if fn is None:
            fn = self.functions[name] = getattr(self.lib, self.prefix + name + self.suffix)
        threads = min(self.threads, units)
        if threads == 1 or self.openmp:
            failed = fn(*args, t0, t1, 0, units, threads)
        else:
            failed = any(native.in_threads(lambda lo, hi: fn(*args, t0, t1, lo, hi, 1), units))
        if failed:
            raise RuntimeError(f"winograd_native.c: {name} failed")


def _products(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """out[g, e] = a[g, e] @ b[g, e] for every group g and point e, as one batched product written into
    `out` (5-26% faster than one torch.mm per matrix: docs/benchmarks.md)."""
    torch.bmm(a.flatten(0, 1), b.flatten(0, 1), out=out.flatten(0, 1))
    return out


class _Blocks:
    """One call's tiles in blocks of about `budget` bytes of transformed input and products, and a buffer
    per transformed tensor, reused by every block."""

    def __init__(self, x: Tensor, tiles: int, groups: int, points: int, channels: int, filters: int, budget: int):
        self.tiles = tiles
        per_tile = points * (channels + filters) * x.element_size()  # its transformed input and products
        self.step = min(self.tiles, max(MIN_BLOCK_TILES, budget // per_tile))
        self.groups, self.points, self.like = groups, points, x
        self.buffers: dict[str, Tensor] = {}

    def __iter__(self):
        for t0 in range(0, self.tiles, self.step):
            yield t0, min(self.tiles, t0 + self.step)

    def buffer(self, name: str, t0: int, t1: int, channels: int) -> Tensor:
        """(groups, points, t1 - t0, channels / groups), contiguous, in the buffer kept under `name` (made
        larger where a later call asks for more channels)."""
        size = self.groups * self.points * self.step * (channels // self.groups)
        if name not in self.buffers or self.buffers[name].numel() < size:
            self.buffers[name] = self.like.new_empty(size)
        n = self.groups * self.points * (t1 - t0) * (channels // self.groups)
        return self.buffers[name][:n].view(self.groups, self.points, t1 - t0, channels // self.groups)


def _forward(x: Tensor, us: Sequence[Tensor], biases: Sequence[Tensor | None], groups: int, pad: int,
             keep: bool = False) -> tuple[list[Tensor], Tensor | None]:
    """(ys, V): the convolutions of channels_last x (padded by `pad`) with each set of transformed filters
    in us, block by block of tiles (each block's transform serving them all), and where `keep`, x's whole
    transform V (computed as one block), else None."""
    b, c = x.shape[:2]
    ks = [u.shape[3] * groups for u in us]
    size, points = _size(us[0]), us[0].shape[1]
    out = _out_size(x, size, pad)
    ys = [torch.empty((b, k, *out), dtype=x.dtype, memory_format=torch.channels_last) for k in ks]
    zero = x.new_zeros(c)
    biases = [bias.to(_sums(x.dtype)).contiguous() if bias is not None else None  # the kernels add it in float
              for bias in biases]
    kernels, x_shape = _Kernels(size, x.dtype), _shape(x, groups, out, pad)
    y_shapes = [_shape(y, groups, out) for y in ys]
    blocks = _Blocks(x, _tiles(y_shapes[0]), groups, points, c, sum(ks), ALL if keep else BLOCK_BYTES)
    for t0, t1 in blocks:
        v = blocks.buffer("v", t0, t1, c)
        kernels.block("input", c, t0, t1, x.data_ptr(), x_shape, v.data_ptr(), zero.data_ptr())
        for u, bias, y, y_shape, k in zip(us, biases, ys, y_shapes, ks):
            m = _products(v, u, blocks.buffer("m", t0, t1, k))
            kernels.block("output", k, t0, t1, m.data_ptr(), bias.data_ptr() if bias is not None else None,
                          y_shape, y.data_ptr())
    return ys, v if keep else None


class _WinogradConv(torch.autograd.Function):
    """`convs`: x's convolutions with filters and biases w0, b0, w1, b1, ... (one set: `conv`)."""

    @staticmethod
    def forward(ctx, x: Tensor, groups: int, pad: int, keep: bool, *params: Tensor | None) -> tuple[Tensor, ...]:
        weights, biases = [_dense(w) for w in params[0::2]], list(params[1::2])
        us = [transform_weight(w, groups) for w in weights]
        x = _channels_last(x)
        size = _size(us[0])
        wants_w = [ctx.needs_input_grad[4 + 2 * i] for i in range(len(weights))]
        ys, v = _forward(x, us, biases, groups, pad, keep=keep and any(wants_w))
        ctx.by_winograd = BACKWARD_BY_WINOGRAD[size]
        ctx.save_for_backward(x, v, *(us if ctx.by_winograd else weights))
        ctx.groups, ctx.pad, ctx.has_bias = groups, pad, [b is not None for b in biases]
        ctx.weight_layouts = [(w.stride(), w.shape) for w in weights]  # each gradient is written in its filters' layout
        return tuple(ys)

    @staticmethod
    @once_differentiable  # the C transforms have no derivative of their own: a second derivative raises
    def backward(ctx, *grad_ys: Tensor):
        x, v, *us_or_weights = ctx.saved_tensors
        grad_ys = [_channels_last(g.to(x.dtype)) for g in grad_ys]  # the kernels read them as x's dtype (autograd gives y's)
        want_x = ctx.needs_input_grad[0]
        wants = [(ctx.needs_input_grad[4 + 2 * i], has and ctx.needs_input_grad[5 + 2 * i])
                 for i, has in enumerate(ctx.has_bias)]
        if ctx.by_winograd:
            grad_x, grad_ws = _backward(grad_ys, x, us_or_weights, v, ctx.groups, ctx.pad, want_x,
                                        [w for w, _ in wants], ctx.weight_layouts)
            grad_bs = [g.sum((0, 2, 3)) if want_b else None  # bfloat16: torch sums in float32, rounds once
                       for g, (_, want_b) in zip(grad_ys, wants)]
        else:
            each = [_direct_backward(g, x, w, ctx.groups, ctx.pad, (want_x, *want))
                    for g, w, want in zip(grad_ys, us_or_weights, wants)]
            grad_x = sum(e[0] for e in each) if want_x else None
            grad_ws, grad_bs = [e[1] for e in each], [e[2] for e in each]
        return grad_x, None, None, None, *[t for pair in zip(grad_ws, grad_bs) for t in pair]


def _direct_backward(grad_y: Tensor, x: Tensor, weight: Tensor, groups: int, pad: int, want: tuple[bool, bool, bool]):
    """(dx, dw, db) of the direct stride-1 convolution, as torch computes them (oneDNN)."""
    return torch.ops.aten.convolution_backward(grad_y, x, weight, [weight.shape[0]] if want[2] else None, [1, 1],
                                               [pad, pad], [1, 1], False, [0, 0], groups, list(want))


def _backward(grad_ys: Sequence[Tensor], x: Tensor, us: Sequence[Tensor], v: Tensor | None, groups: int, pad: int,
              want_x: bool, want_ws: Sequence[bool], weight_layouts) -> tuple[Tensor | None, list[Tensor | None]]:
    """(dx, [dw...]) by the transforms' adjoints, in one pass over blocks of tiles: for each set of filters
    dM = A dY At feeds dV += dM Ut (then dx, added patch by patch) and dU += V^T dM, to which every block adds,
    so blocks are larger where a dw is wanted. V is the forward's (v) or each block's again from x, once
    for all the sets."""
    c, ks = x.shape[1], [g.shape[1] for g in grad_ys]
    size, points = _size(us[0]), us[0].shape[1]
    sums = _sums(x.dtype)  # bfloat16: dx and dU are accumulated in float32, rounded once at the end
    grad_x = torch.zeros_like(x, dtype=sums, memory_format=torch.channels_last) if want_x else None
    dus = [torch.zeros_like(u, dtype=sums) if want else None for u, want in zip(us, want_ws)]
    zero_x, zero_y = x.new_zeros(c), x.new_zeros(max(ks))
    out = tuple(grad_ys[0].shape[2:])
    kernels, x_shape = _Kernels(size, x.dtype), _shape(x, groups, out, pad)
    y_shapes = [_shape(g, groups, out) for g in grad_ys]
    uts = [u.transpose(2, 3).contiguous() for u in us] if want_x else [None] * len(us)  # (groups, points, K/g, C/g)
    du_bytes = sum(du.numel() * du.element_size() for du in dus if du is not None)
    budget = max(BLOCK_BYTES, WEIGHT_BLOCKS_PER_DU * du_bytes) if du_bytes else BLOCK_BYTES
    blocks = _Blocks(x, _tiles(y_shapes[0]), groups, points, c, sum(ks), budget)
    for t0, t1 in blocks:
        v_block = v[:, :, t0:t1] if v is not None else None
        dv = blocks.buffer("dv", t0, t1, c) if want_x else None
        for i, (grad_y, y_shape, k, ut, du) in enumerate(zip(grad_ys, y_shapes, ks, uts, dus)):
            dm = blocks.buffer("dm", t0, t1, k)
            kernels.block("grad_output", k, t0, t1, grad_y.data_ptr(), y_shape, dm.data_ptr(), zero_y.data_ptr())
            if want_x:
                if i == 0:
                    _products(dm, ut, dv)
                else:
                    dv.flatten(0, 1).baddbmm_(dm.flatten(0, 1), ut.flatten(0, 1))
            if du is not None:
                if v_block is None:
                    v_block = blocks.buffer("v", t0, t1, c)
                    kernels.block("input", c, t0, t1, x.data_ptr(), x_shape, v_block.data_ptr(), zero_x.data_ptr())
                if du.dtype == dm.dtype:
                    du.flatten(0, 1).baddbmm_(v_block.flatten(0, 1).transpose(1, 2), dm.flatten(0, 1))
                else:  # bfloat16 products (no float32 output on the CPU): each block's rounded once, then added
                    du.flatten(0, 1).add_(torch.bmm(v_block.flatten(0, 1).transpose(1, 2), dm.flatten(0, 1)))
        if want_x:
            kernels.block("grad_input", c, t0, t1, dv.data_ptr(), x_shape, grad_x.data_ptr())
    grad_ws = []
    for du, (stride, shape) in zip(dus, weight_layouts):
        if du is None:
            grad_ws.append(None)
            continue
        grad_weight = torch.empty_strided(shape, stride, dtype=du.dtype)
        _run("grad_weight", size, du.dtype, shape[1], du.data_ptr(), _filters(grad_weight, groups),
             grad_weight.data_ptr())
        grad_ws.append(grad_weight.to(x.dtype))
    return grad_x.to(x.dtype) if want_x else None, grad_ws
