"""Mean image and RGB covariance against NumPy, and their cache."""

import numpy as np
import pytest
import torch

from repro.data.folder import FolderSource
from repro.data.stats import accumulate, cached_stats, fingerprint
from repro.data.tensor_source import TensorSource


def test_mean_and_covariance_match_numpy():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 16, 16, 3), dtype=torch.uint8, generator=g)
    images[..., 1] = (images[..., 0] // 2 + images[..., 1] // 2)  # correlated channels
    stats = accumulate([images[:3], images[3:]], base_size=16)
    x = images.numpy().astype(np.float64)
    np.testing.assert_allclose(stats.mean_image.numpy(), x.mean(0), rtol=1e-6)
    cov = np.cov((x / 255).reshape(-1, 3).T, bias=True)
    vals, vecs = np.linalg.eigh(cov)
    np.testing.assert_allclose(stats.eigvals.numpy(), vals[::-1], rtol=1e-9)
    for i in range(3):  # eigenvectors up to sign
        assert abs(abs(np.dot(stats.eigvecs[:, i].numpy(), vecs[:, 2 - i])) - 1) < 1e-9
    assert stats.images == 7


def test_grey_images_give_a_single_grey_axis():
    images = torch.randint(0, 256, (4, 8, 8, 1), dtype=torch.uint8)
    stats = accumulate([images], base_size=8)
    v = images.double().numpy() / 255
    assert abs(stats.eigvals[0].item() - 3 * v.var()) < 1e-9 and stats.eigvals[1:].abs().max() < 1e-12
    assert torch.allclose(stats.eigvecs[:, 0].abs(), torch.full((3,), 3 ** -0.5, dtype=torch.float64))
    assert torch.allclose(stats.mean_image[..., 0], stats.mean_image[..., 2])


def toy_source(n: int):
    """A tiny split, and a batches() that counts how often the statistics were computed."""
    src = TensorSource(torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8), torch.zeros(n, dtype=torch.long),
                       ["a"], "toy/train")
    calls = []

    def batches():
        calls.append(1)
        return [src.images]

    return src, batches, calls


def test_cache_is_reused_and_keyed(tmp_path):
    src, batches, calls = toy_source(6)
    quiet = lambda _msg: None  # noqa: E731
    first = cached_stats(src, 8, batches, [tmp_path / "ro", tmp_path], log=quiet)
    again = cached_stats(src, 8, batches, [tmp_path / "ro", tmp_path], log=quiet)
    assert len(calls) == 1 and torch.equal(first.mean_image, again.mean_image)
    other = TensorSource(src.images, torch.zeros(6, dtype=torch.long), ["a"], "toy/other")
    cached_stats(other, 8, batches, [tmp_path], log=quiet)
    assert len(calls) == 2  # another split: another key
    cached_stats(src, 8, batches, [tmp_path], max_images=4, subset_seed=0, log=quiet)
    cached_stats(src, 8, batches, [tmp_path], max_images=4, subset_seed=0, log=quiet)
    assert len(calls) == 3  # a random subset of 4: its own entry, reused with the same seed
    cached_stats(src, 8, batches, [tmp_path], max_images=4, subset_seed=1, log=quiet)
    assert len(calls) == 4  # another seed draws other images: not the same statistics
    cached_stats(src, 8, batches, [tmp_path], max_images=6, subset_seed=1, log=quiet)
    cached_stats(src, 8, batches, [tmp_path], max_images=6, subset_seed=2, log=quiet)
    assert len(calls) == 5  # every image: the seed does not matter


def test_same_names_new_contents_is_another_key(tmp_path):
    """A data set rewritten in place (same names, sizes and labels) must not reuse stale statistics."""
    images = torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8)
    src = TensorSource(images, torch.zeros(5, dtype=torch.long), ["a"], "toy/train")
    assert fingerprint(src) == fingerprint(TensorSource(images.clone(), src.labels, ["a"], "toy/train"))
    assert fingerprint(src) != fingerprint(TensorSource(images // 2, src.labels, ["a"], "toy/train"))

    files = [tmp_path / f"{i}.jpg" for i in range(3)]
    for f in files:
        f.write_bytes(b"x" * 100)
    folder = lambda: FolderSource(files, [0, 0, 0], ["a"], "toy/train")  # noqa: E731
    before = fingerprint(folder())
    assert fingerprint(folder()) == before
    files[1].write_bytes(b"x" * 90)  # e.g. re-encoded at another JPEG quality
    assert fingerprint(folder()) != before


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_cache_is_computed_again(tmp_path, damage):
    src, batches, calls = toy_source(4)
    first = cached_stats(src, 8, batches, [tmp_path], log=lambda _m: None)
    [cache] = tmp_path.glob("stats-*.npz")
    data = cache.read_bytes()
    cache.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"x" * 100}[damage])
    again = cached_stats(src, 8, batches, [tmp_path], log=lambda _m: None)
    assert len(calls) == 2 and torch.equal(first.mean_image, again.mean_image)


def test_statistics_pass_lists_unreadable_files_in_the_run_folder(tmp_path):
    from PIL import Image

    from repro.data.folder import image_folder
    from repro.data.loader import iterate
    from repro.data.skipped import read_skipped

    for k, cls in enumerate(("a", "b")):
        (tmp_path / "d" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8), (k * 200, 10, 20)).save(tmp_path / "d" / cls / "ok.png")
    (tmp_path / "d" / "b" / "bad.png").write_bytes(b"\x89PNG broken")
    src = image_folder(tmp_path / "d", size=8)
    said = []
    stats = cached_stats(src, 8, lambda: iterate(src, [torch.arange(len(src))]), [tmp_path / "cache"],
                         log=said.append, skipped_to=tmp_path / "run")
    assert stats.images == 2  # the unreadable file is left out of the mean
    assert read_skipped(tmp_path / "run" / "skipped.txt")[0][0] == str(tmp_path / "d" / "b" / "bad.png")
    assert f"dataset statistics: skipped 1 unreadable file, listed in {tmp_path / 'run' / 'skipped.txt'}" in said
