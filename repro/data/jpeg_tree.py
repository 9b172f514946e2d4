"""A JPEG image-folder tree (and its stored form) made from an in-memory dataset such as
Fashion-MNIST, so the file pipelines (CPU decoding of a folder, GPU decoding of the 256x256 store)
can be timed where ImageNet is not at hand. Images are written as 256x256 RGB JPEGs, quality 90:
the size and encoding that scripts/prepare_imagenet.py stores. Upscaled Fashion-MNIST is smooth and
comes to about 6 KB a file against about 21 KB for ImageNet, so it decodes faster than ImageNet."""

from __future__ import annotations

import io
import json
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from repro.cores import available_cores

SIZE, QUALITY = 256, 90
_DONE = "tree.json"  # written last: its presence means the tree is complete (a crashed run rewrites it all)


def class_dir_names(classes: list[str]) -> list[str]:
    """Folder names in the same sorted order as the labels ("T-shirt/top" cannot be a folder name)."""
    width = len(str(len(classes) - 1))
    return [f"{i:0{width}d}-" + "".join(ch if ch.isalnum() else "-" for ch in name) for i, name in enumerate(classes)]


def _encode(image: np.ndarray) -> bytes:
    img = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).convert("RGB")
    img = img.resize((SIZE, SIZE), Image.BILINEAR)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=QUALITY)
    return out.getvalue()


def _write(job: tuple[str, np.ndarray]) -> None:
    path, image = job
    Path(path).write_bytes(_encode(image))


def write_jpeg_tree(splits: dict, root: str | Path, images: dict[str, int], workers: int | None = None) -> Path:
    """root/<split>/<class>/<index>.jpg for the first images[split] images (evenly spaced over the
    split) of each source in `splits` ({"train": source, "val": source}). Kept as it is if a
    complete tree with the same counts is there already; other counts are an error (name the root
    after the counts to keep several)."""
    root = Path(root)
    done = root / _DONE
    want = {split: min(images[split], len(src)) for split, src in splits.items()}
    if done.exists():
        have = json.loads(done.read_text())
        if have == want:
            return root
        raise ValueError(f"{root} holds a JPEG tree of {have} images, not {want}: remove it or choose another folder")
    jobs = []
    for split, src in splits.items():
        names = class_dir_names(src.classes)
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        picked = np.linspace(0, len(src) - 1, want[split]).round().astype(int).tolist()
        labels = torch.as_tensor(src.labels)
        for c in sorted(set(range(len(names))) - set(labels[picked].tolist())):  # a small sample can miss one:
            first = (labels == c).nonzero()  # its folder would be an empty class (an error for a training tree)
            if len(first):
                picked.append(int(first[0]))
        for i in picked:
            image, label = src[i]
            jobs.append((str(root / split / names[int(label)] / f"{i:06d}.jpg"), torch.as_tensor(image).numpy()))
    workers = workers if workers is not None else available_cores()
    if workers <= 1:
        for job in jobs:
            _write(job)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write, jobs, chunksize=64):
                pass
    done.write_text(json.dumps(want))
    return root


def store_of_tree(tree: str | Path, out: str | Path, workers: int | None = None) -> Path:
    """The stored 256x256 form (repro.data.store) of a tree written by write_jpeg_tree."""
    from repro.data.folder import image_folder
    from repro.data.store import is_store, write_store

    tree, out = Path(tree), Path(out)
    if not is_store(out):
        train = image_folder(tree / "train", name="folder/train")
        val = image_folder(tree / "val", name="folder/val", classes=train.classes)
        write_store({"train": train, "val": val}, out, workers=workers, progress=lambda _msg: None)
    return out
