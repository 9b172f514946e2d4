"""The device-side pipeline (paper sections 2, 4.1) against plain slicing: crops, reflections, mean image,
PCA noise, the ten test patches, and the 256x256 stage. The 2012 code's switches: tests/test_augment_2012.py."""

import pytest
import torch
import torch.nn.functional as F

from repro.config import DataConfig
from repro.data.augment import (
    IMAGENET_EIGVALS,
    IMAGENET_EIGVECS,
    Augment,
    CropParams,
    Stats,
    draw_params,
    step_generator,
    ten_crop_params,
    to_base,
)

PLAIN = DataConfig(mean="none", pca="none")


def reference_crop(img: torch.Tensor, top: int, left: int, flip: bool, n: int = 227) -> torch.Tensor:
    patch = img[top:top + n, left:left + n].float()  # (n, n, C)
    if flip:
        patch = patch.flip(1)
    return patch.permute(2, 0, 1)


def test_random_crops_and_reflections_match_slicing():
    images = torch.randint(0, 256, (5, 256, 256, 3), dtype=torch.uint8)
    params = draw_params(5, PLAIN, torch.Generator().manual_seed(3))
    params.flip[:2] = torch.tensor([True, False])  # both cases present
    out = Augment(PLAIN, None).train_batch(images, params)
    assert out.shape == (5, 3, 227, 227) and out.is_contiguous(memory_format=torch.channels_last)
    for i in range(5):
        expected = reference_crop(images[i], int(params.top[i]), int(params.left[i]), bool(params.flip[i]))
        assert torch.equal(out[i], expected)
    assert 0 <= params.top.min() and params.top.max() <= 29 and params.left.max() <= 29


def test_every_one_of_the_30_offsets_is_drawn_from_0_to_29():
    """227 of 256: offsets 0..29 on each axis, both ends reached (an off-by-one would lose 29 or add 30)."""
    params = draw_params(3000, PLAIN, torch.Generator().manual_seed(0))
    for axis in (params.top, params.left):
        assert sorted(axis.unique().tolist()) == list(range(30))


def test_mean_image_is_subtracted_at_the_crop_position():
    images = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    mean = torch.rand(256, 256, 3) * 255
    cfg = DataConfig(pca="none")
    stats = Stats(mean, torch.ones(3), torch.eye(3), 10)
    params = CropParams(torch.tensor([3, 29]), torch.tensor([0, 17]), torch.tensor([True, False]), torch.zeros(2, 3))
    out = Augment(cfg, stats).train_batch(images, params)
    for i in range(2):
        t, left, f = int(params.top[i]), int(params.left[i]), bool(params.flip[i])
        expected = reference_crop(images[i], t, left, f) - reference_crop(mean, t, left, f)
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scale", ["eigenvalue", "sqrt"])
def test_pca_noise_adds_eigvec_times_alpha_times_eigenvalue(scale):
    images = torch.full((2, 256, 256, 3), 100, dtype=torch.uint8)
    cfg = DataConfig(mean="none", pca="imagenet", pca_scale=scale)
    alpha = torch.tensor([[0.1, -0.2, 0.05], [0.0, 0.3, -0.1]])
    zero = torch.zeros(2, dtype=torch.long)
    params = CropParams(zero, zero, torch.zeros(2, dtype=torch.bool), alpha)
    out = Augment(cfg, None).train_batch(images, params)
    vals = torch.tensor(IMAGENET_EIGVALS)
    vals = vals.sqrt() if scale == "sqrt" else vals
    for i in range(2):
        # [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T (paper section 4.1), RGB in [0, 1] -> pixel units
        offset = torch.tensor(IMAGENET_EIGVECS) @ (alpha[i] * vals) * 255
        torch.testing.assert_close(out[i, :, 5, 7], 100 + offset, rtol=0, atol=1e-4)
        assert torch.allclose(out[i], out[i, :, :1, :1].expand_as(out[i]))  # the same for every pixel


def test_ten_patches_are_corners_centre_and_reflections():
    p = ten_crop_params(2, PLAIN)
    coords = list(zip(p.top[:10].tolist(), p.left[:10].tolist(), p.flip[:10].tolist()))
    corners = [(0, 0), (0, 29), (29, 0), (29, 29), (14, 14)]
    assert coords == [(t, left, False) for t, left in corners] + [(t, left, True) for t, left in corners]
    assert torch.equal(p.top[10:], p.top[:10]) and p.alpha.abs().sum() == 0
    images = torch.randint(0, 256, (2, 256, 256, 3), dtype=torch.uint8)
    out = Augment(PLAIN, None).eval_batch(images, crops=10)
    assert out.shape == (20, 3, 227, 227)
    for row, (t, left, f) in enumerate(coords * 2):  # image-major
        assert torch.equal(out[row], reference_crop(images[row // 10], t, left, f))
    centre = Augment(PLAIN, None).eval_batch(images, crops=1)
    assert torch.equal(centre, out[4::10])
    with pytest.raises(ValueError, match="1 or 10"):
        Augment(PLAIN, None).eval_batch(images, crops=5)


def test_base_stage_rescales_shorter_side_and_centres():
    grey = torch.randint(0, 256, (3, 28, 28, 1), dtype=torch.uint8)
    base = to_base(grey, 256)
    expected = F.interpolate(grey.permute(0, 3, 1, 2).float(), size=(256, 256), mode="bilinear", align_corners=False)
    torch.testing.assert_close(base, expected.permute(0, 2, 3, 1))
    wide = torch.zeros(1, 100, 200, 3, dtype=torch.uint8)
    wide[:, :, 100:] = 200  # right half bright
    b = to_base(wide, 256)
    assert b.shape == (1, 256, 256, 3)
    assert b[0, 128, 0].max() == 0 and b[0, 128, 255].min() > 199  # centre 256 of 512 columns
    same = torch.randint(0, 256, (1, 256, 256, 3), dtype=torch.uint8)
    assert to_base(same, 256) is same
    out = Augment(PLAIN, None).eval_batch(grey, 1)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])  # grey -> R = G = B


def test_step_randomness_is_a_function_of_position():
    a = draw_params(8, DataConfig(), step_generator(0, 2, 5, 0))
    b = draw_params(8, DataConfig(), step_generator(0, 2, 5, 0))
    assert all(x is y is None or torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))
    for other in (step_generator(0, 2, 6, 0), step_generator(0, 3, 5, 0), step_generator(0, 2, 5, 1),
                  step_generator(1, 2, 5, 0)):
        c = draw_params(8, DataConfig(), other)
        assert not torch.equal(a.alpha, c.alpha)
    no_flip = draw_params(64, DataConfig(flip=False), step_generator(0, 0, 0, 0))
    assert not no_flip.flip.any()
    std = draw_params(20000, DataConfig(), step_generator(0, 0, 0, 0)).alpha.std().item()
    assert abs(std - 0.1) < 0.003


def test_missing_statistics_are_a_clear_error():
    with pytest.raises(ValueError, match="mean subtraction needs"):
        Augment(DataConfig(), None)
