"""Top-1 and top-5 error with the paper's test protocol (paper section 4.1 and 6): the softmax
outputs of the centre patch, or averaged over ten patches, and over several networks (an ensemble)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from repro.data.augment import TEN_CROP_CENTRE, Augment
from repro.data.loader import chunks, iterate
from repro.data.skipped import SkippedFiles
from repro.model.linear import bf16_weights_kept


def batch_sums(probs: Tensor, labels: Tensor) -> Tensor:
    """(images, top-1 hits, top-5 hits, -log p(true) summed) of a batch, as a tensor on its device."""
    k = min(5, probs.shape[1])
    hit = probs.topk(k, dim=1).indices == labels[:, None]
    true = probs.gather(1, labels[:, None]).squeeze(1).clamp_min(1e-12)
    # torch.full, not torch.tensor: building a CUDA tensor from a host value copies it and waits for
    # the GPU to finish all queued work, which every training step would then do.
    images = torch.full((), float(len(labels)), device=probs.device, dtype=torch.float64)
    return torch.stack([images, hit[:, 0].sum().double(), hit.any(1).sum().double(), -true.double().log().sum()])


class RunningCounts:
    """Counts summed on the device: adding a batch never makes the host wait for the GPU."""

    def __init__(self, start: "Counts | None" = None) -> None:
        self.sums: Tensor | None = None
        self.start = start or Counts()  # what an interrupted run had counted before it stopped
        self.skipped = 0

    def add(self, probs: Tensor, labels: Tensor) -> None:
        s = batch_sums(probs, labels)
        self.sums = s if self.sums is None else self.sums + s

    def counts(self) -> "Counts":
        values = self.sums.tolist() if self.sums is not None else [0, 0, 0, 0.0]
        return Counts.from_list([a + b for a, b in zip(values + [self.skipped], self.start.as_list())])


@dataclass
class Counts:
    """Sums over scored images; errors in percent."""

    images: int = 0
    top1_correct: int = 0
    top5_correct: int = 0
    loss_sum: float = 0.0  # -log of the (averaged) probability of the true class
    skipped: int = 0  # unreadable images left out

    def add(self, probs: Tensor, labels: Tensor) -> None:
        images, top1, top5, loss = batch_sums(probs, labels).tolist()
        self.images += int(images)
        self.top1_correct += int(top1)
        self.top5_correct += int(top5)
        self.loss_sum += loss

    def as_list(self) -> list[float]:
        return [self.images, self.top1_correct, self.top5_correct, self.loss_sum, self.skipped]

    @classmethod
    def from_list(cls, v: Sequence[float]) -> "Counts":
        return cls(int(round(v[0])), int(round(v[1])), int(round(v[2])), float(v[3]), int(round(v[4])))

    @property
    def top1_error(self) -> float:
        return 100.0 * (1 - self.top1_correct / self.images) if self.images else float("nan")

    @property
    def top5_error(self) -> float:
        return 100.0 * (1 - self.top5_correct / self.images) if self.images else float("nan")

    @property
    def loss(self) -> float:
        return self.loss_sum / self.images if self.images else float("nan")


def autocast(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def patch_softmax(forwards: Sequence[Callable[[Tensor], Tensor]], inputs: Sequence[Tensor], crops: int,
                  amp: str = "none") -> Tensor | None:
    """Softmax outputs of each image's `crops` rows, averaged over models (model i reads inputs[i]):
    (B, crops, classes). None where this process holds no logits (tower 1 of a pair)."""
    total = None
    for forward, x in zip(forwards, inputs, strict=True):
        with autocast(x.device, amp):
            logits = forward(x)
        if logits.shape[-1] == 0:
            return None
        probs = logits.float().softmax(dim=1).view(-1, crops, logits.shape[-1])
        total = probs if total is None else total + probs.to(total.device)
    return total / len(forwards)


@dataclass
class EvalSpec:
    # Protocols to score: 1, the centre patch; 10, the paper's ten patches. The centre patch is one of
    # the ten, so with both the network runs the ten patches only and both tallies come from that pass.
    crops: tuple[int, ...] = (1,)
    batch_size: int = 128  # images per forward (each gives 10 rows when the ten patches are scored)
    amp: str = "none"
    workers: int = 4
    pin: bool = False
    decode_device: torch.device | None = None  # decode stored JPEGs on this GPU
    progress: Callable[[int, int], None] | None = field(default=None, repr=False)
    skipped: SkippedFiles | None = field(default=None, repr=False)  # collects the unreadable files by name


@torch.no_grad()
def evaluate(forwards: Sequence[Callable[[Tensor], Tensor]], source, indices: Tensor,
             augments: Augment | Sequence[Augment], spec: EvalSpec) -> dict[int, Counts]:
    """Score the images `indices` of `source` once each with the (ensemble of) `forwards` under each
    protocol of spec.crops; model i sees the images preprocessed by augments[i] (its own training
    set's mean image). Every process of a pair must call this with the same indices; only tower 0's
    counts are non-zero."""
    if not spec.crops or any(c not in (1, 10) for c in spec.crops):
        raise ValueError(f"crops must be 1 and/or 10 (the paper's protocols), got {spec.crops}")
    if isinstance(augments, Augment):
        augments = [augments] * len(forwards)
    patches = max(spec.crops)  # what each image is cut into: 10 if the ten patches are wanted, else 1
    counts = {c: RunningCounts() for c in spec.crops}
    skipped = 0
    batches = chunks(indices, spec.batch_size)
    # the weights are fixed for the whole pass: the fc layers cast theirs to bf16 once (repro/model/linear.py)
    with bf16_weights_kept(*[f for f in forwards if isinstance(f, nn.Module)]):
        for i, batch in enumerate(iterate(source, batches, spec.workers, spec.pin, spec.decode_device)):
            skipped += batch.skipped
            if spec.skipped is not None:
                spec.skipped.add(batch)
            if len(batch.labels) == 0:
                continue
            prepared: dict[int, Tensor] = {}  # models that share preprocessing share the input
            for aug in augments:
                if id(aug) not in prepared:
                    prepared[id(aug)] = aug.eval_batch(batch.images.to(aug.device, non_blocking=True), patches)
            probs = patch_softmax(forwards, [prepared[id(a)] for a in augments], patches, spec.amp)
            if probs is not None:
                labels = batch.labels.to(probs.device)
                for c, running in counts.items():
                    running.add(probs.mean(dim=1) if c == patches else probs[:, TEN_CROP_CENTRE], labels)
            if spec.progress:
                spec.progress(i + 1, len(batches))
    for running in counts.values():
        running.skipped = skipped
    return {c: running.counts() for c, running in counts.items()}
