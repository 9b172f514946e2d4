"""Checkpoints: always the grouped form's weights and velocities, so either form resumes from them,
written atomically so that a crash mid-write never damages the last good file."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repro.atomic import atomic_write
from repro.config import ModelConfig
from repro.model.convert import towers_to_grouped
from repro.model.grouped import AlexNet

FORMAT = "repro-checkpoint/1"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through a temporary file, fsynced and renamed over `path` (repro.atomic)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def read(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint file, with a clear error if it is missing or not one of ours."""
    path = Path(path)
    if path.is_dir():
        path = path / "latest.pt"
    if not path.is_file():
        if path.name == "best.pt" and (path.parent / "latest.pt").is_file():
            raise FileNotFoundError(f"no checkpoint at {path}: this run has none (best.pt is written when an epoch "
                                    f"ends with the best validation error so far); pass {path.parent} (its latest.pt) instead")
        raise FileNotFoundError(f"no checkpoint at {path}: pass a checkpoint file or a run directory "
                                f"that holds latest.pt")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path} could not be read as a checkpoint ({type(exc).__name__}: {exc}); "
                         f"it may be truncated or not a torch file") from exc
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        return ckpt
    if isinstance(ckpt, dict) and all(isinstance(v, Tensor) for v in ckpt.values()):
        return {"format": FORMAT, "model": ckpt, "model_config": None}  # a bare state dict
    raise ValueError(f"{path} is not a repro checkpoint (expected a dict with format {FORMAT!r})")


def grouped_state(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Accept a grouped state or a TwoTowerAlexNet state ("towers.0.…", "towers.1.…")."""
    if any(k.startswith("towers.") for k in state):
        per = [{k[len(f"towers.{t}."):]: v for k, v in state.items() if k.startswith(f"towers.{t}.")}
               for t in range(cfg.towers)]
        return towers_to_grouped(per, cfg)
    return state


def _infer_config(state: dict[str, Tensor]) -> ModelConfig:
    fc8 = state.get("fc8.weight", state.get("towers.0.fc8.weight"))
    if fc8 is None:
        raise ValueError("cannot tell the network's size: the state has no fc8 weight and no config")
    return ModelConfig(num_classes=fc8.shape[0])


def network(ckpt: dict, path: str | os.PathLike) -> AlexNet:
    """The grouped AlexNet of a checkpoint that `read` returned, in eval mode; `path` names it in errors."""
    state = ckpt["model"]
    if ckpt.get("model_config"):
        cfg = ModelConfig.from_dict(ckpt["model_config"])
    else:
        cfg = _infer_config(state)
        warnings.warn(f"{path} holds bare weights without a config: loaded as the paper's network with "
                      f"{cfg.num_classes} classes. A variant's weights (no-lrn, cuda-convnet-2012, ...) give "
                      f"another function here; load its training checkpoint instead", stacklevel=3)
    # Built on the CPU whatever torch's default device (the weights then load from map_location's
    # tensors), and its drawn initialisation is overwritten: the caller's random stream is left alone.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        model = AlexNet(config=cfg)
    try:
        model.load_state_dict(grouped_state(state, cfg))
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"{path}: the weights do not fit the network its config describes: {exc}") from exc
    return model.eval()


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> AlexNet:
    """The network stored in a checkpoint (either form's), as a grouped AlexNet in eval mode, on the
    device map_location names."""
    return network(read(path, map_location), path).to(map_location)
