"""Tests of the model zoo: kdgraph.models and its CIFAR architectures."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.fx
from torch import nn

from kdgraph.errors import UserError
from kdgraph.graph import layers, stage_ends, trace
from kdgraph.losses import LOSSES, build_terms
from kdgraph.losses.terms import _feeding_batchnorm
from kdgraph.models import MODELS, build_model, list_models, model_exists
from kdgraph.models.shufflenetv2 import ShuffleNetV2, channel_shuffle
from kdgraph.models.wrn import WideResNet

ALL = MODELS.names()

# Parameter counts for 100 classes as reported in the literature: Zagoruyko & Komodakis 2016 (wrn-28-10,
# wrn-16-8, wrn-40-4) and the CIFAR-100 tables commonly given in KD papers for the others.
PAPER_PARAMS = {
    "wrn-16-2": 0.70e6,
    "wrn-40-1": 0.57e6,
    "wrn-40-2": 2.26e6,
    "wrn-28-4": 5.87e6,
    "wrn-40-4": 8.9e6,
    "wrn-16-8": 11.0e6,
    "wrn-28-10": 36.5e6,
    "resnet20": 0.28e6,
    "resnet32": 0.47e6,
    "resnet56": 0.86e6,
    "resnet110": 1.73e6,
    "resnet8x4": 1.23e6,
    "resnet32x4": 7.43e6,
    "shufflenetv2-1.0": 1.35e6,
}


@functools.cache
def model_rows() -> dict:
    return {row["name"]: row for row in list_models()}


@functools.cache
def built(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=100)


#: RepDistiller's definitions at 100 classes (counted from its model code: ../shared/literature.md), by the
#: kdgraph name of the same network and RepDistiller's own name.
REPDISTILLER_PARAMS = {
    "wrn-16-1": ("wrn_16_1", 180_916), "wrn-16-2": ("wrn_16_2", 703_284), "wrn-40-1": ("wrn_40_1", 569_780),
    "wrn-40-2": ("wrn_40_2", 2_255_156), "resnet8": ("resnet8", 83_892), "resnet14": ("resnet14", 181_108),
    "resnet20": ("resnet20", 278_324), "resnet32": ("resnet32", 472_756), "resnet44": ("resnet44", 667_188),
    "resnet56": ("resnet56", 861_620), "resnet110": ("resnet110", 1_736_564),
    "resnet8x4": ("resnet8x4", 1_233_540), "resnet32x4": ("resnet32x4", 7_433_860),
    "vgg8": ("vgg8", 3_965_028), "vgg11": ("vgg11", 9_277_284), "vgg13": ("vgg13", 9_462_180),
    "vgg16": ("vgg16", 14_774_436), "vgg19": ("vgg19", 20_086_692),
    "mobilenetv2-0.5": ("MobileNetV2", 812_836), "resnet50-cifar": ("ResNet50", 23_705_252),
    "shufflev1": ("ShuffleV1", 949_258), "shufflev2-1.0": ("ShuffleV2", 1_355_528),
}
#: The original Distillation project's ShuffleNetV2-1.0 (literature.md) and kdgraph's paper-unit one.
OTHER_EXACT_PARAMS = {"shufflenetv2-orig-1.0": 1_360_896, "shufflenetv2-1.0": 1_356_104}


def test_registry_names():
    assert {"wrn-16-1", "wrn-16-2", "wrn-16-4", "wrn-16-8", "wrn-28-2", "wrn-28-4", "wrn-28-10", "wrn-40-1",
            "wrn-40-2", "wrn-40-4", "shufflenetv2-0.5", "shufflenetv2-1.0", "shufflenetv2-1.5",
            "shufflenetv2-2.0", "resnet20", "resnet32", "resnet56", "resnet110", "resnet8x4",
            "resnet32x4", *REPDISTILLER_PARAMS, *OTHER_EXACT_PARAMS} <= set(ALL)
    for name in ALL:
        assert MODELS.meta(name)["family"] in {"wrn", "shufflenetv2", "shufflenetv1", "resnet-cifar", "vgg-cifar",
                                               "mobilenetv2-cifar"}
        assert MODELS.meta(name)["paper"] and MODELS.meta(name)["source"]


def test_parameter_counts_equal_repdistillers():
    rows = model_rows()
    for name, (theirs, count) in REPDISTILLER_PARAMS.items():
        assert (rows[name]["params"], rows[name]["num_classes"]) == (count, 100), name
        assert rows[name]["source"].startswith(f"RepDistiller {theirs}"), name
    for name, count in OTHER_EXACT_PARAMS.items():
        assert rows[name]["params"] == count, name
    # the three ShuffleNetV2 variants are told apart by name and source
    assert "1x1 stem" in rows["shufflev2-1.0"]["source"] and "3x3 stem" in rows["shufflenetv2-1.0"]["source"]
    assert "original Distillation" in rows["shufflenetv2-orig-1.0"]["source"]
    assert rows["shufflev2-2.0"]["params"] < rows["shufflenetv2-2.0"]["params"]  # 224 vs 244 first-stage channels


def test_parameter_counts_match_the_papers():
    rows = model_rows()
    assert set(rows) == set(ALL)
    for name, expected in PAPER_PARAMS.items():
        assert rows[name]["num_classes"] == 100
        assert rows[name]["params"] == pytest.approx(expected, rel=0.02), name
    assert rows["wrn-40-2"]["params"] == sum(p.numel() for p in built("wrn-40-2").parameters())


#: One model per definition and structural variant (the other widths and depths run the same code): what
#: the tests that run real forwards cover. Parameter counts, stages and ReLUs are checked on every model.
REPRESENTATIVE = ["wrn-16-1", "wrn-40-2", "wrn-28-4", "resnet8", "resnet56", "resnet32x4", "resnet50-cifar", "vgg8",
                  "vgg13", "mobilenetv2-0.5", "shufflev1", "shufflev2-0.5", "shufflev2-2.0", "shufflenetv2-0.5",
                  "shufflenetv2-orig-0.5"]


def test_representatives_cover_every_definition():
    assert set(REPRESENTATIVE) <= set(ALL)
    assert {type(meta(n)) for n in ALL} == {type(meta(n)) for n in REPRESENTATIVE}


@pytest.mark.parametrize("name", REPRESENTATIVE)
@pytest.mark.parametrize("size", [32, 16])
def test_forward_shape(name, size):
    with torch.no_grad():
        out = built(name).eval()(torch.randn(2, 3, size, size))
    assert out.shape == (2, 100)


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_fx_trace_matches_eager(name):
    model = built(name)
    torch.fx.symbolic_trace(model.train())
    traced = torch.fx.symbolic_trace(model.eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("name", ALL)
def test_relus_are_in_place(name):
    model = meta(name)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if name.startswith("shufflenetv2-orig"):  # a unit's leading ReLUs read an input two branches share
        leading = [u.residual[0] for st in (model.stage2, model.stage3, model.stage4) for u in st]
        leading += [u.shortcut[0] for st in (model.stage2, model.stage3, model.stage4) for u in st] + [model.conv5[0]]
        relus = [m for m in relus if not any(m is x for x in leading)]
    assert relus and all(m.inplace for m in relus)


def test_layer_names():
    wrn = dict(built("wrn-16-2").named_modules())
    assert {"conv1", "block1", "block2.0.relu1", "block2.0.shortcut", "block3.1.conv2", "bn1", "relu", "avgpool",
            "fc"} <= set(wrn)
    assert "block2.1.shortcut" not in wrn and isinstance(wrn["block2"], nn.Sequential)
    resnet = dict(built("resnet8x4").named_modules())
    assert {"conv1", "bn1", "relu", "layer1.0.downsample", "layer3.0.relu", "avgpool", "fc"} <= set(resnet)
    assert "layer1.0.downsample" not in dict(built("resnet20").named_modules())
    shuffle = dict(built("shufflenetv2-0.5").named_modules())
    assert {"conv1", "bn1", "relu1", "stage1", "stage2", "stage3", "conv2", "bn2", "relu2", "avgpool",
            "fc"} <= set(shuffle)
    assert [len(shuffle[f"stage{i}"]) for i in (1, 2, 3)] == [4, 8, 4]


def test_reused_relu_gives_two_graph_nodes():
    graph = torch.fx.symbolic_trace(built("resnet20")).graph
    assert [n.target for n in graph.nodes if n.op == "call_module"].count("layer1.0.relu") == 2


def test_wrn_depth_must_be_6n_plus_4():
    with pytest.raises(UserError, match="6n\\+4"):
        WideResNet(17, 2)
    with pytest.raises(UserError, match="6n\\+4"):
        build_model("wrn-17-2")
    assert not model_exists("wrn-17-2")
    assert model_exists("wrn-22-3")
    assert build_model("wrn-22-3").fc.in_features == 64 * 3


def test_wrn_dropout():
    model = build_model("wrn-16-1", dropout=0.3)
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 6
    torch.fx.symbolic_trace(model)


def test_shufflenet():
    x = torch.arange(4.0).view(1, 4, 1, 1)
    assert channel_shuffle(x).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]
    with pytest.raises(UserError, match="net_size"):
        ShuffleNetV2(0.75)


def test_in_channels():
    model = build_model("resnet20", num_classes=3, in_channels=1).eval()
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    with pytest.raises(UserError, match="in_channels"):
        build_model("torchvision:resnet18", in_channels=1)


def test_torchvision():
    model = build_model("torchvision:resnet18", num_classes=7)
    assert model.fc.out_features == 7
    assert model_exists("torchvision:resnet18") and not model_exists("torchvision:resnet19")
    with pytest.raises(UserError, match="resnet18"):
        build_model("torchvision:resnet19")


def test_torchvision_weights_are_checked_before_any_download():
    with pytest.raises(UserError, match="1000 classes"):
        build_model("torchvision:resnet18", num_classes=10, weights="DEFAULT")
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        build_model("torchvision:resnet18", num_classes=1000, weights="NOPE")
    with pytest.raises(UserError, match="torchvision"):
        build_model("resnet20", weights="DEFAULT")


def test_import_paths():
    assert build_model("torchvision.models:resnet18", num_classes=5).fc.out_features == 5  # takes **kwargs
    assert isinstance(build_model("torch.nn:Linear", in_features=4, out_features=2), nn.Linear)  # no num_classes
    model = build_model("kdgraph.models.resnet_cifar:ResNet", num_classes=3, in_channels=1, depth=8)
    assert (model.conv1.in_channels, model.fc.out_features) == (1, 3)
    assert model_exists("torch.nn:Linear") and not model_exists("torch.nn:Nope")
    with pytest.raises(UserError, match="not a torch.nn.Module"):
        build_model("torch.utils.data:TensorDataset")  # importable, not a model
    with pytest.raises(UserError, match="out_features"):
        build_model("torch.nn:Linear", in_features=4)


def test_bad_kwargs_name_the_model_and_argument():
    with pytest.raises(UserError, match="wrn-16-2.*widen"):
        build_model("wrn-16-2", widen=3)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(UserError, match="did you mean 'resnet56'"):
        build_model("resnet-56")
    assert not model_exists("resnet-56")


# ------------------------------------------------------------------------------------ stages and auto
@functools.cache
def meta(name: str) -> nn.Module:
    """The model on the meta device: its modules and shapes, no memory, no initialisation."""
    with torch.device("meta"):
        return build_model(name, num_classes=100).eval()


@functools.cache
def meta_rows(name: str) -> tuple:
    return meta(name), layers(meta(name), (3, 32, 32))


@pytest.mark.parametrize("name", ALL)
def test_declared_stages_are_the_auto_positions(name):
    """Every zoo model declares its stages (``feature_info``): ``positions: auto`` takes them, each stage is
    smaller than or as small as the one before, and every pre-activation position has a BatchNorm in front
    (where ``margin_relu`` reads its margins)."""
    model, rows = meta_rows(name)
    info = model.feature_info
    assert stage_ends(rows, pre=False) == [f["module"] for f in info]
    assert stage_ends(rows, pre=True) == [f["pre"] for f in info]
    shape = {r["name"]: r["shape"] for r in rows}
    assert [shape[f["module"]][0] for f in info] == [f["num_chs"] for f in info]
    sizes = [shape[f["module"]][1] for f in info]
    assert sizes == sorted(sizes, reverse=True) and [32 // s for s in sizes] == [f["reduction"] for f in info]
    traced = trace(model)
    for f in info:
        assert isinstance(_feeding_batchnorm(model, traced.resolve(f["pre"])), nn.BatchNorm2d), f["pre"]
        assert shape[f["pre"]][1:] == shape[f["module"]][1:]


#: RepDistiller's 13 CIFAR-100 pairs (teacher, student) in kdgraph's names.
PAIRS = [("wrn-40-2", "wrn-16-2"), ("wrn-40-2", "wrn-40-1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
         ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("vgg13", "mobilenetv2-0.5"),
         ("resnet50-cifar", "mobilenetv2-0.5"), ("resnet50-cifar", "vgg8"), ("resnet32x4", "shufflev1"),
         ("resnet32x4", "shufflev2-1.0"), ("wrn-40-2", "shufflev1")]


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_auto_positions_pair_up_on_the_benchmark_pairs(teacher, student):
    """``positions: auto`` works for every feature method on every pair, as RepDistiller pairs them: all
    stages (its features f1..fN), the last, the second (its hint layer), the embedding."""
    methods = [m for m in LOSSES.names() if getattr(LOSSES.get(m), "features", None)]
    (t_model, t_rows), (s_model, s_rows) = meta_rows(teacher), meta_rows(student)
    terms, problems = build_terms([{"method": m} for m in methods], teacher_rows=t_rows, student_rows=s_rows,
                                  has_teacher=True)
    assert problems == []
    t_stages, s_stages = [f["module"] for f in t_model.feature_info], [f["module"] for f in s_model.feature_info]
    for term in terms:
        pairs = [tuple(p) for p in term.pairs]
        if term.auto == "all":
            assert pairs == list(zip([f["pre"] for f in t_model.feature_info], [f["pre"] for f in s_model.feature_info])
                                 if term.features == "pre" else zip(t_stages, s_stages))
        elif term.auto == "last":
            assert pairs == [(t_stages[-1], s_stages[-1])]
        elif term.auto == "middle":
            assert pairs == [(t_stages[1], s_stages[1])]
