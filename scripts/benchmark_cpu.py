"""The paper's network against torchvision's AlexNet on the CPU, in one run with interleaved repeats:
the grouped form, the two towers in one process, torchvision.models.alexnet (its 224 input, no weights);
a training step (forward + backward + SGD step) and an evaluation forward (no_grad, eval mode, as within
repro.evaluate's pass: see `evaluation_pass`); fp32 and bf16 autocast; one thread (as each torchrun rank
runs: torchrun sets OMP_NUM_THREADS=1) and all usable cores.

    python scripts/benchmark_cpu.py                        # defaults: about 5 minutes on 2 cores
    python scripts/benchmark_cpu.py --threads 1 --cpu-lrn native --cpu-conv direct,winograd --repeats 41
    python scripts/benchmark_cpu.py --dtypes fp32,bf16 --repeats 5 --channels-last

The paper's network is timed with each CPU LRN kernel (--cpu-lrn: the eager torch code, the compiled
kernels of repro/model/lrn_cpu.py and the native ones of repro/model/lrn_native.c; building either
happens in the untimed warm-up rounds, as it does once at the start of a run), and with conv1-conv5
computed as --cpu-conv says (default: by Winograd's minimal filtering, as CPU training runs do; direct:
torch's own).

As a CPU training run does, the process first asks glibc to keep freed memory for reuse
(repro/host_memory.py), for every network alike; --no-keep-freed-memory leaves the allocator as it is.

Repeats are interleaved in rounds (A B C, A B C, ...), after untimed rounds until one faults in no fresh
memory (at most 5; the header gives the count), so that load from other processes falls on every
network alike and no timed round pays for the heap's growth: read the ratios to torchvision, not the
absolute rates, on a shared machine. The ratio is the median over rounds of each round's ratio, beside
the count of rounds the network was the faster (a sign test: see `against`). bf16 is in the default
only where the CPU has native bf16 (AVX-512 BF16 or AMX); elsewhere oneDNN emulates it and
it runs many times slower than fp32 (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from repro.cli import at_least  # noqa: E402
from repro.config import ModelConfig  # noqa: E402
from repro.cores import available_cores  # noqa: E402
from repro.host_memory import keep_freed_memory  # noqa: E402
from repro.model import lrn_cpu, winograd  # noqa: E402
from repro.model.grouped import AlexNet  # noqa: E402
from repro.model.linear import bf16_weights_kept  # noqa: E402
from repro.model.two_tower import TwoTowerAlexNet  # noqa: E402
from repro.optim import PaperSGD  # noqa: E402

NETWORKS = ("grouped", "towers", "torchvision")
WITH_LRN = ("grouped", "towers")  # torchvision's AlexNet has no LRN: one row whatever the kernel
COLUMNS = ("threads", "dtype", "mode", "network", "batch", "img/s", "spread (min..max img/s)", "x torchvision",
           "rounds faster than torchvision")


def cpu_model_and_flags() -> tuple[str, list[str]]:
    """The CPU's name and which of the vector extensions that matter for oneDNN it has (Linux only)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return name, [f for f in wanted if f in flags]


def build(network: str, num_classes: int) -> tuple[torch.nn.Module, int]:
    if network == "torchvision":
        import torchvision

        return torchvision.models.alexnet(num_classes=num_classes), 224
    cfg = ModelConfig(num_classes=num_classes)
    if network == "grouped":
        return AlexNet(config=cfg), 227
    return TwoTowerAlexNet(devices=("cpu", "cpu"), config=cfg), 227


def make_runner(net: torch.nn.Module, size: int, mode: str, dtype: str, batch: int, channels_last: bool,
                num_classes: int, optimizer: str = "torch"):
    """A function that runs one training step or one evaluation forward of `batch` images; the step's
    update is torch.optim.SGD's or (optimizer="paper") the paper's rule as the training loop runs it."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    labels = torch.randint(0, num_classes, (batch,))
    amp = dtype == "bf16"
    if mode == "eval":
        net.eval()

        def forward():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                net(images)
        return forward
    net.train()
    if optimizer == "paper":
        opt = PaperSGD(net.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(net(images).float(), labels)
        loss.backward()
        opt.step()
    step.optimizer = opt  # for StageClock's split of the step
    return step


MAX_WARMUP_ROUNDS = 5
FAULT_PAGES = 256  # a round that faults in more fresh pages than this (1 MB) is still growing the heap


def minor_faults() -> int:
    """Pages this process has faulted in so far (0 where the platform does not count them)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm_up(runners: dict[str, Callable[[], None]], faults: Callable[[], int] = minor_faults) -> int:
    """Untimed interleaved rounds until one faults in no fresh memory (at most MAX_WARMUP_ROUNDS); returns
    how many ran. The first compiles the LRN kernels and touches every buffer; later ones let the heap
    reach its size: a round that has to grow it pays a page fault per 4 KB of new memory (torch's SGD
    makes a new tensor the size of each weight, fc6's 144 MiB; docs/benchmarks.md, 2026-12-04), and
    such rounds took twice as long as the rest."""
    for rounds in range(1, MAX_WARMUP_ROUNDS + 1):
        before = faults()
        for run in runners.values():
            run()
        if faults() - before <= FAULT_PAGES:
            break
    return rounds


def time_interleaved(runners: dict[str, Callable[[], None]], repeats: int,
                     warmups: list[int] | None = None) -> dict[str, list[float]]:
    """Each runner's seconds in `repeats` interleaved rounds, after `warm_up` (its count appended to
    `warmups`)."""
    rounds = warm_up(runners)
    if warmups is not None:
        warmups.append(rounds)
    seconds = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def row_names(networks: list[str], lrn_kernels: list[str],
              conv_kernels: tuple[str, ...] = ("direct",)) -> list[tuple[str, str, str, str]]:
    """(row label, network, CPU LRN kernel, CPU convolution) for each row of one table section; torchvision's
    AlexNet has one row, on torch's own convolution (nn.Conv2d)."""
    rows = []
    for n in networks:
        if n not in WITH_LRN:
            rows.append((n, n, "eager", "direct"))
            continue
        for k in lrn_kernels:
            for c in conv_kernels:
                rows.append((f"{n} ({k} LRN{', winograd conv' if c == 'winograd' else ''})", n, k, c))
    return rows


def with_kernels(run: Callable[[], None], lrn_kernel: str, conv_kernel: str) -> Callable[[], None]:
    def run_with_kernels():
        lrn_cpu.set_kernel(lrn_kernel)
        winograd.set_kernel(conv_kernel)
        run()
    return run_with_kernels


def measure(args, warmups: list[int] | None = None) -> list[tuple]:
    """The table's rows; each section's untimed warm-up rounds are appended to `warmups`."""
    rows = []
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    nets = {}  # built once (the full-size fc layers take seconds to draw); training steps move the weights
    for n in args.networks:
        net, size = build(n, args.num_classes)
        nets[n] = (net.to(memory_format=fmt), size)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype in args.dtypes:
            for mode, batch in (("train", args.train_batch), ("eval", args.eval_batch)):
                runners = {label: with_kernels(make_runner(*nets[n], mode, dtype, batch, args.channels_last,
                                                           args.num_classes, args.optimizer), kernel, conv)
                           for label, n, kernel, conv in row_names(args.networks, args.cpu_lrn, args.cpu_conv)}
                with evaluation_pass(mode, [net for net, _ in nets.values()]):
                    seconds = time_interleaved(runners, args.repeats, warmups)
                rates = {n: [batch / s for s in ts] for n, ts in seconds.items()}
                for n, r in rates.items():
                    ratio, ahead = against(r, rates.get("torchvision"))
                    rows.append((threads, dtype, mode, n, batch, f"{statistics.median(r):.2f}",
                                 f"{min(r):.2f}..{max(r):.2f}", ratio, ahead))
    return rows


def evaluation_pass(mode: str, nets: list[torch.nn.Module]):
    """Evaluation forwards run as within repro.evaluate's pass over a validation set, where the weights
    are fixed: the paper's network's fc layers cast their weights to bf16 once (repro/model/linear.py;
    the warm-up rounds make the casts, as the pass's first batch does). torchvision's nn.Linear layers
    cast at every forward under autocast, as torch does."""
    return bf16_weights_kept(*nets) if mode == "eval" else contextlib.nullcontext()


def against(rates: list[float], base: list[float] | None) -> tuple[str, str]:
    """The median over rounds of rate / base's rate in the same round, and in how many rounds the rate was
    the higher: a round runs every network back to back, so a slow spell of a shared machine falls on
    both sides of each ratio. Under no real difference each round is a coin toss: with 15 rounds, 12 or
    more ahead (or 3 or fewer) happens by chance less than 2% of the time (sign test)."""
    if not base:
        return "-", "-"
    paired = [r / b for r, b in zip(rates, base, strict=True)]
    return f"{statistics.median(paired):.2f}", f"{sum(p > 1 for p in paired)}/{len(paired)}"


def profile(args) -> None:
    """Where each network's training step spends its time: the operators with the most self CPU time
    (one step after `warm_up`, the first thread count and dtype, the last --cpu-lrn and --cpu-conv kernel)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(args.threads[0])
    lrn_cpu.set_kernel(args.cpu_lrn[-1])
    winograd.set_kernel(args.cpu_conv[-1])
    for n in args.networks:
        torch.manual_seed(0)
        net, size = build(n, args.num_classes)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        step = make_runner(net.to(memory_format=fmt), size, "train", args.dtypes[0], args.train_batch,
                           args.channels_last, args.num_classes, args.optimizer)
        warm_up({n: step})
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        label = row_names([n], args.cpu_lrn[-1:], args.cpu_conv[-1:])[0][0]
        print(f"\n{label}, one training step, batch {args.train_batch}, {args.dtypes[0]}, {args.threads[0]} thread(s):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))


class StageClock:
    """Timestamps at the start and end of every convolution and linear layer of a network (forward hooks
    on those modules only: a hook on an LRN or pooling module would make the network run them unfused),
    so that a forward splits into conv1, what runs between conv1 and conv2 (ReLU, LRN, pooling), conv2,
    ..., conv5, what follows it, and the fully connected layers. In a training step also the start and
    end of each of those layers' own backward node (hooks on the autograd node that made the layer's
    output, before any in-place ReLU or LRN replaced it) and of the optimiser's step."""

    def __init__(self, net: torch.nn.Module):
        self.net = net
        layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        self.names = {id(m): (f"conv{i + 1}" if isinstance(m, torch.nn.Conv2d) else "fc")
                      for i, m in enumerate(layers)}
        self.events: list[tuple[str, float]] = []
        for m in layers:
            m.register_forward_pre_hook(lambda mod, _: self.mark(self.names[id(mod)]))
            m.register_forward_hook(self._after_layer)
        self.optimizers: list[torch.optim.Optimizer] = []  # kept, so no later optimiser can take a watched one's id

    def mark(self, name: str) -> None:
        self.events.append((name, time.perf_counter()))

    def _after_layer(self, module: torch.nn.Module, _inputs, output) -> None:
        name = self.names[id(module)]
        self.mark(name + " end")
        node = output.grad_fn if isinstance(output, torch.Tensor) and output.requires_grad else None
        if node is not None:
            node.register_prehook(lambda _grads: self.mark(f"backward {name}"))
            node.register_hook(lambda _grads_in, _grads_out: self.mark(f"backward {name} end"))

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        if not any(o is optimizer for o in self.optimizers):
            self.optimizers.append(optimizer)
            optimizer.register_step_pre_hook(lambda *_: self.mark("update"))
            optimizer.register_step_post_hook(lambda *_: self.mark("update end"))

    def stages(self, forward: Callable[[], None]) -> dict[str, float]:
        """Seconds per stage of one call of `forward`: each convolution, the gap after it (to the next
        layer's start), and everything from the first linear layer's start to the end as "fully connected"."""
        self.events.clear()
        forward()
        end = time.perf_counter()
        out: dict[str, float] = {}
        marks = self.events + [("end", end)]
        for (name, t0), (_, t1) in zip(marks, marks[1:]):
            if name == "fc" or name == "fc end" or "fully connected" in out:
                label = "fully connected"
            elif name.endswith(" end"):
                label = f"after {name[:-4]}"  # ReLU, LRN, pooling, as the network has them
            else:
                label = name
            out[label] = out.get(label, 0.0) + (t1 - t0)
        return out

    def training_stages(self, step: Callable[[], None]) -> dict[str, float]:
        """Seconds per stage of one training step (make_runner's, whose optimiser is `step.optimizer`):
        each layer's forward and the gap after it, as `stages`; the loss; each convolution's backward node
        and the backward of what follows it in the forward (ReLU, LRN, pooling, dropout: "after convN
        backward"), the fully connected layers' backward, the rest of the backward after conv1's node, and
        the update. Whatever precedes conv1 (zero_grad) is "before conv1"."""
        self.watch(step.optimizer)
        self.events.clear()
        self.mark("start")
        step()
        self.mark("end")
        out: dict[str, float] = {}
        for (name, t0), (after, t1) in zip(self.events, self.events[1:]):
            label = _training_label(name, after)
            out[label] = out.get(label, 0.0) + (t1 - t0)
        return out


def _training_label(name: str, after: str) -> str:
    """The stage of a training step between mark `name` and the next mark, `after`."""
    if name == "start":
        return "before conv1"
    if name in ("update", "update end"):
        return "update (optimizer step)" if name == "update" else "after the update"
    if name.startswith("backward "):
        layer = name.split()[1]
        if layer == "fc":
            return "fully connected backward" if not after.startswith("backward conv") else \
                f"after {after.split()[1]} backward"
        if not name.endswith(" end"):
            return f"{layer} backward"
        return f"after {after.split()[1]} backward" if after.startswith("backward conv") else "rest of the backward"
    if name in ("fc", "fc end"):
        return "loss, its gradient, fc8's cast" if after.startswith("backward") else "fully connected forward"
    return f"after {name[:-4]} forward" if name.endswith(" end") else f"{name} forward"


def _print_stage_table(title: str, times: dict[str, dict[str, list[float]]]) -> None:
    print(title)
    print("| stage | grouped | torchvision | difference |")
    print("|---|---|---|---|")
    total = {n: 0.0 for n in times}
    for label in times["grouped"] | {k: None for k in times["torchvision"] if k not in times["grouped"]}:
        ms = {n: 1e3 * statistics.median(times[n].get(label, [0.0])) for n in times}
        for n in times:
            total[n] += ms[n]
        print(f"| {label} | {ms['grouped']:.1f} | {ms['torchvision']:.1f} | {ms['grouped'] - ms['torchvision']:+.1f} |")
    print(f"| sum of the stages | {total['grouped']:.1f} | {total['torchvision']:.1f} | "
          f"{total['grouped'] - total['torchvision']:+.1f} |")


def stages(args) -> None:
    """The evaluation forward and the training step of the grouped form and torchvision's AlexNet stage by
    stage, interleaved rounds, medians (the first thread count, the last --cpu-lrn and --cpu-conv kernel)."""
    torch.set_num_threads(args.threads[0])
    lrn_cpu.set_kernel(args.cpu_lrn[-1])
    winograd.set_kernel(args.cpu_conv[-1])
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    nets, clocks = {}, {}
    for n in ("grouped", "torchvision"):
        torch.manual_seed(0)
        net, size = build(n, args.num_classes)
        nets[n] = (net.to(memory_format=fmt), size)
        clocks[n] = StageClock(nets[n][0])
    how = (f"{args.dtypes[0]}, {args.threads[0]} thread(s), {'channels_last' if args.channels_last else 'NCHW'}, "
           f"{args.cpu_lrn[-1]} LRN, {args.cpu_conv[-1]} conv1-5; median ms of {args.repeats} interleaved rounds")
    for mode, batch in (("eval", args.eval_batch), ("train", args.train_batch)):
        runs = {n: make_runner(*nets[n], mode, args.dtypes[0], batch, args.channels_last, args.num_classes,
                               args.optimizer) for n in nets}
        split = (lambda n, run: clocks[n].stages(run)) if mode == "eval" else \
            (lambda n, run: clocks[n].training_stages(run))
        times: dict[str, dict[str, list[float]]] = {n: {} for n in runs}
        with evaluation_pass(mode, [net for net, _ in nets.values()]):
            warm_up(runs)
            for _ in range(args.repeats):
                for n, run in runs.items():
                    for label, sec in split(n, run).items():
                        times[n].setdefault(label, []).append(sec)
        what = "evaluation forward" if mode == "eval" else \
            f"training step ({'torch.optim.SGD' if args.optimizer == 'torch' else 'PaperSGD'})"
        _print_stage_table(f"{'' if mode == 'eval' else chr(10)}{what} by stage: batch {batch}, {how}", times)


def parse_args(argv: list[str] | None):
    name, flags = cpu_model_and_flags()
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")],
                   default=sorted({1, available_cores()}), help="comma-separated; default 1 and all usable cores")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"] if native_bf16 else ["fp32"],
                   help="fp32,bf16 (bf16 = autocast); default both where the CPU has native bf16, else fp32")
    p.add_argument("--networks", type=lambda s: s.split(","), default=list(NETWORKS))
    p.add_argument("--cpu-lrn", type=lambda s: s.split(","), default=list(lrn_cpu.KERNELS),
                   help="LRN kernels to time the paper's network with: eager,compiled (default both; "
                        "repro/model/lrn_cpu.py); compiling is untimed, as in a long run")
    p.add_argument("--cpu-conv", type=lambda s: tuple(s.split(",")), default=("winograd",),
                   help="how the paper's network computes conv1-conv5: winograd (repro/model/winograd.py; the "
                        "default, as CPU training runs), direct (torch's convolution), or direct,winograd for "
                        "a row of each. torchvision's AlexNet always runs torch's")
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--train-batch", type=at_least(1), default=16)
    p.add_argument("--eval-batch", type=at_least(1), default=32)
    p.add_argument("--num-classes", type=at_least(2), default=1000)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="inputs and every network in channels_last (default; --no-channels-last for NCHW)")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="glibc keeps freed memory for reuse, as CPU training runs (default; repro/host_memory.py)")
    p.add_argument("--optimizer", choices=["torch", "paper"], default="torch",
                   help="the training step's update, the same for every network: torch.optim.SGD (default) or "
                        "the paper's rule as repro's training loop runs it (repro/optim.py; one native pass on the CPU)")
    p.add_argument("--stages", action="store_true",
                   help="instead of the table: the evaluation forward and the training step of the grouped form and "
                        "torchvision's AlexNet split at their layers, stage by stage (--repeats rounds)")
    p.add_argument("--profile", type=at_least(1), default=None, metavar="N",
                   help="instead of the table: each network's N costliest operators in one training step")
    args = p.parse_args(argv)
    for d in args.dtypes:
        if d not in ("fp32", "bf16"):
            p.error(f"--dtypes takes fp32 and/or bf16, got {d!r}")
    for n in args.networks:
        if n not in NETWORKS:
            p.error(f"--networks takes {', '.join(NETWORKS)}; got {n!r}")
    for k in args.cpu_lrn:
        if k not in lrn_cpu.KERNELS:
            p.error(f"--cpu-lrn takes {', '.join(lrn_cpu.KERNELS)}; got {k!r}")
    for k in args.cpu_conv:
        if k not in winograd.KERNELS:
            p.error(f"--cpu-conv takes {', '.join(winograd.KERNELS)}; got {k!r}")
    if os.environ.get(winograd.KERNEL_ENV):
        p.error(f"{winograd.KERNEL_ENV} is set: it would override --cpu-conv for every row; unset it")
    if os.environ.get(lrn_cpu.KERNEL_ENV):
        p.error(f"{lrn_cpu.KERNEL_ENV} is set: it would override --cpu-lrn for every row; unset it")
    args.cpu, args.flags = name, flags
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    memory = keep_freed_memory() if args.keep_freed_memory else "the allocator left as it is"
    if args.profile:
        return profile(args)
    if args.stages:
        return stages(args)
    warmups: list[int] = []
    rows = measure(args, warmups)
    print(f"CPU: {args.cpu}; flags: {' '.join(args.flags) or 'none of avx2/avx512/amx'}; "
          f"torch {torch.__version__}; capability {torch.backends.cpu.get_cpu_capability()}; "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    update = "torch.optim.SGD" if args.optimizer == "torch" else "the paper's update, repro.optim.PaperSGD"
    print(f"train = forward + backward + SGD step ({update} for every network); eval = no_grad forward, as in an "
          "evaluation pass (the paper's network casts its fc weights to bf16 once: repro/model/linear.py); "
          f"median of {args.repeats} interleaved rounds, after untimed ones until a round faults in no fresh "
          f"memory (per section: {', '.join(map(str, warmups))}; at most {MAX_WARMUP_ROUNDS}); x torchvision = "
          f"median of the rounds' ratios; {'channels_last' if args.channels_last else 'NCHW'}; "
          f"host memory: {memory}")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
