"""The model replica a training process holds: the grouped network alone, or its tower of a pair
(wrapped in DistributedDataParallel across pairs), with the grouped view of its state."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from repro.config import ModelConfig
from repro.dist import Topology
from repro.model.convert import grouped_to_towers, towers_to_grouped
from repro.model.distributed import DistributedTowerAlexNet, pair_loss
from repro.model.grouped import AlexNet
from repro.model.layers import set_dropout_stream


def compile_stages(net: nn.Module, mode: str = "default") -> None:
    """Compile each tower stage between exchanges (the exchanges stay eager), or the whole
    grouped network."""
    if isinstance(net, DistributedTowerAlexNet):
        tower = net.tower
        for stage in ("conv1_to_pool2", "conv3_to_pool5", "fc6_local", "fc7_local", "classify"):
            setattr(tower, stage, torch.compile(getattr(tower, stage), mode=mode))
    else:
        net.forward = torch.compile(net.forward, mode=mode)


def _no_buffer_sync() -> dict:
    """The only buffers are the dropout step counters, equal in every replica: no per-forward sync.
    (The keyword was renamed in torch 2.14; 2.11 knows only the old one.)"""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def one_tower_message(cfg: ModelConfig) -> str:
    return (f"a pair of processes runs the two-tower network; this config has {cfg.towers} tower(s) and runs "
            f"as one process only (torchrun --nproc_per_node=1 on one node: the one-tower network is not "
            f"trained data-parallel)")


class Replica:
    def __init__(self, topo: Topology, cfg: ModelConfig, grouped_state: dict[str, Tensor] | None = None,
                 channels_last: bool = False, compile_mode: str | None = None):
        self.topo, self.config = topo, cfg
        if topo.towers == 1:
            net: nn.Module = AlexNet(config=cfg)
            if grouped_state is not None:
                net.load_state_dict(grouped_state)
            self.prefix = ""
        else:
            if cfg.towers != 2:
                raise ValueError(one_tower_message(cfg))
            net = DistributedTowerAlexNet(cfg, topo.pair_group, topo.device, grouped_state)
            self.prefix = "tower."
        net.to(topo.device)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        set_dropout_stream(net, topo.replica)  # replicas draw their own masks
        self.net = net
        self.train_module = net
        if topo.replicas > 1:  # tower t of every pair averages its gradients with the others
            self.train_module = DistributedDataParallel(
                net, device_ids=[topo.device] if topo.device.type == "cuda" else None,
                process_group=topo.replica_group, **_no_buffer_sync())
        if compile_mode:  # None: eager
            compile_stages(net, compile_mode)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return pair_loss(output, target)

    def union_loss(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Forward and loss for pairs whose batches may differ in size (unreadable images dropped).

        The loss is this pair's summed cross-entropy x replicas / all pairs' images, so that DDP's
        average of the pairs' gradients is the mean over the union batch (the paper's gradient is the batch mean, §5), as with
        equal batches. A pair left with no image runs one placeholder at weight 0, so that it still
        joins the exchanges and the gradient all-reduce that the other pairs wait in. Returns (the
        loss to differentiate, the output rows of the real images, this pair's mean loss for the log)."""
        n = x.shape[0]
        if n == 0:
            x, target = x.new_zeros((1, *x.shape[1:])), target.new_zeros(1)
        output = self.train_module(x)
        if output.shape[-1] == 0:  # towers other than 0: their loss only starts the backward pass
            zero = output.sum()
            return zero, output[:n], zero
        count = torch.full((1,), float(n), device=self.topo.comm_device)
        torch.distributed.all_reduce(count, group=self.topo.replica_group)
        summed = nn.functional.cross_entropy(output, target, reduction="none")[:n].sum()
        scale = (self.topo.replicas / count.clamp_min(1)).to(output.device)
        return summed * scale[0], output[:n], summed / max(n, 1)

    def _local(self, named: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k[len(self.prefix):]: v for k, v in named.items() if k.startswith(self.prefix)}

    def grouped(self, named: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Per-parameter state of this replica (weights, velocities) in the grouped form, on the CPU.
        Collective within the pair; the result is on tower 0, None on tower 1."""
        local = {k: v.detach() for k, v in self._local(named).items()}
        if self.topo.towers == 1:
            return {k: v.cpu().clone() for k, v in local.items()}
        ex = self.net.exchange
        keys = sorted(k for k in local if not k.startswith("fc8."))  # what tower 1 has
        if ex.tower == 1:
            for k in keys:
                ex.send(local[k].contiguous(), 0)
            return None
        other = {k: ex.recv(torch.empty_like(local[k], memory_format=torch.contiguous_format), 1) for k in keys}
        return {k: v.cpu() for k, v in towers_to_grouped([local, other], self.config).items()}

    def local_from_grouped(self, grouped: dict[str, Tensor]) -> dict[str, Tensor]:
        """This process's block of a grouped per-parameter state, keyed like its own parameters."""
        if self.topo.towers == 1:
            return dict(grouped)
        mine = grouped_to_towers(grouped, self.config)[self.topo.tower]
        return {self.prefix + k: v for k, v in mine.items()}

    def model_state(self) -> dict[str, Tensor] | None:
        return self.grouped(self.net.state_dict())
