"""The core count behind every default number of worker processes: affinity mask, capped by a
cgroup v2 CPU quota, and shared among the ranks of a launch."""

import os

import pytest

from repro import cli, cores


def mask() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@pytest.mark.parametrize("text, expect", [
    ("max 100000\n", lambda m: m),  # no quota
    ("150000 100000\n", lambda m: min(m, 1)),  # 1.5 CPUs: whole cores only, rounded down
    ("50000 100000\n", lambda m: 1),  # half a CPU: still one process
    ("6400000 100000\n", lambda m: m),  # a quota above the mask: the mask wins
    ("garbage\n", lambda m: m),  # a file we do not understand: the mask alone
])
def test_quota_caps_the_affinity_mask(tmp_path, monkeypatch, text, expect):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(text)
    monkeypatch.setattr(cores, "CGROUP_CPU_MAX", cpu_max)
    assert cores.available_cores() == expect(mask())


def test_without_cgroup_v2_the_mask_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(cores, "CGROUP_CPU_MAX", tmp_path / "absent")
    assert cores.available_cores() == mask()


@pytest.mark.parametrize("available, ranks, expect", [(16, 2, 4), (6, 2, 3), (2, 2, 1), (1, 8, 1), (8, 1, 4)])
def test_default_workers_share_the_cores_among_local_ranks(monkeypatch, available, ranks, expect):
    monkeypatch.setattr(cli, "available_cores", lambda: available)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert cli.default_workers() == expect
