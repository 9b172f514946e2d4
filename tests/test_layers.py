"""LRN against an independent NumPy implementation of the paper's formula (section 3.3), and the shared dropout masks."""

import numpy as np
import pytest
import torch

from repro.config import LRNConfig
from repro.model.layers import SharedMaskDropout, keep_mask, local_response_norm


def lrn_reference(a: np.ndarray, n: int, alpha: float, beta: float, k: float, groups: int) -> np.ndarray:
    """b_i = a_i / (k + alpha * sum_{j = max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2)^beta, per channel group."""
    out = np.empty_like(a)
    cg = a.shape[1] // groups
    for g in range(groups):
        for i in range(cg):
            lo, hi = max(0, i - n // 2), min(cg - 1, i + n // 2)
            s = (a[:, g * cg + lo: g * cg + hi + 1] ** 2).sum(axis=1)
            out[:, g * cg + i] = a[:, g * cg + i] / (k + alpha * s) ** beta
    return out


def assert_the_paper_function(lrn, a: torch.Tensor, cfg: LRNConfig, groups: int, relu: bool) -> None:
    """A fast LRN kernel `lrn` (a -> y, differentiable) in float64: its output equals lrn_reference and
    its gradient the eager code's to 1e-12, and the output keeps a's memory format."""
    y = lrn(a)
    x = a.detach().clamp(min=0) if relu else a.detach()
    expected = lrn_reference(x.numpy(), cfg.size, cfg.sum_scale, cfg.beta, cfg.k, groups)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    channels_last = a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.rand_like(y)
    (grad,) = torch.autograd.grad(y, a, g)
    eager = a.detach().clone().requires_grad_()
    (expected_grad,) = torch.autograd.grad(local_response_norm(eager, cfg, groups, relu=relu), eager, g)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups,channels", [(1, 7), (1, 48), (2, 96), (2, 12), (3, 9)])
@pytest.mark.parametrize("convention", ["paper", "divided"])
def test_lrn_matches_numpy_formula(groups, channels, convention):
    cfg = LRNConfig(alpha_convention=convention, alpha=1e-2)  # a larger alpha makes the sum matter
    a = torch.rand(3, channels, 4, 5, dtype=torch.float64) * 20
    expected = lrn_reference(a.numpy(), 5, cfg.sum_scale, 0.75, 2.0, groups)
    got = local_response_norm(a, cfg, groups).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


def test_paper_alpha_is_not_divided_by_n():
    a = torch.full((1, 5, 1, 1), 10.0, dtype=torch.float64)
    centre = local_response_norm(a, LRNConfig(), 1)[0, 2, 0, 0].item()
    assert centre == pytest.approx(10.0 / (2 + 1e-4 * 5 * 100) ** 0.75, rel=1e-14)
    divided = local_response_norm(a, LRNConfig(alpha_convention="divided"), 1)[0, 2, 0, 0].item()
    assert divided == pytest.approx(10.0 / (2 + 1e-4 * 100) ** 0.75, rel=1e-14)


def test_lrn_channel_edges_use_clipped_windows():
    # Only channel 0 is non-zero: channels 0..2 see it in their windows, channels 3+ do not.
    a = torch.zeros(1, 6, 1, 1, dtype=torch.float64)
    a[0, 0] = 100.0
    cfg = LRNConfig(alpha=1e-2)
    out = local_response_norm(a, cfg, 1)
    assert out[0, 0, 0, 0].item() == pytest.approx(100.0 / (2 + 1e-2 * 1e4) ** 0.75, rel=1e-14)
    assert torch.equal(out[0, 1:], torch.zeros(5, 1, 1, dtype=torch.float64))
    # With two groups of three, channel 3 starts a new window: channel 2's energy must not reach it.
    a = torch.zeros(1, 6, 1, 1, dtype=torch.float64)
    a[0, 2], a[0, 3] = 100.0, 1.0
    out = local_response_norm(a, cfg, 2)
    assert out[0, 3, 0, 0].item() == pytest.approx(1.0 / (2 + 1e-2 * 1.0) ** 0.75, rel=1e-14)


def test_lrn_divided_matches_torch_module():
    a = torch.rand(2, 96, 5, 5, dtype=torch.float64) * 30
    ours = local_response_norm(a, LRNConfig(alpha_convention="divided"), 1)
    theirs = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(a)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_gradient(groups):
    a = (torch.rand(2, 8, 3, 3, dtype=torch.float64) * 30).requires_grad_()
    cfg = LRNConfig(alpha=1e-2)
    assert torch.autograd.gradcheck(lambda x: local_response_norm(x, cfg, groups), (a,))


@pytest.mark.parametrize("enabled", [True, False])
def test_lrn_with_relu_is_relu_then_lrn(enabled):
    """The network's modules fold the preceding ReLU into the LRN (one pass on a GPU): the same values
    and gradients as torch's ReLU followed by the LRN, including at x = 0 exactly, and with LRN off
    (the no-lrn variant) just the ReLU."""
    from repro.model.layers import LocalResponseNorm

    cfg = LRNConfig(alpha=1e-2, enabled=enabled)
    a = torch.randn(2, 12, 4, 3, dtype=torch.float64) * 10
    a[0, :, 0, 0] = 0.0
    fused, plain = a.clone().requires_grad_(), a.clone().requires_grad_()
    y_fused = LocalResponseNorm(cfg, groups=2, relu=True)(fused)
    y_plain = LocalResponseNorm(cfg, groups=2)(torch.relu(plain))
    g = torch.randn_like(a)
    y_fused.backward(g)
    y_plain.backward(g)
    assert (y_fused.detach() == 0).any() and (fused.grad == 0).any()  # the ReLU did cut something
    torch.testing.assert_close(y_fused, y_plain, rtol=1e-15, atol=0)
    torch.testing.assert_close(fused.grad, plain.grad, rtol=1e-14, atol=1e-16)


def test_lrn_with_relu_gradient():
    a = (torch.randn(2, 8, 3, 3, dtype=torch.float64) * 30).requires_grad_()  # |x| > 1e-6 almost surely
    cfg = LRNConfig(alpha=1e-2)
    assert torch.autograd.gradcheck(lambda x: local_response_norm(x, cfg, 2, relu=True), (a,))


def test_lrn_channels_last_equals_contiguous():
    a = torch.rand(2, 96, 7, 7, dtype=torch.float64) * 30
    cl = a.to(memory_format=torch.channels_last).requires_grad_()
    nc = a.clone().requires_grad_()
    cfg = LRNConfig(alpha=1e-3)
    y_cl, y_nc = local_response_norm(cl, cfg, 2), local_response_norm(nc, cfg, 2)
    torch.testing.assert_close(y_cl, y_nc, rtol=1e-14, atol=0)
    g = torch.rand_like(a)
    (y_cl * g).sum().backward()
    (y_nc * g).sum().backward()
    torch.testing.assert_close(cl.grad, nc.grad, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size,groups,channels", [(5, 2, 96), (5, 2, 4), (3, 1, 7), (7, 3, 9), (1, 2, 6), (5, 1, 2)])
def test_eager_window_sum_equals_compiled_form(size, groups, channels, channels_last):
    """Eagerly the window sum adds shifted slices in place; under torch.compile it is written as
    shifted adds over a padded copy (which inductor fuses). Both are the same sums, also where the
    window is wider than a channel group."""
    from repro.model.layers import _window_sum_in_place
    from repro.model.lrn_cpu import window_sum_fusable as _window_sum_fusable

    t = torch.rand(2, channels, 3, 5, dtype=torch.float64)
    if channels_last:
        t = t.to(memory_format=torch.channels_last)
    eager, fusable = _window_sum_in_place(t, size, groups), _window_sum_fusable(t, size, groups)
    torch.testing.assert_close(eager, fusable, rtol=1e-15, atol=0)
    assert eager.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    expected = lrn_reference(t.numpy(), size, 1.0, 1.0, 0.0, groups)  # a / (sum a^2) needs the same windows
    torch.testing.assert_close(t / _window_sum_in_place(t * t, size, groups), torch.from_numpy(expected),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-15), (torch.float32, 1e-6)])
def test_inverse_power_of_paper_beta(dtype, rtol):
    from repro.model.lrn_cpu import inverse_power as _inverse_power

    d = torch.rand(10_000, dtype=torch.float64) * 1e3 + 2.0  # denominators are >= k = 2
    torch.testing.assert_close(_inverse_power(d.to(dtype), 0.75), d.pow(-0.75).to(dtype), rtol=rtol, atol=0)
    torch.testing.assert_close(_inverse_power(d.to(dtype), 0.5), d.pow(-0.5).to(dtype), rtol=rtol, atol=0)


def test_lrn_rejects_even_window():
    with pytest.raises(ValueError, match="odd"):
        LRNConfig(size=4)


def test_tower_slices_of_mask_equal_full_mask():
    counter = torch.tensor(7)
    full = keep_mask(counter, 0, 6, 16, 4096, 0, 4096, 0.5)
    left = keep_mask(counter, 0, 6, 16, 4096, 0, 2048, 0.5)
    right = keep_mask(counter, 0, 6, 16, 4096, 2048, 2048, 0.5)
    assert torch.equal(torch.cat([left, right], 1), full)


def test_mask_statistics_and_independence():
    masks = [keep_mask(torch.tensor(s), 0, 6, 256, 4096, 0, 4096, 0.5) for s in range(4)]
    m = torch.stack(masks).double()
    assert abs(m.mean().item() - 0.5) < 0.005  # 4M draws: std of the mean is 0.00025
    assert abs((m[0] * m[1]).mean().item() - 0.25) < 0.005  # steps are independent
    assert abs(m[0, :, 0::2].mean() - m[0, :, 1::2].mean()) < 0.01  # no column pattern
    other_stream = keep_mask(torch.tensor(0), 1, 6, 256, 4096, 0, 4096, 0.5)
    other_layer = keep_mask(torch.tensor(0), 0, 7, 256, 4096, 0, 4096, 0.5)
    assert (other_stream != masks[0]).double().mean() > 0.45
    assert (other_layer != masks[0]).double().mean() > 0.45
    assert abs(keep_mask(torch.tensor(3), 0, 6, 256, 4096, 0, 4096, 0.25).double().mean() - 0.75) < 0.005


def test_dropout_scaling_conventions():
    x = torch.ones(4, 8)
    paper = SharedMaskDropout(0.5, 6, 8, 0, 8, "paper")
    inverted = SharedMaskDropout(0.5, 6, 8, 0, 8, "inverted")
    y = paper(x)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    assert set(inverted(x).unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(inverted(x) > 0, paper(x) > 0)  # same counter -> same mask
    assert paper.step.item() == 2 and inverted.step.item() == 2  # advances once per training forward
    paper.eval()
    inverted.eval()
    assert torch.equal(paper(x), x * 0.5) and torch.equal(inverted(x), x)
    assert paper.step.item() == 2  # evaluation draws nothing


def test_lrn_compiles_to_one_fused_kernel_each_way():
    """The speed design of issue 5: torch.compile fuses the window sum, the power and the product
    into a single pass forward and a single pass backward (inductor's CPU backend here; the same
    scheduler fuses for Triton on a GPU)."""
    import re

    from torch._inductor.utils import run_and_get_code

    cfg = LRNConfig()
    x = (torch.rand(2, 8, 5, 5) * 30).to(memory_format=torch.channels_last).requires_grad_()
    compiled = torch.compile(lambda t: local_response_norm(t, cfg, 2))

    def step():
        y = compiled(x)
        y.backward(torch.ones_like(y))
        return y

    y, codes = run_and_get_code(step)
    assert [len(set(re.findall(r"cpp_fused_\w+", c))) for c in codes] == [1, 1]
    torch.testing.assert_close(y, local_response_norm(x.detach(), cfg, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size,groups,channels", [(5, 2, 96), (5, 2, 4), (3, 1, 7), (7, 3, 9), (1, 2, 6), (5, 1, 2)])
def test_band_matrix_window_sum_equals_shifted_adds(size, groups, channels, channels_last):
    """The window sum as a product with a 0/1 band matrix (REPRO_LRN_WINDOW=band) is the same sum in
    float64 to 1e-12, at channel edges and tower boundaries, in both memory layouts; the band is
    symmetric, which is what lets the backward reuse it."""
    from repro.model.layers import _window_sum_in_place, band_window_sum, window_band

    t = torch.rand(2, channels, 3, 5, dtype=torch.float64)
    if channels_last:
        t = t.to(memory_format=torch.channels_last)
    torch.testing.assert_close(band_window_sum(t, size, groups), _window_sum_in_place(t, size, groups),
                               rtol=1e-12, atol=0)
    band = window_band(channels // groups, size, torch.float64)
    assert torch.equal(band, band.T)


@pytest.mark.parametrize("relu", [False, True])
def test_lrn_with_band_window_matches_reference_and_gradcheck(monkeypatch, relu):
    """The whole LRN (forward, backward, ReLU folded in) with the band-matrix window sum: the NumPy
    reference's values to 1e-12 and gradcheck, over two groups."""
    monkeypatch.setenv("REPRO_LRN_WINDOW", "band")
    a = ((torch.rand(2, 12, 3, 3, dtype=torch.float64) - 0.3) * 30).requires_grad_()
    cfg = LRNConfig(alpha=1e-2)
    y = local_response_norm(a, cfg, 2, relu=relu)
    x = a.detach().clamp(min=0) if relu else a.detach()
    expected = lrn_reference(x.numpy(), cfg.size, cfg.sum_scale, cfg.beta, cfg.k, 2)
    torch.testing.assert_close(y.detach(), torch.from_numpy(expected), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: local_response_norm(v, cfg, 2, relu=relu), (a,))


def test_a_misspelt_window_choice_is_refused(monkeypatch):
    from repro.model.layers import channel_window_sum

    monkeypatch.setenv("REPRO_LRN_WINDOW", "bands")
    with pytest.raises(ValueError, match="REPRO_LRN_WINDOW='bands': choose 'shifted'"):
        channel_window_sum(torch.ones(1, 4, 2, 2), 5, 2)
