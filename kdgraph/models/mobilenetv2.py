"""MobileNetV2 for 32x32 inputs, the CIFAR form of the distillation benchmarks.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018 (arXiv:1801.04381),
as RepDistiller (Tian et al., ICLR 2020) defines it for CIFAR-100 (its ``MobileNetV2`` is
``mobile_half``: expansion 6, width 0.5), after Jin et al.'s route-constrained optimisation code:

* a stride-2 3x3 stem, then the paper's seven bottleneck groups (t, c, n, s) with strides 1, 1, 2, 2, 1,
  2, 1 (the paper's 24-channel group has stride 2 on ImageNet; here it has 1), so a 32x32 input ends at
  2x2;
* every bottleneck has its expansion 1x1 conv, even at expansion 1 (unlike torchvision's);
* ReLU (not ReLU6); a 1x1 conv to 1280 channels (``1280 * width`` above width 1), global average
  pooling and one linear layer.

The module layout (``conv1``, ``blocks.G.I.conv.K``, ``conv2``, ``classifier.0``) gives the same
``state_dict`` keys as RepDistiller's and mdistiller's. A residual bottleneck computes ``branch + input``
(the same sum as theirs), so the BatchNorm ending the branch is the one feeding a group's output.
"""
from __future__ import annotations

import torch
from torch import nn

from .wrn import init_conv_bn

#: The paper's Table 2 groups as (expansion, channels, units, stride); ``None`` stands for the model's ``t``.
GROUPS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
          (None, 160, 3, 2), (None, 320, 1, 1))
FEATURE_GROUPS = (1, 2, 4, 6)  # the groups ending each resolution, RepDistiller's features f1..f4


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class InvertedResidual(nn.Module):
    """1x1 expansion conv-BN-ReLU, 3x3 depthwise conv-BN-ReLU, 1x1 linear projection conv-BN (+ input)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(*_conv_bn_relu(c_in, hidden, 1), *_conv_bn_relu(hidden, hidden, 3, stride, hidden),
                                  nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 of expansion ``t`` and width multiplier ``width``; RepDistiller's initialisation."""

    def __init__(self, t: int = 6, width: float = 0.5, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        c_in = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn_relu(in_channels, c_in, 3, 2))
        self.blocks = nn.ModuleList()
        reduction, self.feature_info = 2, []
        for g, (expansion, channels, units, stride) in enumerate(GROUPS):
            c_out = int(channels * width)
            self.blocks.append(nn.Sequential(*(InvertedResidual(c_in if i == 0 else c_out, c_out, stride if i == 0
                                                                else 1, t if expansion is None else expansion)
                                               for i in range(units))))
            c_in, reduction = c_out, reduction * stride
            if g in FEATURE_GROUPS:  # linear bottleneck outputs: no ReLU follows, pre-ReLU is the value itself
                self.feature_info.append({"module": f"blocks.{g}", "pre": f"blocks.{g}", "num_chs": c_out,
                                          "reduction": reduction})
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn_relu(c_in, last, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_conv_bn(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        x = self.avgpool(self.conv2(x))
        return self.classifier(torch.flatten(x, 1))
