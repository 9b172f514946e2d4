"""The GPU paths: each form on a CUDA device computes what the CPU tests prove, and what only runs
there (compiled LRN kernels, bf16, the whole-step CUDA graph, two ranks sharing one GPU over gloo,
nvJPEG decoding, device-side augmentation, training) agrees with its CPU counterpart.

Skipped where torch sees no GPU (CI). On a lent GPU: `python -m pytest -q tests/test_cuda.py`
(scripts/gpu_session.sh runs it first). One GPU is enough: "towers" here share cuda:0.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from repro import AlexNet, DistributedTowerAlexNet, ModelConfig, TwoTowerAlexNet
from repro.config import DataConfig, LRNConfig, OptimConfig
from repro.data.augment import Augment, Stats, draw_params, step_generator
from repro.model import lrn_triton
from repro.model.convert import towers_to_grouped
from repro.model.layers import local_response_norm
from repro.optim import paper_optimizer
from tests.conftest import SMALL, run_distributed
from tests.equivalence import assert_same, exercise, relative_error, training_check_config
from tests.test_store import store, tree  # noqa: F401  (fixtures)
from tests.test_train import data_root, tiny_config  # noqa: F401  (fixture, helper)
from tests.test_two_tower import towers_result

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CFG = ModelConfig()
GPU = torch.device("cuda", 0)


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 means float32 here: TF32 convolutions and matmuls would differ from the CPU at ~1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# float64 pins the GPU kernels to the CPU's arithmetic; float32 allows for cuDNN's algorithms
# (Winograd, FFT), whose float32 error is larger than the CPU's direct convolution: conv2's weight
# gradient differed by 1.95e-4 on an H100 (torch 2.11, TF32 off), over the 1e-4 first allowed.
GPU_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-3}


def _same(got: dict, expected: dict, dtype: torch.dtype, what: str) -> None:
    assert_same(got, expected, dtype, what, tolerance=GPU_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_grouped_and_towers_on_gpu_equal_grouped_on_cpu(dtype, grouped_reference):
    """Logits at full size; gradients and training on training_check_config's network (float32 at
    full size meets max-pool near-ties as small as its rounding: tests/equivalence.py)."""
    checks = {CFG: ["eval_logits", "train_logits"]}
    checks.setdefault(training_check_config(dtype), []).extend(["grads", "state", "velocity"])
    for cfg, keys in checks.items():  # float64: one full-size run for all of them
        cpu = grouped_reference(dtype, cfg)
        torch.manual_seed(0)
        grouped = exercise(AlexNet(config=cfg).to(GPU, dtype), cfg, dtype)
        torch.manual_seed(0)
        towers = towers_result(exercise(TwoTowerAlexNet(devices=(GPU, GPU), config=cfg).to(dtype), cfg, dtype,
                                        "towers."), cfg)
        for name, got in (("grouped on GPU", grouped), ("towers on GPU", towers)):
            for key in keys:
                if key.endswith("logits"):
                    err = relative_error(got[key], cpu[key])
                    assert err <= GPU_TOLERANCE[dtype], f"{name} {key}: {err:.3g}"
                else:
                    _same(got[key], cpu[key], dtype, f"{name} {key}")
        if "grads" in keys:  # and the towers and the grouped form on the same GPU agree with each other
            _same(towers["grads"], grouped["grads"], dtype, "towers vs grouped on GPU")


def _tower_on_the_gpu(rank, world):
    torch.manual_seed(0)
    model = DistributedTowerAlexNet(CFG, None, GPU).to(torch.float64)
    return exercise(model, CFG, torch.float64, "tower.")


def test_two_ranks_on_one_gpu_over_gloo_equal_grouped(tmp_path, grouped_reference):
    """What `torchrun --nproc_per_node=2` does on a one-GPU machine: both towers on cuda:0, gloo."""
    ranks = run_distributed(_tower_on_the_gpu, 2, tmp_path)
    expected = grouped_reference(torch.float64)
    assert relative_error(ranks[0]["train_logits"], expected["train_logits"]) <= 1e-10
    for key in ("grads", "state", "velocity"):
        _same(towers_to_grouped([r[key] for r in ranks], CFG), expected[key], torch.float64, key)


def test_bf16_compiled_network_within_the_reference_networks_error():
    """bf16 + channels_last + compile against eager float32, same weights, dropout off: our network's
    errors stay in the range torchvision's AlexNet shows under the same treatment."""
    from repro.bench import numerics

    ours = numerics(GPU, "grouped", batch=32)
    reference = numerics(GPU, "torchvision", batch=32)
    assert ours["logits"] < 2e-2, ours
    for key, err in ours.items():
        assert err < 3 * reference[key] + 0.05, (key, ours, reference)


@pytest.mark.parametrize("compiled_update", [False, True], ids=["eager-update", "compiled-update"])
def test_whole_step_cuda_graph_replays_the_eager_step(compiled_update):
    """The benchmark's captured step against eager steps. With the compiled update (--compile) the
    rate lives in a device tensor, so a replay after set_lr uses the new rate; the eager update's
    rate is frozen into the captured kernels, so that case keeps one rate."""
    from repro.bench import capture_step

    torch.manual_seed(0)
    eager = AlexNet(config=SMALL).to(GPU, torch.float64)
    graphed = copy.deepcopy(eager)
    x = torch.randn(8, 3, 67, 67, device=GPU, dtype=torch.float64) * 50
    y = torch.randint(0, 10, (8,), device=GPU)

    def stepper(net, compiled):
        opt = paper_optimizer(net, OptimConfig(), compiled=compiled)

        def step():
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step, opt

    step_eager, opt_eager = stepper(eager, False)
    step_graphed, opt_graphed = stepper(graphed, compiled_update)
    replay = capture_step(step_graphed, warmup=3)  # 3 real steps, then a captured one
    replay()
    replay()
    for _ in range(5):
        step_eager()
    if compiled_update:
        for opt in (opt_graphed, opt_eager):
            opt.set_lr(0.001)
        replay()
        step_eager()
    torch.cuda.synchronize()
    got, expected = graphed.state_dict(), eager.state_dict()
    steps = 6 if compiled_update else 5
    assert int(got["drop6.step"]) == int(expected["drop6.step"]) == steps  # masks advanced per replay
    for k in expected:
        assert relative_error(got[k].double(), expected[k].double()) < 1e-10, k
    v_got = opt_graphed.velocities(graphed.named_parameters())
    v_exp = opt_eager.velocities(eager.named_parameters())
    for k in v_exp:
        assert relative_error(v_got[k], v_exp[k]) < 1e-10, k


def test_augmentation_on_gpu_equals_cpu():
    g = torch.Generator().manual_seed(0)
    stats = Stats(mean_image=torch.rand(256, 256, 3, generator=g) * 255, eigvals=torch.tensor([0.2, 0.02, 0.004]),
                  eigvecs=torch.linalg.qr(torch.randn(3, 3, generator=g))[0], images=1)
    cfg = DataConfig()
    params = draw_params(6, cfg, step_generator(0, 0, 0, 0))
    cpu, gpu = Augment(cfg, stats, "cpu"), Augment(cfg, stats, GPU)
    for images, atol in ((torch.randint(0, 256, (6, 256, 256, 3), dtype=torch.uint8, generator=g), 1e-4),
                         (torch.randint(0, 256, (6, 300, 280, 3), dtype=torch.uint8, generator=g), 1e-2),
                         (torch.randint(0, 256, (6, 28, 28, 1), dtype=torch.uint8, generator=g), 1e-2)):
        expected = cpu.train_batch(images, params)
        got = gpu.train_batch(images.to(GPU), params)
        assert got.device.type == "cuda" and got.shape == expected.shape == (6, 3, 227, 227)
        assert torch.allclose(got.cpu(), expected, atol=atol), (got.cpu() - expected).abs().max()
        assert torch.allclose(gpu.eval_batch(images.to(GPU), 10).cpu(), cpu.eval_batch(images, 10), atol=atol)


def test_stored_jpegs_decode_on_the_gpu_like_on_the_cpu(store):  # noqa: F811
    from repro.data.loader import decode_on_device
    from repro.data.store import StoreSource

    train = StoreSource(store, "train")
    idx = torch.arange(len(train))
    got = decode_on_device(train.encoded_batch(idx), GPU)
    expected = torch.stack([train[int(i)][0] for i in idx])
    assert got.device.type == "cuda" and got.dtype == torch.uint8 and got.shape == expected.shape
    # nvJPEG and libjpeg-turbo differ in IDCT and chroma upsampling rounding: a level or two on average.
    diff = (got.cpu().float() - expected.float()).abs()
    assert diff.mean() < 2.0, diff.mean()


def _train_without_tf32(rank, world, cfg_dict):
    from repro.config import TrainConfig
    from repro.train import train

    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    train(TrainConfig.from_dict(cfg_dict))


def _weights(run_dir) -> dict:
    from repro.checkpoint import read

    return read(str(run_dir / "latest.pt"), "cpu")["model"]


def test_two_tower_training_on_one_gpu_follows_the_cpu_run(data_root, tmp_path):  # noqa: F811
    """The training script's path with both ranks on cuda:0 (gloo): after 4 steps its weights are
    the CPU run's to float32 accuracy (augmentation, dropout and data order are the same)."""
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = dataclasses.replace(tiny_config(data_root, tmp_path / device), device=device, max_steps=4)
        run_distributed(_train_without_tf32, 2, tmp_path / f"{device}-ranks", cfg.to_dict())
        runs[device] = _weights(tmp_path / device)
    for k, v in runs["cpu"].items():
        if v.is_floating_point():
            assert relative_error(runs["cuda"][k], v) < 1e-3, k


def test_a_training_step_never_makes_the_host_wait(data_root, tmp_path):  # noqa: F811
    """The per-step path of training (a batch from the in-memory source, its augmentation on the GPU,
    forward, loss, backward, the paper's SGD step, the error counts kept on the device) issues no
    synchronising CUDA call, so the host queues step n+1 while the GPU runs step n. (Log lines and the
    SIGTERM check synchronise by design, every --log-every and every 20 steps.)"""
    from repro.data.loader import iterate, train_batches
    from repro.dist import init_topology, shutdown
    from repro.evaluate import RunningCounts
    from repro.run_setup import setup
    from repro.train import train_step

    cfg = dataclasses.replace(tiny_config(data_root, tmp_path / "run"), device="cuda")
    topo = init_topology(cfg.device, cfg.backend)
    try:
        run, counts = setup(cfg, topo), RunningCounts()
        lists = train_batches(len(run.data.train_set), cfg.batch_size, 1, 0, cfg.seed, 0, 0)[:3]
        batches = list(iterate(run.data.train_set, lists, 0, True, topo.device))
        train_step(run, batches[0], draw_params(cfg.batch_size, cfg.data, step_generator(cfg.seed, 0, 0, 0)), counts)
        torch.cuda.synchronize()  # warm-up done (lazy optimiser state, cuDNN's choices)
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i, batch in enumerate(batches[1:], start=1):
                params = draw_params(cfg.batch_size, cfg.data, step_generator(cfg.seed, 0, i, 0))
                train_step(run, batch, params, counts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        shutdown()


def test_grouped_training_with_bf16_channels_last_and_compile(data_root, tmp_path):  # noqa: F811
    """`--nproc_per_node=1 --amp bf16 --channels-last --compile` on the GPU: trains, validates,
    checkpoints, resumes, and the checkpoint loads on the CPU."""
    from repro import load_checkpoint
    from repro.train import train

    cfg = dataclasses.replace(tiny_config(data_root, tmp_path / "run"), device="cuda", amp="bf16",
                              channels_last=True, compile=True, epochs=1, max_steps=3, final_crops=(1,))
    train(cfg)
    resumed = train(dataclasses.replace(cfg, max_steps=None), resume=str(tmp_path / "run"))
    assert 0 <= resumed[1].top1_error <= 100 and resumed[1].images == 30
    net = load_checkpoint(tmp_path / "run" / "latest.pt")
    assert isinstance(net, AlexNet)
    out = net.eval()(torch.randn(2, 3, 67, 67))
    assert torch.isfinite(out).all()
    on_gpu = load_checkpoint(tmp_path / "run" / "latest.pt", map_location="cuda")  # the network itself moves
    assert {p.device.type for p in on_gpu.parameters()} == {"cuda"}
    assert on_gpu(torch.randn(2, 3, 67, 67, device="cuda")).shape == out.shape


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.skipif(not lrn_triton.AVAILABLE, reason="needs Triton")
def test_lrn_kernels_run_on_their_tensors_gpu_not_the_current_one():
    """Triton launches on the current device's stream; tower 1 on cuda:1 while cuda:0 is current
    (evaluate.py --form towers, the benchmark's towers) must still run on cuda:1."""
    cfg = LRNConfig()
    x = torch.randn(4, 96, 27, 27, dtype=torch.float64) * 3
    g = torch.randn_like(x)
    x_ref = x.clone().requires_grad_()
    y_ref = local_response_norm(torch.relu(x_ref), cfg, groups=2)
    y_ref.backward(g)
    second = torch.device("cuda", 1)
    before = lrn_triton.current_kernel()
    for kernel in [k for k in lrn_triton.KERNELS if k != "torch"]:
        lrn_triton.set_kernel(kernel)
        try:
            with torch.cuda.device(0):
                x_1 = x.to(second, torch.float32).requires_grad_()
                y_1 = local_response_norm(x_1, cfg, groups=2, relu=True)
                y_1.backward(g.to(second, torch.float32))
                torch.cuda.synchronize(second)
        finally:
            lrn_triton.set_kernel(before)
        assert relative_error(y_1.detach().cpu(), y_ref) < 1e-6, kernel
        assert relative_error(x_1.grad.cpu(), x_ref.grad) < 1e-6, kernel


# Last in the file: inductor's compiled ReLU + LRN backward faulted (illegal address) on torch 2.11 in an
# earlier session, and a CUDA fault poisons every later test of the process.
@pytest.mark.parametrize("channels_last,relu", [(False, False), (True, True)])
def test_compiled_lrn_on_gpu_matches_cpu(channels_last, relu):
    """relu: the network's form, ReLU folded into the LRN (checked on the CPU side against torch's ReLU)."""
    cfg = LRNConfig()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(4, 96, 27, 27, dtype=torch.float64) * 3).contiguous(memory_format=fmt)
    g = torch.randn_like(x)
    x_cpu = x.clone().requires_grad_()
    y_cpu = local_response_norm(torch.relu(x_cpu) if relu else x_cpu, cfg, groups=2)
    y_cpu.backward(g)
    lrn = torch.compile(lambda t: local_response_norm(t, cfg, groups=2, relu=relu))
    before = lrn_triton.current_kernel()
    x_gpu = x.to(GPU).detach().clone().requires_grad_()
    y_gpu = lrn(x_gpu)
    y_gpu.backward(g.to(GPU))
    assert relative_error(y_gpu.cpu(), y_cpu) < 1e-12
    assert relative_error(x_gpu.grad.cpu(), x_cpu.grad) < 1e-12
    # Each kernel choice (float64 above always keeps the torch path) in float32, to its rounding, and
    # in bf16, as under autocast after a bf16 convolution, to bf16's rounding of the float64 result.
    for kernel in lrn_triton.KERNELS if lrn_triton.AVAILABLE else ("torch",):
        torch._dynamo.reset()  # the choice is read while tracing: trace again for each
        lrn_triton.set_kernel(kernel)
        try:
            x_32 = x.to(GPU, torch.float32).detach().requires_grad_()
            y_32 = lrn(x_32)
            y_32.backward(g.to(GPU, torch.float32))
            x_bf = x.to(GPU, torch.bfloat16).detach().requires_grad_()
            y_bf = lrn(x_bf)
            y_bf.backward(g.to(GPU, torch.bfloat16))
        finally:
            lrn_triton.set_kernel(before)
        assert relative_error(y_32.detach().cpu(), y_cpu) < 1e-6, kernel
        assert relative_error(x_32.grad.cpu(), x_cpu.grad) < 1e-6, kernel
        assert relative_error(y_bf.detach().cpu(), y_cpu) < 2e-2, kernel
        assert relative_error(x_bf.grad.cpu(), x_cpu.grad) < 5e-2, kernel
