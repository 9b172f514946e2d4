"""Trained weights as safetensors, the format people share models in: tensors and a str->str header,
so that loading one runs no code. The network's config (ModelConfig.to_dict() as JSON) and its class
names ride in the header's metadata; the training state (optimiser, mean image, progress) does not:
evaluation and repro.load_preprocessing need the training checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from repro.atomic import atomic_write
from repro.config import ModelConfig
from repro.model.grouped import AlexNet

FORMAT = "repro-alexnet-weights-1"  # metadata["format"]: the header this module writes and reads
SUFFIX = ".safetensors"


def is_safetensors(path: str | os.PathLike) -> bool:
    return str(path).endswith(SUFFIX)


def export_safetensors(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a training checkpoint's (or run folder's) trained weights, grouped form, to `out`."""
    from repro.checkpoint import network, read

    out = Path(out)
    if not is_safetensors(out):  # before the (large) checkpoint is read
        raise ValueError(f"--out {out}: name the file *{SUFFIX}")
    ckpt = read(checkpoint)
    model = network(ckpt, checkpoint)
    meta = {"format": FORMAT, "model_config": json.dumps(model.config.to_dict()),
            "classes": json.dumps(list(ckpt.get("classes") or []))}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = save(tensors, metadata=meta)  # the file's bytes, written once through a renamed temporary
    atomic_write(out, lambda f: f.write(data))
    return out


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig, list[str]]:
    """(grouped state, config, class names) of a file export_safetensors wrote; clear errors else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != FORMAT or "model_config" not in meta:
        raise ValueError(f"{path} has no repro network config in its metadata (format {meta.get('format')!r}, "
                         f"keys {sorted(meta)}): export it with scripts/export_safetensors.py")
    try:
        cfg = ModelConfig.from_dict(json.loads(meta["model_config"]))
        classes = json.loads(meta.get("classes", "[]"))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: the network config in its metadata is invalid ({exc})") from exc
    return state, cfg, list(classes)


def load_safetensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> AlexNet:
    """The grouped AlexNet of an exported file, in eval mode, on map_location."""
    state, cfg, _ = read_safetensors(path)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        model = AlexNet(config=cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: the weights do not fit the network its metadata describes: {exc}") from exc
    return model.eval().to(map_location)
