"""Weights between the grouped form and the towers, exactly (slicing and concatenation only).

Tower t owns output block t of every layer (conv1..conv5, fc6, fc7) along dim 0; fc8 lives on
tower 0 whole. The same mapping serves any per-parameter state keyed like the parameters (the
optimiser's velocities), so a checkpoint always stores the grouped form and resumes into either.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from repro.config import ModelConfig
from repro.model.spec import tower_layers

_SHARED_BUFFERS = ("drop6.step", "drop7.step")  # the same in every tower and in the grouped form


def _split_layers(cfg: ModelConfig) -> set[str]:
    return {s.name for s in tower_layers(cfg)}


def grouped_to_towers(state: Mapping[str, Tensor], cfg: ModelConfig) -> list[dict[str, Tensor]]:
    """Split a grouped `AlexNet` state (or any state keyed like it) into one state per tower."""
    split = _split_layers(cfg)
    towers: list[dict[str, Tensor]] = [{} for _ in range(cfg.towers)]
    for key, value in state.items():
        layer = key.split(".", 1)[0]
        if layer in split:
            for t, block in enumerate(value.chunk(cfg.towers, dim=0)):
                towers[t][key] = block.clone()
        elif layer == "fc8":
            towers[0][key] = value.clone()
        elif key in _SHARED_BUFFERS:
            for tower in towers:
                tower[key] = value.clone()
        else:
            raise KeyError(f"unexpected entry {key!r} in an AlexNet state; is it from another model?")
    return towers


def towers_to_grouped(states: list[Mapping[str, Tensor]], cfg: ModelConfig) -> dict[str, Tensor]:
    """Concatenate per-tower states (tower 0 first) into one grouped `AlexNet` state."""
    if len(states) != cfg.towers:
        raise ValueError(f"expected {cfg.towers} tower states, got {len(states)}")
    split = _split_layers(cfg)
    out: dict[str, Tensor] = {}
    for key, value in states[0].items():
        layer = key.split(".", 1)[0]
        if layer in split:
            out[key] = torch.cat([s[key].to(value.device) for s in states], dim=0)
        elif layer == "fc8" or key in _SHARED_BUFFERS:
            out[key] = value.clone()
        else:
            raise KeyError(f"unexpected entry {key!r} in a Tower state; is it from another model?")
    return out
