"""The paper's image pipeline after decoding, batched on the training device (paper sections 2, 4.1).

uint8 images go to the device as they are stored; there they are brought to 256x256 (shorter side
256, central patch: paper section 2), cropped to 227x227 at random offsets with random horizontal
reflections, have the training set's per-pixel mean image subtracted (cropped at the same place),
and get the PCA colour noise of section 4.1. The random numbers (a few per image) are drawn on the
CPU from a generator seeded by (seed, epoch, step, replica), so the two towers of a pair, on two
devices, build bit-identical batches and a resumed run draws what the interrupted one would have.
DataConfig's 2012 switches (mean_crop, crop_chunk, pca_off_epoch, pca_rescale) reproduce the 2012
code's convdata.py instead; docs/fidelity.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from repro.config import DataConfig

# Published ImageNet colour statistics, RGB in [0, 1] (docs/paper.md): eigenvalues and eigenvectors
# (as columns) of the 3x3 covariance of RGB pixel values.
IMAGENET_EIGVALS = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVECS = ((-0.5675, 0.7192, 0.4009),
                    (-0.5808, -0.0045, -0.8140),
                    (-0.5836, -0.6948, 0.4203))


@dataclass
class Stats:
    """Training-set statistics at the 256x256 stage: mean image in pixel units (0..255), and the
    eigen-decomposition of the RGB covariance in [0, 1] units (eigenvalues descending)."""

    mean_image: Tensor  # (256, 256, 3) float32
    eigvals: Tensor  # (3,)
    eigvecs: Tensor  # (3, 3), column i is eigenvector i
    images: int  # how many images they were computed from


@dataclass
class CropParams:
    top: Tensor  # (B,) int64
    left: Tensor  # (B,) int64
    flip: Tensor  # (B,) bool
    alpha: Tensor  # (B, 3) float32, the PCA noise coefficients
    gain: Tensor | None = None  # (B,) float32, multiplies the finished crop (the 2012 code's 1 / 1.1); None: 1

    def subset(self, n: int) -> "CropParams":
        """The first n images' parameters (a batch that lost unreadable images)."""
        return CropParams(self.top[:n], self.left[:n], self.flip[:n], self.alpha[:n],
                          None if self.gain is None else self.gain[:n])

    def to(self, device: torch.device) -> "CropParams":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return CropParams(*(move(t) for t in (self.top, self.left, self.flip, self.alpha, self.gain)))


def step_generator(seed: int, epoch: int, step: int, replica: int) -> torch.Generator:
    """A CPU generator for one training step's augmentation, a pure function of its position."""
    key = ((seed * 1_000_003 + epoch) * 1_000_033 + step) * 1_009 + replica
    return torch.Generator().manual_seed(key % (2 ** 63))


def noise_on(cfg: DataConfig, epoch: int | None) -> bool:
    """Whether the colour noise is drawn in the 0-based `epoch` (None: an epoch before any switch-off)."""
    return cfg.pca != "none" and (cfg.pca_off_epoch is None or epoch is None or epoch < cfg.pca_off_epoch)


def draw_params(batch: int, cfg: DataConfig, generator: torch.Generator, epoch: int | None = None) -> CropParams:
    """One training batch's crops, reflections and colour noise. With cfg.crop_chunk = k, each run of k
    consecutive images shares one offset and reflection (the 2012 code's crop_chunk)."""
    span = cfg.base_size - cfg.crop_size + 1  # 30 offsets per axis for 227 out of 256; 33 for 224
    draws = -(-batch // cfg.crop_chunk)  # one per chunk (per image when crop_chunk is 1)
    top = torch.randint(0, span, (draws,), generator=generator)
    left = torch.randint(0, span, (draws,), generator=generator)
    flip = torch.randint(0, 2, (draws,), generator=generator).bool() & cfg.flip
    if cfg.crop_chunk > 1:
        top, left, flip = (t.repeat_interleave(cfg.crop_chunk)[:batch] for t in (top, left, flip))
    alpha = torch.randn(batch, 3, generator=generator) * cfg.pca_std
    on = noise_on(cfg, epoch)
    gain = None
    if not on:
        alpha = torch.zeros_like(alpha)
    elif cfg.pca_rescale:  # the 2012 code divides by 1 + its noise coefficient while the noise is on
        gain = torch.full((batch,), 1.0 / (1.0 + cfg.pca_std))
    return CropParams(top, left, flip, alpha, gain)


TEN_CROP_CENTRE = 4  # the unreflected centre patch's place among an image's ten (the centre-patch protocol)


def ten_crop_params(batch: int, cfg: DataConfig) -> CropParams:
    """Paper section 4.1's test patches, per image in this order: four corners, centre, then the
    reflections of the same five. Rows are image-major: image 0's ten, then image 1's ten."""
    far, mid = cfg.base_size - cfg.crop_size, (cfg.base_size - cfg.crop_size) // 2
    corners = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]  # (mid, mid): TEN_CROP_CENTRE
    offsets = torch.tensor([tl for _ in (0, 1) for tl in corners]).repeat(batch, 1)
    flip = torch.tensor([False] * 5 + [True] * 5).repeat(batch)
    return CropParams(offsets[:, 0], offsets[:, 1], flip, torch.zeros(10 * batch, 3))


def centre_crop_params(batch: int, cfg: DataConfig) -> CropParams:
    mid = (cfg.base_size - cfg.crop_size) // 2
    off = torch.full((batch,), mid, dtype=torch.int64)
    return CropParams(off, off.clone(), torch.zeros(batch, dtype=torch.bool), torch.zeros(batch, 3))


def to_base(images: Tensor, size: int) -> Tensor:
    """(B, H, W, C) uint8 -> (B, size, size, C): shorter side to `size`, central square (paper
    section 2). Images already that size pass through unchanged (still uint8)."""
    b, h, w, c = images.shape
    if h == w == size:
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = images.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, :, top:top + size, left:left + size].permute(0, 2, 3, 1)


class Augment:
    """Crops, reflections, mean subtraction and PCA noise for one device."""

    def __init__(self, cfg: DataConfig, stats: Stats | None, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        base = (cfg.base_size, cfg.base_size, 3)
        if cfg.mean == "image" and stats is None:
            raise ValueError("mean subtraction needs the training set's statistics (Stats)")
        self.mean = (stats.mean_image.float() if cfg.mean == "image" else torch.zeros(base)).to(self.device)
        self.pca_basis = self._pca_basis(cfg, stats).to(self.device)  # (3, 3): rgb = basis @ alpha

    @staticmethod
    def _pca_basis(cfg: DataConfig, stats: Stats | None) -> Tensor:
        if cfg.pca == "none":
            return torch.zeros(3, 3)
        if cfg.pca == "imagenet":
            vals, vecs = torch.tensor(IMAGENET_EIGVALS), torch.tensor(IMAGENET_EIGVECS)
        elif stats is None:
            raise ValueError("pca='dataset' needs the training set's statistics (Stats)")
        else:
            vals, vecs = stats.eigvals.float(), stats.eigvecs.float()
        scale = vals.clamp_min(0).sqrt() if cfg.pca_scale == "sqrt" else vals
        return vecs * scale * 255.0  # [0, 1] units -> pixel units

    def crop(self, images: Tensor, p: CropParams, source: Tensor | None = None) -> Tensor:
        """uint8 (B, H, W, C) on this device -> float (len(p), 3, crop, crop), channels_last. Patch i
        is cut from image source[i] (default: image i)."""
        base = to_base(images, self.cfg.base_size)
        n, c = self.cfg.crop_size, base.shape[-1]
        p = p.to(self.device)
        ar = torch.arange(n, device=self.device)
        rows = p.top[:, None] + ar  # (B, n)
        cols = p.left[:, None] + torch.where(p.flip[:, None], n - 1 - ar, ar)  # reflections reverse columns
        rows, cols = rows[:, :, None], cols[:, None, :]
        if source is None:
            source = torch.arange(base.shape[0], device=self.device)
        batch = source[:, None, None]
        x = base[batch, rows, cols].float()  # (B, n, n, C)
        if c == 1:
            x = x.expand(-1, -1, -1, 3)  # grey images: the same value in R, G and B
        x = x - self._mean_patch(rows, cols) + (p.alpha @ self.pca_basis.T)[:, None, None, :]
        if p.gain is not None:
            x = x * p.gain[:, None, None, None]
        return x.permute(0, 3, 1, 2)

    def _mean_patch(self, rows: Tensor, cols: Tensor) -> Tensor:
        """The mean image where the crop was cut (mean_crop "same"), or its central patch, unreflected,
        for every crop ("centre", the 2012 code: convdata.py:137 and 225)."""
        if self.cfg.mean_crop == "same":
            return self.mean[rows, cols]
        n, mid = self.cfg.crop_size, (self.cfg.base_size - self.cfg.crop_size) // 2
        return self.mean[mid:mid + n, mid:mid + n]

    def train_batch(self, images: Tensor, params: CropParams) -> Tensor:
        return self.crop(images, params)

    def eval_batch(self, images: Tensor, crops: int = 1) -> Tensor:
        """Centre crop (crops=1) or the ten patches (crops=10), image-major, no colour noise."""
        b = images.shape[0]
        if crops == 1:
            return self.crop(images, centre_crop_params(b, self.cfg))
        if crops == 10:  # ten rows per image, indexed from the one copy of each image
            source = torch.arange(10 * b, device=self.device) // 10  # not repeat_interleave: no host sync
            return self.crop(images, ten_crop_params(b, self.cfg), source=source)
        raise ValueError(f"crops must be 1 or 10 (the paper's protocol), got {crops}")
