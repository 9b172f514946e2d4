"""The 2012 code's data switches (convdata.py), each against plain slicing and arithmetic: 33 crop
positions of 224 in 256, one crop per run of 32 images, the central mean patch for every crop, the noise
divided by 1.1 and switched off from an epoch. Each test fails if its switch is ignored."""

import dataclasses

import torch

from repro.config import DataConfig, TrainConfig, apply_variant
from repro.data.augment import IMAGENET_EIGVALS, IMAGENET_EIGVECS, Augment, CropParams, Stats, draw_params

PRESET = apply_variant(TrainConfig(), "cuda-convnet-2012").data
PLAIN_2012 = dataclasses.replace(PRESET, mean="none", pca="none")


def crop(img: torch.Tensor, top: int, left: int, flip: bool, n: int = 224) -> torch.Tensor:
    patch = img[top:top + n, left:left + n].float()
    return (patch.flip(1) if flip else patch).permute(2, 0, 1)


def test_preset_is_224_crops_at_33_positions_per_axis():
    params = draw_params(32 * 2000, PLAIN_2012, torch.Generator().manual_seed(0))
    assert PRESET.crop_size == 224
    for axis in (params.top, params.left):
        assert sorted(axis.unique().tolist()) == list(range(33))  # randint(0, 2 * 16 + 1), convdata.py:253


def test_each_run_of_32_images_shares_one_offset_and_reflection():
    params = draw_params(100, PRESET, torch.Generator().manual_seed(1))  # 3 whole chunks and 4 images
    chunks = [slice(0, 32), slice(32, 64), slice(64, 96), slice(96, 100)]
    for t in (params.top, params.left, params.flip):
        assert all(t[c].unique().numel() == 1 for c in chunks)
    firsts = [(int(params.top[c][0]), int(params.left[c][0]), bool(params.flip[c][0])) for c in chunks]
    assert len(set(firsts)) > 1  # the chunks themselves differ
    assert params.alpha.unique(dim=0).shape[0] == 100  # the colour noise stays per image


def _stats() -> Stats:
    return Stats(torch.rand(256, 256, 3) * 255, torch.tensor(IMAGENET_EIGVALS), torch.tensor(IMAGENET_EIGVECS), 10)


def test_every_crop_subtracts_the_central_mean_patch_unreflected():
    images = torch.randint(0, 256, (3, 256, 256, 3), dtype=torch.uint8)
    stats = _stats()
    cfg = dataclasses.replace(PRESET, pca="none")
    params = CropParams(torch.tensor([0, 32, 5]), torch.tensor([0, 7, 32]), torch.tensor([True, False, True]),
                        torch.zeros(3, 3))
    out = Augment(cfg, stats).train_batch(images, params)
    central = stats.mean_image[16:240, 16:240].permute(2, 0, 1)  # convdata.py:137, never reflected
    for i in range(3):
        expected = crop(images[i], int(params.top[i]), int(params.left[i]), bool(params.flip[i])) - central
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-4)
    corners = Augment(cfg, stats).eval_batch(images[:1], crops=10)  # the test patches too
    torch.testing.assert_close(corners[3], crop(images[0], 32, 32, False) - central, rtol=0, atol=1e-4)


def test_noisy_crop_is_divided_by_1_1_and_noise_stops_at_its_epoch():
    """convdata.py:203-205: crop - mean + noise, then / (1 + 0.1), only while the noise is on; the noise
    is eigvec * (alpha * sqrt(eigval)) with alpha ~ N(0, 0.1) (its "color_stdevs")."""
    images = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    stats = _stats()
    augment = Augment(PRESET, stats)
    central = stats.mean_image[16:240, 16:240].permute(2, 0, 1)
    for epoch, on in ((0, True), (65, True), (66, False), (80, False)):
        params = draw_params(2, PRESET, torch.Generator().manual_seed(epoch), epoch=epoch)
        out = augment.train_batch(images, params)
        for i in range(2):
            plain = crop(images[i], int(params.top[i]), int(params.left[i]), bool(params.flip[i])) - central
            rgb = torch.tensor(IMAGENET_EIGVECS) @ (params.alpha[i] * torch.tensor(IMAGENET_EIGVALS).sqrt()) * 255
            expected = (plain + rgb[:, None, None]) / 1.1 if on else plain
            torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-3)
        assert bool(params.alpha.abs().sum() > 0) == on


def test_paper_default_keeps_noise_and_scale_throughout():
    params = draw_params(4, DataConfig(), torch.Generator().manual_seed(0), epoch=89)
    assert params.gain is None and params.alpha.abs().sum() > 0
