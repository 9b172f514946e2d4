"""Shapes and parameters of the network against the paper's Figure 2 (section 3.5, docs/paper.md), and its
initialisation (section 5)."""

import pytest
import torch

from repro import AlexNet, ModelConfig, TwoTowerAlexNet
from repro.config import MODEL_VARIANTS
from repro.model.tower import Tower

GROUPED_SHAPES = {  # per image, after each layer (paper section 3.5)
    "conv1": (96, 55, 55), "lrn1": (96, 55, 55), "pool1": (96, 27, 27),
    "conv2": (256, 27, 27), "lrn2": (256, 27, 27), "pool2": (256, 13, 13),
    "conv3": (384, 13, 13), "conv4": (384, 13, 13), "conv5": (256, 13, 13), "pool5": (256, 6, 6),
    "fc6": (4096,), "fc7": (4096,), "fc8": (1000,),
}
WEIGHT_SHAPES = {  # grouped form (paper section 3.5, both towers side by side)
    "conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
    "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3), "fc6": (4096, 9216),
    "fc7": (4096, 4096), "fc8": (1000, 4096),
}


def record_shapes(model, modules: dict, x):
    shapes, pools = {}, []

    def hook(name):
        def fn(_module, _inp, out):
            if name == "pool":
                pools.append(tuple(out.shape[1:]))
            else:
                shapes[name] = tuple(out.shape[1:])
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    shapes.update(zip(("pool1", "pool2", "pool5"), pools))
    return shapes


NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "lrn1", "lrn2", "pool")


def test_grouped_shapes_after_every_layer():
    model = AlexNet()
    shapes = record_shapes(model, {n: getattr(model, n) for n in NAMES + ("fc8",)}, torch.randn(2, 3, 227, 227))
    assert shapes == GROUPED_SHAPES


def test_tower_shapes_after_every_layer_are_halves():
    net = TwoTowerAlexNet(devices=("cpu", "cpu"))
    for t, tower in enumerate(net.towers):
        names = NAMES + (("fc8",) if t == 0 else ())
        shapes = record_shapes(net, {n: getattr(tower, n) for n in names}, torch.randn(2, 3, 227, 227))
        expected = {n: (s[0] // 2,) + s[1:] for n, s in GROUPED_SHAPES.items() if n != "fc8"}
        if t == 0:
            expected["fc8"] = (1000,)
        assert shapes == expected


def test_parameter_shapes_and_count():
    model = AlexNet()
    for name, shape in WEIGHT_SHAPES.items():
        assert tuple(getattr(model, name).weight.shape) == shape
        assert tuple(getattr(model, name).bias.shape) == (shape[0],)
    assert sum(p.numel() for p in model.parameters()) == 60_965_224
    towers = [Tower(ModelConfig(), t) for t in (0, 1)]
    assert sum(p.numel() for t in towers for p in t.parameters()) == 60_965_224
    assert towers[1].fc8 is None and towers[0].conv3.weight.shape == (192, 256, 3, 3)


def test_variants_are_configurations():
    assert MODEL_VARIANTS["cuda-convnet-2012"](1000).lrn.sum_scale == pytest.approx(2e-5)
    one = AlexNet(config=MODEL_VARIANTS["one-tower"](1000))
    assert one.conv2.groups == 1 and one.conv5.out_channels == 256 and one.fc6.in_features == 9216
    assert AlexNet(config=MODEL_VARIANTS["no-lrn"](10))(torch.randn(1, 3, 227, 227)).shape == (1, 10)
    assert ModelConfig(pool_kernel=2, pool_stride=2).feature_sizes() == (55, 27, 13, 13, 6)


def test_paper_initialisation():
    torch.manual_seed(1)
    model = AlexNet()
    for name in WEIGHT_SHAPES:
        w, b = getattr(model, name).weight, getattr(model, name).bias
        assert abs(w.std().item() - 0.01) < 0.0005 and abs(w.mean().item()) < 0.001
        expected = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.equal(b, torch.full_like(b, expected))


def test_a_seed_gives_the_paper_draws_and_nothing_else():
    """The weights are the seed's first normal draws, layer by layer in the table's order: no default
    initialisation runs first (it would shift the stream), and no parameter is left unwritten."""
    cfg = ModelConfig(num_classes=10, image_size=67)
    torch.manual_seed(3)
    model = AlexNet(config=cfg)
    torch.manual_seed(3)
    for name in WEIGHT_SHAPES:  # the table's order; every std is 0.01 in the paper's config
        w = getattr(model, name).weight
        assert torch.equal(w, torch.empty_like(w).normal_(0.0, 0.01)), name
    torch.manual_seed(4)
    tower = Tower(cfg, 1)  # built alone (not from a grouped draw): its own layers' paper draws
    torch.manual_seed(4)
    for name in list(WEIGHT_SHAPES)[:-1]:  # tower 1 holds no fc8
        w = getattr(tower, name).weight
        assert torch.equal(w, torch.empty_like(w).normal_(0.0, 0.01)), name
    assert torch.equal(tower.conv2.bias, torch.ones(128)) and torch.equal(tower.conv1.bias, torch.zeros(48))


def test_bad_configurations_fail_clearly():
    with pytest.raises(ValueError, match="too small.*at least 67"):
        ModelConfig(image_size=66)
    ModelConfig(image_size=67)
    with pytest.raises(ValueError, match="too small.*at least 39"):  # 2/2 pooling shrinks less
        ModelConfig(image_size=38, pool_kernel=2, pool_stride=2)
    ModelConfig(image_size=39, pool_kernel=2, pool_stride=2)
    with pytest.raises(ValueError, match="contradicts"):
        AlexNet(10, config=ModelConfig(num_classes=5))
    with pytest.raises(ValueError, match="2-tower"):
        TwoTowerAlexNet(devices=("cpu",))


def test_small_input_keeps_every_layer():
    cfg = ModelConfig(num_classes=10, image_size=67)
    assert cfg.feature_sizes() == (15, 7, 3, 3, 1)
    assert AlexNet(config=cfg)(torch.randn(2, 3, 67, 67)).shape == (2, 10)


def test_channels_last_and_compile_trace_without_graph_breaks():
    cfg = ModelConfig(num_classes=10, image_size=67)
    for net in (AlexNet(config=cfg), TwoTowerAlexNet(devices=("cpu", "cpu"), config=cfg)):
        net = net.to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 67, 67).to(memory_format=torch.channels_last) * 30
        state = {k: v.clone() for k, v in net.state_dict().items()}
        compiled = torch.compile(net, backend="aot_eager", fullgraph=True)  # fullgraph: breaks raise
        y = compiled(x)
        y.square().sum().backward()
        fc6 = net.fc6 if hasattr(net, "fc6") else net.towers[1].fc6
        grad = fc6.weight.grad.clone()
        net.load_state_dict(state)  # same weights and dropout counters: the same masks
        net.zero_grad()
        y_eager = net(x)
        y_eager.square().sum().backward()
        grad_eager = fc6.weight.grad
        torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, grad_eager, rtol=1e-4, atol=1e-6)


def test_variant_names_are_recognised_from_configs():
    import dataclasses

    from repro.config import MODEL_VARIANTS, variant_name

    for name, make in MODEL_VARIANTS.items():
        assert variant_name(make(10)) == name
        assert variant_name(dataclasses.replace(make(10), image_size=67)) == name  # input size is the data's
    assert variant_name(dataclasses.replace(ModelConfig(), dropout_scaling="inverted")) == "custom"
    small = dataclasses.replace(MODEL_VARIANTS["non-overlapping-pool"](10), image_size=43)  # too small for 3/2
    assert variant_name(small) == "non-overlapping-pool"
