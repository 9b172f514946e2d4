"""LRN alone on the GPU: each implementation's forward and forward+backward time at the network's two
LRN shapes, against the time a single read-and-write pass over the tensors would take.

    python scripts/benchmark_lrn.py                     # batch 256, bf16, channels_last
    python scripts/benchmark_lrn.py --batch 128 --dtype float32 --contiguous

Implementations: "torch eager" and "torch compiled" (the shifted-add code of repro/model/layers.py,
as training runs it with and without --compile), "triton" and "triton compiled" (the kernels
of repro/model/lrn_triton.py, the default on a GPU, called directly and inside a compiled function). In the network, LRN
follows a ReLU; "+relu" rows time torch's ReLU then the LRN (inductor fuses the two when the LRN is
its own code), and "fused relu" rows the LRN module's relu=True, which the network uses: the Triton
kernels apply the ReLU as they read, so it costs no pass of its own. "triton-dot" rows: the kernels
whose window sums are products with a band matrix (REPRO_LRN_KERNEL=triton-dot).
The floor is the bytes a pass must move (forward: read x, write y and the denominator; backward: read
the gradient, x and the denominator, write the input gradient) at the copy rate measured here.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from repro.bench import ceilings, cuda_seconds  # noqa: E402
from repro.config import LRNConfig  # noqa: E402
from repro.model import lrn_triton  # noqa: E402
from repro.model.layers import local_response_norm  # noqa: E402

# (channels, spatial size) after conv1 and conv2 at 227 pixels; two groups in the grouped form (paper section 3.5)
SHAPES = {"conv1 LRN": (96, 55), "conv2 LRN": (256, 27)}


def cuda_ms(fn, reps: int = 50) -> float:
    """Median milliseconds of fn() by CUDA events, after warm-up."""
    for _ in range(4):
        fn()
    return cuda_seconds(fn, torch.device("cuda"), reps) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    p.add_argument("--impls", nargs="+", help="only these rows' implementations (a GPU fault ends the process, "
                   "so gpu_session.sh runs one per process)")
    p.add_argument("--no-header", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmark_lrn.py times GPU kernels: it needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last
    cfg = LRNConfig()
    gbps = ceilings(torch.device("cuda"))["copy_gbps"]

    def lrn(t):
        return local_response_norm(t, cfg, groups=2)

    def lrn_relu(t):
        return local_response_norm(torch.relu(t), cfg, groups=2)

    def lrn_fused_relu(t):
        return local_response_norm(t, cfg, groups=2, relu=True)

    # label: (LRN kernel, function, whether it applies a ReLU first)
    impls = {"torch eager": ("torch", lrn, False), "torch compiled": ("torch", torch.compile(lrn), False),
             "torch compiled +relu": ("torch", torch.compile(lrn_relu), True),
             "torch compiled fused relu": ("torch", torch.compile(lrn_fused_relu), True)}
    if lrn_triton.AVAILABLE:
        impls.update({"triton": ("triton", lrn, False), "triton compiled": ("triton", torch.compile(lrn), False),
                      "triton compiled +relu": ("triton", torch.compile(lrn_relu), True),
                      "triton fused relu": ("triton", lrn_fused_relu, True),
                      "triton compiled fused relu": ("triton", torch.compile(lrn_fused_relu), True),
                      "triton-dot": ("triton-dot", lrn, False),
                      "triton-dot fused relu": ("triton-dot", lrn_fused_relu, True),
                      "triton-dot compiled fused relu": ("triton-dot", torch.compile(lrn_fused_relu), True)})
    if args.impls:
        unknown = sorted(set(args.impls) - set(impls))
        if unknown:
            sys.exit(f"--impls: unknown {unknown}; choose from {sorted(impls)}")
        impls = {k: v for k, v in impls.items() if k in args.impls}
    if not args.no_header:
        print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; batch {args.batch}, {args.dtype}, "
              f"{'contiguous' if args.contiguous else 'channels_last'}; copy {gbps:.0f} GB/s")
        print("| shape | implementation | forward ms | forward floor | fwd+bwd ms | fwd+bwd floor | "
              "output err | gradient err |")
        print("|---|---|---|---|---|---|---|---|")
    for name, (c, s) in SHAPES.items():
        x = (torch.randn(args.batch, c, s, s, device="cuda") * 3).to(dtype).contiguous(memory_format=fmt)
        g = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        # Reference: the torch path in float64 from the same values; errors are relative (norm of the
        # difference over the norm), so a wrong or racing kernel shows at any storage type.
        lrn_triton.set_kernel("torch")
        x64 = x.double().requires_grad_()
        reference = {}
        for relu in (False, True):
            y64 = lrn(torch.relu(x64) if relu else x64)
            reference[relu] = (y64, torch.autograd.grad(y64, x64, g.double())[0])
        fwd_floor, bwd_floor = 3 * nbytes / gbps / 1e6, 4 * nbytes / gbps / 1e6
        for label, (kernel, fn, relu) in impls.items():
            y64, dx64 = reference[relu]
            lrn_triton.set_kernel(kernel)
            xg = x.detach().requires_grad_()

            def forward():
                with torch.no_grad():
                    fn(x)

            def both():
                torch.autograd.grad(fn(xg), xg, g)

            y = fn(xg)
            (dx,) = torch.autograd.grad(y, xg, g)
            errs = [((a.double() - b).norm() / b.norm()).item() for a, b in ((y, y64), (dx, dx64))]
            print(f"| {name} {tuple(x.shape)} | {label} | {cuda_ms(forward):.3f} | {fwd_floor:.3f} | "
                  f"{cuda_ms(both):.3f} | {fwd_floor + bwd_floor:.3f} | {errs[0]:.1e} | {errs[1]:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
