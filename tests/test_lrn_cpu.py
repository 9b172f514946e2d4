"""The compiled CPU LRN kernels (repro/model/lrn_cpu.py): the paper's function in float64 to 1e-12 forward
and backward (the NumPy reference of test_layers.py and gradcheck), at channel edges and tower boundaries,
in both memory layouts; in the network's float32 through the autograd function, equal to the eager code,
layout kept, one kernel for every batch size; the choice between kernels; and the benchmark script's
table. Each layer shape compiles (seconds), so the shapes here are few and small."""

import pytest
import torch

from repro.config import LRNConfig
from repro.model import lrn_cpu
from repro.model.layers import local_response_norm
from scripts import benchmark_lrn_cpu
from scripts.benchmark_lrn_cpu import COLUMNS
from tests.test_layers import assert_the_paper_function

CFG = LRNConfig(alpha=1e-2)  # a larger alpha than the paper's makes the window sums matter in the checks


class _Compiled(torch.autograd.Function):
    """The compiled forward and backward called directly, so that float64 (which the network keeps on
    the eager path) can prove them the paper's function."""

    @staticmethod
    def forward(ctx, x, groups, relu):
        y, denom = lrn_cpu.forward(x, CFG.size, CFG.sum_scale, CFG.beta, CFG.k, groups, relu)
        ctx.save_for_backward(x, denom)
        ctx.groups, ctx.relu = groups, relu
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, denom = ctx.saved_tensors
        return lrn_cpu.backward(grad_y, x, denom, CFG.size, CFG.sum_scale, CFG.beta, ctx.groups, ctx.relu), None, None


@pytest.mark.parametrize("channels_last,groups,relu", [(False, 2, True), (True, 2, False)])
def test_compiled_kernels_are_the_paper_function_in_float64(channels_last, groups, relu):
    """12 channels in 2 groups of 6: every channel but the middle two of a group has a clipped window."""
    a = (torch.rand(2, 12, 3, 4, dtype=torch.float64) - 0.3) * 30
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
    a.requires_grad_()
    assert_the_paper_function(lambda v: _Compiled.apply(v, groups, relu), a, CFG, groups, relu)
    assert torch.autograd.gradcheck(lambda v: _Compiled.apply(v, groups, relu), (a,))
    assert not lrn_cpu._broken


def test_network_float32_runs_the_compiled_kernels_and_equals_the_eager_code(monkeypatch):
    """What the network runs: float32 channels_last through local_response_norm with the compiled kernel
    chosen. Equal to the eager code to float32 rounding; the output and gradient stay channels_last; a
    second batch size reuses the kernels; evaluation's forward writes no denominator; NaN stays NaN (a
    diverged layer must show)."""
    calls = []
    real_run = lrn_cpu._run
    monkeypatch.setattr(lrn_cpu, "_run", lambda name, *a: calls.append(name) or real_run(name, *a))
    for batch in (4, 3):
        a = ((torch.rand(batch, 12, 5, 5) - 0.3) * 30).contiguous(memory_format=torch.channels_last)
        grads, outs = [], []
        for kernel in ("eager", "compiled"):
            monkeypatch.setenv(lrn_cpu.KERNEL_ENV, kernel)
            v = a.clone().requires_grad_()
            y = local_response_norm(v, CFG, 2, relu=True)
            y.backward(torch.ones_like(y))
            outs.append(y.detach())
            grads.append(v.grad)
        # No gradient wanted (evaluation): the kernel that writes no denominator, and the same bits, as
        # every compiled call gives (exact resume)
        again = local_response_norm(a, CFG, 2, relu=True)
        assert torch.equal(again, outs[1])
        torch.testing.assert_close(outs[1], outs[0], rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=2e-5, atol=1e-6)
        assert outs[1].is_contiguous(memory_format=torch.channels_last)
        assert grads[1].is_contiguous(memory_format=torch.channels_last)
    assert calls == ["cl_squares", "cl_forward", "cl_backward_t", "cl_backward_dx", "cl_squares", "cl_forward_y"] * 2
    a[0, 0, 0, 0] = float("nan")
    assert torch.isnan(local_response_norm(a, CFG, 2, relu=True)[0, 0, 0, 0])
    assert not lrn_cpu._broken


def test_the_choice_of_kernel(monkeypatch):
    """Eager unless a run or a script chooses; the environment overrides; a misspelt choice is refused,
    never silently replaced by the other kernel; float64 always stays on the exact eager code."""
    monkeypatch.delenv(lrn_cpu.KERNEL_ENV, raising=False)
    x32 = torch.ones(1, 4, 2, 2)
    assert lrn_cpu.current_kernel() == "eager" and not lrn_cpu.supported(x32)
    monkeypatch.setattr(lrn_cpu, "_kernel", "eager")
    lrn_cpu.set_kernel("compiled")
    assert lrn_cpu.supported(x32) and not lrn_cpu.supported(x32.double())
    monkeypatch.setenv(lrn_cpu.KERNEL_ENV, "eager")
    assert not lrn_cpu.supported(x32)
    monkeypatch.setenv(lrn_cpu.KERNEL_ENV, "compield")
    with pytest.raises(ValueError, match="'compield' \\(REPRO_LRN_CPU\\): choose one of eager, compiled, native"):
        lrn_cpu.supported(x32)
    with pytest.raises(ValueError, match="choose one of"):
        lrn_cpu.set_kernel("fast")


def test_benchmark_table_has_a_row_per_shape_and_layout_and_numbers_parse(capsys, monkeypatch):
    """scripts/benchmark_lrn_cpu.py: one row per (shape, layout) with both kernels' times and their
    difference; speeds are never asserted. Here, after the network test above: its shape, constants and
    thread count, so the kernels it compiled serve (a compile is seconds)."""
    monkeypatch.setattr(benchmark_lrn_cpu, "SHAPES", [("small", 12, 5, 2)])
    monkeypatch.setattr(benchmark_lrn_cpu, "LRN", CFG)
    monkeypatch.delenv("REPRO_LRN_CPU", raising=False)
    benchmark_lrn_cpu.main(["--batch", "4", "--repeats", "1", "--layouts", "channels_last",
                            "--threads", str(torch.get_num_threads())])
    lines = capsys.readouterr().out.splitlines()
    header = lines.index("| " + " | ".join(COLUMNS) + " |")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[header + 2:]]
    assert len(rows) == 1
    shape, layout, *cells = rows[0]
    assert len(cells) == 2 * 3 + 2 * 2  # fwd and fwd+bwd of three kernels; speed-up and errors of two
    times, speedups, errs = cells[:6], cells[6:8], cells[8:]
    assert (shape, layout) == ("small (4, 12, 5, 5)", "channels_last")
    # times print to 0.1 ms, which a 4x12x5x5 tensor's native kernel can round to 0.0 on a fast core (it did
    # in CI on a Zen 4); the speed-ups come from the unrounded times
    assert all(float(t) >= 0 for t in times) and all(float(s.rstrip("x")) > 0 for s in speedups)
    assert all(float(e) < 1e-5 for pair in errs for e in pair.split(" / "))  # float32 rounding: the same function


def test_benchmark_bad_layout_and_an_overriding_environment_are_clear_errors(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        benchmark_lrn_cpu.main(["--layouts", "nhwc"])
    assert "--layouts takes nchw, channels_last; got 'nhwc'" in capsys.readouterr().err
    monkeypatch.setenv("REPRO_LRN_CPU", "eager")
    with pytest.raises(SystemExit):
        benchmark_lrn_cpu.main([])
    assert "REPRO_LRN_CPU is set" in capsys.readouterr().err

