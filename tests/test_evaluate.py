"""Errors against an independent computation; the ten-patch and ensemble averaging of softmaxes."""

import numpy as np
import pytest
import torch

from repro.config import DataConfig
from repro.data.augment import Augment, Stats
from repro.data.tensor_source import TensorSource
from repro.evaluate import Counts, EvalSpec, evaluate, patch_softmax


def numpy_errors(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    order = np.argsort(-probs, axis=1, kind="stable")
    top1 = np.mean(order[:, 0] != labels) * 100
    top5 = np.mean([labels[i] not in order[i, :5] for i in range(len(labels))]) * 100
    return top1, top5


def test_counts_match_independent_errors():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(500, 20, generator=g).softmax(1)
    labels = torch.randint(0, 20, (500,), generator=g)
    c = Counts()
    c.add(probs[:200], labels[:200])
    c.add(probs[200:], labels[200:])
    top1, top5 = numpy_errors(probs.numpy(), labels.numpy())
    assert c.images == 500 and c.top1_error == pytest.approx(top1) and c.top5_error == pytest.approx(top5)
    assert c.loss == pytest.approx(-probs[torch.arange(500), labels].log().mean().item(), rel=1e-6)
    assert Counts.from_list(c.as_list()) == c


def test_fewer_than_five_classes_makes_top5_trivial():
    c = Counts()
    c.add(torch.tensor([[0.6, 0.3, 0.1]]), torch.tensor([2]))
    assert c.top1_error == 100.0 and c.top5_error == 0.0


def test_ten_patch_and_ensemble_average_softmax_outputs():
    x = torch.arange(4 * 10, dtype=torch.float32).view(40, 1, 1, 1)  # row r: image r // 10, patch r % 10

    def model_a(inp):
        r = inp.flatten(1)[:, 0]
        return torch.stack([r % 10, torch.zeros_like(r), -(r % 3)], dim=1)

    def model_b(inp):
        return torch.ones(inp.shape[0], 3)

    got = patch_softmax([model_a, model_b], [x, x], crops=10)  # (image, patch, class), models averaged
    per_patch = (model_a(x).softmax(1).view(4, 10, 3) + 1 / 3) / 2
    torch.testing.assert_close(got, per_patch)
    assert patch_softmax([lambda inp: inp.new_empty(inp.shape[0], 0)], [x], 10) is None  # tower 1


def test_evaluate_scores_a_known_model_on_known_data():
    # Image brightness encodes the class; the "model" reads it back through the real pipeline.
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 3])
    images = (labels * 20 + 10).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 28, 28, 1).contiguous()
    src = TensorSource(images, labels, [str(i) for i in range(10)], "toy/val")
    aug = Augment(DataConfig(mean="none", pca="none"), None)

    def model(x):  # x: (B, 3, 227, 227) pixels; predicts class (brightness - 10) / 20, but 7 -> 1
        cls = ((x[:, 0, 100, 100] - 10) / 20).round().long()
        cls = torch.where(cls == 7, torch.ones_like(cls), cls)
        return torch.nn.functional.one_hot(cls, 10).float() * 10

    for crops in ((1,), (10,), (1, 10)):
        results = evaluate([model], src, torch.arange(11), aug, EvalSpec(crops=crops, batch_size=4, workers=0))
        assert list(results) == list(crops)
        for c in results.values():
            assert c.images == 11 and c.top1_correct == 10 and c.top5_correct == 11
    with pytest.raises(ValueError, match="1 and/or 10"):
        evaluate([model], src, torch.arange(11), aug, EvalSpec(crops=(5,), workers=0))


def test_centre_patch_is_one_of_the_ten():
    """With both protocols, the centre patch's tally comes from the ten-patch pass: the same input rows
    as a centre-patch pass, so the same counts as scoring it on its own."""
    from repro.data.augment import TEN_CROP_CENTRE

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (9, 40, 50, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (9,), generator=g)
    src = TensorSource(images, labels, ["a", "b", "c", "d"], "toy/val")
    cfg = DataConfig(base_size=32, crop_size=24, pca="none")
    aug = Augment(cfg, Stats(mean_image=torch.rand(32, 32, 3) * 255, eigvals=torch.ones(3), eigvecs=torch.eye(3), images=9))
    ten, centre = aug.eval_batch(images, 10), aug.eval_batch(images, 1)
    assert torch.equal(ten.view(9, 10, 3, 24, 24)[:, TEN_CROP_CENTRE], centre)
    assert not torch.equal(ten.view(9, 10, 3, 24, 24)[:, 0], centre)  # a corner is not the centre

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 24 * 24, 4))
    spec = dict(batch_size=4, workers=0)
    both = evaluate([net], src, torch.arange(9), aug, EvalSpec(crops=(1, 10), **spec))
    alone = {c: evaluate([net], src, torch.arange(9), aug, EvalSpec(crops=(c,), **spec))[c] for c in (1, 10)}
    for c in (1, 10):
        assert (both[c].images, both[c].top1_correct, both[c].top5_correct) == \
            (alone[c].images, alone[c].top1_correct, alone[c].top5_correct)
        assert both[c].loss == pytest.approx(alone[c].loss, rel=1e-6)
    assert both[1].loss != pytest.approx(both[10].loss, rel=1e-6)  # the protocols did differ
