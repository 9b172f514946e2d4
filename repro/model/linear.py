"""The fully connected layers, with their bfloat16 weights kept through an evaluation pass on the CPU.

Under bfloat16 autocast every forward casts each weight to bfloat16 again: for fc6-fc8 that is reading
234 MB of float32 and writing 117 MB, about a third of those layers' time at an evaluation batch of 32
(measured 15 ms of 41 on one Zen 4 core, docs/benchmarks.md). Within an evaluation pass the weights do not
change, so there `Linear` casts each weight once, the same rounding autocast makes (the same bits out),
and reuses it for every batch. Only inside `bf16_weights_kept`: a weight can change without a sign that
a copy could check (an in-place change through `.data`, or a native optimiser writing through a
pointer, leaves the version counter as it was), so the copy lives only where nothing changes them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Linear(nn.Linear):
    """nn.Linear (the same parameters and state dict). Inside `bf16_weights_kept`, a CPU forward under
    bfloat16 autocast that wants no gradient of its weight reuses the weight's bfloat16 rounding; as a
    second guard it is cast again where the weight is another tensor or its version moved."""

    keep_bf16 = False  # set by bf16_weights_kept
    _bf16: tuple[Tensor, int, Tensor] | None = None  # (the float32 weight it was cast from, its version, the cast)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if not self.keep_bf16 or torch.compiler.is_compiling() or w.dtype != torch.float32 \
                or x.device.type != "cpu" or not torch.is_autocast_enabled("cpu") \
                or torch.get_autocast_dtype("cpu") != torch.bfloat16 or (torch.is_grad_enabled() and w.requires_grad):
            return super().forward(x)
        cached = self._bf16
        if cached is None or cached[0].data_ptr() != w.data_ptr() or cached[1] != w._version:
            with torch.no_grad():
                # the source is kept alive with its copy, so no new weight can reuse its address
                cached = self._bf16 = (w.detach(), w._version, w.to(torch.bfloat16))
        return F.linear(x, cached[2], self.bias)  # autocast casts x and the bias; the weight is cast already


@contextmanager
def bf16_weights_kept(*models: nn.Module) -> Iterator[None]:
    """Within the block the models' `Linear` layers keep their bfloat16 weights between forwards; the
    caller promises that no weight changes inside it (an evaluation pass). The copies go at its end."""
    layers = [m for model in models for m in model.modules() if isinstance(m, Linear)]
    for layer in layers:
        layer.keep_bf16 = True
    try:
        yield
    finally:
        for layer in layers:
            layer.keep_bf16, layer._bf16 = False, None
