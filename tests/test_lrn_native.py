"""The native CPU LRN (repro/model/lrn_native.c via lrn_native.py): the paper's function in float64 to 1e-12
forward and backward against the NumPy reference of test_layers.py and gradcheck, at channel edges,
tower boundaries, short last tiles and both memory layouts, for the paper's constants and for others
(the general power and window); NaN and the ReLU's zero gradient as torch has them; bfloat16 rounded
once; threads splitting the work give the same bits; in the network's float32 through the autograd
function, equal to the eager code and saving no denominator; the build: cached by content, atomic, and
a missing compiler is one clear warning, then the eager code."""

import numpy as np
import pytest
import torch

from repro import native
from repro.config import LRNConfig
from repro.model import lrn_cpu, lrn_native
from repro.model.layers import local_response_norm
from tests.test_layers import assert_the_paper_function, lrn_reference

CFG = LRNConfig(alpha=1e-2)  # a larger alpha than the paper's makes the window sums matter in the checks


class _Native(torch.autograd.Function):
    """The C forward and backward called directly, in any dtype they take (the network keeps float64 on
    the eager path; here float64 proves the C code the paper's function)."""

    @staticmethod
    def forward(ctx, x, groups, relu, size, scale, beta, k):
        ctx.save_for_backward(x)
        ctx.args = (size, scale, beta, k, groups, relu)
        return lrn_native.forward(x, size, scale, beta, k, groups, relu)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        return lrn_native.backward(grad_y, x, *ctx.args), *[None] * 6


def _inputs(shape, channels_last, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.rand(shape, dtype=torch.float64, generator=gen) - 0.3) * 30
    return a.contiguous(memory_format=torch.channels_last) if channels_last else a


# (shape, groups): 12 channels in 2 groups of 6 (most windows clipped); 3 channels, fewer than the window;
# 17 x 19 = 323 pixels, which leave a short last tile in both layouts (16 and 256 pixels a tile)
CASES = [((2, 12, 3, 4), 2), ((1, 3, 2, 5), 1), ((2, 8, 17, 19), 2)]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("relu", [True, False])
def test_native_kernels_are_the_paper_function_in_float64(shape, groups, channels_last, relu):
    a = _inputs(shape, channels_last).requires_grad_()
    args = (groups, relu, CFG.size, CFG.sum_scale, CFG.beta, CFG.k)
    assert_the_paper_function(lambda v: _Native.apply(v, *args), a, CFG, groups, relu)
    if a.numel() < 500:  # gradcheck perturbs every element: the short-tile case is held to the eager gradient
        assert torch.autograd.gradcheck(lambda v: _Native.apply(v, *args), (a,))


@pytest.mark.parametrize("size,beta", [(3, 0.75), (5, 0.5), (7, 1.0)])
def test_other_windows_and_powers_take_the_general_path(size, beta):
    """The paper's size 5 and beta 0.75 are unrolled; anything else runs the general loops."""
    a = _inputs((2, 10, 4, 5), channels_last=True, seed=1).requires_grad_()
    args = (2, True, size, 3e-3, beta, 1.5)
    y = _Native.apply(a, *args)
    expected = lrn_reference(a.detach().clamp(min=0).numpy(), size, 3e-3, beta, 1.5, 2)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda v: _Native.apply(v, *args), (a,))


def test_nan_passes_and_the_relu_gradient_is_zero_where_x_is_not_positive(monkeypatch):
    """A NaN spreads through its windows exactly as in the eager code (a diverged layer must show); the
    ReLU's gradient is 0 where x <= 0."""
    x = torch.tensor([-1.0, 0.0, 2.0, float("nan"), 3.0, 1.0, 0.5, -2.0, 4.0]).reshape(1, 9, 1, 1)
    y = lrn_native.forward(x, CFG.size, CFG.sum_scale, CFG.beta, CFG.k, 1, True)
    monkeypatch.setenv(lrn_cpu.KERNEL_ENV, "eager")
    expected = local_response_norm(x, CFG, 1, relu=True)
    assert torch.isnan(y).flatten().tolist() == [False, True, True, True, True, True, False, False, False]
    torch.testing.assert_close(y, expected, equal_nan=True)
    finite = x.nan_to_num()
    dx = lrn_native.backward(torch.ones_like(x), finite, CFG.size, CFG.sum_scale, CFG.beta, CFG.k, 1, True)
    assert (dx.flatten()[[0, 1, 7]] == 0).all() and (dx.flatten()[[2, 4, 5, 6, 8]] != 0).all()


def test_bfloat16_is_computed_in_float_and_rounded_once():
    x = _inputs((2, 12, 5, 6), channels_last=True).float()
    g = torch.randn_like(x)
    y32 = lrn_native.forward(x, 5, CFG.sum_scale, 0.75, CFG.k, 2, True)
    y16 = lrn_native.forward(x.bfloat16(), 5, CFG.sum_scale, 0.75, CFG.k, 2, True)
    assert y16.dtype == torch.bfloat16
    # from the rounded input: the float result of bf16 inputs, rounded once, is what it stores
    expected = lrn_native.forward(x.bfloat16().float(), 5, CFG.sum_scale, 0.75, CFG.k, 2, True).bfloat16()
    assert torch.equal(y16, expected)
    torch.testing.assert_close(y16.float(), y32, rtol=2e-2, atol=1e-2)
    dx16 = lrn_native.backward(g.bfloat16(), x.bfloat16(), 5, CFG.sum_scale, 0.75, CFG.k, 2, True)
    torch.testing.assert_close(dx16.float(), lrn_native.backward(g, x, 5, CFG.sum_scale, 0.75, CFG.k, 2, True),
                               rtol=3e-2, atol=3e-2)


# (channels, groups): the network's 96 in two towers of 48 and 256 in two of 128 (channels_last goes pixel by
# pixel where a group is whole vectors of 16, on CPUs with AVX), one group of 64; 40 in two of 20 stay on
# the tile code in both layouts
PIXEL_CASES = [(96, 2), (256, 2), (64, 1), (40, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels,groups", PIXEL_CASES)
def test_channels_last_pixel_by_pixel_gives_the_tile_codes_bits(dtype, channels, groups):
    """channels_last at the network's group sizes runs pixel kernels that read and write memory directly
    (the window's neighbours shifted in across vectors); NCHW runs the tile code. Forward, backward (NaN
    included) and the fused pooling: the same bits in both layouts, on every CPU."""
    x = _with_nans(_inputs((3, channels, 7, 9), channels_last=False).to(dtype))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    args = (5, CFG.sum_scale, 0.75, CFG.k, groups, True)
    nchw, cl = x, x.contiguous(memory_format=torch.channels_last)
    assert x.isnan().any() and _same(lrn_native.forward(cl, *args), lrn_native.forward(nchw, *args))
    finite = x.nan_to_num(1.0)
    assert _same(lrn_native.backward(g.contiguous(memory_format=torch.channels_last),
                                     finite.contiguous(memory_format=torch.channels_last), *args),
                 lrn_native.backward(g, finite, *args))
    assert _same(lrn_native.forward_pool(cl, *args, 3, 2),
                 torch.nn.functional.max_pool2d(lrn_native.forward(nchw, *args), 3, 2))


@pytest.mark.parametrize("channels,groups", PIXEL_CASES[:2])
def test_float32_stays_within_a_few_roundings_of_float64(channels, groups):
    """The float32 kernels (the power from the CPU's reciprocal square root estimate where it has one) at the
    network's shapes, both layouts, against the float64 kernel: the output within 4 float32 roundings
    relative to each value (measured 3.0), the input gradient within 4 of its largest value (measured 2.0)."""
    eps = torch.finfo(torch.float32).eps
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, channels, 13, 13, generator=gen, dtype=torch.float64) \
        * torch.logspace(-2, 3, 13, dtype=torch.float64).view(1, 1, 13, 1)  # windows of small and large sums
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    args = (5, CFG.sum_scale, 0.75, CFG.k, groups, True)
    y64, dx64 = lrn_native.forward(x, *args), lrn_native.backward(g, x, *args)
    for layout in (torch.contiguous_format, torch.channels_last):
        x32, g32 = x.float().contiguous(memory_format=layout), g.float().contiguous(memory_format=layout)
        y32, dx32 = lrn_native.forward(x32, *args), lrn_native.backward(g32, x32, *args)
        nonzero = y64 != 0
        assert ((y32.double() - y64).abs()[nonzero] / y64.abs()[nonzero]).max() <= 4 * eps
        assert (dx32.double() - dx64).abs().max() <= 4 * eps * dx64.abs().max()


@pytest.mark.parametrize("channels_last", [False, True])
def test_threads_split_the_tiles_and_give_the_same_bits(channels_last):
    x = _inputs((3, 16, 20, 21), channels_last).float()
    g = torch.randn_like(x)
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert len(native.tile_ranges(100)) == threads
            out.append((lrn_native.forward(x, 5, 1e-2, 0.75, 2.0, 2, True),
                        lrn_native.backward(g, x, 5, 1e-2, 0.75, 2.0, 2, True)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_network_float32_runs_the_native_kernels_and_equals_the_eager_code(monkeypatch):
    """What the network runs: float32 through local_response_norm with the native kernel chosen: equal
    to the eager code to float32 rounding, the layout kept, no denominator saved for the backward."""
    for channels_last in (True, False):
        a = _inputs((4, 12, 5, 5), channels_last).float()
        outs, grads = [], []
        for kernel in ("eager", "native"):
            monkeypatch.setenv(lrn_cpu.KERNEL_ENV, kernel)
            v = a.clone().requires_grad_()
            y = local_response_norm(v, CFG, 2, relu=True)
            if kernel == "native":
                assert y.grad_fn.saved_tensors[1] is None  # x only: the backward recomputes the denominator
            y.backward(torch.ones_like(y))
            outs.append(y.detach())
            grads.append(v.grad)
        torch.testing.assert_close(outs[1], outs[0], rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=2e-5, atol=1e-6)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert outs[1].is_contiguous(memory_format=fmt) and grads[1].is_contiguous(memory_format=fmt)
    assert "native" not in lrn_cpu._broken


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="4-D CPU tensors"):
        lrn_native.forward(torch.ones(2, 3, 4, dtype=torch.float32), 5, 1e-4, 0.75, 2.0, 1, True)
    with pytest.raises(ValueError, match="4-D CPU tensors"):
        lrn_native.forward(torch.ones(1, 4, 2, 2, dtype=torch.float16), 5, 1e-4, 0.75, 2.0, 1, True)
    with pytest.raises(ValueError, match="divisible"):
        lrn_native.forward(torch.ones(1, 5, 2, 2), 5, 1e-4, 0.75, 2.0, 2, True)


def test_the_build_is_cached_by_content_and_written_whole(tmp_path, monkeypatch):
    monkeypatch.setenv(lrn_native.CACHE_ENV, str(tmp_path))
    path = lrn_native.build()
    assert path.parent == tmp_path and path.name.startswith("lrn_native-") and path.suffix == ".so"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    stamp = path.stat().st_mtime_ns
    assert lrn_native.build() == path and path.stat().st_mtime_ns == stamp  # built once
    source = tmp_path / "lrn_native.c"
    source.write_text(lrn_native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(lrn_native, "SOURCE", source)
    assert lrn_native.library_path() != path  # other source, other library


def test_no_compiler_is_one_clear_warning_then_the_eager_code(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setenv(lrn_native.CACHE_ENV, str(tmp_path))
    with pytest.raises(lrn_native.NativeUnavailable, match="no C compiler: 'no-such-compiler-here' is not on PATH"):
        lrn_native.build()
    monkeypatch.setattr(lrn_native, "_lib", None)
    monkeypatch.setattr(lrn_cpu, "_broken", {})
    monkeypatch.setenv(lrn_cpu.KERNEL_ENV, "native")
    x = _inputs((2, 12, 3, 4), channels_last=False).float()
    with pytest.warns(UserWarning, match="the native CPU LRN could not be built .*no C compiler"):
        y = local_response_norm(x, CFG, 2, relu=True)
    assert not lrn_cpu.supported(x)  # eager from now on, no second warning
    monkeypatch.setenv(lrn_cpu.KERNEL_ENV, "eager")
    assert torch.equal(y, local_response_norm(x, CFG, 2, relu=True))


def test_in_place_only_where_no_gradient_is_wanted(monkeypatch):
    """The network's LRN layers may overwrite their input (a conv output nothing else reads) in an
    evaluation forward, with the same result; a training forward leaves it whole for the backward."""
    monkeypatch.setenv(lrn_cpu.KERNEL_ENV, "native")
    x = _inputs((2, 12, 5, 5), channels_last=True).float()
    expected = local_response_norm(x.clone(), CFG, 2, relu=True)
    with torch.no_grad():
        y = local_response_norm(x, CFG, 2, relu=True, inplace=True)
    assert y.data_ptr() == x.data_ptr() and torch.equal(y, expected)
    v = x.clone().requires_grad_()
    kept = v.detach().clone()
    y = local_response_norm(v, CFG, 2, relu=True, inplace=True)
    assert y.data_ptr() != v.data_ptr() and torch.equal(v.detach(), kept)
    y.sum().backward()
    assert v.grad is not None


def _with_nans(x: torch.Tensor) -> torch.Tensor:
    x.as_strided((x.numel() // 37,), (37,)).fill_(float("nan"))  # every 37th element in memory order
    return x


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))


# (shape, groups, pooling kernel, stride): the paper's 3/2; non-overlapping 2/2 (the ablation); a window
# wider than the stride by more than one row; odd sizes that leave rows and columns unpooled
POOL_CASES = [((2, 12, 17, 19), 2, 3, 2), ((1, 3, 7, 9), 1, 2, 2), ((3, 8, 11, 6), 2, 4, 1), ((2, 6, 5, 5), 1, 3, 3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,groups,kernel,stride", POOL_CASES)
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("size,beta", [(5, 0.75), (3, 0.5)])
def test_lrn_and_pooling_in_one_pass_are_the_two_calls_bit_for_bit(dtype, shape, groups, kernel, stride, relu,
                                                                    size, beta):
    x = _with_nans(_inputs(shape, channels_last=True).to(dtype))
    args = (size, 1e-2 / size, beta, 2.0, groups, relu)
    expected = torch.nn.functional.max_pool2d(lrn_native.forward(x, *args), kernel, stride)
    got = lrn_native.forward_pool(x, *args, kernel, stride)
    assert got.shape == expected.shape and got.dtype == dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert expected.isnan().any() and _same(got, expected)  # a window holding a NaN pools to NaN, as torch's


def test_lrn_and_pooling_in_one_pass_split_across_threads_give_the_same_bits():
    x = _with_nans(_inputs((3, 16, 21, 20), channels_last=True).float())
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            out.append(lrn_native.forward_pool(x, 5, 1e-2, 0.75, 2.0, 2, True, 3, 2))
    finally:
        torch.set_num_threads(before)
    assert _same(out[0], out[1])


def test_lrn_and_pooling_in_one_pass_refuse_what_they_cannot_do():
    x = _inputs((1, 4, 6, 6), channels_last=True).float()
    with pytest.raises(ValueError, match="channels_last"):
        lrn_native.forward_pool(x.contiguous(), 5, 1e-2, 0.75, 2.0, 1, True, 3, 2)
    with pytest.raises(ValueError, match="does not fit a 6x6 input"):
        lrn_native.forward_pool(x, 5, 1e-2, 0.75, 2.0, 1, True, 7, 2)


@pytest.mark.parametrize("form", ["grouped", "towers"])
def test_network_evaluation_pools_in_the_lrn_pass_with_the_same_output(form, monkeypatch):
    """An evaluation forward of either form, channels_last with the native kernel, pools in the LRN's pass
    (both layers) and gives the bits of the separate LRN and pooling that a training forward runs."""
    from repro.model import AlexNet, TwoTowerAlexNet
    from tests.conftest import SMALL

    monkeypatch.setenv(lrn_cpu.KERNEL_ENV, "native")
    torch.manual_seed(0)
    net = AlexNet(config=SMALL) if form == "grouped" else TwoTowerAlexNet(devices=("cpu", "cpu"), config=SMALL)
    net = net.to(memory_format=torch.channels_last).eval()
    x = torch.randn(3, 3, 67, 67).contiguous(memory_format=torch.channels_last)
    calls = []
    fused = lrn_native.forward_pool
    monkeypatch.setattr(lrn_native, "forward_pool", lambda *a: calls.append(a[-2:]) or fused(*a))
    with torch.no_grad():
        evaluated = net(x)
    assert calls == [(3, 2)] * (2 if form == "grouped" else 4)  # conv1's and conv2's, per tower for the towers
    calls.clear()
    separate = net(x.clone().requires_grad_())  # a gradient wanted: the LRN and the pooling run apart
    assert calls == [] and torch.equal(evaluated, separate.detach())
    seen = []
    lrn1 = net.lrn1 if form == "grouped" else net.towers[0].lrn1
    handle = lrn1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        assert torch.equal(net(x), evaluated)
    handle.remove()
    assert len(seen) == 1 and len(calls) == (1 if form == "grouped" else 3)  # a hooked layer runs as a module
    calls.clear()
    monkeypatch.setenv(lrn_cpu.KERNEL_ENV, "eager")  # another kernel: the modules, not the fused pass
    with torch.no_grad():
        net(x)
    assert calls == []


def test_an_openmp_build_shares_torchs_threads():
    """Where torch's OpenMP runtime is GNU libgomp, both native libraries are built with OpenMP and link
    that runtime (one libgomp in the process, not a second pool of threads); elsewhere they are not."""
    from repro import update_native

    openmp = native.torch_uses_libgomp()
    assert lrn_native.load().lrn_openmp() == int(openmp)
    if update_native.load() is not None:
        assert update_native.load().update_openmp() == int(openmp)
    try:
        with open("/proc/self/maps") as f:
            runtimes = {line.split()[-1] for line in f if "libgomp" in line}
    except OSError:
        pytest.skip("no /proc/self/maps here")
    assert len(runtimes) <= 1, runtimes
