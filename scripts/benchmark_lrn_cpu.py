"""LRN alone on the CPU: the eager torch code against the compiled kernels of repro/model/lrn_cpu.py and the
native ones of repro/model/lrn_native.c, forward and forward + backward (ReLU folded in, as the network runs it), at the network's two LRN shapes, for the
grouped form (two groups) and one tower (one group), NCHW and channels_last.

    python scripts/benchmark_lrn_cpu.py                     # batch 16, one thread, both layouts
    python scripts/benchmark_lrn_cpu.py --batch 32 --threads 2 --layouts channels_last

Kernels alternate (eager, compiled, native, eager, ...) and each cell is the best of --repeats rounds of 5
calls, after an untimed call that compiles. The speed-ups are of forward + backward over the eager code.
"err" is each fast kernel's largest relative difference from the eager code in float32 (forward, then
gradient): rounding, not a different function.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from repro.cli import at_least  # noqa: E402
from repro.config import LRNConfig  # noqa: E402
from repro.model import lrn_cpu  # noqa: E402
from repro.model.layers import local_response_norm  # noqa: E402
from scripts.benchmark_cpu import cpu_model_and_flags  # noqa: E402 - the CPU beside every figure

# (name, channels, spatial size, groups) after conv1 and conv2 at 227 pixels (paper section 3.5)
LRN = LRNConfig()  # the paper's constants (section 3.3)
SHAPES = [("conv1, grouped", 96, 55, 2), ("conv1, one tower", 48, 55, 1),
          ("conv2, grouped", 256, 27, 2), ("conv2, one tower", 128, 27, 1)]
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
FAST = [k for k in lrn_cpu.KERNELS if k != "eager"]
COLUMNS = ("shape", "layout", *(f"{k} fwd ms" for k in lrn_cpu.KERNELS), *(f"{k} fwd+bwd ms" for k in lrn_cpu.KERNELS),
           *(f"{k} speed-up" for k in FAST), *(f"{k} err fwd / grad" for k in FAST))


def best_ms(fns: dict[str, callable], repeats: int, calls: int = 5) -> dict[str, float]:
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[k] = min(best[k], (time.perf_counter() - start) / calls * 1e3)
    return best


def measure(batch: int, layouts: list[str], repeats: int) -> list[tuple]:
    cfg, rows = LRN, []
    for name, c, s, groups in SHAPES:
        for layout in layouts:
            x = (torch.randn(batch, c, s, s) * 3).contiguous(memory_format=LAYOUTS[layout])
            g = torch.randn_like(x)
            xg = x.clone().requires_grad_()
            results, fns = {}, {}
            for kernel in lrn_cpu.KERNELS:
                def forward(kernel=kernel):
                    lrn_cpu.set_kernel(kernel)
                    with torch.no_grad():
                        return local_response_norm(x, cfg, groups, relu=True)

                def both(kernel=kernel):
                    lrn_cpu.set_kernel(kernel)
                    y = local_response_norm(xg, cfg, groups, relu=True)
                    return y, torch.autograd.grad(y, xg, g)[0]

                results[kernel] = both()  # untimed: compiles
                fns[f"{kernel} fwd"], fns[f"{kernel} both"] = forward, both
            ms = best_ms(fns, repeats)
            errs = {k: [((results[k][i] - results["eager"][i]).abs().max() / results["eager"][i].abs().max()).item()
                        for i in (0, 1)] for k in FAST}
            rows.append((f"{name} {tuple(x.shape)}", layout,
                         *(f"{ms[f'{k} fwd']:.1f}" for k in lrn_cpu.KERNELS),
                         *(f"{ms[f'{k} both']:.1f}" for k in lrn_cpu.KERNELS),
                         *(f"{ms['eager both'] / ms[f'{k} both']:.2f}x" for k in FAST),
                         *(f"{errs[k][0]:.0e} / {errs[k][1]:.0e}" for k in FAST)))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--batch", type=at_least(1), default=16)
    p.add_argument("--threads", type=at_least(1), default=1)
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--layouts", type=lambda v: v.split(","), default=list(LAYOUTS),
                   help="nchw,channels_last (default both)")
    args = p.parse_args(argv)
    for layout in args.layouts:
        if layout not in LAYOUTS:
            p.error(f"--layouts takes {', '.join(LAYOUTS)}; got {layout!r}")
    if os.environ.get(lrn_cpu.KERNEL_ENV):
        p.error(f"{lrn_cpu.KERNEL_ENV} is set: it would override the kernel of every row; unset it")
    torch.set_num_threads(args.threads)
    rows = measure(args.batch, args.layouts, args.repeats)
    print(f"torch {torch.__version__}; capability {torch.backends.cpu.get_cpu_capability()}; batch {args.batch}; "
          f"{args.threads} thread(s); best of {args.repeats} x 5 calls, kernels alternating; ReLU + LRN, float32")
    name, flags = cpu_model_and_flags()
    print(f"CPU: {name}; flags: {' '.join(flags) or 'none of avx2/avx512/amx'}")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
