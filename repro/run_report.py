"""The end of a training run: the error table (paper protocol) beside the paper's, and the curves.

`run` is repro.train.Run: its config, folder, position and metrics log."""

from __future__ import annotations

import json

from repro.config import variant_name
from repro.evaluate import Counts
from repro.report import (EvalRow, plot_learning_curves, read_metrics, results_markdown, same_run_labels,
                          write_results)


ILSVRC2012_VAL = (1000, 50_000)  # classes and images of the set behind the paper's Table 2 (section 6)


def imagenet_year(dataset: str, classes: int, images: int) -> str | None:
    """Only the whole ILSVRC-2012 validation set sits in the paper's Table 2: another dataset, another
    class list or a subset of the images is not comparable with the paper."""
    return "2012" if dataset == "imagenet" and (classes, images) == ILSVRC2012_VAL else None


def run_label(run) -> str:
    """The table's run column: the run folder and the step scored."""
    return f"{run.cfg.out} (step {run.progress.global_step})"


def closing_table_written(run) -> bool:
    """Whether results.json already holds this step's closing table under these protocols (a resume
    with nothing left to train need not score it again)."""
    try:
        rows = json.loads((run.out / "results.json").read_text())["rows"]
        return (all(same_run_labels(r["run"], run_label(run)) for r in rows)
                and sorted(r["crops"] for r in rows) == sorted(run.cfg.final_crops))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def record_closing_evaluation(run, results: dict[int, Counts]) -> None:
    """The closing evaluation in metrics.jsonl ("final" records, one per protocol), so that the learning
    curves show it: in a run shorter than an epoch (the CPU budget) it is the only validation made."""
    p = run.progress
    for crops, n in sorted(results.items()):
        run.log.write(kind="final", step=p.global_step, epoch=p.epoch,
                      epochs_trained=p.global_step / run.steps_per_epoch, crops=crops, images=n.images,
                      classes=run.cfg.model.num_classes, val_loss=n.loss, val_top1_error=n.top1_error,
                      val_top5_error=n.top5_error)


def curves_title(run) -> str:
    """What the run was, above its curves: network, data, and how much training the curves cover."""
    cfg, p = run.cfg, run.progress
    seen = p.global_step * cfg.batch_size * run.topo.replicas
    return (f"{variant_name(cfg.model)} network on {cfg.data.dataset}: {p.global_step} steps of {cfg.batch_size} "
            f"images x {run.topo.replicas} pair(s) = {seen:,} images "
            f"({p.global_step / run.steps_per_epoch:.2f} epochs)")


def write_report(run, results: dict[int, Counts]) -> None:
    """Rank 0: the closing table (results.md, .json, .csv), its records in metrics.jsonl, the curves."""
    cfg = run.cfg
    split = "test" if cfg.data.dataset == "fashion-mnist" else "val"
    label = run_label(run)
    variant = variant_name(cfg.model)
    net = "1 CNN" if variant == "paper" else f"1 CNN ({variant})"  # an ablation's row says which
    rows = [EvalRow(label=f"{net}, {'centre patch' if c == 1 else '10 patches'}", dataset=cfg.data.dataset,
                    split=split, images=n.images, crops=c, models=1, run=label, top1_error=n.top1_error,
                    top5_error=n.top5_error, loss=n.loss, classes=cfg.model.num_classes)
            for c, n in results.items()]
    year = imagenet_year(cfg.data.dataset, cfg.model.num_classes, next(iter(results.values())).images)
    write_results(rows, run.out, imagenet_year=year)
    record_closing_evaluation(run, results)
    metrics = read_metrics(run.out / "metrics.jsonl") if (run.out / "metrics.jsonl").exists() else []
    if metrics:
        plot_learning_curves(metrics, run.out / "learning_curves.png", title=curves_title(run))
    print(results_markdown(rows, year), flush=True)
    print(f"written: {run.out}/results.md, results.json, results.csv"
          + (", learning_curves.png" if metrics else ""), flush=True)
