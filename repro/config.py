"""The paper's constants, as frozen configuration objects.

Every default is the paper's value; the section of the paper (and of SPEC.md, the project's fact
sheet) that it comes from is named beside it. Variants such as the 2012 code's choices or the paper's
ablations are other instances of the same classes (see `MODEL_VARIANTS`), never forks of the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class LRNConfig:
    """Local response normalisation, paper section 3.3 (SPEC section 2)."""

    enabled: bool = True
    size: int = 5  # n, channels in the window (odd: the window is centred)
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0
    # "paper": alpha multiplies the plain sum of squares, as the paper prints it.
    # "divided": alpha / size multiplies it, as the 2012 code, Caffe and torch.nn.LocalResponseNorm do.
    alpha_convention: str = "paper"

    def __post_init__(self) -> None:
        if self.size < 1 or self.size % 2 == 0:
            raise ValueError(f"LRN size must be a positive odd number (a centred window), got {self.size}")
        if self.alpha_convention not in ("paper", "divided"):
            raise ValueError(f"LRN alpha_convention must be 'paper' or 'divided', got {self.alpha_convention!r}")

    @property
    def sum_scale(self) -> float:
        """The factor that multiplies the windowed sum of squares."""
        return self.alpha if self.alpha_convention == "paper" else self.alpha / self.size


@dataclass(frozen=True)
class TowerWidths:
    """Kernels (conv) and units (fc) held by ONE tower, paper Figure 2 (SPEC section 1).

    The only table of layer sizes: the towers and the grouped form both read it.
    """

    conv1: int = 48
    conv2: int = 128
    conv3: int = 192
    conv4: int = 192
    conv5: int = 128
    fc6: int = 2048
    fc7: int = 2048


@dataclass(frozen=True)
class ModelConfig:
    """The network, paper section 3 and 5 (SPEC sections 1-3)."""

    num_classes: int = 1000
    image_size: int = 227  # input crop; the paper's "224" only works with padding (SPEC section 1, 7)
    in_channels: int = 3
    towers: int = 2  # the paper's two GPUs; 1 = the one-GPU ablation of section 3.2
    widths: TowerWidths = field(default_factory=TowerWidths)
    lrn: LRNConfig = field(default_factory=LRNConfig)
    pool_kernel: int = 3  # overlapping pooling, section 3.4: z = 3 ...
    pool_stride: int = 2  # ... s = 2 (2/2 is the non-overlapping ablation)
    dropout: float = 0.5  # on the outputs of fc6 and fc7, section 4.2
    # "paper": keep units unscaled in training, multiply by (1 - p) at test time, as section 4.2 says.
    # "inverted": divide by (1 - p) in training, identity at test (torch.nn.Dropout); same in expectation.
    dropout_scaling: str = "paper"
    init_std: float = 0.01  # N(0, 0.01^2) for every weight, section 5
    init_std_conv3_5: float = 0.01  # the 2012 code used 0.03 here (SPEC section 7)
    # Layers whose biases start at 1 ("provides the ReLUs with positive inputs"); the rest start at 0.
    unit_bias_layers: tuple[str, ...] = ("conv2", "conv4", "conv5", "fc6", "fc7")

    def __post_init__(self) -> None:
        if self.towers < 1:
            raise ValueError(f"towers must be >= 1, got {self.towers}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.dropout_scaling not in ("paper", "inverted"):
            raise ValueError(f"dropout_scaling must be 'paper' or 'inverted', got {self.dropout_scaling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        # Fail here, with the numbers, rather than deep inside a conv layer.
        if self.feature_sizes()[-1] < 1:
            raise ValueError(
                f"image_size {self.image_size} is too small for this network: pool5 would be empty "
                f"(sizes {self.feature_sizes()}); use at least 67 (the paper uses 227)")

    def feature_sizes(self) -> tuple[int, int, int, int, int]:
        """Spatial size after conv1, pool1, pool2 (= conv3..conv5), and pool5: (55, 27, 13, 13, 6)."""

        def pool(n: int) -> int:
            return (n - self.pool_kernel) // self.pool_stride + 1 if n >= self.pool_kernel else 0

        conv1 = (self.image_size - 11) // 4 + 1 if self.image_size >= 11 else 0
        pool1 = pool(conv1)
        pool2 = pool(pool1)  # conv2..conv5 keep the size (padding 2, 1, 1, 1)
        return conv1, pool1, pool2, pool2, pool(pool2)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["widths"] = TowerWidths(**d.get("widths", {}))
        d["lrn"] = LRNConfig(**d.get("lrn", {}))
        d["unit_bias_layers"] = tuple(d.get("unit_bias_layers", cls.unit_bias_layers))
        return cls(**d)


def paper(num_classes: int = 1000) -> ModelConfig:
    """The network as the paper's text describes it."""
    return ModelConfig(num_classes=num_classes)


def cuda_convnet_2012(num_classes: int = 1000) -> ModelConfig:
    """The 2012 code's numerical choices that this model expresses (SPEC section 7).

    Not modelled: the ReLU order of conv1, layer 2's extra spatial normalisation, the 224 input with
    one-sided padding. docs/fidelity.md lists them.
    """
    return ModelConfig(num_classes=num_classes, lrn=LRNConfig(alpha_convention="divided"),
                       init_std_conv3_5=0.03)


def no_lrn(num_classes: int = 1000) -> ModelConfig:
    """Ablation, section 3.3: without response normalisation."""
    return ModelConfig(num_classes=num_classes, lrn=LRNConfig(enabled=False))


def non_overlapping_pool(num_classes: int = 1000) -> ModelConfig:
    """Ablation, section 3.4: pooling with z = s = 2 (same output sizes)."""
    return ModelConfig(num_classes=num_classes, pool_kernel=2, pool_stride=2)


def one_tower(num_classes: int = 1000) -> ModelConfig:
    """Ablation, section 3.2: one GPU with half the kernels in conv1-conv4; conv5 and the fully
    connected layers keep their full size, "to make the two nets have approximately the same number
    of parameters"."""
    return ModelConfig(num_classes=num_classes, towers=1,
                       widths=TowerWidths(conv1=48, conv2=128, conv3=192, conv4=192, conv5=256,
                                          fc6=4096, fc7=4096))


MODEL_VARIANTS: dict[str, Callable[[int], ModelConfig]] = {
    "paper": paper,
    "cuda-convnet-2012": cuda_convnet_2012,
    "no-lrn": no_lrn,
    "non-overlapping-pool": non_overlapping_pool,
    "one-tower": one_tower,
}


@dataclass(frozen=True)
class OptimConfig:
    """Stochastic gradient descent with the paper's update rule, section 5 (SPEC section 4)."""

    lr: float = 0.01  # epsilon, equal for all layers
    momentum: float = 0.9
    weight_decay: float = 5e-4
    bias_weight_decay: bool = False  # the rule is stated for weights; the 2012 code did not decay biases
    bias_lr_mult: float = 1.0  # the 2012 code used 2
    # "plateau": divide by lr_drop when validation error stops improving (the paper);
    # "milestones": divide at fixed epochs (the 2012 code's 25, 51, 79).
    schedule: str = "plateau"
    lr_drop: float = 10.0
    max_drops: int = 3  # "reduced three times prior to termination"
    milestones: tuple[int, ...] = (25, 51, 79)
    plateau_patience: int = 3  # epochs without enough improvement before a drop
    plateau_threshold: float = 0.1  # top-1 error points that count as an improvement

    def __post_init__(self) -> None:
        if self.schedule not in ("plateau", "milestones"):
            raise ValueError(f"schedule must be 'plateau' or 'milestones', got {self.schedule!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
