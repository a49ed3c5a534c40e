"""VGG with BatchNorm for 32x32 inputs, the CIFAR form of the distillation benchmarks.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015
(arXiv:1409.1556), in the form of Tian et al.'s RepDistiller (ICLR 2020, arXiv:1910.10699; its
``vgg8/11/13/16/19``, BatchNorm variants): five groups of 3x3 conv (with bias) - BN - ReLU, 2x2 max-pools
after the first three groups only (so groups 4 and 5 both see 4x4 maps of a 32x32 input), global average
pooling and a single linear classifier (no fully connected hidden layers).

The module layout (``block0`` ... ``block4`` as ``nn.Sequential`` of conv, BN, ReLU, ..., ``classifier``)
gives the same ``state_dict`` keys as RepDistiller's and mdistiller's, whose checkpoints load as they are.
Each group ends with its ReLU, so ``blockN`` taps the group's output and ``blockN.K:pre`` (K the index of
that last ReLU) its pre-ReLU value, the BatchNorm output RepDistiller's ``preact`` features return.
RepDistiller pools after group 4 as well when the input is 64x64; this definition never does.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import UserError
from .wrn import init_conv_bn

#: Conv widths of the five groups, per depth (the conv layers plus the classifier).
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}
POOLED_GROUPS = 3  # 2x2 max-pool after groups 0, 1 and 2


def _group(in_ch: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_ch = w
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """CIFAR VGG of ``depth`` 8, 11, 13, 16 or 19 with BatchNorm; RepDistiller's initialisation."""

    def __init__(self, depth: int, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if depth not in CONFIGS:
            raise UserError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
        groups = CONFIGS[depth]
        ins = [in_channels] + [g[-1] for g in groups[:-1]]
        for i, (c_in, widths) in enumerate(zip(ins, groups)):
            self.add_module(f"block{i}", _group(c_in, widths))
        for i in range(POOLED_GROUPS):
            self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(groups[-1][-1], num_classes)
        # timm-style stage list: the four groups after the first, as RepDistiller's features f1..f4
        self.feature_info = [
            {"module": f"block{i}", "pre": f"block{i}.{len(groups[i]) * 3 - 1}:pre", "num_chs": groups[i][-1],
             "reduction": 2 ** min(i, POOLED_GROUPS)} for i in range(1, 5)]
        init_conv_bn(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))
