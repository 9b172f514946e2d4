"""Image files on disk as 256x256 uint8 images (paper section 2; the ImageNet layouts: README).

The paper's only fixed preprocessing: "rescaled the image such that the shorter side was of length
256, and then cropped out the central 256x256 patch". `decode_image` does exactly that for one file;
`FolderSource` is a Dataset over a list of files and labels; `image_folder` builds one from an
ImageFolder-style tree root/<class>/<image files>.

A file that cannot be decoded never stops a pass over the data: `FolderSource[i]` returns
`(None, label)` and records (path, reason) in `skipped`; the loader's batches carry those pairs, so that
callers drop the file and name it (repro.data.skipped writes them to skipped.txt).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# What PIL raises for a missing, empty, truncated or foreign file. Truncated JPEG data raises OSError
# at load() because ImageFile.LOAD_TRUNCATED_IMAGES stays False: a half image must not pass as whole.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageDecodeError(Exception):
    """A file that is not a decodable image; `path` and a short `reason` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)  # both in args, so the error pickles across DataLoader workers
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"cannot decode image {self.path}: {self.reason}"


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB. CMYK, greyscale, palette and alpha modes go through PIL's own
    conversion (alpha is dropped, as torchvision's loader does); 16-bit greyscale is scaled down
    first, since PIL's conversion would clip it to white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))  # 2-D uint8: "L"
    return img if img.mode == "RGB" else img.convert("RGB")


def _shorter_side_then_centre(img: Image.Image, size: int) -> Image.Image:
    """Rescale so the shorter side is `size` (antialiased bilinear), then cut the central square."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.BILINEAR, reducing_gap=None)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def base_image(img: Image.Image, size: int = 256) -> torch.Tensor:
    """One decoded image in the stored form: RGB, shorter side `size`, central square; (size, size, 3)
    uint8 HWC."""
    out = _shorter_side_then_centre(_to_rgb(img), size)
    return torch.from_numpy(np.array(out, dtype=np.uint8))  # np.array copies: writable, contiguous


def decode_image(path: str | Path, size: int = 256) -> torch.Tensor:
    """One file as a (size, size, 3) uint8 HWC tensor; raises ImageDecodeError if it is not an image.

    PIL picks the decoder from the file's content, not its name, so ImageNet's PNG saved as .JPEG
    decodes as PNG (the ILSVRC-2012 training set has one, and some CMYK JPEGs)."""
    path = str(path)
    try:
        with Image.open(path) as img:
            img.load()
            if min(img.size) < 1:
                raise ImageDecodeError(path, f"empty image of size {img.size}")
            return base_image(img, size)
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}"[:200]) from e


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


class FolderSource(Dataset):
    """Image files with integer labels, each read as a size x size uint8 RGB image (HWC).

    `classes[label]` names a label. `skipped` lists (path, reason) for each file that failed to
    decode in this process (with DataLoader workers, in each worker)."""

    def __init__(self, files: Sequence[str | Path], labels: Sequence[int] | torch.Tensor,
                 classes: Sequence[str], name: str, size: int = 256):
        if len(files) != len(labels):
            raise ValueError(f"{name}: {len(files)} files but {len(labels)} labels")
        if size < 1:
            raise ValueError(f"{name}: image size must be positive, got {size}")
        self.files = [str(f) for f in files]
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        self.classes = list(classes)
        self.name, self.size = name, size
        self.skipped: list[tuple[str, str]] = []
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"{name}: labels must lie in [0, {len(self.classes)}), got "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def content_probe(self, every: int) -> bytes:
        """The sizes of every `every`-th file (-1 where unreadable), for the statistics cache's key:
        a stat per file, not a read, so the key stays cheap on a million-image tree."""
        return np.array([_file_size(f) for f in self.files[::every]], dtype=np.int64).tobytes()

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        label = int(self.labels[i])
        try:
            return decode_image(self.files[i], self.size), label
        except ImageDecodeError as e:
            self.skipped.append((e.path, e.reason))
            return None, label

    def __repr__(self) -> str:
        return (f"FolderSource({self.name!r}, {len(self)} images, {self.num_classes} classes, "
                f"size={self.size})")


def class_folders(root: str | Path) -> list[str]:
    """Sorted names of the subfolders of root, hidden ones (".*") left out."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: str, outside: set[str] = frozenset()) -> list[str]:
    """Image files under folder, recursively: a folder's files (sorted), then its subfolders' (sorted). Hidden files are left out:
    macOS "._name.JPEG" companions carry the image extension but no image. Folders whose real path
    is in `outside` (the tree's root, the other classes) are not entered through a symbolic link."""
    found, seen = [], set(outside)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symbolic link back up the tree (or to a folder walked already): once only
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def _class_index(root: Path, folders: list[str], classes: Sequence[str] | None) -> dict[str, int]:
    if classes is None:
        return {c: i for i, c in enumerate(folders)}
    if len(set(classes)) != len(classes):
        raise ValueError(f"the class list for {root} names some class twice")
    index = {c: i for i, c in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ValueError(f"folder {root / unknown[0]} is not one of the {len(index)} given classes "
                         f"({len(unknown)} such folders); remove it or use the matching class list")
    return index


def image_folder(root: str | Path, name: str | None = None, size: int = 256,
                 classes: Sequence[str] | None = None) -> FolderSource:
    """The tree root/<class>/<image files> as a FolderSource.

    Labels follow sorted folder names (ImageFolder's order; for ImageNet, sorted wnids,
    the usual class index) unless `classes` is given: then every folder must be one of them, labels index
    `classes`, and classes without a folder simply have no images here."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist or is not a directory; pass "
                                f"the folder that holds one subfolder of images per class")
    folders = class_folders(root)
    if not folders:
        raise ValueError(f"{root} has no class subfolders; expected the layout "
                         f"{root}/<class name>/<image files>")
    index = _class_index(root, folders, classes)
    files, labels, empty = [], [], []
    real = {f: os.path.realpath(root / f) for f in folders}
    seen: dict[str, str] = {}
    for folder in folders:  # two class names for one folder (a link): every image would be both classes
        first = seen.setdefault(real[folder], folder)
        if first != folder:
            raise ValueError(f"class folders {root / first} and {root / folder} are one folder (a link): its "
                             f"images would belong to both classes; remove the link or copy the images")
    for folder in folders:  # a link up to the root, or into another class, would mislabel images
        found = _image_files(str(root / folder), {os.path.realpath(root)} | (set(real.values()) - {real[folder]}))
        files += found
        labels += [index[folder]] * len(found)
        if not found:
            empty.append(folder)
    if not files:
        raise ValueError(f"no image files under {root} (looked in {len(folders)} class folders for "
                         f"{', '.join(IMAGE_EXTENSIONS)}); is this the right folder?")
    if empty and classes is None:  # its folder would make a class that no image teaches
        raise ValueError(f"class folder {root / empty[0]} has no image files ({len(empty)} such folders: "
                         f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); remove them or "
                         f"finish copying the data set")
    names = list(classes) if classes is not None else folders
    return FolderSource(files, labels, names, name if name is not None else root.name, size)
