"""How many CPU cores this process may use: the one count behind every default number of worker
processes (data loading, store encoding, JPEG trees, pytest -n auto)."""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def available_cores() -> int:
    """The cores this process may run on: its affinity mask (which taskset and cpusets narrow), capped
    by a cgroup v2 CPU quota (a container's --cpus), which the mask does not show. os.cpu_count()
    counts the machine's cores and ignores both."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2 here, or a file we do not understand: the mask alone
        pass
    return cores
