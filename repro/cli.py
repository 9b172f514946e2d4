"""What the scripts share: bad input ends the program with one clear line, not a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from repro.cores import available_cores


class RunDiverged(RuntimeError):
    """Training's loss stopped being finite: an outcome of the recipe, not a bug (no traceback)."""


USER_ERRORS = (ValueError, FileNotFoundError, RunDiverged)  # wrong flags, unfit files, a diverged run; bugs keep tracebacks


def raised_on_every_rank(exc: Exception) -> Exception:
    """Mark a user error that every process of a launch raises alike (it follows from the flags, or
    rank 0 sent it): `run` prints it on rank 0 alone rather than once per process."""
    exc.raised_on_every_rank = True
    return exc


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= low, refused at parse time with the flag's name."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in "invalid int value: 'abc'"
    return parse


def default_workers() -> int:
    """Decoding processes per rank: 4, or fewer where this machine's cores are shared by fewer per rank
    (more workers than cores only adds switching, and PyTorch warns about it)."""
    per_rank = available_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(4, per_rank))


def device_from_flag(name: str, flag: str = "--device"):
    """A torch.device from a command line's device flag ("auto": CUDA where torch sees a GPU), or a
    ValueError that says what to pass instead."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag} {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag} {name}: this runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: torch sees no CUDA GPU here; use {flag} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name}: there are {torch.cuda.device_count()} CUDA GPU(s) here")
    return device


@contextmanager
def out_of_memory_advice(work: str, advice: str) -> Iterator[None]:
    """A device running out of memory in `work` becomes one line that says what to lower, not a
    traceback (`work`: e.g. "scoring 128 images x 10 patches"; `advice`: the flag to change)."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        # torch's message is one long line: "CUDA out of memory. Tried to allocate X. GPU 0 has ..."
        text = str(exc).strip() or "out of memory"
        detail = text.split(". GPU")[0].splitlines()[0].rstrip(".")
        raise ValueError(f"out of device memory {work} ({detail}); {advice}") from None


def make_out_dir(out: Path, flag: str = "--out") -> Path:
    """Create an output folder up front, so that a bad one fails in one line before the long work."""
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"{flag} {out} is a file, not a folder; pass another {flag}")
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # permissions, a file in the path
        raise ValueError(f"{flag} {out}: cannot create the folder ({exc.strerror or exc}); pass another "
                         f"{flag}") from None
    return out


def run(work: Callable[[], object], interrupted: str = "interrupted") -> int:
    """Exit code 0 when `work` succeeds; 2 with `error: ...` on stderr for a user error (under torchrun,
    one that every rank raises is printed by rank 0 alone); 130 with `interrupted` for Ctrl-C."""
    try:
        work()
    except KeyboardInterrupt:  # no traceback: the user asked for it
        sys.stderr.write(f"\n{interrupted}\n")
        sys.stderr.flush()
        return 130
    except USER_ERRORS as exc:
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if launched and getattr(exc, "raised_on_every_rank", False) and os.environ.get("RANK", "0") != "0":
            return 2  # rank 0 says it
        sys.stderr.write(f"error: {exc}\n")  # one write: the lines of two ranks do not run together
        sys.stderr.flush()
        return 2
    return 0
