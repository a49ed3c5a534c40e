"""Checkpoints of other projects: RepDistiller/mdistiller and the original Distillation project.

Each test writes a file in the other project's key layout -- built here from a reading of its public model
definitions, independently of kdgraph's mapping functions -- loads it through
:func:`kdgraph.checkpoint.load_weights` into a model with other weights, and checks the layout it reports
and that the model computes exactly what the model the weights came from computes.
"""
from __future__ import annotations

import argparse
import re

import pytest
import torch

from kdgraph.checkpoint import OWN_LAYOUT, load_weights, map_state
from kdgraph.errors import UserError
from kdgraph.models import build_model

RD_WRN = "RepDistiller/mdistiller/Heo et al./Distillation WRN (blockN.layer.I, convShortcut)"
RD_RESNET50 = "RepDistiller/mdistiller ResNet50 (shortcut, linear)"
RD_SHUFFLEV1 = "RepDistiller/mdistiller ShuffleV1 (layerN, linear)"
RD_SHUFFLEV2 = "RepDistiller/mdistiller ShuffleV2 (layerN, DownBlock conv1-5, linear)"


# ------------------------------------------------ the other projects' key names, from their model code
def wrn_keys(k: str) -> str:
    """RepDistiller wrn.py: ``blockN`` is a NetworkBlock holding ``layer`` (a Sequential); ``convShortcut``."""
    k = re.sub(r"^block(\d)\.(\d+)\.", r"block\1.layer.\2.", k)
    return k.replace(".shortcut.", ".convShortcut.")


def resnet50_keys(k: str) -> str:
    """RepDistiller resnetv2.py: Bottleneck's projection is ``shortcut`` (Sequential conv, BN); ``linear``."""
    return k.replace(".downsample.", ".shortcut.").replace("fc.", "linear.")


def shufflev1_keys(k: str) -> str:
    """RepDistiller ShuffleNetv1.py: ``layer1..3`` of Bottlenecks (conv1-3, bn1-3), ``linear``."""
    return k.replace("stage", "layer").replace("fc.", "linear.")


#: RepDistiller ShuffleNetv2.py DownBlock: left branch conv1 (dw, s2), conv2 (1x1); right conv3, conv4, conv5.
DOWN_BLOCK = {"proj.conv1": "conv1", "proj.bn1": "bn1", "proj.conv2": "conv2", "proj.bn2": "bn2",
              "main.conv1": "conv3", "main.bn1": "bn3", "main.conv2": "conv4", "main.bn2": "bn4",
              "main.conv3": "conv5", "main.bn3": "bn5"}


def shufflev2_keys(k: str) -> str:
    """RepDistiller ShuffleNetv2.py: ``layerN`` = [DownBlock, BasicBlock...] (BasicBlock: conv1-3, bn1-3)."""
    m = re.match(r"stage(\d)\.(\d+)\.(\w+\.\w+)\.(.+)$", k)
    if m is None:
        return k.replace("fc.", "linear.")
    stage, unit, layer, param = m.groups()
    layer = DOWN_BLOCK[layer] if unit == "0" else layer.removeprefix("main.")
    return f"layer{stage}.{unit}.{layer}.{param}"


def same(k: str) -> str:
    return k


#: name -> (their key names, a few keys their state_dict has, the layout kdgraph must report); one model of
#: each definition (the layouts are the class's: every depth and width of it shares them)
CASES = {
    "wrn-16-1": (wrn_keys, ["block1.layer.0.bn1.weight", "block2.layer.0.convShortcut.weight", "bn1.running_var",
                            "fc.bias"], RD_WRN),
    "wrn-28-4": (wrn_keys, ["block1.layer.0.convShortcut.weight", "block1.layer.3.bn2.running_mean"], RD_WRN),
    "resnet8": (same, ["layer2.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.weight"], OWN_LAYOUT),
    "resnet8x4": (same, ["layer1.0.downsample.1.weight", "layer3.0.conv2.weight"], OWN_LAYOUT),
    "resnet50-cifar": (resnet50_keys, ["layer1.0.shortcut.0.weight", "layer4.2.bn3.bias", "linear.weight"],
                       RD_RESNET50),
    "vgg8": (same, ["block0.0.bias", "block0.1.running_var", "block4.0.weight", "block1.1.num_batches_tracked",
                    "classifier.weight"], OWN_LAYOUT),
    "mobilenetv2-0.5": (same, ["conv1.0.weight", "blocks.0.0.conv.0.weight", "blocks.1.1.conv.7.running_mean",
                               "blocks.6.0.conv.3.weight", "conv2.1.weight", "classifier.0.weight"], OWN_LAYOUT),
    "shufflev1": (shufflev1_keys, ["conv1.weight", "layer1.0.conv3.weight", "layer3.3.bn2.bias", "linear.weight"],
                  RD_SHUFFLEV1),
    "shufflev2-1.0": (shufflev2_keys, ["layer1.0.conv5.weight", "layer1.0.bn4.running_mean", "layer2.7.conv3.weight",
                                       "conv2.weight", "bn2.bias", "linear.bias"], RD_SHUFFLEV2),
    "shufflev2-2.0": (shufflev2_keys, ["layer1.0.conv1.weight", "layer3.3.bn1.weight"], RD_SHUFFLEV2),
    "shufflenetv2-orig-0.5": (same, ["pre.0.bias", "pre.1.weight", "stage2.0.shortcut.1.weight",
                                     "stage2.0.residual.7.running_var", "stage3.1.residual.6.bias", "conv5.1.bias",
                                     "fc.weight"], OWN_LAYOUT),
}


def _random_stats(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("name", CASES)
def test_their_checkpoints_load_and_compute_the_same(name, tmp_path):
    their_key, examples, layout = CASES[name]
    torch.manual_seed(0)
    source = _random_stats(build_model(name, num_classes=100), 0)
    theirs = {their_key(k): v for k, v in source.state_dict().items()}
    assert len(theirs) == len(source.state_dict()) and set(examples) <= set(theirs), sorted(theirs)[:20]
    file = tmp_path / "ckpt_epoch_240.pth"
    if name.startswith("shufflenetv2-orig") or name == "wrn-28-4":  # the original project's format
        torch.save({"epoch": 140, "state_dict": theirs, "best_prec1": 80.1}, file)
    else:  # RepDistiller's train_teacher.py / mdistiller's
        torch.save({"epoch": 240, "model": theirs, "accuracy": 75.61,
                    "optimizer": {"state": {}, "param_groups": [{"lr": 0.0005, "params": [0, 1]}]}}, file)

    torch.manual_seed(1)
    target = build_model(name, num_classes=100).eval()
    assert load_weights(target, file) == layout
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_files_without_num_batches_tracked_and_with_pickled_options_load(tmp_path):
    """PyTorch < 0.4.1 wrote no ``num_batches_tracked``; RepDistiller's ``*_last.pth`` holds ``opt``."""
    source = _random_stats(build_model("wrn-16-1", num_classes=10), 0)
    theirs = {wrn_keys(k): v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    file = tmp_path / "wrn_16_1_last.pth"
    torch.save({"opt": argparse.Namespace(model="wrn_16_1", learning_rate=0.05), "model": theirs}, file)
    target = build_model("wrn-16-1", num_classes=10).eval()
    assert load_weights(target, file) == RD_WRN
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_data_parallel_prefix_and_own_layout():
    model = build_model("shufflev1", num_classes=10)
    state = {"module." + k: v for k, v in model.state_dict().items()}
    mapped, layout = map_state(build_model("shufflev1", num_classes=10), state)
    assert layout == OWN_LAYOUT and set(mapped) == set(model.state_dict())


def test_a_file_of_another_network_says_what_differs_and_what_was_tried(tmp_path):
    file = tmp_path / "other.pth"
    theirs = {wrn_keys(k): v for k, v in build_model("wrn-16-2", num_classes=10).state_dict().items()}
    torch.save({"model": theirs}, file)
    with pytest.raises(UserError) as e:
        load_weights(build_model("wrn-16-1", num_classes=10), file)
    message = str(e.value)
    assert "shape mismatches (file vs model): block1.0.conv1.weight (32, 16, 3, 3) vs (16, 16, 3, 3)" in message
    assert "block1.0.shortcut.weight" in message  # wrn-16-2's first block projects 16 -> 32; wrn-16-1's does not
    assert f"(keys read in the {RD_WRN} layout)" in message
