"""The fully connected layers' bfloat16 weights kept through a CPU evaluation pass (repro/model/linear.py):
the same bits as autocast's own cast, only inside the pass, and never a stale copy there."""

import torch
from torch import nn

from repro.config import DataConfig
from repro.data.augment import Augment, Stats
from repro.data.tensor_source import TensorSource
from repro.evaluate import EvalSpec, evaluate
from repro.model.grouped import AlexNet
from repro.model.linear import Linear, bf16_weights_kept


def _pair(seed=0):
    torch.manual_seed(seed)
    ours = Linear(64, 32)
    plain = nn.Linear(64, 32)
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def _eval(layer, x):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return layer(x)


def test_inside_the_pass_the_cast_is_made_once_and_gives_autocasts_bits():
    ours, plain = _pair()
    x = torch.randn(8, 64)
    assert list(ours.state_dict()) == list(plain.state_dict())
    assert torch.equal(_eval(ours, x), _eval(plain, x)) and ours._bf16 is None  # outside: autocast's own cast
    with bf16_weights_kept(ours):
        assert torch.equal(_eval(ours, x), _eval(plain, x))
        kept = ours._bf16[2]
        assert torch.equal(_eval(ours, x), _eval(plain, x)) and ours._bf16[2] is kept  # reused
    assert ours._bf16 is None and not ours.keep_bf16  # gone at the end of the pass


def test_a_changed_weight_is_cast_again_even_inside_the_pass():
    """The guard for a caller that breaks the promise with a change torch can see: in place on the
    parameter (an optimiser's step), load_state_dict, and a new tensor put in as .data (version 0 again)."""
    ours, plain = _pair()
    x = torch.randn(8, 64)
    changes = [lambda layer: layer.weight.mul_(1.5),
               lambda layer: layer.load_state_dict({"weight": torch.randn(32, 64), "bias": torch.randn(32)}),
               lambda layer: setattr(layer.weight, "data", torch.randn(32, 64))]
    with bf16_weights_kept(ours):
        _eval(ours, x)
        for change in changes:
            kept = ours._bf16[2]
            with torch.no_grad():
                change(ours)
            plain.load_state_dict(ours.state_dict())
            y = _eval(ours, x)
            assert ours._bf16[2] is not kept
            assert torch.equal(y, _eval(plain, x))


def test_a_forward_that_wants_gradients_takes_autocasts_path():
    ours, plain = _pair()
    x = torch.randn(8, 64)
    with bf16_weights_kept(ours), torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_plain = ours(x), plain(x)
    assert ours._bf16 is None and torch.equal(y, y_plain)
    y.float().sum().backward()
    y_plain.float().sum().backward()
    assert torch.equal(ours.weight.grad, plain.weight.grad)
    with bf16_weights_kept(ours.double()), torch.no_grad():
        assert ours(x.double()).dtype == torch.float64 and ours._bf16 is None  # float64, no autocast: no copy


def test_the_evaluation_pass_keeps_the_casts_and_scores_as_plain_layers_do():
    """evaluate() under --amp bf16: the grouped network's fc layers reuse one cast per pass, the counts equal
    those of a twin with plain nn.Linear layers, and after the pass nothing is kept."""
    torch.manual_seed(0)
    net = AlexNet(num_classes=4).eval()
    twin = AlexNet(num_classes=4).eval()
    for name in ("fc6", "fc7", "fc8"):
        old = getattr(twin, name)
        setattr(twin, name, nn.Linear(old.in_features, old.out_features))
    twin.load_state_dict(net.state_dict())
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 232, 232, 3), dtype=torch.uint8, generator=g)
    src = TensorSource(images, torch.randint(0, 4, (6,), generator=g), ["a", "b", "c", "d"], "toy/val")
    aug = Augment(DataConfig(base_size=232, crop_size=227, pca="none"),
                  Stats(mean_image=torch.full((232, 232, 3), 128.0), eigvals=torch.ones(3), eigvecs=torch.eye(3), images=6))
    casts = []
    real = torch.Tensor.to
    spec = EvalSpec(crops=(1,), batch_size=2, workers=0, amp="bf16")
    try:
        torch.Tensor.to = lambda t, *a, **k: (casts.append(tuple(t.shape)) if t.dim() == 2 else None) \
            or real(t, *a, **k)
        ours = evaluate([net], src, torch.arange(6), aug, spec)[1]
    finally:
        torch.Tensor.to = real
    assert casts.count((4096, 9216)) == 1  # fc6's weight, once for three batches
    theirs = evaluate([twin], src, torch.arange(6), aug, spec)[1]
    assert (ours.images, ours.top1_correct, ours.top5_correct, ours.loss) == \
        (theirs.images, theirs.top1_correct, theirs.top5_correct, theirs.loss)
    assert all(m._bf16 is None and not m.keep_bf16 for m in net.modules() if isinstance(m, Linear))
