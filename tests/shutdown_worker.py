"""Run by tests/test_shutdown.py under torchrun: start the process group as the training script does,
make an optimiser (its first one imports torch._dynamo), shut down, and print the threads still alive."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from repro.dist import init_topology, shutdown  # noqa: E402

topo = init_topology("cpu", "gloo", 60)
torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
shutdown(peers_done=True)
del topo
names = sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))
# one write of the whole line: two ranks share the pipe, and print's separate write of the newline let
# their lines run together
os.write(1, f"rank {os.environ['RANK']} threads after shutdown: {names}\n".encode())
