"""The GPU's LRN kernels (repro/model/lrn_triton.py), run on the CPU by Triton's interpreter in a child
process, against the float64 torch path of layers.py. tests/test_cuda.py repeats the check compiled
on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: the GPU LRN kernels are not used here")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.lrn_triton_interpreted"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", ["triton", "triton-dot"])
def test_kernels_equal_the_torch_lrn_in_float32(interpreted, kernel):
    """Both layouts, one and two groups, window 3 and 5, windows wider than a group, pixel counts that
    do not fill the last tile, programs that take several tiles (the persistent backward), and a
    gradient handed in the other layout, a one-pixel-wide tensor whose w stride is not its pixel step;
    half the two-layout cases with the ReLU fused in: float32 rounding only.
    (The interpreter multiplies "triton-dot"'s matrices in exact float32; a GPU's TF32 is checked in
    tests/test_cuda.py.)"""
    cases = interpreted["kernels"][kernel]
    assert len(cases) == 15
    assert sum(case["relu"] for case in cases) == 7
    for case in cases:
        assert case["forward"] < 1e-6 and case["backward"] < 1e-6, case
        assert case["same_strides"], case


@pytest.mark.parametrize("kernel", ["triton", "triton-dot"])
def test_kernels_in_bf16_stay_within_its_rounding(interpreted, kernel):
    case = interpreted["bf16"][kernel]
    assert case["dtype"] == "torch.bfloat16"
    assert case["forward"] < 1e-2 and case["backward"] < 1e-2, case  # bf16 keeps 8 bits: 2^-8 = 3.9e-3


@pytest.mark.parametrize("kernel", ["triton", "triton-dot"])
def test_fused_relu_keeps_nan_as_torch_relu_does(interpreted, kernel):
    """A diverged layer must show as NaN downstream, not be zeroed into a finite loss. "triton-dot"
    sums its windows as a product with a band matrix, where NaN x 0 is NaN: the NaN reaches the whole
    channel group of its pixel, a superset of the window torch's LRN gives."""
    case = interpreted["nan"][kernel]
    assert case["nan_expected"] == 5 and case["covers_nans"], case  # channels 1..5 of one pixel
    assert case["same_nans"] or kernel == "triton-dot", case


def test_compiled_autograd_function_calls_the_kernels(interpreted):
    """torch.compile(fullgraph=True) of local_response_norm, alone and with the ReLU fused, with the
    kernels admitted: the custom ops trace (schema and fake-tensor checks pass) and forward and
    backward match."""
    assert set(interpreted["compiled"]) == {"plain", "relu"}
    for case in interpreted["compiled"].values():
        assert case["opcheck"], case
        assert case["forward"] < 1e-6 and case["backward"] < 1e-6, case


def test_kernel_choice_is_checked():
    from repro.model import lrn_triton

    before = lrn_triton.current_kernel()
    with pytest.raises(ValueError, match="choose one of"):
        lrn_triton.set_kernel("cuda")
    assert lrn_triton.current_kernel() == before  # a bad name changes nothing
    try:
        lrn_triton.set_kernel("triton" if lrn_triton.AVAILABLE else "torch")
        assert not lrn_triton.supported(torch.ones(1, 4, 2, 2))  # CPU tensors keep the torch path
    finally:
        lrn_triton.set_kernel(before)


def test_a_kernel_that_cannot_run_says_how_to_do_without_it(monkeypatch):
    from repro.model import lrn_triton

    if not lrn_triton.AVAILABLE:
        pytest.skip("no triton package: the kernels are never launched")

    class Unbuildable:
        __name__ = "_lrn_forward_kernel"

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise ValueError("no kernel image for this GPU")
            return launch

    monkeypatch.setattr(lrn_triton, "_lrn_forward_kernel", Unbuildable())
    with pytest.raises(RuntimeError, match="REPRO_LRN_KERNEL=torch") as info:
        lrn_triton.lrn_forward(torch.ones(1, 4, 2, 2), 5, 1e-4, 0.75, 2.0, 1)
    assert "no kernel image for this GPU" in str(info.value) and "_lrn_forward_kernel" in str(info.value)
