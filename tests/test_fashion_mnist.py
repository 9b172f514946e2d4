"""The IDX reader and where Fashion-MNIST is looked for."""

import gzip
import struct

import numpy as np
import pytest
import torch

import repro.data.fashion_mnist as fm


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_tree(root, n_train=12, n_test=5, gz=True):
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, gz)
    return raw


@pytest.mark.parametrize("gz", [True, False])
def test_reads_torchvision_layout(tmp_path, gz):
    make_tree(tmp_path, gz=gz)
    train, test = fm.fashion_mnist(tmp_path, "train", download=False), fm.fashion_mnist(tmp_path, "test", download=False)
    assert train.images.shape == (12, 28, 28, 1) and train.images.dtype == torch.uint8
    assert test.labels.tolist() == [0, 1, 2, 3, 4] and train.classes[9] == "Ankle boot"
    assert train.name == "fashion-mnist/train"
    inner = fm.fashion_mnist(tmp_path / "FashionMNIST", "test", download=False)  # --data naming torchvision's folder
    assert inner.origin == str(tmp_path / "FashionMNIST" / "raw") and len(inner) == 5


def test_bad_files_are_clear_errors(tmp_path):
    raw = make_tree(tmp_path, gz=False)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 12, 28, 28) + b"\x00" * 10)
    with pytest.raises(ValueError, match="truncated"):
        fm.fashion_mnist(tmp_path, "train", download=False)
    (raw / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        fm.fashion_mnist(tmp_path, "train", download=False)
    (raw / "train-images-idx3-ubyte").unlink()
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((12, 28, 28)), gz=True)
    whole = (raw / "train-images-idx3-ubyte.gz").read_bytes()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(whole[: len(whole) // 2])  # a cut-off download
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz is damaged .*fetch the file again"):
        fm.fashion_mnist(tmp_path, "train", download=False)


def test_missing_data_names_every_option(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        fm.fashion_mnist(tmp_path / "empty", "train", download=False)
    msg = str(err.value)
    assert "--data DIR" in msg and "apt-get install dataset-fashion-mnist" in msg and "download" in msg


def test_a_fallback_from_the_given_folder_is_said_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", make_tree(tmp_path / "debian"))
    src = fm.fashion_mnist(tmp_path / "typo", "train", download=False)
    assert len(src) == 12 and "NOT the given" in src.origin and "does not exist" in src.origin
    assert not (tmp_path / "typo").exists()
    from repro.data.stats import default_cache_dirs

    assert tmp_path / "typo" not in default_cache_dirs(str(tmp_path / "typo"), tmp_path / "run")  # no cache there
    (tmp_path / "a-file").write_text("")
    assert "which is a file, not a folder" in fm.fashion_mnist(tmp_path / "a-file", "train", download=False).origin
    mine = fm.fashion_mnist(tmp_path / "debian", "train", download=False)
    assert "NOT" not in mine.origin
