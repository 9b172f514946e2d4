"""One tower per process (2 gloo processes on CPU) against the grouped form."""

import pytest
import torch

from repro import AlexNet, DistributedTowerAlexNet, ModelConfig
from repro.exchange import EXCHANGES, record
from repro.model.convert import towers_to_grouped
from tests.conftest import run_distributed
from tests.equivalence import assert_same, exercise, relative_error, TOLERANCE
from tests.test_two_tower import expected_bytes

CFG = ModelConfig()


def _tower_worker(rank, world, dtype):
    torch.manual_seed(0)  # every rank draws the same grouped network and keeps its block
    model = DistributedTowerAlexNet(CFG, None, "cpu").to(dtype)
    result = exercise(model, CFG, dtype, "tower.")
    model.train()
    with record() as log:
        out = model(torch.randn(3, 3, 227, 227, dtype=dtype))
        (out.logsumexp(1).sum() if rank == 0 else out.sum()).backward()
    result["log"] = log.transfers
    result["anchor_shape"] = tuple(out.shape)
    return result


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def forms(request, tmp_path_factory):
    dtype = request.param
    ranks = run_distributed(_tower_worker, 2, tmp_path_factory.mktemp("towers"), dtype)
    torch.manual_seed(0)
    grouped = exercise(AlexNet(config=CFG).to(dtype), CFG, dtype)
    mapped = {k: towers_to_grouped([r[k] for r in ranks], CFG) for k in ("grads", "state", "velocity")}
    return dtype, grouped, ranks, mapped


def test_logits_equal_in_eval_and_train_mode(forms):
    dtype, grouped, ranks, _ = forms
    for key in ("eval_logits", "train_logits"):
        assert relative_error(ranks[0][key], grouped[key]) <= TOLERANCE[dtype], key
        assert ranks[1][key].shape == (2, 0)  # tower 1 holds no logits, only the anchor


def test_gradients_equal(forms):
    dtype, grouped, _, mapped = forms
    assert_same(mapped["grads"], grouped["grads"], dtype, "gradient")


def test_weights_and_velocities_equal_after_steps(forms):
    dtype, grouped, _, mapped = forms
    assert_same(mapped["state"], grouped["state"], dtype, "weights")
    assert_same(mapped["velocity"], grouped["velocity"], dtype, "velocity")


def test_four_exchanges_each_way_with_predicted_bytes(forms):
    dtype, _, ranks, _ = forms
    itemsize = torch.tensor([], dtype=dtype).element_size()
    for rank, result in enumerate(ranks):
        sent = result["log"]  # what this tower sent
        assert all(t.src == rank for t in sent)
        for phase in ("forward", "backward"):
            names = list(dict.fromkeys(t.exchange for t in sent if t.phase == phase))
            expected = list(EXCHANGES) if phase == "forward" else list(reversed(EXCHANGES))
            if (rank, phase) in ((0, "forward"), (1, "backward")):
                expected.remove("fc7->fc8")  # exchange 4 runs from tower 1 to tower 0 only
            assert names == expected, (rank, phase)
            assert sum(t.nbytes for t in sent if t.phase == phase) == expected_bytes(3, itemsize)[(phase, rank)]
