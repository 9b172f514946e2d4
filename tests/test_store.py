"""Tests for repro.data.store and scripts/prepare_imagenet.py: the stored 256x256 form (paper section 2).

One small fake ImageNet (three wnids, textured training images of several sizes, a truncated and an
empty file among them, flat val/ with a devkit) is written once with a pool of two workers; the other
tests read it or write their own copies in-process.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from repro.data.folder import decode_image
from repro.data.imagenet import imagenet_splits
from repro.data import store as store_module
from repro.data.store import LOCK, STORE_MARKER, StoreSource, WorkerDiedError, is_store, write_store
from scripts import prepare_imagenet
from tests.test_data_folder_imagenet import VAL_LABELS, WNIDS, make_flat_val, write_devkit_dir

SIZES = [(300, 200), (180, 400), (256, 256)]  # (width, height): wide, tall, already square
BAD = ["n00000001/n00000001_bad_cut.JPEG", "n00000002/n00000002_bad_empty.JPEG"]


def textured(path: Path, seed: int, size) -> None:
    """Smooth gradients and stripes: texture that JPEG keeps well, unlike noise."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    rgb = [127 + 100 * np.sin(x / (17 + 5 * c) + y / (29 - 4 * c) + phase[c]) for c in range(3)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.stack(rgb, -1).clip(0, 255).astype(np.uint8)).save(path, quality=95)


def make_tree(root: Path) -> None:
    """8 good training images (3, 3, 2 per class), 2 bad ones, and flat val/ with a devkit."""
    for c, w in enumerate(WNIDS):
        for j in range(3 if c < 2 else 2):
            textured(root / "train" / w / f"{w}_{j}.JPEG", 10 * c + j, SIZES[(c + j) % 3])
    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(whole, "JPEG")
    (root / "train" / BAD[0]).write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "train" / BAD[1]).write_bytes(b"")
    make_flat_val(root)
    write_devkit_dir(root)


def splits_of(root: Path) -> dict:
    train, val = imagenet_splits(root)
    return {"train": train, "val": val}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_tree(root)
    return root


@pytest.fixture(scope="module")
def store(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store")
    lines = []
    result = write_store(splits_of(tree), out, shard_size=3, workers=2, progress=lines.append)
    assert result["complete"] and result["shards_written"] == 4 + 2
    assert len(lines) == 6 and "train: shard 4/4  10/10 images" in lines[3] and "img/s" in lines[3]
    return out


def test_layout_and_marker(store):
    assert is_store(store) and not is_store(store / "train")
    marker = json.loads((store / STORE_MARKER).read_text())
    assert marker["format"] == "repro-store/1" and marker["classes"] == WNIDS
    assert marker["size"] == 256 and marker["quality"] == 90
    entry = dict(shards=4, shard_size=3)
    assert marker["splits"]["train"] == dict(entry, name="imagenet/train", images=8, skipped=2)
    assert marker["splits"]["val"] == dict(entry, name="imagenet/val", images=6, shards=2, skipped=0)
    assert sorted(p.name for p in (store / "val").iterdir()) == [
        "shard-00000.bin", "shard-00000.idx.npz", "shard-00001.bin", "shard-00001.idx.npz", "skipped.txt"]
    skipped = [line.split("\t") for line in (store / "train" / "skipped.txt").read_text().splitlines()]
    assert [name for name, _ in skipped] == BAD
    assert "truncated" in skipped[0][1] and skipped[1][1]
    assert (store / "val" / "skipped.txt").read_text() == ""


def test_items_match_source(store, tree):
    source = splits_of(tree)["train"]
    good = [i for i, f in enumerate(source.files) if "_bad_" not in f]
    train = StoreSource(store, "train", classes=WNIDS)
    assert (train.name, train.classes, train.num_classes, train.size, len(train)) == (
        "imagenet/train", WNIDS, 3, 256, 8)
    assert train.encoded and not train.in_memory
    assert train.labels.dtype == torch.int64 and train.labels.tolist() == source.labels[good].tolist()
    assert train.files == [f"{w}/{w}_{j}.JPEG" for c, w in enumerate(WNIDS) for j in range(3 if c < 2 else 2)]
    for i, s in enumerate(good):
        image, label = train[i]
        assert image.shape == (256, 256, 3) and image.dtype == torch.uint8 and image.is_contiguous()
        diff = (image.float() - decode_image(source.files[s]).float()).abs().mean()
        assert diff < 3 and label == int(source.labels[s])  # JPEG quality 90 re-encoding


def test_val_labels(store, tree):
    val = StoreSource(store, "val")
    assert val.labels.tolist() == VAL_LABELS == splits_of(tree)["val"].labels.tolist()
    assert val.files[0] == "ILSVRC2012_val_00000001.JPEG" and val.name == "imagenet/val"


def test_encoded_batch_round_trip(store):
    train = StoreSource(store, "train")
    data = train.encoded_batch(torch.tensor([7, 0, 3]))
    assert all(d.dtype == torch.uint8 and d.dim() == 1 and d[:2].tolist() == [0xFF, 0xD8] for d in data)
    assert torch.equal(data[1], train.encoded_item(0))
    for d, i in zip(decode_jpeg(data, mode=ImageReadMode.RGB), [7, 0, 3]):
        assert torch.equal(d.permute(1, 2, 0), train[i][0])


def test_content_probe_is_the_stored_sizes(store):
    train = StoreSource(store, "train")  # the statistics cache's key changes when these do
    sizes = [len(train.encoded_item(i)) for i in range(0, len(train), 3)]
    assert np.frombuffer(train.content_probe(3), dtype=np.int64).tolist() == sizes


def index_arrays(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def assert_same_store(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        if f.suffix == ".npz":  # zip members carry timestamps: compare the arrays
            x, y = index_arrays(a / f), index_arrays(b / f)
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), f
        else:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_resume_gives_the_same_store(store, tree, tmp_path):
    out, lines = tmp_path / "resumed", []
    first = write_store(splits_of(tree), out, shard_size=3, workers=0, max_shards=1, progress=lines.append)
    assert not first["complete"] and first["shards_written"] == 1 and "run again" in lines[-1]
    assert not is_store(out)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-00000.bin", "shard-00000.idx.npz"]
    with pytest.raises(FileNotFoundError, match="interrupted; run scripts/prepare_imagenet.py again"):
        StoreSource(out, "train")
    kept = [(out / "train" / n).stat() for n in ("shard-00000.bin", "shard-00000.idx.npz")]
    (out / "train" / "shard-00001.bin.tmp").write_bytes(b"half a shard from a crash")
    (out / "train" / "shard-00001.idx.npz.tmp").write_bytes(b"")
    second = write_store(splits_of(tree), out, shard_size=3, workers=0, progress=lines.append)
    assert second["complete"] and second["shards_written"] == 5
    after = [(out / "train" / n).stat() for n in ("shard-00000.bin", "shard-00000.idx.npz")]
    assert [(s.st_ino, s.st_mtime_ns) for s in after] == [(s.st_ino, s.st_mtime_ns) for s in kept]
    assert_same_store(out, store)  # also: no .tmp files left behind
    third = write_store(splits_of(tree), out, shard_size=3, workers=0, progress=lines.append)
    assert third["complete"] and third["shards_written"] == 0


def test_write_errors(store, tree, tmp_path):
    splits = splits_of(tree)
    for source in splits.values():
        source.classes = ["n00000009"] + WNIDS[1:]
    with pytest.raises(ValueError, match="already a store of 3 other classes"):
        write_store(splits, store, workers=0)
    copy = shutil.copytree(store, tmp_path / "copy")
    (copy / STORE_MARKER).unlink()
    with pytest.raises(ValueError, match="other images than shard 0"):  # shard_size changed mid-way
        write_store(splits_of(tree), copy, shard_size=4, workers=0)
    with pytest.raises(ValueError, match="quality 90, not 80"):
        write_store(splits_of(tree), store, quality=80, workers=0)


def test_a_reused_shard_must_carry_the_labels_the_dataset_gives_now(store, tree, tmp_path):
    copy = shutil.copytree(store, tmp_path / "copy")
    splits = splits_of(tree)
    splits["val"].labels = (splits["val"].labels + 1) % 3  # a corrected ground truth, say
    with pytest.raises(ValueError, match="shard-00000.idx.npz labels 3 of its 3 images otherwise"):
        write_store(splits, copy, shard_size=3, workers=0)


def test_a_damaged_shard_index_is_rewritten_and_named_when_read(store, tree, tmp_path):
    copy = shutil.copytree(store, tmp_path / "copy")
    index = copy / "train" / "shard-00001.idx.npz"
    index.write_bytes(index.read_bytes()[:100])
    with pytest.raises(ValueError, match="shard-00001.idx.npz is damaged .*prepare_imagenet.py again"):
        StoreSource(copy, "train")
    result = write_store(splits_of(tree), copy, shard_size=3, workers=0, progress=lambda _m: None)
    assert result["shards_written"] == 1
    assert_same_store(copy, store)


def test_an_unfinished_store_is_named_as_one_by_the_dataset_openers(store, tmp_path):
    from repro.config import DataConfig
    from repro.data.datasets import open_eval_split, open_splits

    copy = shutil.copytree(store, tmp_path / "copy")
    (copy / STORE_MARKER).unlink()
    for dataset in ("imagenet", "folder"):
        cfg = DataConfig(dataset=dataset, root=str(copy))
        with pytest.raises(FileNotFoundError, match="unfinished store .*prepare_imagenet.py again"):
            open_splits(cfg)
        with pytest.raises(FileNotFoundError, match="unfinished store"):
            open_eval_split(cfg, WNIDS)


def test_skip_reasons_name_files_as_the_store_does(store):
    reasons = (store / "train" / "skipped.txt").read_text()
    assert str(store.parent) not in reasons and "imagenet" not in reasons.split("\t", 1)[-1]
    assert sorted(line.split("\t")[0] for line in reasons.splitlines()) == BAD


def test_read_errors(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an image store .*prepare_imagenet.py"):
        StoreSource(tmp_path, "train")
    with pytest.raises(ValueError, match="no split 'test' .*train, val"):
        StoreSource(store, "test")
    with pytest.raises(ValueError, match="has 3 classes .* not the 2 given"):
        StoreSource(store, "train", classes=WNIDS[:2])
    copy = shutil.copytree(store, tmp_path / "copy")
    (copy / "val" / "shard-00001.idx.npz").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete store: .*shard-00001.idx.npz is missing"):
        StoreSource(copy, "val")


def test_dataloader_workers(store):
    train = StoreSource(store, "train")
    expected = torch.stack([train[i][0] for i in range(len(train))])  # maps shards in this process
    assert pickle.loads(pickle.dumps(train))._maps == {}
    loader = DataLoader(train, batch_size=3, num_workers=2)
    batches = list(loader)
    assert torch.equal(torch.cat([b[0] for b in batches]), expected)
    assert torch.cat([b[1] for b in batches]).tolist() == train.labels.tolist()


def test_script(tree, tmp_path, capsys):
    assert prepare_imagenet.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data ") and "nowhere is not a folder" in err
    assert prepare_imagenet.main(["--data", str(tree), "--out", str(tree / "store")]) == 2
    assert "lies inside --data" in capsys.readouterr().err and not (tree / "store").exists()
    (tmp_path / "file").write_text("")
    assert prepare_imagenet.main(["--data", str(tree), "--out", str(tmp_path / "file" / "s")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    out = tmp_path / "s"
    args = ["--data", str(tree), "--out", str(out), "--shard-size", "5", "--workers", "0", "--splits", "val"]
    assert prepare_imagenet.main(args) == 0
    assert "val: 6 images in 2 shards, 0 unreadable" in capsys.readouterr().out
    assert json.loads((out / STORE_MARKER).read_text())["splits"].keys() == {"val"}
    assert len(StoreSource(out, "val")) == 6


def test_script_converts_any_class_folder_tree(tmp_path, capsys):
    from PIL import Image

    for split, n in (("train", 3), ("val", 2)):
        for c, cls in enumerate(("dog", "cat")):
            (tmp_path / "t" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (70, 50), (30 * i, 90 * c, 9)).save(tmp_path / "t" / split / cls / f"{i}.jpg")
    args = ["--data", str(tmp_path / "t"), "--out", str(tmp_path / "s"), "--workers", "0"]
    assert prepare_imagenet.main(args) == 2  # ImageNet's layout expected by default
    assert "is not a WordNet id" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert prepare_imagenet.main(args + ["--dataset", "folder"]) == 0
    train, val = StoreSource(tmp_path / "s", "train"), StoreSource(tmp_path / "s", "val", classes=["cat", "dog"])
    assert train.classes == ["cat", "dog"] and len(train) == 6 and len(val) == 4
    assert sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1] and sorted(val.labels.tolist()) == [0, 0, 1, 1]


def test_training_and_evaluation_read_the_store(store, tmp_path):
    """--dataset imagenet --data STORE trains and evaluates from the stored 256x256 form."""
    from repro.config import DataConfig, ModelConfig, TrainConfig
    from repro.eval_job import EvalOptions, run_evaluation
    from repro.train import train

    cfg = TrainConfig(model=ModelConfig(num_classes=3, image_size=227),
                      data=DataConfig(dataset="imagenet", root=str(store), workers=0),
                      batch_size=2, max_steps=1, out=str(tmp_path / "run"), final_crops=(), device="cpu")
    train(cfg)
    rows = run_evaluation(EvalOptions(checkpoints=[str(tmp_path / "run" / "latest.pt")], crops=(1,), workers=0,
                                      figures=False, device="cpu", out=str(tmp_path / "eval")))
    assert rows[0].images == len(StoreSource(store, "val")) and rows[0].dataset == "imagenet"


def test_skipped_names_that_are_not_utf8_or_hold_tabs(tree, tmp_path):
    """skipped.txt is UTF-8 with one name per line whatever the file names' bytes."""
    root = shutil.copytree(tree, tmp_path / "odd", symlinks=True)
    klass = os.fsencode(root / "train" / WNIDS[0])
    for raw in (b"bad\xe9.JPEG", b"ta\tb.JPEG"):
        with open(os.path.join(klass, raw), "wb") as f:
            f.write(b"not an image")
    out = tmp_path / "s"
    result = write_store(splits_of(root), out, shard_size=4, workers=0, progress=lambda _m: None)
    assert result["complete"] and result["splits"]["train"]["skipped"] == 4
    lines = (out / "train" / "skipped.txt").read_text(encoding="utf-8").splitlines()
    names = sorted(line.split("\t")[0] for line in lines)
    assert len(lines) == 4 and f"{WNIDS[0]}/bad\\udce9.JPEG" in names and f"{WNIDS[0]}/ta\\tb.JPEG" in names


def _encode_or_die(job):
    """_encode, except that a file named die.JPEG kills its worker (as the kernel's OOM killer would)."""
    if job[0].endswith("die.JPEG"):
        os._exit(1)
    return _ENCODE(job)


_ENCODE = store_module._encode


def test_a_dead_worker_is_an_error_not_a_hang(tree, tmp_path, monkeypatch):
    root = shutil.copytree(tree, tmp_path / "t", symlinks=True)
    textured(root / "train" / WNIDS[1] / "die.JPEG", 0, (64, 64))
    monkeypatch.setattr(store_module, "_encode", _encode_or_die)
    with pytest.raises(WorkerDiedError, match="encoding process died.*run the same command again"):
        write_store(splits_of(root), tmp_path / "s", shard_size=3, workers=2, progress=lambda _m: None)


def test_one_writer_at_a_time(tree, tmp_path):
    import fcntl

    out = tmp_path / "s"
    out.mkdir()
    with open(out / LOCK, "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run, writing now
        with pytest.raises(ValueError, match="another scripts/prepare_imagenet.py run is writing"):
            write_store(splits_of(tree), out, shard_size=3, workers=0)
    assert write_store(splits_of(tree), out, shard_size=3, workers=0, progress=lambda _m: None)["complete"]


def test_open_shards_are_bounded(store, monkeypatch):
    """Each mapped shard holds a file descriptor: a store of many small shards must not exhaust them."""
    train = StoreSource(store, "train")
    expected = [train.encoded_item(i) for i in range(len(train))]
    monkeypatch.setattr(StoreSource, "max_open_shards", 2)
    bounded = StoreSource(store, "train")
    for i in [*range(len(train)), *reversed(range(len(train)))]:
        assert torch.equal(bounded.encoded_item(i), expected[i]) and len(bounded._maps) <= 2


def test_a_damaged_marker_is_named(store, tmp_path):
    copy = shutil.copytree(store, tmp_path / "copy")
    (copy / STORE_MARKER).write_text("{ not json")
    with pytest.raises(ValueError, match="repro-store.json is damaged .*prepare_imagenet.py again"):
        StoreSource(copy, "train")
