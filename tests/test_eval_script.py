"""scripts/evaluate.py on tiny ImageNet-layout trees: every val layout gives the same numbers, either
form of the network gives the same numbers, ensembles average softmaxes, bad inputs fail clearly."""

import shutil
from pathlib import Path

import pytest
import torch

from repro.checkpoint import read
from repro.config import DataConfig, ModelConfig, TrainConfig
from repro.eval_job import EvalOptions, load_member, run_evaluation
from scripts.evaluate import main as evaluate_main
from tests.test_data_folder_imagenet import (
    VAL_LABELS,
    VAL_WNIDS,
    csv_rows,
    make_flat_val,
    make_train,
    val_name,
    write_csv,
    write_devkit_dir,
)


def class_folder_val(root):
    make_flat_val(root)
    for k, w in enumerate(VAL_WNIDS, start=1):
        (root / "val" / w).mkdir(exist_ok=True)
        shutil.move(root / "val" / val_name(k), root / "val" / w / val_name(k))


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("imagenet")
    roots = {name: base / name for name in ("folders", "devkit", "csv")}
    for root in roots.values():
        make_train(root)
    class_folder_val(roots["folders"])
    make_flat_val(roots["devkit"])
    write_devkit_dir(roots["devkit"])
    make_flat_val(roots["csv"])
    write_csv(roots["csv"] / "LOC_val_solution.csv", csv_rows())
    return roots


@pytest.fixture(scope="module")
def checkpoints(trees, tmp_path_factory):
    from repro.train import train

    runs = []
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"run{seed}")
        train(TrainConfig(model=ModelConfig(num_classes=3, image_size=67),
                          data=DataConfig(dataset="imagenet", root=str(trees["folders"]), base_size=76, crop_size=67,
                                          workers=0),
                          batch_size=2, max_steps=2, seed=seed, out=str(out), final_crops=(), device="cpu"))
        runs.append(str(out / "latest.pt"))
    return runs


def options(ckpts, root, tmp_path, **kw):
    return EvalOptions(checkpoints=list(ckpts), dataset="imagenet", data=str(root), crops=(1, 10), workers=0,
                       batch_size=4, out=str(tmp_path / "eval"), figures=False, device="cpu", **kw)


def test_every_val_layout_gives_the_same_numbers(trees, checkpoints, tmp_path):
    results = {name: run_evaluation(options(checkpoints[:1], root, tmp_path / name)) for name, root in trees.items()}
    reference = results["folders"]
    assert [r.images for r in reference] == [6, 6] and [r.crops for r in reference] == [1, 10]
    for name, rows in results.items():
        assert [(r.top1_error, r.top5_error) for r in rows] == [(r.top1_error, r.top5_error) for r in reference], name
        assert [r.loss for r in rows] == pytest.approx([r.loss for r in reference], rel=1e-6)
    md = (tmp_path / "folders" / "eval" / "evaluation.md").read_text()
    # ImageNet, but 3 classes and 6 images: not the paper's evaluation set, so not in its Table 2
    assert "NOT comparable" in md and "| 1 CNN | paper | 40.7 | 18.2 | - |" in md


def manual_errors(members, split):
    """Softmax of each network on its own preprocessing, averaged, then top-1 by hand."""
    correct = 0
    for i in range(len(split)):
        image, label = split[i]
        probs = sum(m.model(m.augment.eval_batch(image[None], 10)).softmax(1).mean(0) for m in members) / len(members)
        correct += int(probs.argmax()) == label
    return 100.0 * (1 - correct / len(split))


def test_ensemble_and_tower_form(trees, checkpoints, tmp_path):
    from repro.data.imagenet import imagenet_val

    opts = options(checkpoints, trees["folders"], tmp_path)
    ensemble = run_evaluation(opts)
    assert ensemble[1].models == 2 and ensemble[1].label == "2 CNNs, 10 patches"
    members = [load_member(p, opts, torch.device("cpu")) for p in checkpoints]
    split = imagenet_val(trees["folders"], members[0].classes, 76)
    assert sorted(split[i][1] for i in range(6)) == sorted(VAL_LABELS)
    with torch.no_grad():
        assert ensemble[1].top1_error == pytest.approx(manual_errors(members, split))
    towers = run_evaluation(options(checkpoints, trees["folders"], tmp_path / "t", form="towers"))
    assert [(r.top1_error, r.top5_error) for r in towers] == [(r.top1_error, r.top5_error) for r in ensemble]


def test_running_out_of_device_memory_names_the_flag_to_lower(trees, checkpoints, tmp_path, monkeypatch):
    import repro.eval_job

    def too_big(*_args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB. GPU 0 has a total capacity "
                                          "of 79.19 GiB of which 1.00 GiB is free. See PYTORCH_CUDA_ALLOC_CONF.")

    monkeypatch.setattr(repro.eval_job, "evaluate", too_big)
    with pytest.raises(ValueError, match=r"out of device memory scoring 4 images x 10 patch\(es\) through 2 "
                                         r"network\(s\) per step \(CUDA out of memory. Tried to allocate 9.00 GiB\); "
                                         r"pass a smaller --batch-size$"):  # torch's first two sentences only
        run_evaluation(options(checkpoints, trees["folders"], tmp_path))


def test_an_ensemble_does_not_replace_a_single_networks_evaluation_unasked(trees, checkpoints, tmp_path, capsys):
    from repro.eval_job import default_out

    run = Path(checkpoints[0]).parent
    assert default_out(checkpoints[:1]) == run / "evaluation" and default_out(checkpoints) == run / "evaluation-2-cnns"
    run_evaluation(options(checkpoints[:1], trees["folders"], tmp_path))
    run_evaluation(options(checkpoints[:1], trees["folders"], tmp_path))  # the same again: no note
    assert "note: replacing" not in capsys.readouterr().out
    run_evaluation(options(checkpoints[1:], trees["folders"], tmp_path))  # another network, same --out
    assert f"note: replacing the evaluation in {tmp_path / 'eval'} of {checkpoints[0]} (step 2)" in capsys.readouterr().out


def test_a_checkpoints_preprocessing_reproduces_the_evaluation(trees, checkpoints, tmp_path):
    """repro.load_checkpoint + repro.load_preprocessing on the val files give evaluate.py's errors."""
    from PIL import Image

    import repro
    from repro.checkpoint import read
    from repro.data.folder import decode_image, image_folder

    files = image_folder(trees["folders"] / "val", classes=read(checkpoints[0])["classes"])
    rows = run_evaluation(options(checkpoints[:1], trees["folders"], tmp_path))
    net, prep = repro.load_checkpoint(checkpoints[0]), repro.load_preprocessing(checkpoints[0])
    with torch.no_grad():
        for crops, row in zip((1, 10), rows):
            probs = net(prep(files.files, crops)).softmax(1).view(len(files), crops, -1).mean(1)
            wrong = 100 * (probs.argmax(1) != files.labels).sum().item() / len(files)
            assert wrong == pytest.approx(row.top1_error, abs=1e-9), crops
    # By hand: the file at 76 pixels, its centre 67x67, minus the mean image's same pixels.
    mid, ckpt = (76 - 67) // 2, read(checkpoints[0])
    pixels = decode_image(files.files[0], 76).float()[mid:mid + 67, mid:mid + 67]
    mean = torch.as_tensor(ckpt["stats"]["mean_image"]).float()[mid:mid + 67, mid:mid + 67]
    torch.testing.assert_close(prep(files.files[:1])[0], (pixels - mean).permute(2, 0, 1), rtol=0, atol=1e-4)
    pil = [Image.open(f) for f in files.files[:2]]
    assert torch.equal(prep(pil), prep(files.files[:2]))
    with pytest.raises(ValueError, match="uint8 \\(B, H, W, C\\)"):
        prep(torch.zeros(2, 3, 8, 8))


def test_figures_are_written(trees, checkpoints, tmp_path):
    run_evaluation(EvalOptions(checkpoints=checkpoints[:1], crops=(1,), workers=0, out=str(tmp_path / "f"),
                               device="cpu", neighbours=2))
    for name in ("conv1_kernels.png", "fc7_neighbours.png", "learning_curves.png", "evaluation.csv"):
        assert (tmp_path / "f" / name).exists(), name


@pytest.mark.parametrize("breakage,message", [
    ("unknown_wnid", "n00000099"),
    ("missing_labels", "ground truth"),
    ("empty_val", "neither"),
])
def test_bad_val_folders_are_clear_errors(trees, checkpoints, tmp_path, capsys, breakage, message):
    root = tmp_path / "broken"
    make_train(root)
    if breakage == "unknown_wnid":
        class_folder_val(root)
        shutil.copytree(root / "val" / VAL_WNIDS[0], root / "val" / "n00000099")
    elif breakage == "missing_labels":
        make_flat_val(root)
    else:
        (root / "val").mkdir()
    code = evaluate_main(["--checkpoint", checkpoints[0], "--dataset", "imagenet", "--data", str(root),
                          "--out", str(tmp_path / "o"), "--workers", "0", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_wrong_dataset_for_the_network_is_a_clear_error(checkpoints, tmp_path, capsys):
    from tests.test_fashion_mnist import make_tree

    make_tree(tmp_path / "fm")
    code = evaluate_main(["--checkpoint", checkpoints[0], "--dataset", "fashion-mnist", "--data",
                          str(tmp_path / "fm"), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert code == 2 and "trained on 3 classes" in capsys.readouterr().err
    code = evaluate_main(["--checkpoint", str(tmp_path / "nothing.pt"), "--device", "cpu"])
    assert code == 2 and "no checkpoint" in capsys.readouterr().err
    for device, message in (("gpu", "is not a device"), ("meta", "runs on cpu or cuda")) + (
            () if torch.cuda.is_available() else (("cuda", "no CUDA GPU here"),)):
        assert evaluate_main(["--checkpoint", checkpoints[0], "--device", device]) == 2, device
        assert message in capsys.readouterr().err, device
    (tmp_path / "a-file").write_text("")
    code = evaluate_main(["--checkpoint", checkpoints[0], "--device", "cpu", "--workers", "0", "--out",
                          str(tmp_path / "a-file")])
    assert code == 2 and "is a file, not a folder" in capsys.readouterr().err


def test_figure_4_names_the_images_it_shows_when_one_is_unreadable(trees, checkpoints, tmp_path, capsys):
    import json

    from repro.data.imagenet import imagenet_val

    root = tmp_path / "tree"
    shutil.copytree(trees["csv"], root)
    (root / "val" / val_name(1)).write_bytes(b"not a JPEG")
    run_evaluation(EvalOptions(checkpoints=checkpoints[:1], dataset="imagenet", data=str(root), crops=(1,),
                               workers=0, out=str(tmp_path / "f"), device="cpu", neighbours=3))
    doc = json.loads((tmp_path / "f" / "fc7_neighbours.json").read_text())
    split = imagenet_val(root, read(checkpoints[0])["classes"], 76)
    broken = next(i for i, f in enumerate(split.files) if f.endswith(val_name(1)))
    named = doc["queries"] + [i for row in doc["neighbours"] for i in row]
    assert broken not in named
    assert set(named) == set(range(len(split))) - {broken}  # 5 readable images: queries and neighbours
    assert doc["queries"] == [i for i in range(len(split)) if i != broken][::2]
    listed = (tmp_path / "f" / "skipped.txt").read_text().splitlines()  # the unreadable file by name
    assert len(listed) == 1 and listed[0].startswith(str(root / "val" / val_name(1)) + "\t")
    assert f"skipped 1 unreadable file, listed in {tmp_path / 'f' / 'skipped.txt'}" in capsys.readouterr().out


def test_weights_that_do_not_fit_the_checkpoint_config_are_a_clear_error(checkpoints, tmp_path, capsys):
    ckpt = read(checkpoints[0])
    ckpt["model_config"]["num_classes"] = 5
    torch.save(ckpt, tmp_path / "bad.pt")
    code = evaluate_main(["--checkpoint", str(tmp_path / "bad.pt"), "--device", "cpu", "--workers", "0"])
    assert code == 2 and "do not fit the network" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--max-images", "0"), ("--max-images", "-1"), ("--batch-size", "0")])
def test_bad_numbers_are_flag_errors(checkpoints, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        evaluate_main(["--checkpoint", checkpoints[0], flag, value])
    assert exc.value.code == 2 and f"{flag} must be at least" in capsys.readouterr().err


def test_evaluation_convolves_as_the_checkpoints_run_did(trees, checkpoints, tmp_path, monkeypatch):
    """On the CPU the evaluation sets conv3-conv5's algorithm to the one the run trained with and kept
    in its checkpoint (--cpu-conv auto resolved to winograd where the C code builds), as it does the LRN's."""
    from repro.model import winograd

    chosen = []
    monkeypatch.setattr(winograd, "set_kernel", chosen.append)
    run_evaluation(options(checkpoints[:1], trees["folders"], tmp_path))
    kept = read(checkpoints[0])["train_config"]["cpu_conv"]
    assert kept == ("winograd" if winograd.load() is not None else "direct")
    assert chosen == [kept]
