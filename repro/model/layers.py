"""The paper's layers that torch does not have as such: per-group LRN and dropout whose mask does not
depend on how the layer is split across towers."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro.config import LRNConfig
from repro.model import lrn_cpu, lrn_triton
from repro.model.lrn_cpu import inverse_power, window_sum_fusable


WINDOW_ENV = "REPRO_LRN_WINDOW"  # how the CPU sums LRN windows: "shifted" adds (default) or "band" products


def channel_window_sum(t: Tensor, size: int, groups: int) -> Tensor:
    """Sum of `t` over a centred window of `size` channels that never leaves its channel group.

    Channel i of group g sums channels max(lo, i - size//2) .. min(hi, i + size//2) of the same group,
    which is the paper's clipped window (section 3.3) applied to each tower's channels on their own.
    REPRO_LRN_WINDOW=band computes it as a product with a 0/1 band matrix instead (`band_window_sum`).
    """
    if torch.compiler.is_compiling():
        return window_sum_fusable(t, size, groups)
    window = os.environ.get(WINDOW_ENV, "shifted")
    if window == "band":
        return band_window_sum(t, size, groups)
    if window != "shifted":  # a misspelt choice must not silently time the other method
        raise ValueError(f"{WINDOW_ENV}={window!r}: choose 'shifted' (the default) or 'band'")
    return _window_sum_in_place(t, size, groups)


def window_band(channels: int, size: int, dtype: torch.dtype, device=None) -> Tensor:
    """The (channels, channels) 0/1 matrix M with M[i, j] = 1 where |i - j| <= size // 2: the clipped
    centred window as a matrix. It is symmetric, so the same M serves the backward's window sum."""
    i = torch.arange(channels, device=device)
    return ((i[:, None] - i[None, :]).abs() <= size // 2).to(dtype)


def band_window_sum(t: Tensor, size: int, groups: int) -> Tensor:
    """channel_window_sum as matrix products: NCHW as a batched (Cg, Cg) @ (Cg, HW) per image and
    group; channels_last as one (BHW, C) @ block-diagonal (C, C) GEMM. A candidate for CPUs whose
    oneDNN GEMMs are fast (AVX-512, AMX); on AVX2 (docs/benchmarks.md) the shifted adds are faster."""
    b, c, h, w = t.shape
    cg = c // groups
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        m = torch.block_diag(*[window_band(cg, size, t.dtype, t.device)] * groups)
        s = t.permute(0, 2, 3, 1).reshape(-1, c) @ m
        return s.reshape(b, h, w, c).permute(0, 3, 1, 2)
    m = window_band(cg, size, t.dtype, t.device)
    return torch.matmul(m, t.reshape(b, groups, cg, h * w)).reshape(b, c, h, w)


def _window_sum_in_place(t: Tensor, size: int, groups: int) -> Tensor:
    """The same sums, eagerly: one copy, then each shifted slice added into it in place. Without a
    compiler every op is a pass over memory, and the padded form's copy and new tensor per add made
    the CPU's LRN about twice as slow (the main job and the tests run it)."""
    b, c, h, w = t.shape
    cg = c // groups
    channels_last = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    v = t.permute(0, 2, 3, 1).reshape(b, h * w, groups, cg) if channels_last else t.reshape(b, groups, cg, h * w)
    axis = 3 if channels_last else 2
    s = v.clone()
    for d in range(1, min(size // 2, cg - 1) + 1):
        s.narrow(axis, d, cg - d).add_(v.narrow(axis, 0, cg - d))  # channel i gains channel i - d
        s.narrow(axis, 0, cg - d).add_(v.narrow(axis, d, cg - d))  # and channel i + d
    return s.reshape(b, h, w, c).permute(0, 3, 1, 2) if channels_last else s.reshape(b, c, h, w)


class _LRNFunction(torch.autograd.Function):
    """b = a * D^-beta with D = k + scale * window_sum(a^2); one saved denominator, explicit backward.
    a is the input x, or with `relu` max(x, 0): the ReLU that precedes both of the paper's LRN layers,
    folded in so that on a GPU it is not a pass of its own over the activations, forward or backward.

    Backward, for a window that is symmetric (odd size) and clipped the same way at both ends:
      dL/da_j = g_j D_j^-beta - 2 scale beta a_j * window_sum(g b / D)_j
    and with `relu`, dL/dx_j = dL/da_j where x_j > 0, else 0 (as torch's ReLU backward).

    On a GPU lrn_triton.py's kernels run (float32/bf16/fp16; measured faster); on the CPU lrn_cpu.py's
    compiled or native kernels (float32/bf16, --cpu-lrn); the torch code below in float64, with REPRO_LRN_KERNEL=torch on a
    GPU or REPRO_LRN_CPU=eager on the CPU, and inside a caller's torch.compile (which fuses it).
    """

    @staticmethod
    def forward(ctx, x: Tensor, size: int, scale: float, beta: float, k: float, groups: int,
                relu: bool = False, inplace: bool = False) -> Tensor:
        ctx.params = (size, scale, beta, k, groups, relu)
        ctx.kernel = "torch"
        if lrn_triton.supported(x):
            y, denom = torch.ops.repro.lrn_forward(x, size, scale, beta, k, groups, relu)
            ctx.kernel = "triton"
        elif lrn_cpu.supported(x) and (out := lrn_cpu.forward(x, size, scale, beta, k, groups, relu,
                                                              need_denom=ctx.needs_input_grad[0], inplace=inplace)):
            y, denom = out  # denom None where no backward will run, or the native kernel recomputes it
            ctx.kernel = "cpu"
        else:
            a = F.relu(x) if relu else x
            denom = channel_window_sum(a * a, size, groups).mul_(scale).add_(k)
            y = a * inverse_power(denom, beta)
        ctx.save_for_backward(x, denom)  # b (and a) recomputed in backward: two saved tensors, not three
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, denom = ctx.saved_tensors
        size, scale, beta, k, groups, relu = ctx.params
        if ctx.kernel == "triton":
            return torch.ops.repro.lrn_backward(grad_y, x, denom, size, scale, beta, groups, relu), *[None] * 7
        if ctx.kernel == "cpu":
            grad_x = lrn_cpu.backward(grad_y, x, denom, size, scale, beta, groups, relu, k)
            if grad_x is not None:
                return grad_x, *[None] * 7
        a = F.relu(x) if relu else x
        g_inv = grad_y * inverse_power(denom, beta)  # g D^-beta, the first term; g b / D = g_inv a / D
        window = channel_window_sum(g_inv.mul(a).div_(denom), size, groups)
        grad_a = torch.addcmul(g_inv, a, window, value=-2.0 * scale * beta)
        return (torch.where(x > 0, grad_a, 0.0) if relu else grad_a), *[None] * 7


def local_response_norm(x: Tensor, cfg: LRNConfig, groups: int = 1, relu: bool = False,
                        inplace: bool = False) -> Tensor:
    """The paper's formula (section 3.3), with the window restricted to each of `groups` channel blocks;
    with `relu`, of max(x, 0) (the same function as local_response_norm(F.relu(x), ...), fused). With
    `inplace`, x may be overwritten by the result where no gradient is wanted (the native CPU kernel
    does so: an evaluation forward allocates nothing for it)."""
    if x.shape[1] % groups:
        raise ValueError(f"LRN over {groups} groups needs channels divisible by it, got {x.shape[1]}")
    inplace = inplace and not (torch.is_grad_enabled() and x.requires_grad)
    return _LRNFunction.apply(x, cfg.size, cfg.sum_scale, cfg.beta, cfg.k, groups, relu, inplace)


class LocalResponseNorm(nn.Module):
    """Across-channel LRN (paper section 3.3); `groups` = 2 in the grouped form keeps each window
    inside one tower's channels, so the grouped network is the two-tower network. With `relu`, the
    module is ReLU then LRN, the paper's order after conv1 and conv2, computed in one pass."""

    def __init__(self, cfg: LRNConfig, groups: int = 1, relu: bool = False, inplace: bool = False):
        super().__init__()
        self.cfg = cfg
        self.groups = groups
        self.relu = relu
        self.inplace = inplace  # the input may be overwritten where no gradient is wanted

    def forward(self, x: Tensor) -> Tensor:
        if not self.cfg.enabled:
            return F.relu(x) if self.relu else x
        return local_response_norm(x, self.cfg, self.groups, self.relu, self.inplace)

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"{'ReLU first, ' if self.relu else ''}size={c.size}, alpha={c.alpha} ({c.alpha_convention}), "
                f"beta={c.beta}, k={c.k}, groups={self.groups}, enabled={c.enabled}"
                + (", in place without grad" if self.inplace else ""))


def _plain_pooling(pool: nn.Module) -> tuple[int, int] | None:
    """(kernel, stride) of a square max pooling without padding, dilation, ceil mode or indices; else None."""
    if type(pool) is not nn.MaxPool2d or pool.return_indices or pool.ceil_mode:
        return None
    kernel, stride, padding, dilation = (v if isinstance(v, tuple) else (v, v)
                                         for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
    if kernel[0] != kernel[1] or stride[0] != stride[1] or padding != (0, 0) or dilation != (1, 1):
        return None
    return kernel[0], stride[0]


def lrn_then_pool(lrn: LocalResponseNorm, pool: nn.Module, x: Tensor, between: nn.Module | None = None) -> Tensor:
    """pool(between(lrn(x))), `between` a layer in the middle or None. Where there is none, no gradient is
    wanted and the native CPU LRN runs on channels_last activations (an evaluation forward), one pass
    computes both and the LRN's output is never written to memory: the same bits as the two modules
    (lrn_native.forward_pool)."""
    if between is not None and not isinstance(between, nn.Identity):
        return pool(between(lrn(x)))
    pooling = _plain_pooling(pool)
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (lrn, pool))  # a user's hook sees the LRN's output
    if (lrn.cfg.enabled and pooling is not None and not hooked and not (torch.is_grad_enabled() and x.requires_grad)
            and x.dim() == 4 and x.shape[1] % lrn.groups == 0 and min(x.shape[2:]) >= pooling[0]):
        c = lrn.cfg
        out = lrn_cpu.forward_pool(x, c.size, c.sum_scale, c.beta, c.k, lrn.groups, lrn.relu, *pooling)
        if out is not None:
            return out
    return pool(lrn(x))


_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2^27: products of 32-bit values stay below 2^59, so int64 never overflows


def _mix32(h: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) on int64 tensors holding values < 2^32."""
    h = (((h >> 16) ^ h) * _MIX) & _MASK32
    h = (((h >> 16) ^ h) * _MIX) & _MASK32
    return (h >> 16) ^ h


def keep_mask(counter: Tensor, stream: int, layer: int, rows: int, total_cols: int, col_offset: int,
              cols: int, p: float) -> Tensor:
    """Dropout keep-mask for columns [col_offset, col_offset + cols) of a (rows, total_cols) layer.

    Element (i, j) is a pure function of (counter, stream, layer, i, j), so a tower computing its
    columns and the grouped form computing all of them draw the same mask, on any device, and the
    mask never needs to cross between towers.
    """
    dev = counter.device
    seed = _mix32((counter & _MASK32) ^ ((stream * 0x3C6EF372 + layer * 0x1B873593) & _MASK32))
    seed = _mix32(seed ^ 0x5BD1E995)
    row = torch.arange(rows, device=dev, dtype=torch.int64).unsqueeze(1) * total_cols
    col = torch.arange(col_offset, col_offset + cols, device=dev, dtype=torch.int64).unsqueeze(0)
    h = _mix32(((row + col) & _MASK32) ^ seed)
    return h >= int(round(p * 2 ** 32))


class SharedMaskDropout(nn.Module):
    """Dropout on the outputs of fc6 and fc7 (paper section 4.2).

    Each tower holds a slice [col_offset, col_offset + cols) of a `total_cols`-wide layer. The mask
    comes from `keep_mask`, keyed by a per-layer step counter (a buffer, so a checkpoint resumes the
    same masks) that advances once per training forward. `stream` separates data-parallel replicas.
    """

    def __init__(self, p: float, layer: int, total_cols: int, col_offset: int, cols: int,
                 scaling: str = "paper"):
        super().__init__()
        self.p, self.layer, self.scaling = p, layer, scaling
        self.total_cols, self.col_offset, self.cols = total_cols, col_offset, cols
        self.stream = 0
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0:
            return x
        if not self.training:
            return x * (1.0 - self.p) if self.scaling == "paper" else x
        mask = keep_mask(self.step, self.stream, self.layer, x.shape[0], self.total_cols,
                         self.col_offset, self.cols, self.p)
        self.step.add_(1)
        scale = 1.0 if self.scaling == "paper" else 1.0 / (1.0 - self.p)
        return x * (mask.to(x.dtype) * scale)

    def extra_repr(self) -> str:
        return (f"p={self.p}, columns [{self.col_offset}, {self.col_offset + self.cols}) of "
                f"{self.total_cols}, scaling={self.scaling}")


def set_dropout_stream(model: nn.Module, stream: int) -> None:
    """Give a data-parallel replica its own dropout masks (replicas see different images anyway)."""
    for m in model.modules():
        if isinstance(m, SharedMaskDropout):
            m.stream = stream


# The 2012 code's same-map ("rnorm") response normalisation after conv2's cross-map LRN: not in the paper.
# Constants from layers-145.cfg:107-117 and layer-params-145.cfg:157-163; layer.py:1183 divides the
# scale by size^2; the kernel adds 1 (cuda-convnet2 cudaconv3/src/conv_util.cu kCNorm_fewfilter).
SAME_MAP_NORM_SIZE = 5
SAME_MAP_NORM_SCALE = 0.001
SAME_MAP_NORM_POWER = 0.75


def same_map_response_norm(x: Tensor, size: int = SAME_MAP_NORM_SIZE, scale: float = SAME_MAP_NORM_SCALE,
                           power: float = SAME_MAP_NORM_POWER) -> Tensor:
    """x / (1 + scale / size^2 * sum of x^2 over a size x size window of the same map) ^ power.

    The window is centred on the pixel (from -size//2) and clipped at the map's edges: zero padding in a
    sum of squares is the clipped sum. Each channel alone, so towers and groups do not matter."""
    window_sum = F.avg_pool2d(x * x, size, stride=1, padding=size // 2, count_include_pad=True) * (size * size)
    return x * (1.0 + (scale / (size * size)) * window_sum).pow(-power)


class SameMapResponseNorm(nn.Module):
    """`same_map_response_norm` as a layer (the 2012 code's cnorm2 in layers-145.cfg)."""

    def forward(self, x: Tensor) -> Tensor:
        return same_map_response_norm(x)

    def extra_repr(self) -> str:
        return f"size={SAME_MAP_NORM_SIZE}, scale={SAME_MAP_NORM_SCALE}/size^2, power={SAME_MAP_NORM_POWER}, k=1"


def pad_for_conv1(image: Tensor, cfg) -> Tensor:
    """Zero pixels on the right and bottom so that conv1 gives cfg's output size (ModelConfig.conv1_ceil:
    the 2012 code's 224 input reads 3 pixels past the image); the image itself without conv1_ceil."""
    pad_h, pad_w = cfg.conv1_padding(image.shape[-2]), cfg.conv1_padding(image.shape[-1])
    return F.pad(image, (0, pad_w, 0, pad_h)) if pad_h or pad_w else image
