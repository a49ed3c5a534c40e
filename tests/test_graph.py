"""Taps: names, pre-activation values under in-place ops, exactness through any alias, modes, no side
effects, errors, torch.export and Hugging Face models."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import kdgraph
from kdgraph.graph import TraceFailed, UnknownTap, stage_ends, trace, tracing
from tests.tapcheck import interpreter_reference


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
    tapped = kdgraph.tap(m, ["relu:pre"])
    tapped(torch.randn(2, 3, 8, 8))
    assert list(tapped.how.values()) == [{"relu:pre": "out-of-place"}]
    code = next(iter(tapped._graphs.values())).code
    assert "inplace = False" in code        # F.relu after bn2 rewritten ...
    assert ".act(" in code                  # ... while nn.ReLU(inplace=True) keeps its module ...
    assert ".relu_()" in code               # ... and Tensor.relu_ stays in place
    assert "clone" not in code              # ... and nothing is copied
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
    with pytest.raises(TraceFailed, match=r"(?s)Untraceable \(first at 'body\.1'.*trace\.leaf_modules: \[Untraceable\]"):
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
    assert "layer1.0" in traced.modules and "layer1.0.relu_1" in traced.taps
    assert traced.resolve("layer1.0.relu_1:pre") is traced.taps["layer1.0.add"].node


def test_layers_leaves_every_buffer_of_a_training_model_untouched():
    from kdgraph.models import build_model

    model = build_model("wrn-10-1", num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kdgraph.layers(model, (3, 16, 16))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # num_batches_tracked included


# ------------------------------------------------------------------ every class of alias bug in issue 12
def _hook_clone(model, path, x, pre=False):
    """The value of module ``path``'s output (or input) cloned when produced, by a hook on a deep copy."""
    model = copy.deepcopy(model)
    got = []
    module = model.get_submodule(path)
    if pre:
        module.register_forward_pre_hook(lambda m, args: got.append(args[0].clone()))
    else:
        module.register_forward_hook(lambda m, args, out: got.append(out.clone()))
    torch.manual_seed(0)
    out = model(x)
    return got[0], out


@pytest.mark.parametrize("train", [False, True])
def test_efficientnet_stochastic_depth_alias(train):
    """torchvision's stochastic_depth returns its input in eval mode; the block's `result += input` then
    wrote through that alias into the tapped projection."""
    m = torchvision.models.efficientnet_b0(num_classes=5).train(train)
    x = torch.randn(2, 3, 32, 32)
    ref, ref_out = _hook_clone(m, "features.2.1.block.3", x)
    tapped = kdgraph.tap(m, ["features.2.1.block.3", "features.2.1.stochastic_depth"])
    torch.manual_seed(0)
    out, feats = tapped(x)
    assert torch.equal(out, ref_out)
    assert torch.equal(feats["features.2.1.block.3"], ref)
    if not train:
        assert torch.equal(feats["features.2.1.stochastic_depth"], ref)


@pytest.mark.parametrize("train", [False, True])
def test_convnext_layer_scale(train):
    m = torchvision.models.convnext_tiny(num_classes=5).train(train)
    with torch.no_grad():
        m.features[1][0].layer_scale.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    block = m.features[1][0]
    got = []
    block.register_forward_hook(lambda mod, args, out: got.append(out.clone()))
    torch.manual_seed(0)
    ref_out = copy.deepcopy(m)(x)
    block._forward_hooks.clear()
    inp = []
    block.register_forward_pre_hook(lambda mod, args: inp.append(args[0].clone()))
    copy.deepcopy(m)(x)
    block._forward_pre_hooks.clear()
    torch.manual_seed(0)
    out, feats = kdgraph.tap(m, ["features.1.0.mul", "features.1.0"])(x)
    assert torch.equal(out, ref_out)
    if not train:  # stochastic depth with p = 0 in eval: the block output is input + layer scale
        assert torch.equal(feats["features.1.0.mul"], got[0] - inp[0]) or torch.allclose(
            feats["features.1.0.mul"], got[0] - inp[0], atol=1e-6)
    assert not torch.equal(feats["features.1.0.mul"], feats["features.1.0"])


class AliasZoo(nn.Module):
    """A tap on ``bn`` that the rest of the forward overwrites through an alias, spelled in many ways."""

    def __init__(self, how):
        super().__init__()
        self.how, self.bn, self.drop, self.head = how, _bn(), nn.Dropout(0.5), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.bn(x)
        if self.how == "dropout":
            y = self.drop(y)              # eval mode: returns y itself
            y += 1
        elif self.how == "float":
            y.float().relu_()             # no-op cast: the same tensor
        elif self.how == "to":
            y.to(torch.float32).mul_(2)
        elif self.how == "swapdims":
            y.swapdims(1, 2).mul_(3)
        elif self.how == "tensor_split":
            y.tensor_split(2, dim=1)[0].zero_()
        elif self.how == "mT":
            y.mT.add_(1)
        elif self.how == "data":          # no version bump: found by content
            y.data.mul_(-1)
        elif self.how == "cat":           # readers inside a list
            y.relu_()
            return self.head(torch.cat([y, y], 1)[:, :4])
        elif self.how == "slice":         # slicing after the rewritten op
            y.relu_()
            return self.head(y[:, :4, 1:])
        elif self.how == "kwargs":
            y.relu_()
            return self.head(torch.add(input=y, other=y))
        return self.head(y)


ALIAS_CASES = ["dropout", "float", "to", "swapdims", "tensor_split", "mT", "data", "cat", "slice", "kwargs"]


@pytest.mark.parametrize("how", ALIAS_CASES)
def test_writes_through_any_alias_never_reach_a_tap(how):
    m = AliasZoo(how).eval()
    x = torch.randn(2, 4, 5, 5)
    ref, ref_out = _hook_clone(m, "bn", x)
    tapped = kdgraph.tap(m, ["bn"], check=True)
    out, feats = tapped(x)
    assert torch.equal(out, ref_out)
    assert torch.equal(feats["bn"], ref)
    out, feats = tapped(x)  # the steady state, with its per-forward check
    assert torch.equal(out, ref_out) and torch.equal(feats["bn"], ref)
    decision = next(iter(tapped.how.values()))["bn"]
    # the same tensor object (aliases by identity): rewritten; an older view read later, or .data: copied
    assert decision == ("copied" if how in ("swapdims", "tensor_split", "mT", "data") else "out-of-place"), decision


class FlattenLater(nn.Module):
    def __init__(self, reads_view_after: bool):
        super().__init__()
        self.bn, self.reads = _bn(), reads_view_after

    def forward(self, x):
        y = self.bn(x)
        f = y.flatten(1)
        y.relu_()
        return f.sum(1) if self.reads else y.sum((1, 2, 3))


@pytest.mark.parametrize("reads", [False, True])
def test_tapped_flatten_whose_base_is_written_later(reads):
    m = FlattenLater(reads).eval()
    x = torch.randn(2, 4, 3, 3)
    out, feats = kdgraph.tap(m, ["flatten"])(x)
    assert torch.equal(out, m(x))
    assert torch.equal(feats["flatten"], m.bn(x).flatten(1))


class Mutates(nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x - 1


class CallsMutating(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.mut = _bn(), Mutates()

    def forward(self, x):
        return self.mut(self.bn(x)).sum((2, 3))


def test_leaf_module_mutating_its_input():
    m = CallsMutating().eval()
    x = torch.randn(2, 4, 3, 3)
    tapped = kdgraph.tap(m, ["bn", "mut"], leaf_modules=["Mutates"])
    out, feats = tapped(x)
    assert torch.equal(out, m(x))
    assert torch.equal(feats["bn"], m.bn(x))
    assert next(iter(tapped.how.values())) == {"bn": "copied", "mut": "kept"}


class MutatesWhenTold(nn.Module):
    mutate = False

    def forward(self, x):
        if self.mutate:
            x.add_(1)
        return x * 2


def test_check_mode_catches_a_write_that_starts_after_setup():
    m = nn.Sequential(_bn(), MutatesWhenTold()).eval()
    tapped = kdgraph.tap(m, ["0"], leaf_modules=["MutatesWhenTold"], check=True)
    x = torch.randn(2, 4, 3, 3)
    tapped(x)
    m[1].mutate = True
    with pytest.raises(kdgraph.graph.TapOverwritten, match="0"):
        tapped(x)


# ----------------------------------------------------------------------------------- no side effects
def _module_state(model):
    return [(name, {k: id(v) for k, v in m.__dict__.items()},
             {k: dict(v) for k, v in m.__dict__.items() if isinstance(v, dict) and not k.startswith("_")})
            for name, m in model.named_modules()]


def test_levit_attention_bias_cache_is_left_alone():
    timm = pytest.importorskip("timm")
    m = timm.create_model("levit_128s", num_classes=5).eval()
    x = torch.randn(2, 3, 224, 224)
    before = _module_state(m)
    kdgraph.layers(m, (3, 224, 224))
    tapped = kdgraph.tap(m, ["stages.0.blocks.0.attn.proj"])
    assert _module_state(m) == before  # no Proxy or fake tensor left in `attention_bias_cache`
    out, _ = tapped(x)
    assert torch.equal(out, m(x))


def test_batchnormact_buffers_untouched_and_updated_like_eager():
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    m = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, momentum=None), nn.Conv2d(4, 2, 1)).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    kdgraph.layers(m, (3, 8, 8))
    tapped = kdgraph.tap(m, ["1", "2"])
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    eager = copy.deepcopy(m)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(3):
        tapped(x)
        eager(x)
    for (k, v), e in zip(m.state_dict().items(), eager.state_dict().values()):
        assert torch.equal(v, e), k  # num_batches_tracked counted, cumulative average right


def test_tracing_sees_buffers_as_graph_values():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros((), dtype=torch.long))
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            self.seen.add_(1)  # runs at every call, not once while tracing
            return self.lin(x)

    m = Counter()
    tapped = kdgraph.tap(m, ["lin"])
    assert m.seen.item() == 0
    for _ in range(3):
        tapped(torch.randn(2, 3))
    assert m.seen.item() == 3


# ----------------------------------------------------------------------------------- tracing errors
class AlsoUntraceable(nn.Module):
    def forward(self, x):
        for _ in x:  # iterating a Proxy
            pass
        return x


class TwoBad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(Untraceable(), Untraceable())
        self.b = AlsoUntraceable()

    def forward(self, x):
        y = self.b(self.a(x).sum(0, keepdim=True) + x)
        return y if y.sum() > 0 else x


def test_untraceable_classes_are_all_named_at_once():
    with pytest.raises(TraceFailed) as e:
        kdgraph.layers(TwoBad(), (3,))
    msg = str(e.value)
    assert "2 module class(es)" in msg and "`trace.leaf_modules: [Untraceable, AlsoUntraceable]`" in msg
    assert "TwoBad.forward itself" in msg


def test_timm_not_traceable_registry_is_honoured():
    timm = pytest.importorskip("timm")
    m = timm.create_model("efficientnet_b0", num_classes=5)
    names = [r["name"] for r in kdgraph.layers(m, (3, 32, 32))]
    assert "bn1" in names and not any(n.startswith("bn1.") for n in names)  # BatchNormAct2d is opaque


# ------------------------------------------------------------------------ torch.export, token models
class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(50, 8), nn.Linear(8, 3)

    def forward(self, ids):
        return self.lin(torch.relu(self.emb(ids)).mean(1))


def test_layers_of_a_token_model_take_long_inputs():
    rows = kdgraph.layers(TokenModel(), (12,), input_dtype=torch.long)
    assert {r["name"]: r["shape"] for r in rows}["emb"] == (12, 8)


def _hf_dir(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    config = {"vit": transformers.ViTConfig(image_size=16, patch_size=4, **small),
              "bert": transformers.BertConfig(vocab_size=64, max_position_embeddings=32, **small),
              "resnet": transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])}[kind]
    config.save_pretrained(tmp_path / kind)
    return f"hf:{tmp_path / kind}"


@pytest.mark.parametrize("kind", ["vit", "bert", "resnet"])
def test_hugging_face_models_trace_with_torch_export(kind, tmp_path):
    from kdgraph.models import build_model

    torch.manual_seed(0)
    model = build_model(_hf_dir(tmp_path, kind), num_classes=3).eval()
    shape, dtype = ((12,), torch.long) if kind == "bert" else ((3, 16, 16), torch.float32)
    x = torch.randint(0, 64, (2, *shape)) if kind == "bert" else torch.randn(2, *shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = kdgraph.layers(model, shape, input_dtype=dtype)
    names = [r["name"] for r in rows]
    assert rows[-1]["shape"] == (3,)
    picked = [n for n in names if n.endswith(":pre") or "layer" in n][:6]
    assert picked
    tapped = kdgraph.tap(model, picked)
    out, feats = tapped(x)
    assert torch.equal(out, model(x))
    assert "export" in next(iter(tapped.how))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    ref_out, ref = interpreter_reference(model, picked, x, seed=0)
    for n in picked:
        assert torch.equal(feats[n], ref[n]), n


def test_export_names_match_fx_names():
    m = torchvision.models.resnet18(num_classes=5)
    fx_rows = kdgraph.layers(m, (3, 32, 32))
    ex = tracing._export(m, (torch.zeros(2, 3, 32, 32),), tracing._Leaves(()))
    assert [r["name"] for r in fx_rows] == list(ex.taps)


def test_tapped_follows_the_model_to_another_dtype():
    m = InplaceZoo().eval()
    tapped = kdgraph.tap(m, ["relu:pre"])
    x = torch.randn(2, 3, 8, 8)
    tapped(x)
    m.double()  # the model, not the tapped module: buffers are replaced
    out, feats = tapped(x.double())
    assert out.dtype == torch.float64 and torch.equal(out, m(x.double()))


class NormalisesInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        x.sub_(0.5)  # writes to the caller's tensor, as the eager model does
        return self.conv(x)


def test_a_write_to_the_input_stays_a_write_to_the_input():
    m = NormalisesInPlace()
    x = torch.randn(2, 3, 4, 4)
    expected_input, expected_out = x - 0.5, m(x.clone())
    mine = x.clone()
    out, feats = kdgraph.tap(m, ["sub_:pre"])(mine)
    assert torch.equal(out, expected_out) and torch.equal(mine, expected_input)
    assert torch.equal(feats["sub_:pre"], x)


class OptionalMask(nn.Module):
    """``forward(x, mask=None)`` as timm's Hiera has it: fx alone traces the ``mask is not None`` branch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask.view(-1, 1)
        return self.lin(x).relu()


def test_optional_arguments_defaulting_to_none_are_traced_as_none():
    m = OptionalMask()
    x = torch.randn(2, 4)
    assert "mul" not in [r["name"] for r in kdgraph.layers(m, (4,))]
    tapped = kdgraph.tap(m, ["lin", "relu:pre"])
    out, feats = tapped(x)
    assert torch.equal(out, m(x)) and torch.equal(feats["lin"], m.lin(x))
    with pytest.raises(AssertionError, match="specialized to have value None"):
        tapped(x, torch.ones(2))
