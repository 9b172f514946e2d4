"""Image folders as people have them (issue 19, item 3): every image mode and container under any image
extension decodes to the same 256x256 RGB form; stray files are ignored; the held-out split is val/,
test/ or the one --val-split names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repro.config import DataConfig
from repro.data.datasets import held_out_name, open_eval_split, open_splits
from repro.data.folder import decode_image, image_folder


def _palette(transparent: bool) -> Image.Image:
    img = Image.new("P", (20, 12), 1)
    img.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
    if transparent:
        img.info["transparency"] = 0  # index 0 transparent; the image uses index 1 only
    return img


# (image, container format, RGB every pixel must decode to): saved under a .JPEG name whatever the content.
CASES = {
    "cmyk-jpeg": (lambda: Image.new("CMYK", (20, 12), (0, 255, 255, 0)), "JPEG", (255, 0, 0)),
    "grey-jpeg": (lambda: Image.new("L", (20, 12), 90), "JPEG", (90, 90, 90)),
    "rgb-png": (lambda: Image.new("RGB", (20, 12), (12, 34, 56)), "PNG", (12, 34, 56)),
    "rgba-png": (lambda: Image.new("RGBA", (20, 12), (10, 120, 240, 0)), "PNG", (10, 120, 240)),
    "palette-png": (lambda: _palette(False), "PNG", (200, 30, 60)),
    "palette-transparency-png": (lambda: _palette(True), "PNG", (200, 30, 60)),
    "palette-gif": (lambda: _palette(False), "GIF", (200, 30, 60)),
    "palette-transparency-gif": (lambda: _palette(True), "GIF", (200, 30, 60)),
    "grey16-png": (lambda: Image.new("I;16", (20, 12), 40000), "PNG", (156, 156, 156)),  # 40000/257: scaled
    "one-pixel": (lambda: Image.new("RGB", (1, 1), (7, 8, 9)), "PNG", (7, 8, 9)),
    "two-by-300": (lambda: Image.new("RGB", (2, 300), (70, 80, 90)), "JPEG", (70, 80, 90)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mode_and_container_decodes_under_a_jpeg_name(tmp_path, case):
    make, fmt, rgb = CASES[case]
    path = tmp_path / f"{case}.JPEG"
    make().save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    with Image.open(path) as check:
        assert check.format == fmt  # the content is what the case says, not what the name says
    out = decode_image(path)
    assert out.shape == (256, 256, 3) and out.dtype == torch.uint8
    tol = 3 if fmt == "JPEG" else 0  # a uniform image is exact through PNG and GIF, near through JPEG
    assert (out.int() - torch.tensor(rgb)).abs().max().item() <= tol, out[0, 0]


def solid(path: Path, rgb=(50, 100, 150), fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), rgb).save(path, format=fmt)
    return path


def test_nested_folders_read_and_stray_files_ignored(tmp_path):
    solid(tmp_path / "cat" / "a.png")
    solid(tmp_path / "cat" / "2019" / "june" / "b.jpg", fmt="JPEG")  # a class folder's own subfolders
    solid(tmp_path / "dog" / "c.gif", fmt="GIF")
    for stray in ("README", "notes.txt", "Thumbs.db", ".DS_Store", "labels.csv"):
        (tmp_path / "cat" / stray).write_bytes(b"\x00not an image")
    (tmp_path / "dog" / "2019" / ".DS_Store").parent.mkdir()
    (tmp_path / "dog" / "2019" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    src = image_folder(tmp_path, size=16)
    rel = [str(Path(f).relative_to(tmp_path)) for f in src.files]
    assert rel == ["cat/a.png", "cat/2019/june/b.jpg", "dog/c.gif"] and src.labels.tolist() == [0, 0, 1]
    assert all(src[i][0] is not None for i in range(len(src))) and src.skipped == []


def _tree(root: Path, held_out: tuple[str, ...]) -> Path:
    for split in ("train",) + held_out:
        for k, cls in enumerate(("a", "b")):
            solid(root / split / cls / "x.png", (k * 100, 0, 0))
    return root


@pytest.mark.parametrize("present,flag,chosen", [
    (("val",), None, "val"), (("test",), None, "test"), (("val", "test"), None, "val"),
    (("val", "test"), "test", "test"), (("holdout",), "holdout", "holdout")])
def test_held_out_split_val_test_or_named(tmp_path, present, flag, chosen):
    root = _tree(tmp_path, present)
    assert held_out_name(root, flag) == chosen
    cfg = DataConfig(dataset="folder", root=str(root), base_size=16, crop_size=12, val_split=flag)
    train, held = open_splits(cfg)
    assert held.name == f"folder/{chosen}" and Path(held.files[0]).parts[-3] == chosen
    assert held.classes == train.classes == ["a", "b"]
    assert open_eval_split(cfg, ["a", "b"]).name == f"folder/{chosen}"


def test_missing_held_out_split_names_what_was_looked_for(tmp_path):
    root = _tree(tmp_path, ())
    cfg = DataConfig(dataset="folder", root=str(root), base_size=16, crop_size=12)
    with pytest.raises(FileNotFoundError, match=r"looked for .*/val or .*/test; .*--val-split"):
        open_splits(cfg)
    with pytest.raises(FileNotFoundError, match=r"looked for .*/val or .*/test"):
        open_eval_split(cfg, ["a", "b"])
    with pytest.raises(FileNotFoundError, match=r"expects .*/holdout/<class>/<images>"):
        open_splits(DataConfig(dataset="folder", root=str(root), val_split="holdout"))
    with pytest.raises(ValueError, match="directly under --data"):
        held_out_name(root, "../elsewhere")
