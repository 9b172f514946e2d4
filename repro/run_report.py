"""The end of a training run: the error table (paper protocol) beside the paper's, and the curves."""

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


def run_label(trainer) -> str:
    """The table's run column: the run folder and the step scored."""
    return f"{trainer.cfg.out} (step {trainer.progress.global_step})"


def closing_table_written(trainer) -> bool:
    """Whether results.json already holds this step's closing table under these protocols (a resume
    with nothing left to train need not score it again)."""
    try:
        rows = json.loads((trainer.out / "results.json").read_text())["rows"]
        return (all(same_run_labels(r["run"], run_label(trainer)) for r in rows)
                and sorted(r["crops"] for r in rows) == sorted(trainer.cfg.final_crops))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def record_closing_evaluation(trainer, results: dict[int, Counts]) -> None:
    """The closing evaluation in metrics.jsonl ("final" records, one per protocol), so that the learning
    curves show it: in a run shorter than an epoch (the CPU budget) it is the only validation made."""
    p = trainer.progress
    for crops, n in sorted(results.items()):
        trainer.log.write(kind="final", step=p.global_step, epoch=p.epoch,
                          epochs_trained=p.global_step / trainer.steps_per_epoch, crops=crops, images=n.images,
                          classes=trainer.cfg.model.num_classes, val_loss=n.loss, val_top1_error=n.top1_error, val_top5_error=n.top5_error)


def curves_title(trainer) -> str:
    """What the run was, above its curves: network, data, and how much training the curves cover."""
    cfg, p = trainer.cfg, trainer.progress
    seen = p.global_step * cfg.batch_size * trainer.topo.replicas
    return (f"{variant_name(cfg.model)} network on {cfg.data.dataset}: {p.global_step} steps of {cfg.batch_size} "
            f"images x {trainer.topo.replicas} pair(s) = {seen:,} images "
            f"({p.global_step / trainer.steps_per_epoch:.2f} epochs)")


def final_report(trainer) -> dict[int, Counts]:
    cfg, topo = trainer.cfg, trainer.topo
    if not cfg.final_crops:
        trainer.say("no closing table: --final-crops named no protocol (1 and/or 10)")
        return {}
    results = trainer.validate(cfg.final_crops)
    if not topo.is_main or not results:
        return results
    split = "test" if cfg.data.dataset == "fashion-mnist" else "val"
    run = run_label(trainer)
    variant = variant_name(cfg.model)
    net = "1 CNN" if variant == "paper" else f"1 CNN ({variant})"  # an ablation's row says which
    rows = [EvalRow(label=f"{net}, {'centre patch' if c == 1 else '10 patches'}", dataset=cfg.data.dataset,
                    split=split, images=n.images, crops=c, models=1, run=run, top1_error=n.top1_error,
                    top5_error=n.top5_error, loss=n.loss, classes=cfg.model.num_classes)
            for c, n in results.items()]
    year = imagenet_year(cfg.data.dataset, cfg.model.num_classes, next(iter(results.values())).images)
    write_results(rows, trainer.out, imagenet_year=year)
    record_closing_evaluation(trainer, results)
    metrics = read_metrics(trainer.out / "metrics.jsonl") if (trainer.out / "metrics.jsonl").exists() else []
    if metrics:
        plot_learning_curves(metrics, trainer.out / "learning_curves.png", title=curves_title(trainer))
    print(results_markdown(rows, year), flush=True)
    print(f"written: {trainer.out}/results.md, results.json, results.csv"
          + (", learning_curves.png" if metrics else ""), flush=True)
    return results
