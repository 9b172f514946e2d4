"""Fashion-MNIST, the default dataset: 70,000 real 28x28 grey images in 10 classes.

Found, in this order, in `root` (torchvision's layout root/FashionMNIST/raw/, or the IDX files in
root itself), in Debian's package dataset-fashion-mnist, or downloaded by torchvision where a
network exists. The images stay 28x28 here; the shorter-side-to-256 rescaling of paper section 2
runs batched on the training device (`repro.data.augment`).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from repro.data.tensor_source import TensorSource

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot"]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # where the Debian package puts the files
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), optionally gzipped: big-endian dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # a cut-off download, say
        raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc}); fetch the file again or remove it") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: dims {dims} need {int(np.prod(dims))} bytes, found {body.size}")
    return body.reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    dirs = []
    if root is not None:
        dirs += [Path(root) / "FashionMNIST" / "raw", Path(root) / "raw", Path(root)]  # raw: --data .../FashionMNIST
    return dirs + [DEBIAN_DIR]


def find_files(root, split: str) -> tuple[Path, Path] | None:
    for folder in _candidates(root):
        images, labels = (_find(folder, stem) for stem in _FILES[split])
        if images and labels:
            return images, labels
    return None


def _download(root: str | os.PathLike) -> None:
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)


def fashion_mnist(root: str | os.PathLike | None = None, split: str = "train", download: bool = True) -> TensorSource:
    """The `split` ("train": 60,000 or "test": 10,000) as uint8 (N, 28, 28, 1) images."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    found = find_files(root, split)
    download_error = None
    if found is None and download:
        target = Path(root) if root is not None else Path("data")
        try:
            _download(target)
            found = find_files(target, split)
        except Exception as exc:  # no network, no write access: say so below
            download_error = exc
    if found is None:
        looked = ", ".join(str(p) for p in _candidates(root))
        raise FileNotFoundError(
            f"Fashion-MNIST ({split}) not found. Looked in: {looked}. Either pass --data DIR holding "
            f"torchvision's FashionMNIST/raw/ files (or the four *-idx*-ubyte[.gz] files), install Debian's "
            f"package (apt-get install dataset-fashion-mnist), or run where torchvision can download it"
            + (f" (download failed: {download_error})" if download_error else "") + ".")
    images, labels = (read_idx(p) for p in found)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{found[0]} has {images.shape[0]} images but {found[1]} has {labels.shape[0]} labels")
    used = found[0].parent  # --data, Debian's package or a download
    origin = str(used)
    if root is not None and Path(root).resolve() not in (used.resolve(), *used.resolve().parents):
        why = ("has no such files" if Path(root).is_dir() else "is a file, not a folder" if Path(root).exists()
               else "does not exist")
        origin += f"; NOT the given {root}, which {why}: Fashion-MNIST is one fixed data set, the same images"
    return TensorSource(torch.from_numpy(images.copy()).unsqueeze(-1), torch.from_numpy(labels.astype(np.int64)),
                        CLASSES, f"fashion-mnist/{split}", origin)
