"""Towers in one process against the grouped form (paper section 3.2): same function, same training."""

import pytest
import torch

from repro import AlexNet, ModelConfig, TwoTowerAlexNet
from repro.exchange import EXCHANGES, ExchangeLog, record
from repro.model.convert import grouped_to_towers, towers_to_grouped
from tests.equivalence import TOLERANCE, assert_same, exercise, relative_error, training_check_config

CFG = ModelConfig()  # full size: 227 input, 1000 classes


def towers_result(result_by_tower: dict, cfg: ModelConfig) -> dict:
    """Map an `exercise` result of TwoTowerAlexNet (keys "0.conv1.weight", ...) to the grouped form."""
    out = {k: v for k, v in result_by_tower.items() if k.endswith("logits") or k == "log"}
    for key in ("grads", "state", "velocity"):
        if key not in result_by_tower:  # a network whose training no test compares (compares_training)
            continue
        per_tower = [{k[2:]: v for k, v in result_by_tower[key].items() if k.startswith(f"{t}.")} for t in (0, 1)]
        out[key] = towers_to_grouped(per_tower, cfg)
    return out


def run_towers(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    towers = TwoTowerAlexNet(devices=("cpu", "cpu"), config=cfg).to(dtype)
    return towers_result(exercise(towers, cfg, dtype, "towers."), cfg)


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def both_forms(request, grouped_reference):
    """dtype, then (grouped, towers) results on the full-size network, then the same on the network
    that training is compared on (training_check_config)."""
    dtype = request.param
    full = grouped_reference(dtype), run_towers(CFG, dtype)
    cfg = training_check_config(dtype)
    trained = full if cfg == CFG else (grouped_reference(dtype, cfg), run_towers(cfg, dtype))
    return dtype, full, trained


def test_logits_equal_in_eval_and_train_mode(both_forms):
    dtype, (g, t), _ = both_forms
    for key in ("eval_logits", "train_logits"):
        assert relative_error(t[key], g[key]) <= TOLERANCE[dtype], key
    assert relative_error(g["eval_logits"], g["train_logits"]) > 0.01  # dropout really acted


def test_gradients_equal(both_forms):
    dtype, _, (g, t) = both_forms
    assert_same(t["grads"], g["grads"], dtype, "gradient")


def test_weights_and_velocities_equal_after_steps_across_lr_drop(both_forms):
    dtype, _, (g, t) = both_forms
    assert_same(t["state"], g["state"], dtype, "weights")
    assert_same(t["velocity"], g["velocity"], dtype, "velocity")


def test_same_seed_same_network():
    small = ModelConfig(num_classes=10, image_size=67)
    torch.manual_seed(5)
    grouped = AlexNet(config=small)
    torch.manual_seed(5)
    towers = TwoTowerAlexNet(devices=("cpu", "cpu"), config=small)
    for k, v in grouped.state_dict().items():
        assert torch.equal(towers.grouped_state()[k], v), k


def test_weight_mapping_round_trips_bit_for_bit():
    grouped = AlexNet(config=CFG)
    grouped.drop6.step.fill_(41)
    state = grouped.state_dict()
    back = towers_to_grouped(grouped_to_towers(state, CFG), CFG)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    towers = TwoTowerAlexNet.from_grouped(grouped, devices=("cpu", "cpu"))
    again = TwoTowerAlexNet.from_grouped(towers.to_grouped(), devices=("cpu", "cpu"))
    for a, b in zip(towers.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert towers.towers[1].conv3.weight.data_ptr() != grouped.conv3.weight.data_ptr()  # copies


def test_conversions_keep_the_precision_and_the_random_stream():
    grouped = AlexNet(config=CFG).double()
    towers = TwoTowerAlexNet.from_grouped(grouped, devices=("cpu", "cpu"))
    assert all(p.dtype == torch.float64 for p in towers.parameters())
    assert torch.equal(towers.towers[0].conv1.weight, grouped.conv1.weight[:48])  # no float32 rounding
    state = torch.random.get_rng_state()
    back = towers.to_grouped()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), grouped.state_dict().values()))


def test_mapping_rejects_foreign_state():
    with pytest.raises(KeyError, match="unexpected entry 'features.0.weight'"):
        grouped_to_towers({"features.0.weight": torch.zeros(1)}, CFG)


def expected_bytes(batch: int, itemsize: int) -> dict:
    """Paper section 3.5's sizes: per image forward, tower 1 sends 21,632 + 4,608 + 2,048 + 2,048 values and
    tower 0 sends 21,632 + 4,608 + 2,048; backward mirrors this with gradients."""
    t1 = (21_632 + 4_608 + 2_048 + 2_048) * batch * itemsize
    t0 = (21_632 + 4_608 + 2_048) * batch * itemsize
    return {("forward", 0): t0, ("forward", 1): t1, ("backward", 0): t1, ("backward", 1): t0}


def test_exactly_four_exchanges_each_way_with_predicted_bytes(both_forms):
    dtype, (_, towers), _ = both_forms
    log = ExchangeLog()
    log.transfers = towers["log"]  # one training step, batch of 2
    assert log.calls("forward") == list(EXCHANGES)
    assert log.calls("backward") == list(reversed(EXCHANGES))
    itemsize = torch.tensor([], dtype=dtype).element_size()
    for (phase, src), nbytes in expected_bytes(2, itemsize).items():
        assert log.bytes(phase, src=src) == nbytes, (phase, src)
    assert log.bytes("forward", exchange="fc7->fc8") == 2_048 * 2 * itemsize  # one way only


def test_evaluation_exchanges_forward_only():
    net = TwoTowerAlexNet(devices=("cpu", "cpu"), config=ModelConfig(num_classes=10, image_size=67)).eval()
    with record() as log:
        with torch.no_grad():
            net(torch.randn(2, 3, 67, 67))
    assert log.calls("forward") == list(EXCHANGES) and log.calls("backward") == []
