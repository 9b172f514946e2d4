"""Which images each step reads, and reading them: per-epoch shuffles shared by the two towers of a
pair, disjoint shards across pairs, and evaluation that scores every image exactly once."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The epoch's permutation of the training set, the same in every process."""
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed * 100_003 + epoch) % 2 ** 63))


def steps_per_epoch(n: int, batch: int, replicas: int) -> int:
    steps = n // (batch * replicas)  # the last partial global batch is dropped, as usual
    if steps == 0:
        raise ValueError(f"the training set has {n} images, fewer than one global batch of "
                         f"{batch} x {replicas} replicas; lower --batch-size")
    return steps


def train_batches(n: int, batch: int, replicas: int, replica: int, seed: int, epoch: int,
                  start_step: int = 0) -> list[Tensor]:
    """Index lists of this replica's steps in `epoch`, from `start_step` on (for resuming)."""
    order = epoch_order(n, seed, epoch)
    steps = steps_per_epoch(n, batch, replicas)
    return [order[(s * replicas + replica) * batch:(s * replicas + replica + 1) * batch]
            for s in range(start_step, steps)]


def evenly_spaced(n: int, limit: int) -> Tensor:
    """`limit` distinct indices of range(n), first and last included: round(i (n-1) / (limit-1)) in
    integers. (A float32 linspace rounds neighbours that lie just over 1 apart onto one index, which
    would score an image twice and skip the next.)"""
    if limit <= 1:
        return torch.zeros(limit, dtype=torch.long)
    i = torch.arange(limit, dtype=torch.long)
    return (2 * i * (n - 1) + (limit - 1)) // (2 * (limit - 1))  # round half up, exactly


def eval_indices(n: int, replicas: int, replica: int, limit: int | None = None) -> Tensor:
    """A contiguous shard per replica, sizes differing by at most one: every image once, no padding.
    `limit` keeps an evenly spaced subset of the split first (smoke runs)."""
    idx = torch.arange(n) if limit is None or limit >= n else evenly_spaced(n, limit)
    bounds = [len(idx) * r // replicas for r in range(replicas + 1)]
    return idx[bounds[replica]:bounds[replica + 1]]


@dataclass
class Batch:
    images: Tensor  # uint8 (B, H, W, C), pinned when going to a GPU
    labels: Tensor  # int64 (B,)
    skipped: int  # unreadable images dropped from this batch
    kept: Tensor | None = None  # bool, per requested index: which images are in `images` (None: all)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of each one dropped

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.skipped, self.kept, self.unreadable)


class _NamingUnreadable:
    """A file source whose items also carry (path, reason) of an unreadable file, so that the names
    travel back from DataLoader workers with the batch (each worker's `source.skipped` stays there)."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        image, label = self.source[i]
        skipped = getattr(self.source, "skipped", None)
        why = skipped[-1] if image is None and skipped else None  # appended by this very call
        return image, label, why


def _collate(items: list) -> Batch:
    kept = torch.tensor([item[0] is not None for item in items], dtype=torch.bool)
    good = [(img, lbl) for img, lbl, *_ in items if img is not None]
    unreadable = [item[2] for item in items if item[0] is None and len(item) > 2 and item[2] is not None]
    if not good:
        return Batch(torch.empty(0, 0, 0, 3, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), len(items), kept,
                     unreadable)
    return Batch(torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), len(items) - len(good), kept,
                 unreadable)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers outlive a SIGTERM or Ctrl-C sent to the whole process group (a batch system's cancel,
    a terminal): the trainer then stops at a step boundary and saves, and it needs its workers
    alive until it shuts them down; a dead worker would raise in the middle of that save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_on_device(encoded: list[Tensor], device: torch.device) -> Tensor:
    """JPEG bytes -> uint8 (B, H, W, 3) on `device`, decoded there in one batched call (nvJPEG)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return torch.stack(images).permute(0, 2, 3, 1)


def iterate(source, index_lists: Sequence[Tensor], workers: int = 0, pin: bool = False,
            decode_device: torch.device | None = None) -> Iterator[Batch]:
    """Batches for the given index lists, in order. In-memory sources index one tensor; stored JPEG
    sources decode on `decode_device` when it is a GPU; file sources decode in `workers` processes,
    dropping images that cannot be decoded: each batch counts them and names them (path, reason)."""
    if getattr(source, "in_memory", False):
        for idx in index_lists:
            images, labels = source.batch(idx)
            yield Batch(images.pin_memory() if pin else images, labels, 0)
        return
    if getattr(source, "encoded", False) and decode_device is not None and decode_device.type == "cuda":
        for idx in index_lists:  # reading the bytes is cheap; decoding is the work, on the GPU
            yield Batch(decode_on_device(source.encoded_batch(idx), decode_device), source.labels[idx], 0)
        return
    loader = DataLoader(_NamingUnreadable(source), batch_sampler=[idx.tolist() for idx in index_lists], num_workers=workers,
                        collate_fn=_collate, pin_memory=pin, persistent_workers=False,
                        prefetch_factor=4 if workers else None, worker_init_fn=_ignore_stop_signals)
    yield from loader


def chunks(indices: Tensor, size: int) -> list[Tensor]:
    return list(indices.split(size)) if len(indices) else []
