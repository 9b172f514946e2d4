"""Training-step speed of each form of the network, with torchvision's AlexNet as the yardstick.

Used by scripts/benchmark.py. A case is timed on a synthetic batch already on the device: forward,
loss, backward and the paper's optimiser step, `steps` times after `warmup`, synchronised, median of
`repeats` timings. Peak memory is the device's peak allocation during the timed steps. On a GPU every
case runs with cuDNN's autotuner on (`cudnn.benchmark`), as training does: the input shape is fixed.
A `graph` case captures the whole step (forward, backward, optimiser) in one CUDA graph and replays it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from repro.config import ModelConfig, OptimConfig
from repro.model.distributed import DistributedTowerAlexNet
from repro.model.grouped import AlexNet
from repro.model.two_tower import TwoTowerAlexNet
from repro.optim import paper_optimizer
from repro.parallel import compile_stages

MODELS = ("grouped", "towers", "towers-2proc", "torchvision")
# name: (dtype, channels_last, compile mode, whole-step CUDA graph), as scripts/benchmark.py offers them
VARIANTS = {"fp32": ("fp32", False, "none", False), "fp32-cl": ("fp32", True, "none", False),
            "bf16-cl": ("bf16", True, "none", False), "bf16-cl-compile": ("bf16", True, "default", False),
            "bf16-cl-max-autotune": ("bf16", True, "max-autotune", False),
            "bf16-cl-graph": ("bf16", True, "none", True), "bf16-cl-compile-graph": ("bf16", True, "default", True)}


@dataclass(frozen=True)
class Case:
    model: str  # one of MODELS
    batch: int
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast)
    channels_last: bool = False
    compile: str = "none"  # "none", "default", "max-autotune" (the latter with inductor's CUDA graphs)
    graph: bool = False  # the whole training step captured in one CUDA graph (torch.cuda.graph)

    @property
    def label(self) -> str:
        return (f"{self.model} b{self.batch} {self.dtype}{' CL' if self.channels_last else ''}"
                f"{'' if self.compile == 'none' else ' compile:' + self.compile}{' graph' if self.graph else ''}")


@dataclass
class Result:
    case: Case
    img_per_s: float
    step_ms: float
    peak_mib: float | None
    note: str = ""
    spread: float = float("nan")  # (slowest - fastest) / median over the repeats: the noise to beat

    def row(self) -> dict:
        return {**asdict(self.case), "img_per_s": self.img_per_s, "step_ms": self.step_ms,
                "peak_mib": self.peak_mib, "note": self.note}


def build(case: Case, device: torch.device, num_classes: int = 1000) -> tuple[nn.Module, int]:
    """The model of a case on `device` and its input size."""
    if case.model == "torchvision":
        import torchvision

        return torchvision.models.alexnet(num_classes=num_classes).to(device), 224
    cfg = ModelConfig(num_classes=num_classes)
    if case.model == "grouped":
        return AlexNet(config=cfg).to(device), 227
    if case.model == "towers":  # both towers in this process; on two GPUs when there are two
        second = torch.device("cuda", 1) if device.type == "cuda" and torch.cuda.device_count() > 1 else device
        return TwoTowerAlexNet(devices=(device, second), config=cfg), 227
    raise ValueError(f"unknown model {case.model!r}; one of {MODELS}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str, cache: bool = True):
    # Autocast's cache of cast weights must be off under CUDA-graph capture (PyTorch's CUDA-graph notes).
    return (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache) if dtype == "bf16"
            else contextlib.nullcontext())


def check_case(case: Case, device: torch.device) -> None:
    """Combinations that cannot run, as a clear error before any work."""
    if case.model not in MODELS:
        raise ValueError(f"unknown model {case.model!r}; one of {MODELS}")
    if case.graph and device.type != "cuda":
        raise ValueError(f"{case.label}: a CUDA graph needs a CUDA device, not {device}")
    if case.graph and case.compile == "max-autotune":
        raise ValueError(f"{case.label}: max-autotune captures its own CUDA graphs; a whole-step graph "
                         "goes with compile 'none' or 'default'")
    if case.graph and case.model == "towers-2proc":
        raise ValueError(f"{case.label}: the two-process towers exchange through a process group, "
                         "which is not captured in the graph")


def capture_step(step, warmup: int = 3):
    """The replay of a CUDA graph holding one call of `step` (PyTorch's whole-network capture recipe):
    warm-up calls on a side stream first (cuDNN autotuning, lazily created optimiser state, compiled
    code), then one captured call. Each replay reruns it on the same input and parameter tensors."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


EAGER_UPDATE_ENV = "REPRO_BENCH_EAGER_UPDATE"  # "1": compiled rows keep the optimiser's update eager


def make_step(model: nn.Module, case: Case, device: torch.device, loss_fn=F.cross_entropy):
    """A closure running one training step on a fixed synthetic batch."""
    check_case(case, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest algorithms
    # compiled rows compile the optimiser's update too, as training's --compile does (benchmark.py
    # --eager-update keeps it eager, to tell the two gains apart)
    compiled_update = case.compile != "none" and os.environ.get(EAGER_UPDATE_ENV) != "1"
    opt = paper_optimizer(model, OptimConfig(), compiled=compiled_update)
    size = 224 if case.model == "torchvision" else 227
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    if case.channels_last:
        model.to(memory_format=torch.channels_last)
    x = (torch.randn(case.batch, 3, size, size, device=device) * 60).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (case.batch,), device=device)
    if case.compile == "none":
        forward = model
    elif isinstance(model, DistributedTowerAlexNet):  # as training does: the exchanges stay eager
        compile_stages(model, case.compile)  # (the whole module compiled crashed on torch 2.11 + gloo)
        forward = model
    else:
        forward = torch.compile(model, mode=case.compile)

    def step():
        with _autocast(device, case.dtype, cache=not case.graph):
            loss = loss_fn(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return capture_step(step) if case.graph else step


def time_steps(step, device: torch.device, steps: int, warmup: int, repeats: int = 3) -> tuple[float, float]:
    """Median seconds per step, and the spread of the repeats' timings relative to it."""
    for _ in range(warmup):
        step()
    _sync(device)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        timings.append((time.perf_counter() - start) / steps)
    median = statistics.median(timings)
    return median, (max(timings) - min(timings)) / median


def run_case(case: Case, device: torch.device, steps: int, warmup: int, repeats: int = 3) -> Result:
    check_case(case, device)
    if case.model == "towers-2proc":
        return run_two_process_case(case, device, steps, warmup, repeats)
    torch.manual_seed(0)
    if case.compile != "none":
        # Each compiled case starts from empty caches: the optimiser's compiled update is shared by the
        # process, and a second model's shapes would otherwise recompile it with dynamic shapes.
        torch._dynamo.reset()
    model, _ = build(case, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, spread = time_steps(make_step(model, case, device), device, steps, warmup, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Result(case, case.batch / seconds, seconds * 1e3, peak, spread=spread)


# --- towers in two processes ---------------------------------------------------------------------

def _two_process_worker(rank: int, port: int, case: Case, device_type: str, steps: int, warmup: int,
                        repeats: int, out: str):
    import torch.distributed as dist

    from repro.model.distributed import pair_loss

    two_gpus = device_type == "cuda" and torch.cuda.device_count() > 1
    device = torch.device("cuda", rank if two_gpus else 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if two_gpus else "gloo"  # NCCL refuses two ranks on one GPU ("Duplicate GPU detected")
    dist.init_process_group(backend, rank=rank, world_size=2)
    torch.manual_seed(0)
    model = DistributedTowerAlexNet(ModelConfig(), None, device)
    step = make_step(model, replace(case, model="grouped"), device, loss_fn=pair_loss)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, spread = time_steps(step, device, steps, warmup, repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    torch.save({"seconds": seconds, "spread": spread, "peak": peak, "backend": backend},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_two_process_case(case: Case, device: torch.device, steps: int, warmup: int, repeats: int = 3) -> Result:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_two_process_worker, args=(port, case, device.type, steps, warmup, repeats, out), nprocs=2,
                           start_method="spawn")
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(2)]
    seconds = max(r["seconds"] for r in ranks)
    peaks = [r["peak"] for r in ranks]
    peak = max(peaks) if peaks[0] is not None else None
    return Result(case, case.batch / seconds, seconds * 1e3, peak, f"{ranks[0]['backend']}, peak per rank",
                  max(r["spread"] for r in ranks))


# --- the two numbers to compare against ----------------------------------------------------------

def train_flops_per_image(model: str) -> float:
    """FLOPs of one training step (forward and backward) per image, counted by torch's
    FlopCounterMode at batch 1 on the CPU. The faithful network is counted through its towers:
    FlopCounterMode (torch 2.14) counts a grouped convolution's weight gradient as if it were
    ungrouped, 1.5 times the true backward FLOPs at groups=2."""
    from torch.utils.flop_counter import FlopCounterMode

    cpu = torch.device("cpu")
    net, size = build(Case("torchvision" if model == "torchvision" else "towers", 1), cpu)
    x, y = torch.randn(1, 3, size, size), torch.zeros(1, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(net(x), y).backward()
    return float(counter.get_total_flops())


def cuda_seconds(fn, device: torch.device, reps: int = 20) -> float:
    """Median seconds of fn() timed with CUDA events, after a warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ceilings(device: torch.device) -> dict[str, float] | None:
    """The device's measured bf16 matrix-product rate (TFLOP/s, 8192^3) and copy bandwidth (GB/s,
    bytes read plus written, 1 GiB buffers), against which a training step's rate is read."""
    if device.type != "cuda":
        return None
    g = torch.Generator(device=device).manual_seed(0)
    result = {"bf16_tflops": _matmul_tflops(device, g), "copy_gbps": _copy_gbps(device, g)}
    torch.cuda.empty_cache()
    return result


def _matmul_tflops(device: torch.device, g: torch.Generator, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)  # never zeros: they run faster
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    return 2 * n ** 3 / cuda_seconds(lambda: a @ b, device) / 1e12


def _copy_gbps(device: torch.device, g: torch.Generator, n: int = 2 ** 28) -> float:
    src = torch.randn(n, device=device, generator=g)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / cuda_seconds(lambda: dst.copy_(src), device) / 1e9


# --- numerics ------------------------------------------------------------------------------------

def numerics(device: torch.device, model: str = "grouped", batch: int = 32, compile_mode: str = "default") -> dict[str, float]:
    """Relative error of bf16 (autocast, channels_last, compiled) logits and weight gradients against
    the eager float32 network with the same weights, dropout off (torchvision's masks come from the
    global RNG). Run for torchvision's AlexNet too: bf16's error on early-layer gradients at
    initialisation is large for any such network, so the yardstick is the reference's error."""
    torch.manual_seed(0)
    ref, size = build(Case(model, batch), device)
    fast = copy.deepcopy(ref)  # the same weights without drawing a second initialisation
    ref.eval()
    fast.eval()
    fast.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device) * 60
    y = torch.randint(0, 1000, (batch,), device=device)
    out_ref = ref(x)
    F.cross_entropy(out_ref, y).backward()
    forward = torch.compile(fast, mode=compile_mode) if compile_mode != "none" else fast
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out_fast = forward(x.contiguous(memory_format=torch.channels_last))
    F.cross_entropy(out_fast.float(), y).backward()

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    weights = [m for m in ref.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    fast_weights = [m for m in fast.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    result = {"logits": rel(out_fast, out_ref)}
    for i in (0, 2, 5, 7):  # conv1, conv3, fc6, fc8 (the same positions in torchvision's AlexNet)
        result[f"grad layer {i + 1}"] = rel(fast_weights[i].weight.grad, weights[i].weight.grad)
    return result


# --- the input pipeline --------------------------------------------------------------------------

def pipeline_rate(dataset: str, data: str | None, device: str, batch: int, steps: int, warmup: int,
                  amp: str = "none", channels_last: bool = False, compile: bool = False,
                  workers: int = 8, decode: str = "gpu") -> float:
    """End-to-end training img/s (loading, device-side augmentation, step) of the grouped network on
    real data, measured by the training loop itself over `steps` steps after `warmup`."""
    from unittest import mock

    from repro import train as training
    from repro.config import DataConfig, TrainConfig
    from repro.dist import init_topology
    from repro.metrics import read_metrics

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=DataConfig(dataset=dataset, root=data, workers=workers, stats_images=2000,
                                          decode=decode),
                          batch_size=batch, max_steps=warmup + steps, log_every=warmup if warmup else steps,
                          out=out, final_crops=(), device=device, amp=amp, channels_last=channels_last,
                          compile=compile)
        run = training.setup(cfg, init_topology(device))
        with mock.patch.object(training, "save"):  # timing only: no checkpoint to write at the end
            ended = training.fit(run)
        if ended == "stopped":  # a Ctrl-C meant for the benchmark: not a short pipeline's rate
            raise KeyboardInterrupt
        speeds = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if r["kind"] == "speed"]
    return speeds[-1]["img_per_s"]
