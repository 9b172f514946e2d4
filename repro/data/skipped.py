"""The unreadable files of a pass over the data, by name: collected from the loader's batches (across
DataLoader workers and, at the end, across ranks) and written as `skipped.txt`, one "path<TAB>reason"
line each, with one line for the log that says how many and where the list is."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch.distributed as dist

from repro.atomic import atomic_write

SKIPPED_FILE = "skipped.txt"


class SkippedFiles:
    """(path, reason) of each file a pass could not decode, in the order met, each path once."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def load(cls, folder: str | Path) -> "SkippedFiles":
        """The list folder/skipped.txt holds (empty if none): a resumed run, or training after the
        statistics pass, adds to it rather than replacing it."""
        found = cls()
        path = Path(folder) / SKIPPED_FILE
        if path.is_file():
            found.extend(read_skipped(path))
        return found

    def add(self, batch) -> None:
        """Record a loader Batch's unreadable files (a batch without any adds nothing)."""
        self.extend(getattr(batch, "unreadable", ()))

    def extend(self, pairs: Iterable[tuple[str, str]]) -> None:
        for path, reason in pairs:
            self.items.setdefault(str(path), str(reason))

    def gather(self, group=None) -> "SkippedFiles":
        """Every rank's list merged (a collective: every rank of `group` calls it); the same on all.
        Without an initialised process group, this list itself."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        lists: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(lists, list(self.items.items()), group=group)
        merged = SkippedFiles()
        for pairs in lists:
            merged.extend(pairs)
        return merged

    def write(self, folder: str | Path, what: str) -> str | None:
        """Write folder/skipped.txt (atomically) if any file was skipped, and return the log line
        naming `what` pass it was; None, and nothing written, when no file was skipped."""
        path = Path(folder) / SKIPPED_FILE
        if not self.items:
            return None
        lines = "".join(f"{_one_line(p)}\t{_one_line(r)}\n" for p, r in self.items.items())
        atomic_write(path, lambda f: f.write(lines), binary=False)
        n = len(self.items)
        return f"{what}: skipped {n} unreadable file{'s' if n != 1 else ''}, listed in {path}"


def images_of(batches: Iterable, skipped: SkippedFiles | None) -> Iterator:
    """The images of loader batches (empty ones left out), recording their unreadable files in
    `skipped` on the way (the statistics pass reads images only). Plain tensors pass through."""
    for batch in batches:
        if not hasattr(batch, "images"):
            yield batch
            continue
        if skipped is not None:
            skipped.add(batch)
        if len(batch.labels):
            yield batch.images


def _one_line(text: str) -> str:
    return " ".join(str(text).replace("\t", " ").split())


def read_skipped(path: str | Path) -> list[tuple[str, str]]:
    """The (path, reason) pairs of a skipped.txt."""
    pairs = [line.split("\t", 1) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
    return [(p[0], p[1] if len(p) > 1 else "") for p in pairs]


def gather_and_write(skipped: SkippedFiles, folder: str | Path, what: str, is_main: bool,
                     log=print, group=None) -> SkippedFiles:
    """At the end of an epoch (or run, or pass): every rank calls this (a collective when a process
    group is up); rank 0 (`is_main`) writes the merged list to folder/skipped.txt and logs one line.
    Returns the merged list, the same on every rank."""
    merged = skipped.gather(group)
    if is_main:
        line = merged.write(folder, what)
        if line:
            log(line)
    return merged
