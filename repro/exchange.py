"""The four exchanges between towers, and nothing else (paper section 3.2; docs/architecture.md).

"The GPUs communicate only in certain layers": pool2 -> conv3, pool5 -> fc6, fc6 -> fc7 (each tower
receives the other's block) and fc7 -> fc8 (tower 1 sends to tower 0, where fc8 and the loss live).
Every crossing is one of the autograd Functions below, named for what it does in each direction:

  _CopyToTower       forward: copy to the other tower's device;  backward: copy the gradient back
  _AllGatherTowers   forward: all-gather over the pair;          backward: reduce-scatter
  _GatherToFirst     forward: send to tower 0 (gather);          backward: send the slice back (scatter)

`LocalExchange` serves towers in one process (on one or two devices); `PairExchange` serves one tower
per process of a torch.distributed group. Both log every transfer to the `record()` context, so a
test can count the calls and bytes that cross and prove nothing else does.
"""

from __future__ import annotations

import itertools
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

EXCHANGES = ("pool2->conv3", "pool5->fc6", "fc6->fc7", "fc7->fc8")


@dataclass(frozen=True)
class Transfer:
    exchange: str  # one of EXCHANGES
    phase: str  # "forward" (activations) or "backward" (their gradients)
    src: int  # sending tower
    dst: int  # receiving tower
    nbytes: int
    call: int  # which exchange call (the forward's) this transfer belongs to


class ExchangeLog:
    """Transfers seen while recording; in a distributed run, those this process sent."""

    def __init__(self) -> None:
        self.transfers: list[Transfer] = []

    def calls(self, phase: str) -> list[str]:
        """The exchange of each call that moved data in `phase`, in the order the data moved."""
        seen: dict[int, str] = {}
        for t in self.transfers:
            if t.phase == phase:
                seen.setdefault(t.call, t.exchange)
        return list(seen.values())

    def bytes(self, phase: str | None = None, src: int | None = None, exchange: str | None = None) -> int:
        return sum(t.nbytes for t in self.transfers
                   if (phase is None or t.phase == phase) and (src is None or t.src == src)
                   and (exchange is None or t.exchange == exchange))

    def summary(self) -> dict[str, Counter]:
        out: dict[str, Counter] = {}
        for t in self.transfers:
            out.setdefault(f"{t.phase} {t.exchange}", Counter())[f"{t.src}->{t.dst}"] += t.nbytes
        return out


_recording: list[ExchangeLog] = []
_call_ids = itertools.count()


@contextmanager
def record() -> Iterator[ExchangeLog]:
    """Log every transfer between towers made inside the block (eager mode; compiled code skips it)."""
    log = ExchangeLog()
    _recording.append(log)
    try:
        yield log
    finally:
        _recording.remove(log)


def _log(exchange: str, phase: str, src: int, dst: int, t: Tensor, call: int) -> None:
    if _recording and not torch.compiler.is_compiling():
        item = Transfer(exchange, phase, src, dst, t.numel() * t.element_size(), call)
        for log in _recording:
            log.transfers.append(item)


def _new_call() -> int:
    return -1 if torch.compiler.is_compiling() else next(_call_ids)


# --- towers in one process ---------------------------------------------------------------------

class _CopyToTower(torch.autograd.Function):
    """forward: tower src's activation to tower dst's device; backward: the gradient back to src."""

    @staticmethod
    def forward(ctx, x: Tensor, device: torch.device, exchange: str, src: int, dst: int, call: int):
        ctx.meta = (x.device, exchange, src, dst, call)
        _log(exchange, "forward", src, dst, x, call)
        return x.to(device) if x.device != device else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        device, exchange, src, dst, call = ctx.meta
        _log(exchange, "backward", dst, src, grad, call)
        return grad.to(device), None, None, None, None, None


class LocalExchange:
    """Exchanges for towers held by one process; tower t lives on devices[t]."""

    def __init__(self, devices: Sequence[torch.device]):
        self.devices = [torch.device(d) for d in devices]

    def _send(self, exchange: str, x: Tensor, src: int, dst: int, call: int) -> Tensor:
        return x if src == dst else _CopyToTower.apply(x, self.devices[dst], exchange, src, dst, call)

    def all_gather(self, exchange: str, local: Sequence[Tensor], dim: int = 1) -> list[Tensor]:
        """Every tower gets all towers' blocks, concatenated along `dim` in tower order."""
        call = _new_call()
        return [torch.cat([self._send(exchange, x, src, dst, call) for src, x in enumerate(local)], dim)
                for dst in range(len(local))]

    def gather(self, exchange: str, local: Sequence[Tensor], dim: int = 1, dst: int = 0) -> Tensor:
        """Tower `dst` gets all towers' blocks; the others get nothing."""
        call = _new_call()
        return torch.cat([self._send(exchange, x, src, dst, call) for src, x in enumerate(local)], dim)


# --- one tower per process -----------------------------------------------------------------------

def _to_last(x: Tensor, dim: int) -> Tensor:
    """Move `dim` last and make it dense; free for channels_last activations, whose channels are."""
    return x.movedim(dim, -1).contiguous()


class _AllGatherTowers(torch.autograd.Function):
    """forward: all-gather the towers' blocks along `dim`; backward: reduce-scatter the gradient
    (each tower's block gets the sum of what every tower's next layer sent back for it)."""

    @staticmethod
    def forward(ctx, x: Tensor, px: "PairExchange", exchange: str, dim: int, call: int):
        ctx.meta = (px, exchange, dim, call)
        n, me = px.towers, px.tower
        moved = _to_last(x, dim)
        parts = px.all_gather_parts(moved)
        for dst in range(n):
            if dst != me:
                _log(exchange, "forward", me, dst, x, call)
        return torch.cat(parts, dim=-1).movedim(-1, dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        px, exchange, dim, call = ctx.meta
        n, me = px.towers, px.tower
        parts = _to_last(grad, dim).chunk(n, dim=-1)
        for dst in range(n):
            if dst != me:
                _log(exchange, "backward", me, dst, parts[dst], call)
        return px.reduce_scatter_parts(parts).movedim(-1, dim), None, None, None, None


class _GatherToFirst(torch.autograd.Function):
    """forward: every tower sends its block to tower 0, which concatenates them along dim 1;
    backward: tower 0 sends each tower the gradient of its block (a scatter).

    On the other towers the output is an empty (B, 0) anchor: a loss built from it (its sum, zero)
    lets their backward pass start and receive the real gradient from tower 0.
    """

    @staticmethod
    def forward(ctx, x: Tensor, px: "PairExchange", exchange: str, call: int):
        ctx.meta = (px, exchange, call, x.shape)
        if px.tower != 0:
            _log(exchange, "forward", px.tower, 0, x, call)
            px.send(x.contiguous(), 0)
            return x.new_empty((x.shape[0], 0))
        parts = [x] + [px.recv(torch.empty_like(x, memory_format=torch.contiguous_format), s)
                       for s in range(1, px.towers)]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        px, exchange, call, shape = ctx.meta
        if px.tower != 0:
            return px.recv(grad.new_empty(shape), 0), None, None, None
        parts = grad.chunk(px.towers, dim=1)
        for s in range(1, px.towers):
            _log(exchange, "backward", 0, s, parts[s], call)
            px.send(parts[s].contiguous(), s)
        return parts[0], None, None, None


# torch 2.14 renamed the flat collectives (the old names warn); 2.11 has only the old ones.
_ALL_GATHER_FLAT = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_FLAT = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class PairExchange:
    """Exchanges between the towers of one model replica, one tower per process of `group`.

    Tower index = rank within `group`. The model calls `all_gather` and `gather`; only this class
    (and the Functions above, through it) calls torch.distributed for activations.
    """

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self.towers = dist.get_world_size(group)
        self.tower = dist.get_rank(group)
        self._nccl = dist.get_backend(group) == "nccl"
        # One flat all-gather / reduce-scatter per exchange (NCCL's fast path), or list collectives
        # and an all-reduce (gloo: its reduce-scatter is missing in some releases). Tests switch the
        # former on over gloo, where this torch has it, to cover NCCL's code path on the CPU.
        self.tensor_collectives = self._nccl

    def _global(self, tower: int) -> int:
        return dist.get_global_rank(self.group, tower) if self.group is not None else tower

    def send(self, x: Tensor, tower: int) -> None:
        if x.is_cuda and not self._nccl:
            x = x.cpu()  # gloo's point-to-point takes CPU tensors only (two ranks sharing one GPU)
        dist.send(x, self._global(tower), group=self.group)

    def recv(self, buf: Tensor, tower: int) -> Tensor:
        if buf.is_cuda and not self._nccl:
            staged = torch.empty(buf.shape, dtype=buf.dtype)
            dist.recv(staged, self._global(tower), group=self.group)
            return buf.copy_(staged)
        dist.recv(buf, self._global(tower), group=self.group)
        return buf

    def all_gather_parts(self, x: Tensor) -> list[Tensor]:
        if self.tensor_collectives:
            out = x.new_empty((self.towers * x.shape[0],) + tuple(x.shape[1:]))
            _ALL_GATHER_FLAT(out, x, group=self.group)
            return list(out.chunk(self.towers, dim=0))
        parts = [torch.empty_like(x) for _ in range(self.towers)]
        dist.all_gather(parts, x, group=self.group)
        return parts

    def reduce_scatter_parts(self, parts: Sequence[Tensor]) -> Tensor:
        stacked = torch.cat([p.contiguous() for p in parts], dim=0)
        if self.tensor_collectives:
            out = parts[0].new_empty(parts[0].shape)
            _REDUCE_SCATTER_FLAT(out, stacked, group=self.group)
            return out
        # gloo: reduce-scatter is missing in some releases; an all-reduce gives the same sums.
        dist.all_reduce(stacked, group=self.group)
        return stacked.chunk(self.towers, dim=0)[self.tower]

    def all_gather(self, exchange: str, local: Tensor, dim: int = 1) -> Tensor:
        if self.towers == 1:
            return local
        return _AllGatherTowers.apply(local, self, exchange, dim, _new_call())

    def gather(self, exchange: str, local: Tensor, dim: int = 1) -> Tensor:
        if dim != 1:
            raise ValueError("gather concatenates fully connected activations along dim 1")
        if self.towers == 1:
            return local
        return _GatherToFirst.apply(local, self, exchange, _new_call())
