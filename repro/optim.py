"""The paper's optimiser and learning-rate schedules (paper section 5, SPEC section 4)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from repro.config import OptimConfig


class PaperSGD(torch.optim.Optimizer):
    """Momentum SGD with the paper's update rule, exactly:

        v <- momentum * v - weight_decay * lr * w - lr * grad ;   w <- w + v

    The learning rate scales each step's new contribution only. torch.optim.SGD instead keeps
    v <- momentum * v + grad and steps w <- w - lr * v, which rescales the whole velocity when the
    learning rate drops: the two agree only while the learning rate is constant.

    Param groups carry `lr_mult` (the group's rate is `lr * lr_mult`) so one base rate drives weights
    and biases; `set_lr` changes it.
    """

    def __init__(self, params: Iterable, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"bad PaperSGD settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lr_mult=1.0))
        self.base_lr = lr
        self.set_lr(lr)

    def set_lr(self, lr: float) -> None:
        self.base_lr = lr
        for group in self.param_groups:
            group["lr"] = lr * group["lr_mult"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            velocity = [self._velocity(p) for p in params]
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            torch._foreach_mul_(velocity, mu)
            if wd:
                torch._foreach_add_(velocity, params, alpha=-wd * lr)
            torch._foreach_add_(velocity, grads, alpha=-lr)
            torch._foreach_add_(params, velocity)
        return loss

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


def paper_optimizer(model: nn.Module, cfg: OptimConfig) -> PaperSGD:
    """Weights decay at `cfg.weight_decay`; biases (1-d parameters) follow the config's bias rules."""
    weights, biases = [], []
    for _, p in sorted(model.named_parameters()):
        (biases if p.ndim == 1 else weights).append(p)
    groups = [dict(params=weights)]
    if biases:
        groups.append(dict(params=biases, lr_mult=cfg.bias_lr_mult,
                           weight_decay=cfg.weight_decay if cfg.bias_weight_decay else 0.0))
    return PaperSGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


class LRSchedule:
    """The learning rate at the start of each epoch.

    "plateau" (the paper): divide by `lr_drop` when the validation top-1 error has not improved by
    `plateau_threshold` points for `plateau_patience` epochs, at most `max_drops` times.
    "milestones" (the 2012 code): divide at the start of each listed epoch (0-based epochs 25, 51, 79).
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
        if self.cfg.schedule != "plateau" or val_top1_error is None:
            return
        if val_top1_error < self.best - self.cfg.plateau_threshold:
            self.best, self.stale_epochs = val_top1_error, 0
            return
        self.best = min(self.best, val_top1_error)
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
