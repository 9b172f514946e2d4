"""The run the training loop works on (`Run`), and `setup`, which builds it from a config and, on
resume, a checkpoint: the run folder, the data and its statistics, the network, the optimiser and
the position to continue from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from repro import native
from repro.checkpoint import ResumePoint, read, resume_point
from repro.cli import raised_on_every_rank
from repro.config import AUTO_COMPILE_IMAGES, TrainConfig
from repro.data.augment import Augment, Stats
from repro.data.datasets import open_splits
from repro.data.loader import iterate, steps_per_epoch
from repro.data.skipped import SkippedFiles
from repro.data.stats import cached_stats, default_cache_dirs
from repro.dist import Topology
from repro.evaluate import Counts
from repro.host_memory import keep_freed_memory
from repro.metrics import MetricsLog, Progress
from repro.model import lrn_cpu, lrn_native, lrn_triton, winograd
from repro.optim import LRSchedule, PaperSGD, paper_optimizer
from repro.parallel import Replica, one_tower_message
from repro.run_folder import on_main_rank, prepare_run_dir
from repro.settings import merge_runtime
from repro.stop import StopAgreement


@dataclass
class Data:
    """The two splits and how this rank turns their files into batches."""

    train_set: Any
    val_set: Any
    stats: Stats | None  # the mean image and colour statistics (None: the recipe uses neither)
    augment: Augment
    decode_device: torch.device | None  # stored JPEGs decode on this GPU, or (None) in the loader's workers
    pin: bool
    uneven_batches: bool  # pairs' batches can differ in size (unreadable files): every step takes the union
    unreadable: SkippedFiles  # by name, for the run folder's skipped.txt (the statistics pass's first)


@dataclass
class Run:
    """What the loop works on: built once by `setup`; the loop moves `progress` on."""

    cfg: TrainConfig
    topo: Topology
    out: Path  # the run folder
    data: Data
    replica: Replica
    optimizer: PaperSGD
    schedule: LRSchedule
    log: MetricsLog
    resumed_from: str | None = None
    progress: Progress = field(default_factory=Progress)
    best_top1: float = math.inf
    carried_counts: Counts | None = None  # the interrupted epoch's training counts (rank 0: they are summed)
    saved_step: int | None = None  # the step of the last checkpoint this process wrote
    stop: StopAgreement = field(init=False)

    def __post_init__(self) -> None:
        self.stop = StopAgreement(self.topo, self.say)

    def say(self, msg: str) -> None:
        if self.topo.is_main:
            print(msg, flush=True)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.data.train_set), self.cfg.batch_size, self.topo.replicas)

    @property
    def stop_check_every(self) -> int:
        """Steps between check points for a stop signal: on a GPU each one makes the host wait."""
        return self.cfg.stop_check_every or (20 if self.topo.device.type == "cuda" else 1)


def setup(cfg: TrainConfig, topo: Topology, resume: str | None = None, keep_saved: tuple[str, ...] = (),
          check_recipe: Callable[[TrainConfig], None] | None = None) -> Run:
    """The run: its config (on resume, the checkpoint's recipe), folder, data, network, optimiser and,
    on resume, the position and state the checkpoint `resume` holds."""
    lrn_triton.check_choice()  # a bad REPRO_LRN_KERNEL fails in seconds, not after the data is read
    point = resume_point_on_every_rank(resume, topo) if resume else None
    if point:
        cfg = checked_resumed_config(cfg, point, keep_saved, check_recipe)
    out = Path(cfg.out)
    on_main_rank(lambda: prepare_run_dir(out, resume), topo)
    if topo.towers == 2 and cfg.model.towers != 2:  # before the data is read: fail in seconds, not minutes
        raise raised_on_every_rank(ValueError(one_tower_message(cfg.model)))
    memory = keep_freed_memory() if topo.device.type == "cpu" else None  # before the loader forks its workers
    if topo.device.type == "cuda":
        # Every training batch has one shape, so cuDNN's autotuner pays off after the first step.
        # (GPU runs are not bit-repeatable anyway: some CUDA backward kernels sum with atomics.)
        torch.backends.cudnn.benchmark = True
    cfg, data = open_data(cfg, topo, point)
    torch.manual_seed(cfg.seed)  # the initial weights
    replica = Replica(topo, cfg.model, point.model if point else None, cfg.channels_last,
                      cfg.compile_mode if cfg.compile else None)
    run = Run(cfg, topo, out, data, replica, paper_optimizer(replica.net, cfg.optim, compiled=cfg.compile),
              LRSchedule(cfg.optim), MetricsLog(out / "metrics.jsonl", enabled=topo.is_main), resumed_from=resume)
    if point:
        restore(run, point)
    run.cfg = with_cpu_conv_chosen(with_cpu_lrn_chosen(run, resumed=point is not None), run, resumed=point is not None)
    lrn_cpu.set_kernel(run.cfg.cpu_lrn)
    winograd.set_kernel(run.cfg.cpu_conv)
    if memory:
        run.say(f"host memory: {memory}")
    origin = getattr(data.train_set, "origin", None) or cfg.data.root
    run.say(f"{cfg.data.dataset} (from {origin}): {len(data.train_set)} training images, {run.steps_per_epoch} "
            f"steps per epoch; {topo.replicas} replica(s) of {topo.towers} tower(s) on {topo.device} "
            f"({topo.backend or 'one process'})")
    return run


def resume_point_on_every_rank(path: str, topo: Topology) -> ResumePoint:
    """The run state to continue from `path`, read by rank 0 and sent to every rank (a multi-node run
    resumes without its run directory on a shared filesystem); a bad path or a checkpoint this launch
    cannot continue is the same clear error on every rank."""
    ckpt = on_main_rank(lambda: read(path, "cpu"), topo)
    try:  # every rank has the checkpoint: all raise alike
        return resume_point(ckpt, path, topo.replicas)
    except ValueError as exc:
        raise raised_on_every_rank(exc) from None


def resumed_config(requested: TrainConfig, saved: dict, keep_saved: tuple[str, ...] = ()) -> TrainConfig:
    """The checkpoint's recipe with the requested runtime fields (declared in repro/config.py), except
    those in `keep_saved` (how long to run, when the command line did not say: the run's own budget)."""
    return merge_runtime(TrainConfig.from_dict(saved), requested, keep_saved)


def checked_resumed_config(cfg: TrainConfig, point: ResumePoint, keep_saved: tuple[str, ...],
                           check_recipe: Callable[[TrainConfig], None] | None) -> TrainConfig:
    try:  # every rank has the checkpoint: all raise alike
        if check_recipe:
            check_recipe(TrainConfig.from_dict(point.train_config))
    except ValueError as exc:
        raise raised_on_every_rank(exc) from None
    return resumed_config(cfg, point.train_config, keep_saved)


def open_data(cfg: TrainConfig, topo: Topology, point: ResumePoint | None) -> tuple[TrainConfig, Data]:
    """The splits, the config with their class count, and the statistics augmentation uses (on resume the
    checkpoint's: one preprocessing for the whole run)."""
    train_set, val_set = open_splits(cfg.data)
    cfg = with_classes(cfg, train_set, point)
    decode_device = topo.device if cfg.data.decode == "gpu" else None
    stats = Stats(**point.stats) if point and point.stats else dataset_stats(cfg, topo, train_set, decode_device)
    # Pairs' batches can differ in size only where images can be unreadable: files decoded on the CPU.
    gpu_decoded = getattr(train_set, "encoded", False) and decode_device is not None
    uneven = topo.replicas > 1 and not getattr(train_set, "in_memory", False) and not gpu_decoded
    unreadable = SkippedFiles.load(Path(cfg.out)) if topo.is_main else SkippedFiles()
    return cfg, Data(train_set, val_set, stats, Augment(cfg.data, stats, topo.device), decode_device,
                     pin=topo.device.type == "cuda", uneven_batches=uneven, unreadable=unreadable)


def with_classes(cfg: TrainConfig, train_set, point: ResumePoint | None) -> TrainConfig:
    n = train_set.num_classes
    if n < 2:
        raise ValueError(f"{train_set.name} has {n} class ({', '.join(train_set.classes)}): a classifier "
                         f"needs at least two (for --dataset folder, one subfolder of images per class)")
    if point and point.classes and list(point.classes) != list(train_set.classes):
        raise ValueError(f"the checkpoint was trained on other classes than {train_set.name} "
                         f"({len(point.classes)} vs {n}); resume with the same --data")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=n))


def dataset_stats(cfg: TrainConfig, topo: Topology, train_set, decode_device) -> Stats | None:
    """The training set's mean image and colour statistics, computed by rank 0 (or read from its cache)
    and then read by the others; None when the recipe uses neither."""
    d, out = cfg.data, Path(cfg.out)
    if d.mean == "none" and d.pca != "dataset":
        return None
    idx = torch.arange(len(train_set))
    if d.stats_images and d.stats_images < len(idx):
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(cfg.seed))[:d.stats_images]]

    def batches():  # loader batches: cached_stats names their unreadable files in the run folder
        return iterate(train_set, idx.split(100), d.workers, decode_device=decode_device)

    say = (lambda msg: print(msg, flush=True)) if topo.is_main else (lambda _msg: None)
    if not topo.is_main and topo.backend:
        torch.distributed.barrier()  # rank 0 computes and caches first; the others then load
    stats = cached_stats(train_set, d.base_size, batches, default_cache_dirs(d.root, out), d.stats_images, say,
                         topo.device, subset_seed=cfg.seed, skipped_to=out if topo.is_main else None)
    if topo.is_main and topo.backend:
        torch.distributed.barrier()
    return stats


def with_cpu_lrn_chosen(run: Run, resumed: bool) -> TrainConfig:
    """The config with --cpu-lrn auto resolved, which the checkpoints then keep: on the CPU the native
    kernels where the C compiler builds them (seconds, once per machine); else compiled kernels when this
    launch trains enough images to win back their compile time; else eager. A resumed checkpoint still
    saying auto was written before the choice existed: its run computed eagerly."""
    cfg, p = run.cfg, run.progress
    if cfg.cpu_lrn == "auto":
        total = min(run.steps_per_epoch * cfg.epochs, cfg.max_steps or math.inf)
        images = (total - p.global_step) * cfg.batch_size
        on_cpu = run.topo.device.type == "cpu" and not resumed
        kernel = "eager"
        if on_cpu and native_lrn_builds(run):
            kernel = "native"
        elif on_cpu and images >= AUTO_COMPILE_IMAGES:
            kernel = "compiled"
        cfg = dataclasses.replace(cfg, cpu_lrn=kernel)
        if kernel == "native":
            run.say("the LRN runs the native CPU kernels (--cpu-lrn auto; repro/model/lrn_native.c, built once per "
                    f"machine into {lrn_native.cache_dir()})")
        if kernel == "compiled":
            run.say(f"the LRN runs compiled CPU kernels (--cpu-lrn auto: {images:,} training images per process "
                    f"in this launch); the first steps compile them once, about a minute on a cold cache")
    return cfg


def with_cpu_conv_chosen(cfg: TrainConfig, run: Run, resumed: bool) -> TrainConfig:
    """The config with --cpu-conv auto resolved, which the checkpoints then keep: on the CPU, Winograd for
    conv1-conv5 where its C transforms build; else the direct convolution. A resumed checkpoint still
    saying auto was written before the choice existed: its run convolved directly."""
    if cfg.cpu_conv != "auto":
        return cfg
    kernel = "direct"
    if run.topo.device.type == "cpu" and not resumed:
        if winograd.load() is not None:
            kernel = "winograd"
            layers = "conv1, conv3-conv5 (conv2 stays direct under --amp bf16)" if cfg.amp == "bf16" else "conv1-conv5"
            run.say(f"{layers} run by Winograd's minimal filtering (--cpu-conv auto; repro/model/winograd_native.c, "
                    f"built once per machine into {native.cache_dir()})")
        else:
            run.say(f"--cpu-conv auto: the Winograd transforms do not build here ({winograd.unavailable()}); "
                    "convolving directly")
    return dataclasses.replace(cfg, cpu_conv=kernel)


def native_lrn_builds(run: Run) -> bool:
    """Whether lrn_native.c builds (or is cached) here; why not, once, where it does not."""
    try:
        lrn_native.build()
        return True
    except lrn_native.NativeUnavailable as exc:
        run.say(f"--cpu-lrn auto: the native CPU LRN does not build here ({exc}); choosing without it")
        return False


def restore(run: Run, point: ResumePoint) -> None:
    """The checkpoint's optimiser, schedule and position; metrics.jsonl cut back to the checkpoint."""
    r, p = run.replica, Progress(**point.progress)
    run.optimizer.load_velocities(r.net.named_parameters(), r.local_from_grouped(point.velocity))
    run.schedule.load_state_dict(point.schedule)
    run.progress, run.best_top1 = p, point.best_val_top1
    if point.epoch_train_counts and run.topo.is_main:
        run.carried_counts = Counts.from_list(point.epoch_train_counts)
    run.log.truncate_after(p.global_step, p.epoch)
    run.say(f"resumed in epoch {p.epoch + 1} after its step {p.step_in_epoch} (global step {p.global_step})")
