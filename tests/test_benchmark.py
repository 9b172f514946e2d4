"""scripts/benchmark.py runs every form and writes its table (timings are not asserted)."""

import json
import math

import pytest
import torch

from scripts.benchmark import main, parse_args, pipeline_data


def test_benchmark_runs_every_form_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    code = main(["--device", "cpu", "--batch-sizes", "2", "--variants", "fp32", "--steps", "1", "--warmup", "0",
                 "--repeats", "1", "--numerics-batch", "2", "--json", str(out), "--markdown", str(md)])
    assert code == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["model"] for r in rows] == ["grouped", "towers", "towers-2proc", "torchvision"]
    assert all(math.isfinite(r["img_per_s"]) and r["img_per_s"] > 0 for r in rows), rows
    notes = json.loads(out.read_text())["notes"]
    assert any(n.startswith("grouped: bf16") for n in notes) and any(n.startswith("torchvision: bf16") for n in notes)
    assert "| towers-2proc b2 fp32 |" in md.read_text() and "| spread |" in md.read_text()
    assert any(n.startswith("training FLOPs per image") for n in notes)


def test_impossible_cases_are_clear_errors():
    import torch

    from repro.bench import Case, check_case

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA graph needs a CUDA device"):
        check_case(Case("grouped", 2, "bf16", True, "none", graph=True), cpu)
    with pytest.raises(ValueError, match="max-autotune captures its own"):
        check_case(Case("grouped", 2, "bf16", True, "max-autotune", graph=True), torch.device("cuda"))
    with pytest.raises(ValueError, match="not captured"):
        check_case(Case("towers-2proc", 2, graph=True), torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown model"):
        check_case(Case("resnet", 2), cpu)
    check_case(Case("towers", 2, "bf16", True, "default", graph=True), torch.device("cuda"))  # allowed


def test_graph_variants_are_skipped_without_a_gpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["--device", "cpu", "--models", "grouped", "--batch-sizes", "2", "--variants", "bf16-cl-graph",
                 "--steps", "1", "--warmup", "0", "--repeats", "1", "--no-numerics", "--json", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["results"] == []
    assert "grouped b2 bf16 CL graph: skipped" in capsys.readouterr().out


def test_pipelines_from_memory_jpeg_files_and_the_store(tmp_path, capsys):
    """--pipeline times the training loop on Fashion-MNIST's images as JPEG files and on their stored
    form; the tree and store are built once and hold what the source holds."""
    import numpy as np
    from PIL import Image

    from repro.data.fashion_mnist import fashion_mnist
    from repro.data.jpeg_tree import write_jpeg_tree
    from repro.data.store import StoreSource
    from tests.test_fashion_mnist import make_tree

    make_tree(tmp_path / "fm", n_train=40, n_test=12)
    out, jpeg = tmp_path / "bench.json", tmp_path / "jpeg"
    args = ["--device", "cpu", "--models", "grouped", "--variants", "fp32", "--batch-sizes", "2", "--steps", "1",
            "--warmup", "1", "--repeats", "1", "--no-numerics", "--data", str(tmp_path / "fm"), "--workers", "0",
            "--pipeline", "jpeg-folder", "jpeg-store", "jpeg-store-cpu", "--jpeg-dir", str(jpeg),
            "--jpeg-images", "20", "--json", str(out)]
    assert main(args) == 0
    notes = [n for n in json.loads(out.read_text())["notes"] if n.startswith("pipeline")]
    assert [n.split(",")[0] for n in notes] == ["pipeline jpeg-folder", "pipeline jpeg-store",
                                                "pipeline jpeg-store-cpu"]
    assert [pipeline_data(p, parse_args(args))[3] for p in ("jpeg-store", "jpeg-store-cpu")] == ["gpu", "cpu"]
    train_files = sorted((jpeg / "tree-20" / "train").glob("*/*.jpg"))
    assert len(train_files) == 20 and len(list((jpeg / "tree-20" / "val").glob("*/*.jpg"))) == 12
    assert len(StoreSource(jpeg / "store-20", "train")) == 20 and len(StoreSource(jpeg / "store-20", "val")) == 12
    # A file is its source image, grey to RGB, at 256x256: its mean brightness follows the source's.
    source = fashion_mnist(tmp_path / "fm", "train", download=False)
    first = np.asarray(Image.open(train_files[0]))
    index = int(train_files[0].stem)
    assert first.shape == (256, 256, 3) and train_files[0].parent.name.startswith(f"{int(source.labels[index]):d}-")
    assert abs(first.mean() - source.images[index].float().mean().item()) < 3
    stamp = (jpeg / "tree-20" / "tree.json").stat().st_mtime_ns
    splits = {"train": source, "val": fashion_mnist(tmp_path / "fm", "test", download=False)}
    write_jpeg_tree(splits, jpeg / "tree-20", {"train": 20, "val": 1000})  # built once: a second call keeps it
    assert (jpeg / "tree-20" / "tree.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="holds a JPEG tree of"):
        write_jpeg_tree(splits, jpeg / "tree-20", {"train": 30, "val": 1000})


def test_unknown_pipeline_is_a_clear_error(capsys):

    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--pipeline", "cifar"])
    assert "unknown pipeline" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "--steps: must be >= 1"), (["--repeats", "0"], "--repeats: must be >= 1"),
    (["--batch-sizes", "8", "0"], "--batch-sizes: must be >= 1"), (["--warmup", "-1"], "--warmup: must be >= 0"),
    (["--json", "."], "not a file this user can write"), (["--markdown", "no/such/dir/b.md"], "not a file"),
    (["--pipeline", "imagenet"], "--pipeline imagenet needs its data"), (["--device", "gpu"], "is not a device")])
def test_bad_flags_fail_before_any_timing(flags, message, capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cpu", *flags])
    assert message in capsys.readouterr().err


def test_flops_per_image_match_the_layer_table():
    """Forward, weight gradients, and input gradients of every layer but conv1 (the image needs
    none), from the layer table's shapes (paper section 3.5): 2 FLOPs per multiply-add."""
    from repro.bench import train_flops_per_image

    # (output side, output channels, kernel side, input channels, groups) and fully connected (in, out)
    convs = [(55, 96, 11, 3, 1), (27, 256, 5, 96, 2), (13, 384, 3, 256, 1), (13, 384, 3, 384, 2), (13, 256, 3, 384, 2)]
    fcs = [(9216, 4096), (4096, 4096), (4096, 1000)]
    macs = [side * side * out * k * k * cin // groups for side, out, k, cin, groups in convs] + [a * b for a, b in fcs]
    expected = 2 * (sum(macs) + sum(macs) + sum(macs[1:]))
    assert train_flops_per_image("grouped") == expected  # about 4.14 GFLOP

def test_a_failure_after_the_cases_still_writes_their_table(tmp_path, capsys, monkeypatch):
    import scripts.benchmark as bench_script

    def broken(*_args, **_kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench_script, "numerics", broken)
    monkeypatch.setattr(bench_script, "ceilings", broken)
    out = tmp_path / "bench.json"
    code = main(["--device", "cpu", "--models", "grouped", "--batch-sizes", "2", "--variants", "fp32", "--steps", "1",
                 "--warmup", "0", "--repeats", "1", "--numerics-batch", "2", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert [r["model"] for r in doc["results"]] == ["grouped"]
    assert any(n.startswith("grouped numerics failed: RuntimeError: CUDA error") for n in doc["notes"])
    assert any(n.startswith("ceilings failed") for n in doc["notes"])
    assert "| grouped b2 fp32 |" in capsys.readouterr().out


def test_a_small_jpeg_tree_still_gives_every_class_an_image(tmp_path):
    """Three evenly spaced images cannot cover ten classes: each class gets its first image, so that
    no training class folder is empty (an error when the tree is read)."""
    from repro.data.fashion_mnist import fashion_mnist
    from repro.data.folder import image_folder
    from repro.data.jpeg_tree import write_jpeg_tree
    from tests.test_fashion_mnist import make_tree

    make_tree(tmp_path / "fm", n_train=20, n_test=4)
    splits = {"train": fashion_mnist(tmp_path / "fm", "train", download=False),
              "val": fashion_mnist(tmp_path / "fm", "test", download=False)}
    tree = write_jpeg_tree(splits, tmp_path / "tree", {"train": 3, "val": 2}, workers=0)
    train = image_folder(tree / "train")
    assert train.num_classes == 10 and sorted(set(train.labels.tolist())) == list(range(10))


def test_profile_counts_each_kernels_time_once():
    """The profiler repeats a kernel's time on the op that launched it (the H200 profile of 2026-12-04
    read 20.7 ms per step where its own table said 10.2): only the kernels' rows may be summed."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from scripts.profile_step import kernel_time

    def row(us, device, annotation=False):
        return SimpleNamespace(self_device_time_total=us, device_type=device, is_user_annotation=annotation)

    events = [row(650.0, DeviceType.CPU),        # aten::cudnn_convolution, holding its kernel's time
              row(650.0, DeviceType.CUDA),       # the kernel
              row(288.0, DeviceType.CUDA, True),  # Optimizer.step's annotation on the GPU timeline
              row(120.0, DeviceType.CUDA)]
    assert kernel_time(events) == 770.0


def test_profile_report_prints_its_total_and_table(capsys):
    """report() on a real profile (the CPU's here: its GPU time is 0), so the printing path runs in CI."""
    from torch.profiler import ProfilerActivity, profile

    from scripts.profile_step import report

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64) @ torch.ones(64, 64)
    report("cpu matmul", prof.key_averages(), steps=1, top=5)
    out = capsys.readouterr().out
    assert "== cpu matmul: 0.00 ms of kernel time per step" in out and "aten::mm" in out
