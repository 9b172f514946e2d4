"""Checkpoints: always the grouped form's weights and velocities, so either form resumes from them,
written atomically so that a crash mid-write never damages the last good file.

Reading never runs code from the file: torch.load(weights_only=True) accepts tensors, numbers, strings,
lists, tuples and dicts only, so a crafted file is refused, not executed (configs are stored as dicts,
statistics as tensors). A file it refuses gets a message naming `upgrade`, the one reader that unpickles
in full, which the user runs knowingly on a file they trust:

    python -m repro.checkpoint upgrade OLD.pt NEW.pt
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repro.atomic import atomic_write
from repro.config import ModelConfig, TrainConfig
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
        ckpt = safe_load(path, map_location)
    except pickle.UnpicklingError as exc:
        if _names_an_object(exc):  # else a damaged file, below
            raise ValueError(refused_message(path, exc)) from None
        raise ValueError(f"{path} could not be read as a checkpoint ({_why(exc)}); it may be truncated or not "
                         f"a torch file") from None
    except Exception as exc:
        raise ValueError(f"{path} could not be read as a checkpoint ({type(exc).__name__}: {exc}); "
                         f"it may be truncated or not a torch file") from exc
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        return ckpt
    if isinstance(ckpt, dict) and all(isinstance(v, Tensor) for v in ckpt.values()):
        return {"format": FORMAT, "model": ckpt, "model_config": None}  # a bare state dict
    raise ValueError(f"{path} is not a repro checkpoint (expected a dict with format {FORMAT!r})")


# Checkpoints written before this reader stored torch.__version__ as torch's TorchVersion, a str subclass
# whose construction runs no code: allowed, so that those files load without conversion.
_SAFE_GLOBALS = [torch.torch_version.TorchVersion]


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """torch.load that unpickles plain data only (pickle.UnpicklingError for anything else)."""
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


def _why(exc: Exception) -> str:
    """The weights-only unpickler's own reason, without torch's general advice around it."""
    return str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]


def _names_an_object(exc: Exception) -> bool:
    """Whether the weights-only unpickler stopped at a Python object (a global or class it does not allow)."""
    why = _why(exc).lower()
    return "global" in why or "class" in why


def refused_message(path: str | os.PathLike, exc: Exception) -> str:
    """Why a file was not loaded, and the one-line conversion for a file the user trusts."""
    why = _why(exc)
    return (f"{path} was refused: it holds Python objects other than tensors, numbers, strings, lists and dicts "
            f"({why}), and loading them could run code from the file. Nothing from it was executed. If you trust "
            f"the file (e.g. a checkpoint of an older repro you wrote), convert it once with "
            f"`python -m repro.checkpoint upgrade {path} NEW.pt` and load NEW.pt")


def _plain(value: Any) -> Any:
    """value with every object that is not plain data (dataclasses, str subclasses, ...) made plain."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value) if type(value) in (list, tuple) else list(map(_plain, value))
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (Tensor, int, float, bool)) or value is None:
        return value
    raise ValueError(f"cannot store a {type(value).__name__} in a checkpoint as plain data")


def upgrade(old: str | os.PathLike, new: str | os.PathLike) -> Path:
    """Rewrite a trusted checkpoint as plain data that `read` accepts. The ONLY full unpickling here:
    it can run code from `old`, which is why it is a command the user runs by name."""
    ckpt = torch.load(old, map_location="cpu", weights_only=False)
    return atomic_save(_plain(ckpt), new)


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "upgrade":
        sys.stderr.write("usage: python -m repro.checkpoint upgrade OLD.pt NEW.pt\n")
        return 2
    print(f"unpickling {argv[1]} in full (weights_only=False): this runs any code the file holds; do this only "
          f"for a file you trust", flush=True)
    try:
        out = upgrade(argv[1], argv[2])
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    safe_load(out)  # the converted file reads as plain data
    print(f"wrote {out}: it loads with weights_only=True", flush=True)
    return 0


@dataclass
class ResumePoint:
    """Everything a training checkpoint holds to continue its run exactly. The checkpoint's keys are known
    here alone: `write_training` writes them and `resume_point` reads them back."""

    train_config: dict  # TrainConfig.to_dict(): the run's recipe (and its last runtime settings)
    model: dict[str, Tensor]  # the grouped form's state dict
    velocity: dict[str, Tensor]  # the momentum buffers, by the grouped form's parameter names
    schedule: dict  # LRSchedule.state_dict()
    progress: dict  # repro.metrics.Progress as a dict: epoch, step_in_epoch, global_step
    best_val_top1: float
    classes: list[str] | None
    stats: dict | None  # repro.data.augment.Stats as a dict of tensors and a count
    epoch_train_counts: list[float] | None  # the interrupted epoch's training counts so far (None: at its end)
    replicas: int  # tower pairs of the launch that wrote it (an interrupted epoch's batches depend on it)


def write_training(point: ResumePoint, paths: list[Path], towers: int) -> None:
    """A training checkpoint, atomically, at each of `paths` (latest.pt, and best.pt when it is the best)."""
    ckpt = dict(format=FORMAT, model=point.model, velocity=point.velocity,
                model_config=TrainConfig.from_dict(point.train_config).model.to_dict(),
                train_config=point.train_config, schedule=point.schedule, progress=point.progress,
                best_val_top1=point.best_val_top1, classes=point.classes, epoch_train_counts=point.epoch_train_counts,
                stats=point.stats, topology=dict(towers=towers, replicas=point.replicas),
                torch_version=str(torch.__version__))
    for path in paths:
        atomic_save(ckpt, path)


def check_resumable(ckpt: dict, path: str, replicas: int) -> None:
    """A training checkpoint, and one this many pairs can continue exactly."""
    missing = [k for k in ("train_config", "velocity", "schedule", "progress") if not ckpt.get(k)]
    if missing:
        raise ValueError(f"{path} is not a training checkpoint (no {', '.join(missing)}): --resume needs a run's "
                         f"latest.pt or best.pt; to start from bare weights, load them with repro.load_checkpoint")
    saved = (ckpt.get("topology") or {}).get("replicas", replicas)
    if ckpt["progress"]["step_in_epoch"] and saved != replicas:
        raise ValueError(f"{path} was written in the middle of an epoch by {saved} tower pair(s); this launch has "
                         f"{replicas}. The rest of that epoch's batches depend on the pair count: resume with "
                         f"{saved} pair(s) at least until the epoch ends")


def resume_point(ckpt: dict, path: str, replicas: int) -> ResumePoint:
    """The run state of a checkpoint that `read` returned, checked to be one `replicas` pairs can continue."""
    check_resumable(ckpt, path, replicas)
    return ResumePoint(train_config=ckpt["train_config"], model=ckpt["model"], velocity=ckpt["velocity"],
                       schedule=ckpt["schedule"], progress=ckpt["progress"],
                       best_val_top1=ckpt.get("best_val_top1", math.inf), classes=ckpt.get("classes"),
                       stats=ckpt.get("stats"), epoch_train_counts=ckpt.get("epoch_train_counts"),
                       replicas=(ckpt.get("topology") or {}).get("replicas", replicas))


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


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
