"""The training set's per-pixel mean image and RGB covariance (paper sections 2 and 4.1), computed
once over the 256x256 images and cached beside the data (or in the run directory)."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from repro.atomic import atomic_write
from repro.data.augment import Stats, to_base
from repro.data.skipped import SkippedFiles, images_of


def fingerprint(source) -> str:
    """Identifies a split by its name, size, labels, and a sample of about 1000 images: their file
    names and `content_probe` (pixels, or file sizes), so that a data set rewritten in place under
    the same names (another JPEG quality, another resize) does not reuse stale statistics."""
    h = hashlib.sha256(f"{source.name}|{len(source)}".encode())
    h.update(source.labels.numpy().tobytes())
    every = max(1, len(source) // 1000)
    for f in getattr(source, "files", [])[::every]:
        h.update(str(f).encode())
    probe = getattr(source, "content_probe", None)
    if probe is not None:
        h.update(probe(every))
    return h.hexdigest()[:16]


def accumulate(batches: Iterable[Tensor], base_size: int, device: torch.device | str = "cpu") -> Stats:
    """Mean image and RGB covariance from uint8 (B, H, W, C) batches; sums kept in float64."""
    total = torch.zeros(base_size, base_size, 3, dtype=torch.float64, device=device)
    moment = torch.zeros(3, 3, dtype=torch.float64, device=device)
    n = 0
    for images in batches:
        x = to_base(images.to(device), base_size).float()
        total += x.sum(0, dtype=torch.float64)  # grey (C = 1) broadcasts to R = G = B
        rgb = x.reshape(-1, x.shape[-1]).double() / 255.0  # [0, 1] units, as the published constants
        moment += (rgb.T @ rgb) if x.shape[-1] == 3 else rgb.square().sum()  # grey: every entry equal
        n += x.shape[0]
    if n == 0:
        raise ValueError("cannot compute dataset statistics from zero images")
    pixels = n * base_size * base_size
    mean_rgb = total.sum((0, 1)) / pixels / 255.0
    cov = moment / pixels - torch.outer(mean_rgb, mean_rgb)
    vals, vecs = torch.linalg.eigh(cov)  # ascending
    order = torch.argsort(vals, descending=True)
    return Stats((total / n).float().cpu(), vals[order].cpu(), vecs[:, order].cpu(), n)


def save_stats(stats: Stats, path: Path, key: str) -> None:
    atomic_write(path, lambda f: np.savez(f, mean_image=stats.mean_image.numpy(), eigvals=stats.eigvals.numpy(),
                                          eigvecs=stats.eigvecs.numpy(), images=stats.images, key=key))


def load_stats(path: Path, key: str) -> Stats | None:
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            return Stats(torch.from_numpy(z["mean_image"]), torch.from_numpy(z["eigvals"]),
                         torch.from_numpy(z["eigvecs"]), int(z["images"]))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return None  # missing or damaged cache: compute again


def default_cache_dirs(data_root: str | None, run_dir: Path) -> list[Path]:
    """Beside the data if it is ours to write, else the user's cache, else the run directory."""
    user = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "repro"
    beside = [Path(data_root)] if data_root and Path(data_root).is_dir() else []  # never create a data folder
    return beside + [user, Path(run_dir)]


def cached_stats(source, base_size: int, batches: Callable[[], Iterable[Tensor]], cache_dirs: list[Path],
                 max_images: int | None = None, log: Callable[[str], None] = print,
                 device: torch.device | str = "cpu", subset_seed: int | None = None,
                 skipped_to: Path | None = None) -> Stats:
    """Load the statistics from the first cache directory that has them, else compute and save them
    to the first writable one. `subset_seed`: the seed that drew the `max_images` images, when they
    are a random subset (another seed, other images, another cache entry). `batches` yields image
    tensors or loader Batches; of Batches, the unreadable files are added to skipped_to/skipped.txt
    (the run folder) and logged in one line."""
    subset = max_images is not None and max_images < len(source)
    key = f"{fingerprint(source)}-{base_size}-{max_images}" + (f"-seed{subset_seed}" if subset else "")
    name = f"stats-{source.name.replace('/', '-')}-{key}.npz"
    for d in cache_dirs:
        stats = load_stats(d / name, key)
        if stats is not None:
            log(f"dataset statistics: loaded {d / name}")
            return stats
    log(f"dataset statistics: computing the mean image and RGB covariance over "
        f"{min(len(source), max_images or len(source))} training images (once; cached)")
    unreadable = SkippedFiles.load(skipped_to) if skipped_to is not None else SkippedFiles()
    before = len(unreadable)
    stats = accumulate(images_of(batches(), unreadable), base_size, device)
    if skipped_to is not None and len(unreadable) > before:
        log(unreadable.write(skipped_to, "dataset statistics"))
    for d in cache_dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            save_stats(stats, d / name, key)
            log(f"dataset statistics: saved {d / name}")
            break
        except OSError:
            continue
    return stats
