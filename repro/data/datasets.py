"""Open the training and validation splits that a DataConfig names."""

from __future__ import annotations

from pathlib import Path

from repro.config import DataConfig


def open_splits(cfg: DataConfig):
    """(train, val) sources sharing one class index."""
    if cfg.dataset == "fashion-mnist":
        from repro.data.fashion_mnist import fashion_mnist

        # The paper scores on ILSVRC's validation set; Fashion-MNIST's held-out split is "test".
        return fashion_mnist(cfg.root, "train"), fashion_mnist(cfg.root, "test")
    if cfg.root is None:
        raise ValueError(f"--dataset {cfg.dataset} needs --data DIR (the folder holding train/ and val/)")
    if cfg.dataset == "imagenet":
        from repro.data.imagenet import imagenet_splits

        return imagenet_splits(cfg.root, cfg.base_size, devkit=cfg.devkit, solution_csv=cfg.val_solution)
    from repro.data.folder import image_folder

    root = Path(cfg.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"--dataset folder expects {root / split}/<class>/<images>; "
                                    f"{root / split} does not exist")
    train = image_folder(root / "train", name="folder/train", size=cfg.base_size)
    return train, image_folder(root / "val", name="folder/val", size=cfg.base_size, classes=train.classes)
