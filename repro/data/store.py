"""ImageNet converted once to the paper's 256x256 images, kept as JPEG shards (paper section 2).

The paper's only fixed preprocessing is "shorter side 256, then the central 256x256 patch" (section 2).
Decoding full-size ImageNet JPEGs for that every epoch is what limits training speed, so it is done
once: each image is cut to 256x256 by `decode_image` (the same function the folder readers use),
re-encoded as JPEG (quality 90 by default, about 21 KB), and packed into large shards. Training then
reads raw bytes and decodes small JPEGs, on CPU workers or batched on the GPU (26-27k img/s on an
H100, docs/benchmarks.md).

    python scripts/prepare_imagenet.py --data IMAGENET_ROOT --out STORE   # resumable

Layout:

    STORE/repro-store.json              marker, written last: format, classes, size, quality, splits
    STORE/<split>/shard-00000.bin       the shard's JPEG files, concatenated
    STORE/<split>/shard-00000.idx.npz   offsets, lengths, labels, names; skipped_names, skipped_reasons
    STORE/<split>/skipped.txt           "name<TAB>reason" for each source file that did not decode
                                        (UTF-8; tabs, line breaks and undecodable bytes escaped)
    STORE/.lock                         held (flock) by the run writing the store: one at a time

A shard holds `shard_size` consecutive source images (the source's deterministic order), minus the
unreadable ones. Names are source paths relative to the folder holding the whole split (for train
"n01440764/n01440764_10026.JPEG"), so a store does not depend on where the dataset lay.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from repro.cores import available_cores
from repro.data.folder import FolderSource, ImageDecodeError, decode_image

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

STORE_MARKER = "repro-store.json"
FORMAT = "repro-store/1"
SIZE = 256  # the paper's stored image side (section 2)
SKIPPED = "skipped.txt"
LOCK = ".lock"  # held by the one run writing the store
TMP = ".tmp"  # suffix of a file still being written; renamed into place when complete
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def is_store(path: str | Path) -> bool:
    """True when path is a complete store (its marker exists)."""
    return (Path(path) / STORE_MARKER).is_file()


def is_unfinished_store(path: str | Path) -> bool:
    """True when path holds shards but no marker: writing the store was interrupted."""
    return not is_store(path) and any(Path(path).glob("*/shard-*"))


def check_not_unfinished(path: str | Path) -> None:
    """Raise with what to do if `path` is a store whose writing was interrupted."""
    if is_unfinished_store(path):
        raise FileNotFoundError(_not_a_store(Path(path)))


def _shard_paths(split_dir: Path, k: int) -> tuple[Path, Path]:
    return split_dir / f"shard-{k:05d}.bin", split_dir / f"shard-{k:05d}.idx.npz"


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + TMP)


@contextlib.contextmanager
def _atomic(path: Path, mode: str = "wb"):
    """Write to path + ".tmp", flush to disk, then rename: a reader sees the whole file or none.
    Text is UTF-8 whatever the locale; a file name that is not (undecodable bytes) is escaped."""
    text = {} if "b" in mode else dict(encoding="utf-8", errors="backslashreplace")
    with open(_tmp(path), mode, **text) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(_tmp(path), path)


def _relative_names(files: Sequence[str]) -> list[str]:
    """Each path relative to the deepest folder holding them all, with "/" separators."""
    dirs = sorted({os.path.dirname(f) for f in files})
    root = os.path.commonpath(dirs) if dirs and dirs[0] else ""
    prefix = os.path.join(root, "") if root else ""
    names = [f[len(prefix):] if f.startswith(prefix) else os.path.relpath(f, root or ".") for f in files]
    return [n.replace(os.sep, "/") for n in names] if os.sep != "/" else names


# ---------------------------------------------------------------- writing


def _encode(job: tuple[str, int]) -> tuple[bytes | None, str]:
    """(JPEG bytes of the 256x256 image, "") or (None, reason). Top level, so a Pool can pickle it."""
    path, quality = job
    try:
        image = decode_image(path, SIZE)  # shorter side 256, central crop (section 2)
    except ImageDecodeError as e:
        return None, e.reason
    buf = io.BytesIO()
    Image.fromarray(image.numpy()).save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), ""


class DamagedIndexError(ValueError):
    """A shard's index file exists but cannot be read (damaged outside this code: writes are atomic)."""


def _read_index(idx_path: Path) -> dict[str, np.ndarray] | None:
    """The shard's index, or None if it does not exist; DamagedIndexError if it cannot be read."""
    if not idx_path.is_file():
        return None
    try:
        with np.load(idx_path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DamagedIndexError(f"{idx_path} is damaged ({type(exc).__name__}: {exc}); run "
                                f"scripts/prepare_imagenet.py again with the same arguments to rewrite "
                                f"its shard") from exc


def _complete_shard(split_dir: Path, k: int, names: list[str], labels: np.ndarray, quality: int) -> dict | None:
    """The index of shard k if it was written completely from these names, labels and quality, None
    if it must be (re)written; raises when a complete shard belongs to other images or settings."""
    bin_path, idx_path = _shard_paths(split_dir, k)
    try:
        index = _read_index(idx_path)
    except DamagedIndexError:
        return None  # rewrite it
    if index is None or not bin_path.is_file() or bin_path.stat().st_size != int(index["lengths"].sum()):
        return None
    if int(index["quality"]) != quality:
        raise ValueError(f"{idx_path} was written at JPEG quality {int(index['quality'])}, not {quality}; "
                         f"rerun with that quality or write to an empty folder")
    held = [str(n) for n in index["names"]] + [str(n) for n in index["skipped_names"]]
    if sorted(held) != sorted(names):
        raise ValueError(f"{idx_path} holds other images than shard {k} of this dataset (another "
                         f"dataset or --shard-size?); write to an empty folder")
    label_of = dict(zip(names, labels.tolist()))
    differ = sum(label_of[str(n)] != int(y) for n, y in zip(index["names"], index["labels"]))
    if differ:
        raise ValueError(f"{idx_path} labels {differ} of its {len(index['labels'])} images otherwise than the "
                         f"dataset does now (a corrected ground truth or class list?); write the store to "
                         f"an empty folder")
    return index


def _write_shard(split_dir: Path, k: int, files: list[str], names: list[str], labels: np.ndarray,
                 quality: int, encode_all: Callable) -> dict:
    """Encode one shard's images (in order) and write its .bin, then its .idx.npz."""
    results = encode_all([(f, quality) for f in files])
    bin_path, idx_path = _shard_paths(split_dir, k)
    kept, lengths, skipped = [], [], []
    with _atomic(bin_path) as out:
        for j, (data, reason) in enumerate(results):
            if data is None:  # the reason names the file as the store does: no path of this machine
                skipped.append((names[j], reason.replace(files[j], names[j])))
                continue
            out.write(data)
            kept.append(j)
            lengths.append(len(data))
    lengths = np.array(lengths, dtype=np.int64)
    index = dict(offsets=np.cumsum(lengths) - lengths, lengths=lengths,
                 labels=labels[kept].astype(np.int64), names=np.array([names[j] for j in kept], dtype=str),
                 skipped_names=np.array([s[0] for s in skipped], dtype=str),
                 skipped_reasons=np.array([s[1] for s in skipped], dtype=str),
                 quality=np.int64(quality))
    with _atomic(idx_path) as out:  # last: its presence means the shard is complete
        np.savez(out, **index)
    return index


def _progress_line(split: str, k: int, shards: int, done: int, total: int, new: int, seconds: float) -> str:
    rate = new / max(seconds, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) and eta < 86400 * 30 else "?"
    return (f"{split}: shard {k + 1}/{shards}  {done}/{total} images  {rate:.0f} img/s  "
            f"ETA {eta_text}")


def _write_split(out_dir: Path, split: str, source: FolderSource, quality: int, shard_size: int,
                 encode_all: Callable, progress: Callable[[str], None],
                 budget: int | None) -> tuple[dict | None, int]:
    """All shards of one split, skipping complete ones. Returns (the split's marker entry, or None
    if `budget` new shards ran out first; the number of shards written)."""
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    files, names, labels = source.files, _relative_names(source.files), source.labels.numpy()
    n, shards = len(files), math.ceil(len(files) / shard_size)
    images, skipped, written, new, start = 0, [], 0, 0, time.monotonic()
    for k in range(shards):
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        index = _complete_shard(split_dir, k, names[lo:hi], labels[lo:hi], quality)
        if index is None:
            if budget is not None and written >= budget:
                return None, written
            index = _write_shard(split_dir, k, files[lo:hi], names[lo:hi], labels[lo:hi], quality, encode_all)
            written, new = written + 1, new + hi - lo
            progress(_progress_line(split, k, shards, hi, n, new, time.monotonic() - start))
        images += len(index["labels"])
        skipped += zip(index["skipped_names"].tolist(), index["skipped_reasons"].tolist())
    if written < shards:
        progress(f"{split}: {shards - written} of {shards} shards were already complete")
    with _atomic(split_dir / SKIPPED, "w") as f:  # merged from the indexes: the same after a resume
        f.writelines(f"{_one_field(name)}\t{' '.join(reason.split())}\n" for name, reason in skipped)
    for leftover in split_dir.glob(f"shard-*{TMP}"):  # from an interrupted run
        leftover.unlink()
    return dict(name=source.name, images=images, shards=shards, skipped=len(skipped),
                shard_size=shard_size), written


def _one_field(name: str) -> str:
    """A file name as one field of a tab-separated line: tabs and line breaks escaped."""
    return name.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _read_marker(out_dir: Path) -> dict | None:
    if not is_store(out_dir):
        return None
    path = out_dir / STORE_MARKER
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # written last and atomically: damaged from outside
        raise ValueError(f"{path} is damaged ({exc}); delete it and run scripts/prepare_imagenet.py again "
                         f"with the same arguments (complete shards are kept)") from exc
    if not isinstance(marker, dict):
        raise ValueError(f"{path} is not a store marker (not a JSON object); delete it and run "
                         f"scripts/prepare_imagenet.py again with the same arguments")
    if marker.get("format") != FORMAT:
        raise ValueError(f"{out_dir / STORE_MARKER} has format {marker.get('format')!r}; this code reads "
                         f"{FORMAT!r}")
    return marker


def _check_write_args(splits: dict, out_dir: Path, quality: int, shard_size: int) -> list[str]:
    """The classes all splits share; raises on bad arguments or a store made for other classes."""
    if not splits:
        raise ValueError("no splits to write")
    bad = [s for s in splits if not _SPLIT_NAME.fullmatch(s)]
    if bad:
        raise ValueError(f"split name {bad[0]!r} is not a plain folder name")
    if not 1 <= quality <= 100 or shard_size < 1:
        raise ValueError(f"need 1 <= quality <= 100 and shard_size >= 1, got {quality} and {shard_size}")
    classes = list(next(iter(splits.values())).classes)
    for name, source in splits.items():
        if list(source.classes) != classes:
            raise ValueError(f"split {name!r} has other classes than the others: the splits of a store "
                             f"share one class index")
    marker = _read_marker(out_dir)
    if marker is not None and marker["classes"] != classes:
        raise ValueError(f"{out_dir} is already a store of {len(marker['classes'])} other classes "
                         f"({marker['classes'][:3]}...); write to an empty folder")
    if marker is not None and marker["quality"] != quality:
        raise ValueError(f"{out_dir} is a store at JPEG quality {marker['quality']}, not {quality}")
    return classes


class WorkerDiedError(RuntimeError):
    """An encoding process died (killed for memory, or a crash inside an image library)."""


@contextlib.contextmanager
def _encoder(workers: int) -> Iterator[Callable]:
    """A function mapping _encode over jobs in order: in this process, or in a pool of workers.
    A worker that dies raises WorkerDiedError (multiprocessing.Pool would wait for it forever)."""
    if workers <= 1:
        yield lambda jobs: map(_encode, jobs)
        return
    pool = ProcessPoolExecutor(workers)  # one pool for the whole run: workers start once

    def encode_all(jobs):
        try:
            yield from pool.map(_encode, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers))))
        except BrokenProcessPool as exc:
            raise WorkerDiedError("an encoding process died (out of memory, or a crash in an image library); "
                                  "run the same command again, perhaps with fewer --workers: complete shards "
                                  "are kept") from exc

    try:
        yield encode_all
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # an interruption does not wait for queued images
        raise
    pool.shutdown()


@contextlib.contextmanager
def _only_writer(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on out_dir for the whole write: two runs into one store would delete
    each other's temporary files and lose one another's splits from the marker."""
    if fcntl is None:  # no flock here (Windows): one writer at a time is up to the user
        yield
        return
    with open(out_dir / LOCK, "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another scripts/prepare_imagenet.py run is writing the store {out_dir} (it holds "
                             f"{out_dir / LOCK}); wait for it to finish, then run again to add or finish "
                             f"splits") from None
        except OSError:  # a file system without locks (some network mounts): one writer is up to the user
            pass
        yield  # the lock goes with the file's closing, also when this process dies


def write_store(splits: dict[str, FolderSource], out_dir: str | Path, quality: int = 90,
                shard_size: int = 5000, workers: int | None = None,
                progress: Callable[[str], None] = print, max_shards: int | None = None) -> dict:
    """Write (or finish) a store of `splits` in out_dir; see the module docstring for the layout.

    Resumable: complete shards are kept, so running again after an interruption gives the same store
    as one uninterrupted run. `max_shards` stops after that many newly written shards. The marker is
    written only once every shard of every split is complete. Returns the marker's content plus
    "complete" and "shards_written" (when incomplete, "splits" holds only the finished splits)."""
    out_dir = Path(out_dir)
    _check_write_args(splits, out_dir, quality, shard_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _only_writer(out_dir):
        return _write_locked(splits, out_dir, quality, shard_size, workers, progress, max_shards)


def _write_locked(splits: dict[str, FolderSource], out_dir: Path, quality: int, shard_size: int,
                  workers: int | None, progress: Callable[[str], None], max_shards: int | None) -> dict:
    classes = _check_write_args(splits, out_dir, quality, shard_size)  # again: the marker may have changed
    previous = _read_marker(out_dir)
    info, written = {}, 0
    with _encoder(available_cores() if workers is None else workers) as encode_all:
        for split, source in splits.items():
            budget = None if max_shards is None else max_shards - written
            entry, n = _write_split(out_dir, split, source, quality, shard_size, encode_all, progress, budget)
            written += n
            if entry is None:
                progress(f"stopped after {written} new shards (max_shards); run again to continue")
                return dict(complete=False, shards_written=written, splits=info)
            info[split] = entry
    marker = dict(format=FORMAT, size=SIZE, quality=quality, classes=classes,
                  splits={**(previous["splits"] if previous else {}), **info})
    with _atomic(out_dir / STORE_MARKER, "w") as f:
        json.dump(marker, f, indent=1)
    return dict(marker, complete=True, shards_written=written)


# ---------------------------------------------------------------- reading


def _load_split(split_dir: Path, entry: dict) -> tuple[np.ndarray, ...]:
    """(shard of each image, offsets, lengths, labels, names), all shards concatenated in order."""
    shard, offsets, lengths, labels, names = [], [], [], [], []
    for k in range(entry["shards"]):
        bin_path, idx_path = _shard_paths(split_dir, k)
        index = _read_index(idx_path)
        if index is None or not bin_path.is_file():
            raise FileNotFoundError(f"incomplete store: {idx_path if index is None else bin_path} is "
                                    f"missing; rewrite the store with scripts/prepare_imagenet.py")
        if bin_path.stat().st_size != int(index["lengths"].sum()):
            raise ValueError(f"incomplete store: {bin_path} has {bin_path.stat().st_size} bytes, its "
                             f"index says {int(index['lengths'].sum())}")
        shard.append(np.full(len(index["labels"]), k, dtype=np.int32))
        for kept, key in ((offsets, "offsets"), (lengths, "lengths"), (labels, "labels"), (names, "names")):
            kept.append(index[key])
    out = tuple(np.concatenate(a) if a else np.zeros(0, np.int64) for a in (shard, offsets, lengths, labels))
    if len(out[0]) != entry["images"]:
        raise ValueError(f"incomplete store: {split_dir} holds {len(out[0])} images, the marker says "
                         f"{entry['images']}")
    return (*out, [str(n) for a in names for n in a.tolist()])


class StoreSource(Dataset):
    """One split of a store: 256x256 images as uint8 HWC tensors, or their JPEG bytes.

    `encoded_batch` gives the bytes for batched GPU decoding (torchvision.io.decode_jpeg on a list,
    docs/benchmarks.md); `__getitem__` decodes on the CPU. Shard files are memory-mapped lazily in each process,
    so the source pickles into DataLoader workers without open files."""

    in_memory = False
    encoded = True
    max_open_shards = 256  # ImageNet's train split at the default 5000 images per shard has 257

    def __init__(self, store_dir: str | Path, split: str, classes: Sequence[str] | None = None):
        self.root = Path(store_dir)
        marker = _read_marker(self.root)
        if marker is None:
            raise FileNotFoundError(_not_a_store(self.root))
        if split not in marker["splits"]:
            raise ValueError(f"store {self.root} has no split {split!r} (it has "
                             f"{', '.join(marker['splits']) or 'none'}); write it with "
                             f"scripts/prepare_imagenet.py --splits {split}")
        self.classes, self.size, self.split = list(marker["classes"]), int(marker["size"]), split
        if classes is not None and list(classes) != self.classes:
            raise ValueError(f"store {self.root} has {len(self.classes)} classes {self.classes[:3]}..., "
                             f"not the {len(classes)} given {list(classes)[:3]}...")
        entry = marker["splits"][split]
        self.name = entry.get("name", f"imagenet/{split}")
        self._shard, self._offsets, self._lengths, labels, self.files = _load_split(self.root / split, entry)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self._maps: dict[int, np.memmap] = {}  # in order of use, least recent first
        self._pid = os.getpid()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def _map(self, k: int) -> np.memmap:
        """Shard k mapped, from a cache of the most recently used: each mapping holds a file descriptor,
        and a store of small shards would otherwise exceed the process's limit (often 1024)."""
        if self._pid != os.getpid():  # forked: map the shards afresh in this process
            self._maps, self._pid = {}, os.getpid()
        m = self._maps.pop(k, None)
        if m is None:
            if len(self._maps) >= self.max_open_shards:
                del self._maps[next(iter(self._maps))]  # the least recently used; closes when unreferenced
            m = np.memmap(_shard_paths(self.root / self.split, k)[0], dtype=np.uint8, mode="r")
        self._maps[k] = m  # last in the dict's order: the most recently used
        return m

    def content_probe(self, every: int) -> bytes:
        """The stored JPEG sizes of every `every`-th image, for the statistics cache's key."""
        return np.ascontiguousarray(self._lengths[::every], dtype=np.int64).tobytes()

    def encoded_item(self, i: int) -> torch.Tensor:
        """Image i's JPEG file as a 1-D uint8 tensor (a copy, so it outlives the mapping)."""
        start = int(self._offsets[i])
        data = self._map(int(self._shard[i]))[start:start + int(self._lengths[i])]
        return torch.from_numpy(np.array(data))

    def encoded_batch(self, indices: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """JPEG bytes of each image, for torchvision.io.decode_jpeg(list, device="cuda")."""
        return [self.encoded_item(int(i)) for i in indices]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        # Imported here: torchvision's package import costs each training process ~2 s, and only
        # stores decoded on the CPU need it.
        from torchvision.io import ImageReadMode, decode_jpeg

        image = decode_jpeg(self.encoded_item(i), mode=ImageReadMode.RGB)  # (3, 256, 256)
        return image.permute(1, 2, 0).contiguous(), int(self.labels[i])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}  # mappings are per process

    def __repr__(self) -> str:
        return f"StoreSource({self.name!r}, {len(self)} images, {self.num_classes} classes, size={self.size})"


def _not_a_store(root: Path) -> str:
    if is_unfinished_store(root):
        return (f"{root} is an unfinished store (no {STORE_MARKER} yet): writing it was interrupted; run "
                f"scripts/prepare_imagenet.py again with the same arguments to finish it")
    return (f"{root} is not an image store (no {STORE_MARKER}); make one with "
            f"scripts/prepare_imagenet.py --data IMAGENET_ROOT --out {root}")
