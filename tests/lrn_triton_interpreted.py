"""Runs the Triton LRN kernels on the CPU under Triton's interpreter and prints what
tests/test_lrn_triton.py checks, as JSON. A separate process: TRITON_INTERPRET must be set before
the kernels are defined, and the rest of the suite must see them compiled for a GPU as usual.

    TRITON_INTERPRET=1 python -m tests.lrn_triton_interpreted
"""

from __future__ import annotations

import json
import os

import torch

from repro.model import layers, lrn_triton


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference(x: torch.Tensor, g: torch.Tensor, size: int, scale: float, beta: float, k: float, groups: int,
              relu: bool = False):
    """The torch path of layers.py in float64 (itself checked against NumPy in test_layers.py), after
    torch's own ReLU where the kernel fuses one."""
    xr = x.double().detach().clone().requires_grad_()
    y = layers._LRNFunction.apply(torch.relu(xr) if relu else xr, size, scale, beta, k, groups)
    y.backward(g.double())
    return y.detach(), xr.grad


def kernel_cases(kernel: str) -> list[dict]:
    lrn_triton.set_kernel(kernel)
    out = []
    torch.manual_seed(0)
    shapes = [(2, 96, 5, 7, 2, 5), (3, 48, 4, 4, 1, 5), (2, 10, 3, 3, 2, 3), (1, 256, 3, 2, 2, 5),
              (5, 6, 1, 1, 2, 5), (3, 96, 9, 7, 2, 5), (2, 160, 2, 3, 1, 5)]
    # odd pixel counts and tiles, tiny groups, a window wider than a group, enough pixels for the
    # persistent backward's programs to take six tiles each, re-using their scratch slots, and (the
    # last) a group wider than the band-matrix kernels take, where "triton-dot" uses the others
    # each case once without and once with the fused ReLU, alternating which layout gets which
    for i, (n, c, h, w, groups, size) in enumerate(shapes):
        for j, (layout, fmt) in enumerate((("contiguous", torch.contiguous_format),
                                           ("channels_last", torch.channels_last))):
            relu = (i + j) % 2 == 1
            x = (torch.randn(n, c, h, w) * 3).contiguous(memory_format=fmt)
            g = torch.randn_like(x)
            y_ref, dx_ref = reference(x, g, size, 1e-2, 0.75, 2.0, groups, relu)
            y, denom = lrn_triton.lrn_forward(x, size, 1e-2, 0.75, 2.0, groups, relu)
            # the gradient handed in the other layout, as autograd may do
            g_other = g.contiguous(memory_format=torch.channels_last if layout == "contiguous"
                                   else torch.contiguous_format)
            dx = lrn_triton.lrn_backward(g_other, x, denom, size, 1e-2, 0.75, groups, relu)
            out.append({"case": f"{n}x{c}x{h}x{w} groups {groups} size {size} {layout}"
                                f"{' relu' if relu else ''}", "relu": relu,
                        "forward": rel(y, y_ref), "backward": rel(dx, dx_ref),
                        "same_strides": y.stride() == x.stride() == dx.stride() == denom.stride()})
    # one pixel wide, with a w stride that is not the pixel step: torch calls it contiguous all the same
    x = (torch.randn(2, 8, 1, 3) * 3).transpose(2, 3)
    assert x.is_contiguous() and x.stride() == (24, 3, 1, 3)
    g = torch.randn(x.shape)
    y_ref, dx_ref = reference(x, g, 5, 1e-2, 0.75, 2.0, 2)
    y, denom = lrn_triton.lrn_forward(x, 5, 1e-2, 0.75, 2.0, 2, False)
    dx = lrn_triton.lrn_backward(g, x, denom, 5, 1e-2, 0.75, 2, False)
    out.append({"case": "2x8x3x1 w stride 3", "relu": False, "forward": rel(y, y_ref), "backward": rel(dx, dx_ref),
                "same_strides": True})
    return out


def bf16_case(kernel: str) -> dict:
    lrn_triton.set_kernel(kernel)
    torch.manual_seed(1)
    x = (torch.randn(2, 96, 6, 6) * 3).to(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    y_ref, dx_ref = reference(x, g, 5, 1e-4, 0.75, 2.0, 2, relu=True)
    xb, gb = x.bfloat16(), g.bfloat16()
    y, denom = lrn_triton.lrn_forward(xb, 5, 1e-4, 0.75, 2.0, 2, True)
    dx = lrn_triton.lrn_backward(gb, xb, denom, 5, 1e-4, 0.75, 2, True)
    return {"dtype": str(y.dtype), "forward": rel(y, y_ref), "backward": rel(dx, dx_ref)}


def nan_case(kernel: str) -> dict:
    """A NaN entering the fused ReLU: torch.relu keeps it, and LRN spreads it over its window."""
    lrn_triton.set_kernel(kernel)
    x = torch.randn(1, 8, 2, 2)
    x[0, 3, 1, 0] = float("nan")
    y_ref, _ = reference(x, torch.ones_like(x), 5, 1e-2, 0.75, 2.0, 1, relu=True)
    y, _ = lrn_triton.lrn_forward(x, 5, 1e-2, 0.75, 2.0, 1, True)
    return {"nan_expected": int(y_ref.isnan().sum()), "same_nans": bool(torch.equal(y.isnan(), y_ref.isnan())),
            "covers_nans": bool(y.isnan()[y_ref.isnan()].all())}


def compiled_case() -> dict:
    """The whole wiring a GPU uses: the autograd function calling the custom ops, under torch.compile
    (which must keep them as opaque calls), here with the kernels admitted on the CPU."""
    lrn_triton.set_kernel("triton")
    lrn_triton.supported = lambda t: t.dim() == 4 and t.dtype == torch.float32  # the GPU's rule, on the CPU
    torch.manual_seed(2)
    x = (torch.randn(2, 16, 5, 5) * 3).to(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    cfg = layers.LRNConfig(alpha=1e-2)
    out = {}
    for relu in (False, True):  # the module's two uses: LRN alone, and ReLU then LRN as in the network
        y_ref, dx_ref = reference(x, g, cfg.size, cfg.sum_scale, cfg.beta, cfg.k, 2, relu)
        fn = torch.compile(lambda t: layers.local_response_norm(t, cfg, 2, relu), fullgraph=True)
        xc = x.clone().requires_grad_()
        y = fn(xc)
        y.backward(g)
        opcheck = torch.library.opcheck(torch.ops.repro.lrn_forward.default, (x, 5, 1e-2, 0.75, 2.0, 2, relu),
                                        test_utils=("test_schema", "test_faketensor"))
        out["relu" if relu else "plain"] = {"forward": rel(y, y_ref), "backward": rel(xc.grad, dx_ref),
                                            "opcheck": all(v == "SUCCESS" for v in opcheck.values())}
    return out


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1: these kernels run on the CPU only under Triton's interpreter")
    kernels = [k for k in lrn_triton.KERNELS if k != "torch"]
    print(json.dumps({"kernels": {k: kernel_cases(k) for k in kernels}, "bf16": {k: bf16_case(k) for k in kernels},
                      "nan": {k: nan_case(k) for k in kernels},
                      "compiled": compiled_case()}))
