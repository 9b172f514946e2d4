"""Train the 2012 AlexNet the paper's way, one tower per process (or grouped in one process).

    torchrun --nproc_per_node=2 scripts/train_two_gpu.py                 # Fashion-MNIST, two towers
    torchrun --nproc_per_node=2 scripts/train_two_gpu.py --dataset imagenet --data /data/imagenet
    torchrun --nproc_per_node=1 scripts/train_two_gpu.py                 # the grouped form
    torchrun --nnodes=4 --nproc_per_node=2 ... scripts/train_two_gpu.py  # 4 pairs, data-parallel

Without a GPU and without --epochs/--max-steps, a short CPU budget runs instead of the paper's
90 epochs: 60 steps of 64 images; without a GPU, validation also uses 300 held-out images and the
dataset statistics 10,000 training images unless --val-images/--stats-images say otherwise. The run
ends with the error table either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from repro.cli import default_workers, raised_on_every_rank, run  # noqa: E402
from repro.config import MODEL_VARIANTS, ModelConfig, TrainConfig, apply_variant  # noqa: E402
from repro.run_folder import resume_dir_of  # noqa: E402
from repro.settings import (  # noqa: E402
    add_declared_flags, apply_declared_flags, as_flag, recipe_flag_settings, runtime_flags)

CPU_BUDGET = dict(max_steps=60, batch_size=64, val_images=300, stats_images=10000)


def build_parser() -> argparse.ArgumentParser:
    """--variant and --resume, and the flags declared on the config fields (repro/config.py), in two groups."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    recipe = p.add_argument_group("the run's recipe", "stored in its checkpoint; with --resume, a value other "
                                  "than the run's is refused")
    recipe.add_argument("--variant", default="paper", choices=sorted(MODEL_VARIANTS),
                        help="network variant or ablation (cuda-convnet-2012: also the 2012 run's optimiser, "
                             "schedule and data; a flag given wins over them)")
    add_declared_flags(recipe, TrainConfig, runtime=False)
    launch = p.add_argument_group("how and where it runs", "each launch's own, with --resume too")
    launch.add_argument("--resume", default=None, help="checkpoint file or run directory (its latest.pt); the "
                        "run's recipe comes from the checkpoint (recipe flags that differ from it are refused), "
                        "where to run from the flags, and how long from --epochs/--max-steps if given, else from "
                        "the checkpoint")
    add_declared_flags(launch, TrainConfig, runtime=True)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """--variant's preset, every flag given over it, and what a flag left out defaults to on this machine."""
    cfg = apply_declared_flags(apply_variant(TrainConfig(), args.variant), args)
    # A flag of the other schedule would do nothing: say so rather than ignore it. (On resume the schedule
    # is the checkpoint's, and check_resume_flags compares each given flag with it.)
    if args.resume is None and cfg.optim.schedule == "plateau" and args.milestones is not None:
        raise ValueError("--milestones applies to --schedule milestones; the plateau schedule drops on its own")
    if args.resume is None and cfg.optim.schedule == "milestones" and args.patience is not None:
        raise ValueError("--patience applies to --schedule plateau, not to fixed milestones")
    out = args.out or (resume_dir_of(args.resume) if args.resume else
                       os.path.join("runs", f"{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"))
    workers = default_workers() if args.workers is None else cfg.data.workers
    cfg = dataclasses.replace(cfg, out=out, compile=cfg.compile or args.compile_mode is not None,
                              data=dataclasses.replace(cfg.data, workers=workers))
    if args.resume is None and (cfg.device == "cpu" or not torch.cuda.is_available()):
        cfg = without_a_gpu(cfg, args)
    return cfg


def without_a_gpu(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """The short budget (steps, batch) unless --epochs/--max-steps say how long, and the smaller validation
    and statistics sets unless their own flags are given (the whole Fashion-MNIST test set in ten patches
    would take over an hour on a CPU, after any budget)."""
    short = args.epochs is None and args.max_steps is None
    top = {k: CPU_BUDGET[k] for k in ("max_steps", "batch_size") if short and getattr(args, k) is None}
    data = {k: CPU_BUDGET[k] for k in ("val_images", "stats_images") if getattr(args, k) is None}
    cfg = dataclasses.replace(cfg, **top, data=dataclasses.replace(cfg.data, **data))
    said = []
    if short:
        said.append(f"a short CPU budget instead of the paper's schedule ({CPU_BUDGET['max_steps']} steps of "
                    f"{cfg.batch_size} images; --epochs or --max-steps to choose)")
    elif args.batch_size is None:  # out of the budget, the recipe is the paper's: say what that costs here
        said.append(f"the paper's batch of {cfg.batch_size} images per step (--batch-size to choose; the short "
                    f"budget uses {CPU_BUDGET['batch_size']})")
    if args.val_images is None:
        said.append(f"validation on {CPU_BUDGET['val_images']} evenly spaced held-out images (--val-images)")
    if args.stats_images is None:
        said.append(f"mean image and colour statistics from {CPU_BUDGET['stats_images']} training images "
                    f"(--stats-images)")
    if said and int(os.environ.get("RANK", "0")) == 0:
        print("No GPU: " + "; ".join(said) + ".", flush=True)
    return cfg


def _network_core(model: ModelConfig) -> ModelConfig:
    """The network apart from what --lrn-alpha and --dropout-scaling choose and the data sets (classes,
    input size): what --variant chooses."""
    return dataclasses.replace(model, num_classes=1000, image_size=227, dropout_scaling="paper",
                               lrn=dataclasses.replace(model.lrn, alpha_convention="paper"))


# What a resumed run may change: the runtime flags declared in repro/config.py. Every other flag is the
# run's recipe, which comes from the checkpoint: each recipe flag's setting is read alike from the command
# line's config and the checkpoint's, so that a resumed command may repeat the run's own flags (a batch
# system's requeue reruns the same line).
RESUME_FLAGS = runtime_flags(TrainConfig) | {"resume"}
RECIPE_SETTINGS = {**recipe_flag_settings(TrainConfig), "variant": lambda c: _network_core(c.model)}


def given_flags(argv=None) -> set[str]:
    """The options the command line actually gave (not those left at their defaults)."""
    p, unset = build_parser(), object()
    # argparse fills in a default only where the namespace lacks the attribute: a marker shows which it left
    marked = argparse.Namespace(**dict.fromkeys(vars(p.parse_args([])), unset))
    return {flag for flag, value in vars(p.parse_args(argv, namespace=marked)).items() if value is not unset}


def _as_flag(flag: str, value) -> str:
    if isinstance(value, ModelConfig):  # the network --variant names
        core = _network_core(value)
        value = next((v for v, make in MODEL_VARIANTS.items() if _network_core(make(1000)) == core), "(custom)")
    return as_flag(flag, value)


def check_resume_flags(requested: TrainConfig, saved: TrainConfig, given: set[str]) -> None:
    """A resumed run keeps the checkpoint's recipe: refuse recipe flags that would change it (and so be
    ignored), naming what the run used. Flags equal to the run's own are fine."""
    # A checkpoint stores both schedules' settings; the one its schedule does not read is no match.
    unread = {"milestones": saved.optim.schedule != "milestones", "patience": saved.optim.schedule != "plateau"}
    differ = [f for f in sorted(given & RECIPE_SETTINGS.keys())
              if unread.get(f) or RECIPE_SETTINGS[f](requested) != RECIPE_SETTINGS[f](saved)]
    if differ:
        ours = ", ".join(_as_flag(f, RECIPE_SETTINGS[f](requested)) for f in differ)
        theirs = ", ".join(dict.fromkeys(  # once, where two flags point at the run's schedule
            f"--schedule {saved.optim.schedule}" if unread.get(f) else _as_flag(f, RECIPE_SETTINGS[f](saved))
            for f in differ))
        raise ValueError(f"{ours} with --resume: the checkpoint's run has {theirs}, and a resumed run keeps its "
                         f"recipe; leave these flags out (or give the run's own values), or start a new run "
                         f"(another --out) with them")


def main(argv=None) -> int:
    args = parse_args(argv)
    from repro.train import train

    # On resume, how long to run is the run's own budget unless the command line says otherwise.
    keep_saved = tuple(f for f in ("epochs", "max_steps") if getattr(args, f) is None)
    given = given_flags(argv)

    def work():
        try:
            cfg = build_config(args)
        except ValueError as exc:  # from the flags alone: every rank of the launch raises it
            raise raised_on_every_rank(exc) from None
        # a --resume, or torchelastic's restart of this same command line, compares its flags with the run's
        check = lambda saved: check_resume_flags(cfg, saved, given)  # noqa: E731
        return train(cfg, resume=args.resume, keep_saved=keep_saved, check_recipe=check)

    return run(work, interrupted="interrupted: stopped without saving (any latest.pt written before is intact)")


if __name__ == "__main__":
    sys.exit(main())
