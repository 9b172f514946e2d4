"""The paper's update in one native pass (repro/update_native.c) against the four eager multi-tensor kernels
it replaces on the CPU: the same bits, the same fallbacks, and PaperSGD running it."""

import copy

import pytest
import torch

from repro import native, update_native
from repro.optim import PaperSGD, paper_update

needs_native = pytest.mark.skipif(update_native.load() is None, reason="no C compiler builds update_native.c here")


def _eager(params, grads, velocity, lr, momentum, weight_decay, monkeypatch):
    """paper_update with the native pass switched off: the four foreach kernels."""
    with monkeypatch.context() as m:
        m.setattr(update_native, "applies", lambda *a: False)
        paper_update(params, grads, velocity, lr, momentum, weight_decay)


def _lists(sizes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = [lambda n: torch.randn(n, generator=g, dtype=dtype),
            lambda n: torch.randn(n, generator=g, dtype=dtype),
            lambda n: torch.randn(n, generator=g, dtype=dtype) * 0.01]
    return [[f(n) for n in sizes] for f in make]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lr, momentum, weight_decay", [(0.01, 0.9, 5e-4), (0.0037, 0.9, 0.0), (1e-5, 0.0, 5e-4),
                                                        (0.3, 0.99, 1e-2)])
def test_same_bits_as_the_eager_kernels(dtype, lr, momentum, weight_decay, monkeypatch):
    """Sizes below, at and above the vector width and the threads' chunk, odd tails; three steps so that
    the velocity carries over; NaN and infinities in the gradient go where the eager code sends them."""
    sizes = [1, 5, 16, 17, 1000003, update_native.CHUNK + 3]
    w, g, v = _lists(sizes, dtype)
    g[0][0] = float("nan")
    g[4][7], g[4][11] = float("inf"), -float("inf")
    ours = [[t.clone() for t in w], [t.clone() for t in v]]
    theirs = [[t.clone() for t in w], [t.clone() for t in v]]
    for _ in range(3):
        assert update_native.applies(ours[0], g, ours[1])
        paper_update(ours[0], g, ours[1], lr, momentum, weight_decay)
        _eager(theirs[0], g, theirs[1], lr, momentum, weight_decay, monkeypatch)
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        assert torch.equal(_bits(a), _bits(b))
    assert torch.isnan(ours[0][0][0]) and not torch.isnan(ours[0][4][:7]).any()


@needs_native
def test_threads_give_the_same_bits():
    w, g, v = _lists([3 * update_native.CHUNK + 5, 100], torch.float32, seed=1)
    out = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert len(native.tile_ranges(4)) == threads
            ws, vs = [t.clone() for t in w], [t.clone() for t in v]
            update_native.update(ws, g, vs, 0.01, 0.9, 5e-4)
            out.append(ws + vs)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*out))


@needs_native
def test_layouts_it_takes_and_those_it_leaves_to_the_eager_kernels():
    conv = torch.randn(8, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    assert update_native.applies([conv], [torch.randn_like(conv)], [torch.zeros_like(conv)])  # channels_last alike
    w = torch.randn(6, 4)
    cases = {
        "a transposed gradient": ([w], [torch.randn(4, 6).t()], [torch.zeros(6, 4)]),
        "a strided view": ([torch.randn(6, 8)[:, ::2]], [torch.randn(6, 4)], [torch.zeros(6, 4)]),
        "bfloat16": ([w.bfloat16()], [w.bfloat16()], [w.bfloat16()]),
        "a float64 gradient for a float32 weight": ([w], [w.double()], [torch.zeros(6, 4)]),
        "an NCHW gradient for a channels_last weight": ([conv], [conv.contiguous()], [torch.zeros_like(conv)]),
        "a gradient sharing the weight's memory": ([w], [w], [torch.zeros(6, 4)]),
        "a velocity overlapping the gradient": ([w], [(buf := torch.zeros(30))[:24].view(6, 4)], [buf[6:].view(6, 4)]),
    }
    for name, lists in cases.items():
        assert not update_native.applies(*lists), name


@needs_native
def test_paper_sgd_runs_it_and_takes_the_same_steps(monkeypatch):
    """A small network's every parameter (weights with decay, biases at twice the rate without) over a
    learning-rate drop, channels_last convolutions: PaperSGD on the CPU calls the native pass, and its
    weights and velocities are the eager code's bits; autograd sees the weights change."""
    from repro.config import OptimConfig
    from repro.optim import paper_optimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 4 * 4, 5)).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(net)
    cfg = OptimConfig(bias_lr_mult=2.0)
    ours, theirs = paper_optimizer(net, cfg), paper_optimizer(twin, cfg)
    calls = []
    real = update_native.update
    monkeypatch.setattr(update_native, "update", lambda *a: (calls.append(len(a[0])), real(*a)))
    for lr in (0.01, 0.01, 0.001):
        ours.set_lr(lr)
        theirs.set_lr(lr)
        x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
        net(x).square().sum().backward()
        twin(x).square().sum().backward()
        versions = [p._version for p in net.parameters()]
        ours.step()
        assert all(p._version > before for p, before in zip(net.parameters(), versions))
        with monkeypatch.context() as m:
            m.setattr(update_native, "applies", lambda *a: False)
            theirs.step()
        ours.zero_grad()
        theirs.zero_grad()
    assert calls == [2, 2] * 3  # two groups (weights, biases) per step, every step native
    named = dict(net.named_parameters())
    for name, q in twin.named_parameters():
        assert torch.equal(named[name], q), name
        assert torch.equal(ours.state[named[name]]["velocity"], theirs.state[q]["velocity"]), name


def test_no_compiler_leaves_the_eager_kernels(tmp_path, monkeypatch):
    """Where nothing builds, applies() says no (and why, once), and paper_update still steps."""
    monkeypatch.setenv("CC", "no-such-compiler-here")
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(update_native, "_library", native.LazyLibrary(update_native.SOURCE, update_native._declare))  # not yet loaded
    w, g, v = [torch.ones(3)], [torch.ones(3)], [torch.zeros(3)]
    assert not update_native.applies(w, g, v)
    assert "no C compiler: 'no-such-compiler-here'" in update_native.unavailable()
    paper_update(w, g, v, 0.5, 0.9, 0.0)
    assert torch.equal(w[0], torch.full((3,), 0.5)) and torch.equal(v[0], torch.full((3,), -0.5))


def test_paper_sgd_on_bfloat16_weights_steps_eagerly():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = PaperSGD([p], lr=0.5, momentum=0.9, weight_decay=0.0)
    p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(p.detach(), torch.full((4,), 0.5, dtype=torch.bfloat16))
