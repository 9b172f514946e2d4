"""The command-line entry points, run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_fashion_mnist import make_tree

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(args, **kw):
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, **kw)


def test_torchrun_two_towers_end_to_end(tmp_path):
    make_tree(tmp_path / "data", n_train=16, n_test=6)
    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    r = run([str(torchrun), "--nproc_per_node=2", "scripts/train_two_gpu.py", "--data", str(tmp_path / "data"),
             "--max-steps", "2", "--batch-size", "4", "--out", str(out), "--workers", "0", "--log-every", "1",
             "--device", "cpu"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 tower(s)" in r.stdout and "NOT comparable" in r.stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [row["crops"] for row in rows] == [1, 10] and all(row["images"] == 6 for row in rows)
    assert (out / "latest.pt").exists() and (out / "metrics.jsonl").exists()


def test_bad_flags_give_a_clear_error(tmp_path, capsys):
    from scripts.train_two_gpu import main  # in this process: the exit code and stderr are main()'s

    assert main(["--dataset", "imagenet", "--out", str(tmp_path)]) == 2
    assert "error: --dataset imagenet needs --data DIR" in capsys.readouterr().err
    assert main(["--dataset", "folder", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "new")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # a launch that failed in setup leaves no empty run folder
    for flags, message in ((["--log-every", "0"], "--log-every (log_every) must be >= 1, got 0"),
                           (["--eval-batch-size", "0"], "--eval-batch-size"),
                           (["--epochs", "0"], "--epochs (epochs) must be >= 1, got 0"),
                           (["--max-steps", "0"], "--max-steps (max_steps) must be >= 1"),
                           (["--lr", "nan"], "--lr (lr) must be a positive number, got nan"),
                           (["--weight-decay", "inf"], "--weight-decay"), (["--bias-lr-mult", "nan"], "--bias-lr-mult"),
                           (["--val-images", "0"], "val_images must be at least 1"),
                           (["--momentum", "1.5"], "momentum"), (["--patience", "0"], "--patience"),
                           (["--schedule", "milestones", "--patience", "2"], "--patience applies to --schedule plateau"),
                           (["--milestones", "5"], "--milestones applies to --schedule milestones"),
                           (["--schedule", "milestones", "--milestones", "1", "2", "3", "4"], "at most 3 drops"),
                           (["--seed", str(2 ** 63)], "--seed (seed) must be in [0, 2^63)"),
                           (["--seed", "-1"], "--seed (seed) must be in [0, 2^63)")):
        assert main(flags + ["--out", str(tmp_path)]) == 2, flags  # before any data is read
        assert message in capsys.readouterr().err, flags
    old = tmp_path / "old-run"
    old.mkdir()
    (old / "latest.pt").write_text("")
    assert main(["--max-steps", "1", "--out", str(old)]) == 2  # a fresh run would overwrite it
    assert f"--out {old} already holds a run (latest.pt): --resume {old} continues" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main(["--max-steps", "1", "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    torch_ckpt = tmp_path / "weights.pt"
    import torch

    torch.save({"fc8.weight": torch.zeros(10, 4096)}, torch_ckpt)
    assert main(["--resume", str(old), "--max-steps", "9"]) == 2
    assert f"{old / 'latest.pt'} could not be read as a checkpoint" in capsys.readouterr().err
    assert main(["--resume", str(torch_ckpt), "--out", str(tmp_path)]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


def test_speed_flags_reach_the_config():
    import pytest

    from repro.config import TrainConfig
    from scripts.train_two_gpu import build_config, parse_args

    cfg = build_config(parse_args(["--compile-mode", "max-autotune", "--amp", "bf16", "--channels-last",
                                   "--max-steps", "1", "--out", "unused"]))
    assert (cfg.compile, cfg.compile_mode, cfg.amp, cfg.channels_last) == (True, "max-autotune", "bf16", True)
    cfg = build_config(parse_args(["--compile", "--max-steps", "1", "--out", "unused"]))
    assert (cfg.compile, cfg.compile_mode) == (True, "default")
    assert not build_config(parse_args(["--max-steps", "1", "--out", "unused"])).compile
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainConfig(compile_mode="fastest")


def test_decode_flag_reaches_the_config_and_is_checked():
    import pytest

    from repro.config import DataConfig
    from scripts.train_two_gpu import build_config, parse_args

    assert build_config(parse_args(["--max-steps", "1", "--out", "unused"])).data.decode == "gpu"
    assert build_config(parse_args(["--decode", "cpu", "--max-steps", "1", "--out", "unused"])).data.decode == "cpu"
    with pytest.raises(ValueError, match="--decode"):
        DataConfig(decode="tpu")


def test_without_a_gpu_the_budget_and_the_evaluation_size_default_separately(capsys):
    from scripts.train_two_gpu import CPU_BUDGET, build_config, parse_args

    plain = build_config(parse_args(["--device", "cpu", "--out", "unused"]))
    assert (plain.max_steps, plain.batch_size, plain.data.val_images, plain.data.stats_images) == \
        (CPU_BUDGET["max_steps"], CPU_BUDGET["batch_size"], CPU_BUDGET["val_images"], CPU_BUDGET["stats_images"])
    # --max-steps says how long; validation stays small, or five steps would end in an hour of evaluation
    short = build_config(parse_args(["--device", "cpu", "--max-steps", "5", "--out", "unused"]))
    assert (short.max_steps, short.batch_size, short.data.val_images) == (5, 128, CPU_BUDGET["val_images"])
    full = build_config(parse_args(["--device", "cpu", "--epochs", "2", "--val-images", "10000", "--out", "unused"]))
    assert (full.max_steps, full.epochs, full.data.val_images) == (None, 2, 10000)
    out = capsys.readouterr().out
    assert "validation on 300" in out and "short CPU budget" in out
    assert "the paper's batch of 128 images per step (--batch-size to choose" in out  # the --max-steps 5 run's
    build_config(parse_args(["--device", "cpu", "--batch-size", "4", "--out", "unused"]))
    assert "(60 steps of 4 images;" in capsys.readouterr().out  # the budget's steps, the given batch


def test_flags_declared_on_config_fields_reach_the_config_and_win_over_the_preset():
    import pytest

    from scripts.train_two_gpu import RECIPE_SETTINGS, RESUME_FLAGS, build_config, check_resume_flags, parse_args

    base = ["--max-steps", "1", "--out", "unused", "--comm-timeout", "30"]
    cfg = build_config(parse_args(base + ["--conv1-ceil", "--relu1-after-pool", "--same-map-norm2",
                                          "--init-std-conv3-5", "0.03", "--bias-lr-fixed", "--pca-off-epoch", "5",
                                          "--pca-rescale", "--mean-crop", "centre", "--crop-chunk", "8",
                                          "--layer-lr-change", "conv1", "6", "1e-5", "0.02",
                                          "--layer-lr-change", "conv2", "7", "0", "0"]))
    m, o, d = cfg.model, cfg.optim, cfg.data
    assert (m.conv1_ceil, m.relu1_after_pool, m.same_map_norm2, m.init_std_conv3_5) == (True, True, True, 0.03)
    assert o.bias_lr_fixed and o.layer_lr_changes == (("conv1", 6, 1e-5, 0.02), ("conv2", 7, 0.0, 0.0))
    assert (d.pca_off_epoch, d.pca_rescale, d.mean_crop, d.crop_chunk, cfg.comm_timeout) == (5, True, "centre", 8, 30)
    plain = build_config(parse_args(base))
    assert (plain.model.conv1_ceil, plain.data.crop_chunk, plain.optim.layer_lr_changes) == (False, 1, ())
    preset = build_config(parse_args(base + ["--variant", "cuda-convnet-2012", "--crop-chunk", "4"]))
    assert preset.data.crop_chunk == 4 and preset.data.mean_crop == "centre"  # the flag wins; the rest is the preset's
    # recipe or runtime, as declared: a declared recipe flag that differs on --resume is refused
    assert "comm_timeout" in RESUME_FLAGS and "crop_chunk" in RECIPE_SETTINGS
    with pytest.raises(ValueError, match="--crop-chunk 4 with --resume: the checkpoint's run has --crop-chunk 32"):
        check_resume_flags(preset, build_config(parse_args(base + ["--variant", "cuda-convnet-2012"])), {"crop_chunk"})
    with pytest.raises(ValueError, match="--layer-lr-change takes LAYER EPOCH W B"):
        build_config(parse_args(base + ["--layer-lr-change", "conv1", "six", "0", "0"]))


def test_gpu_session_refuses_bad_stages_and_missing_data_before_creating_anything(tmp_path):
    """scripts/gpu_session.sh runs on a lent GPU machine, where a wrong call costs device time: its argument
    checks answer at once, with what to pass, and leave no folder behind."""
    out = tmp_path / "out"
    r = run(["bash", "scripts/gpu_session.sh", "issue19", str(out)])
    assert r.returncode == 2 and "unknown stage 'issue19'" in r.stderr and "issue18" in r.stderr
    r = run(["bash", "scripts/gpu_session.sh", "issue18", str(out)])
    assert r.returncode == 2 and "stage issue18 needs FMNIST_DIR" in r.stderr
    r = run(["bash", "scripts/gpu_session.sh", "issue18"])
    assert r.returncode == 2 and "needs OUT_DIR" in r.stderr
    assert not out.exists()
    r = run(["bash", "scripts/gpu_session.sh", "--help"])
    assert r.returncode == 0 and "issue18 OUT_DIR FMNIST_DIR" in r.stdout
