"""Atomic checkpoint writes, loading either form's weights, and what a resume accepts."""

import json
import os

import pytest
import torch

import repro.checkpoint as ck
from repro import AlexNet, ModelConfig, TwoTowerAlexNet, load_checkpoint

CFG = ModelConfig(num_classes=10, image_size=67)


def test_a_crash_while_writing_keeps_the_last_good_file(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    ck.atomic_save({"format": ck.FORMAT, "value": 1}, path)
    real_save = torch.save

    def dying_save(obj, f):
        real_save({"partial": True}, f)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save({"format": ck.FORMAT, "value": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert ck.safe_load(path)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temporary left behind


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="latest.pt"):
        ck.read(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not be read"):
        ck.read(tmp_path / "junk.pt")
    torch.save({"epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a repro checkpoint"):
        ck.read(tmp_path / "other.pt")
    (tmp_path / "latest.pt").write_bytes(b"")  # a run stopped before its first epoch ended
    with pytest.raises(FileNotFoundError,
                       match=r"this run has none \(best.pt is written when an epoch ends.*pass .* \(its latest.pt\)"):
        ck.read(tmp_path / "best.pt")


def test_either_form_loads_as_grouped(tmp_path):
    grouped = AlexNet(config=CFG)
    ck.atomic_save(dict(format=ck.FORMAT, model=grouped.state_dict(), model_config=CFG.to_dict()), tmp_path / "g.pt")
    x = torch.randn(2, 3, 67, 67)
    expected = grouped.eval()(x)
    stream = torch.get_rng_state()
    model = load_checkpoint(tmp_path / "g.pt")
    assert torch.equal(torch.get_rng_state(), stream)  # the caller's seeded stream is left where it was
    with torch.device("meta"):  # another default device: still the checkpoint's weights, on the CPU
        assert torch.equal(load_checkpoint(tmp_path / "g.pt").fc8.weight, model.fc8.weight)
    assert not model.training
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    towers = TwoTowerAlexNet.from_grouped(grouped, devices=("cpu", "cpu"))
    torch.save(towers.state_dict(), tmp_path / "t.pt")  # a bare TwoTowerAlexNet state dict
    from_towers = AlexNet(config=CFG)
    from_towers.load_state_dict(ck.grouped_state(ck.read(tmp_path / "t.pt")["model"], CFG))
    torch.testing.assert_close(from_towers.eval()(x), expected, rtol=0, atol=0)


def test_weights_that_do_not_fit_are_a_clear_error(tmp_path):
    state = AlexNet(config=CFG).state_dict()
    state["fc6.weight"] = state["fc6.weight"][:, :10]
    ck.atomic_save(dict(format=ck.FORMAT, model=state, model_config=CFG.to_dict()), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_checkpoint(tmp_path / "bad.pt")


def test_bare_weights_load_as_the_paper_network_with_a_warning(tmp_path):
    grouped = AlexNet(config=ModelConfig(num_classes=10))
    torch.save(grouped.state_dict(), tmp_path / "w.pt")
    with pytest.warns(UserWarning, match="bare weights without a config.*10 classes"):
        model = load_checkpoint(tmp_path / "w.pt")
    assert model.config == ModelConfig(num_classes=10)


def test_files_get_the_mode_a_plain_write_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        ck.atomic_save({"format": ck.FORMAT}, tmp_path / "latest.pt")
        assert (tmp_path / "latest.pt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        os.chmod(tmp_path / "latest.pt", 0o640)
        ck.atomic_save({"format": ck.FORMAT}, tmp_path / "latest.pt")
        assert (tmp_path / "latest.pt").stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
    finally:
        os.umask(old)


def test_metrics_log_resume_drops_what_the_checkpoint_does_not_hold(tmp_path):
    from repro.metrics import MetricsLog

    log = MetricsLog(tmp_path / "m.jsonl")
    for step in range(1, 5):
        log.write(kind="step", step=step, epoch=0, loss=1.0)
    log.write(kind="epoch", epoch=0, step=4)  # epoch 0 ended after its 4th step ...
    log.write(kind="step", step=5, epoch=1, loss=1.0)
    log.truncate_after(4, epoch=0)  # ... but the checkpoint was written before it ended (--max-steps 4)
    kinds = [(r["kind"], r["step"]) for r in map(json.loads, (tmp_path / "m.jsonl").read_text().splitlines())]
    assert kinds == [("step", 1), ("step", 2), ("step", 3), ("step", 4)]
    log.write(kind="epoch", epoch=0, step=4)
    log.truncate_after(4, epoch=1)  # a checkpoint written after the end of epoch 0 keeps its record
    assert (tmp_path / "m.jsonl").read_text().count('"kind": "epoch"') == 1


def test_resume_checks(tmp_path):
    from repro.checkpoint import check_resumable

    ckpt = {"train_config": {"x": 1}, "velocity": {"w": 1}, "schedule": {"drops": 0},
            "progress": {"epoch": 2, "step_in_epoch": 5, "global_step": 25}, "topology": {"towers": 2, "replicas": 2}}
    check_resumable(ckpt, "run/latest.pt", replicas=2)
    with pytest.raises(ValueError, match="middle of an epoch by 2 tower pair.*this launch has 1"):
        check_resumable(ckpt, "run/latest.pt", replicas=1)
    check_resumable({**ckpt, "progress": {"epoch": 3, "step_in_epoch": 0, "global_step": 30}}, "r", replicas=1)
    with pytest.raises(ValueError, match="not a training checkpoint .*velocity"):
        check_resumable({k: v for k, v in ckpt.items() if k != "velocity"}, "w.pt", replicas=2)


class _Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for a shell command in a shared .pt file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": ck.FORMAT, "model": {}, "payload": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"evil.pt was refused.*Nothing from it was executed.*"
                                         r"python -m repro.checkpoint upgrade .*evil.pt NEW.pt"):
        ck.read(path)
    with pytest.raises(ValueError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_checkpoint_of_the_earlier_writer_still_loads(tmp_path):
    # Before weights_only loading, checkpoints stored torch.__version__ itself (a TorchVersion object).
    grouped = AlexNet(config=CFG)
    old = dict(format="repro-checkpoint/1", model=grouped.state_dict(), model_config=CFG.to_dict(),
               torch_version=torch.__version__)
    torch.save(old, tmp_path / "old.pt")
    assert type(torch.load(tmp_path / "old.pt", weights_only=False)["torch_version"]) is not str
    model = load_checkpoint(tmp_path / "old.pt")
    assert torch.equal(model.fc8.weight, grouped.fc8.weight)


def test_upgrade_converts_a_trusted_file_that_holds_objects(tmp_path, capsys):
    from repro.data.augment import Stats

    grouped = AlexNet(config=CFG)
    stats = Stats(mean_image=torch.rand(4, 4, 3), eigvals=torch.rand(3), eigvecs=torch.rand(3, 3), images=7)
    torch.save(dict(format=ck.FORMAT, model=grouped.state_dict(), model_config=CFG.to_dict(), stats=stats),
               tmp_path / "old.pt")
    with pytest.raises(ValueError, match="refused.*Stats"):
        ck.read(tmp_path / "old.pt")
    assert ck._main(["upgrade", str(tmp_path / "old.pt"), str(tmp_path / "new.pt")]) == 0
    assert "only for a file you trust" in capsys.readouterr().out
    new = ck.read(tmp_path / "new.pt")
    assert new["stats"]["images"] == 7 and torch.equal(new["stats"]["eigvecs"], stats.eigvecs)
    assert torch.equal(ck.load_model(tmp_path / "new.pt").fc8.weight, grouped.fc8.weight)
    assert ck._main(["upgrade", str(tmp_path / "old.pt")]) == 2
