"""The paper's optimiser and learning-rate schedules (paper section 5)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from repro import update_native
from repro.config import OptimConfig


class PaperSGD(torch.optim.Optimizer):
    """Momentum SGD with the paper's update rule, exactly:

        v <- momentum * v - weight_decay * lr * w - lr * grad ;   w <- w + v

    The learning rate scales each step's new contribution only. torch.optim.SGD instead keeps
    v <- momentum * v + grad and steps w <- w - lr * v, which rescales the whole velocity when the
    learning rate drops: the two agree only while the learning rate is constant.

    Param groups carry `lr_mult` (the group's rate is `lr * lr_mult`) so one base rate drives weights
    and biases; `set_lr` changes it. A group may also carry `fixed` (its rate stays `lr_mult` times the
    first rate: the 2012 code's bias rate) and `lr_changes`, ((0-based epoch, rate), ...) absolute rates
    from that epoch on (the 2012 code's conv1), applied by `set_lr(lr, epoch)`. `compiled=True` runs the
    same update through torch.compile, which fuses its four passes over the parameters into one (read w,
    g, v; write w, v).
    """

    def __init__(self, params: Iterable, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4,
                 compiled: bool = False):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"bad PaperSGD settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lr_mult=1.0))
        self.base_lr = self.initial_lr = lr
        self.compiled = compiled
        # (id(param group), device, dtype) -> the group's rate as a tensor there (compiled update)
        self._lr_tensors: dict[tuple, Tensor] = {}
        self._lr_values: dict[tuple, float] = {}  # the rate each of those holds
        self.set_lr(lr)

    def set_lr(self, lr: float, epoch: int | None = None) -> None:
        """The base rate `lr` for the 0-based `epoch` (None: before any group's lr_changes)."""
        self.base_lr = lr
        for group in self.param_groups:
            group["lr"] = group_rate(group, lr, self.initial_lr, epoch)
            self._refresh_lr_tensor(group)  # now, not at the next step(): a CUDA graph replay runs no Python

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            velocity = [self._velocity(p) for p in params]
            if self.compiled:  # per device: one group may span both towers' GPUs (the benchmark's towers)
                for idx in _by_device(params):
                    _compiled_update()([params[i] for i in idx], [grads[i] for i in idx], [velocity[i] for i in idx],
                                       self._lr_tensor(group, params[idx[0]]), group["momentum"],
                                       group["weight_decay"])
            else:
                paper_update(params, grads, velocity, group["lr"], group["momentum"], group["weight_decay"])
        return loss

    def _lr_tensor(self, group: dict, like: Tensor) -> Tensor:
        """The group's rate as a 0-d tensor beside its parameters (for the compiled update), refreshed in
        place when the rate changes (by set_lr at once, or found changed here): a device-side fill, no
        host wait, and a captured CUDA graph reads the new value at its next replay."""
        key = (id(group), like.device, like.dtype)
        t = self._lr_tensors.get(key)
        if t is None:
            t = self._lr_tensors[key] = torch.full((), group["lr"], dtype=like.dtype, device=like.device)
            self._lr_values[key] = group["lr"]
        elif self._lr_values[key] != group["lr"]:
            self._refresh_lr_tensor(group)
        return t

    def _refresh_lr_tensor(self, group: dict) -> None:
        for key, t in self._lr_tensors.items():
            if key[0] == id(group):
                t.fill_(group["lr"])
                self._lr_values[key] = group["lr"]

    def _velocity(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "velocity" not in state:
            state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["velocity"]

    def velocities(self, named_params: Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
        """Velocity of each named parameter (zeros before its first step), keyed like the model."""
        return {name: self._velocity(p) for name, p in named_params}

    def load_velocities(self, named_params: Iterable[tuple[str, Tensor]], velocities: dict[str, Tensor]) -> None:
        for name, p in named_params:
            if name not in velocities:
                raise KeyError(f"the checkpoint has no optimiser velocity for parameter {name!r}")
            self.state[p]["velocity"] = velocities[name].to(device=p.device, dtype=p.dtype).clone()


def group_rate(group: dict, lr: float, initial_lr: float, epoch: int | None) -> float:
    """A param group's rate: lr_mult times the base rate (the first one if the group is `fixed`), unless
    one of its `lr_changes` has been reached by `epoch` (the latest one reached wins)."""
    rate = (initial_lr if group.get("fixed") else lr) * group["lr_mult"]
    for start, value in group.get("lr_changes", ()):
        if epoch is not None and epoch >= start:
            rate = value
    return rate


def _by_device(params: list[Tensor]) -> list[list[int]]:
    """Indices of `params` split by (device, dtype), in first-seen order."""
    parts: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        parts.setdefault((p.device, p.dtype), []).append(i)
    return list(parts.values())


def paper_update(params: list[Tensor], grads: list[Tensor], velocity: list[Tensor], lr: float, momentum: float,
                 weight_decay: float) -> None:
    """v <- momentum * v - weight_decay * lr * w - lr * grad ;  w <- w + v, in place, on lists of tensors.
    Eager, each line is one multi-tensor kernel: four passes over the parameters' memory. On the CPU in
    float32 or float64 the same arithmetic runs in one pass (repro/update_native.c), to the same bits."""
    if update_native.applies(params, grads, velocity):
        update_native.update(params, grads, velocity, lr, momentum, weight_decay)
        return
    torch._foreach_mul_(velocity, momentum)
    if weight_decay:
        torch._foreach_add_(velocity, params, alpha=-weight_decay * lr)
    torch._foreach_add_(velocity, grads, alpha=-lr)
    torch._foreach_add_(params, velocity)


def _update_for_compile(params: list[Tensor], grads: list[Tensor], velocity: list[Tensor], lr: Tensor,
                        momentum: float, weight_decay: float) -> None:
    """paper_update's arithmetic in the same order, with the rate a 0-d tensor on the parameters' device:
    torch.compile freezes a Python float rate into the graph (and compiles again for each new one)."""
    torch._foreach_mul_(velocity, momentum)
    if weight_decay:
        torch._foreach_add_(velocity, torch._foreach_mul(params, -weight_decay * lr))
    torch._foreach_add_(velocity, torch._foreach_mul(grads, -lr))
    torch._foreach_add_(params, velocity)


_compiled = None


def _compiled_update():
    """The update compiled once per process (built on first use: compiling costs seconds). Inductor
    fuses the four passes into one, reading w, g and v and writing w and v."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_update_for_compile, fullgraph=True)
    return _compiled


def paper_optimizer(model: nn.Module, cfg: OptimConfig, compiled: bool = False) -> PaperSGD:
    """Weights decay at `cfg.weight_decay`; biases (1-d parameters) follow the config's bias rules; a layer
    named in `cfg.layer_lr_changes` gets groups of its own carrying its changes.
    `compiled`: fuse the update with torch.compile (training's and the benchmark's --compile)."""
    changed = {layer for layer, *_ in cfg.layer_lr_changes}
    parts: dict[tuple[str | None, bool], list] = {}  # (own layer or None, is bias) -> parameters
    for name, p in sorted(model.named_parameters()):
        layer = name.split(".")[-2] if "." in name else name  # "towers.0.conv1.weight" -> "conv1"
        parts.setdefault((layer if layer in changed else None, p.ndim == 1), []).append(p)
    if not parts.get((None, False)):
        parts[(None, False)] = []  # the weights' group comes first, even when empty
    missing = changed - {layer for layer, _ in parts}
    if missing:
        raise ValueError(f"layer_lr_changes names {sorted(missing)}, which the model does not have")
    groups = []
    for (layer, bias), params in sorted(parts.items(), key=lambda kv: (kv[0][0] is not None, kv[0][0] or "",
                                                                         kv[0][1])):
        group = dict(params=params)
        if bias:
            group.update(lr_mult=cfg.bias_lr_mult, fixed=cfg.bias_lr_fixed,
                         weight_decay=cfg.weight_decay if cfg.bias_weight_decay else 0.0)
        if layer is not None:
            group["lr_changes"] = tuple((epoch, b if bias else w) for name, epoch, w, b in cfg.layer_lr_changes
                                        if name == layer)
        groups.append(group)
    return PaperSGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, compiled=compiled)


def unreached_milestones(cfg: OptimConfig, epochs: int) -> list[int]:
    """Milestones a run of `epochs` epochs never reaches (milestone m divides the rate from 0-based
    epoch m), for a warning: a short run with milestones 25, 51, 79 would never drop."""
    return [m for m in cfg.milestones if m >= epochs] if cfg.schedule == "milestones" else []


class LRSchedule:
    """The learning rate at the start of each epoch.

    "plateau" (the paper): divide by `lr_drop` when the validation top-1 error has not improved by
    `plateau_threshold` points for `plateau_patience` epochs, at most `max_drops` times.
    "milestones" (the 2012 code): divide at the start of each listed 0-based epoch (the 2012 run's log
    has 1-based 25, 51, 79, i.e. 0-based 24, 50, 78: the cuda-convnet-2012 preset's).
    """

    def __init__(self, cfg: OptimConfig):
        self.cfg = cfg
        self.drops = 0
        self.best = float("inf")
        self.stale_epochs = 0
        self.history: list[tuple[int, float]] = []  # (epoch, lr) at each change

    @property
    def lr(self) -> float:
        return self.cfg.lr / self.cfg.lr_drop ** self.drops

    def start_epoch(self, epoch: int) -> float:
        if self.cfg.schedule == "milestones":
            drops = min(sum(epoch >= m for m in self.cfg.milestones), self.cfg.max_drops)
            if drops != self.drops:
                self.drops = drops
                self.history.append((epoch, self.lr))
        return self.lr

    def end_epoch(self, epoch: int, val_top1_error: float | None) -> None:
        """Feed the epoch's validation error (percent) to the plateau rule."""
        if self.cfg.schedule != "plateau" or val_top1_error is None or math.isnan(val_top1_error):
            return  # NaN: no validation image was scored, which says nothing about a plateau
        if val_top1_error < self.best - self.cfg.plateau_threshold:
            self.best, self.stale_epochs = val_top1_error, 0
            return
        # best moves only on a gain that counts: smaller gains add up against it until they do
        self.stale_epochs += 1
        if self.stale_epochs >= self.cfg.plateau_patience and self.drops < self.cfg.max_drops:
            self.drops += 1
            self.stale_epochs = 0
            self.history.append((epoch + 1, self.lr))

    def state_dict(self) -> dict:
        return dict(drops=self.drops, best=self.best, stale_epochs=self.stale_epochs, history=list(self.history))

    def load_state_dict(self, state: dict) -> None:
        self.drops, self.best, self.stale_epochs = state["drops"], state["best"], state["stale_epochs"]
        self.history = [tuple(h) for h in state["history"]]
