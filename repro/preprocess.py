"""A checkpoint's test-time input pipeline, for users of `repro.load_checkpoint`: images in, the
network's input out (paper section 2: shorter side 256, central 256x256 patch, the training set's
mean image subtracted; section 4.1: the centre 227x227 patch, or the ten patches)."""

from __future__ import annotations

import contextlib
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from repro.checkpoint import read
from repro.config import TrainConfig
from repro.data.augment import Augment, Stats, to_base
from repro.data.folder import base_image, decode_image


class Preprocessing:
    """Call it with image files, PIL images, or a uint8 (B, H, W, C) tensor (C = 1 or 3, any size:
    rescaled like the training data); get float (B * crops, 3, crop, crop) on its device, image-major.

    Files and PIL images take the training data's own path to the 256x256 stage: PIL's resize for
    image folders and ImageNet (as their readers decode), and for Fashion-MNIST grey at its own size,
    then the same float rescaling its 28x28 images get."""

    def __init__(self, augment: Augment, grey: bool = False):
        self.augment, self.grey = augment, grey
        self.base_size = augment.cfg.base_size

    def __call__(self, images: Tensor | Sequence[str | os.PathLike | Image.Image], crops: int = 1) -> Tensor:
        if isinstance(images, Tensor):
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] not in (1, 3):
                raise ValueError(f"images must be uint8 (B, H, W, C) with C = 1 or 3, got {images.dtype} "
                                 f"{tuple(images.shape)}; or pass a list of files or PIL images")
            batch = images
        elif len(images) == 0:
            raise ValueError("no images given")
        else:
            batch = torch.stack([self._load(im) for im in images])
        return self.augment.eval_batch(batch.to(self.augment.device), crops)

    def _load(self, image: str | os.PathLike | Image.Image) -> Tensor:
        if self.grey:  # the dataset's own path: grey at native size, rescaled as a tensor (to_base)
            with (contextlib.nullcontext(image) if isinstance(image, Image.Image) else Image.open(image)) as img:
                pixels = torch.from_numpy(np.array(img.convert("L"), dtype=np.uint8))
            return to_base(pixels[None, :, :, None], self.base_size)[0].float()  # float: one dtype to stack
        if isinstance(image, Image.Image):
            return base_image(image, self.base_size)
        return decode_image(image, self.base_size)


def checkpoint_augment(ckpt: dict, device: str | torch.device = "cpu") -> Augment:
    """A training checkpoint's preprocessing on `device`: its data config's sizes, and the mean image
    and colour statistics it stored (evaluation uses no colour noise)."""
    data = TrainConfig.from_dict(ckpt["train_config"]).data
    return Augment(data, Stats(**ckpt["stats"]) if ckpt.get("stats") else None, device)


def load_preprocessing(path: str | os.PathLike, device: str | torch.device = "cpu") -> Preprocessing:
    """The preprocessing a training checkpoint's network was trained for (its mean image and sizes)."""
    if str(path).endswith(".safetensors"):
        raise ValueError(f"{path} holds exported weights only: the preprocessing (the training set's mean image) "
                         f"is in the training run's latest.pt or best.pt; pass that here")
    ckpt = read(path)
    if not ckpt.get("train_config"):
        raise ValueError(f"{path} holds weights only: the preprocessing (the training set's mean image) is in a "
                         f"training run's latest.pt or best.pt")
    augment = checkpoint_augment(ckpt, device)
    return Preprocessing(augment, grey=augment.cfg.dataset == "fashion-mnist")
