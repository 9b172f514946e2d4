"""repro/host_memory.py: with glibc told to keep freed memory, a large tensor comes from the heap (memory
the process keeps and reuses) rather than a mapping of its own that is unmapped on free and faulted in
again at the next step; REPRO_KEEP_FREED_MEMORY=0 leaves the allocator as it is. Each case in a fresh
process, as the setting is for the whole process."""

import os
import subprocess
import sys

import pytest

from repro.host_memory import ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import torch
from repro.host_memory import keep_freed_memory
said = keep_freed_memory()
x = torch.empty(64 << 18)  # 64 MB, twice glibc's largest mmap threshold
x.fill_(1.0)
addr = x.data_ptr()
for line in open("/proc/self/maps"):
    span, *rest = line.split()
    lo, hi = (int(v, 16) for v in span.split("-"))
    if lo <= addr < hi:
        print(said)
        print("heap" if rest[-1] == "[heap]" else "own mapping")
"""


def _probe(env_value):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop(ENV, None)
    if env_value is not None:
        env[ENV] = env_value
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc/self/maps: Linux")
def test_large_tensors_come_from_the_heap_once_freed_memory_is_kept():
    said, where = _probe(None)
    if "not glibc" in said:
        pytest.skip(said)
    assert said.startswith("glibc ") and "keeps freed memory for reuse" in said
    assert where == "heap"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc/self/maps: Linux")
def test_the_environment_leaves_the_allocator_as_it_is():
    said, where = _probe("0")
    assert said == f"the allocator left as it is ({ENV}=0)"
    assert where == "own mapping"  # glibc maps a 64 MB request by itself
