"""The run folder (--out): create it, refuse one that holds another run, find the checkpoint to
resume, and continue the run after torchelastic restarted the processes.

Rank 0 alone touches the folder (other nodes may not see it); `on_main_rank` sends its answer, or its
error, to every rank.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from repro.cli import make_out_dir, raised_on_every_rank
from repro.dist import Topology, restart_round

RUN_FILES = ("latest.pt", "best.pt", "metrics.jsonl")


def on_main_rank(work, topo: Topology):
    """work() run by rank 0 alone and its result sent to every rank; a user error it raises is raised
    on every rank alike (rank 0 alone writes the run directory, which other nodes may not see)."""
    if topo.backend is None:
        return work()
    box: list = [None]
    if topo.is_main:
        try:
            box[0] = work()
        except (FileNotFoundError, ValueError) as exc:
            box[0] = exc
    torch.distributed.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise raised_on_every_rank(box[0])
    return box[0]


def resume_dir_of(path: str) -> str:
    """The run directory of a --resume argument (a run directory, or a checkpoint file in one)."""
    return path if Path(path).is_dir() else str(Path(path).parent)


def restart_resume(out: str, resume: str | None, topo: Topology) -> str | None:
    """What to resume: --resume as given; on torchelastic's restart of a launch (the same command line),
    the run folder's latest.pt if it has one (else the run starts again: it had saved nothing)."""
    if resume is not None or not restart_round():
        return resume
    if not on_main_rank(lambda: (Path(out) / "latest.pt").is_file(), topo):
        return None
    if topo.is_main:
        print(f"torchelastic restart {restart_round()}: resuming the run in {out} from its latest.pt", flush=True)
    return out


def prepare_run_dir(out: Path, resume: str | None) -> None:
    """Create the run directory, refusing one that holds another run: a fresh run there would
    overwrite its checkpoints and interleave its metrics."""
    try:
        held = [f for f in RUN_FILES if (out / f).exists()]
        resumed_here = resume is not None and Path(resume_dir_of(resume)).resolve() == out.resolve()
        if held and not resumed_here:
            if held == ["metrics.jsonl"]:  # a run that ended before its first checkpoint: nothing to continue
                kept = out / f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
                (out / "metrics.jsonl").rename(kept)
                print(f"--out {out} held the metrics of a run that saved no checkpoint: kept as {kept.name}",
                      flush=True)
            else:
                how = (f"--resume {out} continues that run" if resume is None else
                       f"resuming {resume} into it would overwrite them")
                raise ValueError(f"--out {out} already holds a run ({', '.join(held)}): {how}; or choose another "
                                 f"--out")
    except OSError as exc:  # permissions: the same one line on every rank
        raise ValueError(f"--out {out}: cannot use it as the run folder ({exc.strerror or exc}); pass another "
                         f"--out") from None
    make_out_dir(out)


@contextlib.contextmanager
def removed_if_setup_fails(out: str, topo: Topology):
    """A launch that fails before training leaves no empty run folder behind (only a new, still empty one
    is removed)."""
    new_folder = False  # unknown (say, an unsearchable parent): prepare_run_dir gives the clear error
    with contextlib.suppress(OSError):
        new_folder = not Path(out).exists()
    try:
        yield
    except Exception:
        if new_folder and topo.is_main:
            with contextlib.suppress(OSError):
                Path(out).rmdir()  # only if still empty
        raise
