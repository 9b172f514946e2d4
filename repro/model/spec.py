"""The layer table, read by both forms: what one tower holds and how the grouped form stacks it.

Paper section 3.5 and Figure 2 (docs/paper.md). Tower t owns output block [t*n, (t+1)*n) of every
layer; a layer reads either the image, its own tower's previous block ("own"), or every tower's
("both": conv3 and the fully connected layers, where the towers exchange activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from repro.config import ModelConfig
from repro.model import winograd
from repro.model.linear import Linear


@dataclass(frozen=True)
class LayerSpec:
    name: str
    kind: str  # "conv" or "fc"
    out_per_tower: int
    in_per_tower: int  # inputs one tower's unit reads (already the full width when reads == "both")
    reads: str  # "image", "own" or "both"
    kernel: int = 1
    stride: int = 1
    padding: int = 0


def tower_layers(cfg: ModelConfig) -> list[LayerSpec]:
    """Every layer split across towers, in order: conv1..conv5, fc6, fc7 (fc8 lives on tower 0)."""
    w, t = cfg.widths, cfg.towers
    pool5 = cfg.feature_sizes()[-1]
    return [
        LayerSpec("conv1", "conv", w.conv1, cfg.in_channels, "image", 11, 4, 0),
        LayerSpec("conv2", "conv", w.conv2, w.conv1, "own", 5, 1, 2),
        LayerSpec("conv3", "conv", w.conv3, t * w.conv2, "both", 3, 1, 1),
        LayerSpec("conv4", "conv", w.conv4, w.conv3, "own", 3, 1, 1),
        LayerSpec("conv5", "conv", w.conv5, w.conv4, "own", 3, 1, 1),
        LayerSpec("fc6", "fc", w.fc6, t * w.conv5 * pool5 * pool5, "both"),
        LayerSpec("fc7", "fc", w.fc7, t * w.fc6, "both"),
    ]


def classifier_inputs(cfg: ModelConfig) -> int:
    """fc8 reads fc7 of every tower (exchange 4) and lives on tower 0, as in the 2012 code."""
    return cfg.towers * cfg.widths.fc7


def _unset(build: Callable[[], nn.Module]) -> nn.Module:
    """A layer with its parameters allocated but not drawn: init_paper_ or a loaded state fills them.
    torch's default initialisation would be overwritten anyway; skipping it saves ~1 s of CPU per
    full-size network and starts the paper's draws at the seed's first number."""
    with torch.device("meta"):
        layer = build()
    return layer.to_empty(device=torch.get_default_device())  # where nn.Linear itself would have put it


def make_layer(spec: LayerSpec, towers: int) -> nn.Module:
    """The layer for all `towers` at once (the grouped form) or, with towers=1, for one tower (unset)."""
    if spec.kind == "fc":
        # linear.Linear is nn.Linear that casts its weight to bf16 once per CPU evaluation pass under autocast
        return _unset(lambda: Linear(spec.in_per_tower, towers * spec.out_per_tower))
    groups = towers if spec.reads == "own" else 1
    # winograd.Conv2d is nn.Conv2d with the CPU's Winograd path for the 3x3 layers (off unless chosen)
    return _unset(lambda: winograd.Conv2d(spec.in_per_tower * groups, towers * spec.out_per_tower, spec.kernel,
                                          stride=spec.stride, padding=spec.padding, groups=groups))


def make_classifier(cfg: ModelConfig) -> nn.Linear:
    """fc8 (unset, as make_layer's)."""
    return _unset(lambda: Linear(classifier_inputs(cfg), cfg.num_classes))


@torch.no_grad()
def init_paper_(layers: dict[str, nn.Module], cfg: ModelConfig) -> None:
    """Paper section 5: weights N(0, std^2); biases 1 in the layers that feed ReLUs
    positive inputs early, 0 elsewhere. Draws in a fixed layer order, so a seed fixes the network."""
    for name, layer in layers.items():
        std = cfg.init_std_conv3_5 if name in ("conv3", "conv4", "conv5") else cfg.init_std
        layer.weight.normal_(0.0, std)
        layer.bias.fill_(1.0 if name in cfg.unit_bias_layers else 0.0)
