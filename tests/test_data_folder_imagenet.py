"""Tests for repro.data.folder and repro.data.imagenet: decoding, and every ImageNet layout.

Small trees are built in tmp_path: three fake wnids, tiny solid-colour images, val/ in each of the
three layouts. The devkit's IDs deliberately run in another order than the sorted wnids, so a reader
that took an ID for a class index would give wrong labels.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from repro.data.folder import FolderSource, ImageDecodeError, decode_image, image_folder
from repro.data.imagenet import imagenet_splits, imagenet_train, imagenet_val

WNIDS = ["n00000001", "n00000002", "n00000003"]
COLOURS = {"n00000001": (200, 30, 30), "n00000002": (30, 200, 30), "n00000003": (30, 30, 200)}
# Devkit IDs (1-based) in an order unlike sorted wnids; ID 4 belongs to a non-leaf synset.
DEVKIT_ID = {"n00000003": 1, "n00000001": 2, "n00000002": 3}
VAL_WNIDS = ["n00000003", "n00000001", "n00000002", "n00000002", "n00000003", "n00000001"]
VAL_LABELS = [WNIDS.index(w) for w in VAL_WNIDS]  # training's index: [2, 0, 1, 1, 2, 0]


def solid(path: Path, colour, size=(40, 30), fmt: str = "JPEG", mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt, quality=95)
    return path


def val_name(k: int) -> str:
    return f"ILSVRC2012_val_{k:08d}.JPEG"


def make_train(root: Path) -> None:
    for w in WNIDS:
        solid(root / "train" / w / f"{w}_1.JPEG", COLOURS[w], (40, 30))
        solid(root / "train" / w / f"{w}_2.JPEG", COLOURS[w], (30, 50))


def make_flat_val(root: Path, n: int = len(VAL_WNIDS)) -> None:
    for k in range(1, n + 1):
        solid(root / "val" / val_name(k), COLOURS[VAL_WNIDS[k - 1]], (30 + k, 30))


def meta_mat(entries) -> bytes:
    """A meta.mat: entries of (ILSVRC2012_ID, WNID, num_children), a struct array like the devkit's."""
    fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.zeros((len(entries), 1), dtype=fields)
    for row, (i, w, n) in enumerate(entries):
        synsets[row, 0] = (i, w, f"words of {w}", n)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    return buf.getvalue()


def devkit_files(ids=None, entries=None) -> dict[str, bytes]:
    ids = [DEVKIT_ID[w] for w in VAL_WNIDS] if ids is None else ids
    entries = entries or [(4, "n09999999", 2)] + [(i, w, 0) for w, i in DEVKIT_ID.items()]
    return {"data/ILSVRC2012_validation_ground_truth.txt": "".join(f"{i}\n" for i in ids).encode(),
            "data/meta.mat": meta_mat(entries)}


def write_devkit_dir(where: Path, **kw) -> Path:
    kit = where / "ILSVRC2012_devkit_t12"
    for name, data in devkit_files(**kw).items():
        (kit / name).parent.mkdir(parents=True, exist_ok=True)
        (kit / name).write_bytes(data)
    return kit


def write_devkit_tar(where: Path, **kw) -> Path:
    kit = where / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(kit, "w:gz") as tar:
        for name, data in devkit_files(**kw).items():
            info = tarfile.TarInfo("ILSVRC2012_devkit_t12/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return kit


def write_csv(path: Path, rows) -> Path:
    lines = ["ImageId,PredictionString"]
    lines += [f"{image},{w} 1 2 30 28 {w} 3 4 20 20 " for image, w in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def csv_rows(n: int = len(VAL_WNIDS)):
    return [(val_name(k)[:-5], VAL_WNIDS[k - 1]) for k in range(1, n + 1)]


def colour_of(t: torch.Tensor) -> np.ndarray:
    return t.float().mean(dim=(0, 1)).numpy()


# ---------------------------------------------------------------- decoding


def test_decode_shape_and_halves(tmp_path):
    """Wider than tall: the short side becomes 256, the centre 256 columns of 341 remain."""
    img = np.zeros((30, 40, 3), np.uint8)
    img[:, :20] = (255, 0, 0)
    img[:, 20:] = (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "halves.png")
    out = decode_image(tmp_path / "halves.png")
    assert out.shape == (256, 256, 3) and out.dtype == torch.uint8 and out.is_contiguous()
    # 40x30 -> 341x256, crop from column 42: the colour edge at 170.5 lands at column 128.5.
    for col in (0, 60, 120):
        assert out[128, col].tolist() == [255, 0, 0]
    for col in (137, 200, 255):
        assert out[128, col].tolist() == [0, 0, 255]
    assert (out[:, :120] == out[:1, :120]).all()  # every row alike


def test_decode_crops_the_centre(tmp_path):
    """Thirds red|green|blue, 60x20 -> 768x256: the crop is exactly the green third, its two edges
    blending into red and blue symmetrically (an off-centre crop would break the symmetry)."""
    img = np.zeros((20, 60, 3), np.uint8)
    img[:, :20], img[:, 20:40], img[:, 40:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "thirds.png")
    out = decode_image(tmp_path / "thirds.png").int()
    assert (out[:, 12:244] == torch.tensor([0, 255, 0], dtype=torch.int32)).all()
    assert out[0, 0, 0] > 50 and out[0, 0, 2] == 0 and out[0, 255, 0] == 0
    assert out[0, 0, 0] == out[0, 255, 2] and out[0, 1, 0] == out[0, 254, 2]


def test_decode_tall_image_and_size(tmp_path):
    img = np.zeros((50, 30, 3), np.uint8)
    img[:25], img[25:] = (0, 255, 0), (255, 255, 0)
    Image.fromarray(img).save(tmp_path / "tall.png")
    out = decode_image(tmp_path / "tall.png", size=64)  # 30x50 -> 64x107, rows 21..84 kept
    assert out.shape == (64, 64, 3)
    assert out[0, 32].tolist() == [0, 255, 0] and out[63, 32].tolist() == [255, 255, 0]


@pytest.mark.parametrize("mode,colour,expected", [
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),     # CMYK JPEG, red
    ("L", 90, (90, 90, 90)),                      # greyscale
    ("RGBA", (10, 120, 240, 128), (10, 120, 240)),  # alpha dropped
    ("P", None, (0, 0, 255)),                     # palette
    ("I;16", 40000, (156, 156, 156)),             # 16-bit grey, scaled not clipped
])
def test_decode_modes_to_rgb(tmp_path, mode, colour, expected):
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    img = Image.new(mode, (40, 30), colour)
    if mode == "P":
        img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
        img.paste(1, (0, 0, 40, 30))
    img.save(tmp_path / f"x.{fmt.lower()}", format=fmt, quality=95)
    got = colour_of(decode_image(tmp_path / f"x.{fmt.lower()}"))
    assert np.abs(got - np.array(expected)).max() <= 3, got


def test_exif_orientation_is_not_applied(tmp_path):
    """The stored pixel grid, as torchvision's ImageFolder loader and decode_jpeg's default read it
    (docs/fidelity.md, Data): a tag that asks for a quarter turn changes nothing."""
    img = np.zeros((30, 40, 3), np.uint8)
    img[:, :20], img[:, 20:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(img).save(tmp_path / "tagged.jpg", quality=95, exif=exif)
    Image.fromarray(img).save(tmp_path / "plain.jpg", quality=95)
    with Image.open(tmp_path / "tagged.jpg") as check:
        assert check.getexif().get(0x0112) == 6
    tagged = decode_image(tmp_path / "tagged.jpg")
    assert torch.equal(tagged, decode_image(tmp_path / "plain.jpg"))
    assert tagged[128, 40, 0] > 200 and tagged[128, 215, 2] > 200  # red left, blue right: not turned


def test_png_named_jpeg_decodes(tmp_path):
    path = solid(tmp_path / "n01_2933.JPEG", (12, 34, 56), fmt="PNG")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert colour_of(decode_image(path)).round().tolist() == [12, 34, 56]


def test_bad_files_are_skipped_not_raised(tmp_path):
    good = solid(tmp_path / "c" / "good.jpg", (1, 2, 3))
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    whole = io.BytesIO()
    Image.fromarray(noise).save(whole, format="JPEG", quality=95)  # noise: the cut falls in scan data
    (tmp_path / "c" / "cut.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (tmp_path / "c" / "empty.jpg").write_bytes(b"")
    (tmp_path / "c" / "text.jpg").write_text("not an image")
    files = [good] + [tmp_path / "c" / n for n in ("cut.jpg", "empty.jpg", "text.jpg", "gone.jpg")]
    src = FolderSource(files, [0, 1, 0, 1, 0], ["a", "b"], "bad")
    assert src[0][0] is not None
    assert [src[i] for i in range(1, 5)] == [(None, 1), (None, 0), (None, 1), (None, 0)]
    assert [Path(p).name for p, _ in src.skipped] == ["cut.jpg", "empty.jpg", "text.jpg", "gone.jpg"]
    assert "truncated" in src.skipped[0][1] and "not found" in src.skipped[3][1]
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        decode_image(files[1])


def test_folder_source_checks():
    with pytest.raises(ValueError, match="2 files but 1 labels"):
        FolderSource(["a", "b"], [0], ["x"], "n")
    with pytest.raises(ValueError, match="labels must lie"):
        FolderSource(["a"], [3], ["x", "y"], "n")


# ---------------------------------------------------------------- image_folder


def test_image_folder_order_and_filters(tmp_path):
    solid(tmp_path / "b" / "2.JPG", (0, 0, 0))
    solid(tmp_path / "b" / "1.jpeg", (0, 0, 0))
    solid(tmp_path / "a" / "x.png", (0, 0, 0), fmt="PNG")
    solid(tmp_path / "a" / "._x.png", (0, 0, 0), fmt="PNG")  # macOS companion file: ignored
    (tmp_path / "a" / "notes.txt").write_text("skip me")
    (tmp_path / "b" / "sub").mkdir()
    (tmp_path / "b" / "sub" / "loop").symlink_to("..")  # a link back up the tree: its images once
    (tmp_path / "b" / "up").symlink_to(tmp_path)  # to the root, or into another class: not entered
    (tmp_path / "b" / "side").symlink_to(tmp_path / "a")
    src = image_folder(tmp_path, size=32)
    assert src.classes == ["a", "b"] and src.num_classes == 2
    assert [Path(f).name for f in src.files] == ["x.png", "1.jpeg", "2.JPG"]
    assert src.labels.tolist() == [0, 1, 1] and src.labels.dtype == torch.int64
    assert src.name == tmp_path.name and src[0][0].shape == (32, 32, 3)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="class folder .*empty_class has no image files"):
        image_folder(tmp_path)  # a class no image teaches: a copy not finished, most likely
    given = image_folder(tmp_path, name="f", classes=["z", "b", "a", "empty_class"])  # val: classes given
    assert given.labels.tolist() == [2, 1, 1] and given.num_classes == 4
    (tmp_path / "c").symlink_to(tmp_path / "a")  # a class folder that is another class's
    with pytest.raises(ValueError, match=r"class folders .*/a and .*/c are one folder \(a link\)"):
        image_folder(tmp_path, name="f", classes=["a", "b", "c", "empty_class"])


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "missing")
    (tmp_path / "loose.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no class subfolders"):
        image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        image_folder(tmp_path)
    solid(tmp_path / "a" / "1.jpg", (0, 0, 0))
    with pytest.raises(ValueError, match=r"folder .*a is not one of the 1 given classes"):
        image_folder(tmp_path, classes=["b"])


# ---------------------------------------------------------------- ImageNet


@pytest.fixture
def imagenet(tmp_path) -> Path:
    make_train(tmp_path)
    return tmp_path


def test_train(imagenet):
    # ILSVRC-2012 itself: a CMYK JPEG and a PNG with a .JPEG name live among the training files.
    solid(imagenet / "train" / "n00000002" / "n00000002_3.JPEG", (0, 255, 0, 0), mode="CMYK")
    solid(imagenet / "train" / "n00000002" / "n00000002_4.JPEG", (5, 6, 7), fmt="PNG")
    train = imagenet_train(imagenet, size=48)
    assert train.classes == WNIDS and train.name == "imagenet/train"
    assert train.labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2]
    images = [train[i][0] for i in range(len(train))]
    assert all(x is not None and x.shape == (48, 48, 3) for x in images) and not train.skipped
    assert np.abs(colour_of(images[4]) - (255, 0, 255)).max() <= 3


def test_train_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        imagenet_train(tmp_path)
    solid(tmp_path / "train" / "cats" / "1.jpg", (0, 0, 0))
    with pytest.raises(ValueError, match="cats is not a WordNet id.*--dataset folder"):
        imagenet_train(tmp_path)


def val_labels(root, **kw) -> list[int]:
    val = imagenet_val(root, WNIDS, size=16, **kw)
    assert val.classes == WNIDS and val.name == "imagenet/val"
    return val.labels.tolist()


def test_val_class_folders(imagenet):
    for k, w in enumerate(VAL_WNIDS, 1):
        solid(imagenet / "val" / w / val_name(k), COLOURS[w])
    write_devkit_dir(imagenet)  # class folders win over a devkit
    val = imagenet_val(imagenet, WNIDS)
    by_file = dict(zip((Path(f).name for f in val.files), val.labels.tolist()))
    assert [by_file[val_name(k)] for k in range(1, 7)] == VAL_LABELS
    image, label = val[0]
    assert np.abs(colour_of(image) - COLOURS[WNIDS[label]]).max() <= 3


def test_val_class_folders_subset(imagenet):
    solid(imagenet / "val" / "n00000003" / val_name(1), (0, 0, 0))
    assert val_labels(imagenet) == [2]  # indexes training's three classes


@pytest.mark.parametrize("where", ["root", "val", "arg"])
@pytest.mark.parametrize("writer", [write_devkit_dir, write_devkit_tar])
def test_val_devkit(imagenet, tmp_path_factory, writer, where):
    make_flat_val(imagenet)
    place = {"root": imagenet, "val": imagenet / "val", "arg": tmp_path_factory.mktemp("elsewhere")}
    kit = writer(place[where])
    assert val_labels(imagenet, devkit=kit if where == "arg" else None) == VAL_LABELS


def test_val_labels_follow_file_number_not_position(imagenet):
    make_flat_val(imagenet)
    (imagenet / "val" / val_name(3)).rename(imagenet / "val" / "ILSVRC2012_val_00000003.png")
    write_devkit_tar(imagenet)
    val = imagenet_val(imagenet, WNIDS)
    assert [Path(f).stem for f in val.files] == [val_name(k)[:-5] for k in range(1, 7)]
    assert val.labels.tolist() == VAL_LABELS
    # Six images and six lines, but numbered 1..5 and 7: by position image 7 would take line 6.
    (imagenet / "val" / val_name(6)).rename(imagenet / "val" / val_name(7))
    with pytest.raises(ValueError, match="00000007.JPEG is image 7 but .* has lines 1..6"):
        imagenet_val(imagenet, WNIDS)


@pytest.mark.parametrize("in_val", [False, True])
def test_val_kaggle_csv(imagenet, in_val):
    make_flat_val(imagenet)
    write_csv((imagenet / "val" if in_val else imagenet) / "LOC_val_solution.csv", csv_rows()[::-1])
    assert val_labels(imagenet) == VAL_LABELS


def test_kaggle_csv_found_above_its_cls_loc_folder(tmp_path):
    root = tmp_path / "imagenet-object-localization-challenge" / "ILSVRC" / "Data" / "CLS-LOC"
    make_train(root)
    make_flat_val(root)
    write_csv(tmp_path / "imagenet-object-localization-challenge" / "LOC_val_solution.csv", csv_rows())
    assert val_labels(root) == VAL_LABELS


def test_missing_ground_truth_names_the_flags(imagenet):
    make_flat_val(imagenet)
    with pytest.raises(FileNotFoundError, match="no ground truth .*--devkit .*--val-solution"):
        imagenet_val(imagenet, WNIDS)


def test_devkit_preferred_over_csv(imagenet):
    make_flat_val(imagenet)
    write_devkit_dir(imagenet)
    wrong = [(image, "n00000001") for image, _ in csv_rows()]
    write_csv(imagenet / "LOC_val_solution.csv", wrong)
    assert val_labels(imagenet) == VAL_LABELS
    assert val_labels(imagenet, solution_csv=imagenet / "LOC_val_solution.csv") == VAL_LABELS


def test_splits(imagenet):
    make_flat_val(imagenet)
    write_devkit_tar(imagenet / "val")
    train, val = imagenet_splits(imagenet, size=8)
    assert train.classes == val.classes == WNIDS
    assert val.labels.tolist() == VAL_LABELS and val[0][0].shape == (8, 8, 3)


def test_val_no_ground_truth(imagenet):
    with pytest.raises(FileNotFoundError, match="val"):
        imagenet_val(imagenet, WNIDS)
    make_flat_val(imagenet)
    with pytest.raises(FileNotFoundError, match=r"ILSVRC2012_devkit_t12.*LOC_val_solution\.csv.* in "):
        imagenet_val(imagenet, WNIDS)
    with pytest.raises(FileNotFoundError, match="devkit .*nowhere does not exist"):
        imagenet_val(imagenet, WNIDS, devkit=imagenet / "nowhere")


def test_val_unknown_wnid(imagenet):
    solid(imagenet / "val" / "n00000009" / val_name(1), (0, 0, 0))
    with pytest.raises(ValueError, match="n00000009 is an unknown wnid"):
        imagenet_val(imagenet, WNIDS)
    (imagenet / "val" / "n00000009" / val_name(1)).rename(imagenet / "val" / val_name(1))
    (imagenet / "val" / "n00000009").rmdir()
    write_csv(imagenet / "LOC_val_solution.csv", [(val_name(1)[:-5], "n00000009")])
    with pytest.raises(ValueError, match="labelled 'n00000009', an unknown wnid"):
        imagenet_val(imagenet, WNIDS)


def test_val_devkit_wnid_not_in_training(imagenet):
    make_flat_val(imagenet)
    write_devkit_dir(imagenet)
    with pytest.raises(ValueError, match="'n00000003', an unknown wnid"):
        imagenet_val(imagenet, WNIDS[:2])


@pytest.mark.parametrize("ids,match", [
    ([1, 2, 3, 3, 1], "has 5 lines but .* holds 6 images"),
    ([1, 2, 3, 3, 1, 2, 2], "has 7 lines"),
    ([1, 2, 3, 1001, 1, 2], "line 4 holds ID 1001, outside 1..1000"),
    ([1, 2, 0, 3, 1, 2], "line 3 holds ID 0"),
    ([1, 2, 3, 4, 1, 2], "line 4 holds ID 4, which is no leaf synset"),  # 4 is the non-leaf
    ([1, 2, 3, 5, 1, 2], "ID 5, which is no leaf synset"),
])
def test_val_bad_ground_truth(imagenet, ids, match):
    make_flat_val(imagenet)
    write_devkit_tar(imagenet, ids=ids)
    with pytest.raises(ValueError, match=match):
        imagenet_val(imagenet, WNIDS)


def test_val_bad_devkit(imagenet, tmp_path_factory):
    make_flat_val(imagenet)
    kit = write_devkit_dir(tmp_path_factory.mktemp("kit"))
    (kit / "data" / "meta.mat").unlink()
    with pytest.raises(FileNotFoundError, match="lacks .*meta.mat"):
        imagenet_val(imagenet, WNIDS, devkit=kit)
    (kit.parent / "bad.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="not a readable tar"):
        imagenet_val(imagenet, WNIDS, devkit=kit.parent / "bad.tar.gz")
    kit = write_devkit_dir(tmp_path_factory.mktemp("kit"), entries=[(1, "n00000003", 0), (1, "n00000001", 0)])
    with pytest.raises(ValueError, match="ID 1 to two leaf synsets"):
        imagenet_val(imagenet, WNIDS, devkit=kit)


def test_val_csv_mismatches(imagenet):
    make_flat_val(imagenet, n=5)
    table = write_csv(imagenet / "LOC_val_solution.csv", csv_rows(6))
    with pytest.raises(ValueError, match="row for ILSVRC2012_val_00000006 but val/ has no such image"):
        imagenet_val(imagenet, WNIDS)
    write_csv(table, csv_rows(4))
    with pytest.raises(ValueError, match="ILSVRC2012_val_00000005.JPEG has no row"):
        imagenet_val(imagenet, WNIDS)
    table.write_text("ImageId,Label\nILSVRC2012_val_00000001,n00000001\n")
    with pytest.raises(ValueError, match="lacks the header"):
        imagenet_val(imagenet, WNIDS)


def test_val_flat_layout_errors(imagenet):
    make_flat_val(imagenet)
    write_devkit_dir(imagenet)
    solid(imagenet / "val" / "n00000001" / val_name(7), (0, 0, 0))
    with pytest.raises(ValueError, match="both class folders and 6 loose images"):
        imagenet_val(imagenet, WNIDS)
    (imagenet / "val" / "n00000001" / val_name(7)).rename(imagenet / "val" / "holiday.jpg")
    (imagenet / "val" / "n00000001").rmdir()
    with pytest.raises(ValueError, match="holiday.jpg is not named ILSVRC2012_val_"):
        imagenet_val(imagenet, WNIDS)
    (imagenet / "val" / "holiday.jpg").rename(imagenet / "val" / "ILSVRC2012_val_00000001.png")
    with pytest.raises(ValueError, match="are both validation image 1"):
        imagenet_val(imagenet, WNIDS)
