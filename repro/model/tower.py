"""One GPU's half of the network: the unit that the in-process and distributed forms place."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from repro.config import ModelConfig
from repro.model.layers import (LocalResponseNorm, SameMapResponseNorm, SharedMaskDropout, lrn_then_pool,
                                pad_for_conv1)
from repro.model.spec import init_paper_, make_classifier, make_layer, tower_layers


class Tower(nn.Module):
    """Tower `index` of the paper's Figure 2: its own block of every layer and nothing else.

    The forward pass is cut at the four exchanges (docs/architecture.md); the model that owns the towers
    calls these stages and the exchanges between them. fc8 exists on tower 0 only. Built alone, it
    draws the paper's initialisation for its own layers; the two-tower forms pass `init=False` and
    load their block of one grouped draw instead (so one seed gives the same network in every form).
    """

    def __init__(self, config: ModelConfig, index: int, *, init: bool = True):
        super().__init__()
        if not 0 <= index < config.towers:
            raise ValueError(f"tower index {index} out of range for {config.towers} towers")
        self.config, self.index = config, index
        for spec in tower_layers(config):
            self.add_module(spec.name, make_layer(spec, towers=1))
        self.fc8 = make_classifier(config) if index == 0 else None
        # ReLU, then LRN: one pass (layers.py); the 2012 code's layer 1 has its ReLU after the pool instead
        self.lrn1 = LocalResponseNorm(config.lrn, relu=not config.relu1_after_pool, inplace=True)
        self.lrn2 = LocalResponseNorm(config.lrn, relu=True, inplace=True)
        self.norm2 = SameMapResponseNorm() if config.same_map_norm2 else nn.Identity()  # the 2012 code's cnorm2
        self.pool = nn.MaxPool2d(config.pool_kernel, config.pool_stride)
        w, t, p, scaling = config.widths, config.towers, config.dropout, config.dropout_scaling
        self.drop6 = SharedMaskDropout(p, 6, t * w.fc6, index * w.fc6, w.fc6, scaling)
        self.drop7 = SharedMaskDropout(p, 7, t * w.fc7, index * w.fc7, w.fc7, scaling)
        if init:
            init_paper_({s.name: getattr(self, s.name) for s in tower_layers(config)}
                        | ({"fc8": self.fc8} if self.fc8 is not None else {}), config)

    def conv1_to_pool2(self, image: Tensor) -> Tensor:
        return self.relu1_to_pool2(self.conv1(pad_for_conv1(image, self.config)))

    def relu1_to_pool2(self, conv1: Tensor) -> Tensor:
        """The rest of conv1_to_pool2, from conv1's output (B, 48, 55, 55) before its ReLU."""
        cfg = self.config
        x = lrn_then_pool(self.lrn1, self.pool, conv1)  # ReLU + LRN + pool: (B, 48, 27, 27)
        x = F.relu(x) if cfg.relu1_after_pool else x  # the 2012 order: LRN + pool + ReLU
        return lrn_then_pool(self.lrn2, self.pool, self.conv2(x), self.norm2)  # (B, 128, 13, 13) = pool2_local

    def conv3_to_pool5(self, pool2_full: Tensor) -> Tensor:
        x = F.relu(self.conv3(pool2_full))  # (B, 192, 13, 13)
        x = F.relu(self.conv4(x))  # (B, 192, 13, 13)
        return self.pool(F.relu(self.conv5(x))).flatten(1)  # (B, 128*6*6) = pool5_local

    def fc6_local(self, pool5_full: Tensor) -> Tensor:
        return self.drop6(F.relu(self.fc6(pool5_full)))  # (B, 2048)

    def fc7_activations(self, fc6_full: Tensor) -> Tensor:
        return F.relu(self.fc7(fc6_full))  # (B, 2048), before dropout (Figure 4's code)

    def fc7_local(self, fc6_full: Tensor) -> Tensor:
        return self.drop7(self.fc7_activations(fc6_full))  # (B, 2048)

    def classify(self, fc7_full: Tensor) -> Tensor:
        if self.fc8 is None:
            raise RuntimeError("fc8 lives on tower 0 only (as in the 2012 code; docs/fidelity.md)")
        return self.fc8(fc7_full)  # (B, num_classes)
