"""Shared test helpers: small configurations and a 2-process gloo runner."""

from __future__ import annotations

import datetime
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from repro.config import ModelConfig, TowerWidths
from repro.model import lrn_cpu, winograd

# Full-size network (227 input) where the paper's shapes are the point; a 67-pixel input keeps
# every layer and exchange but costs ~100x less, for tests of mechanics.
SMALL = ModelConfig(num_classes=10, image_size=67)
# fc6/fc7 at 256 units per tower instead of 2048, for tests that train: the paper's 16.8M-weight fc7
# made the optimiser steps, all-reduces and checkpoints the bulk of their time; every layer and
# exchange is still there.
SMALL_FC = TowerWidths(fc6=256, fc7=256)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Without a GPU, workers start from a fork server that has imported torch, torch._dynamo (which
# torch.optim's first optimiser imports, about 3 s) and repro's training code once per test session:
# spawning each worker from scratch cost about 7 s of the 2-core machine's time per process. With a
# GPU they are spawned, as before: forking is only safe while CUDA is untouched, which nothing checks.
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "repro.train", "tests.conftest"]
_START = "spawn" if torch.cuda.is_available() else "forkserver"


def _entry(rank: int, world: int, port: int, fn, args, out_dir: str, env: dict, cwd: str) -> None:
    os.environ.clear()  # the fork server's environment is from when it started: use the caller's now
    os.environ.update(env)
    os.chdir(cwd)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        # a deadlock fails the test in minutes, not after gloo's default 30
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int, tmp_path, *args) -> list:
    """Run fn(rank, world, *args) in `world` gloo processes on CPU; return each rank's result."""
    os.makedirs(tmp_path, exist_ok=True)
    out_dir = str(tmp_path)
    try:
        if _START == "forkserver":
            mp.set_forkserver_preload(_PRELOAD)
        mp.start_processes(_entry, args=(world, free_port(), fn, args, out_dir, dict(os.environ), os.getcwd()),
                           nprocs=world, start_method=_START)
    except Exception as exc:
        errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
        raise AssertionError("distributed worker failed:\n" + "\n".join(errors)) from exc
    results = []
    for r in range(world):  # read, then removed: a full-size rank's results are ~1 GB, and pytest keeps
        path = os.path.join(out_dir, f"rank{r}.pt")  # three runs' temporary folders
        results.append(torch.load(path, weights_only=False))
        os.remove(path)
    return results


@pytest.fixture(scope="session")
def grouped_reference():
    """exercise() on the grouped network (full size unless a config is given), once per dtype and
    config for every test module."""
    from repro import AlexNet
    from tests.equivalence import exercise

    cache = {}

    def get(dtype, cfg: ModelConfig | None = None):
        cfg = cfg or ModelConfig()
        key = (dtype, cfg)
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = exercise(AlexNet(config=cfg).to(dtype), cfg, dtype)
        return cache[key]

    return get


def available_memory_gib() -> float | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    kib = [int(line.split()[1]) for line in lines if line.startswith("MemAvailable:")]
    return kib[0] / 2 ** 20 if kib else None


# A worker that runs the two-tower equivalence files holds the full-size float64 reference results
# and peaks near 7 GiB (measured on the 2-core, 24 GiB machine with /usr/bin/time -v).
GIB_PER_WORKER = 8


@pytest.hookimpl(optionalhook=True)  # pytest without xdist (the lent GPU machines) must still load this file
def pytest_xdist_auto_num_workers(config):
    """`pytest -n auto` (the README's test command): one worker per core this process may use (available_cores), at most one per
    GIB_PER_WORKER of available memory. xdist's own count ignores CPU quotas and memory."""
    from repro.cores import available_cores

    workers = available_cores()
    memory = available_memory_gib()
    if memory is not None:
        workers = min(workers, max(1, int(memory // GIB_PER_WORKER)))
    return workers


# The longest test files first (seconds of test time each on the 2-core VM, 2026-12-03: elastic 72,
# train 71, benchmark 60, two_tower 46 and distributed_model 43 (together 60: in one worker they share
# grouped_reference's full-size float64 results), lrn_cpu 37, eval_script 30, layers 26, scripts 21,
# model 18; the suite's total is about 500). `--dist loadfile` hands files to the workers in the
# collection's order, a new one when a worker has two tests left: had a long file started last, one
# worker would run it alone at the end (the elastic test did, costing the suite about 45 s). The
# elastic file has two tests, so its worker takes the third file at once and the second worker's
# two_tower is followed by distributed_model. The rest keep pytest's order.
LONGEST_FILES_FIRST = ("test_elastic.py", "test_two_tower.py", "test_train.py", "test_distributed_model.py",
                       "test_benchmark.py", "test_lrn_cpu.py", "test_eval_script.py", "test_layers.py",
                       "test_scripts.py", "test_model.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # xdist would reorder files by their number of tests


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch):
    torch.manual_seed(0)
    # Each test starts on the eager CPU LRN: a training run in this process sets the kernel it resolved
    # (--cpu-lrn auto: native) for the whole process, as it should for a real run
    monkeypatch.setattr(lrn_cpu, "_kernel", "eager")
    monkeypatch.setattr(winograd, "_kernel", "direct")  # and on the direct convolution (--cpu-conv), alike
    yield


