"""Training end to end on a tiny Fashion-MNIST-format set: two towers in two gloo processes,
exact resume, identical batches on both towers, stopping on SIGTERM, and the grouped form."""

import dataclasses
import json
import math
import os
import signal

import pytest
import torch

from repro.checkpoint import read
from repro.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from repro.dist import init_topology
from tests.conftest import SMALL_FC, run_distributed
from tests.test_fashion_mnist import make_tree


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    make_tree(root, n_train=96, n_test=30)
    return root


def tiny_config(root, out, **kw) -> TrainConfig:
    # 67-pixel crops of 76-pixel images keep every layer and exchange at ~1% of the cost.
    return TrainConfig(model=ModelConfig(num_classes=10, image_size=67, widths=SMALL_FC),
                       optim=OptimConfig(schedule="milestones", milestones=(1,)),  # a drop after epoch 0
                       data=DataConfig(root=str(root), base_size=76, crop_size=67, workers=0),
                       epochs=3, batch_size=24, out=str(out), log_every=2, eval_batch_size=16,
                       final_crops=(), device="cpu", **kw)


def _train(rank, world, cfg_dict, resume, hooks):
    from repro import run_setup
    from repro import train as train_module

    cfg = TrainConfig.from_dict(cfg_dict)
    seen = []
    if hooks.get("hide_checkpoints_from") == rank:  # as on a node without the run directory
        def no_file(path, *_args):
            raise FileNotFoundError(f"rank {rank} cannot see {path}")

        run_setup.read = no_file
    if "nan_loss_at" in hooks or "nan_weights_at" in hooks:  # as if diverged at that (1-based) step
        real = train_module.train_step

        def nan_step(run, batch, params, counts):
            loss = real(run, batch, params, counts)
            step = run.progress.global_step + 1
            if step == hooks.get("nan_weights_at") and rank == 0:  # the update, not the loss, went bad
                next(run.replica.net.parameters()).data.fill_(float("nan"))
            return loss * float("nan") if step == hooks.get("nan_loss_at") else loss

        train_module.train_step = nan_step
        try:
            train_module.train(cfg, resume)
        except train_module.RunDiverged as exc:
            return str(exc)  # every rank must get here: none may wait for the others
        return "trained on"
    if hooks.get("record"):
        from repro.data.augment import Augment

        real_batch = Augment.train_batch

        def record(self, images, params):
            x = real_batch(self, images, params)
            seen.append(float(x.double().sum()))
            return x

        Augment.train_batch = record
    if "sigterm_rank" in hooks:
        real_step = train_module.train_step

        def step(run, batch, params, counts):
            loss = real_step(run, batch, params, counts)
            if rank == hooks["sigterm_rank"] and run.progress.global_step == 2:
                os.kill(os.getpid(), getattr(signal, hooks.get("signal", "SIGTERM")))  # arrives in step 3
            return loss

        train_module.train_step = step
    train_module.train(cfg, resume)
    return seen


def run(tmp_path, cfg, resume=None, hooks=None, world=2):
    return run_distributed(_train, world, tmp_path, cfg.to_dict(), resume, hooks or {})


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, data_root):
    whole = tiny_config(data_root, tmp_path / "whole", max_steps=7)  # 4 steps per epoch: crosses one
    seen = run(tmp_path / "w", whole, hooks={"record": True})
    # Both towers of the pair built the same augmented batch at every step, and batches differ.
    assert len(seen[0]) == 7 and seen[0] == seen[1] and len(set(seen[0])) == 7
    part = tiny_config(data_root, tmp_path / "part", max_steps=3)
    run(tmp_path / "p1", part)
    assert read(tmp_path / "part" / "latest.pt")["progress"]["global_step"] == 3
    # Rank 1 cannot read the run directory (a second node without a shared filesystem): rank 0 sends it.
    run(tmp_path / "p2", dataclasses.replace(part, max_steps=7), resume=str(tmp_path / "part"),
        hooks={"hide_checkpoints_from": 1})
    a, b = read(tmp_path / "whole" / "latest.pt"), read(tmp_path / "part" / "latest.pt")
    assert a["progress"] == b["progress"] == {"epoch": 1, "step_in_epoch": 3, "global_step": 7}
    assert a["schedule"] == b["schedule"] and a["schedule"]["drops"] == 1  # a drop happened in between
    for key in ("model", "velocity"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key} {name} differs after resume"
    assert a["model"]["drop6.step"].item() == 7  # dropout masks advanced once per step
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in
             (tmp_path / "part" / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in line]
    assert steps == list(range(1, 8))  # the log continues without gaps or repeats
    # The epoch the resume fell into reports all its steps' training errors, not only those after it.
    epochs = [[json.loads(line) for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()
               if '"kind": "epoch"' in line] for run_dir in ("whole", "part")]
    assert len(epochs[0]) == len(epochs[1]) == 1
    for key in ("train_top1_error", "train_top5_error", "val_top1_error", "val_top5_error"):
        assert epochs[0][0][key] == epochs[1][0][key], key
    assert epochs[1][0]["train_loss"] == pytest.approx(epochs[0][0]["train_loss"], rel=1e-6)


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])  # a batch system's cancel; a first Ctrl-C
def test_a_stop_signal_on_one_rank_stops_both_at_the_same_step_with_a_checkpoint(tmp_path, data_root, stop):
    cfg = tiny_config(data_root, tmp_path / "run", max_steps=6)
    seen = run(tmp_path / "r", cfg, hooks={"record": True, "sigterm_rank": 1, "signal": stop})
    assert len(seen[0]) == len(seen[1]) == 3
    assert read(tmp_path / "run" / "latest.pt")["progress"]["global_step"] == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"kind": "step"' in line]
    assert steps == [1, 2, 3]  # step 3 falls between progress lines (every 2) but is in the checkpoint


def test_a_signal_during_the_last_validation_ends_the_job_without_the_closing_evaluation(
        tmp_path, data_root, monkeypatch, capsys):
    """After the last stop check there is no step left to stop at: the job still ends (a preempted
    job gets about 30 s), latest.pt already holds the run, and a resume writes the closing table."""
    from repro import train as train_module

    cfg = dataclasses.replace(tiny_config(data_root, tmp_path / "v"), epochs=1, final_crops=(1,))
    real_validate, calls = train_module.validate, []

    def validate_then_signal(run, crops):
        calls.append(crops)
        if len(calls) == 1:  # the epoch's validation, not the closing table's
            os.kill(os.getpid(), signal.SIGTERM)
        return real_validate(run, crops)

    monkeypatch.setattr(train_module, "validate", validate_then_signal)
    assert train_module.train(cfg) == {}
    assert len(calls) == 1 and not (tmp_path / "v" / "results.md").exists()
    assert "latest.pt holds the run; stopping" in capsys.readouterr().out
    assert read(tmp_path / "v" / "latest.pt")["progress"] == {"epoch": 1, "step_in_epoch": 0, "global_step": 4}
    assert train_module.train(cfg, resume=str(tmp_path / "v"))[1].images == 30  # nothing to train: scored
    assert (tmp_path / "v" / "results.md").exists()


def test_a_non_finite_loss_stops_every_rank_before_anything_is_saved(tmp_path, data_root):
    """Step 6 of 8 diverges: both ranks stop at the next log line (step 6), and latest.pt keeps the
    epoch-end state of step 4 instead of NaN weights."""
    cfg = tiny_config(data_root, tmp_path / "run", max_steps=8)  # 4 steps per epoch, a line every 2
    messages = run(tmp_path / "r", cfg, hooks={"nan_loss_at": 6})
    assert all("training diverged: the loss is not finite from step 6" in m for m in messages), messages
    assert "latest.pt holds step 4" in messages[0]
    assert read(tmp_path / "run" / "latest.pt")["progress"]["global_step"] == 4
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"kind": "step"' in line]
    assert len(losses) == 6 and math.isnan(losses[5]) and all(math.isfinite(v) for v in losses[:5])


def test_weights_made_non_finite_by_the_last_step_are_not_saved(tmp_path, data_root):
    """Step 7's update makes weights NaN while its loss was finite: the budget's end (step 7) must
    not save them over the epoch-end checkpoint of step 4."""
    cfg = tiny_config(data_root, tmp_path / "run", max_steps=7)
    messages = run(tmp_path / "r", cfg, hooks={"nan_weights_at": 7})
    assert all("the weights after step 7 are not finite" in m for m in messages), messages
    assert read(tmp_path / "run" / "latest.pt")["progress"]["global_step"] == 4


def test_grouped_form_in_one_process_and_final_table(tmp_path, data_root, capsys):
    from repro.train import train

    cfg = dataclasses.replace(tiny_config(data_root, tmp_path / "g", max_steps=5), final_crops=(1, 10))
    results = train(cfg)
    ckpt = read(tmp_path / "g" / "latest.pt")
    assert ckpt["topology"] == {"towers": 1, "replicas": 1} and ckpt["progress"]["global_step"] == 5
    assert ckpt["train_config"]["cpu_lrn"] == "native"  # --cpu-lrn auto, resolved where cc builds it, and kept
    assert ckpt["train_config"]["cpu_conv"] == "winograd"  # --cpu-conv auto, alike
    assert results[1].images == results[10].images == 30
    out = capsys.readouterr().out
    assert "NOT comparable" in out and "10 patches" in out
    # the progress line names the budget it runs: 5 steps, not the 3 epochs of 4 steps it cuts short
    lines = [line.split(" loss ")[0] for line in out.splitlines() if " loss " in line and " img/s" in line]
    assert lines == ["step 2/5", "step 4/5", "step 5/5 (epoch 2)"], out
    for name in ("results.md", "results.json", "results.csv", "learning_curves.png", "best.pt"):
        assert (tmp_path / "g" / name).exists(), name
    # A requeue of the finished run: nothing to train, and this step's table is there already.
    assert train(cfg, resume=str(tmp_path / "g"), keep_saved=("max_steps",)) == {}
    assert "the closing table of step 5 is already in" in capsys.readouterr().out
    again = dataclasses.replace(cfg, final_crops=(1,))  # other protocols: scored
    assert train(again, resume=str(tmp_path / "g"), keep_saved=("max_steps",))[1].images == 30


def test_odd_world_size_is_a_clear_error_said_once(monkeypatch, capsys):
    """Every rank raises it: rank 0 alone prints it, not each of the launch's processes."""
    from scripts.train_two_gpu import main

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3 is odd.*--nproc_per_node=2"):
        init_topology("cpu")
    for rank, says in (("0", True), ("2", False)):
        monkeypatch.setenv("RANK", rank)
        assert main(["--device", "cpu", "--max-steps", "1", "--out", "unused"]) == 2
        assert ("error: world size 3 is odd" in capsys.readouterr().err) == says, rank
        assert main(["--lr", "-1", "--out", "unused"]) == 2  # a bad flag: also raised by every rank
        assert ("error: --lr" in capsys.readouterr().err) == says, rank
    from repro.cli import run as run_script

    def own_error():  # one rank's own (its node's files, its GPU): not marked, so always printed
        raise FileNotFoundError("no such folder on this node")

    monkeypatch.setenv("RANK", "1")
    assert run_script(own_error) == 2 and "error: no such folder on this node" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")  # RANK without a launch: one process, which must say it
    assert main(["--lr", "-1", "--out", "unused"]) == 2 and "error: --lr" in capsys.readouterr().err


def test_resume_keeps_the_checkpoints_recipe(tmp_path):
    from repro.run_setup import resumed_config

    saved = dataclasses.replace(tiny_config("data", tmp_path / "a", max_steps=3),
                                optim=OptimConfig(lr=0.02), batch_size=16, seed=7)
    requested = tiny_config("", tmp_path / "b", max_steps=9)  # default lr, batch and seed; no --data
    requested = dataclasses.replace(requested, data=dataclasses.replace(requested.data, workers=3, decode="cpu"))
    cfg = resumed_config(requested, saved.to_dict())
    assert (cfg.optim.lr, cfg.batch_size, cfg.seed, cfg.data.root) == (0.02, 16, 7, "data")  # the recipe
    assert (cfg.max_steps, cfg.out) == (9, str(tmp_path / "b"))  # how long and where
    assert (cfg.data.workers, cfg.data.decode) == (3, "cpu")  # and by which processes
    kept = resumed_config(requested, saved.to_dict(), keep_saved=("max_steps", "epochs"))
    assert (kept.max_steps, kept.epochs, kept.out) == (3, saved.epochs, str(tmp_path / "b"))  # no flag: the run's budget


def test_unreadable_training_images_are_skipped_counted_and_named(tmp_path, capsys):
    from PIL import Image

    from repro.train import train

    for split, n in (("train", 4), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (90, 80), (40 * i, 100 if cls == "a" else 200, 0)).save(
                    tmp_path / "data" / split / cls / f"{i}.jpg")
    (tmp_path / "data" / "train" / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    cfg = TrainConfig(model=ModelConfig(num_classes=2, image_size=67),
                      data=DataConfig(dataset="folder", root=str(tmp_path / "data"), base_size=76, crop_size=67,
                                      workers=0),
                      epochs=1, batch_size=3, out=str(tmp_path / "run"), final_crops=(), device="cpu")
    train(cfg)  # 9 files, 3 steps of 3: one batch loses the bad image and trains on 2
    epochs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in x
              and '"kind": "epoch"' in x]
    assert epochs[0]["unreadable_skipped"] == 1 and epochs[0]["val_images"] == 4
    # named, with its reason, once (the statistics pass and the epoch both met it), and said where
    listed = (tmp_path / "run" / "skipped.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(tmp_path / "data" / "train" / "a" / "bad.jpg") + "\t")
    assert len(listed[0].split("\t")[1]) > 0
    assert f"skipped 1 unreadable file, listed in {tmp_path / 'run' / 'skipped.txt'}" in capsys.readouterr().out


def test_sigterm_to_the_whole_process_group_still_saves_the_last_step(tmp_path):
    """A batch system's cancel signals every process of the job, loader workers included. The run
    must still stop at a step boundary with that step saved and logged, not die in the save."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from PIL import Image

    for split, n in (("train", 12), ("val", 2)):
        for c, cls in enumerate(("a", "b")):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (90, 80), (20 * i, 80 + 100 * c, 50)).save(tmp_path / "data" / split / cls / f"{i}.jpg")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "scripts/train_two_gpu.py", "--dataset", "folder", "--data", str(tmp_path / "data"),
           "--workers", "2", "--epochs", "1000", "--batch-size", "2", "--log-every", "1", "--device", "cpu",
           "--out", str(run_dir)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = run_dir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and log.read_text().count('"kind": "step"') >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and its loader workers alike
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and "SIGTERM or Ctrl-C: saving latest.pt" in out, out[-3000:]
    saved = read(run_dir / "latest.pt")["progress"]["global_step"]
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"kind": "step"' in line]
    assert steps == list(range(1, saved + 1))  # every step up to the saved one is logged, none beyond
    assert "no closing table" in out and not (run_dir / "results.md").exists()  # ends now: no evaluation


def test_a_pair_whose_whole_batch_is_unreadable_does_not_stall_the_others(tmp_path):
    """Two pairs; every image of pair 1's first batch is unreadable. Pair 1 must still take part in
    the step (its gradient all-reduce and exchanges), or the other pair waits for ever."""
    from PIL import Image

    from repro.data.folder import image_folder
    from repro.data.loader import train_batches

    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (tmp_path / "data" / split / cls).mkdir(parents=True)
            for i in range(4 if split == "train" else 1):
                Image.new("RGB", (90, 80), (40 * i, 80 + 100 * c, 0)).save(tmp_path / "data" / split / cls / f"{i}.jpg")
    files = image_folder(tmp_path / "data" / "train").files
    for i in train_batches(len(files), 2, 2, 1, 0, 0)[0].tolist():  # pair 1, step 0
        with open(files[i], "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 truncated")
    cfg = TrainConfig(model=ModelConfig(num_classes=2, image_size=67, widths=SMALL_FC),
                      data=DataConfig(dataset="folder", root=str(tmp_path / "data"), base_size=76, crop_size=67,
                                      workers=0),
                      epochs=1, batch_size=2, out=str(tmp_path / "run"), log_every=1, final_crops=(), device="cpu")
    run(tmp_path / "r", cfg, world=4)
    ckpt = read(tmp_path / "run" / "latest.pt")
    assert ckpt["progress"] == {"epoch": 1, "step_in_epoch": 0, "global_step": 2}
    epochs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"kind": "epoch"' in x]
    assert epochs[0]["unreadable_skipped"] == 2
    # pair 1's files, met on ranks 2 and 3, reach rank 0's skipped.txt, each once
    listed = sorted(line.split("\t")[0] for line in (tmp_path / "run" / "skipped.txt").read_text().splitlines())
    assert listed == sorted(files[i] for i in train_batches(len(files), 2, 2, 1, 0, 0)[0].tolist())


def test_a_step_budget_that_ends_on_an_epochs_last_step_ends_that_epoch(tmp_path, data_root, capsys):
    from repro.train import train

    cfg = tiny_config(data_root, tmp_path / "e", max_steps=4)  # 96 images / 24 = 4 steps per epoch
    train(cfg)
    ckpt = read(tmp_path / "e" / "latest.pt")
    assert ckpt["progress"] == {"epoch": 1, "step_in_epoch": 0, "global_step": 4}
    assert (tmp_path / "e" / "best.pt").exists()  # validated, as at any epoch's end
    records = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0]
    capsys.readouterr()
    train(cfg, resume=str(tmp_path / "e"), keep_saved=("max_steps", "epochs"))  # the budget is spent
    assert "nothing to train" in capsys.readouterr().out
    assert read(tmp_path / "e" / "latest.pt")["progress"]["global_step"] == 4
    # The checkpoint's preprocessing, given the test images as files, is what validation fed the network.
    from PIL import Image

    import repro
    from repro.data.augment import Augment, Stats
    from repro.data.fashion_mnist import fashion_mnist

    test, ckpt = fashion_mnist(data_root, "test", download=False), read(tmp_path / "e" / "latest.pt")
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(test.images[i, :, :, 0].numpy()).save(files[-1])
    cfg = TrainConfig.from_dict(ckpt["train_config"])
    fed = Augment(cfg.data, Stats(**ckpt["stats"])).eval_batch(test.images[:3], 10)
    torch.testing.assert_close(repro.load_preprocessing(tmp_path / "e")(files, crops=10), fed, rtol=0, atol=1e-4)


def test_resuming_with_the_runs_own_recipe_flags_works_and_other_values_are_refused(tmp_path, data_root, capsys):
    """A batch system's requeue reruns the launch line plus --resume: recipe flags equal to the
    checkpoint's pass; different ones are refused with the run's values, before anything is written."""
    from repro.train import train
    from scripts.train_two_gpu import main

    train(tiny_config(data_root, tmp_path / "e", max_steps=4))  # lr 0.01, batch 24, seed 0, milestones (1,)
    log = (tmp_path / "e" / "metrics.jsonl").read_text()
    capsys.readouterr()
    rest = ["--resume", str(tmp_path / "e"), "--device", "cpu", "--workers", "0", "--final-crops"]
    same = ["--lr", "0.01", "--batch-size", "24", "--seed", "0", "--schedule", "milestones", "--milestones", "1",
            "--pca", "dataset", "--dataset", "fashion-mnist"]
    for flags in (same, ["--milestones", "1"]):  # the schedule is the checkpoint's: --milestones alone is fine
        assert main(flags + rest) == 0
        assert "nothing to train" in capsys.readouterr().out  # resumed: the budget of 4 steps is spent
    assert main(["--lr", "0.02", "--seed", "1", "--batch-size", "24", "--no-flip", "--variant", "paper"] + rest) == 2
    assert ("error: --lr 0.02, --no-flip, --seed 1, --variant paper with --resume: the checkpoint's run has "
            "--lr 0.01, no --no-flip, --seed 0, --variant (custom), and a resumed run keeps its recipe") \
        in capsys.readouterr().err  # (custom): the test network's narrow fc layers
    assert (tmp_path / "e" / "metrics.jsonl").read_text() == log


def test_recipe_flags_compare_what_each_flag_sets():
    from scripts.train_two_gpu import (RECIPE_SETTINGS, RESUME_FLAGS, build_config, check_resume_flags, given_flags,
                                       parse_args)

    every_flag = set(vars(parse_args([])))  # each is either where/how long to run, or the recipe
    assert every_flag == RESUME_FLAGS | RECIPE_SETTINGS.keys() and not RESUME_FLAGS & RECIPE_SETTINGS.keys()
    assert given_flags(["--lr", "0.01", "--no-flip", "--out", "x"]) == {"lr", "no_flip", "out"}  # defaults too

    def config(*flags):
        return build_config(parse_args([*flags, "--max-steps", "1", "--out", "unused"]))

    saved = config("--lrn-alpha", "divided", "--schedule", "milestones")  # the paper's network, 2012 code's alpha
    check_resume_flags(config("--variant", "paper", "--lrn-alpha", "divided"), saved, {"variant", "lrn_alpha"})
    check_resume_flags(config("--variant", "paper"), saved, {"variant"})  # --variant leaves the alpha to its flag
    check_resume_flags(config("--schedule", "milestones", "--milestones", "25", "51", "79"), saved, {"milestones"})
    with pytest.raises(ValueError, match=r"--variant cuda-convnet-2012 with --resume: the checkpoint's run has "
                                         r"--variant paper"):  # it differs in conv3-5's init too
        check_resume_flags(config("--variant", "cuda-convnet-2012"), saved, {"variant"})
    with pytest.raises(ValueError, match=r"--lrn-alpha paper with --resume: the checkpoint's run has --lrn-alpha "
                                         r"divided"):
        check_resume_flags(config("--lrn-alpha", "paper"), saved, {"lrn_alpha"})
    with pytest.raises(ValueError, match=r"--milestones \(none\) with --resume: the checkpoint's run has "
                                         r"--milestones 25 51 79"):
        check_resume_flags(config("--schedule", "milestones", "--milestones"), saved, {"milestones"})
    with pytest.raises(ValueError, match=r"--patience 3 with --resume: the checkpoint's run has --schedule milestones"):
        check_resume_flags(config("--patience", "3"), saved, {"patience"})  # the default, but not read by that run
    plateau = config()
    with pytest.raises(ValueError, match=r"--milestones 25 51 79 with --resume: the checkpoint's run has --schedule "
                                         r"plateau"):
        check_resume_flags(config("--schedule", "milestones", "--milestones", "25", "51", "79"), plateau, {"milestones"})
    check_resume_flags(config("--patience", "3"), plateau, {"patience"})


def test_running_out_of_device_memory_names_the_flag_to_lower(tmp_path, data_root, monkeypatch):
    from repro import train as train_module

    def too_big(*_args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB.")

    monkeypatch.setattr(train_module, "train_step", too_big)
    with pytest.raises(ValueError, match=r"out of device memory in a training step of 24 images per pair \(CUDA "
                                         r"out of memory. Tried to allocate 9.00 GiB\); pass --amp bf16, or start a "
                                         r"new run with a smaller --batch-size"):
        train_module.train(tiny_config(data_root, tmp_path / "a", max_steps=1))
    monkeypatch.undo()
    monkeypatch.setattr(train_module, "evaluate", too_big)
    with pytest.raises(ValueError, match=r"validating 16 images x 1 patch\(es\) per forward .*; pass a smaller "
                                         r"--eval-batch-size"):
        train_module.train(tiny_config(data_root, tmp_path / "b", max_steps=4))  # validates after epoch 1


def test_a_single_class_is_a_clear_error(tmp_path):
    from PIL import Image

    from repro.train import train

    for split in ("train", "val"):
        (tmp_path / "data" / split / "only").mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(tmp_path / "data" / split / "only" / "0.jpg")
    cfg = TrainConfig(model=ModelConfig(num_classes=10, image_size=67, widths=SMALL_FC),
                      data=DataConfig(dataset="folder", root=str(tmp_path / "data"), base_size=76, crop_size=67,
                                      workers=0), max_steps=1, out=str(tmp_path / "run"), device="cpu")
    with pytest.raises(ValueError, match=r"folder/train has 1 class \(only\): a classifier needs at least two"):
        train(cfg)


def test_a_folder_whose_run_saved_no_checkpoint_is_reused_keeping_its_log(tmp_path):
    """A run that diverged or was killed before its first checkpoint leaves only metrics.jsonl: a new
    run may use the folder (nothing there to resume), and the old log is kept under a dated name."""
    from repro.run_folder import prepare_run_dir

    (tmp_path / "metrics.jsonl").write_text('{"kind": "step"}\n')
    prepare_run_dir(tmp_path, None)
    kept = list(tmp_path.glob("metrics.*.jsonl"))
    assert not (tmp_path / "metrics.jsonl").exists() and len(kept) == 1 and kept[0].read_text()
    (tmp_path / "best.pt").write_text("")
    with pytest.raises(ValueError, match=r"already holds a run \(best.pt\)"):
        prepare_run_dir(tmp_path, None)
    prepare_run_dir(tmp_path, str(tmp_path / "best.pt"))  # resuming it in place is what the folder is for


def test_any_signal_after_a_ctrl_c_stops_at_once_but_sigterm_twice_still_saves():
    """torchrun passes a terminal's second Ctrl-C to the workers as SIGTERM; a batch system and
    torchrun may both send SIGTERM."""
    from repro.stop import StopAgreement

    def trainer():
        return StopAgreement(topo=None, say=lambda _m: None)

    t = trainer()
    t.on_signal(signal.SIGINT, None)
    assert t.signal is not None  # a stop is requested
    with pytest.raises(KeyboardInterrupt):
        t.on_signal(signal.SIGTERM, None)
    t = trainer()
    t.on_signal(signal.SIGTERM, None)
    t.on_signal(signal.SIGTERM, None)
    assert t.signal is not None  # a stop is requested
    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C after a batch system's SIGTERM: now
        t.on_signal(signal.SIGINT, None)


def test_each_check_point_is_one_collective(tmp_path, data_root, monkeypatch):
    """Between steps, the stop signal, the loss and the weights are agreed in one all-reduce: 3 steps on
    the CPU (a check point after each), then latest.pt's partial counts at the step budget."""
    from repro import stop
    from repro import train as train_module

    calls = []
    for module, name in ((stop, "agree"), (train_module, "other")):
        real = module.all_reduce_sum
        monkeypatch.setattr(module, "all_reduce_sum",
                            lambda values, topo, name=name, real=real: calls.append(name) or real(values, topo))
    train_module.train(tiny_config(data_root, tmp_path / "a", max_steps=3))
    assert calls == ["agree"] * 3 + ["other"]


@pytest.mark.parametrize("chosen,device,resumed,images,native,expected", [
    ("auto", "cpu", False, 1, True, "native"),  # builds in seconds: worth it for any launch
    ("auto", "cpu", False, 20_000, False, "compiled"),  # no C compiler: a long CPU launch wins its compile time back
    ("auto", "cpu", False, 19_999, False, "eager"),  # a short one does not (the CPU budget: 3,840 images)
    ("auto", "cuda", False, 10 ** 9, True, "eager"),  # a GPU runs Triton's kernels, not these
    ("auto", "cpu", True, 10 ** 9, True, "eager"),  # a checkpoint from before the choice: its run was eager
    ("eager", "cpu", False, 10 ** 9, True, "eager"),  # a choice made is kept, resumed or not
    ("compiled", "cpu", True, 1, True, "compiled"),
    ("native", "cpu", True, 1, False, "native"),  # kept; where it cannot build, the first call warns (lrn_cpu)
])
def test_cpu_lrn_auto_resolves_once_by_the_launchs_images(chosen, device, resumed, images, native, expected,
                                                          monkeypatch):
    from types import SimpleNamespace

    from repro import run_setup
    from repro.metrics import Progress
    from repro.model import lrn_native
    from repro.run_setup import with_cpu_lrn_chosen

    def build():
        if not native:
            raise lrn_native.NativeUnavailable("no C compiler: 'cc' is not on PATH")
    monkeypatch.setattr(run_setup.lrn_native, "build", build)

    cfg = dataclasses.replace(tiny_config("data", "out", max_steps=None), cpu_lrn=chosen, epochs=3, batch_size=10)
    done = 5  # steps already taken; the step budget, not the 3 long epochs, ends the launch
    per_epoch = images // 10 + done
    cfg = dataclasses.replace(cfg, max_steps=done + images // 10)
    run = SimpleNamespace(cfg=cfg, progress=Progress(global_step=done), steps_per_epoch=per_epoch,
                          topo=SimpleNamespace(device=torch.device(device)), say=lambda _msg: None)
    assert with_cpu_lrn_chosen(run, resumed).cpu_lrn == expected


@pytest.mark.parametrize("chosen,device,resumed,builds,expected", [
    ("auto", "cpu", False, True, "winograd"),
    ("auto", "cpu", False, False, "direct"),  # no C compiler: torch's convolution, and the log says why
    ("auto", "cuda", False, True, "direct"),  # a GPU runs cuDNN's choice
    ("auto", "cpu", True, True, "direct"),  # a checkpoint from before the choice: its run convolved directly
    ("direct", "cpu", False, True, "direct"),  # a choice made is kept, resumed or not
    ("winograd", "cpu", True, False, "winograd"),  # kept; where it cannot build, the direct convolution runs
])
def test_cpu_conv_auto_resolves_once_at_the_first_launch(chosen, device, resumed, builds, expected, monkeypatch):
    from types import SimpleNamespace

    from repro.model import winograd
    from repro.run_setup import with_cpu_conv_chosen

    monkeypatch.setattr(winograd, "load", lambda: object() if builds else None)
    monkeypatch.setattr(winograd, "unavailable", lambda: "no C compiler: 'cc' is not on PATH")
    said = []
    cfg = dataclasses.replace(tiny_config("data", "out"), cpu_conv=chosen)
    run = SimpleNamespace(topo=SimpleNamespace(device=torch.device(device)), say=said.append)
    assert with_cpu_conv_chosen(cfg, run, resumed).cpu_conv == expected
    assert any("do not build here (no C compiler" in m for m in said) == (chosen == "auto" and device == "cpu"
                                                                           and not resumed and not builds)


def test_unknown_cpu_conv_is_a_clear_error():
    with pytest.raises(ValueError, match="cpu_conv must be one of auto, direct, winograd"):
        dataclasses.replace(tiny_config("data", "out"), cpu_conv="fft")
