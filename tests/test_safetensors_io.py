"""Trained weights exported as safetensors (issue 19, item 2): the round trip gives the same function, and a
file without our header, or not safetensors at all, gets a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import repro
import repro.checkpoint as ck
from repro.config import LRNConfig, ModelConfig, TowerWidths
from repro.model.grouped import AlexNet
from scripts.export_safetensors import main as export_main

# A small variant (no LRN, other widths): the metadata must carry the config, or the function would differ.
CFG = ModelConfig(num_classes=7, image_size=67, widths=TowerWidths(8, 16, 16, 16, 8, 32, 32),
                  lrn=LRNConfig(enabled=False))


@pytest.fixture
def run_ckpt(tmp_path):
    torch.manual_seed(0)
    net = AlexNet(config=CFG).eval()
    ck.atomic_save(dict(format=ck.FORMAT, model=net.state_dict(), model_config=CFG.to_dict(),
                        classes=[f"c{i}" for i in range(7)]), tmp_path / "run" / "latest.pt")
    return net, tmp_path / "run"


def test_export_then_load_gives_the_same_network(run_ckpt, tmp_path):
    net, run = run_ckpt
    out = tmp_path / "net.safetensors"
    assert export_main(["--checkpoint", str(run), "--out", str(out)]) == 0
    loaded = repro.load_checkpoint(out)
    assert loaded.config == CFG and not loaded.training
    x = torch.randn(3, 3, 67, 67, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    from repro.safetensors_io import read_safetensors

    assert read_safetensors(out)[2] == [f"c{i}" for i in range(7)]
    with pytest.raises(ValueError, match="exported weights only.*latest.pt"):
        repro.load_preprocessing(out)


def test_file_without_our_metadata_is_refused(tmp_path):
    state = {k: v.contiguous() for k, v in AlexNet(config=CFG).state_dict().items()}
    save_file(state, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="no repro network config in its metadata"):
        repro.load_checkpoint(tmp_path / "bare.safetensors")
    save_file(state, str(tmp_path / "bad.safetensors"),
              metadata={"format": "repro-alexnet-weights-1", "model_config": "{not json"})
    with pytest.raises(ValueError, match="config in its metadata is invalid"):
        repro.load_checkpoint(tmp_path / "bad.safetensors")
    other = dict(CFG.to_dict(), num_classes=9)
    save_file(state, str(tmp_path / "misfit.safetensors"),
              metadata={"format": "repro-alexnet-weights-1", "model_config": json.dumps(other)})
    with pytest.raises(ValueError, match="do not fit the network its metadata describes"):
        repro.load_checkpoint(tmp_path / "misfit.safetensors")


def test_a_file_that_is_not_safetensors(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x80\x04 a pickle, perhaps")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        repro.load_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        repro.load_checkpoint(tmp_path / "missing.safetensors")
