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
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402

from repro.cli import default_workers, raised_on_every_rank, run  # noqa: E402
from repro.config import (  # noqa: E402
    COMPILE_MODES, MODEL_VARIANTS, DataConfig, ModelConfig, OptimConfig, TrainConfig, apply_variant)
from repro.settings import add_declared_flags, apply_declared_flags, recipe_flag_settings, runtime_fields  # noqa: E402

CPU_BUDGET = dict(max_steps=60, batch_size=64, val_images=300, stats_images=10000)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--data", default=None, help="dataset folder (Fashion-MNIST: optional; imagenet/folder: holds train/ and val/)")
    a("--dataset", default="fashion-mnist", choices=["fashion-mnist", "imagenet", "folder"])
    a("--devkit", default=None, help="ImageNet devkit dir or tarball, for a flat val/ folder")
    a("--val-solution", default=None, help="Kaggle LOC_val_solution.csv, for a flat val/ folder")
    a("--val-split", default=None, help="--dataset folder: the held-out split's folder under --data "
      "(default: val/ if present, else test/)")
    a("--epochs", type=int, default=None, help="epochs (paper: 90)")
    a("--batch-size", type=int, default=None, help="images per step per tower pair (paper: 128)")
    a("--lr", type=float, default=0.01, help="initial learning rate (paper: 0.01)")
    a("--momentum", type=float, default=0.9)
    a("--weight-decay", type=float, default=5e-4)
    a("--schedule", default="plateau", choices=["plateau", "milestones"],
      help="plateau: /10 when val error stalls (paper); milestones: /10 at --milestones (2012 code)")
    a("--milestones", type=int, nargs="*", default=None, help="milestones: 0-based epochs of the drops "
      "(default 25 51 79, the 2012 code's)")
    a("--patience", type=int, default=None, help="plateau: epochs without improvement before a drop (default 3)")
    a("--bias-lr-mult", type=float, default=1.0, help="2012 code: 2")
    a("--bias-decay", action="store_true", help="also decay biases (the paper states the rule for weights)")
    a("--variant", default="paper", choices=sorted(MODEL_VARIANTS), help="network variant or ablation")
    a("--lrn-alpha", default=None, choices=["paper", "divided"],
      help="LRN: the paper's k + alpha * sum, or alpha / n as the 2012 code and Caffe (docs/fidelity.md)")
    a("--dropout-scaling", default="paper", choices=["paper", "inverted"])
    a("--pca", default="dataset", choices=["dataset", "imagenet", "none"], help="PCA colour noise source")
    a("--pca-scale", default="eigenvalue", choices=["eigenvalue", "sqrt"], help="2012 code: sqrt")
    a("--no-flip", action="store_true", help="no horizontal reflections")
    a("--seed", type=int, default=0)
    a("--out", default=None, help="run directory (default runs/<dataset>-<time>)")
    a("--resume", default=None, help="checkpoint file or run directory (its latest.pt); the run's recipe "
      "comes from the checkpoint (recipe flags that differ from it are refused), where to run from the flags, "
      "and how long from --epochs/--max-steps if given, else from the checkpoint")
    a("--max-steps", type=int, default=None, help="stop after N steps in all (smoke runs)")
    a("--val-images", type=int, default=None, help="validate on an evenly spaced subset")
    a("--stats-images", type=int, default=None, help="images for the mean image and PCA (default all)")
    a("--workers", type=int, default=default_workers(), help="decoding processes per rank (image files; "
      "default: 4, or fewer where each rank has fewer cores)")
    a("--decode", default="gpu", choices=["gpu", "cpu"],
      help="the stored 256x256 form on a GPU: decode its JPEGs there in batches (nvJPEG), or on the CPU in "
           "the --workers processes (untimed on the store; as separate files, CPU decoding beat nvJPEG: "
           "docs/benchmarks.md)")
    a("--log-every", type=int, default=10)
    a("--eval-batch-size", type=int, default=128)
    a("--final-crops", type=int, nargs="*", default=[1, 10], help="closing table protocols: 1 and/or 10")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"])
    a("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    a("--comm-timeout", type=float, default=600.0, help="seconds the process group's start and each collective "
      "wait for a peer before failing with an error (a dead or missing process)")
    a("--amp", default="none", choices=["none", "bf16"])
    a("--channels-last", action="store_true")
    a("--compile", action="store_true", help="torch.compile each tower stage (or the grouped network) and the "
      "optimiser's update")
    a("--compile-mode", default=None, choices=COMPILE_MODES,
      help="torch.compile's mode (implies --compile); reduce-overhead and max-autotune use CUDA graphs")
    add_declared_flags(p, TrainConfig)  # the flags declared on config fields (repro/settings.py)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# What a resumed run may change: the runtime settings declared in repro/config.py (--data sets the data's
# root). Every other flag is the run's recipe, which comes from the checkpoint.
RESUME_FLAGS = ({"resume", "data"} | set(runtime_fields(TrainConfig)) | set(runtime_fields(DataConfig))) & set(
    vars(build_parser().parse_args([])))  # those with a flag


def _network_core(model: ModelConfig) -> ModelConfig:
    """The network apart from what --lrn-alpha and --dropout-scaling choose and the data sets (classes,
    input size): what --variant chooses."""
    return dataclasses.replace(model, num_classes=1000, image_size=227, dropout_scaling="paper",
                               lrn=dataclasses.replace(model.lrn, alpha_convention="paper"))


# Each recipe flag's setting, read alike from the command line's config and the checkpoint's, so that a
# resumed command may repeat the run's own flags (a batch system's requeue reruns the same line).
RECIPE_SETTINGS: dict[str, Callable[[TrainConfig], object]] = {
    "dataset": lambda c: c.data.dataset, "batch_size": lambda c: c.batch_size, "seed": lambda c: c.seed,
    "lr": lambda c: c.optim.lr, "momentum": lambda c: c.optim.momentum,
    "weight_decay": lambda c: c.optim.weight_decay, "schedule": lambda c: c.optim.schedule,
    "milestones": lambda c: tuple(c.optim.milestones), "patience": lambda c: c.optim.plateau_patience,
    "bias_lr_mult": lambda c: c.optim.bias_lr_mult, "bias_decay": lambda c: c.optim.bias_weight_decay,
    "variant": lambda c: _network_core(c.model), "lrn_alpha": lambda c: c.model.lrn.alpha_convention,
    "dropout_scaling": lambda c: c.model.dropout_scaling, "pca": lambda c: c.data.pca,
    "pca_scale": lambda c: c.data.pca_scale, "no_flip": lambda c: not c.data.flip,
    "val_images": lambda c: c.data.val_images, "stats_images": lambda c: c.data.stats_images,
    **recipe_flag_settings(TrainConfig),  # the flags declared on config fields
}


def given_flags(argv=None) -> set[str]:
    """The options the command line actually gave (not those left at their defaults)."""
    p, unset = build_parser(), object()
    # argparse fills in a default only where the namespace lacks the attribute: a marker shows which it left
    marked = argparse.Namespace(**dict.fromkeys(vars(p.parse_args([])), unset))
    return {flag for flag, value in vars(p.parse_args(argv, namespace=marked)).items() if value is not unset}


def _as_flag(flag: str, value) -> str:
    """A setting as the command line writes it: `--lr 0.02`, `--no-flip`, `--milestones 25 51 79`."""
    name = "--" + flag.replace("_", "-")
    if isinstance(value, bool):
        return name if value else f"no {name}"
    if isinstance(value, ModelConfig):  # the network --variant names
        core = _network_core(value)
        value = next((v for v, make in MODEL_VARIANTS.items() if _network_core(make(1000)) == core), "(custom)")
    if isinstance(value, tuple):
        return " ".join([name, *map(str, value)]) if value else f"{name} (none)"
    return f"{name} {'(all)' if value is None else format(value, 'g') if isinstance(value, float) else value}"


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


def build_config(args: argparse.Namespace) -> TrainConfig:
    no_gpu = args.resume is None and (args.device == "cpu" or not torch.cuda.is_available())
    # Without a GPU: the short budget (steps, batch) unless --epochs/--max-steps say how long, and the
    # smaller validation and statistics sets unless their own flags are given (the whole Fashion-MNIST
    # test set in ten patches would take over an hour on a CPU, after any budget).
    cpu_budget = no_gpu and args.epochs is None and args.max_steps is None
    pick = lambda value, budget_key, default, budget=cpu_budget: (  # noqa: E731
        value if value is not None else CPU_BUDGET[budget_key] if budget else default)
    model = MODEL_VARIANTS[args.variant](1000)  # num_classes is set from the data
    if args.lrn_alpha:
        model = dataclasses.replace(model, lrn=dataclasses.replace(model.lrn, alpha_convention=args.lrn_alpha))
    model = dataclasses.replace(model, dropout_scaling=args.dropout_scaling)
    # A flag of the other schedule would do nothing: say so rather than ignore it. (On resume the schedule
    # is the checkpoint's, and check_resume_flags compares each given flag with it.)
    if args.resume is None and args.schedule == "plateau" and args.milestones is not None:
        raise ValueError("--milestones applies to --schedule milestones; the plateau schedule drops on its own")
    if args.resume is None and args.schedule == "milestones" and args.patience is not None:
        raise ValueError("--patience applies to --schedule plateau, not to fixed milestones")
    paper = OptimConfig()  # the defaults the two schedule flags fall back to
    optim = OptimConfig(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                        milestones=paper.milestones if args.milestones is None else tuple(args.milestones),
                        plateau_patience=paper.plateau_patience if args.patience is None else args.patience,
                        bias_lr_mult=args.bias_lr_mult, bias_weight_decay=args.bias_decay)
    data = DataConfig(dataset=args.dataset, root=args.data, pca=args.pca, pca_scale=args.pca_scale,
                      flip=not args.no_flip, crop_size=model.image_size,
                      val_images=pick(args.val_images, "val_images", None, no_gpu),
                      stats_images=pick(args.stats_images, "stats_images", None, no_gpu),
                      workers=args.workers, decode=args.decode, devkit=args.devkit,
                      val_solution=args.val_solution, val_split=args.val_split)
    from repro.run_folder import resume_dir_of

    out = args.out or (resume_dir_of(args.resume) if args.resume else
                       os.path.join("runs", f"{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"))
    batch_size = pick(args.batch_size, "batch_size", 128)
    if no_gpu and int(os.environ.get("RANK", "0")) == 0:
        said = []
        if cpu_budget:
            said.append(f"a short CPU budget instead of the paper's schedule ({CPU_BUDGET['max_steps']} steps of "
                        f"{batch_size} images; --epochs or --max-steps to choose)")
        elif args.batch_size is None:  # out of the budget, the recipe is the paper's: say what that costs here
            said.append(f"the paper's batch of {batch_size} images per step (--batch-size to choose; the short "
                        f"budget uses {CPU_BUDGET['batch_size']})")
        if args.val_images is None:
            said.append(f"validation on {CPU_BUDGET['val_images']} evenly spaced held-out images (--val-images)")
        if args.stats_images is None:
            said.append(f"mean image and colour statistics from {CPU_BUDGET['stats_images']} training images "
                        f"(--stats-images)")
        if said:
            print("No GPU: " + "; ".join(said) + ".", flush=True)
    cfg = TrainConfig(model=model, optim=optim, data=data, epochs=90 if args.epochs is None else args.epochs,
                      batch_size=batch_size, seed=args.seed,
                      max_steps=pick(args.max_steps, "max_steps", None), out=out, log_every=args.log_every,
                      eval_batch_size=args.eval_batch_size, final_crops=tuple(args.final_crops),
                      device=args.device, backend=args.backend, amp=args.amp, comm_timeout=args.comm_timeout,
                      channels_last=args.channels_last, compile=args.compile or args.compile_mode is not None,
                      compile_mode=args.compile_mode or "default")
    return apply_declared_flags(_with_preset(cfg, args), args)  # a declared flag given wins over the preset


# Flags that also set a field of a preset (apply_variant): given with a value other than their default, the
# flag wins over the preset (e.g. --variant cuda-convnet-2012 --milestones 7); otherwise the preset's value.
_PRESET_FLAGS = {"schedule": ("optim", "schedule"), "milestones": ("optim", "milestones"),
                 "bias_lr_mult": ("optim", "bias_lr_mult"), "pca_scale": ("data", "pca_scale")}


def _with_preset(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """cfg with the optimiser, schedule and data of --variant's preset (the network is already the variant's)."""
    preset, defaults = apply_variant(cfg, args.variant, network=False), build_parser().parse_args([])
    keep = {"optim": {}, "data": {}}
    for flag, (part, name) in _PRESET_FLAGS.items():
        if getattr(args, flag) != getattr(defaults, flag):
            keep[part][name] = getattr(getattr(cfg, part), name)
    return dataclasses.replace(preset, optim=dataclasses.replace(preset.optim, **keep["optim"]),
                               data=dataclasses.replace(preset.data, **keep["data"]))


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
