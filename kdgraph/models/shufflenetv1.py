"""ShuffleNet (v1) for 32x32 inputs, the CIFAR form of the distillation benchmarks.

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices", CVPR
2018 (arXiv:1707.01083), 1x with g = 3 (stage widths 240, 480, 960; 4, 8 and 4 units), as RepDistiller
(Tian et al., ICLR 2020) defines it for CIFAR-100 (its ``ShuffleV1``): a 1x1 stride-1 stem of 24
channels and no max-pool, so the three stride-2 stages take a 32x32 input to 4x4. Its units differ from
the paper's Figure 2 in one place: a ReLU follows the depthwise conv's BatchNorm.

RepDistiller's checkpoints name the stages ``layer1..3`` and the classifier ``linear``;
:func:`repdistiller_key` maps them to this module's ``stage1..3`` and ``fc`` (unit keys are the same).
"""
from __future__ import annotations

import torch
from torch import nn

from .shufflenetv2 import channel_shuffle

WIDTHS = (240, 480, 960)
UNITS_PER_STAGE = (4, 8, 4)
STEM = 24


class ShuffleUnit(nn.Module):
    """1x1 group conv-BN-ReLU, channel shuffle, 3x3 depthwise conv (``stride``)-BN-ReLU, 1x1 group conv-BN;
    then ``+ input`` (stride 1) or ``concat(., 3x3 avg-pool of the input)`` (stride 2), and ReLU.

    The first 1x1 conv is not grouped when its input is the 24-channel stem (as in the paper).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int):
        super().__init__()
        mid = out_ch // 4
        first = 1 if in_ch == STEM else groups
        self.stride, self.first_groups = stride, first
        self.conv1 = nn.Conv2d(in_ch, mid, 1, groups=first, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = torch.cat([out, self.pool(x)], 1) if self.pool is not None else out + x
        return self.relu(out)


def repdistiller_key(key: str) -> str:
    """A key of RepDistiller's ``ShuffleV1`` state_dict as :class:`ShuffleNetV1` names it."""
    if key.startswith("linear."):
        return "fc." + key[len("linear."):]
    return "stage" + key[len("layer"):] if key.startswith("layer") else key


class ShuffleNetV1(nn.Module):
    """ShuffleNet 1x, g = ``groups``, with PyTorch's default initialisation (as RepDistiller)."""

    checkpoint_layouts = {"RepDistiller/mdistiller ShuffleV1 (layerN, linear)": repdistiller_key}

    def __init__(self, num_classes: int = 100, groups: int = 3, widths: tuple[int, int, int] = WIDTHS,
                 in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STEM, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM)
        self.relu = nn.ReLU(inplace=True)
        in_ch, self.feature_info = STEM, []
        for i, (width, units) in enumerate(zip(widths, UNITS_PER_STAGE), start=1):
            # the first unit's output is concatenated with its pooled input, so it adds width - in_ch channels
            self.add_module(f"stage{i}", nn.Sequential(*(ShuffleUnit(in_ch if j == 0 else width, width - in_ch
                                                                     if j == 0 else width, 2 if j == 0 else 1, groups)
                                                         for j in range(units))))
            self.feature_info.append({"module": f"stage{i}", "pre": f"stage{i}.{units - 1}.relu_2:pre",
                                      "num_chs": width, "reduction": 2 ** i})
            in_ch = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
