"""One procedure run on each form of the network, so the tests can compare what comes out."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repro.config import ModelConfig, OptimConfig
from repro.exchange import record
from repro.model.distributed import pair_loss
from repro.optim import paper_optimizer

STEPS = 3  # optimiser steps; the learning rate drops by 10 before the last one
BATCH = 2


def batches(cfg: ModelConfig, dtype: torch.dtype, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        x = ((torch.rand(BATCH, 3, cfg.image_size, cfg.image_size, generator=g) - 0.5) * 255).to(dtype)
        y = torch.randint(0, cfg.num_classes, (BATCH,), generator=g)
        yield x, y


# The paper's rate in float64. In float32 its first step moves conv1 by ~1.5% on random pixels, and
# rounding differences (~1e-6, from summation order) then flip ReLU and max-pool decisions and grow
# to ~1e-4 within three steps; at a tenth of the rate they stay at the rounding level.
LEARNING_RATE = {torch.float64: 0.01, torch.float32: 0.001}


def exercise(model: nn.Module, cfg: ModelConfig, dtype: torch.dtype, prefix: str = "") -> dict:
    """Eval logits, train logits, gradients and the exchange log of the first batch, then weights and
    velocities after STEPS steps of the paper's optimiser. Keys are stripped of `prefix`. Where no
    test compares the network's training (`compares_training`), only the logits and the log."""

    def named(d):
        return {k[len(prefix):]: v.detach().cpu().clone() for k, v in d if k.startswith(prefix)}

    device = next(model.parameters()).device  # where the input goes (tower 0's device); results come back to the CPU
    data = [(x.to(device), y) for x, y in batches(cfg, dtype)]
    training = compares_training(cfg, dtype)
    if not training:  # one forward and backward pass, for the train logits and both phases' exchanges
        data = data[:1]
    x0 = data[0][0]
    out = {}
    with torch.no_grad():
        out["eval_logits"] = model.eval()(x0).cpu().clone()
    model.train()
    opt = paper_optimizer(model, OptimConfig(lr=LEARNING_RATE[dtype]))
    for step, (x, y) in enumerate(data):
        if step == STEPS - 1:
            opt.set_lr(opt.base_lr / 10)
        opt.zero_grad()
        with record() as log:  # what crossed between towers in this step, forward and backward
            logits = model(x)
            pair_loss(logits, y.to(logits.device), F.cross_entropy).backward()
        if step == 0:
            out["log"] = log.transfers
            out["train_logits"] = logits.detach().cpu().clone()
            if training:
                out["grads"] = named((n, p.grad) for n, p in model.named_parameters())
        opt.step()
    if not training:
        return out
    out["state"] = named(model.state_dict().items())
    out["velocity"] = named(opt.velocities(model.named_parameters()).items())
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def training_check_config(dtype: torch.dtype) -> ModelConfig:
    """The network on which two forms' gradients and weights after steps are compared.

    Max-pooling sends each window's gradient to its largest input; where two inputs differ by less
    than rounding, two forms may send it to different ones. At full size, the last pool's 18,432
    windows (batch 2) hold top-two gaps near 1e-6 of the largest value, about float32's rounding
    after five layers: a change in summation order anywhere moves one window's gradient, 3.5e-3
    relative error in conv1's gradient (seen when the CPU LRN's order changed). So float32 compares
    training on the 67-pixel network, whose last pool's gaps are 1e-4 and more; float64, whose
    rounding is 1e-15, at full size. Logits are compared at full size in both: a near-tie does not
    move a maximum's value."""
    from tests.conftest import SMALL

    return ModelConfig() if dtype == torch.float64 else SMALL


def compares_training(cfg: ModelConfig, dtype: torch.dtype) -> bool:
    """Whether the tests compare this network's gradients and weights after steps in this dtype: all
    but the full-size network where training_check_config moves that comparison to a smaller one
    (its results would be ~1 GB per form, never read)."""
    return cfg != ModelConfig() or training_check_config(dtype) == cfg


def assert_same(got: dict, expected: dict, dtype: torch.dtype, what: str, tolerance: float | None = None) -> None:
    tol = TOLERANCE[dtype] if tolerance is None else tolerance
    assert got.keys() == expected.keys(), f"{what}: different entries"
    for k in expected:
        if expected[k].is_floating_point():
            err = relative_error(got[k], expected[k])
            assert err <= tol, f"{what} {k}: relative error {err:.3g} > {tol}"
        else:
            assert torch.equal(got[k], expected[k]), f"{what} {k} differs"
