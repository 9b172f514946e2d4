"""Atomic checkpoint writes and loading either form's weights."""

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
    assert torch.load(path, weights_only=False)["value"] == 1
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


def test_either_form_loads_as_grouped(tmp_path):
    grouped = AlexNet(config=CFG)
    ck.atomic_save(dict(format=ck.FORMAT, model=grouped.state_dict(), model_config=CFG.to_dict()), tmp_path / "g.pt")
    x = torch.randn(2, 3, 67, 67)
    expected = grouped.eval()(x)
    model = load_checkpoint(tmp_path / "g.pt")
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
