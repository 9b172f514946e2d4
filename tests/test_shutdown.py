"""After shutdown() no gloo thread outlives the process group, so none is torn down during the
interpreter's finalization (where that can abort a finished run: repro/dist.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the threads from /proc")
def test_no_gloo_thread_outlives_shutdown():
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--nproc_per_node=2", "tests/shutdown_worker.py"], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    reports = dict(re.findall(r"rank (\d) threads after shutdown: (\[[^\]]*\])", r.stdout))
    assert sorted(reports) == ["0", "1"], r.stdout + r.stderr
    for rank, names in reports.items():
        assert "gloo" not in names, (rank, names)
