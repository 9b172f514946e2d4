"""scripts/train_two_gpu.py as torchrun runs it, with one fault injected for tests/test_elastic.py:
REPRO_TEST_KILL="ROUND:RANK:STEP,..." makes rank RANK of restart round ROUND SIGKILL itself after
its training step STEP (global, 1-based), as a crash or the OOM killer would."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repro import train as train_module  # noqa: E402
from scripts.train_two_gpu import main  # noqa: E402

KILLS = {tuple(int(v) for v in item.split(":")[:2]): int(item.split(":")[2])
         for item in os.environ.get("REPRO_TEST_KILL", "").split(",") if item}
HERE = (int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), int(os.environ.get("RANK", "0")))

if HERE in KILLS:
    real_step = train_module.train_step

    def step_then_die(run, batch, params, counts):
        loss = real_step(run, batch, params, counts)
        if run.progress.global_step + 1 == KILLS[HERE]:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

    train_module.train_step = step_then_die

if __name__ == "__main__":
    sys.exit(main())
