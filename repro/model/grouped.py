"""The single-device form: both towers side by side as channel groups of one network."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from repro.config import ModelConfig
from repro.model.layers import (LocalResponseNorm, SameMapResponseNorm, SharedMaskDropout, lrn_then_pool,
                                pad_for_conv1)
from repro.model.spec import init_paper_, make_classifier, make_layer, tower_layers


def resolve_config(num_classes: int | None, config: ModelConfig | None) -> ModelConfig:
    if config is None:
        return ModelConfig(num_classes=1000 if num_classes is None else num_classes)
    if num_classes is not None and num_classes != config.num_classes:
        raise ValueError(f"num_classes={num_classes} contradicts config.num_classes={config.num_classes}")
    return config


class AlexNet(nn.Module):
    """The 2012 network on one device (paper section 3.5, Figure 2), in its "grouped form".

    conv2, conv4 and conv5 are grouped convolutions (groups = towers) and LRN never crosses a group
    boundary, so channel block [t*C/2, (t+1)*C/2) of every layer is exactly tower t of
    `TwoTowerAlexNet`. Departures from the paper's text are listed in docs/fidelity.md.
    """

    def __init__(self, num_classes: int | None = None, *, config: ModelConfig | None = None):
        super().__init__()
        cfg = self.config = resolve_config(num_classes, config)
        t = cfg.towers
        specs = tower_layers(cfg)
        for spec in specs:
            self.add_module(spec.name, make_layer(spec, t))
        self.fc8 = make_classifier(cfg)
        # ReLU, then LRN: one pass (layers.py); the 2012 code's layer 1 has its ReLU after the pool instead.
        # In place where no gradient is wanted: their inputs are conv outputs that nothing else reads
        self.lrn1 = LocalResponseNorm(cfg.lrn, groups=t, relu=not cfg.relu1_after_pool, inplace=True)
        self.lrn2 = LocalResponseNorm(cfg.lrn, groups=t, relu=True, inplace=True)
        self.norm2 = SameMapResponseNorm() if cfg.same_map_norm2 else nn.Identity()  # the 2012 code's cnorm2
        self.pool = nn.MaxPool2d(cfg.pool_kernel, cfg.pool_stride)
        fc6, fc7 = t * cfg.widths.fc6, t * cfg.widths.fc7
        self.drop6 = SharedMaskDropout(cfg.dropout, 6, fc6, 0, fc6, cfg.dropout_scaling)
        self.drop7 = SharedMaskDropout(cfg.dropout, 7, fc7, 0, fc7, cfg.dropout_scaling)
        init_paper_({s.name: getattr(self, s.name) for s in specs} | {"fc8": self.fc8}, cfg)

    def fc7_activations(self, x: Tensor) -> Tensor:
        """The 4096-d hidden code of the paper's Figure 4 (after ReLU, before fc7's dropout)."""
        cfg = self.config
        x = lrn_then_pool(self.lrn1, self.pool, self.conv1(pad_for_conv1(x, cfg)))  # ReLU + LRN + pool: (B, 96, 27, 27)
        x = F.relu(x) if cfg.relu1_after_pool else x  # the 2012 order: LRN + pool + ReLU
        x = lrn_then_pool(self.lrn2, self.pool, self.conv2(x), self.norm2)  # ReLU + LRN (+ same-map norm) + pool: (B, 256, 13, 13)
        x = F.relu(self.conv3(x))  # (B, 384, 13, 13): reads both towers
        x = F.relu(self.conv4(x))  # (B, 384, 13, 13)
        x = self.pool(F.relu(self.conv5(x)))  # (B, 256, 6, 6)
        x = self.drop6(F.relu(self.fc6(x.flatten(1))))  # (B, 4096)
        return F.relu(self.fc7(x))  # (B, 4096)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc8(self.drop7(self.fc7_activations(x)))  # (B, num_classes)
