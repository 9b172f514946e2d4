"""Paper tables next to ours (or apart from them), result files, metrics log, and Figures 3 and 4."""

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from repro.report import (
    BORDER,
    TOWER_GAP,
    EvalRow,
    conv1_kernel_array,
    conv1_kernel_grid,
    nearest_neighbours,
    nearest_neighbours_figure,
    draw_learning_curves,
    plot_learning_curves,
    read_metrics,
    results_markdown,
    write_results,
)
from repro.run_report import imagenet_year

IMAGENET = [EvalRow("this run, 10 patches", "imagenet", "val", 50000, 10, 1, "run-01/epoch-90", 41.23, 18.76, 1.9),
            EvalRow("this run, centre crop", "imagenet", "val", 50000, 1, 1, "run-01/epoch-90", 43.5, 20.125)]
FASHION = [EvalRow("small net, 10 patches", "fashion-mnist", "test", 10000, 10, 2, "fm-a|fm-b", 8.57, 0.31, 0.25)]


def tables(md: str) -> list[list[dict]]:
    """Each Markdown table as a list of {header: cell} rows."""
    blocks, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]])
        elif cur:
            blocks.append([dict(zip(cur[0], cells)) for cells in cur[2:]])
            cur = []
    return blocks


def by_model(table: list[dict]) -> dict:
    return {r["model"]: r for r in table}


def test_2012_rows_share_table_2():
    md = results_markdown(IMAGENET, "2012")
    [table] = tables(md)
    rows = by_model(table)
    assert (rows["1 CNN"]["source"], rows["1 CNN"]["top-1 val"], rows["1 CNN"]["top-5 val"]) == ("paper", "40.7", "18.2")
    assert rows["7 CNNs*"]["top-5 test"] == "15.3" and rows["SIFT + FVs"]["top-1 val"] == "-"
    ours = rows["this run, 10 patches"]
    assert ours["source"] == "this evaluation"
    assert (ours["top-1 val"], ours["top-5 val"], ours["top-5 test"]) == ("41.23", "18.76", "-")
    assert (ours["dataset"], ours["split"], ours["images"], ours["crops"], ours["models"], ours["run"]) == \
        ("imagenet", "val", "50000", "10", "1", "run-01/epoch-90")
    assert rows["this run, centre crop"]["top-5 val"] in ("20.12", "20.13")  # 20.125 has no exact binary form
    assert "Fall 2011" in md
    # the starred ensemble is five plain networks and two pretrained ones, not seven six-layer networks
    assert '"7 CNNs*" averages the five plain networks of "5 CNNs" with two such pretrained networks' in md


def test_2010_rows_share_table_1_and_test_split_gets_its_columns():
    row = EvalRow("ours", "ILSVRC-2010", "test", 150000, 10, 1, "r", 38.0, 17.5)
    val = EvalRow("ours val", "ILSVRC-2010", "val", 50000, 1, 1, "r", 40.0, 19.0)
    rows = by_model(tables(results_markdown([row, val], "2010"))[0])
    assert (rows["CNN"]["top-1 test"], rows["CNN"]["top-5 test"]) == ("37.5", "17.0")
    assert rows["Sparse coding"]["top-1 test"] == "47.1"
    assert rows["CNN, one patch (no ten-patch averaging)"]["top-5 test"] == "18.3"
    assert (rows["ours"]["top-1 test"], rows["ours"]["top-5 test"], rows["ours"]["top-1 val"]) == ("38.00", "17.50", "-")
    assert (rows["ours val"]["top-1 val"], rows["CNN"]["top-1 val"]) == ("40.00", "-")


def test_other_dataset_is_kept_apart_and_marked_not_comparable():
    md = results_markdown(FASHION, None)
    assert "NOT comparable" in md and "fashion-mnist" in md
    ts = tables(md)
    assert len(ts) == 3
    for t in ts:  # no table mixes the two sources
        assert len({r["source"] for r in t}) == 1
    ours = ts[0][0]
    assert ours["source"] == "this evaluation"
    assert (ours["model"], ours["dataset"], ours["split"], ours["images"], ours["crops"], ours["models"],
            ours["run"], ours["top-1 error"], ours["top-5 error"]) == \
        ("small net, 10 patches", "fashion-mnist", "test", "10000", "10", "2", "fm-a|fm-b", "8.57", "0.31")
    assert md.index("NOT comparable") < md.index("| Sparse coding")
    assert by_model(ts[1])["CNN"]["top-1 test"] == "37.5"
    assert by_model(ts[2])["1 CNN"]["top-1 val"] == "40.7"


def test_only_the_whole_ilsvrc_2012_val_set_is_comparable():
    assert imagenet_year("imagenet", 1000, 50_000) == "2012"
    assert imagenet_year("imagenet", 1000, 5_000) is None  # a --max-images subset
    assert imagenet_year("imagenet", 100, 50_000) is None  # another class list
    assert imagenet_year("fashion-mnist", 1000, 50_000) is None


def test_a_nan_loss_is_printed_not_hidden():
    row = EvalRow("diverged", "fashion-mnist", "test", 10, 1, 1, "r", 90.0, 50.0, float("nan"))
    [table, *_] = tables(results_markdown([row], None))
    assert table[0]["loss"] == "nan" and table[0]["top-1 error"] == "90.00"


def test_top5_of_five_classes_or_fewer_is_marked_trivial():
    row = lambda k: EvalRow("toy", "folder", "val", 10, 1, 1, "r", 40.0, 0.0, classes=k)  # noqa: E731
    assert "by construction" in results_markdown([row(5)], None)
    assert "has 3 classes" in results_markdown([row(3)], None)
    assert "by construction" not in results_markdown([row(6), row(None)], None)


def test_year_checks():
    with pytest.raises(ValueError, match="imagenet_year=None"):
        results_markdown(FASHION, "2012")
    with pytest.raises(ValueError, match="2010"):
        results_markdown(IMAGENET, "2011")
    with pytest.raises(ValueError, match="percentage"):
        EvalRow("x", "imagenet", "val", 1, 1, 1, "r", 140.0, 1.0)


@pytest.mark.parametrize("rows,year", [(IMAGENET, "2012"), (FASHION, None)])
def test_write_results_round_trip(tmp_path, rows, year):
    paths = write_results(rows, tmp_path / "out", imagenet_year=year, stem="eval")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"eval.md", "eval.json", "eval.csv"}
    assert paths["md"].read_text().strip() == results_markdown(rows, year).strip()
    doc = json.loads(paths["json"].read_text())
    assert doc["comparable_with_paper"] is (year is not None)
    assert [EvalRow(**d) for d in doc["rows"]] == rows
    t2 = {r["model"]: r for r in doc["paper"]["table2"]["rows"]}
    assert t2["5 CNNs"] == {"model": "5 CNNs", "top-1 val": 38.1, "top-5 val": 16.4, "top-5 test": 16.4}
    assert t2["1 CNN"]["top-5 test"] is None
    with open(paths["csv"], newline="") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == list(rows[0].to_dict())
    for got, want in zip(back, rows, strict=True):
        assert (got["label"], got["run"], int(got["images"]), int(got["crops"]), int(got["models"])) == \
            (want.label, want.run, want.images, want.crops, want.models)
        assert (float(got["top1_error"]), float(got["top5_error"])) == (want.top1_error, want.top5_error)
        assert (float(got["loss"]) if got["loss"] else None) == want.loss


STEP = {"kind": "step", "step": 12, "epoch": 0, "loss": 2.3, "lr": 0.01, "img_per_s": 850.0}
EPOCH = {"kind": "epoch", "epoch": 0, "step": 468, "train_loss": 1.1, "train_top1_error": 40.0,
         "train_top5_error": 5.0, "val_loss": 0.9, "val_top1_error": 35.0, "val_top5_error": 3.0, "lr": 0.01}


def test_read_metrics_drops_a_truncated_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    full = json.dumps(EPOCH)
    path.write_text(json.dumps(STEP) + "\n\n" + full + "\n" + full[:25])
    assert read_metrics(path) == [STEP, EPOCH]
    path.write_bytes(path.read_bytes()[:-25] + '{"kind": "step", "x": "é'.encode()[:-1])  # cut inside a character
    assert read_metrics(path) == [STEP, EPOCH]
    path.write_text("")
    assert read_metrics(path) == []


def test_read_metrics_rejects_a_bad_middle_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(STEP) + "\n\n" + '{"kind": "st\n' + json.dumps(EPOCH) + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl: line 3"):
        read_metrics(path)


@pytest.mark.parametrize("epochs", [1, 4])
def test_learning_curves_png(tmp_path, epochs):
    log = [dict(STEP, step=s, loss=2.3 - 0.01 * s) for s in range(0, 40, 5)]
    for e in range(epochs):
        rec = dict(EPOCH, epoch=e, step=10 * (e + 1), lr=0.01 / 10 ** (e // 2), val_top5_error=None)
        rec.pop("train_loss")
        log.append(rec)
    out = plot_learning_curves(log, tmp_path / "curves.png")
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 0 and img.size[1] > 0
    assert plot_learning_curves(log[:3], tmp_path / "steps_only.png").stat().st_size > 0
    with pytest.raises(ValueError, match="no 'epoch', 'step' or 'final'"):
        plot_learning_curves([{"kind": "other"}], tmp_path / "x.png")


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_learning_curves_of_a_budget_run_show_its_closing_validation():
    """A run shorter than an epoch (the CPU budget) has no epoch records: its error panels show the
    closing evaluation at the step it was made, and the loss panel the steps, their trend and the
    closing validation loss."""
    import matplotlib.pyplot as plt

    steps = [dict(kind="step", step=s, epoch=0, loss=2.3 - 0.01 * s, lr=0.01) for s in range(1, 61)]
    speeds = [dict(kind="speed", step=s, img_per_s=14.0) for s in range(10, 61, 10)]
    finals = [dict(kind="final", step=60, epoch=0, epochs_trained=0.064, crops=c, images=300, val_loss=1.2 + c / 100,
                   val_top1_error=51.67 + c / 10, val_top5_error=5.33) for c in (1, 10)]
    stale = dict(finals[0], val_top1_error=99.0)  # the same step and protocol scored earlier: replaced
    fig = draw_learning_curves(steps + speeds + [stale] + finals, title="a budget run")
    try:
        top1, top5, loss, rate = fig.axes[:4]
        assert top1.get_xlabel() == "step"
        points = _lines(top1)
        assert points["closing val, centre patch (300 images)"] == ([60], [pytest.approx(51.77)])
        assert points["closing val, 10 patches (300 images)"] == ([60], [pytest.approx(52.67)])
        assert _lines(top5)["closing val, centre patch (300 images)"] == ([60], [5.33])
        curves = _lines(loss)
        assert curves["train (step)"][0] == list(range(1, 61))
        trend = curves["train, mean of 6 steps"][1]
        assert trend[0] == pytest.approx(2.29) and trend[-1] == pytest.approx(2.3 - 0.01 * 57.5)
        assert curves["closing val"] == ([60], [pytest.approx(1.21)])
        assert rate.get_yscale() == "log" and _lines(rate)["learning rate"][1] == [0.01] * 60
        assert _lines(fig.axes[4])["images/s"] == (list(range(10, 61, 10)), [14.0] * 6)  # the speed axis
        assert fig._suptitle.get_text() == "a budget run"
    finally:
        plt.close(fig)


def test_learning_curves_of_epochs_plot_against_epochs_trained():
    import matplotlib.pyplot as plt

    epochs = [dict(EPOCH, epoch=e, step=468 * (e + 1), val_top1_error=35.0 - e) for e in range(3)]
    final = dict(kind="final", step=3 * 468, epoch=3, epochs_trained=3.0, crops=10, images=10000, val_loss=0.8,
                 val_top1_error=31.5, val_top5_error=2.0)
    fig = draw_learning_curves(epochs + [final])
    try:
        points = _lines(fig.axes[0])
        assert fig.axes[0].get_xlabel() == "epochs trained"
        assert points["val (epoch)"] == ([1, 2, 3], [35.0, 34.0, 33.0])
        assert points["closing val, 10 patches (10000 images)"] == ([3.0], [31.5])
    finally:
        plt.close(fig)


def tower_weight() -> torch.Tensor:
    """Kernel i: a ramp in its tower's colour (red, then blue), a hot pixel marking i, scaled by i + 1."""
    w = torch.zeros(96, 3, 11, 11, dtype=torch.float64)
    ramp = torch.linspace(0.2, 0.6, 11)  # along columns
    for i in range(96):
        ch = 0 if i < 48 else 2
        w[i, ch] = ramp.expand(11, 11)
        j = i % 48
        w[i, ch, j // 11, j % 11] = 1.0
        w[i] *= i + 1  # per-kernel normalisation must undo this
    return w


def test_conv1_grid_places_each_kernel_in_its_tower_block(tmp_path):
    scale = 3
    grid = conv1_kernel_array(tower_weight(), towers=2, scale=scale)
    cell = 11 * scale
    block_h = 6 * (cell + BORDER) + BORDER
    assert grid.shape == (2 * block_h + TOWER_GAP, 8 * (cell + BORDER) + BORDER, 3) and grid.dtype == np.uint8
    assert (grid[block_h:block_h + TOWER_GAP] == 255).all()  # the gap between the towers
    for i in range(96):
        t, j = divmod(i, 48)
        y = t * (block_h + TOWER_GAP) + BORDER + (j // 8) * (cell + BORDER)
        x = BORDER + (j % 8) * (cell + BORDER)
        c = grid[y:y + cell, x:x + cell].astype(int)
        ch, other = (0, 2) if t == 0 else (2, 0)
        assert (c[..., ch] > c[..., other]).all() and (c[..., 1] == 0).all()
        hot = np.argwhere(c[..., ch] == 255)
        assert hot.min(0).tolist() == [(j // 11) * scale, (j % 11) * scale] and len(hot) == scale * scale
        assert (c[-1, -1, ch], c[-1, 0, ch]) == (153, 51)  # 0.6 and 0.2 of 255 whatever the kernel's scale
        assert (grid[y - 1, x:x + cell] == 255).all() and (grid[y:y + cell, x - 1] == 255).all()
    path = conv1_kernel_grid(tower_weight().float(), tmp_path / "fig3.png", scale=scale)
    with Image.open(path) as img:
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), grid)


def test_conv1_grid_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(96, 3, 11, 11\)"):
        conv1_kernel_array(torch.zeros(96, 1, 11, 11))
    with pytest.raises(ValueError, match="towers"):
        conv1_kernel_array(torch.zeros(95, 3, 11, 11))


def brute_force(q: np.ndarray, b: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
    out = []
    for i, v in enumerate(q):
        d = [float(np.sqrt(((v - u) ** 2).sum())) for u in b]
        order = [j for j in sorted(range(len(b)), key=lambda j: (d[j], j)) if not (exclude_self and j == i)]
        out.append(order[:k])
    return np.array(out)


def test_nearest_neighbours_on_a_line_and_at_random():
    line = torch.arange(10, dtype=torch.float32)[:, None] * torch.tensor([[3.0, 4.0]])  # spacing 5
    idx = nearest_neighbours(line[[0, 9]], line, k=3)
    assert idx.tolist() == [[0, 1, 2], [9, 8, 7]]
    assert nearest_neighbours(line[[0, 9]], line[[0, 9]], k=1, exclude_self=True).tolist() == [[1], [0]]
    g = torch.Generator().manual_seed(0)
    q, b = torch.randn(7, 64, generator=g), torch.randn(40, 64, generator=g)
    assert np.array_equal(nearest_neighbours(q, b, k=6, chunk=3).numpy(), brute_force(q.numpy(), b.numpy(), 6, False))
    assert np.array_equal(nearest_neighbours(b, b, k=5, exclude_self=True, chunk=16).numpy(),
                          brute_force(b.numpy(), b.numpy(), 5, True))


def test_nearest_neighbours_figure(tmp_path):
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(12, 32, generator=g)
    images = torch.randint(0, 255, (12, 9, 7, 1), dtype=torch.uint8, generator=g)
    path, idx = nearest_neighbours_figure(images[:3], feats[:3], images, feats, tmp_path / "fig4.png", k=4)
    assert idx.shape == (3, 4) and idx[:, 0].tolist() == [0, 1, 2]  # each query is in the bank
    _, idx2 = nearest_neighbours_figure(images, feats, images, feats, tmp_path / "f.png", k=4, exclude_self=True)
    assert (idx2 != torch.arange(12)[:, None]).all() and torch.equal(idx2[:3, :3], idx[:, 1:])
    with Image.open(path) as img:
        pix = np.asarray(img)
    border, gap = 2, 8
    assert pix.shape == (3 * (9 + border) + border, 5 * (7 + border) + border + gap, 3)
    for r in range(3):  # query first, then its neighbours after the gap
        y = border + r * (9 + border)
        assert np.array_equal(pix[y:y + 9, border:border + 7, 0], images[r, ..., 0].numpy())
        for c, j in enumerate(idx[r].tolist(), 1):
            x = border + c * (7 + border) + gap
            assert np.array_equal(pix[y:y + 9, x:x + 7], images[j].expand(9, 7, 3).numpy())


def test_nearest_neighbours_errors(tmp_path):
    imgs, f = torch.zeros(4, 5, 5, 3, dtype=torch.uint8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="features"):
        nearest_neighbours(f, torch.randn(4, 9), k=1)
    with pytest.raises(ValueError, match="k=4"):
        nearest_neighbours(f, f, k=4, exclude_self=True)
    with pytest.raises(ValueError, match="k=5"):
        nearest_neighbours(f, f, k=5)
    with pytest.raises(ValueError, match="3 query images for 4"):
        nearest_neighbours_figure(imgs[:3], f, imgs, f, tmp_path / "x.png", k=2)
    with pytest.raises(ValueError, match="uint8"):
        nearest_neighbours_figure(imgs.float(), f, imgs, f, tmp_path / "x.png", k=2)
    assert not list(tmp_path.iterdir())


def test_neighbours_of_some_bank_images_skip_themselves():
    bank = torch.tensor([[0.0], [1.0], [1.1], [5.0], [5.2]])
    q = torch.tensor([1, 3])
    idx = nearest_neighbours(bank[q], bank, 2, self_index=q)
    assert idx.tolist() == [[2, 0], [4, 2]]


def test_run_labels_compare_paths_however_written(tmp_path, monkeypatch):
    from repro.report import same_run_labels

    monkeypatch.chdir(tmp_path)
    assert same_run_labels("runs/a (step 5)", "./runs/a/ (step 5)")
    assert same_run_labels("runs/a (step 5)", f"{tmp_path}/runs/a (step 5)")
    assert not same_run_labels("runs/a (step 5)", "runs/a (step 6)") and not same_run_labels("runs/a (step 5)", "runs/b (step 5)")
    pair = "runs/a/latest.pt (step 5), runs/b/best.pt (step 9)"
    assert same_run_labels(pair, "./runs/a/latest.pt (step 5), runs//b/best.pt (step 9)")
    assert not same_run_labels(pair, "runs/a/latest.pt (step 5)")

