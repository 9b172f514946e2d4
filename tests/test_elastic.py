"""Fault tolerance on the CPU: torchrun restarts killed processes and the run ends where an
uninterrupted one does; a peer that never comes is a clear error, not a hang."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from repro.checkpoint import read
from tests.test_fashion_mnist import make_tree

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _flags(data: Path, out: Path) -> list[str]:
    # 8 images in batches of 4: 2 steps per epoch, 3 epochs; no closing evaluation
    return ["--data", str(data), "--epochs", "3", "--batch-size", "4", "--val-images", "6", "--workers", "0",
            "--log-every", "1", "--device", "cpu", "--final-crops", "--comm-timeout", "60", "--out", str(out)]


def _torchrun(args: list[str], kills: str = "", restarts: int = 0) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), "--nproc_per_node=2", f"--max-restarts={restarts}", "--monitor-interval=0.2",
                           "tests/elastic_worker.py", *args], cwd=ROOT, env={**ENV, "REPRO_TEST_KILL": kills},
                          capture_output=True, text=True, timeout=400)


def test_a_killed_rank_is_restarted_and_the_run_ends_as_an_uninterrupted_one(tmp_path, capsys):
    make_tree(tmp_path / "data", n_train=8, n_test=6)
    plain = _torchrun(_flags(tmp_path / "data", tmp_path / "plain"))
    assert plain.returncode == 0, plain.stdout + plain.stderr
    # Round 0: rank 1 dies in epoch 2 (after latest.pt of epoch 1); round 1: rank 0 dies in epoch 3.
    r = _torchrun(_flags(tmp_path / "data", tmp_path / "killed"), kills="0:1:3,1:0:5", restarts=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torchelastic restart 1: resuming" in r.stdout and "torchelastic restart 2: resuming" in r.stdout
    assert "resumed in epoch 2" in r.stdout and "resumed in epoch 3" in r.stdout
    a, b = read(tmp_path / "plain" / "latest.pt"), read(tmp_path / "killed" / "latest.pt")
    assert a["progress"] == b["progress"] == {"epoch": 3, "step_in_epoch": 0, "global_step": 6}
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in a["velocity"]:
        assert torch.equal(a["velocity"][name], b["velocity"][name]), name
    # a fresh launch (not a restart) onto the folder is still refused
    from scripts.train_two_gpu import main

    assert main(_flags(tmp_path / "data", tmp_path / "killed")) == 2
    assert "already holds a run" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_peer_that_never_arrives_is_a_clear_error_within_the_timeout(tmp_path):
    make_tree(tmp_path / "data", n_train=16, n_test=6)
    env = {**ENV, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    start = time.monotonic()
    r = subprocess.run([sys.executable, "scripts/train_two_gpu.py", *_flags(tmp_path / "data", tmp_path / "run")[:-4],
                        "--comm-timeout", "3", "--out", str(tmp_path / "run")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    took = time.monotonic() - start
    assert r.returncode == 2, r.stdout + r.stderr
    assert "did not all join within --comm-timeout 3 s" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert took < 60  # the 3 s wait plus starting Python and torch, not the 600 s default
