"""scripts/evaluate.py's work: checkpoints in, the paper's error table and figures out."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from repro.checkpoint import network, read
from repro.cli import device_from_flag, make_out_dir, out_of_memory_advice
from repro.config import TrainConfig, variant_name
from repro.data.augment import Augment
from repro.data.datasets import open_eval_split
from repro.data.loader import eval_indices, evenly_spaced, iterate
from repro.data.skipped import SKIPPED_FILE, SkippedFiles
from repro.evaluate import EvalSpec, evaluate
from repro.host_memory import keep_freed_memory
from repro.model import lrn_cpu, winograd
from repro.model.grouped import AlexNet
from repro.model.two_tower import TwoTowerAlexNet
from repro.report import (
    EvalRow,
    conv1_kernel_grid,
    nearest_neighbours_figure,
    plot_learning_curves,
    read_metrics,
    results_markdown,
    same_run_labels,
    write_results,
)
from repro.preprocess import checkpoint_augment
from repro.run_report import imagenet_year


@dataclass
class EvalOptions:
    checkpoints: list[str]
    dataset: str | None = None  # default: what the first checkpoint was trained on
    data: str | None = None
    devkit: str | None = None
    val_solution: str | None = None
    val_split: str | None = None  # --dataset folder: the held-out folder (default: val/, else test/)
    crops: tuple[int, ...] = (1, 10)
    batch_size: int = 128
    max_images: int | None = None  # an evenly spaced subset (quick looks); None: every image
    form: str = "grouped"  # "grouped" or "towers" (TwoTowerAlexNet on cuda:0/cuda:1, or one device)
    device: str = "auto"
    amp: str = "none"
    workers: int = 4
    out: str | None = None
    figures: bool = True
    neighbours: int = 5  # Figure 4 queries (0: none)
    neighbour_bank: int = 2000  # evaluated images searched for neighbours


@dataclass
class Member:
    """One network of the (ensemble) evaluation, with its training run's preprocessing."""

    path: str
    train: TrainConfig
    model: torch.nn.Module
    grouped: AlexNet
    classes: list[str]
    augment: Augment = field(repr=False)
    file: str = ""  # the checkpoint file read (a run directory's latest.pt)
    step: int | None = None  # the training step it was saved at


def run_dir(checkpoint: str) -> Path:
    """The training run a checkpoint belongs to: the folder itself, or the file's folder."""
    path = Path(checkpoint)
    return path if path.is_dir() else path.parent


def default_out(checkpoints: list[str]) -> Path:
    """<run>/evaluation for one network; an ensemble's own folder beside it, so that it does not
    replace the first member's single-network evaluation."""
    n = len(checkpoints)
    return run_dir(checkpoints[0]) / ("evaluation" if n == 1 else f"evaluation-{n}-cnns")


def _say_if_replacing(previous: Path, run: str) -> None:
    """A note before the work, when the folder holds the evaluation of other checkpoints (or steps)."""
    try:
        before = json.loads(previous.read_text())["rows"][0]["run"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return  # none there (or unreadable): nothing worth keeping is replaced
    if not same_run_labels(before, run):
        print(f"note: replacing the evaluation in {previous.parent} of {before} (--out keeps both)", flush=True)


def load_member(path: str, opts: EvalOptions, device: torch.device) -> Member:
    ckpt = read(path)
    if not ckpt.get("train_config"):
        raise ValueError(f"{path} holds weights only; evaluation needs a training checkpoint (its classes "
                         f"and mean image). Use repro.load_checkpoint for the weights alone.")
    train = TrainConfig.from_dict(ckpt["train_config"])
    grouped = network(ckpt, path)
    if opts.form == "towers":
        second = torch.device("cuda", 1) if device.type == "cuda" and torch.cuda.device_count() > 1 else device
        model = TwoTowerAlexNet.from_grouped(grouped, devices=(device, second)).eval()
    else:
        model = grouped.to(device)
    file = str(Path(path) / "latest.pt") if Path(path).is_dir() else str(path)
    step = (ckpt.get("progress") or {}).get("global_step")
    return Member(path, train, model, grouped, list(ckpt["classes"]), checkpoint_augment(ckpt, device), file, step)


def _check_ensemble(members: list[Member]) -> None:
    first = members[0]
    for m in members[1:]:
        if m.classes != first.classes:
            raise ValueError(f"{m.path} was trained on other classes than {first.path}: they cannot be averaged")
        if (m.train.data.base_size, m.train.data.crop_size) != (first.train.data.base_size, first.train.data.crop_size):
            raise ValueError(f"{m.path} uses other image sizes than {first.path}")
        a, b = m.augment, first.augment
        if torch.equal(a.mean, b.mean) and torch.equal(a.pca_basis, b.pca_basis):
            m.augment = b  # same training set: preprocess each batch once for both networks


def _split(opts: EvalOptions, first: Member):
    data = first.train.data
    over = {k: v for k, v in dict(dataset=opts.dataset, root=opts.data, devkit=opts.devkit,
                                  val_solution=opts.val_solution, val_split=opts.val_split).items() if v is not None}
    if opts.dataset and opts.dataset != data.dataset and "root" not in over:
        over["root"] = None  # another dataset: the training run's folder does not apply
    return open_eval_split(dataclasses.replace(data, **over), first.classes), over.get("dataset", data.dataset)


def run_evaluation(opts: EvalOptions) -> list[EvalRow]:
    device = device_from_flag(opts.device)
    members = [load_member(p, opts, device) for p in opts.checkpoints]
    _check_ensemble(members)
    if device.type == "cpu":
        keep_freed_memory()
        # the LRN code the (first) run trained and closed with, so this evaluation computes what its did
        chosen = members[0].train.cpu_lrn
        lrn_cpu.set_kernel(chosen if chosen in lrn_cpu.KERNELS else "eager")
        conv = members[0].train.cpu_conv  # and the convolution
        winograd.set_kernel(conv if conv in winograd.KERNELS else "direct")
    split, dataset = _split(opts, members[0])
    origin = getattr(split, "origin", "") or getattr(split, "root", "")
    print(f"{dataset} {split.name.split('/')[-1]}: {len(split)} images" + (f" (from {origin})" if origin else ""),
          flush=True)
    run = ", ".join(f"{m.file} (step {m.step})" for m in members)
    out = make_out_dir(Path(opts.out) if opts.out else default_out(opts.checkpoints))
    _say_if_replacing(out / "evaluation.json", run)
    idx = eval_indices(len(split), 1, 0, opts.max_images)
    batch = max(1, min(opts.batch_size, len(idx)))  # a batch larger than the images only costs memory
    unreadable = SkippedFiles()
    (out / SKIPPED_FILE).unlink(missing_ok=True)  # a list from an earlier evaluation here would mislead
    spec = EvalSpec(crops=opts.crops, batch_size=batch, amp=opts.amp, workers=opts.workers,
                    pin=device.type == "cuda", decode_device=device, skipped=unreadable)
    start = time.perf_counter()
    with out_of_memory_advice(f"scoring {batch} images x {max(opts.crops)} patch(es) through {len(members)} "
                              f"network(s) per step", "pass a smaller --batch-size"):
        results = evaluate([m.model for m in members], split, idx, [m.augment for m in members], spec)
    seconds = time.perf_counter() - start
    line = unreadable.write(out, f"evaluation of {split.name}")
    if line:
        print(line, flush=True)
    scored = next(iter(results.values()))
    if scored.images == 0:
        raise ValueError(f"no image of {split.name} was scored ({len(idx)} selected, {scored.skipped} unreadable): "
                         f"check --data and --max-images")
    n = len(members)
    rows = []
    variants = sorted({variant_name(m.grouped.config) for m in members} - {"paper"})
    nets = f"{n} CNN{'s' if n > 1 else ''}" + (f" ({', '.join(variants)})" if variants else "")
    for crops, counts in results.items():
        rows.append(EvalRow(label=f"{nets}, {'centre patch' if crops == 1 else '10 patches'}",
                            dataset=dataset, split=split.name.split("/")[-1], images=counts.images, crops=crops,
                            models=n, run=run, top1_error=counts.top1_error,
                            top5_error=counts.top5_error, loss=counts.loss, classes=len(members[0].classes)))
        print(f"{rows[-1].label}: top-1 error {counts.top1_error:.2f}%, top-5 error {counts.top5_error:.2f}% on "
              f"{counts.images} images ({counts.skipped} unreadable skipped)", flush=True)
    images = scored.images
    print(f"{images} images, {max(opts.crops)} patch(es) each through {n} network(s) in one pass: "
          f"{images / seconds:.1f} img/s ({images * max(opts.crops) * n / seconds:.1f} forwards/s)", flush=True)
    year = imagenet_year(dataset, len(members[0].classes), images)
    paths = write_results(rows, out, imagenet_year=year, stem="evaluation")
    print(results_markdown(rows, year), flush=True)
    if opts.figures:
        paths.update(figures(members[0], split, idx, opts, out))
    print("written: " + ", ".join(str(p) for p in paths.values()), flush=True)
    return rows


def figures(member: Member, split, idx: torch.Tensor, opts: EvalOptions, out: Path) -> dict[str, Path]:
    """The paper's Figure 3 (conv1 kernels by tower), Figure 4 (fc7 neighbours) and the run's curves."""
    paths = {"conv1": conv1_kernel_grid(member.grouped.conv1.weight.detach().cpu(), out / "conv1_kernels.png",
                                        towers=member.grouped.config.towers)}
    log = run_dir(member.path) / "metrics.jsonl"
    if log.exists():
        paths["curves"] = plot_learning_curves(read_metrics(log), out / "learning_curves.png")
    if opts.neighbours > 0:
        bank = idx[evenly_spaced(len(idx), min(opts.neighbour_bank, len(idx)))]
        images, feats, read_ok = [], [], []
        with torch.no_grad():
            index_lists = bank.split(opts.batch_size)
            for idx, batch in zip(index_lists, iterate(split, index_lists, opts.workers)):
                read_ok.append(idx if batch.kept is None else idx[batch.kept])  # unreadable images drop out
                if len(batch.images) == 0:
                    continue
                x = member.augment.eval_batch(batch.images.to(member.augment.device), 1)
                feats.append(member.model.fc7_activations(x).float().cpu())
                images.append(batch.images)
        if not feats:
            return paths
        images, feats, bank = torch.cat(images), torch.cat(feats), torch.cat(read_ok)
        q = evenly_spaced(len(feats), min(opts.neighbours, len(feats)))
        k = min(6, len(feats) - 1)
        if k >= 1:
            path, nn_idx = nearest_neighbours_figure(images[q], feats[q], images, feats, out / "fc7_neighbours.png",
                                                     k=k, self_index=q)
            paths["neighbours"] = path
            paths["neighbours_json"] = out / "fc7_neighbours.json"
            paths["neighbours_json"].write_text(json.dumps(
                {"queries": bank[q].tolist(), "neighbours": bank[nn_idx].tolist()}))
    return paths
