"""An independent forward pass, written here from the paper's text (sections 3.1-3.5, 4.2) and the 2012
code's layers-145.cfg with plain torch.nn.functional and loops, never from repro's modules, against the
network in eval mode in float64 for every variant. The facts are written out below, not read from the
configuration, so a layer in the wrong place, the wrong pooling, a ReLU on the wrong side of the LRN or
dropout's test-time scaling elsewhere fails; the mutation tests show that each of these is caught."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from repro import AlexNet
from repro.config import MODEL_VARIANTS, TowerWidths

# What each variant is, written from the paper and the 2012 config rather than from ModelConfig.
PAPER = dict(size=227, towers=2, pool=(3, 2), lrn_scale=1e-4, relu1="before LRN", same_map=False, pad=0)
FACTS = {
    "paper": PAPER,
    # layers-145.cfg / layer-params-145.cfg: 224 input, conv1 sized by ceil (3 zero pixels right and
    # bottom), LRN scale 0.0001 divided by size 5 (layer.py), ReLU after pool1, cnorm2 after rnorm2.
    "cuda-convnet-2012": dict(PAPER, size=224, lrn_scale=1e-4 / 5, relu1="after pool", same_map=True, pad=3),
    "no-lrn": dict(PAPER, lrn_scale=None),  # section 3.3's ablation
    "non-overlapping-pool": dict(PAPER, pool=(2, 2)),  # section 3.4: z = s = 2
    "one-tower": dict(PAPER, towers=1),  # section 3.2
}
NARROW = TowerWidths(conv1=8, conv2=12, conv3=8, conv4=8, conv5=6, fc6=16, fc7=16)  # a cheap forward


def lrn(a: torch.Tensor, scale: float, n: int = 5, k: float = 2.0, beta: float = 0.75) -> torch.Tensor:
    """Section 3.3: b_i = a_i / (k + scale * sum_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j^2)^beta."""
    channels = a.shape[1]
    out = torch.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        out[:, i] = a[:, i] / (k + scale * a[:, lo:hi + 1].square().sum(1)) ** beta
    return out


def same_map_norm(a: torch.Tensor, size: int = 5, scale: float = 0.001, power: float = 0.75) -> torch.Tensor:
    """The 2012 code's cnorm2: 1 + scale / size^2 * the sum of squares over the clipped size x size window."""
    r = size // 2
    padded = F.pad(a.square(), (r, r, r, r))
    h, w = a.shape[-2:]
    sums = sum(padded[..., dy:dy + h, dx:dx + w] for dy in range(size) for dx in range(size))
    return a / (1 + scale / size ** 2 * sums) ** power


def reference_forward(state: dict, image: torch.Tensor, facts: dict, mutate: str = "") -> torch.Tensor:
    """Figure 2, tower by tower: tower t holds block t of every layer's outputs; conv3, fc6, fc7 and fc8
    read every tower. `mutate` plants one known error, for the tests that show it is caught."""
    t = facts["towers"]
    k, s = (2, 2) if mutate == "pool 2x2/2" else facts["pool"]
    pool = lambda x: F.max_pool2d(x, k, s)  # noqa: E731

    def layer(name, inputs, reads_all, **conv):
        w, b = state[f"{name}.weight"].chunk(t), state[f"{name}.bias"].chunk(t)
        x = [torch.cat(inputs, 1)] * t if reads_all else inputs
        return [(F.conv2d(x[i], w[i], b[i], **conv) if conv else F.linear(x[i], w[i], b[i])) for i in range(t)]

    def norm(x):
        return lrn(x, facts["lrn_scale"]) if facts["lrn_scale"] is not None else x

    pad = facts["pad"]
    x = F.pad(image, (pad, 0, pad, 0) if mutate == "pad left/top" else (0, pad, 0, pad))
    x = layer("conv1", [x] * t, False, stride=4)
    if facts["relu1"] == "before LRN" and mutate != "ReLU after LRN":
        x = [pool(norm(F.relu(a))) for a in x]
    elif facts["relu1"] == "before LRN":
        x = [pool(F.relu(norm(a))) for a in x]
    else:
        x = [F.relu(pool(norm(a))) for a in x]
    x = [norm(F.relu(a)) for a in layer("conv2", x, False, padding=2)]
    x = [pool(same_map_norm(a) if facts["same_map"] else a) for a in x]
    x = [F.relu(a) for a in layer("conv3", x, True, padding=1)]
    x = [F.relu(a) for a in layer("conv4", x, False, padding=1)]
    x = [pool(F.relu(a)).flatten(1) for a in layer("conv5", x, False, padding=1)]
    keep = 0.5  # section 4.2: at test time every unit is used and its output multiplied by 0.5
    if mutate == "dropout on pool5":
        x, keep = [a * 0.5 for a in x], 1.0
    x = [F.relu(a) * keep for a in layer("fc6", x, True)]
    x = [F.relu(a) * keep for a in layer("fc7", x, True)]
    return F.linear(torch.cat(x, 1), state["fc8.weight"], state["fc8.bias"])


def network(name: str) -> tuple[AlexNet, torch.Tensor]:
    cfg = dataclasses.replace(MODEL_VARIANTS[name](10), widths=NARROW)
    torch.manual_seed(0)
    net = AlexNet(config=cfg).double().eval()
    with torch.no_grad():  # weights large enough that every normalisation and ReLU matters
        for p in net.parameters():
            p.normal_(0.0, 0.1) if p.ndim > 1 else p.uniform_(-1.0, 1.0)
    size = FACTS[name]["size"]
    image = torch.randn(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 50
    return net, image


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).abs().max() <= 1e-10 * b.abs().max()).item())


@pytest.mark.parametrize("name", list(MODEL_VARIANTS))
def test_network_equals_the_reference_in_eval_mode(name):
    assert set(FACTS) == set(MODEL_VARIANTS)  # a new variant needs its facts here
    net, image = network(name)
    with torch.no_grad():
        got, expected = net(image), reference_forward(net.state_dict(), image, FACTS[name])
    assert expected.abs().max() > 1e-3  # a forward that carries signal to the logits
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())


@pytest.mark.parametrize("name,mutation", [("paper", "pool 2x2/2"), ("paper", "ReLU after LRN"),
                                           ("paper", "dropout on pool5"), ("cuda-convnet-2012", "pad left/top"),
                                           ("cuda-convnet-2012", "pool 2x2/2")])
def test_each_planted_error_is_caught(name, mutation):
    """2x2/2 pooling gives the same sizes as 3x3/2; the ReLU after the LRN and dropout's scaling before
    fc6 keep every shape too: only values tell them apart."""
    net, image = network(name)
    with torch.no_grad():
        got = net(image)
        assert _close(got, reference_forward(net.state_dict(), image, FACTS[name]))
        assert not _close(got, reference_forward(net.state_dict(), image, FACTS[name], mutation))


@pytest.mark.parametrize("switch", ["conv1_ceil", "relu1_after_pool", "same_map_norm2"])
def test_each_2012_network_switch_matters(switch):
    """The 2012 network with one of its switches off is not the 2012 reference (conv1_ceil off: 54x54
    conv1 outputs at 224, so pool5 is 5x5 and the 2012 weights do not even fit fc6)."""
    net, image = network("cuda-convnet-2012")
    state = net.state_dict()
    cfg = dataclasses.replace(net.config, **{switch: False})
    other = AlexNet(config=cfg).double().eval()
    if switch == "conv1_ceil":
        assert cfg.feature_sizes() == (54, 26, 12, 12, 5) and cfg.conv1_padding() == 0
        with pytest.raises(RuntimeError, match="fc6.weight"):
            other.load_state_dict(state)
        return
    other.load_state_dict(state)
    with torch.no_grad():
        assert not _close(other(image), reference_forward(state, image, FACTS["cuda-convnet-2012"]))


def test_dropout_in_training_zeroes_fc6_and_fc7_outputs_only():
    """Section 4.2: dropout on the outputs of the first two fully connected layers, kept units unscaled."""
    net, image = network("paper")
    net.train()
    seen = {}
    for name in ("fc6", "drop6", "fc7", "drop7", "conv5", "fc8"):
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
    with torch.no_grad():
        net(image[:1])
    for fc, drop in (("fc6", "drop6"), ("fc7", "drop7")):
        before, after = seen[drop]
        kept = after != 0
        assert torch.equal(before, F.relu(seen[fc][1]))  # dropout acts on the ReLU's output ...
        assert torch.equal(after[kept], before[kept])  # ... keeps units unscaled ...
        assert 0.3 < (kept.sum() / (before != 0).sum()).item() < 0.7  # ... and drops about half
    assert torch.equal(seen["fc8"][0], seen["drop7"][1])  # fc8 reads drop7's output
