"""Where a training step's GPU time goes: the kernels of a few profiled steps, by total device time.

    python scripts/profile_step.py                        # grouped and torchvision, bf16 CL compiled, b256
    python scripts/profile_step.py --models grouped --variant bf16-cl --batch 128 --top 30

Steps are the benchmark's (repro.bench.make_step: forward, loss, backward, the paper's SGD step on a
synthetic batch), so the table explains the rows of scripts/benchmark.py. Speed work starts here.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from repro.bench import VARIANTS, Case, build, make_step  # noqa: E402


def time_key(events) -> str:
    """The profiler's name for a row's own GPU time (torch renamed it from the CUDA-only one)."""
    return "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"


def kernel_time(events) -> float:
    """Microseconds spent in GPU kernels. An op's row repeats the time of the kernels it launched, so
    only the kernels' own rows are summed (as torch's table does for its "Self CUDA time total")."""
    key = time_key(events)
    return sum(getattr(e, key) for e in events
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))


def report(label: str, events, steps: int, top: int) -> None:
    """The kernel time per step, then the `top` rows by their own GPU time."""
    print(f"\n== {label}: {kernel_time(events) / steps / 1e3:.2f} ms of kernel time per step")
    print(events.table(sort_by=time_key(events), row_limit=top, max_name_column_width=90))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--models", nargs="+", default=["grouped", "torchvision"],
                   choices=["grouped", "towers", "torchvision"])
    p.add_argument("--variant", default="bf16-cl-compile", choices=sorted(VARIANTS))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after 10 unprofiled)")
    p.add_argument("--top", type=int, default=25, help="kernels listed per model")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_step.py profiles GPU kernels: it needs a CUDA device")
    device = torch.device("cuda")
    for model_name in args.models:
        dtype, channels_last, compile_mode, graph = VARIANTS[args.variant]
        case = Case(model_name, args.batch, dtype, channels_last, compile_mode, graph)
        torch.manual_seed(0)
        model, _ = build(case, device)
        step = make_step(model, case, device)
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        report(case.label, prof.key_averages(), args.steps, args.top)
        del model, step
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
