"""The 2012 network (224 input, conv1 -> LRN -> pool -> ReLU, conv2's same-map norm) in every form:
the towers in one process and one tower per gloo process against the grouped form, in float64, with
the weight mapping both ways and the four exchanges' count and bytes at 224. Its layers against
plain arithmetic; the preset's other switches in test_optim.py and test_augment_2012.py."""

import dataclasses

import pytest
import torch

from repro import AlexNet, DistributedTowerAlexNet, TwoTowerAlexNet
from repro.config import TrainConfig, apply_variant, cuda_convnet_2012, variant_name
from repro.exchange import EXCHANGES, ExchangeLog
from repro.model.convert import grouped_to_towers, towers_to_grouped
from repro.model.layers import same_map_response_norm
from tests.conftest import SMALL_FC, run_distributed
from tests.equivalence import TOLERANCE, assert_same, exercise, relative_error
from tests.test_two_tower import towers_result

# Every layer at the paper's size but fc6/fc7 (256 units per tower: the fully connected layers do not
# change in the 2012 network, and training the full ones in float64 would take most of the suite's time).
CFG = dataclasses.replace(cuda_convnet_2012(10), widths=SMALL_FC)
F64 = torch.float64


def expected_bytes(batch: int, itemsize: int) -> dict:
    """pool2 13x13x128 = 21,632 and pool5 6x6x128 = 4,608 values per image and tower at 224, as at 227;
    fc6 and fc7 256 each here. Tower 1 also sends fc7 to tower 0; backward mirrors forward."""
    t1 = (21_632 + 4_608 + 256 + 256) * batch * itemsize
    t0 = (21_632 + 4_608 + 256) * batch * itemsize
    return {("forward", 0): t0, ("forward", 1): t1, ("backward", 0): t1, ("backward", 1): t0}


@pytest.fixture(scope="module")
def towers_run():
    torch.manual_seed(0)
    towers = TwoTowerAlexNet(devices=("cpu", "cpu"), config=CFG).to(F64)
    return towers_result(exercise(towers, CFG, F64, "towers."), CFG)


def _tower_worker(rank, world):
    torch.manual_seed(0)  # every rank draws the same grouped network and keeps its block
    return exercise(DistributedTowerAlexNet(CFG, None, "cpu").to(F64), CFG, F64, "tower.")


def test_preset_network_is_the_2012_one():
    assert CFG.image_size == 224 and CFG.feature_sizes() == (55, 27, 13, 13, 6) and CFG.conv1_padding() == 3
    assert variant_name(cuda_convnet_2012(10)) == "cuda-convnet-2012"
    cfg = apply_variant(TrainConfig(), "cuda-convnet-2012")
    assert cfg.model == cuda_convnet_2012(1000) and cfg.data.crop_size == 224
    torch.manual_seed(0)
    net = AlexNet(config=cuda_convnet_2012(10))
    for name, std in (("conv1", 0.01), ("conv2", 0.01), ("conv3", 0.03), ("conv4", 0.03), ("conv5", 0.03),
                      ("fc6", 0.01)):  # initW in layers-145.cfg
        assert abs(getattr(net, name).weight.std().item() - std) < 0.05 * std, name


def test_towers_equal_grouped_in_float64(towers_run, grouped_reference):
    grouped = grouped_reference(F64, CFG)
    for key in ("eval_logits", "train_logits"):
        assert relative_error(towers_run[key], grouped[key]) <= TOLERANCE[F64], key
    for key in ("grads", "state", "velocity"):
        assert_same(towers_run[key], grouped[key], F64, key)


def test_four_exchanges_each_way_with_predicted_bytes_at_224(towers_run):
    log = ExchangeLog()
    log.transfers = towers_run["log"]
    assert log.calls("forward") == list(EXCHANGES) and log.calls("backward") == list(reversed(EXCHANGES))
    for (phase, src), nbytes in expected_bytes(2, 8).items():
        assert log.bytes(phase, src=src) == nbytes, (phase, src)


def test_one_tower_per_process_equals_grouped(tmp_path, grouped_reference):
    ranks = run_distributed(_tower_worker, 2, tmp_path)
    grouped = grouped_reference(F64, CFG)
    assert relative_error(ranks[0]["train_logits"], grouped["train_logits"]) <= TOLERANCE[F64]
    for key in ("grads", "state", "velocity"):
        assert_same(towers_to_grouped([r[key] for r in ranks], CFG), grouped[key], F64, key)
    for rank, result in enumerate(ranks):
        for phase in ("forward", "backward"):
            sent = sum(t.nbytes for t in result["log"] if t.phase == phase)
            assert sent == expected_bytes(2, 8)[(phase, rank)], (rank, phase)


def test_weight_mapping_both_ways_bit_for_bit():
    grouped = AlexNet(config=CFG).double()
    state = grouped.state_dict()
    back = towers_to_grouped(grouped_to_towers(state, CFG), CFG)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    towers = TwoTowerAlexNet.from_grouped(grouped, devices=("cpu", "cpu"))
    again = towers.to_grouped().state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_same_map_norm_against_a_loop_over_the_clipped_window():
    """layers-145.cfg cnorm2: x / (1 + 0.001 / 25 * sum over the centred 5x5 window, clipped) ^ 0.75."""
    x = torch.randn(1, 2, 6, 7, dtype=F64) * 30
    expected = torch.empty_like(x)
    for c in range(2):
        for i in range(6):
            for j in range(7):
                window = x[0, c, max(0, i - 2):i + 3, max(0, j - 2):j + 3]
                expected[0, c, i, j] = x[0, c, i, j] * (1 + 0.001 / 25 * window.square().sum()) ** -0.75
    torch.testing.assert_close(same_map_response_norm(x), expected, rtol=1e-14, atol=0)


def test_the_script_flag_gives_the_whole_preset(tmp_path):
    from scripts.train_two_gpu import build_config, build_parser

    args = build_parser().parse_args(["--variant", "cuda-convnet-2012", "--device", "cpu", "--max-steps", "1",
                                      "--out", str(tmp_path)])
    cfg = build_config(args)
    preset = apply_variant(TrainConfig(), "cuda-convnet-2012")
    assert cfg.model == cuda_convnet_2012(1000) and cfg.optim == preset.optim
    assert cfg.data.crop_size == 224 and cfg.data.mean_crop == "centre" and cfg.data.crop_chunk == 32
    given = build_config(build_parser().parse_args(["--variant", "cuda-convnet-2012", "--device", "cpu", "--out",
                                                    str(tmp_path), "--schedule", "milestones", "--milestones", "7"]))
    assert given.optim.milestones == (7,) and given.optim.bias_lr_fixed  # a flag given wins over the preset
    plain = build_config(build_parser().parse_args(["--variant", "cuda-convnet-2012", "--device", "cpu", "--out",
                                                    str(tmp_path), "--schedule", "plateau", "--bias-lr-mult", "1"]))
    assert (plain.optim.schedule, plain.optim.bias_lr_mult) == ("plateau", 1.0)  # given at its default: still given
    paper = build_config(build_parser().parse_args(["--device", "cpu", "--max-steps", "1", "--out", str(tmp_path)]))
    assert paper.optim == dataclasses.replace(paper.optim, bias_lr_fixed=False, layer_lr_changes=())
    assert paper.data.mean_crop == "same" and paper.data.crop_chunk == 1 and paper.data.crop_size == 227


def test_training_loop_gives_the_epoch_to_the_late_switches(tmp_path, monkeypatch):
    """The 2012 preset shrunk to a 67-pixel input and two epochs: in epoch 1 the colour noise (and its
    divide by 1.1) is off and conv1's rate is 0, which needs the loop to pass each epoch along."""
    from repro import train as train_module
    from repro.optim import PaperSGD
    from tests.test_fashion_mnist import make_tree

    make_tree(tmp_path / "data", n_train=48, n_test=8)
    preset = apply_variant(TrainConfig(), "cuda-convnet-2012")
    cfg = dataclasses.replace(
        preset, model=dataclasses.replace(preset.model, num_classes=10, image_size=67, widths=SMALL_FC),
        optim=dataclasses.replace(preset.optim, milestones=(1,), layer_lr_changes=(("conv1", 1, 0.0, 0.0),)),
        data=dataclasses.replace(preset.data, root=str(tmp_path / "data"), base_size=76, crop_size=67, workers=0,
                                 pca_off_epoch=1, crop_chunk=8),
        epochs=2, batch_size=24, out=str(tmp_path / "run"), eval_batch_size=16, final_crops=(), device="cpu")
    draws, rates = [], []
    real_draw, real_set_lr = train_module.draw_params, PaperSGD.set_lr

    def draw(*args, **kw):
        draws.append(real_draw(*args, **kw))
        return draws[-1]

    def set_lr(self, lr, epoch=None):
        real_set_lr(self, lr, epoch)
        rates.append((epoch, [g["lr"] for g in self.param_groups]))

    monkeypatch.setattr(train_module, "draw_params", draw)
    monkeypatch.setattr(PaperSGD, "set_lr", set_lr)
    train_module.train(cfg)
    assert len(draws) == 4  # two steps per epoch
    assert all(d.gain is not None and d.alpha.abs().sum() > 0 for d in draws[:2])
    assert all(d.gain is None and not d.alpha.any() for d in draws[2:])
    assert all(d.top[:8].unique().numel() == 1 for d in draws)  # chunks of 8 share a crop
    epochs = [e for e, _ in rates]
    assert 0 in epochs and 1 in epochs
    first, second = rates[epochs.index(0)][1], rates[epochs.index(1)][1]
    assert 0.0 not in first and second.count(0.0) == 2  # conv1's weights and biases stop in epoch 1
