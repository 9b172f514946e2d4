"""What the CPU main job and the tests spend their time on, timed on one thread (as each torchrun rank
runs: torchrun sets OMP_NUM_THREADS=1): the torch LRN at conv1's shape, a training step of the
grouped network, and evaluation forwards.

    python scripts/benchmark_cpu.py                    # median of 5 repeats each
    python scripts/benchmark_cpu.py --threads 2 --repeats 3

Wall-clock medians on a shared machine: compare runs made one after the other on the same machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from repro.cli import at_least  # noqa: E402
from repro.config import LRNConfig  # noqa: E402
from repro.model.grouped import AlexNet  # noqa: E402
from repro.model.layers import local_response_norm  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, oneDNN primitive creation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--threads", type=at_least(1), default=1)
    p.add_argument("--repeats", type=at_least(1), default=5)
    p.add_argument("--lrn-batch", type=at_least(1), default=32)
    p.add_argument("--train-batch", type=at_least(1), default=16)
    p.add_argument("--eval-batch", type=at_least(1), default=80)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []

    # The network's first LRN (ReLU folded in): 96 channels in two groups, 55x55, NCHW as on the CPU.
    x = (torch.randn(args.lrn_batch, 96, 55, 55) * 3).requires_grad_()
    g = torch.randn_like(x)
    cfg = LRNConfig()
    fwd = median_seconds(lambda: local_response_norm(x.detach(), cfg, 2, relu=True), args.repeats)
    both = median_seconds(lambda: local_response_norm(x, cfg, 2, relu=True).backward(g), args.repeats)
    rows.append((f"conv1 LRN, batch {args.lrn_batch}: forward", f"{fwd * 1e3:.0f} ms"))
    rows.append((f"conv1 LRN, batch {args.lrn_batch}: forward + backward", f"{both * 1e3:.0f} ms"))

    net = AlexNet(num_classes=10)
    images = torch.randn(args.train_batch, 3, 227, 227)
    labels = torch.randint(0, 10, (args.train_batch,))

    def step():
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(images), labels).backward()

    net.train()
    rows.append((f"grouped network, training step (forward + backward), batch {args.train_batch}",
                 f"{median_seconds(step, args.repeats):.2f} s"))
    net.eval()
    batch = torch.randn(args.eval_batch, 3, 227, 227)
    with torch.no_grad():
        seconds = median_seconds(lambda: net(batch), max(1, args.repeats // 2))
    rows.append((f"grouped network, evaluation forwards, batch {args.eval_batch}", f"{args.eval_batch / seconds:.1f} img/s"))

    print(f"{platform.processor() or platform.machine()}; {args.threads} thread(s); torch {torch.__version__}; "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| what | median |\n|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")


if __name__ == "__main__":
    main()
