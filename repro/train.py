"""The paper's training (section 5): `train` sets a run up, `fit` trains it (epochs of steps, a check
point every few steps, validation and latest.pt at each epoch's end), and the closing evaluation
scores it.

    torchrun --nproc_per_node=2 scripts/train_two_gpu.py

The loop works on a `Run`, which repro.run_setup builds. Around it, one owner per concern: the
checkpoint format (repro.checkpoint), the run folder (repro.run_folder), the stop agreement
(repro.stop) and metrics.jsonl (repro.metrics). Everything a step does is a pure function of (seed,
epoch, step, replica) and the checkpointed state, so an interrupted run resumes to the same weights.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Literal

import torch
from torch import Tensor

from repro.checkpoint import ResumePoint, write_training
from repro.cli import RunDiverged, out_of_memory_advice, raised_on_every_rank
from repro.config import TrainConfig
from repro.data.augment import draw_params, step_generator
from repro.data.loader import Batch, eval_indices, iterate, train_batches
from repro.data.skipped import gather_and_write
from repro.dist import Topology, all_reduce_sum, init_topology, shutdown
from repro.evaluate import Counts, EvalSpec, RunningCounts, autocast, evaluate
from repro.metrics import StepLosses, format_eta
from repro.optim import unreached_milestones
from repro.run_folder import on_main_rank, removed_if_setup_fails, restart_resume
from repro.run_report import closing_table_written, write_report
from repro.run_setup import Run, setup

Ended = Literal["trained", "stopped", "nothing to train"]  # how `fit` ended: "stopped" by a signal


def train(cfg: TrainConfig, resume: str | None = None, keep_saved: tuple[str, ...] = (),
          check_recipe: Callable[[TrainConfig], None] | None = None) -> dict[int, Counts]:
    """Run (or resume) training, then the closing evaluation; returns its counts by crops. On resume,
    the fields named in `keep_saved` (e.g. "epochs", "max_steps") keep the checkpoint's values, and
    `check_recipe` (if given) sees the checkpoint's config first and may refuse it with a ValueError."""
    topo = init_topology(cfg.device, cfg.backend, cfg.comm_timeout)
    ended = False
    try:
        results = train_and_score(cfg, topo, resume, keep_saved, check_recipe)
        ended = True
        return results
    finally:
        shutdown(peers_done=ended)


def train_and_score(cfg: TrainConfig, topo: Topology, resume: str | None, keep_saved: tuple[str, ...],
                    check_recipe: Callable[[TrainConfig], None] | None) -> dict[int, Counts]:
    resume = restart_resume(cfg.out, resume, topo)
    with removed_if_setup_fails(cfg.out, topo):
        run = setup(cfg, topo, resume, keep_saved, check_recipe)
    ended = fit(run)
    write_unreadable(run, "training")  # the steps since the last epoch's end (a budget, a stop)
    if ended == "stopped":  # a preempted job should end now, not start an evaluation
        run.say(f"stopped: no closing table; --resume {run.out} continues the run")
        return {}
    if ended == "nothing to train" and on_main_rank(lambda: closing_table_written(run), topo):
        run.say(f"the closing table of step {run.progress.global_step} is already in {run.out / 'results.md'}: "
                f"not scored again (scripts/evaluate.py scores a checkpoint anew)")
        return {}
    if not run.cfg.final_crops:
        run.say("no closing table: --final-crops named no protocol (1 and/or 10)")
        return {}
    results = validate(run, run.cfg.final_crops)
    if topo.is_main:
        write_report(run, results)  # results.md, .json, .csv and the learning curves
    write_unreadable(run, "the closing evaluation")
    return results


def fit(run: Run) -> Ended:
    """Train from where the run stands to the end of its budget (--epochs, --max-steps)."""
    cfg, topo, p = run.cfg, run.topo, run.progress
    if not budget_left(run):
        run.say(f"nothing to train: the run has taken {p.global_step} steps and {p.epoch} epochs of its budget "
                f"(--max-steps {cfg.max_steps}, --epochs {cfg.epochs}); pass a larger one with --resume to continue")
        return "nothing to train"
    warn_about_milestones(run)
    carried = run.carried_counts  # the interrupted epoch's counts before the checkpoint
    advice = ("" if cfg.amp == "bf16" else "pass --amp bf16, or ") + "start a new run with a smaller --batch-size"
    # once around the loop, not per step; validation names its own flag (validate)
    with run.stop.listening(), out_of_memory_advice(f"in a training step of {cfg.batch_size} images per pair", advice):
        while budget_left(run):
            run.optimizer.set_lr(run.schedule.start_epoch(p.epoch), p.epoch)
            run.replica.train_module.train()
            counts, carried = RunningCounts(carried), None  # training errors, summed on the device
            losses = StepLosses(run.log, p.global_step)
            for batch in epoch_batches(run):
                params = draw_params(cfg.batch_size, cfg.data,
                                     step_generator(cfg.seed, p.epoch, p.step_in_epoch, topo.replica), p.epoch)
                losses.add(p.global_step + 1, train_step(run, batch, params, counts))
                p.step_in_epoch, p.global_step = p.step_in_epoch + 1, p.global_step + 1
                epoch_ends, budget_ends = p.step_in_epoch == run.steps_per_epoch, not budget_left(run)
                line = p.global_step % cfg.log_every == 0 or epoch_ends or budget_ends
                if line or p.global_step % run.stop_check_every == 0:
                    signalled = check_point(run, losses)  # every rank, the same answer; raises if diverged
                    if line or signalled:
                        progress_line(run, losses)
                    if signalled:
                        run.say("SIGTERM or Ctrl-C: saving latest.pt and stopping")
                        save(run, counts)
                        return "stopped"
                if budget_ends and not epoch_ends:
                    run.say(f"reached the step budget ({cfg.max_steps} steps): saving latest.pt")
                    save(run, counts)
                    return "trained"
                if budget_ends:  # on the epoch's last step: the epoch ends as usual
                    run.say(f"reached the step budget ({cfg.max_steps} steps) at the end of epoch {p.epoch + 1}")
            end_epoch(run, counts)
        # A signal after the last check point (the last epoch's validation): latest.pt is saved already,
        # and a preempted job ends without the closing evaluation.
        if run.stop.agree().signalled:
            run.say("SIGTERM or Ctrl-C after the last step: latest.pt holds the run; stopping")
            return "stopped"
    return "trained"


# --- the loop's pieces, in the order the loop calls them ----------------------------------------

def budget_left(run: Run) -> bool:
    p, cfg = run.progress, run.cfg
    return p.epoch < cfg.epochs and (cfg.max_steps is None or p.global_step < cfg.max_steps)


def epoch_batches(run: Run):
    """This pair's batches for the rest of the epoch, from the step the run stands at."""
    cfg, topo, p, data = run.cfg, run.topo, run.progress, run.data
    index_lists = train_batches(len(data.train_set), cfg.batch_size, topo.replicas, topo.replica, cfg.seed,
                                p.epoch, p.step_in_epoch)
    return iterate(data.train_set, index_lists, cfg.data.workers, data.pin, data.decode_device)


def train_step(run: Run, batch: Batch, params, counts: RunningCounts) -> Tensor | None:
    """One optimiser step; the batch's mean loss, for the log (None: no image of this pair's batch
    was readable)."""
    dev, n, data = run.topo.device, len(batch.labels), run.data
    if run.topo.holds_logits:  # one tower per pair counts what both dropped
        counts.skipped += batch.skipped  # unreadable images, dropped from the batch
    data.unreadable.add(batch)  # ... and their names (both towers read the same files: kept once)
    if not n and not data.uneven_batches:
        return None
    if n:  # an empty batch still joins the other pairs' step (union_loss runs a placeholder)
        x = data.augment.train_batch(batch.images.to(dev, non_blocking=True), params.subset(n))
    else:
        x = torch.zeros(0, 3, run.cfg.data.crop_size, run.cfg.data.crop_size, device=dev)
    y = batch.labels.to(dev, non_blocking=True)
    with autocast(dev, run.cfg.amp):
        if data.uneven_batches:
            loss, out, logged = run.replica.union_loss(x, y)
        else:
            out = run.replica.train_module(x)
            loss = logged = run.replica.loss(out, y)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    if out.shape[-1] and n:
        counts.add(out.detach().float().softmax(1), y)
    return logged.detach() if n else None


def check_point(run: Run, losses: StepLosses) -> bool:
    """The stop agreement's one collective: rank 0 writes the steps' losses to metrics.jsonl, and
    every rank raises if a loss or the weights are not finite, before anything is saved (latest.pt and
    best.pt keep the last state that trained; a run does not go on for days on NaN weights). The
    weights are checked too because the last update can make them NaN after a finite loss. True: some
    rank was asked to stop (SIGTERM, Ctrl-C)."""
    bad_step = losses.read(run.progress.epoch, run.optimizer.base_lr)
    params = [p.detach().isfinite().all() for p in run.replica.net.parameters()]
    finite = bool(torch.stack(params).all()) if params else True
    verdict = run.stop.agree(bad_loss_step=bad_step, bad_weights=not finite)
    if verdict.bad_loss_step:
        raise diverged(run, f"the loss is not finite from step {verdict.bad_loss_step}")
    if verdict.bad_weights:
        raise diverged(run, f"the weights after step {run.progress.global_step} are not finite")
    return verdict.signalled


def diverged(run: Run, what: str) -> RunDiverged:
    saved = (f"{run.out / 'latest.pt'} holds step {run.saved_step}" if run.saved_step is not None
             else f"the checkpoint it resumed from ({run.resumed_from}) is untouched" if run.resumed_from
             else "no checkpoint had been written")
    message = (f"training diverged: {what} (lr {run.optimizer.base_lr:.2e}; every step's loss is in "
               f"{run.out / 'metrics.jsonl'}). Stopped without saving: {saved}. A new run with a lower --lr "
               f"or another --seed may train")
    return raised_on_every_rank(RunDiverged(message))  # every rank stops here alike


def progress_line(run: Run, losses: StepLosses) -> None:
    """Where the run stands against the budget it runs, the last loss, the speed and the time left:
    "step 10/60" for a step budget that ends before the epochs do (the CPU budget), else
    "epoch 1/90 step 10/937"."""
    cfg, p, per_epoch = run.cfg, run.progress, run.steps_per_epoch
    images_per_step = cfg.batch_size * run.topo.replicas
    read = losses.line(p.global_step, images_per_step)
    if read is None or not run.topo.is_main:
        return
    loss, rate = read
    total = min(per_epoch * cfg.epochs, cfg.max_steps or math.inf)
    if total < per_epoch * cfg.epochs:
        where = f"step {p.global_step}/{total}" + (f" (epoch {p.epoch + 1})" if p.epoch else "")
    else:
        where = f"epoch {p.epoch + 1}/{cfg.epochs} step {p.step_in_epoch}/{per_epoch}"
    eta = (total - p.global_step) * images_per_step / rate
    run.say(f"{where} loss {loss:.4f} lr {run.optimizer.base_lr:.2e} {rate:.1f} img/s ETA {format_eta(eta)}")


def save(run: Run, counts: RunningCounts, also_best: bool = False) -> None:
    """latest.pt (and best.pt). Collective over all ranks (the epoch's partial counts) and pair 0
    (tower 1 sends its block); rank 0 writes. The check point before it found the weights finite."""
    inside_epoch = run.progress.step_in_epoch > 0  # the same on every rank
    run.saved_step = run.progress.global_step
    partial = all_reduce_sum(counts.counts().as_list(), run.topo) if inside_epoch else None
    if run.topo.replica != 0:
        return
    r = run.replica
    model, velocity = r.model_state(), r.grouped(run.optimizer.velocities(r.net.named_parameters()))
    if not run.topo.is_main:
        return
    point = ResumePoint(train_config=run.cfg.to_dict(), model=model, velocity=velocity,
                        schedule=run.schedule.state_dict(), progress=dataclasses.asdict(run.progress),
                        best_val_top1=run.best_top1, classes=list(run.data.train_set.classes),
                        stats=dataclasses.asdict(run.data.stats) if run.data.stats else None,
                        epoch_train_counts=partial, replicas=run.topo.replicas)
    write_training(point, [run.out / "latest.pt"] + ([run.out / "best.pt"] if also_best else []), run.topo.towers)


def end_epoch(run: Run, counts: RunningCounts) -> None:
    """Collective: the epoch's training and validation errors, the schedule's step, the epoch's record,
    and latest.pt (best.pt too when validation improved)."""
    p = run.progress
    train = Counts.from_list(all_reduce_sum(counts.counts().as_list(), run.topo))
    val = validate(run, (1,))[1]
    run.schedule.end_epoch(p.epoch, val.top1_error)
    improved = val.top1_error < run.best_top1
    run.best_top1 = min(run.best_top1, val.top1_error)
    skipped = train.skipped + val.skipped
    run.log.write(kind="epoch", epoch=p.epoch, step=p.global_step, train_loss=train.loss,
                  train_top1_error=train.top1_error, train_top5_error=train.top5_error,
                  val_loss=val.loss, val_top1_error=val.top1_error, val_top5_error=val.top5_error,
                  lr=run.optimizer.base_lr, val_images=val.images, unreadable_skipped=skipped)
    run.say(f"epoch {p.epoch + 1} done: train top-1 error {train.top1_error:.2f}% | val top-1 error "
            f"{val.top1_error:.2f}%, top-5 error {val.top5_error:.2f}%, loss {val.loss:.4f} ({val.images} images)"
            + (f"; skipped {skipped} unreadable images" if skipped else ""))
    p.epoch, p.step_in_epoch = p.epoch + 1, 0
    write_unreadable(run, f"epoch {p.epoch}")
    save(run, counts, also_best=improved)


def validate(run: Run, crops: tuple[int, ...]) -> dict[int, Counts]:
    """Collective: every validation image scored once across all pairs (both towers of a pair run it),
    under each protocol of `crops` (1: centre patch, 10: ten patches) in one pass."""
    cfg, topo, data = run.cfg, run.topo, run.data
    idx = eval_indices(len(data.val_set), topo.replicas, topo.replica, cfg.data.val_images)
    spec = EvalSpec(crops=crops, batch_size=cfg.eval_batch_size, amp=cfg.amp, workers=cfg.data.workers,
                    pin=data.pin, decode_device=data.decode_device, skipped=data.unreadable)
    net = run.replica.net.eval()
    with out_of_memory_advice(f"validating {spec.batch_size} images x {max(crops)} patch(es) per forward",
                              "pass a smaller --eval-batch-size"):
        results = evaluate([net], data.val_set, idx, data.augment, spec)
    net.train()
    if not topo.holds_logits:
        for counts in results.values():
            counts.skipped = 0  # tower 0 of the pair counts them
    totals = all_reduce_sum([v for c in crops for v in results[c].as_list()], topo)
    width = len(totals) // len(crops)
    return {c: Counts.from_list(totals[i * width:(i + 1) * width]) for i, c in enumerate(crops)}


def write_unreadable(run: Run, what: str) -> None:
    """Collective: every rank's unreadable files merged into the run folder's skipped.txt (rank 0
    writes it and says how many and where)."""
    run.data.unreadable = gather_and_write(run.data.unreadable, run.out, what, run.topo.is_main, run.say)


def warn_about_milestones(run: Run) -> None:
    o, epochs = run.cfg.optim, run.cfg.epochs
    if o.schedule == "milestones" and not o.milestones:
        run.say(f"note: --milestones gave no epoch: the rate stays {o.lr:g} for the whole run")
    unreached = unreached_milestones(o, epochs)
    if unreached:
        run.say(f"warning: milestones {', '.join(map(str, unreached))} lie at or past the run's last epoch "
                f"(--epochs {epochs}; milestone m divides the rate from 0-based epoch m): the rate is not divided "
                f"there; " + ("more --epochs reach them" if run.resumed_from else
                              "pass --milestones within the run, or more --epochs"))
