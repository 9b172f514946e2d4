"""A split held in memory as one uint8 tensor: batches are an indexing operation, no workers."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


class TensorSource(Dataset):
    """uint8 images (N, H, W, C) with int64 labels (N,) and class names in label order."""

    in_memory = True

    def __init__(self, images: Tensor, labels: Tensor, classes: list[str], name: str, origin: str = ""):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"{name}: images must be uint8 (N, H, W, C), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{name}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"{name}: labels must lie in [0, {len(classes)}), found {labels.min()}..{labels.max()}")
        self.images, self.labels, self.classes, self.name = images, labels, list(classes), name
        self.origin = origin  # where the data was read from, for the run's log

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.labels[i])

    def content_probe(self, every: int) -> bytes:
        """The pixels of every `every`-th image, for the statistics cache's key."""
        return self.images[::every].contiguous().numpy().tobytes()

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.images[indices], self.labels[indices]

    def subset(self, indices: Tensor, name: str | None = None) -> "TensorSource":
        return TensorSource(self.images[indices], self.labels[indices], self.classes, name or self.name)
