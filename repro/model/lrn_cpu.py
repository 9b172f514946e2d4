"""Which LRN code runs on the CPU, and the compiled kernels: the paper's ReLU + LRN (section 3.3) in a few
passes that torch.compile (inductor's C++ backend) builds, instead of the dozen passes over memory the
same formula costs eagerly: measured 2.4-6.1x faster forward + backward at the network's shapes, by CPU
(docs/benchmarks.md). The third choice, "native", is lrn_native.py's C kernels: one pass each way, one
build of a few seconds for every shape.

Not always the better choice: each layer shape compiles its kernels once per machine (about 12 s each on
a 2-core CPU with a cold cache, under a second from inductor's on-disk cache), so a short run is faster
eagerly. A training run chooses once, at its first launch, and keeps the choice in its checkpoints
(TrainConfig.cpu_lrn): a resumed run computes with the same kernel, bit for bit. REPRO_LRN_CPU=eager,
=compiled or =native overrides every choice in the process (benchmarks, evaluation, tests).

float32 and bfloat16 only: float64 stays on layers.py's eager torch code, the exact path the equivalence
tests compare with. Where inductor (or, for "native", the C compiler) cannot build, the first call says
so once and the eager code runs.

Passes, each one read of its inputs and one write:
  forward:  y, D = a * D^-beta, k + scale * window_sum(a^2)       (a = max(x, 0) with `relu`)
  backward: t = g * y / D                                          (materialised: the window reads it 5x)
            dx = g * D^-beta - 2 scale beta * a * window_sum(t)     (0 where x <= 0 with `relu`)
In NCHW each shifted window term is a whole plane and vectorises without masks; in channels_last the
window runs along the innermost axis, so the pass before writes a zero-padded copy that needs no masks.
One kernel serves every batch size; a new layer shape (channels, height, width) compiles its own.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from repro.model import lrn_native

KERNEL_ENV = "REPRO_LRN_CPU"  # "eager", "compiled" or "native": overrides set_kernel for the whole process
KERNELS = ("eager", "compiled", "native")


def window_sum_fusable(t: Tensor, size: int, groups: int) -> Tensor:
    """Sum over each centred, clipped window of `size` channels inside its group, as shifted slices of
    a zero-padded copy: a form torch.compile fuses into one pass (layers.channel_window_sum's contract)."""
    b, c, h, w = t.shape
    r = size // 2
    cg = c // groups
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        u = F.pad(t.permute(0, 2, 3, 1).reshape(b, h, w, groups, cg), (r, r))
        s = u[..., 0:cg]
        for d in range(1, size):
            s = s + u[..., d:d + cg]
        return s.reshape(b, h, w, c).permute(0, 3, 1, 2)
    u = F.pad(t.reshape(b, groups, cg, h * w), (0, 0, r, r))
    s = u[:, :, 0:cg]
    for d in range(1, size):
        s = s + u[:, :, d:d + cg]
    return s.reshape(b, c, h, w)


def inverse_power(d: Tensor, beta: float) -> Tensor:
    """d ** -beta; for the paper's beta = 0.75 as rsqrt(d) * sqrt(rsqrt(d)), which the CPU computes
    about 1.7x faster than a general power (eagerly in place, out of place inside a compiled graph)."""
    if beta != 0.75:
        return d.pow(-beta)
    r = d.rsqrt()
    return r * r.sqrt() if torch.compiler.is_compiling() else r.mul_(r.sqrt())


def _relu(x: Tensor) -> Tensor:
    return torch.where(x < 0, 0.0, x)  # NaN stays NaN, as torch.relu: a diverged layer must show


def _forward(x: Tensor, size: int, scale: float, beta: float, k: float, groups: int, relu: bool):
    a = _relu(x) if relu else x
    denom = window_sum_fusable(a * a, size, groups) * scale + k
    return a * inverse_power(denom, beta), denom


def _backward_t(grad_y: Tensor, x: Tensor, denom: Tensor, beta: float, relu: bool) -> Tensor:
    a = _relu(x) if relu else x
    return grad_y * inverse_power(denom, beta) * a / denom


def _backward_dx(t: Tensor, grad_y: Tensor, x: Tensor, denom: Tensor, size: int, scale: float, beta: float,
                 groups: int, relu: bool) -> Tensor:
    a = _relu(x) if relu else x
    grad_a = grad_y * inverse_power(denom, beta) - (2.0 * scale * beta) * a * window_sum_fusable(t, size, groups)
    return torch.where(x > 0, grad_a, 0.0) if relu else grad_a


# channels_last: the window runs along the innermost (channel) axis, where inductor's shifted loads need a
# mask per lane; over a zero-padded copy, written by the pass before, they need none. Every pass works on
# the (B, H, W, groups, C/groups) view, whose indices are affine: computed on (B, C, H, W), the group of a
# channel (c // C/groups) made inductor gather lane by lane, and two groups cost twice one.

def _grouped(t: Tensor, groups: int) -> Tensor:
    b, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(b, h, w, groups, c // groups)


def _ungrouped(t: Tensor) -> Tensor:
    b, h, w, groups, cg = t.shape
    return t.reshape(b, h, w, groups * cg).permute(0, 3, 1, 2)


def _window_of_padded(u: Tensor, size: int) -> Tensor:
    cg = u.shape[-1] - 2 * (size // 2)
    s = u[..., 0:cg]
    for d in range(1, size):
        s = s + u[..., d:d + cg]
    return s


def _cl_squares(x: Tensor, size: int, groups: int, relu: bool) -> Tensor:
    """(B, H, W, groups, C/groups + 2r): the squares, with r zeros on both sides of each group's channels."""
    a = _grouped(x, groups)
    a = _relu(a) if relu else a
    return F.pad(a * a, (size // 2, size // 2))


def _cl_forward(u: Tensor, x: Tensor, size: int, scale: float, beta: float, k: float, groups: int, relu: bool):
    a = _grouped(x, groups)
    a = _relu(a) if relu else a
    denom = _window_of_padded(u, size) * scale + k
    return _ungrouped(a * inverse_power(denom, beta)), _ungrouped(denom)


def _cl_backward_t(grad_y: Tensor, x: Tensor, denom: Tensor, size: int, beta: float, groups: int,
                   relu: bool) -> Tensor:
    t = _backward_t(_grouped(grad_y, groups), _grouped(x, groups), _grouped(denom, groups), beta, relu)
    return F.pad(t, (size // 2, size // 2))


def _cl_backward_dx(t: Tensor, grad_y: Tensor, x: Tensor, denom: Tensor, size: int, scale: float, beta: float,
                    groups: int, relu: bool) -> Tensor:
    g, x, d = _grouped(grad_y, groups), _grouped(x, groups), _grouped(denom, groups)
    a = _relu(x) if relu else x
    grad_a = g * inverse_power(d, beta) - (2.0 * scale * beta) * a * _window_of_padded(t, size)
    return _ungrouped(torch.where(x > 0, grad_a, 0.0) if relu else grad_a)


_compiled: dict[str, object] = {}
_broken: dict[str, str] = {}  # kernel -> why it could not be built here, once it failed
_kernel = "eager"  # until a run or a script chooses


def _checked(name: str, where: str) -> str:
    if name not in KERNELS:  # a misspelt choice must not silently time the other kernel
        raise ValueError(f"CPU LRN kernel {name!r} ({where}): choose one of {', '.join(KERNELS)}")
    return name


def set_kernel(name: str) -> None:
    """Which LRN code runs on the CPU from now on in this process, unless REPRO_LRN_CPU says otherwise."""
    global _kernel
    _kernel = _checked(name, "set_kernel")


def current_kernel() -> str:
    env = os.environ.get(KERNEL_ENV)
    return _checked(env, KERNEL_ENV) if env else _kernel


def supported(x: Tensor) -> bool:
    """Whether the chosen kernel (compiled or native) takes `x`: a 4-D float32 or bfloat16 CPU tensor,
    outside a torch.compile of the caller (which fuses the eager formula itself), the kernel buildable here."""
    kernel = current_kernel()
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.bfloat16)
            and kernel != "eager" and kernel not in _broken and not torch.compiler.is_compiling())


def _unbuildable(kernel: str, exc: Exception) -> None:
    """Say once why `kernel` cannot run here; the eager code runs from now on."""
    _broken[kernel] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    warnings.warn(f"the {kernel} CPU LRN could not be built ({_broken[kernel]}); using the eager torch code, "
                  f"which is slower. Set {KERNEL_ENV}=eager to choose it and silence this.", stacklevel=4)


# Channels and sizes stay static (a kernel with symbolic sizes measured 2-3x slower): a new layer shape
# compiles its own kernel rather than turning the first one dynamic; room for many shapes, dtypes, formats.
_DYNAMO_SETTINGS = {"automatic_dynamic_shapes": False, "recompile_limit": 64}


def _run(name: str, fn, *args):
    if name not in _compiled:
        quiet = logging.getLogger("torch.utils.cpp_extension")  # its "No CUDA runtime" line on CPU machines
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            importlib.import_module("torch.utils.cpp_extension")  # inductor's C++ build imports it; it warns once
        finally:
            quiet.setLevel(level)
        _compiled[name] = torch.compile(fn, fullgraph=True)
    # Detached: autograd never runs through these kernels (layers.py's Function calls the backward
    # kernels itself), and a requires_grad flag would be a guard, so training's and evaluation's calls
    # would compile a kernel each
    args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    for t in args:
        if isinstance(t, Tensor):
            torch._dynamo.maybe_mark_dynamic(t, 0)  # one kernel for every batch size
    settings = {key: value for key, value in _DYNAMO_SETTINGS.items() if hasattr(torch._dynamo.config, key)}
    try:
        with torch._dynamo.config.patch(**settings):
            return _compiled[name](*args)
    except Exception as exc:  # noqa: BLE001 - any build failure: say it once, then the eager code runs
        _unbuildable("compiled", exc)
        return None


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _forward_y(*args) -> Tensor:
    return _forward(*args)[0]


def _cl_forward_y(*args) -> Tensor:
    return _cl_forward(*args)[0]


def forward(x: Tensor, size: int, scale: float, beta: float, k: float, groups: int, relu: bool,
            need_denom: bool = True, inplace: bool = False):
    """(y, denom) in x's memory format (NCHW unless x is channels_last), or None where the kernel could not
    be built (the caller then runs the eager code). Without `need_denom` (no backward will run:
    evaluation), denom is None and never written: one pass over memory less. The native kernel never
    writes denom (its backward recomputes it): (y, None) always; with `inplace` (the caller's x is no
    longer needed) it writes y over x."""
    if current_kernel() == "native":
        try:
            return lrn_native.forward(x, size, scale, beta, k, groups, relu, inplace), None
        except lrn_native.NativeUnavailable as exc:
            _unbuildable("native", exc)
            return None
    if _is_channels_last(x):
        u = _run("cl_squares", _cl_squares, x, size, groups, relu)
        if u is None or need_denom:
            return None if u is None else _run("cl_forward", _cl_forward, u, x, size, scale, beta, k, groups, relu)
        y = _run("cl_forward_y", _cl_forward_y, u, x, size, scale, beta, k, groups, relu)
        return None if y is None else (y, None)
    if need_denom:
        return _run("forward", _forward, x.contiguous(), size, scale, beta, k, groups, relu)
    y = _run("forward_y", _forward_y, x.contiguous(), size, scale, beta, k, groups, relu)
    return None if y is None else (y, None)


def forward_pool(x: Tensor, size: int, scale: float, beta: float, k: float, groups: int, relu: bool, kernel: int,
                 stride: int) -> Tensor | None:
    """max_pool2d(LRN(x), kernel, stride) in one native pass (the LRN's output never written), or None where
    that does not apply: another kernel chosen, x not a channels_last CPU tensor the kernel takes, or the C
    kernel not buildable here. No backward: for evaluation forwards only."""
    if current_kernel() != "native" or not supported(x) or not _is_channels_last(x):
        return None
    try:
        return lrn_native.forward_pool(x, size, scale, beta, k, groups, relu, kernel, stride)
    except lrn_native.NativeUnavailable as exc:
        _unbuildable("native", exc)
        return None


def backward(grad_y: Tensor, x: Tensor, denom: Tensor | None, size: int, scale: float, beta: float, groups: int,
             relu: bool, k: float | None = None):
    """dL/dx, or None where inductor failed. denom None: the native forward ran, and the native backward
    recomputes the denominator from x (it needs k)."""
    if denom is None:
        if k is None:
            raise ValueError("the native LRN backward recomputes the denominator: it needs k")
        return lrn_native.backward(grad_y, x, size, scale, beta, k, groups, relu)
    if _is_channels_last(x):
        grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        t = _run("cl_backward_t", _cl_backward_t, grad_y, x, denom, size, beta, groups, relu)
        return None if t is None else _run("cl_backward_dx", _cl_backward_dx, t, grad_y, x, denom, size, scale,
                                           beta, groups, relu)
    grad_y = grad_y.contiguous()
    t = _run("backward_t", _backward_t, grad_y, x, denom, beta, relu)
    return None if t is None else _run("backward_dx", _backward_dx, t, grad_y, x, denom, size, scale, beta,
                                       groups, relu)
