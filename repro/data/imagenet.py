"""ILSVRC-2012 as it lies on disk (train/<wnid>/, val/ flat or in folders), read into FolderSources.

Training classes are the sorted wnids of train/ (ImageFolder's order), and validation labels always
index that same list, whichever of the three usual val/ layouts is found:

  1. class folders  val/<wnid>/*.JPEG (what the common reorganisation scripts produce);
  2. flat           val/ILSVRC2012_val_00000001.JPEG ... labelled by the devkit
                    (data/ILSVRC2012_validation_ground_truth.txt + data/meta.mat), as a folder
                    ILSVRC2012_devkit_t12/ or the tarball ILSVRC2012_devkit_t12.tar.gz;
  3. flat           labelled by Kaggle's LOC_val_solution.csv.

Preferred in that order when several are present. Val class folders may be a subset of the training
classes (labels still index training's list), never a superset. Any input that would produce a
wrong label or a wrong image count raises, naming the file at fault.
"""

from __future__ import annotations

import csv
import io
import re
import tarfile
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.io

from repro.data.folder import IMAGE_EXTENSIONS, FolderSource, class_folders, image_folder

WNID = re.compile(r"n\d{8}")
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})")  # matched against the file name's stem
DEVKIT_NAMES = ("ILSVRC2012_devkit_t12", "ILSVRC2012_devkit_t12.tar.gz")
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
SOLUTION_CSV = "LOC_val_solution.csv"
NUM_IDS = 1000  # ILSVRC2012_IDs of the leaf synsets run 1..1000


def imagenet_train(root: str | Path, size: int = 256) -> FolderSource:
    """root/train/<wnid>/*.JPEG, labelled by sorted wnid."""
    train = Path(root) / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{train} not found: --data must name ImageNet's root, the folder holding "
                                f"train/<wnid>/*.JPEG and val/")
    not_wnid = [f for f in class_folders(train) if not WNID.fullmatch(f)]
    if not_wnid:
        raise ValueError(f"folder {train / not_wnid[0]} is not a WordNet id (n + 8 digits): this "
                         f"does not look like ImageNet's train/; for any other class-folder tree "
                         f"use --dataset folder (training and prepare_imagenet.py both take it)")
    return image_folder(train, name="imagenet/train", size=size)


def imagenet_val(root: str | Path, classes: Sequence[str], size: int = 256,
                 devkit: str | Path | None = None,
                 solution_csv: str | Path | None = None) -> FolderSource:
    """root/val in any of the three layouts, labelled by index into `classes` (training's sorted
    wnids). `devkit` and `solution_csv` override the search in root/ and root/val/."""
    root = Path(root)
    val = root / "val"
    if not val.is_dir():
        raise FileNotFoundError(f"{val} not found: --data must name ImageNet's root, the folder holding "
                                f"train/ and val/")
    classes = list(classes)
    index = {w: i for i, w in enumerate(classes)}
    folders = [f for f in class_folders(val) if WNID.fullmatch(f)]
    loose = _loose_images(val)
    if folders:
        return _val_from_folders(val, folders, loose, classes, size)
    if not loose:
        raise ValueError(f"{val} holds neither <wnid> class folders nor ILSVRC2012_val_*.JPEG images")
    numbered = _numbered(loose)
    kit = _find(devkit, [d / n for d in (root, val) for n in DEVKIT_NAMES], "devkit")
    if kit is not None:
        wnids = _devkit_wnids(kit, numbered)
    else:
        # Kaggle's download keeps the CSV three levels above its ILSVRC/Data/CLS-LOC/{train,val}
        near = [root, val] + list(root.resolve().parents)[:3]
        table = _find(solution_csv, [d / SOLUTION_CSV for d in near], "solution_csv")
        if table is None:
            raise FileNotFoundError(_no_ground_truth(root, val))
        wnids = _csv_wnids(table, numbered)
    labels = [_label(index, w, f) for w, (_, f) in zip(wnids, numbered)]
    return FolderSource([f for _, f in numbered], labels, classes, "imagenet/val", size)


def imagenet_splits(root: str | Path, size: int = 256, devkit: str | Path | None = None,
                    solution_csv: str | Path | None = None) -> tuple[FolderSource, FolderSource]:
    """Train and val of one ImageNet root, sharing train's class index."""
    train = imagenet_train(root, size)
    return train, imagenet_val(root, train.classes, size, devkit, solution_csv)


# ---------------------------------------------------------------- layout 1: class folders


def _val_from_folders(val: Path, folders: list[str], loose: list[Path], classes: list[str],
                      size: int) -> FolderSource:
    if loose:
        raise ValueError(f"{val} holds both class folders and {len(loose)} loose images such as "
                         f"{loose[0]}: did a script that moves val images into folders stop half-way?")
    unknown = [f for f in folders if f not in set(classes)]
    if unknown:
        raise ValueError(f"val class folder {val / unknown[0]} is an unknown wnid: not among the "
                         f"{len(classes)} training classes ({len(unknown)} such folders)")
    return image_folder(val, name="imagenet/val", size=size, classes=classes)


# ---------------------------------------------------------------- flat val/


def _loose_images(val: Path) -> list[Path]:
    return sorted(p for p in val.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.lower().endswith(IMAGE_EXTENSIONS))


def _numbered(files: list[Path]) -> list[tuple[int, Path]]:
    """(k, file) sorted by k, the image number in ILSVRC2012_val_%08d: the number, not the sort
    position, is what the ground truth's line k refers to."""
    out, seen = [], {}
    for f in files:
        m = VAL_FILE.fullmatch(f.stem)
        if m is None:
            raise ValueError(f"{f} is not named ILSVRC2012_val_<8 digits>.JPEG, so its ground-truth "
                             f"line is unknown; move it out of val/")
        k = int(m.group(1))
        if k in seen:
            raise ValueError(f"{f} and {seen[k]} are both validation image {k}; keep one")
        seen[k] = f
        out.append((k, f))
    return sorted(out)


def _find(given: str | Path | None, candidates: list[Path], what: str) -> Path | None:
    if given is not None:
        if not Path(given).exists():
            raise FileNotFoundError(f"{what} {given} does not exist")
        return Path(given)
    return next((c for c in candidates if c.exists()), None)


def _no_ground_truth(root: Path, val: Path) -> str:
    kits = " or ".join(DEVKIT_NAMES)
    return (f"{val} is flat (ILSVRC2012_val_*.JPEG) but no ground truth was found: looked for the "
            f"devkit ({kits}) in {root} and {val}, and for Kaggle's {SOLUTION_CSV} there and in the three "
            f"folders above {root}. Put one there, pass --devkit DIR_OR_TARBALL or --val-solution CSV "
            f"(devkit= or solution_csv= from Python), or sort val/ into <wnid> class folders")


def _label(index: dict[str, int], wnid: str, file: Path) -> int:
    if wnid not in index:
        raise ValueError(f"{file} is labelled {wnid!r}, an unknown wnid: not among the {len(index)} "
                         f"training classes; are train/ and the ground truth from the same release?")
    return index[wnid]


# ---------------------------------------------------------------- layout 2: devkit


def _read_devkit(kit: Path) -> tuple[bytes, bytes]:
    """(ground-truth text, meta.mat) from a devkit folder or tarball, the tar never unpacked."""
    if kit.is_dir():
        base = kit / DEVKIT_NAMES[0] if not (kit / "data").is_dir() else kit
        missing = [base / m for m in (GROUND_TRUTH, META) if not (base / m).is_file()]
        if missing:
            raise FileNotFoundError(f"devkit {kit} lacks {missing[0]}; pass the ILSVRC2012_devkit_t12 "
                                    f"folder or its .tar.gz")
        return (base / GROUND_TRUTH).read_bytes(), (base / META).read_bytes()
    try:
        with tarfile.open(kit, "r:*") as tar:
            return tuple(_tar_member(tar, kit, m) for m in (GROUND_TRUTH, META))
    except tarfile.TarError as e:
        raise ValueError(f"devkit {kit} is not a readable tar archive ({e})") from e


def _tar_member(tar: tarfile.TarFile, kit: Path, member: str) -> bytes:
    for info in tar.getmembers():
        if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
            return tar.extractfile(info).read()
    raise FileNotFoundError(f"devkit {kit} has no member */{member}; is it ILSVRC2012_devkit_t12?")


def _leaf_wnids(meta: bytes, kit: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid for the leaf synsets (num_children == 0) of meta.mat's 'synsets'.
    The IDs follow the devkit's own order, not sorted wnids: they are mapped, never used as labels."""
    try:
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    except Exception as e:  # scipy raises several types for a damaged file
        raise ValueError(f"{kit}: cannot read {META} as a MATLAB file with 'synsets' ({e})") from e
    fields = synsets.dtype.names or ()
    needed = [f for f in ("ILSVRC2012_ID", "WNID", "num_children") if f not in fields]
    if needed:
        raise ValueError(f"{kit}: {META} 'synsets' lacks the field {needed[0]}")
    ids, wnids, children = (np.atleast_1d(synsets[f]) for f in ("ILSVRC2012_ID", "WNID", "num_children"))
    leaves: dict[int, str] = {}
    for i, w, n in zip(ids, wnids, children):
        if int(n) == 0:
            if int(i) in leaves:
                raise ValueError(f"{kit}: {META} gives ILSVRC2012_ID {int(i)} to two leaf synsets")
            leaves[int(i)] = str(w)
    return leaves


def _ground_truth_ids(text: bytes, kit: Path) -> list[int]:
    lines = text.decode("ascii", errors="replace").strip().splitlines()
    ids = []
    for n, line in enumerate(lines, 1):
        try:
            ids.append(int(line))
        except ValueError:
            raise ValueError(f"{kit}: {GROUND_TRUTH} line {n} is {line!r}, not an ILSVRC2012_ID") from None
        if not 1 <= ids[-1] <= NUM_IDS:
            raise ValueError(f"{kit}: {GROUND_TRUTH} line {n} holds ID {ids[-1]}, outside 1..{NUM_IDS}")
    return ids


def _devkit_wnids(kit: Path, numbered: list[tuple[int, Path]]) -> list[str]:
    """The wnid of each (k, file): line k of the ground truth, through meta.mat."""
    truth, meta = _read_devkit(kit)
    ids, leaves = _ground_truth_ids(truth, kit), _leaf_wnids(meta, kit)
    if len(ids) != len(numbered):
        raise ValueError(f"{kit}: {GROUND_TRUTH} has {len(ids)} lines but {numbered[0][1].parent} "
                         f"holds {len(numbered)} images; is val/ complete?")
    out = []
    for k, f in numbered:
        if k > len(ids) or k < 1:
            raise ValueError(f"{f} is image {k} but {GROUND_TRUTH} has lines 1..{len(ids)}")
        if ids[k - 1] not in leaves:
            raise ValueError(f"{kit}: {GROUND_TRUTH} line {k} holds ID {ids[k - 1]}, which is no "
                             f"leaf synset of {META}")
        out.append(leaves[ids[k - 1]])
    return out


# ---------------------------------------------------------------- layout 3: Kaggle CSV


def _read_solution(table: Path) -> dict[str, str]:
    """ImageId -> wnid, the first token of PredictionString (a wnid and its boxes, repeated)."""
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{table} lacks the header ImageId,PredictionString; is it Kaggle's "
                             f"{SOLUTION_CSV}?")
        out: dict[str, str] = {}
        for n, row in enumerate(reader, 2):
            image, tokens = (row["ImageId"] or "").strip(), (row["PredictionString"] or "").split()
            if not image or not tokens:
                raise ValueError(f"{table} line {n}: empty ImageId or PredictionString")
            if image in out:
                raise ValueError(f"{table} line {n}: a second row for {image}")
            out[image] = tokens[0]
    return out


def _csv_wnids(table: Path, numbered: list[tuple[int, Path]]) -> list[str]:
    """The wnid of each (k, file), by the file's stem; each row must match exactly one image."""
    rows = _read_solution(table)
    stems = {f.stem for _, f in numbered}
    absent = sorted(set(rows) - stems)
    if absent:
        raise ValueError(f"{table} has a row for {absent[0]} but val/ has no such image "
                         f"({len(absent)} rows without images); is val/ complete?")
    unlabelled = [f for _, f in numbered if f.stem not in rows]
    if unlabelled:
        raise ValueError(f"{unlabelled[0]} has no row in {table} ({len(unlabelled)} such images)")
    return [rows[f.stem] for _, f in numbered]
