"""Open the training and validation splits that a DataConfig names."""

from __future__ import annotations

from pathlib import Path

from repro.config import DataConfig
from repro.data.store import StoreSource, check_not_unfinished, is_store


def open_splits(cfg: DataConfig):
    """(train, val) sources sharing one class index."""
    if cfg.dataset == "fashion-mnist":
        from repro.data.fashion_mnist import fashion_mnist

        # The paper scores on ILSVRC's validation set; Fashion-MNIST's held-out split is "test".
        return fashion_mnist(cfg.root, "train"), fashion_mnist(cfg.root, "test")
    if cfg.root is None:
        raise ValueError(f"--dataset {cfg.dataset} needs --data DIR (the folder holding train/ and val/)")
    if is_store(cfg.root):  # the stored 256x256 form (scripts/prepare_imagenet.py, repro.data.jpeg_tree)
        train = StoreSource(cfg.root, "train")
        return train, StoreSource(cfg.root, "val", classes=train.classes)
    check_not_unfinished(cfg.root)
    if cfg.dataset == "imagenet":
        from repro.data.imagenet import imagenet_splits

        return imagenet_splits(cfg.root, cfg.base_size, devkit=cfg.devkit, solution_csv=cfg.val_solution)
    held_out = held_out_name(cfg.root, cfg.val_split)  # there, before the long scan of train/
    train = folder_split(cfg.root, "train", cfg.base_size)
    return train, folder_split(cfg.root, held_out, cfg.base_size, classes=train.classes)


def folder_split(root: str | Path, split: str, size: int = 256, classes: list[str] | None = None):
    """root/<split>/<class>/<images> of an ImageFolder tree (--dataset folder); val takes train's
    class index through `classes`."""
    from repro.data.folder import image_folder

    return image_folder(split_dir(root, split), name=f"folder/{split}", size=size, classes=classes)


HELD_OUT_NAMES = ("val", "test")  # looked for in this order when --val-split is not given


def held_out_name(root: str | Path, val_split: str | None = None) -> str:
    """The held-out split's folder name under root: `val_split` if given (it must exist), else val/
    if present, else test/ (CIFAR-style trees ship train/ and test/)."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"--data {root} does not exist or is not a folder; pass the folder that holds "
                                f"train/ and val/ (or test/)")
    if val_split is not None:
        if not val_split or Path(val_split).name != val_split or val_split in (".", ".."):
            raise ValueError(f"--val-split {val_split!r}: give the name of a folder directly under --data")
        split_dir(root, val_split)
        return val_split
    for name in HELD_OUT_NAMES:
        if (Path(root) / name).is_dir():
            return name
    looked = " or ".join(str(Path(root) / n) for n in HELD_OUT_NAMES)
    raise FileNotFoundError(f"--dataset folder found no held-out split: looked for {looked}; create one of "
                            f"them (<split>/<class>/<images>) or name the folder with --val-split")


def split_dir(root: str | Path, split: str) -> Path:
    """root/<split> of an ImageFolder tree, or a clear error if it is missing."""
    path = Path(root) / split
    if not path.is_dir():
        raise FileNotFoundError(f"--dataset folder expects {path}/<class>/<images>; {path} does not exist "
                                f"(or is not a folder)")
    return path


def open_eval_split(cfg: DataConfig, classes: list[str]):
    """Only the held-out split, labelled with the class index the network was trained with.

    A class-count mismatch or a label the network does not know is an error here, never a
    silently wrong number.
    """
    if cfg.dataset == "fashion-mnist":
        from repro.data.fashion_mnist import fashion_mnist

        split = fashion_mnist(cfg.root, "test")
    else:
        split = _held_out_split(cfg, classes)
    if list(split.classes) != list(classes):
        raise ValueError(f"{split.name} has {len(split.classes)} classes {split.classes[:3]}... but the network "
                         f"was trained on {len(classes)} classes {list(classes)[:3]}...: wrong --data or checkpoint")
    return split


def _held_out_split(cfg: DataConfig, classes: list[str]):
    if cfg.root is None:
        raise ValueError(f"--dataset {cfg.dataset} needs --data DIR (the folder holding val/)")
    if is_store(cfg.root):
        return StoreSource(cfg.root, "val", classes=classes)
    check_not_unfinished(cfg.root)
    if cfg.dataset == "imagenet":
        from repro.data.imagenet import imagenet_val

        return imagenet_val(cfg.root, classes, cfg.base_size, devkit=cfg.devkit, solution_csv=cfg.val_solution)
    return folder_split(cfg.root, held_out_name(cfg.root, cfg.val_split), cfg.base_size, classes=classes)
