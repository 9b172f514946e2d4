"""The paper's result tables, this project's result files, learning curves and Figures 3 and 4.

Usage (from an evaluation script):
    rows = [EvalRow("this run, 10 patches", "imagenet", "val", 50000, 10, 1, "run-01/ckpt-90", 40.9, 18.5)]
    write_results(rows, "docs/results", imagenet_year="2012")

Our numbers share a table with the paper's only when they were measured on the same ILSVRC year; on any
other data set (e.g. Fashion-MNIST) they are kept in a table of their own and marked as not comparable.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from repro.atomic import atomic_write
from repro.metrics import read_metrics  # noqa: F401  (report's readers import it from here too)

# ---------------------------------------------------------------------------------------------------
# The paper's numbers (its Tables 1 and 2, section 6; docs/paper.md). A column is (metric, split); None is the paper's "-".


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    dataset: str
    columns: tuple[tuple[str, str], ...]  # e.g. ("top-1", "val"); every value is an error in %
    rows: tuple[tuple[str, tuple[float | None, ...]], ...]  # (model, one value per column)
    footnote: str

    def to_dict(self) -> dict:
        heads = [f"{m} {s}" for m, s in self.columns]
        rows = [{"model": model, **dict(zip(heads, values))} for model, values in self.rows]
        return {"name": self.name, "title": self.title, "dataset": self.dataset, "columns": heads,
                "rows": rows, "footnote": self.footnote}


TABLE1 = PaperTable(
    "Table 1", "ILSVRC-2010 test set", "ILSVRC-2010",
    (("top-1", "test"), ("top-5", "test")),
    (("Sparse coding", (47.1, 28.2)),
     ("SIFT + FVs", (45.7, 25.7)),
     ("CNN", (37.5, 17.0)),
     ("CNN, one patch (no ten-patch averaging)", (39.0, 18.3))),
    "The one-patch CNN row is the paper's footnote to Table 1, not a row of the table itself.",
)

TABLE2 = PaperTable(
    "Table 2", "ILSVRC-2012 validation and test sets", "ILSVRC-2012",
    (("top-1", "val"), ("top-5", "val"), ("top-5", "test")),
    (("SIFT + FVs", (None, None, 26.2)),
     ("1 CNN", (40.7, 18.2, None)),
     ("5 CNNs", (38.1, 16.4, 16.4)),
     ("1 CNN*", (39.0, 16.6, None)),
     ("7 CNNs*", (36.7, 15.4, 15.3))),
    "\"5 CNNs\" averages the predictions of five similar networks. \"1 CNN*\" is one network with a sixth "
    "convolutional layer after the last pooling layer, pretrained on the whole ImageNet Fall 2011 release "
    "(about 15M images, 22K categories) and fine-tuned on ILSVRC-2012; \"7 CNNs*\" averages the five plain "
    "networks of \"5 CNNs\" with two such pretrained networks (paper section 6.1).",
)

PAPER_TABLES = {"2010": TABLE1, "2012": TABLE2}

NOT_COMPARABLE = ("These numbers were measured on {datasets}, not on the whole ILSVRC-2012 validation set "
                  "(1000 classes, 50,000 images): they are NOT comparable with the paper's ImageNet error "
                  "rates, which are shown separately below for reference only.")


@dataclass
class EvalRow:
    label: str  # e.g. "this run, 10 patches"
    dataset: str  # e.g. "fashion-mnist", "imagenet"
    split: str  # "val" or "test"
    images: int  # images scored, each exactly once
    crops: int  # views averaged per image: 1 (centre) or 10 (paper section 4.1)
    models: int  # ensemble size
    run: str  # training run(s) / checkpoint(s) the predictions came from
    top1_error: float  # %
    top5_error: float  # %
    loss: float | None = None
    classes: int | None = None  # of the network; at 5 or fewer, top-5 error is 0 by construction

    def __post_init__(self):
        if self.images < 0 or self.crops < 1 or self.models < 1:
            raise ValueError(f"bad counts in {self.label!r}: images={self.images}, crops={self.crops}, "
                             f"models={self.models}")
        for name in ("top1_error", "top5_error"):
            if not 0.0 <= getattr(self, name) <= 100.0:
                raise ValueError(f"{name}={getattr(self, name)} in {self.label!r} is not a percentage")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Markdown, JSON, CSV


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"  # a NaN loss (a diverged network) prints as nan, not hidden
    return str(value).replace("|", "\\|")  # a '|' in a run name would split the cell


def _paper(value: float | None) -> str | None:
    return None if value is None else f"{value:.1f}"  # the paper's own precision


def _table(header: list[str], lines: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_fmt(v) for v in line) + " |" for line in lines]


_OURS = ["dataset", "split", "images", "crops", "models", "run"]


def _merged_table(table: PaperTable, rows: list[EvalRow]) -> list[str]:
    """Paper rows then ours, in the paper's columns plus any (metric, split) only our rows have."""
    cols = list(table.columns)
    for r in rows:
        cols += [c for c in (("top-1", r.split), ("top-5", r.split)) if c not in cols]
    lines = []
    for model, values in table.rows:
        by_col = dict(zip(table.columns, values))
        lines.append([model, "paper", *(_paper(by_col.get(c)) for c in cols), table.dataset] + [None] * 5)
    for r in rows:
        ours = {("top-1", r.split): r.top1_error, ("top-5", r.split): r.top5_error}
        lines.append([r.label, "this evaluation", *(ours.get(c) for c in cols),
                      *(getattr(r, f) for f in _OURS)])
    header = ["model", "source", *(f"{m} {s}" for m, s in cols), *_OURS]
    return _table(header, lines)


def _paper_only(table: PaperTable) -> list[str]:
    header = ["model", "source", *(f"{m} {s}" for m, s in table.columns)]
    return _table(header, [[model, "paper", *map(_paper, values)] for model, values in table.rows])


def _check_year(rows: list[EvalRow], imagenet_year) -> str | None:
    if imagenet_year is None:
        return None
    year = str(imagenet_year)
    if year not in PAPER_TABLES:
        raise ValueError(f"imagenet_year must be None, '2010' or '2012', got {imagenet_year!r}")
    # A non-ImageNet row in the paper's table would claim a comparison that does not exist.
    bad = [r.dataset for r in rows if not any(s in r.dataset.lower() for s in ("imagenet", "ilsvrc"))]
    if bad:
        raise ValueError(f"imagenet_year={year} but rows are on {sorted(set(bad))}; pass imagenet_year=None")
    return year


def _trivial_top5_note(rows: list[EvalRow]) -> list[str]:
    few = sorted({r.classes for r in rows if r.classes is not None and r.classes <= 5})
    if not few:
        return []
    return [f"Top-5 error is 0 by construction here: the network has {' or '.join(map(str, few))} classes, "
            "so every label is among its five most probable.", ""]


def results_markdown(rows: list[EvalRow], imagenet_year: str | None) -> str:
    """Our rows beside the paper's table of the same ILSVRC year, or apart from both paper tables."""
    year = _check_year(rows, imagenet_year)
    out = ["# Results", "", "Errors in %. Paper: Krizhevsky, Sutskever, Hinton, NIPS 2012.", "",
           *_trivial_top5_note(rows)]
    if year is not None:
        t = PAPER_TABLES[year]
        out += [f"## {t.name} ({t.title}) with this evaluation", "", *_merged_table(t, rows), "",
                t.footnote, ""]
        return "\n".join(out)
    datasets = ", ".join(sorted({r.dataset for r in rows})) or "no data set"
    header = ["model", "source", *_OURS, "top-1 error", "top-5 error", "loss"]
    lines = [[r.label, "this evaluation", *(getattr(r, f) for f in _OURS), r.top1_error, r.top5_error,
              r.loss] for r in rows]
    out += ["## This evaluation", "", *_table(header, lines), "", NOT_COMPARABLE.format(datasets=datasets),
            "", "## The paper's results (ImageNet, not comparable with the table above)", ""]
    for t in (TABLE1, TABLE2):
        out += [f"### {t.name}: {t.title}", "", *_paper_only(t), "", t.footnote, ""]
    return "\n".join(out)


def same_run_labels(a: str, b: str) -> bool:
    """Whether two tables' run labels ("PATH (step N)", comma-separated for an ensemble) name the same
    checkpoints at the same steps, however the paths were written (relative, absolute, "./", "a/")."""
    def key(label: str) -> list[tuple[str, str]]:
        members = []
        for part in label.split("), "):
            path, _, step = part.removesuffix(")").rpartition(" (step ")
            members.append((os.path.realpath(path), step))
        return members

    return key(a) == key(b)


def write_results(rows: list[EvalRow], out_dir, imagenet_year: str | None = None,
                  stem: str = "results") -> dict[str, Path]:
    """Write <stem>.md, <stem>.json and <stem>.csv into out_dir; returns {"md"|"json"|"csv": path}."""
    out_dir = Path(out_dir)
    md = results_markdown(rows, imagenet_year)  # validates before anything is written
    doc = {"imagenet_year": None if imagenet_year is None else str(imagenet_year),
           "comparable_with_paper": imagenet_year is not None,
           "rows": [r.to_dict() for r in rows],
           "paper": {"table1": TABLE1.to_dict(), "table2": TABLE2.to_dict()}}
    names = [f.name for f in fields(EvalRow)]

    def write_csv(f):
        w = csv.DictWriter(f, fieldnames=names, lineterminator="\n")
        w.writeheader()
        w.writerows(r.to_dict() for r in rows)

    return {"md": atomic_write(out_dir / f"{stem}.md", lambda f: f.write(md + "\n"), binary=False),
            "json": atomic_write(out_dir / f"{stem}.json", lambda f: f.write(json.dumps(doc, indent=2)), binary=False),
            "csv": atomic_write(out_dir / f"{stem}.csv", write_csv, binary=False)}


# ---------------------------------------------------------------------------------------------------
# Metrics log and learning curves


def _series(records: list[dict], x: str, y: str) -> tuple[list, list]:
    pairs = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the window - 1 before it (fewer at the start): the trend under the noise
    of single steps' losses."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _closing_evaluations(metrics: list[dict]) -> list[dict]:
    """The run's closing evaluations ("final" records, one per protocol), the last of each (step, crops):
    a resume that scores the same step again replaces its points rather than doubling them."""
    latest = {(r.get("step"), r.get("crops")): r for r in metrics if r.get("kind") == "final"}
    return sorted(latest.values(), key=lambda r: (r.get("step", 0), r.get("crops", 0)))


def _error_panel(ax, epochs: list[dict], finals: list[dict], x: str, which: str, span: float) -> None:
    """top-`which` error: per epoch (train and val), and the closing evaluation's points, each labelled
    with its value (a run shorter than an epoch has only those)."""
    for key, label in ((f"train_top{which}_error", "train (epoch)"), (f"val_top{which}_error", "val (epoch)")):
        xs, ys = _series(epochs, "epochs_trained" if x == "epochs trained" else "step", key)
        if xs:
            ax.plot(xs, ys, marker="o", label=label)
    for i, (rec, marker) in enumerate(zip(finals, "Ds^v")):
        value = rec.get(f"val_top{which}_error")
        if value is None:
            continue
        at = rec.get("epochs_trained") if x == "epochs trained" else rec.get("step")
        patches = "centre patch" if rec.get("crops") == 1 else f"{rec.get('crops')} patches"
        ax.plot([at], [value], marker=marker, linestyle="", markersize=8,
                label=f"closing val, {patches} ({rec.get('images')} images)")
        ax.annotate(f"{value:.1f}%", (at, value), textcoords="offset points",
                    xytext=(-40 if i % 2 else 6, 6 if i % 2 else -14))  # two protocols' labels apart
    classes = next((r["classes"] for r in finals if r.get("classes")), None)
    if classes and int(which) < classes:  # guessing: the error a network that learnt nothing makes
        ax.axhline(100.0 * (1 - int(which) / classes), color="0.6", linestyle="--", linewidth=0.8,
                   label=f"chance ({classes} classes)")
    ax.set_title(f"top-{which} error %")
    ax.set_xlabel(x)
    ax.set_ylim(0, 100)
    if span:
        ax.set_xlim(0, span * 1.05)  # the whole run, not just the points: a budget run's one evaluation at its end
    if ax.get_lines():
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax.transAxes)


def _loss_panel(ax, steps: list[dict], epochs: list[dict], finals: list[dict]) -> None:
    xs, ys = _series(steps, "step", "loss")
    if xs:
        ax.plot(xs, ys, color="0.75", linewidth=0.6, label="train (step)")
        window = max(2, min(50, len(ys) // 10))
        ax.plot(xs, _running_mean(ys, window), color="C0", linewidth=1.5, label=f"train, mean of {window} steps")
    for key, label in (("train_loss", "train (epoch)"), ("val_loss", "val (epoch)")):
        ex, ey = _series(epochs, "step", key)
        if ex:
            ax.plot(ex, ey, marker="o", label=label)
    fx, fy = _series([r for r in finals if r.get("crops") == min(f.get("crops", 1) for f in finals)], "step",
                     "val_loss")
    if fx:
        ax.plot(fx, fy, marker="D", linestyle="", markersize=8, color="C3", label="closing val")
    ax.set_title("loss")
    ax.set_xlabel("step")
    if ax.get_lines():
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def _rate_panel(ax, steps: list[dict], speeds: list[dict]) -> None:
    """The learning rate of every step (log scale: the paper divides it by 10, section 5) and, on a
    second axis, the training speed the progress lines reported."""
    xs, ys = _series(steps, "step", "lr")
    if xs:
        ax.plot(xs, ys, color="C0", label="learning rate")
        if any(y > 0 for y in ys):
            ax.set_yscale("log")
    ax.set_title("learning rate and speed")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    sx, sy = _series(speeds, "step", "img_per_s")
    if sx:
        twin = ax.twinx()
        twin.plot(sx, sy, color="C1", marker=".", linewidth=0.8, label="images/s")
        twin.set_ylabel("images/s (training)")
        twin.set_ylim(bottom=0)
        twin.legend(loc="lower right", fontsize="small")
    if xs:
        ax.legend(loc="upper right", fontsize="small")
    elif not sx:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def draw_learning_curves(metrics: list[dict], title: str | None = None):
    """A matplotlib figure of four panels from read_metrics() records: top-1 and top-5 error (per epoch,
    and the closing evaluation's points), the loss (every step, its running mean, epochs' and the closing
    validation's), the learning rate and the training speed. The error panels' axis is epochs trained
    where an epoch ended, else steps (a budget run shorter than an epoch). The caller closes it."""
    epochs = [dict(m, epochs_trained=m["epoch"] + 1) for m in metrics
              if m.get("kind") == "epoch" and m.get("epoch") is not None]
    steps = [m for m in metrics if m.get("kind") == "step"]
    speeds = [m for m in metrics if m.get("kind") == "speed"]
    finals = _closing_evaluations(metrics)
    if not epochs and not steps and not finals:
        raise ValueError("no 'epoch', 'step' or 'final' records to plot")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((a1, a5), (al, ar)) = plt.subplots(2, 2, figsize=(11, 8))
    x = "epochs trained" if epochs else "step"
    key = "epochs_trained" if epochs else "step"
    span = max((r[key] for r in epochs + steps + finals if r.get(key) is not None), default=0)
    _error_panel(a1, epochs, finals, x, "1", span)
    _error_panel(a5, epochs, finals, x, "5", span)
    _loss_panel(al, steps, epochs, finals)
    _rate_panel(ar, steps or epochs, speeds)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_learning_curves(metrics: list[dict], out_png, title: str | None = None) -> Path:
    """draw_learning_curves() written to `out_png` (atomically)."""
    import matplotlib.pyplot as plt

    fig = draw_learning_curves(metrics, title)
    try:
        return atomic_write(Path(out_png), lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Figure 3: conv1 kernels, one block per tower

BORDER = 1  # px between kernels and around each tower block
TOWER_GAP = 8  # px between the tower blocks
GRID_COLS = 8  # kernels per row; 48 per tower -> 6 x 8 as in the paper's figure
BACKGROUND = 255


def conv1_grid_layout(out_channels: int, kernel: int, towers: int = 2, scale: int = 4) -> dict:
    """Geometry of conv1_kernel_array: cell size, rows/cols per tower, block height, image shape."""
    per_tower = out_channels // towers
    cols = min(GRID_COLS, per_tower)
    rows = -(-per_tower // cols)
    cell = kernel * scale
    block_h, width = rows * (cell + BORDER) + BORDER, cols * (cell + BORDER) + BORDER
    return {"cell": cell, "rows": rows, "cols": cols, "block_h": block_h,
            "shape": (towers * block_h + (towers - 1) * TOWER_GAP, width, 3)}


def conv1_kernel_array(weight: torch.Tensor, towers: int = 2, scale: int = 4) -> np.ndarray:
    """(H, W, 3) uint8 grid; kernel t*C/towers + j sits in tower t's block, row j // cols, column j % cols."""
    if weight.ndim != 4 or weight.shape[1] != 3 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"conv1 weight must be (out, 3, k, k), e.g. (96, 3, 11, 11); got {tuple(weight.shape)}")
    if towers < 1 or weight.shape[0] % towers or scale < 1:
        raise ValueError(f"{weight.shape[0]} kernels cannot be split into {towers} towers (scale={scale})")
    w = weight.detach().to("cpu", torch.float64).numpy()
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    span = w.max(axis=(1, 2, 3), keepdims=True) - lo
    # Each kernel on its own scale, as in the paper's figure; a constant kernel shows as mid-grey.
    norm = np.where(span > 0, (w - lo) / np.where(span > 0, span, 1.0), 0.5)
    pix = np.rint(norm * 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (C, k, k, 3)
    pix = pix.repeat(scale, axis=1).repeat(scale, axis=2)  # nearest-neighbour upscaling
    g = conv1_grid_layout(w.shape[0], w.shape[2], towers, scale)
    out = np.full(g["shape"], BACKGROUND, np.uint8)
    per_tower, cell = w.shape[0] // towers, g["cell"]
    for i in range(w.shape[0]):
        t, j = divmod(i, per_tower)
        y = t * (g["block_h"] + TOWER_GAP) + BORDER + (j // g["cols"]) * (cell + BORDER)
        x = BORDER + (j % g["cols"]) * (cell + BORDER)
        out[y:y + cell, x:x + cell] = pix[i]
    return out


def conv1_kernel_grid(weight: torch.Tensor, out_png, towers: int = 2, scale: int = 4) -> Path:
    """The paper's Figure 3 as a PNG: tower 0's kernels above tower 1's."""
    img = Image.fromarray(conv1_kernel_array(weight, towers, scale), "RGB")
    return atomic_write(Path(out_png), lambda f: img.save(f, format="PNG"), binary=True)


# ---------------------------------------------------------------------------------------------------
# Figure 4: nearest neighbours by Euclidean distance of fc7 codes


def nearest_neighbours(query_features: torch.Tensor, bank_features: torch.Tensor, k: int,
                       exclude_self: bool = False, chunk: int = 1024,
                       self_index: torch.Tensor | None = None) -> torch.Tensor:
    """(Q, k) bank indices, nearest first; ties go to the lower index. `exclude_self` skips bank
    entry i for query i (the bank is the query set); `self_index[i]` names query i's own bank entry
    when the queries are some of the bank's images."""
    q, b = torch.as_tensor(query_features), torch.as_tensor(bank_features)
    if q.ndim != 2 or b.ndim != 2 or q.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (Q, D) and (N, D); got {tuple(q.shape)} and {tuple(b.shape)}")
    if exclude_self and q.shape[0] != b.shape[0]:
        raise ValueError("exclude_self needs the bank to be the query set (same length)")
    if exclude_self:
        self_index = torch.arange(q.shape[0])
    if self_index is not None and (len(self_index) != q.shape[0] or int(self_index.max()) >= b.shape[0]):
        raise ValueError(f"self_index must give one bank index (< {b.shape[0]}) per query ({q.shape[0]})")
    available = b.shape[0] - int(self_index is not None)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} but the bank offers {available} neighbours per query")
    q, b = q.to(torch.float64), b.to(device=q.device, dtype=torch.float64)
    out = []
    for s in range(0, q.shape[0], chunk):  # bounds the (chunk, N) distance matrix
        # Exact pairwise differences, not the |a|^2 + |b|^2 - 2ab shortcut whose rounding reorders ties.
        d = torch.cdist(q[s:s + chunk], b, compute_mode="donot_use_mm_for_euclid_dist")
        if self_index is not None:
            rows = torch.arange(d.shape[0], device=d.device)
            d[rows, self_index[s:s + chunk].to(d.device)] = math.inf
        out.append(torch.sort(d, dim=1, stable=True).indices[:, :k])
    return torch.cat(out).cpu()


def _as_rgb(images, what: str) -> np.ndarray:
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[3] not in (1, 3):
        raise ValueError(f"{what} must be uint8 (N, H, W, 3) or (N, H, W, 1); got {a.dtype} {a.shape}")
    return a.repeat(3, axis=3) if a.shape[3] == 1 else a


def nearest_neighbours_figure(query_images, query_features, bank_images, bank_features, out_png,
                              k: int = 6, exclude_self: bool = False, gap: int = 8,
                              border: int = 2, self_index: torch.Tensor | None = None) -> tuple[Path, torch.Tensor]:
    """The paper's Figure 4: one row per query, the query then its k nearest bank images."""
    qi, bi = _as_rgb(query_images, "query_images"), _as_rgb(bank_images, "bank_images")
    if len(qi) != len(query_features) or len(bi) != len(bank_features):
        raise ValueError(f"{len(qi)} query images for {len(query_features)} features, "
                         f"{len(bi)} bank images for {len(bank_features)} features")
    idx = nearest_neighbours(query_features, bank_features, k, exclude_self, self_index=self_index)
    ch, cw = max(qi.shape[1], bi.shape[1]), max(qi.shape[2], bi.shape[2])
    width = (k + 1) * (cw + border) + border + gap
    canvas = np.full((len(qi) * (ch + border) + border, width, 3), BACKGROUND, np.uint8)
    for r in range(len(qi)):
        y = border + r * (ch + border)
        for c, img in enumerate([qi[r], *(bi[j] for j in idx[r].tolist())]):
            x = border + c * (cw + border) + (gap if c else 0)  # the gap sets the query apart
            canvas[y:y + img.shape[0], x:x + img.shape[1]] = img
    image = Image.fromarray(canvas, "RGB")
    return atomic_write(Path(out_png), lambda f: image.save(f, format="PNG"), binary=True), idx
