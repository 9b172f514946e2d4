"""Top-1 / top-5 error with the paper's test protocol, beside the paper's tables.

    python scripts/evaluate.py --checkpoint runs/fmnist/best.pt
    python scripts/evaluate.py --checkpoint runs/a --checkpoint runs/b --data /data/imagenet --crops 10

Centre patch and the average of the softmax over ten patches (four corners, centre, and their
reflections); several --checkpoint flags average the softmax over the networks (the paper's
"5 CNNs"). Writes evaluation.md/.json/.csv and the paper's Figures 3 and 4 to --out.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from repro.cli import default_workers, run  # noqa: E402
from repro.eval_job import EvalOptions, run_evaluation  # noqa: E402


def parse_args(argv=None) -> EvalOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--checkpoint", action="append", required=True,
      help="checkpoint file, or run directory (its latest.pt; name RUN/best.pt for the epoch with the best "
           "validation error); repeat for an ensemble")
    a("--dataset", default=None, choices=["fashion-mnist", "imagenet", "folder"], help="default: the training data")
    a("--data", default=None, help="dataset folder (default: the training run's)")
    a("--devkit", default=None, help="ImageNet devkit dir or tarball, for a flat val/ folder")
    a("--val-solution", default=None, help="Kaggle LOC_val_solution.csv, for a flat val/ folder")
    a("--val-split", default=None, help="--dataset folder: the held-out split's folder under --data "
      "(default: the training run's, else val/ if present, else test/)")
    a("--crops", type=int, nargs="+", default=[1, 10], choices=[1, 10], help="1: centre patch; 10: ten patches")
    a("--batch-size", type=int, default=128, help="images per forward (x crops rows)")
    a("--max-images", type=int, default=None, help="an evenly spaced subset, for a quick look")
    a("--form", default="grouped", choices=["grouped", "towers"], help="evaluate as one network or as two towers")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    a("--amp", default="none", choices=["none", "bf16"])
    a("--workers", type=int, default=default_workers(), help="decoding processes (default: 4, or the cores)")
    a("--out", default=None, help="output folder (default: <run>/evaluation; an ensemble: <first run>/"
      "evaluation-<n>-cnns)")
    a("--no-figures", action="store_true")
    a("--neighbours", type=int, default=5, help="Figure 4 query images (0: none)")
    args = p.parse_args(argv)
    for flag, value, least in (("--max-images", args.max_images, 1), ("--batch-size", args.batch_size, 1),
                               ("--workers", args.workers, 0), ("--neighbours", args.neighbours, 0)):
        if value is not None and value < least:
            p.error(f"{flag} must be at least {least}, got {value}")
    return EvalOptions(checkpoints=args.checkpoint, dataset=args.dataset, data=args.data, devkit=args.devkit,
                       val_solution=args.val_solution, val_split=args.val_split, crops=tuple(dict.fromkeys(args.crops)),
                       batch_size=args.batch_size, max_images=args.max_images, form=args.form,
                       device=args.device, amp=args.amp, workers=args.workers, out=args.out,
                       figures=not args.no_figures, neighbours=args.neighbours)


def main(argv=None) -> int:
    opts = parse_args(argv)
    return run(lambda: run_evaluation(opts))


if __name__ == "__main__":
    sys.exit(main())
