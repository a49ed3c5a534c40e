"""torch.fx taps: names, pre-activation values under in-place ops, exactness, modes, errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import kdgraph
from kdgraph.graph import TraceFailed, UnknownTap, stage_ends, trace


def _bn(c=4):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # non-trivial statistics so that eval-mode BN outputs have negatives
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return bn


class InplaceZoo(nn.Module):
    """Every in-place spelling the taps must survive, each right after the value it would overwrite."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1, self.bn2, self.bn3, self.bn4, self.bn5 = (_bn() for _ in range(5))
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        a = self.act(self.bn1(x))             # nn.ReLU(inplace=True)
        b = F.relu(self.bn2(a), inplace=True)  # F.relu(..., inplace=True)
        c = self.bn3(b)
        c.relu_()                              # Tensor.relu_() with its result unused
        d = self.bn4(c)
        d += c                                 # augmented assignment
        e = torch.relu_(self.bn5(d))           # torch.relu_
        return self.head(e)


def _reference(m, x):
    """The intermediate values of InplaceZoo computed without any in-place op."""
    x = m.conv(x)
    v = {"bn1": m.bn1(x)}
    a = v["bn1"].relu()
    v["bn2"] = m.bn2(a)
    b = v["bn2"].relu()
    v["bn3"] = m.bn3(b)
    c = v["bn3"].relu()
    v["bn4"] = m.bn4(c)
    d = v["bn4"] + c
    v["add"] = d
    v["bn5"] = m.bn5(d)
    return v, m.head(v["bn5"].relu())


def test_names_follow_torchvision_convention():
    names = [r["name"] for r in kdgraph.layers(InplaceZoo(), (3, 8, 8))]
    assert names[:4] == ["conv", "bn1", "act:pre", "act"]
    for expected in ["relu:pre", "relu", "relu_:pre", "relu_", "add", "relu__1:pre", "relu__1", "head"]:
        assert expected in names
    tv = [r["name"] for r in kdgraph.layers(torchvision.models.resnet18(), (3, 32, 32))]
    for expected in ["layer1.0.relu", "layer1.0.relu_1", "layer1.0.add", "layer1.0.relu_1:pre", "layer2",
                     "layer2.0.downsample.1", "fc", "flatten"]:
        assert expected in tv


@pytest.mark.parametrize("train", [False, True])
def test_pre_activation_taps_survive_every_inplace_op(train):
    torch.manual_seed(0)
    m = InplaceZoo().train(train)
    x = torch.randn(3, 3, 8, 8)
    taps = {"act:pre": "bn1", "relu:pre": "bn2", "relu_:pre": "bn3", "add": "add", "relu__1:pre": "bn5",
            "bn4": "bn4"}
    tapped = kdgraph.tap(m, list(taps))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    out, feats = tapped(x)
    m.load_state_dict(state)  # same BN running stats for the reference
    ref, ref_out = _reference(m, x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name, key in taps.items():
        if name in ("act:pre", "relu:pre", "relu_:pre"):
            assert (feats[name] < 0).any(), name  # the case is meaningful: a ReLU would have changed it
        torch.testing.assert_close(feats[name], ref[key], rtol=0, atol=0, msg=name)


def test_only_the_ops_that_would_overwrite_a_tap_are_rewritten():
    m = InplaceZoo().eval()
    gm = kdgraph.tap(m, ["relu:pre"])._graph()
    code = gm.code
    assert "inplace = False" in code        # F.relu after bn2 rewritten ...
    assert "self.act(" in code              # ... while nn.ReLU(inplace=True) keeps its module ...
    assert ".relu_()" in code               # ... and Tensor.relu_ stays in place
    assert m.act.inplace is True            # the user's model is never modified


def test_tapped_output_equals_untouched_model_exactly_in_both_modes():
    torch.manual_seed(0)
    for model in (torchvision.models.resnet18(num_classes=5), InplaceZoo()):
        x = torch.randn(4, 3, 32, 32)
        names = [r["name"] for r in kdgraph.layers(model, (3, 32, 32)) if r["kind"] != "block"][::3]
        tapped = kdgraph.tap(model, names)
        for train in (False, True):
            tapped.train(train)
            torch.manual_seed(1)
            state = {k: v.clone() for k, v in model.state_dict().items()}
            out, feats = tapped(x)
            model.load_state_dict(state)
            assert set(feats) == set(names)
            torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_gradients_reach_parameters_through_taps():
    m = InplaceZoo().train()
    tapped = kdgraph.tap(m, ["act:pre", "relu__1:pre"])
    out, feats = tapped(torch.randn(2, 3, 8, 8))
    (feats["act:pre"].square().mean() + feats["relu__1:pre"].mean()).backward()
    assert m.bn1.weight.grad is not None and m.bn1.weight.grad.abs().sum() > 0
    assert m.conv.weight.grad is not None and m.conv.weight.grad.abs().sum() > 0
    assert m.head.weight.grad is None  # the output was not part of the loss


class Aliased(nn.Module):
    """`+=` through a second name: fx alone traces this as out-of-place and changes the result."""

    def __init__(self):
        super().__init__()
        self.bn = _bn()

    def forward(self, x):
        a = self.bn(x)
        b = a
        b += 1
        return a * 2


class ViewWrite(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = _bn()

    def forward(self, x):
        a = self.bn(x)
        v = a.view(a.shape[0], -1)
        v.mul_(3)
        return a.sum(1)


@pytest.mark.parametrize("cls", [Aliased, ViewWrite])
def test_aliases_and_views_keep_semantics(cls):
    m = cls().eval()
    x = torch.randn(2, 4, 3, 3)
    out, feats = kdgraph.tap(m, ["bn"])(x)
    torch.testing.assert_close(out, m(x), rtol=0, atol=0)
    torch.testing.assert_close(feats["bn"], m.bn(x), rtol=0, atol=0)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        if self.training:
            return y * 2
        return y - 1


def test_models_branching_on_training_use_the_graph_of_their_mode():
    m = Branchy()
    tapped = kdgraph.tap(m, ["lin"])
    x = torch.randn(2, 4)
    assert torch.equal(tapped.train()(x)[0], m.lin(x) * 2)
    assert torch.equal(tapped.eval()(x)[0], m.lin(x) - 1)


def test_unknown_tap_suggests_closest_names():
    with pytest.raises(UnknownTap, match=r"did you mean 'layer1.0.relu:pre'"):
        kdgraph.tap(torchvision.models.resnet18(), ["layer1.0.relu:pr"])
    with pytest.raises(UnknownTap, match="layer2.0.conv1"):
        kdgraph.tap(torchvision.models.resnet18(), ["layer2.0.comv1"])


class Untraceable(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class HasUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.body = nn.Sequential(nn.Identity(), Untraceable())
        self.out = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.out(self.body(self.stem(x)))


def test_untraceable_module_is_named_with_the_fix():
    m = HasUntraceable()
    with pytest.raises(TraceFailed, match=r"(?s)'body\.1' \(Untraceable\).*trace\.leaf_modules"):
        kdgraph.layers(m, (3, 4, 4))
    for leaf in ("body.1", "Untraceable"):
        rows = kdgraph.layers(m, (3, 4, 4), leaf_modules=[leaf])
        assert "body.1" in [r["name"] for r in rows]
        out, feats = kdgraph.tap(m, ["body.1", "stem"], leaf_modules=[leaf])(torch.ones(1, 3, 4, 4))
        assert torch.equal(out, m(torch.ones(1, 3, 4, 4)))


def test_layers_of_a_big_model_use_fake_tensors():
    m = torchvision.models.resnet50()
    rows = kdgraph.layers(m, (3, 224, 224))
    by = {r["name"]: r for r in rows}
    assert by["layer4"]["shape"] == (2048, 7, 7)
    assert by["layer1.0.relu_2:pre"]["shape"] == (256, 56, 56)
    assert by["fc"]["shape"] == (1000,)


def test_stage_ends():
    rows = kdgraph.layers(torchvision.models.resnet18(), (3, 64, 64))
    assert stage_ends(rows, pre=False) == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert stage_ends(rows, pre=True)[1:] == [f"layer{i}.1.relu_1:pre" for i in range(1, 5)]


def test_trace_is_per_mode_and_reports_modules():
    traced = trace(torchvision.models.resnet18())
    assert "layer1.0" in traced.modules and "layer1.0.relu_1" in traced.nodes


def test_layers_leaves_every_buffer_of_a_training_model_untouched():
    from kdgraph.models import build_model

    model = build_model("wrn-10-1", num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kdgraph.layers(model, (3, 16, 16))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # num_batches_tracked included
