"""The paper's training (section 5): the loop and validation, around the owners of the checkpoint format
(repro.checkpoint), the run folder (repro.run_folder) and the stop agreement (repro.stop).

Launched by scripts/train_two_gpu.py. Everything a step does is a pure function of (seed, epoch,
step, replica) and the checkpointed state, so an interrupted run resumes to the same weights.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable

import torch

from repro.checkpoint import ResumePoint, read, resume_point, write_training
from repro.cli import RunDiverged, out_of_memory_advice, raised_on_every_rank
from repro.config import TrainConfig
from repro.data.augment import Augment, Stats, draw_params, step_generator
from repro.data.datasets import open_splits
from repro.data.loader import eval_indices, iterate, steps_per_epoch, train_batches
from repro.data.skipped import SkippedFiles, gather_and_write
from repro.data.stats import cached_stats, default_cache_dirs
from repro.dist import Topology, all_reduce_sum, init_topology, shutdown
from repro.evaluate import Counts, EvalSpec, RunningCounts, autocast, evaluate
from repro.metrics import MetricsLog, Progress, format_eta
from repro.model import lrn_triton
from repro.optim import LRSchedule, paper_optimizer, unreached_milestones
from repro.parallel import Replica, one_tower_message
from repro.run_folder import on_main_rank, prepare_run_dir, removed_if_setup_fails, restart_resume
from repro.run_report import closing_table_written, final_report
from repro.settings import merge_runtime
from repro.stop import StopAgreement


def resumed_config(requested: TrainConfig, saved: dict, keep_saved: tuple[str, ...] = ()) -> TrainConfig:
    """The checkpoint's recipe with the requested runtime fields (declared in repro/config.py), except
    those in `keep_saved` (how long to run, when the command line did not say: the run's own budget)."""
    return merge_runtime(TrainConfig.from_dict(saved), requested, keep_saved)


def read_on_main_rank(path: str, topo: Topology) -> dict:
    """The checkpoint, read by rank 0 and sent to every rank, so that a multi-node run resumes
    without its run directory on a shared filesystem. A bad path or file is the same clear error on
    every rank."""
    return on_main_rank(lambda: read(path, "cpu"), topo)


def resume_point_on_every_rank(path: str, topo: Topology) -> ResumePoint:
    """The run state to continue from `path`; a checkpoint this launch cannot continue is the same
    clear error on every rank."""
    ckpt = read_on_main_rank(path, topo)
    try:  # every rank has the checkpoint: all raise alike
        return resume_point(ckpt, path, topo.replicas)
    except ValueError as exc:
        raise raised_on_every_rank(exc) from None


class Trainer:
    def __init__(self, cfg: TrainConfig, topo: Topology, resume: str | None = None,
                 keep_saved: tuple[str, ...] = (), check_recipe: Callable[[TrainConfig], None] | None = None):
        lrn_triton.check_choice()  # a bad REPRO_LRN_KERNEL fails in seconds, not after the data is read
        ckpt = resume_point_on_every_rank(resume, topo) if resume else None
        if ckpt:
            try:  # every rank has the checkpoint: all raise alike
                if check_recipe:
                    check_recipe(TrainConfig.from_dict(ckpt.train_config))
            except ValueError as exc:
                raise raised_on_every_rank(exc) from None
            cfg = resumed_config(cfg, ckpt.train_config, keep_saved)
        self.topo, self.out = topo, Path(cfg.out)
        on_main_rank(lambda: prepare_run_dir(self.out, resume), topo)
        if topo.towers == 2 and cfg.model.towers != 2:  # before the data is read: fail in seconds, not minutes
            raise raised_on_every_rank(ValueError(one_tower_message(cfg.model)))
        if topo.device.type == "cuda":
            # Every training batch has one shape, so cuDNN's autotuner pays off after the first step.
            # (GPU runs are not bit-repeatable anyway: some CUDA backward kernels sum with atomics.)
            torch.backends.cudnn.benchmark = True
        self.train_set, self.val_set = open_splits(cfg.data)
        self.cfg = cfg = self._fit_classes(cfg, ckpt)
        # stored JPEGs decode on this GPU, or (None) in the loader's CPU workers
        self.decode_device = topo.device if cfg.data.decode == "gpu" else None
        self.stats = self._stats(ckpt)
        # unreadable files by name, added to the run folder's skipped.txt (the statistics pass's first)
        self.unreadable = SkippedFiles.load(self.out) if topo.is_main else SkippedFiles()
        self.augment = Augment(cfg.data, self.stats, topo.device)
        torch.manual_seed(cfg.seed)  # the initial weights
        self.replica = Replica(topo, cfg.model, ckpt.model if ckpt else None, cfg.channels_last,
                               cfg.compile_mode if cfg.compile else None)
        self.optimizer = paper_optimizer(self.replica.net, cfg.optim, compiled=cfg.compile)
        self.schedule = LRSchedule(cfg.optim)
        self.progress = Progress()
        self.saved_step: int | None = None  # the step of the last checkpoint this process wrote
        self.resumed_from = resume
        self.best_top1 = math.inf
        self.log = MetricsLog(self.out / "metrics.jsonl", enabled=topo.is_main)
        if ckpt:
            self._restore(ckpt)
        self.steps_per_epoch = steps_per_epoch(len(self.train_set), cfg.batch_size, topo.replicas)
        self.stop = StopAgreement(topo, self.say)
        self.stopped_by_signal = False  # set on every rank when they stop for a SIGTERM or Ctrl-C
        self.nothing_to_train = False  # the run's budget was spent before this launch
        self.pin = topo.device.type == "cuda"
        # Pairs' batches can differ in size only where images can be unreadable: files decoded on the CPU.
        gpu_decoded = getattr(self.train_set, "encoded", False) and self.decode_device is not None
        self.uneven_batches = topo.replicas > 1 and not getattr(self.train_set, "in_memory", False) and not gpu_decoded
        self.carried_counts = self._carried_counts(ckpt)

    def say(self, msg: str) -> None:
        if self.topo.is_main:
            print(msg, flush=True)

    # --- setup ---------------------------------------------------------------------------------

    def _fit_classes(self, cfg: TrainConfig, ckpt: ResumePoint | None) -> TrainConfig:
        n = self.train_set.num_classes
        if n < 2:
            raise ValueError(f"{self.train_set.name} has {n} class ({', '.join(self.train_set.classes)}): a classifier "
                             f"needs at least two (for --dataset folder, one subfolder of images per class)")
        if ckpt and ckpt.classes and list(ckpt.classes) != list(self.train_set.classes):
            raise ValueError(f"the checkpoint was trained on other classes than {self.train_set.name} "
                             f"({len(ckpt.classes)} vs {n}); resume with the same --data")
        if cfg.model.num_classes != n:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=n))
        return cfg

    def _stats(self, ckpt: ResumePoint | None) -> Stats | None:
        if ckpt and ckpt.stats:
            return Stats(**ckpt.stats)
        d = self.cfg.data
        if d.mean == "none" and d.pca != "dataset":
            return None
        idx = torch.arange(len(self.train_set))
        if d.stats_images and d.stats_images < len(idx):
            idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(self.cfg.seed))[:d.stats_images]]

        def batches():  # loader batches: cached_stats names their unreadable files in the run folder
            return iterate(self.train_set, idx.split(100), d.workers, decode_device=self.decode_device)

        dirs = default_cache_dirs(d.root, self.out)
        say = self.say if self.topo.is_main else (lambda _msg: None)
        if not self.topo.is_main and self.topo.backend:
            torch.distributed.barrier()  # rank 0 computes and caches first; the others then load
        stats = cached_stats(self.train_set, d.base_size, batches, dirs, d.stats_images, say, self.topo.device,
                             subset_seed=self.cfg.seed, skipped_to=self.out if self.topo.is_main else None)
        if self.topo.is_main and self.topo.backend:
            torch.distributed.barrier()
        return stats

    def _carried_counts(self, ckpt: ResumePoint | None) -> Counts | None:
        """Training errors counted in the interrupted epoch before the checkpoint, kept on rank 0 (the
        epoch's counts are summed over all ranks), so a resumed epoch reports the whole epoch."""
        if ckpt and ckpt.epoch_train_counts and self.topo.is_main:
            return Counts.from_list(ckpt.epoch_train_counts)
        return None

    def _restore(self, ckpt: ResumePoint) -> None:
        r = self.replica
        self.optimizer.load_velocities(r.net.named_parameters(), r.local_from_grouped(ckpt.velocity))
        self.schedule.load_state_dict(ckpt.schedule)
        self.progress = Progress(**ckpt.progress)
        self.best_top1 = ckpt.best_val_top1
        self.log.truncate_after(self.progress.global_step, self.progress.epoch)
        p = self.progress
        self.say(f"resumed in epoch {p.epoch + 1} after its step {p.step_in_epoch} (global step {p.global_step})")

    # --- checkpoints ---------------------------------------------------------------------------

    def save(self, name: str, also_best: bool = False) -> None:
        """Collective over all ranks (the epoch's partial counts) and pair 0 (tower 1 sends its
        block); rank 0 writes."""
        self._check_weights_finite()
        inside_epoch = self.progress.step_in_epoch > 0  # the same on every rank
        self.saved_step = self.progress.global_step
        partial = all_reduce_sum(self.meter.counts().as_list(), self.topo) if inside_epoch else None
        if self.topo.replica != 0:
            return
        r = self.replica
        model = r.model_state()
        velocity = r.grouped(self.optimizer.velocities(r.net.named_parameters()))
        if not self.topo.is_main:
            return
        point = ResumePoint(train_config=self.cfg.to_dict(), model=model, velocity=velocity,
                            schedule=self.schedule.state_dict(), progress=dataclasses.asdict(self.progress),
                            best_val_top1=self.best_top1, classes=list(self.train_set.classes),
                            stats=dataclasses.asdict(self.stats) if self.stats else None,
                            epoch_train_counts=partial, replicas=self.topo.replicas)
        write_training(point, [self.out / name] + ([self.out / "best.pt"] if also_best else []), self.topo.towers)

    # --- the loop ------------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        every = self.cfg.stop_check_every or (20 if self.topo.device.type == "cuda" else 1)
        if self.progress.global_step % every:
            return False
        return self.stop.agree().signalled

    def _budget_left(self) -> bool:
        return self.cfg.max_steps is None or self.progress.global_step < self.cfg.max_steps

    def fit(self) -> None:
        if self.progress.epoch >= self.cfg.epochs or not self._budget_left():
            self.say(f"nothing to train: the run has taken {self.progress.global_step} steps and {self.progress.epoch} "
                     f"epochs of its budget (--max-steps {self.cfg.max_steps}, --epochs {self.cfg.epochs}); "
                     f"pass a larger one with --resume to continue")
            self.nothing_to_train = True
            return
        o = self.cfg.optim
        if o.schedule == "milestones" and not o.milestones:
            self.say(f"note: --milestones gave no epoch: the rate stays {o.lr:g} for the whole run")
        unreached = unreached_milestones(o, self.cfg.epochs)
        if unreached:
            self.say(f"warning: milestones {', '.join(map(str, unreached))} lie at or past the run's last epoch "
                     f"(--epochs {self.cfg.epochs}; milestone m divides the rate from 0-based epoch m): the rate "
                     f"is not divided there; " + ("more --epochs reach them" if self.resumed_from else
                                                    "pass --milestones within the run, or more --epochs"))
        advice = ("" if self.cfg.amp == "bf16" else "pass --amp bf16, or ") + "start a new run with a smaller --batch-size"
        # once around the loop, not per step; validation names its own flag (validate)
        with self.stop.listening(), out_of_memory_advice(
                f"in a training step of {self.cfg.batch_size} images per pair", advice):
            while self.progress.epoch < self.cfg.epochs and self._budget_left():
                if not self._train_epoch():
                    return
                self._end_epoch()
            # A signal after the last stop check (the last epoch's validation, the last steps between
            # checks): latest.pt is saved already, and a preempted job ends without the closing evaluation.
            if self.stop.agree().signalled:
                self.say("SIGTERM or Ctrl-C after the last step: latest.pt holds the run; stopping")
                self.stopped_by_signal = True

    def _train_epoch(self) -> bool:
        """One epoch from the saved position; False if the run stopped inside it."""
        cfg, topo, p = self.cfg, self.topo, self.progress
        self.optimizer.set_lr(self.schedule.start_epoch(p.epoch), p.epoch)
        self.replica.train_module.train()
        index_lists = train_batches(len(self.train_set), cfg.batch_size, topo.replicas, topo.replica,
                                    cfg.seed, p.epoch, p.step_in_epoch)
        self.meter = RunningCounts(self.carried_counts)  # train errors, summed on the device
        self.carried_counts = None
        tick, losses = time.perf_counter(), []
        for batch in iterate(self.train_set, index_lists, cfg.data.workers, self.pin, self.decode_device):
            params = draw_params(cfg.batch_size, cfg.data,
                                 step_generator(cfg.seed, p.epoch, p.step_in_epoch, topo.replica), p.epoch)
            if topo.holds_logits:  # one tower per pair counts what both dropped
                self.meter.skipped += batch.skipped  # unreadable images, dropped from the batch
            self.unreadable.add(batch)  # ... and their names (both towers read the same files: kept once)
            if len(batch.labels) or self.uneven_batches:  # an empty batch still joins the other pairs' step
                loss = self._step(batch, params)
                if len(batch.labels):
                    losses.append(loss)
            p.step_in_epoch += 1
            p.global_step += 1
            if p.global_step % cfg.log_every == 0 or p.step_in_epoch == self.steps_per_epoch:
                tick = self._log_steps(losses, tick)
                losses = []
            if self._should_stop():
                self._log_steps(losses, tick)  # the steps since the last line: the checkpoint holds them
                self.say("SIGTERM or Ctrl-C: saving latest.pt and stopping")
                self.stopped_by_signal = True
                self.save("latest.pt")
                return False
            if not self._budget_left():
                self._log_steps(losses, tick)
                if p.step_in_epoch == self.steps_per_epoch:  # the epoch is complete: it ends as usual
                    self.say(f"reached the step budget ({cfg.max_steps} steps) at the end of epoch {p.epoch + 1}")
                    return True
                self.say(f"reached the step budget ({cfg.max_steps} steps): saving latest.pt")
                self.save("latest.pt")
                return False
        return True

    def _step(self, batch, params) -> torch.Tensor:
        """One optimiser step; returns the batch's mean loss, for the log."""
        dev, n = self.topo.device, len(batch.labels)
        if n:
            x = self.augment.train_batch(batch.images.to(dev, non_blocking=True), params.subset(n))
        else:  # every image unreadable: nothing to augment (union_loss runs a placeholder)
            x = torch.zeros(0, 3, self.cfg.data.crop_size, self.cfg.data.crop_size, device=dev)
        y = batch.labels.to(dev, non_blocking=True)
        with autocast(dev, self.cfg.amp):
            if self.uneven_batches:
                loss, out, logged = self.replica.union_loss(x, y)
            else:
                out = self.replica.train_module(x)
                loss = logged = self.replica.loss(out, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if out.shape[-1] and n:
            self.meter.add(out.detach().float().softmax(1), y)
        return logged.detach()

    def _log_steps(self, losses: list[torch.Tensor], tick: float) -> float:
        """The progress line and the steps' metrics; collective (every rank calls it at the same steps),
        so that all stop together where the loss stopped being finite."""
        now, p = time.perf_counter(), self.progress
        if not losses or not self.topo.is_main:
            self._stop_if_diverged(None)
            return now
        values = torch.stack(losses).float().tolist()  # one device sync per log line
        first = p.global_step - len(values) + 1
        for i, loss in enumerate(values):
            self.log.write(kind="step", step=first + i, epoch=p.epoch, loss=loss, lr=self.optimizer.base_lr)
        self._stop_if_diverged(next((first + i for i, v in enumerate(values) if not math.isfinite(v)), None))
        rate = len(values) * self.cfg.batch_size * self.topo.replicas / max(now - tick, 1e-9)
        total = self.steps_per_epoch * self.cfg.epochs
        if self.cfg.max_steps is not None:
            total = min(total, self.cfg.max_steps)
        eta = (total - p.global_step) * self.cfg.batch_size * self.topo.replicas / rate
        self.log.write(kind="speed", step=p.global_step, img_per_s=rate)
        self.say(f"{self._position(total)} loss {values[-1]:.4f} lr {self.optimizer.base_lr:.2e} {rate:.1f} img/s "
                 f"ETA {format_eta(eta)}")
        return now

    def _position(self, total: int) -> str:
        """Where the run is, against the budget it runs: "step 10/60" for a step budget that ends before
        the epochs do (the CPU budget), else "epoch 1/90 step 10/937"."""
        p = self.progress
        if total < self.steps_per_epoch * self.cfg.epochs:
            return f"step {p.global_step}/{total}" + (f" (epoch {p.epoch + 1})" if p.epoch else "")
        return f"epoch {p.epoch + 1}/{self.cfg.epochs} step {p.step_in_epoch}/{self.steps_per_epoch}"

    def _stop_if_diverged(self, bad_step: int | None) -> None:
        """Raise on every rank if rank 0 saw a loss that is NaN or infinite, before anything is saved:
        latest.pt and best.pt keep the last state that trained, and a run does not go on for days
        on NaN weights."""
        bad = self.stop.agree(bad_loss_step=bad_step).bad_loss_step
        if bad:
            raise self._diverged(f"the loss is not finite from step {bad}")

    def _diverged(self, what: str) -> RunDiverged:
        saved = (f"{self.out / 'latest.pt'} holds step {self.saved_step}" if self.saved_step is not None
                 else f"the checkpoint it resumed from ({self.resumed_from}) is untouched" if self.resumed_from
                 else "no checkpoint had been written")
        message = (f"training diverged: {what} (lr {self.optimizer.base_lr:.2e}; every step's loss is in "
                   f"{self.out / 'metrics.jsonl'}). Stopped without saving: {saved}. A new run with a lower --lr "
                   f"or another --seed may train")
        return raised_on_every_rank(RunDiverged(message))  # every rank stops here alike

    def _check_weights_finite(self) -> None:
        """Collective: the last step's update can make the weights NaN while its loss (computed before
        it) was finite, so a checkpoint checks the weights themselves."""
        params = list(self.replica.net.parameters())
        finite = bool(torch.stack([p.detach().isfinite().all() for p in params]).all()) if params else True
        if self.stop.agree(bad_weights=not finite).bad_weights:
            raise self._diverged(f"the weights after step {self.progress.global_step} are not finite")

    def _end_epoch(self) -> None:
        p = self.progress
        train = Counts.from_list(all_reduce_sum(self.meter.counts().as_list(), self.topo))
        val = self.validate((1,))[1]
        self.schedule.end_epoch(p.epoch, val.top1_error)
        improved = val.top1_error < self.best_top1
        self.best_top1 = min(self.best_top1, val.top1_error)
        self.log.write(kind="epoch", epoch=p.epoch, step=p.global_step, train_loss=train.loss,
                       train_top1_error=train.top1_error, train_top5_error=train.top5_error,
                       val_loss=val.loss, val_top1_error=val.top1_error, val_top5_error=val.top5_error,
                       lr=self.optimizer.base_lr, val_images=val.images,
                       unreadable_skipped=train.skipped + val.skipped)
        self.say(f"epoch {p.epoch + 1} done: train top-1 error {train.top1_error:.2f}% | val top-1 error "
                 f"{val.top1_error:.2f}%, top-5 error {val.top5_error:.2f}%, loss {val.loss:.4f} ({val.images} images)"
                 + (f"; skipped {train.skipped + val.skipped} unreadable images" if train.skipped + val.skipped else ""))
        p.epoch, p.step_in_epoch = p.epoch + 1, 0
        self.write_unreadable(f"epoch {p.epoch}")
        self.save("latest.pt", also_best=improved)

    def write_unreadable(self, what: str) -> None:
        """Collective: every rank's unreadable files merged into the run folder's skipped.txt (rank 0
        writes it and says how many and where)."""
        self.unreadable = gather_and_write(self.unreadable, self.out, what, self.topo.is_main, self.say)

    # --- evaluation ----------------------------------------------------------------------------

    def validate(self, crops: tuple[int, ...]) -> dict[int, Counts]:
        """Every validation image scored once across all pairs (both towers of a pair run it), under
        each protocol of `crops` (1: centre patch, 10: ten patches) in one pass."""
        idx = eval_indices(len(self.val_set), self.topo.replicas, self.topo.replica, self.cfg.data.val_images)
        spec = EvalSpec(crops=crops, batch_size=self.cfg.eval_batch_size, amp=self.cfg.amp,
                        workers=self.cfg.data.workers, pin=self.pin, decode_device=self.decode_device,
                        skipped=self.unreadable)
        net = self.replica.net.eval()
        patches = max(crops)
        with out_of_memory_advice(f"validating {spec.batch_size} images x {patches} patch(es) per forward",
                                  "pass a smaller --eval-batch-size"):
            results = evaluate([net], self.val_set, idx, self.augment, spec)
        net.train()
        if not self.topo.holds_logits:
            for counts in results.values():
                counts.skipped = 0  # tower 0 of the pair counts them
        totals = all_reduce_sum([v for c in crops for v in results[c].as_list()], self.topo)
        width = len(totals) // len(crops)
        return {c: Counts.from_list(totals[i * width:(i + 1) * width]) for i, c in enumerate(crops)}


def train(cfg: TrainConfig, resume: str | None = None, keep_saved: tuple[str, ...] = (),
          check_recipe: Callable[[TrainConfig], None] | None = None) -> dict[int, Counts]:
    """Run (or resume) training, then the closing evaluation; returns its counts by crops. On resume,
    the fields named in `keep_saved` (e.g. "epochs", "max_steps") keep the checkpoint's values, and
    `check_recipe` (if given) sees the checkpoint's config first and may refuse it with a ValueError."""
    topo = init_topology(cfg.device, cfg.backend, cfg.comm_timeout)
    try:
        resume = restart_resume(cfg.out, resume, topo)
        with removed_if_setup_fails(cfg.out, topo):
            trainer = Trainer(cfg, topo, resume, keep_saved, check_recipe)
        origin = getattr(trainer.train_set, "origin", None) or trainer.cfg.data.root
        trainer.say(f"{trainer.cfg.data.dataset} (from {origin}): {len(trainer.train_set)} training images, "
                    f"{trainer.steps_per_epoch} steps per epoch; {topo.replicas} replica(s) of "
                    f"{topo.towers} tower(s) on {topo.device} ({topo.backend or 'one process'})")
        trainer.fit()
        trainer.write_unreadable("training")  # the steps since the last epoch's end (a budget, a stop)
        if trainer.stopped_by_signal:  # a preempted job should end now, not start an evaluation
            trainer.say(f"stopped: no closing table; --resume {trainer.out} continues the run")
            return {}
        if trainer.nothing_to_train and on_main_rank(lambda: closing_table_written(trainer), topo):
            trainer.say(f"the closing table of step {trainer.progress.global_step} is already in "
                        f"{trainer.out / 'results.md'}: not scored again (scripts/evaluate.py scores a checkpoint anew)")
            return {}
        results = final_report(trainer)
        trainer.write_unreadable("the closing evaluation")
        return results
    finally:
        shutdown()
