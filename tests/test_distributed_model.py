"""One tower per process (2 gloo processes on CPU) against the grouped form."""

import pytest
import torch

from repro import DistributedTowerAlexNet, ModelConfig
from repro.exchange import EXCHANGES
from repro.model.convert import towers_to_grouped
from tests.conftest import SMALL, run_distributed
from tests.equivalence import TOLERANCE, assert_same, exercise, relative_error, training_check_config
from tests.test_two_tower import expected_bytes

CFG = ModelConfig()


DTYPES = (torch.float64, torch.float32)


def _tower_worker(rank, world):
    """Both dtypes in one pair of processes (starting processes costs more than the work)."""
    results = {}
    for dtype in DTYPES:
        torch.manual_seed(0)  # every rank draws the same grouped network and keeps its block
        model = DistributedTowerAlexNet(CFG, None, "cpu").to(dtype)
        results[dtype] = exercise(model, CFG, dtype, "tower.")
        cfg = training_check_config(dtype)
        if cfg != CFG:
            torch.manual_seed(0)
            results[dtype]["trained"] = exercise(DistributedTowerAlexNet(cfg, None, "cpu").to(dtype), cfg, dtype, "tower.")
        # NCCL's path (one flat all-gather / reduce-scatter per exchange), over gloo, on the small network
        torch.manual_seed(0)
        small = DistributedTowerAlexNet(SMALL, None, "cpu").to(dtype)
        small.exchange.tensor_collectives = True
        results[dtype]["flat_collectives"] = exercise(small, SMALL, dtype, "tower.")
    return results


@pytest.fixture(scope="module")
def tower_runs(tmp_path_factory):
    return run_distributed(_tower_worker, 2, tmp_path_factory.mktemp("towers"))


@pytest.fixture(scope="module", params=DTYPES, ids=["float64", "float32"])
def forms(request, tower_runs, grouped_reference):
    """dtype, the full-size grouped result, each rank's full-size result, and (grouped, towers mapped
    to the grouped form) on the network that training is compared on (training_check_config)."""
    dtype = request.param
    ranks = [r[dtype] for r in tower_runs]
    cfg = training_check_config(dtype)
    trained_ranks = ranks if cfg == CFG else [r["trained"] for r in ranks]
    mapped = {k: towers_to_grouped([r[k] for r in trained_ranks], cfg) for k in ("grads", "state", "velocity")}
    return dtype, grouped_reference(dtype), ranks, (grouped_reference(dtype, cfg), mapped)


def test_logits_equal_in_eval_and_train_mode(forms):
    dtype, grouped, ranks, _ = forms
    for key in ("eval_logits", "train_logits"):
        assert relative_error(ranks[0][key], grouped[key]) <= TOLERANCE[dtype], key
        assert ranks[1][key].shape == (2, 0)  # tower 1 holds no logits, only the anchor


def test_gradients_equal(forms):
    dtype, _, _, (grouped, mapped) = forms
    assert_same(mapped["grads"], grouped["grads"], dtype, "gradient")


def test_weights_and_velocities_equal_after_steps(forms):
    dtype, _, _, (grouped, mapped) = forms
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
            assert sum(t.nbytes for t in sent if t.phase == phase) == expected_bytes(2, itemsize)[(phase, rank)]



def test_nccl_code_path_over_gloo_equals_grouped(forms, grouped_reference):
    """The flat all-gather / reduce-scatter that NCCL runs, checked on the CPU (this torch's gloo has both)."""
    dtype, _, ranks, _ = forms
    flat = [r["flat_collectives"] for r in ranks]
    grouped = grouped_reference(dtype, SMALL)
    assert relative_error(flat[0]["train_logits"], grouped["train_logits"]) <= TOLERANCE[dtype]
    for key in ("grads", "state", "velocity"):
        assert_same(towers_to_grouped([r[key] for r in flat], SMALL), grouped[key], dtype, key)
