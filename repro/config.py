"""The paper's constants, as frozen configuration objects.

Every default is the paper's value, with the paper's section beside it (docs/paper.md restates them).
Variants such as the 2012 code's choices or the paper's ablations are other instances of the same
classes (see `MODEL_VARIANTS` and `apply_variant`), never forks of the model. Each field that models the
2012 code (cuda-convnet, layers/layers-145.cfg and its neighbours) names the file; docs/fidelity.md
has them all in one table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from repro.settings import flag, runtime


@dataclass(frozen=True)
class LRNConfig:
    """Local response normalisation, paper section 3.3."""

    enabled: bool = True
    size: int = 5  # n, channels in the window (odd: the window is centred)
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0
    # "paper": alpha multiplies the plain sum of squares, as the paper prints it.
    # "divided": alpha / size multiplies it, as the 2012 code, Caffe and torch.nn.LocalResponseNorm do.
    alpha_convention: str = field(default="paper", metadata=flag(
        "LRN: the paper's k + alpha * sum, or alpha / n as the 2012 code and Caffe (docs/fidelity.md)",
        choices=["paper", "divided"], dest="lrn_alpha"))

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
    """Kernels (conv) and units (fc) held by ONE tower, paper Figure 2 (section 3.5).

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
    """The network, paper sections 3, 4.2 and 5."""

    num_classes: int = 1000
    image_size: int = 227  # input crop; the paper's "224" gives conv1 55x55 only with padding (docs/paper.md)
    in_channels: int = 3
    towers: int = 2  # the paper's two GPUs; 1 = the one-GPU ablation of section 3.2
    widths: TowerWidths = field(default_factory=TowerWidths)
    lrn: LRNConfig = field(default_factory=LRNConfig)
    pool_kernel: int = 3  # overlapping pooling, section 3.4: z = 3 ...
    pool_stride: int = 2  # ... s = 2 (2/2 is the non-overlapping ablation)
    dropout: float = 0.5  # on the outputs of fc6 and fc7, section 4.2
    # "paper": keep units unscaled in training, multiply by (1 - p) at test time, as section 4.2 says.
    # "inverted": divide by (1 - p) in training, identity at test (torch.nn.Dropout); same in expectation.
    dropout_scaling: str = field(default="paper", metadata=flag(
        "dropout: x (1 - p) at test time (paper), or / (1 - p) in training (torch)", choices=["paper", "inverted"]))
    init_std: float = 0.01  # N(0, 0.01^2) for every weight, section 5
    # the 2012 code: initW=0.03 for conv3-conv5 (layers-145.cfg:143,172,200)
    init_std_conv3_5: float = field(default=0.01, metadata=flag(
        "std of conv3-conv5's initial weights (2012 code: 0.03)"))
    # Layers whose biases start at 1 ("provides the ReLUs with positive inputs"); the rest start at 0.
    unit_bias_layers: tuple[str, ...] = ("conv2", "conv4", "conv5", "fc6", "fc7")
    # conv1's output size by ceil((size - 11) / 4) + 1 with zero pixels added on the right and bottom, as
    # the 2012 code sized its convolutions (layer.py:1004, modulesX): 224 -> 55 with 3 padded pixels.
    # False: floor, no padding (the paper's 227 needs none).
    conv1_ceil: bool = field(default=False, metadata=flag("conv1's output size by ceil, zero-padded (2012 code)"))
    # The 2012 code's layer 1: conv1 -> LRN -> max-pool -> ReLU (layers-145.cfg:9-63: conv1 has no
    # neuron, pool1 has neuron=relu). False: ReLU -> LRN -> pool, section 3.3's order.
    relu1_after_pool: bool = field(default=False, metadata=flag("layer 1 as conv -> LRN -> pool -> ReLU (2012 code)"))
    # The 2012 code's extra same-map response normalisation after conv2's cross-map LRN (type=rnorm,
    # layers-145.cfg:107-117; size 5, scale 0.001, pow 0.75 in layer-params-145.cfg:157-163).
    # repro.model.layers.same_map_response_norm. Not in the paper.
    same_map_norm2: bool = field(default=False, metadata=flag("same-map response norm after conv2's LRN (2012 code)"))

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
            least = next((n for n in range(11, 4096) if self.feature_sizes(n)[-1] >= 1), None)
            advice = f"use at least {least}" if least else "no input below 4096 pixels works"
            raise ValueError(f"image_size {self.image_size} is too small for this network: pool5 would be empty "
                             f"(sizes {self.feature_sizes()}); {advice} with this pooling (the paper uses 227)")

    def feature_sizes(self, image_size: int | None = None) -> tuple[int, int, int, int, int]:
        """Spatial size after conv1, pool1, pool2 (= conv3..conv5), and pool5: (55, 27, 13, 13, 6);
        of `image_size` pixels if given, else of this config's."""
        size = self.image_size if image_size is None else image_size

        def pool(n: int) -> int:
            return (n - self.pool_kernel) // self.pool_stride + 1 if n >= self.pool_kernel else 0

        conv1 = (-(-(size - 11) // 4) if self.conv1_ceil else (size - 11) // 4) + 1 if size >= 11 else 0
        pool1 = pool(conv1)
        pool2 = pool(pool1)  # conv2..conv5 keep the size (padding 2, 1, 1, 1)
        return conv1, pool1, pool2, pool2, pool(pool2)

    def conv1_padding(self, image_size: int | None = None) -> int:
        """Zero pixels added on the right and bottom of the input so that conv1 gives feature_sizes()[0]
        outputs (3 for the 2012 code's 224; 0 without conv1_ceil)."""
        size = self.image_size if image_size is None else image_size
        return max(0, (self.feature_sizes(size)[0] - 1) * 4 + 11 - size)

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
    """The network as the 2012 code built it (layers/layers-145.cfg, layer-params-145.cfg, layer.py):
    the 224 input with conv1 sized by ceil, conv1 -> LRN -> pool -> ReLU, LRN's alpha divided by its
    size (layer.py:1183), conv2's extra same-map normalisation, conv3-conv5 drawn with std 0.03.
    `apply_variant(cfg, "cuda-convnet-2012")` adds the run's optimiser, schedule and data."""
    return ModelConfig(num_classes=num_classes, image_size=224, conv1_ceil=True, relu1_after_pool=True,
                       same_map_norm2=True, lrn=LRNConfig(alpha_convention="divided"), init_std_conv3_5=0.03)


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


def variant_name(cfg: "ModelConfig") -> str:
    """The MODEL_VARIANTS name of a network config (at any input size), or "custom" (e.g. a variant
    with another LRN alpha convention or dropout scaling)."""
    def same(make) -> bool:  # compared at the variant's own size, where every variant is valid
        variant = make(cfg.num_classes)
        return variant == dataclasses.replace(cfg, image_size=variant.image_size)

    return next((name for name, make in MODEL_VARIANTS.items() if same(make)), "custom")


def _need(ok: bool, what: str, got) -> None:
    """Refuse a setting (math.isfinite guards floats: NaN passes every comparison the wrong way)."""
    if not ok:
        raise ValueError(f"{what}, got {got}")


def _layer_lr_changes(given: list[list[str]]) -> tuple[tuple[str, int, float, float], ...]:
    """--layer-lr-change LAYER EPOCH W B, repeated: the field's tuples."""
    try:
        return tuple((layer, int(epoch), float(w), float(b)) for layer, epoch, w, b in given)
    except ValueError:
        raise ValueError(f"--layer-lr-change takes LAYER EPOCH W B (a name, an integer and two rates), "
                         f"got {given}") from None


@dataclass(frozen=True)
class OptimConfig:
    """Stochastic gradient descent with the paper's update rule, section 5."""

    lr: float = field(default=0.01, metadata=flag("initial learning rate (paper: 0.01)"))  # epsilon, all layers
    momentum: float = field(default=0.9, metadata=flag("momentum (paper: 0.9)"))
    weight_decay: float = field(default=5e-4, metadata=flag("weight decay (paper: 0.0005)"))
    # the rule is stated for weights; the 2012 code did not decay biases
    bias_weight_decay: bool = field(default=False, metadata=flag(
        "also decay biases (the paper states the rule for weights)", dest="bias_decay"))
    # the 2012 code started biases at epsB 0.02, twice epsW (layer-params-145.cfg:19)
    bias_lr_mult: float = field(default=1.0, metadata=flag("the biases' rate over the weights' (2012 code: 2)"))
    # True: the biases keep lr * bias_lr_mult of the first epoch, never divided, as the 2012 code's epsB
    # (still 0.02 beside epsW 0.00001 in the final layer-params-145.cfg:18-19). False: divided with the rest.
    bias_lr_fixed: bool = field(default=False, metadata=flag("biases keep the first epoch's rate (2012 code)"))
    # "plateau": divide by lr_drop when validation error stops improving (the paper);
    # "milestones": divide at fixed 0-based epochs.
    schedule: str = field(default="plateau", metadata=flag(
        "plateau: /10 when val error stalls (paper); milestones: /10 at --milestones (2012 code)",
        choices=["plateau", "milestones"]))
    lr_drop: float = 10.0
    max_drops: int = 3  # "reduced three times prior to termination"
    # 0-based epochs. The 2012 run's drops are logged at its 1-based epochs 25, 51 and 79
    # (layer-params-145.cfg:169,174,180), i.e. 0-based 24, 50, 78 (24 epochs at the first rate), which the
    # cuda-convnet-2012 preset uses; this default drops one epoch later than that log.
    milestones: tuple[int, ...] = field(default=(25, 51, 79), metadata=flag(
        "milestones: 0-based epochs of the drops (default 25 51 79; the 2012 run's were 24 50 78)",
        type=int, nargs="*", convert=tuple))
    # Per-layer rates from a 0-based epoch on: (layer, epoch, weight rate, bias rate), absolute rates that
    # replace the schedule's for that layer. The 2012 run set conv1's epsW to 1e-5 at its epoch 67 and to 0
    # at 72 (layer-params-145.cfg:177,179); its final file has conv1's epsB 0 too (lines 2-3).
    layer_lr_changes: tuple[tuple[str, int, float, float], ...] = field(default=(), metadata=flag(
        "from 0-based EPOCH on, LAYER's weight and bias rates are W and B (repeatable)", action="append", nargs=4,
        metavar=("LAYER", "EPOCH", "W", "B"), dest="layer_lr_change", convert=_layer_lr_changes))
    plateau_patience: int = field(default=3, metadata=flag(  # epochs without enough improvement before a drop
        "plateau: epochs without improvement before a drop (default 3)", dest="patience"))
    plateau_threshold: float = 0.1  # top-1 error points that count as an improvement

    def __post_init__(self) -> None:
        if self.schedule not in ("plateau", "milestones"):
            raise ValueError(f"schedule must be 'plateau' or 'milestones', got {self.schedule!r}")
        _need(math.isfinite(self.lr) and self.lr > 0, "--lr (lr) must be a positive number", self.lr)
        _need(math.isfinite(self.momentum) and 0 <= self.momentum < 1, "--momentum (momentum) must be in [0, 1)",
              self.momentum)
        _need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay (weight_decay) must be a number "
              ">= 0", self.weight_decay)
        _need(math.isfinite(self.bias_lr_mult) and self.bias_lr_mult > 0, "--bias-lr-mult (bias_lr_mult) must be a "
              "positive number", self.bias_lr_mult)
        _need(math.isfinite(self.lr_drop) and self.lr_drop > 1, "lr_drop must be a number > 1", self.lr_drop)
        _need(self.max_drops >= 0, "max_drops must be >= 0", self.max_drops)
        _need(self.plateau_patience >= 1, "--patience (plateau_patience) must be >= 1", self.plateau_patience)
        _need(math.isfinite(self.plateau_threshold) and self.plateau_threshold >= 0, "plateau_threshold must be a "
              "number >= 0", self.plateau_threshold)
        # JSON and checkpoints give lists back: store tuples, so equal configs compare equal
        object.__setattr__(self, "layer_lr_changes", tuple(tuple(c) for c in self.layer_lr_changes))
        for change in self.layer_lr_changes:
            ok = (len(change) == 4 and isinstance(change[0], str) and int(change[1]) == change[1] >= 0
                  and all(math.isfinite(r) and r >= 0 for r in change[2:]))
            _need(ok, "each layer_lr_changes entry must be (layer name, 0-based epoch, weight rate >= 0, bias rate "
                  ">= 0)", change)
        if any(m < 0 for m in self.milestones) or list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must be distinct epochs >= 0 in increasing order, got {self.milestones}")
        if self.schedule == "milestones" and len(self.milestones) > self.max_drops:
            raise ValueError(f"{len(self.milestones)} milestones but at most {self.max_drops} drops (the paper's "
                             f"three): the later ones would do nothing")


@dataclass(frozen=True)
class DataConfig:
    """The data pipeline, paper sections 2 and 4.1."""

    dataset: str = field(default="fashion-mnist", metadata=flag(
        "fashion-mnist; imagenet; or folder: --data holds train/<class>/ and val/<class>/",
        choices=["fashion-mnist", "imagenet", "folder"]))
    root: str | None = field(default=None, metadata=runtime(flag(
        "dataset folder (Fashion-MNIST: optional; imagenet/folder: holds train/ and val/)", dest="data")))
    # The held-out split's folder under root: None takes val/ if present, else test/.
    val_split: str | None = field(default=None, metadata=runtime(flag(
        "--dataset folder: the held-out split's folder under --data (default: val/ if present, else test/)")))
    base_size: int = 256  # shorter side rescaled to 256, central 256x256 patch kept
    crop_size: int = 227  # random crops of the 256x256 image (paper: 224, see ModelConfig.image_size)
    flip: bool = field(default=True, metadata=flag("no horizontal reflections", dest="no_flip", negate=True))
    mean: str = "image"  # subtract the per-pixel mean image of the training set; "none" to skip
    # PCA colour noise, section 4.1: "dataset" (eigen-decomposition of this training set's RGB
    # covariance), "imagenet" (published ImageNet constants, docs/paper.md) or "none".
    pca: str = field(default="dataset", metadata=flag(
        "PCA colour noise source", choices=["dataset", "imagenet", "none"]))
    pca_std: float = 0.1  # alpha_i ~ N(0, 0.1)
    # "eigenvalue" as printed; "sqrt" as the 2012 code, whose noise multiplies "color_stdevs" (convdata.py:41,113)
    pca_scale: str = field(default="eigenvalue", metadata=flag(
        "the colour noise scales with each eigenvalue (paper) or its square root (2012 code)",
        choices=["eigenvalue", "sqrt"]))
    # The 2012 code switched the colour noise off at its epoch 67 (layer-params-145.cfg:178): 0-based 66.
    # None: on for the whole run.
    pca_off_epoch: int | None = field(default=None, metadata=flag(
        "0-based epoch from which the colour noise is off", type=int))
    # True: divide the noisy crop by 1 + pca_std while the noise is on, as the 2012 code did so that the
    # training data's scale stays near the test data's (convdata.py:205). Not in the paper.
    pca_rescale: bool = field(default=False, metadata=flag("divide noisy crops by 1 + pca_std (2012 code)"))
    # "same": subtract the mean image cropped (and reflected) like the image. "centre": subtract its central
    # crop_size patch whatever the crop's offset or reflection, as the 2012 code (convdata.py:137,225).
    mean_crop: str = field(default="same", metadata=flag(
        "mean image cropped like the image, or its centre", choices=["same", "centre"]))
    # Consecutive images sharing one crop offset and reflection: 1 draws per image; the 2012 code drew once
    # per 32 (crop_chunk, convdata.py:125,252-260).
    crop_chunk: int = field(default=1, metadata=flag("consecutive images sharing one crop (2012 code: 32)"))
    stats_images: int | None = field(default=None, metadata=flag(  # None: all
        "images for the mean image and PCA (default all)", type=int))
    val_images: int | None = field(default=None, metadata=flag(  # None: all; for smoke runs
        "validate on an evenly spaced subset", type=int))
    # decoding processes per rank, for image files (the training script's default suits the machine)
    workers: int = field(default=4, metadata=runtime(flag(
        "decoding processes per rank (image files; default: 4, or fewer where each rank has fewer cores)")))
    # Where the stored form's JPEGs are decoded when training on a GPU: "gpu" (nvJPEG batches in the
    # training process) or "cpu" (the loader's worker processes, overlapping the steps). Image files
    # always decode on the CPU. docs/benchmarks.md has the two measured against each other.
    decode: str = field(default="gpu", metadata=runtime(flag(
        "the stored 256x256 form on a GPU: decode its JPEGs there in batches (nvJPEG), or on the CPU in the "
        "--workers processes (untimed on the store; as separate files, CPU decoding beat nvJPEG: "
        "docs/benchmarks.md)", choices=["gpu", "cpu"])))
    devkit: str | None = field(default=None, metadata=runtime(flag(
        "ImageNet devkit dir or tarball, for a flat val/ folder")))
    val_solution: str | None = field(default=None, metadata=runtime(flag(
        "Kaggle LOC_val_solution.csv, for a flat val/ folder")))

    def __post_init__(self) -> None:
        if self.dataset not in ("fashion-mnist", "imagenet", "folder"):
            raise ValueError(f"dataset must be fashion-mnist, imagenet or folder, got {self.dataset!r}")
        if self.mean not in ("image", "none") or self.pca not in ("dataset", "imagenet", "none"):
            raise ValueError(f"mean must be image|none and pca dataset|imagenet|none, got {self.mean!r}, {self.pca!r}")
        if self.decode not in ("gpu", "cpu"):
            raise ValueError(f"decode must be 'gpu' or 'cpu' (--decode), got {self.decode!r}")
        if self.pca_scale not in ("eigenvalue", "sqrt"):
            raise ValueError(f"pca_scale must be 'eigenvalue' or 'sqrt', got {self.pca_scale!r}")
        if self.mean_crop not in ("same", "centre"):
            raise ValueError(f"mean_crop must be 'same' or 'centre', got {self.mean_crop!r}")
        _need(self.crop_chunk >= 1, "crop_chunk must be >= 1 (images sharing one crop)", self.crop_chunk)
        _need(self.pca_off_epoch is None or self.pca_off_epoch >= 0, "pca_off_epoch must be a 0-based epoch >= 0 "
              "(or None: noise on throughout)", self.pca_off_epoch)
        if not 0 < self.crop_size <= self.base_size:
            raise ValueError(f"crop_size {self.crop_size} must be in (0, base_size={self.base_size}]")
        for name in ("stats_images", "val_images"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (--{name.replace('_', '-')}; leave it out for "
                                 f"all images), got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (--workers), got {self.workers}")


# The 2012 run's optimiser, schedule and data beside its network (cuda_convnet_2012): each value cites
# the 2012 file it comes from in the field's comment above.
CUDA_CONVNET_2012_OPTIM = dict(bias_lr_mult=2.0, bias_lr_fixed=True, schedule="milestones",
                               milestones=(24, 50, 78), layer_lr_changes=(("conv1", 66, 1e-5, 0.02),
                                                                          ("conv1", 71, 0.0, 0.0)))
CUDA_CONVNET_2012_DATA = dict(crop_size=224, pca_scale="sqrt", pca_off_epoch=66, pca_rescale=True,
                              mean_crop="centre", crop_chunk=32)


def apply_variant(cfg: "TrainConfig", name: str, network: bool = True) -> "TrainConfig":
    """`cfg` with the variant `name`: the network of MODEL_VARIANTS[name] (keeping cfg's classes) and, for
    "cuda-convnet-2012", the 2012 run's optimiser, schedule and data as well (the run as it ran). The
    ablations change the network only. `network=False` leaves cfg's network as it is (a caller that
    already built it, with its own flags) and applies the rest."""
    if name not in MODEL_VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(MODEL_VARIANTS)}")
    model = MODEL_VARIANTS[name](cfg.model.num_classes) if network else cfg.model
    optim, data = cfg.optim, dataclasses.replace(cfg.data, crop_size=model.image_size)
    if name == "cuda-convnet-2012":
        optim = dataclasses.replace(optim, **CUDA_CONVNET_2012_OPTIM)
        data = dataclasses.replace(data, **CUDA_CONVNET_2012_DATA)
    return dataclasses.replace(cfg, model=model, optim=optim, data=data)


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CPU_LRN_CHOICES = ("auto", "eager", "compiled", "native")
CPU_CONV_CHOICES = ("auto", "direct", "winograd")
# --cpu-lrn auto, where the native kernel cannot be built, compiles from this many training images per
# process: compiling costs about 40 s per process on a cold cache (2-core CPU) and saves 4-8 ms per
# image (docs/benchmarks.md), so it pays from about 10,000 images; twice that leaves a margin.
AUTO_COMPILE_IMAGES = 20_000


@dataclass(frozen=True)
class TrainConfig:
    """One training run: the network, the optimiser, the data, and how the run is carried out.
    Saved into every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # "roughly 90 cycles through the training set", section 5
    epochs: int = field(default=90, metadata=runtime(flag("epochs (paper: 90)")))
    batch_size: int = field(default=128, metadata=flag(  # per model replica (tower pair), section 5
        "images per step per tower pair (paper: 128)"))
    seed: int = field(default=0, metadata=flag(  # initialisation, data order, augmentation and dropout
        "the seed that initialisation, data order, augmentation and dropout derive from"))
    # stop after this many steps in all (smoke runs); checkpointed
    max_steps: int | None = field(default=None, metadata=runtime(flag(
        "stop after N steps in all (smoke runs)", type=int)))
    # run directory: checkpoints, metrics.jsonl, results
    out: str = field(default="runs/default", metadata=runtime(flag(
        "run directory (default runs/<dataset>-<time>)")))
    log_every: int = field(default=10, metadata=runtime(flag("steps between progress lines")))
    eval_batch_size: int = field(default=128, metadata=runtime(flag("images per evaluation forward")))
    # protocols of the closing error table (empty: skip)
    final_crops: tuple[int, ...] = field(default=(1, 10), metadata=runtime(flag(
        "closing table protocols: 1 and/or 10", type=int, nargs="*", convert=tuple)))
    device: str = field(default="auto", metadata=runtime(flag(
        "auto: CUDA where torch sees a GPU", choices=["auto", "cpu", "cuda"])))
    backend: str = field(default="auto", metadata=runtime(flag(
        "process-group backend (auto: NCCL with a GPU per rank, else gloo)", choices=["auto", "nccl", "gloo"])))
    # "bf16": autocast on CUDA or the CPU (a speed choice; the paper trained in float32)
    amp: str = field(default="none", metadata=runtime(flag(
        "bf16: autocast (a speed choice; the paper trained in float32)", choices=["none", "bf16"])))
    channels_last: bool = field(default=False, metadata=runtime(flag("channels-last memory format (speed)")))
    # Which LRN code a CPU run computes with (repro/model/lrn_cpu.py). Part of the recipe: "auto" resolves
    # at the first launch and the checkpoints keep the answer, so a resumed run computes bit for bit alike.
    cpu_lrn: str = field(default="auto", metadata=flag(
        "LRN code on the CPU: native (C kernels built by the machine's C compiler in seconds, once), compiled "
        "(torch.compile; each layer shape compiles once, about 12 s on a cold cache), eager (the torch "
        "reference), or auto: native where it builds, else compiled when this launch trains at least "
        f"{AUTO_COMPILE_IMAGES:,} images per process on the CPU, else eager", choices=CPU_LRN_CHOICES))
    # How a CPU run computes conv1-conv5 (repro/model/winograd.py): the same function, rounded differently,
    # so like cpu_lrn it resolves at the first launch and the checkpoints keep it.
    cpu_conv: str = field(default="auto", metadata=flag(
        "conv1-conv5 on the CPU: winograd (F(2x2,3x3) and F(2x2,5x5) transforms in C, built once by the machine's C compiler, "
        "and torch's matrix products; conv1 as a 3x3 convolution of its 4x4 blocks; under --amp bf16 all but conv2, with "
        "bf16 products), direct (torch's convolution), or auto: winograd where it builds",
        choices=CPU_CONV_CHOICES))
    compile: bool = field(default=False, metadata=runtime(flag(
        "torch.compile each tower stage (or the grouped network) and the optimiser's update")))
    compile_mode: str = field(default="default", metadata=runtime(flag(
        "torch.compile's mode (implies --compile); reduce-overhead and max-autotune use CUDA graphs",
        choices=COMPILE_MODES)))
    # steps between checks for SIGTERM (0: 1 on CPU, 20 on GPU)
    stop_check_every: int = field(default=0, metadata=runtime())
    comm_timeout: float = field(default=600.0, metadata=runtime(flag(
        "seconds the process group's start and each collective wait for a peer before failing with an error "
        "(a dead or missing process)")))

    def __post_init__(self) -> None:
        _need(self.epochs >= 1, "--epochs (epochs) must be >= 1", self.epochs)
        _need(self.batch_size >= 1, "--batch-size (batch_size) must be >= 1", self.batch_size)
        _need(self.max_steps is None or self.max_steps >= 1, "--max-steps (max_steps) must be >= 1 (leave it out "
              "for the whole schedule)", self.max_steps)
        _need(self.log_every >= 1, "--log-every (log_every) must be >= 1", self.log_every)
        _need(self.eval_batch_size >= 1, "--eval-batch-size (eval_batch_size) must be >= 1", self.eval_batch_size)
        _need(self.comm_timeout > 0, "--comm-timeout (comm_timeout) must be > 0 seconds", self.comm_timeout)
        _need(self.stop_check_every >= 0, "stop_check_every must be >= 0", self.stop_check_every)
        _need(0 <= self.seed < 2 ** 63, "--seed (seed) must be in [0, 2^63), a torch generator's range", self.seed)
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        if self.cpu_lrn not in CPU_LRN_CHOICES:
            raise ValueError(f"cpu_lrn must be one of {', '.join(CPU_LRN_CHOICES)} (--cpu-lrn), got {self.cpu_lrn!r}")
        if self.cpu_conv not in CPU_CONV_CHOICES:
            raise ValueError(f"cpu_conv must be one of {', '.join(CPU_CONV_CHOICES)} (--cpu-conv), got {self.cpu_conv!r}")
        if any(c not in (1, 10) for c in self.final_crops):
            raise ValueError(f"final_crops must hold 1 and/or 10, got {self.final_crops}")
        if self.model.image_size != self.data.crop_size:
            raise ValueError(f"the model's input ({self.model.image_size}) must equal the crop size "
                             f"({self.data.crop_size})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d["model"] = ModelConfig.from_dict(d["model"])
        optim = dict(d["optim"])
        optim["milestones"] = tuple(optim.get("milestones", ()))
        d["optim"] = OptimConfig(**optim)
        d["data"] = DataConfig(**d["data"])
        d["final_crops"] = tuple(d.get("final_crops", ()))
        return cls(**d)
