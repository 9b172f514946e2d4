"""Two pairs (4 gloo processes): model parallel inside each pair, data parallel across pairs. The
replicas must end equal to the grouped network trained on both pairs' images at once."""

import torch
import torch.nn.functional as F

from repro import AlexNet, ModelConfig
from repro.config import OptimConfig
from repro.model.convert import towers_to_grouped
from repro.optim import paper_optimizer
from tests.conftest import SMALL_FC, run_distributed

# masks are per replica: dropout left out
CFG = ModelConfig(num_classes=10, image_size=67, dropout=0.0, widths=SMALL_FC)
STEPS = 2


def pair_batch(pair: int, step: int):
    g = torch.Generator().manual_seed(100 * step + pair)
    x = (torch.rand(3, 3, 67, 67, generator=g, dtype=torch.float64) - 0.5) * 255
    return x, torch.randint(0, 10, (3,), generator=g)


UNEVEN = {(0, 0): 3, (1, 0): 2, (0, 1): 3, (1, 1): 0}  # (pair, step) -> images left after unreadable ones


def uneven_batch(pair: int, step: int):
    x, y = pair_batch(pair, step)
    n = UNEVEN[pair, step]
    return x[:n], y[:n]


def _worker(rank, world, uneven=False):
    from repro.dist import init_topology
    from repro.parallel import Replica

    torch.set_default_dtype(torch.float64)
    topo = init_topology("cpu")
    assert (topo.tower, topo.replica, topo.replicas) == (rank % 2, rank // 2, 2)
    torch.manual_seed(0)
    replica = Replica(topo, CFG)
    opt = paper_optimizer(replica.net, OptimConfig(lr=0.001))
    for step in range(STEPS):
        opt.zero_grad()
        if uneven:
            replica.union_loss(*uneven_batch(topo.replica, step))[0].backward()
        else:
            x, y = pair_batch(topo.replica, step)
            replica.loss(replica.train_module(x), y).backward()
        opt.step()
    return {k[len("tower."):]: v.detach().clone() for k, v in replica.net.state_dict().items()}


def _grouped_run(loss_of_step):
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # drawn in float64, as the workers draw it
    try:
        model = AlexNet(config=CFG)
    finally:
        torch.set_default_dtype(previous)
    opt = paper_optimizer(model, OptimConfig(lr=0.001))
    for step in range(STEPS):
        opt.zero_grad()
        loss_of_step(model, step).backward()
        opt.step()
    return model.state_dict()


def _assert_pairs_equal(states, expected):
    for pair in (0, 1):
        got = towers_to_grouped([states[2 * pair], states[2 * pair + 1]], CFG)
        for name, value in expected.items():
            if not value.is_floating_point():  # dropout step counters
                assert torch.equal(got[name], value), name
                continue
            err = ((got[name] - value).norm() / value.norm().clamp_min(1e-300)).item()
            assert err < 1e-10, f"pair {pair} {name}: relative error {err:.3g}"


def test_pairs_average_gradients_like_one_big_batch(tmp_path):
    states = run_distributed(_worker, 4, tmp_path)
    # DDP averages the two pairs' gradients: the mean of the two per-pair mean losses.
    _assert_pairs_equal(states, _grouped_run(
        lambda model, step: sum(F.cross_entropy(model(x), y) for x, y in (pair_batch(p, step) for p in (0, 1))) / 2))


def test_uneven_batches_give_the_mean_over_the_union_and_an_empty_pair_still_steps(tmp_path):
    """Unreadable images leave pairs with 3 and 2 images, then 3 and none: the update is the mean over
    the images there are, and the pair with none joins the step instead of leaving the others waiting."""
    states = run_distributed(_worker, 4, tmp_path, True)

    def union_mean(model, step):
        xs, ys = zip(*(uneven_batch(p, step) for p in (0, 1)))
        return F.cross_entropy(model(torch.cat(xs)), torch.cat(ys))

    _assert_pairs_equal(states, _grouped_run(union_mean))
