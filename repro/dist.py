"""Process groups for model-parallel tower pairs, replicated data-parallel across pairs.

torchrun starts 2k processes. Ranks 2p and 2p+1 form pair p (tower 0 and tower 1 of one model
replica; with --nproc_per_node=2 a pair never spans nodes, so the exchanges stay on NVLink/PCIe).
Tower t of every pair forms replica group t, over which DistributedDataParallel averages gradients.
One process (world size 1) runs the grouped form alone.

Restarts under `torchrun --max-restarts=N`: torchelastic keeps its TCPStore (the agent's, at
MASTER_ADDR:MASTER_PORT) across restart rounds, and env:// rendezvous hands the restarted processes that
same store. The process group's keys from the previous round ("default_pg/..." : each rank's gloo
address, the arrival counters) are still in it, so a restarted rank reads a dead peer's address
(connection refused or a hang in gloo's connect) or a counter that already says "everyone is here".
Each round therefore works under its own store prefix (TORCHELASTIC_RESTART_COUNT), and every wait
has a timeout (--comm-timeout), so a peer that never comes is an error, not a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from repro.cli import raised_on_every_rank


@dataclass
class Topology:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process, no process group
    towers: int  # 1: the grouped form in one process; 2: one tower per process
    tower: int
    replica: int  # which pair (data-parallel replica)
    replicas: int
    pair_group: dist.ProcessGroup | None = None
    replica_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs and writes checkpoints."""
        return self.rank == 0

    @property
    def holds_logits(self) -> bool:
        return self.tower == 0

    @property
    def comm_device(self) -> torch.device:
        """Where small control tensors go for collectives (NCCL needs the GPU, gloo takes the CPU)."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def _pick_device(local_rank: int, local_world: int, device: str) -> tuple[torch.device, bool]:
    """The device for this rank, and whether every local rank has a GPU of its own (NCCL's need)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), False
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for CUDA but torch sees no GPU; use --device cpu")
    count = torch.cuda.device_count()
    dev = torch.device("cuda", local_rank % count)
    torch.cuda.set_device(dev)
    return dev, count >= local_world


def restart_round() -> int:
    """0 on a fresh launch; n on torchelastic's n-th restart of the processes."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _start_process_group(backend: str, rank: int, world: int, timeout_s: float) -> None:
    """init_process_group on env://'s store, under this restart round's prefix, with a timeout."""
    from torch.distributed.rendezvous import rendezvous

    # torch._dynamo's first import (the first torch.optim optimiser makes it) keeps references to the
    # default process group that destroy_process_group does not drop (torch 2.14: 10 of them), so gloo's
    # threads would outlive shutdown() into the interpreter's finalization, where tearing them down can
    # abort a finished run ("terminate called without an active exception"). Imported before the group
    # exists, it holds none (tests/test_shutdown.py).
    import torch._dynamo  # noqa: F401

    timeout = datetime.timedelta(seconds=timeout_s)
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    try:
        store, _, _ = next(rendezvous("env://", rank, world, timeout=timeout))
        store = dist.PrefixStore(f"repro/round{restart_round()}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    except (RuntimeError, ValueError) as exc:  # DistNetworkError, DistStoreError: a peer or the store is missing
        raise ValueError(
            f"rank {rank}: the {world} processes did not all join within --comm-timeout {timeout_s:g} s (store at "
            f"{where}; {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). A process never "
            f"started or died: check every node's launch (same --nnodes, --rdzv-endpoint/--master-addr) and the "
            f"other ranks' errors") from None


def init_topology(device: str = "auto", backend: str = "auto", timeout_s: float = 600.0) -> Topology:
    """Read torchrun's environment, start the process group and make the pair and replica groups."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world > 1 and world % 2:
        raise raised_on_every_rank(ValueError(
            f"world size {world} is odd: each model replica is a pair of processes (one tower each). Launch "
            f"with --nproc_per_node=2 (k pairs: 2k processes in all), or --nproc_per_node=1 on one node for "
            f"the grouped single-device form."))
    dev, own_gpus = _pick_device(local_rank, local_world, device)
    if world == 1:
        return Topology(0, 1, 0, dev, None, 1, 0, 0, 1)
    if backend == "auto":
        # NCCL needs one GPU per rank; two ranks on one GPU (or CPUs) use gloo.
        backend = "nccl" if dev.type == "cuda" and own_gpus else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("--backend nccl needs GPUs; use gloo on CPU")
    if not dist.is_initialized():
        _start_process_group(backend, rank, world, timeout_s)
    pairs = world // 2
    topo = Topology(rank, world, local_rank, dev, backend, 2, rank % 2, rank // 2, pairs)
    timeout = datetime.timedelta(seconds=timeout_s)
    for p in range(pairs):  # every rank creates every group, in the same order
        group = dist.new_group([2 * p, 2 * p + 1], timeout=timeout)
        if p == topo.replica:
            topo.pair_group = group
    if pairs > 1:
        for t in range(2):
            group = dist.new_group([2 * p + t for p in range(pairs)], timeout=timeout)
            if t == topo.tower:
                topo.replica_group = group
    return topo


def all_reduce_sum(values: list[float], topo: Topology) -> list[float]:
    """Sum a few numbers over every process (epoch metrics, stop flags); identity in one process."""
    if topo.backend is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=topo.comm_device)
    dist.all_reduce(t)
    return t.tolist()


def shutdown(peers_done: bool = False) -> None:
    """The process group's end. After a run that ended alike on every rank (`peers_done`), a barrier
    first, so that no rank tears gloo down while a peer's last collective is still in flight (once, under
    load, rank 0 aborted in gloo's teardown after the closing table); after an error, no barrier: a peer
    may be dead."""
    if dist.is_initialized():
        if peers_done:
            dist.barrier()
        dist.destroy_process_group()
