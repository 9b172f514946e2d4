"""The paper's LRN (section 3.3) as one Triton kernel forward and one backward, for CUDA tensors.
The default on a GPU where Triton is installed; REPRO_LRN_KERNEL=torch (or set_kernel("torch"))
selects the torch code of layers.py, which torch.compile fuses, instead.

Why it exists: compiled from the shifted-add form in layers.py, inductor's LRN kernels on an H100
took about 2.9 ms of a 13.2 ms bf16 training step at batch 256 (scripts/profile_step.py,
docs/benchmarks.md), several times what reading and writing the activations costs. Here the forward
holds a tile of pixels by all channels and reads each window's neighbours from cache; the backward
computes each element's window term once into a scratch slot that stays in L2.
Measured (H100, torch 2.11, bf16, channels_last, batch 256; scripts/benchmark_lrn.py and
scripts/benchmark.py): conv1's LRN forward + backward 1.38 ms (inductor 2.82), conv2's 0.79 ms
(inductor 4.64 compiled alone, for dynamic shapes); the grouped network's compiled, CUDA-graphed
step 11.13 ms (23,009 img/s) against 13.20 ms (19,390 img/s) with inductor's LRN. An earlier backward that
recomputed the window term at each of the 5 neighbours made the step slower (18.06 ms).

Both kernels can apply the ReLU that precedes the paper's two LRN layers as they read (RELU), and the
network's LocalResponseNorm modules ask for it: otherwise the ReLU is a pass of its own over the
activations each way, which inductor cannot fuse into an opaque kernel. Not yet timed on a GPU.

Both memory layouts work: element (n, c, h, w) sits at n*sN + c*sC + (h*W + w)*sHW in a contiguous
and in a channels_last tensor alike. Arithmetic is float32 whatever the storage type. The window
never leaves a channel group (the two towers' channels in the grouped form).

REPRO_LRN_KERNEL=triton-dot selects a second pair of kernels (opt-in: on an H200, forward and backward
with the ReLU folded in, 0.96 against 1.50 ms at conv1's shape but 1.04 against 0.84 at conv2's, and
1% slower in the step; docs/benchmarks.md, 2026-12-04): a program holds a tile of pixels by one channel
group, and the window sums, forward and backward, are one matrix product of the tile with a 0/1 band
matrix on the tensor cores (three TF32 products for float32 storage, about float32's precision; one for
bf16/fp16), so there are no shifted loads, no scratch slot and no barriers. Groups wider than 128
channels fall back to the kernels above.

The kernels are wrapped as custom ops (repro::lrn_forward, repro::lrn_backward) so torch.compile
and CUDA graphs treat them as single opaque calls. On the CPU the same kernels run under Triton's
interpreter (TRITON_INTERPRET=1), which is how the tests check them without a GPU; CPU tensors
otherwise always take the torch path.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. a CPU-only build on another platform): layers.py keeps its torch path
    triton = None

AVAILABLE = triton is not None
KERNEL_ENV = "REPRO_LRN_KERNEL"  # "triton" (the default where installed), "triton-dot", or "torch" (layers.py's)
# "triton-dot": the same kernels with the window sum as a matrix product by a 0/1 band matrix (tensor
# cores) instead of shifted loads (forward) and a scratch slot (backward); opt-in (see the docstring).
KERNELS = ("torch", "triton", "triton-dot")
DEFAULT_KERNEL = "triton" if AVAILABLE else "torch"
_kernel = DEFAULT_KERNEL  # set from KERNEL_ENV below
_TILE = 4096  # elements per program: BLOCK_P pixels x BLOCK_C channels


def _dense_format(x: Tensor) -> torch.memory_format | None:
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def set_kernel(name: str) -> None:
    """Which LRN code runs on a GPU from now on in this process (child processes read KERNEL_ENV)."""
    global _kernel, _env_error
    if name not in KERNELS:
        raise ValueError(f"LRN kernel {name!r} (set_kernel or {KERNEL_ENV}): choose one of {KERNELS}")
    if name != "torch" and not AVAILABLE:
        raise ValueError(f"LRN kernel {name!r} (set_kernel or {KERNEL_ENV}) needs the triton package, "
                         "which is not installed")
    _kernel = name
    _env_error = None  # a valid choice replaces an invalid environment's


def current_kernel() -> str:
    return _kernel


try:
    set_kernel(os.environ.get(KERNEL_ENV, DEFAULT_KERNEL))
    _env_error = None
except ValueError as exc:  # raised at the first LRN instead, where the scripts turn it into one line
    _env_error = str(exc)


def check_choice() -> None:
    """Raise the environment's bad kernel choice now (a script calls it before its long setup)."""
    if _env_error is not None:
        raise ValueError(_env_error)


def supported(x: Tensor) -> bool:
    """Whether the Triton kernels are chosen and take this tensor: a CUDA float tensor (not float64,
    which stays on the exact torch path the equivalence tests use), 4-D, contiguous or channels_last."""
    check_choice()
    return (_kernel != "torch" and AVAILABLE and x.is_cuda and x.dim() == 4
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and _dense_format(x) is not None)


if AVAILABLE:
    @triton.jit
    def _relu(v):
        """max(v, 0) that keeps NaN, as torch.relu does (tl.maximum would lower to maxnum: NaN -> 0,
        hiding a diverged layer behind a finite loss)."""
        return tl.where(v < 0.0, 0.0, v)

    @triton.jit
    def _tile(pid, P, HW, sN, sHW, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.arange(0, BLOCK_C)
        n = p // HW
        base = n.to(tl.int64) * sN + (p - n * HW).to(tl.int64) * sHW
        return base, c, p < P

    @triton.jit
    def _lrn_forward_kernel(x_ptr, y_ptr, d_ptr, P, HW, sN, sC, sHW, scale, beta, k, C: tl.constexpr,
                            CG: tl.constexpr, SIZE: tl.constexpr, RELU: tl.constexpr, BLOCK_P: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        # RELU: the input is the convolution's output and the LRN reads max(x, 0), so that the ReLU
        # before each LRN (paper section 3.3) costs no pass of its own over the activations.
        base, c, pmask = _tile(tl.program_id(0), P, HW, sN, sHW, BLOCK_P, BLOCK_C)
        in_group = c % CG  # position inside the channel group (constant divisor: no division instruction)
        mask = pmask[:, None] & (c < C)[None, :]
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(SIZE):
            d = i - SIZE // 2
            ok = mask & ((in_group + d >= 0) & (in_group + d < CG))[None, :]
            v = tl.load(x_ptr + base[:, None] + ((c + d) * sC)[None, :], mask=ok, other=0.0).to(tl.float32)
            if RELU:
                v = _relu(v)
            acc += v * v
        offs = base[:, None] + (c * sC)[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            x = _relu(x)
        denom = k + scale * acc
        y = x * tl.exp2(-beta * tl.log2(denom))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(d_ptr + offs, denom.to(d_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_terms(g_ptr, x_ptr, d_ptr, offs, mask, beta, RELU: tl.constexpr):
        """A tile's gradient g, the LRN's input a (max(x, 0) with RELU), where x > 0, D^-beta, and the
        window term t = g a D^(-beta-1), in float32."""
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        active = x > 0.0
        if RELU:
            x = _relu(x)
        den = tl.load(d_ptr + offs, mask=mask, other=1.0).to(tl.float32)
        inv = tl.exp2(-beta * tl.log2(den))
        return g, x, active, inv, g * x * inv / den

    @triton.jit
    def _lrn_backward_kernel(g_ptr, x_ptr, d_ptr, dx_ptr, t_ptr, P, HW, sN, sC, sHW, scale, beta, n_tiles,
                             C: tl.constexpr, CG: tl.constexpr, SIZE: tl.constexpr, RELU: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # dL/dx_c = g_c D_c^-beta - 2 scale beta x_c * sum over the window of t_j, t_j = g_j x_j D_j^(-beta-1)
        # (the window is symmetric and clipped alike at both ends, so j's window holds c iff c's holds j).
        # Each t_j is computed once per tile and put in this program's scratch slot, which the window then
        # reads shifted: a persistent grid keeps the slots few enough to stay in L2, so HBM sees g, x, D
        # read once and dx written once. The first version recomputed t at each of the 5 neighbours
        # (15 loads and 5 powers per element) and ran about 9x slower than the forward.
        # RELU: x_ptr holds the pre-activation z; x = max(z, 0), and dL/dz = dL/dx where z > 0, else 0.
        pid = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)
        in_group = c % CG
        slot = t_ptr + pid * (BLOCK_P * BLOCK_C) + tl.arange(0, BLOCK_P)[:, None] * BLOCK_C + c[None, :]
        for tile in range(pid, n_tiles, tl.num_programs(0)):
            base, _, pmask = _tile(tile, P, HW, sN, sHW, BLOCK_P, BLOCK_C)
            mask = pmask[:, None] & (c < C)[None, :]
            offs = base[:, None] + (c * sC)[None, :]
            g, x, active, inv, t = _backward_terms(g_ptr, x_ptr, d_ptr, offs, mask, beta, RELU)
            tl.store(slot, t)
            tl.debug_barrier()  # the slot is complete before any thread reads a neighbour's entry
            acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            for i in tl.static_range(SIZE):
                d = i - SIZE // 2
                ok = ((in_group + d >= 0) & (in_group + d < CG) & (c < C))[None, :]
                acc += tl.load(slot + d, mask=ok & pmask[:, None], other=0.0)
            dx = g * inv - (2.0 * scale * beta) * x * acc
            if RELU:
                dx = tl.where(active, dx, 0.0)
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.debug_barrier()  # every read of the slot is done before the next tile overwrites it

    @triton.jit
    def _window_band(CG: tl.constexpr, SIZE: tl.constexpr, BLOCK_C: tl.constexpr):
        """(BLOCK_C, BLOCK_C) 0/1 matrix over one group's channels: entry (i, j) is 1 where channel i
        lies in channel j's window (within SIZE // 2, both real channels). Symmetric, as the window is."""
        i = tl.arange(0, BLOCK_C)[:, None]
        j = tl.arange(0, BLOCK_C)[None, :]
        return ((i - j <= SIZE // 2) & (j - i <= SIZE // 2) & (i < CG) & (j < CG)).to(tl.float32)

    @triton.jit
    def _group_tile(P, HW, sN, sC, sHW, CG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Offsets and mask of this program's tile: BLOCK_P pixels by one channel group (axis 1)."""
        base, c, pmask = _tile(tl.program_id(0), P, HW, sN, sHW, BLOCK_P, BLOCK_C)
        mask = pmask[:, None] & (c < CG)[None, :]
        offs = base[:, None] + ((tl.program_id(1) * CG + c).to(tl.int64) * sC)[None, :]
        return offs, mask

    @triton.jit
    def _lrn_forward_dot_kernel(x_ptr, y_ptr, d_ptr, P, HW, sN, sC, sHW, scale, beta, k, CG: tl.constexpr,
                                SIZE: tl.constexpr, RELU: tl.constexpr, PRECISION: tl.constexpr,
                                BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # One load of the tile; the window sums of its squares are one (BLOCK_P x BLOCK_C) x (BLOCK_C x
        # BLOCK_C) product with the band matrix, on the tensor cores. A program holds one channel group
        # (the window never leaves it), which keeps the band matrix at most 128 x 128.
        offs, mask = _group_tile(P, HW, sN, sC, sHW, CG, BLOCK_P, BLOCK_C)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            x = _relu(x)
        acc = tl.dot(x * x, _window_band(CG, SIZE, BLOCK_C), input_precision=PRECISION)
        denom = k + scale * acc
        y = x * tl.exp2(-beta * tl.log2(denom))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(d_ptr + offs, denom.to(d_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _lrn_backward_dot_kernel(g_ptr, x_ptr, d_ptr, dx_ptr, P, HW, sN, sC, sHW, scale, beta,
                                 CG: tl.constexpr, SIZE: tl.constexpr, RELU: tl.constexpr,
                                 PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # The formula of _lrn_backward_kernel, with the window sum of t = g x D^(-beta-1) as a product
        # with the band matrix: no scratch, no barrier, one program per tile and group.
        offs, mask = _group_tile(P, HW, sN, sC, sHW, CG, BLOCK_P, BLOCK_C)
        g, x, active, inv, t = _backward_terms(g_ptr, x_ptr, d_ptr, offs, mask, beta, RELU)
        acc = tl.dot(t, _window_band(CG, SIZE, BLOCK_C), input_precision=PRECISION)
        dx = g * inv - (2.0 * scale * beta) * x * acc
        if RELU:
            dx = tl.where(active, dx, 0.0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _geometry(x: Tensor, groups: int) -> dict:
    """What every kernel takes about x: pixel count, pixels per image, channels per group, strides."""
    n, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"LRN over {groups} groups needs channels divisible by it, got {c}")
    s_n, s_c, s_h, s_w = x.stride()
    # One pixel step for all h*w pixels. When w == 1, torch counts the tensor dense whatever its w
    # stride says (a size-1 dimension is never stepped over), so the step is the h stride.
    return dict(P=n * h * w, HW=h * w, CG=c // groups, sN=s_n, sC=s_c, sHW=s_h if w == 1 else s_w)


def _launch_shape(x: Tensor, groups: int):
    geo = _geometry(x, groups)
    c = x.shape[1]
    block_c = triton.next_power_of_2(c)
    block_p = max(1, _TILE // block_c)
    return (triton.cdiv(geo["P"], block_p),), dict(geo, C=c, BLOCK_P=block_p, BLOCK_C=block_c)


_DOT_MAX_GROUP = 128  # channels per group the band-matrix kernels take (a 128 x 128 float32 band: 64 KiB)


def _dot_launch_shape(x: Tensor, groups: int):
    """Grid (pixel tiles, groups) and sizes for the band-matrix kernels, or None where a group is too
    wide for them (the shifted-load kernels then run)."""
    geo = _geometry(x, groups)
    if geo["CG"] > _DOT_MAX_GROUP:
        return None
    block_c = max(16, triton.next_power_of_2(geo["CG"]))  # a matrix product on the GPU needs dimensions >= 16
    block_p = max(16, _TILE // block_c)
    # 8 warps, not Triton's default 4: at 4, ptxas for sm_90 spills registers in these kernels (bf16
    # backward at 128-channel groups: 255 registers and 560 B of spills); at 8 it does not. Not yet timed.
    return (triton.cdiv(geo["P"], block_p), groups), dict(geo, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=8)


def _persistent_programs(device: torch.device) -> int:
    """Programs of the persistent backward grid: a few per SM on a GPU (their fp32 scratch slots,
    16 KiB each, then total about 8 MiB on an H100, well inside its L2); two on the CPU, where the
    interpreter runs them one after another, so that the tests' tensors give each several tiles."""
    if device.type != "cuda":
        return 2
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Runs a kernel; a GPU or Triton build that cannot compile or launch it (Triton needs compute
    capability 7.0 or newer, for one) becomes an error that says how to do without it."""
    try:
        with torch.cuda.device(args[0].device) if args[0].is_cuda else contextlib.nullcontext():
            kernel[grid](*args, **kwargs)  # Triton launches on the current device's current stream
    except Exception as exc:
        where = torch.cuda.get_device_name(args[0].device) if args[0].is_cuda else str(args[0].device)
        name = getattr(kernel, "__name__", kernel)
        raise RuntimeError(f"the Triton LRN kernel ({name}) failed on {where}: {type(exc).__name__}: {exc}. "
                           f"Set {KERNEL_ENV}=torch to use the torch LRN code instead (the same function; "
                           "slower on the GPUs measured).") from exc


def _dot_precision(x: Tensor) -> str:
    """float32 storage: three TF32 products (about float32's precision); 16-bit storage: one, whose
    10-bit mantissa is finer than what bf16 or fp16 keeps of the result."""
    return "tf32x3" if x.dtype == torch.float32 else "tf32"


def lrn_forward(x: Tensor, size: int, scale: float, beta: float, k: float, groups: int,
                relu: bool = False) -> tuple[Tensor, Tensor]:
    """(output, denominator k + scale * window sum of squares), both laid out like x; with `relu`,
    the LRN of max(x, 0)."""
    fmt = _dense_format(x)
    src = x if fmt is not None else x.contiguous()
    y, denom = torch.empty_like(src), torch.empty_like(src)
    dot = _dot_launch_shape(src, groups) if src.numel() and _kernel == "triton-dot" else None
    if dot is not None:
        grid, shape = dot
        _launch(_lrn_forward_dot_kernel, grid, src, y, denom, scale=scale, beta=beta, k=k, SIZE=size, RELU=relu,
                PRECISION=_dot_precision(src), **shape)
    elif src.numel():
        grid, shape = _launch_shape(src, groups)
        _launch(_lrn_forward_kernel, grid, src, y, denom, scale=scale, beta=beta, k=k, SIZE=size, RELU=relu,
                **shape)
    if fmt is None:  # match empty_like(x), which is what the op promises
        y, denom = torch.empty_like(x).copy_(y), torch.empty_like(x).copy_(denom)
    return y, denom


def lrn_backward(grad: Tensor, x: Tensor, denom: Tensor, size: int, scale: float, beta: float,
                 groups: int, relu: bool = False) -> Tensor:
    """The gradient with respect to lrn_forward's input x (with `relu`, through the ReLU too)."""
    fmt = _dense_format(x) or torch.contiguous_format
    x_, denom_ = x.contiguous(memory_format=fmt), denom.contiguous(memory_format=fmt)
    grad_ = grad.contiguous(memory_format=fmt)  # autograd may hand the gradient in another layout
    dx = torch.empty_like(x_)
    dot = _dot_launch_shape(x_, groups) if x_.numel() and _kernel == "triton-dot" else None
    if dot is not None:
        grid, shape = dot
        _launch(_lrn_backward_dot_kernel, grid, grad_, x_, denom_, dx, scale=scale, beta=beta, SIZE=size,
                RELU=relu, PRECISION=_dot_precision(x_), **shape)
    elif x_.numel():
        (n_tiles,), shape = _launch_shape(x_, groups)
        programs = min(n_tiles, _persistent_programs(x_.device))
        scratch = torch.empty(programs * shape["BLOCK_P"] * shape["BLOCK_C"], dtype=torch.float32,
                              device=x_.device)
        _launch(_lrn_backward_kernel, (programs,), grad_, x_, denom_, dx, scratch, scale=scale, beta=beta,
                n_tiles=n_tiles, SIZE=size, RELU=relu, **shape)
    return dx if _dense_format(x) is not None else torch.empty_like(x).copy_(dx)


if AVAILABLE:
    @torch.library.custom_op("repro::lrn_forward", mutates_args=())
    def lrn_forward_op(x: Tensor, size: int, scale: float, beta: float, k: float, groups: int,
                       relu: bool) -> tuple[Tensor, Tensor]:
        return lrn_forward(x, size, scale, beta, k, groups, relu)

    @lrn_forward_op.register_fake
    def _(x, size, scale, beta, k, groups, relu):
        return torch.empty_like(x), torch.empty_like(x)

    @torch.library.custom_op("repro::lrn_backward", mutates_args=())
    def lrn_backward_op(grad: Tensor, x: Tensor, denom: Tensor, size: int, scale: float, beta: float,
                        groups: int, relu: bool) -> Tensor:
        return lrn_backward(grad, x, denom, size, scale, beta, groups, relu)

    @lrn_backward_op.register_fake
    def _(grad, x, denom, size, scale, beta, groups, relu):
        return torch.empty_like(x)
