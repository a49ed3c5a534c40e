"""The ShuffleNetV2 of the original Distillation project (its ``shufflenetV2-W``), as its own network.

Its code, not the paper's figure, defines it: a pre-activation ShuffleNet V2 whose every unit *starts*
with a ReLU (applied to both branches' inputs, so a stride-1 unit's pass-through half is ReLU'd too) and
ends with BatchNorm, biases on every convolution, a 3x3 stem conv + BN without ReLU, and a head of ReLU,
1x1 conv + BN, ReLU, global pooling and a linear layer. Unit counts (4, 8, 4) and widths (Table 5 of Ma
et al., ECCV 2018, arXiv:1807.11164; 244 at 2.0) are the paper's. It has PyTorch's default
initialisation (the project's ``reset_parameters`` is never called).

* stride-1 unit: split the channels in halves ``a, b``; ``concat(relu(a), residual(b))``, then shuffle;
* down-sampling unit: ``concat(shortcut(x), residual(x))``, then shuffle, where
  ``residual = ReLU, 1x1 conv-BN-ReLU, 3x3 depthwise conv (stride 2)-BN, 1x1 conv-BN`` and
  ``shortcut = ReLU, 3x3 depthwise conv (stride 2)-BN, 1x1 conv-BN``.

Module names (``pre``, ``stage2..4``, ``conv5``, ``fc``; ``residual.K``/``shortcut.K`` in units) are the
project's, so its checkpoints (``{"state_dict": ...}``) load as they are. Its distillation positions were
``pre``, ``stage2``, ``stage3``, ``stage4`` and ``conv5`` -- all pre-ReLU, since each unit begins with one.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .shufflenetv2 import UNITS_PER_STAGE, WIDTHS, channel_shuffle


def _branch(c_in: int, c_out: int, stride: int, expand: bool) -> nn.Sequential:
    """ReLU, [1x1 conv-BN-ReLU if ``expand``], 3x3 depthwise conv-BN, 1x1 conv-BN (biases on the convs)."""
    layers: list[nn.Module] = [nn.ReLU(inplace=False)]  # the unit's input feeds two branches: never in place
    if expand:
        layers += [nn.Conv2d(c_in, c_in, 1), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
    layers += [nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in), nn.BatchNorm2d(c_in),
               nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers)


class ShuffleUnit(nn.Module):
    """The project's unit: down-sampling when ``stride`` is 2 or the width changes, else split in halves."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.split = stride == 1 and in_ch == out_ch
        if self.split:
            self.shortcut = nn.Sequential(nn.ReLU(inplace=False))
            self.residual = _branch(in_ch // 2, in_ch // 2, 1, expand=True)
        else:
            self.residual = _branch(in_ch, out_ch // 2, stride, expand=True)
            self.shortcut = _branch(in_ch, out_ch // 2, stride, expand=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1) if self.split else (x, x)
        return channel_shuffle(torch.cat([self.shortcut(a), self.residual(b)], dim=1))


class OriginalShuffleNetV2(nn.Module):
    """The original Distillation project's ``shufflenetV2-<net_size>`` (0.5, 1.0, 1.5 or 2.0)."""

    def __init__(self, net_size: float = 1.0, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if net_size not in WIDTHS:
            raise UserError(f"ShuffleNetV2 net_size must be one of {sorted(WIDTHS)}, got {net_size}")
        *widths, head = WIDTHS[net_size]
        self.pre = nn.Sequential(nn.Conv2d(in_channels, 24, 3, padding=1), nn.BatchNorm2d(24))
        in_ch, self.feature_info = 24, []
        for i, (width, units) in enumerate(zip(widths, UNITS_PER_STAGE)):
            self.add_module(f"stage{i + 2}", nn.Sequential(*(ShuffleUnit(in_ch if j == 0 else width, width,
                                                                         2 if j == 0 else 1) for j in range(units))))
            # pre-ReLU with a BatchNorm in front: the last unit's residual branch (half the channels)
            self.feature_info.append({"module": f"stage{i + 2}", "pre": f"stage{i + 2}.{units - 1}.residual.7",
                                      "num_chs": width, "reduction": 2 ** (i + 1)})
            in_ch = width
        self.conv5 = nn.Sequential(nn.ReLU(inplace=False), nn.Conv2d(in_ch, head, 1), nn.BatchNorm2d(head))
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.pre(x))))
        x = self.avgpool(self.relu(self.conv5(x)))
        return self.fc(torch.flatten(x, 1))
