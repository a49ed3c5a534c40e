"""ShuffleNet V2 for 32x32 inputs.

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", ECCV 2018
(arXiv:1807.11164), in the CIFAR form used by the distillation literature (e.g. Tian et al., ICLR 2020):
a stride-1 3x3 stem and no max-pool, so three stride-2 stages take 32x32 inputs to 4x4.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..errors import UserError

#: Output channels of the three stages and of the final 1x1 conv, per ``net_size`` (the paper's Table 5).
WIDTHS = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}
UNITS_PER_STAGE = (4, 8, 4)


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal channel groups (ShuffleNet, Zhang et al. 2018)."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleUnit(nn.Module):
    """The paper's Figure 3(c) unit (``stride=1``) or 3(d) spatial down-sampling unit (``stride=2``).

    ``main``: 1x1 conv-BN-ReLU, 3x3 depthwise conv-BN, 1x1 conv-BN-ReLU. With stride 1 it sees half of the
    channels and the other half passes unchanged; with stride 2 it sees all of them, and ``proj`` (3x3
    depthwise conv-BN, 1x1 conv-BN-ReLU) produces the other half. The halves are concatenated and shuffled.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        half = out_ch // 2
        main_in = in_ch if stride == 2 else half
        self.main = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(main_in, half, 1, bias=False)),
            ("bn1", nn.BatchNorm2d(half)),
            ("relu1", nn.ReLU(inplace=True)),
            ("conv2", nn.Conv2d(half, half, 3, stride=stride, padding=1, groups=half, bias=False)),
            ("bn2", nn.BatchNorm2d(half)),
            ("conv3", nn.Conv2d(half, half, 1, bias=False)),
            ("bn3", nn.BatchNorm2d(half)),
            ("relu3", nn.ReLU(inplace=True)),
        ]))
        self.proj = None
        if stride == 2:
            self.proj = nn.Sequential(OrderedDict([
                ("conv1", nn.Conv2d(in_ch, in_ch, 3, stride=stride, padding=1, groups=in_ch, bias=False)),
                ("bn1", nn.BatchNorm2d(in_ch)),
                ("conv2", nn.Conv2d(in_ch, half, 1, bias=False)),
                ("bn2", nn.BatchNorm2d(half)),
                ("relu2", nn.ReLU(inplace=True)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.main(x2)], dim=1)
        else:
            out = torch.cat([self.proj(x), self.main(x)], dim=1)
        return channel_shuffle(out)


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 of width multiplier ``net_size`` (0.5, 1.0, 1.5 or 2.0), with PyTorch's default init."""

    def __init__(self, net_size: float = 1.0, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if net_size not in WIDTHS:
            raise UserError(f"ShuffleNetV2 net_size must be one of {sorted(WIDTHS)}, got {net_size}")
        *stage_widths, head_width = WIDTHS[net_size]
        self.conv1 = nn.Conv2d(in_channels, 24, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu1 = nn.ReLU(inplace=True)
        self.stage1 = self._stage(24, stage_widths[0], UNITS_PER_STAGE[0])
        self.stage2 = self._stage(stage_widths[0], stage_widths[1], UNITS_PER_STAGE[1])
        self.stage3 = self._stage(stage_widths[1], stage_widths[2], UNITS_PER_STAGE[2])
        self.conv2 = nn.Conv2d(stage_widths[2], head_width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head_width)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head_width, num_classes)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, units: int) -> nn.Sequential:
        """``units`` shuffle units, the first of which halves the resolution."""
        return nn.Sequential(*(ShuffleUnit(in_ch if i == 0 else out_ch, out_ch, 2 if i == 0 else 1)
                               for i in range(units)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.stage3(self.stage2(self.stage1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))
