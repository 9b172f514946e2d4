"""Convert ImageNet once to the stored 256x256 form that training reads (docs/fidelity.md, data rows).

    python scripts/prepare_imagenet.py --data /data/imagenet --out /data/imagenet-256
    python scripts/prepare_imagenet.py --data /data/imagenet --out /data/imagenet-256 --splits val \\
        --devkit /data/ILSVRC2012_devkit_t12.tar.gz
    python scripts/prepare_imagenet.py --dataset folder --data /data/mytree --out /data/mytree-256

Each image is rescaled to shorter side 256, its central 256x256 patch cut out (the paper's only fixed
preprocessing), re-encoded as JPEG and packed into shards (repro/data/store.py). Resumable: after an
interruption run the same command again; complete shards are kept and the result is the same as one
uninterrupted run. The store is usable once repro-store.json appears in --out; train from it with
`--dataset imagenet --data STORE` (`--dataset folder --data STORE` for a converted ImageFolder tree,
given here with --dataset folder: train/<class>/ and val/<class>/).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from repro.cli import at_least, run  # noqa: E402
from repro.data.datasets import folder_split, held_out_name  # noqa: E402
from repro.data.imagenet import imagenet_splits, imagenet_train  # noqa: E402
from repro.data.store import WorkerDiedError, write_store  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--data", required=True, help="ImageNet root, holding train/<wnid>/*.JPEG and val/ (or, with --dataset "
      "folder, any tree of train/<class>/ and val/<class>/)")
    a("--dataset", default="imagenet", choices=["imagenet", "folder"])
    a("--out", required=True, help="store folder to write (or to finish, after an interruption)")
    a("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    a("--quality", type=int, default=90, help="JPEG quality of the stored images (90: about 21 KB each)")
    a("--shard-size", type=int, default=5000, help="images per shard file")
    a("--workers", type=at_least(0), default=None, help="encoding processes (default: every core this process may "
      "use; 0: none)")
    a("--devkit", default=None, help="ILSVRC2012_devkit_t12 folder or tarball, for a flat val/")
    a("--val-solution", default=None, help="Kaggle LOC_val_solution.csv, for a flat val/")
    a("--val-split", default=None, help="--dataset folder: the held-out folder under --data, stored as val "
      "(default: val/ if present, else test/)")
    a("--max-shards", type=at_least(1), default=None, help="stop after writing this many new shards")
    return p.parse_args(argv)


def open_sources(args: argparse.Namespace) -> dict:
    """The requested splits; val is always labelled with train's class index (sorted wnids, or sorted
    class folders)."""
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data} is not a folder; pass the dataset root that "
                                f"holds train/ and val/")
    if args.dataset == "folder":
        # The held-out folder (val/, else test/, or --val-split) is stored as val: found before the long scan
        held_out = held_out_name(args.data, args.val_split) if "val" in args.splits else None
        train = folder_split(args.data, "train")  # val's labels need train's class index in any case
        val = folder_split(args.data, held_out, classes=train.classes) if held_out else None
        return {name: split for name, split in (("train", train), ("val", val)) if name in args.splits}
    if "val" not in args.splits:
        return {"train": imagenet_train(args.data)}
    train, val = imagenet_splits(args.data, devkit=args.devkit, solution_csv=args.val_solution)
    return {name: split for name, split in (("train", train), ("val", val)) if name in args.splits}


def check_out(args: argparse.Namespace) -> None:
    """--out must be a writable folder apart from --data; checked before the long scan of the sources."""
    data, out = os.path.realpath(args.data), os.path.realpath(args.out)
    if out == data or out.startswith(os.path.join(data, "")):
        raise ValueError(f"--out {args.out} lies inside --data {args.data}: the store would be written into the "
                         f"dataset's own folders; pass an --out outside it")
    path = Path(os.path.abspath(args.out))
    there = next(p for p in (path, *path.parents) if p.exists())  # the folder it is, or will be made in
    if not there.is_dir():
        raise ValueError(f"--out {args.out}: {there} is a file, not a folder; pass another --out")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out}: {there} is not writable by this user; pass another --out")


def prepare(args: argparse.Namespace) -> dict:
    check_out(args)
    sources = open_sources(args)
    for name, source in sources.items():
        print(f"{name}: {len(source)} source images, {source.num_classes} classes", flush=True)
    start = time.monotonic()
    result = write_store(sources, args.out, quality=args.quality, shard_size=args.shard_size,
                         workers=args.workers, progress=lambda line: print(line, flush=True),
                         max_shards=args.max_shards)
    for name, entry in result["splits"].items():
        print(f"{name}: {entry['images']} images in {entry['shards']} shards, {entry['skipped']} "
              f"unreadable (listed in {os.path.join(args.out, name, 'skipped.txt')})")
    if result["complete"]:
        print(f"store complete in {time.monotonic() - start:.0f} s: {args.out}")
    else:
        print(f"store not complete yet ({result['shards_written']} shards written); run again to continue")
    return result


AGAIN = "run the same command again to continue: complete shards are kept"


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(lambda: prepare(args), interrupted=f"interrupted: {AGAIN}")
    except WorkerDiedError as exc:
        message = str(exc)
    except OSError as exc:  # disk full, permissions, a file in the way: not a bug, and resumable
        message = f"writing the store {args.out} failed: {exc}; free space or fix the cause, then {AGAIN}"
    sys.stderr.write(f"error: {message}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
