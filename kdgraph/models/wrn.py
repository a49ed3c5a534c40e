"""Wide Residual Networks for 32x32 inputs.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146). ``WRN-D-K`` has depth
``D = 6n + 4`` (a 3x3 stem conv, three stages of ``n`` two-conv blocks, the classifier) and widens the
stages of a pre-activation ResNet (He et al., ECCV 2016) to ``16K, 32K, 64K`` channels.

This is the function of the authors' code and of RepDistiller's, mdistiller's, Heo et al.'s and the
original Distillation project's ``wrn``; their checkpoints name a stage's blocks ``blockN.layer.I`` and
the projection ``convShortcut`` (:func:`repdistiller_key` maps them).
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import UserError


def init_conv_bn(model: nn.Module, linear_std: float | None = None) -> None:
    """He (fan-out) initialisation of every conv (bias 0), BatchNorm at weight 1 and bias 0 (CIFAR
    ResNets/WRNs); with ``linear_std`` also linear layers at N(0, linear_std^2), bias 0 (CIFAR VGG, MobileNetV2)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)


def blocks_per_stage(depth: int, widen_factor: int) -> int:
    """The number ``n`` of blocks per stage of ``WRN-depth-widen_factor``; a UserError if there is none."""
    if depth < 10 or (depth - 4) % 6:
        raise UserError(f"Wide ResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), got {depth}")
    if widen_factor < 1:
        raise UserError(f"Wide ResNet widen factor must be at least 1, got {widen_factor}")
    return (depth - 4) // 6


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the input.

    When the block changes the shape, the pre-activated input feeds both ``conv1`` and the 1x1 ``shortcut``
    convolution (the original code's ``equalInOut`` wiring); otherwise the raw input is added back.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        same_shape = in_planes == out_planes and stride == 1
        self.shortcut = None if same_shape else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        if self.shortcut is not None:
            x = out
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.dropout is not None:
            out = self.dropout(out)
        out = self.conv2(out)
        return (x if self.shortcut is None else self.shortcut(x)) + out


def repdistiller_key(key: str) -> str:
    """A key of the authors'/RepDistiller's WRN state_dict (``block1.layer.0.convShortcut.weight``) as
    :class:`WideResNet` names it (``block1.0.shortcut.weight``)."""
    return re.sub(r"^(block\d+)\.layer\.", r"\1.", key).replace(".convShortcut.", ".shortcut.")


class WideResNet(nn.Module):
    """``WRN-depth-widen_factor``; ``dropout`` is applied between the two convolutions of every block.

    Stages (``feature_info``): ``block1..3``; their pre-ReLU values are each stage's output through the
    BatchNorm that starts the next stage (the final BN for the last), as in Heo et al.'s code.
    """

    checkpoint_layouts = {"RepDistiller/mdistiller/Heo et al./Distillation WRN (blockN.layer.I, convShortcut)":
                          repdistiller_key}

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, dropout: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        n = blocks_per_stage(depth, widen_factor)
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.block1 = self._stage(16, widths[0], n, 1, dropout)
        self.block2 = self._stage(widths[0], widths[1], n, 2, dropout)
        self.block3 = self._stage(widths[1], widths[2], n, 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[2])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        pre = ["block2.0.relu1:pre", "block3.0.relu1:pre", "relu:pre"]
        self.feature_info = [{"module": f"block{i + 1}", "pre": pre[i], "num_chs": w, "reduction": 2 ** i}
                             for i, w in enumerate(widths)]

        init_conv_bn(self)
        nn.init.zeros_(self.fc.bias)

    @staticmethod
    def _stage(in_planes: int, out_planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        return nn.Sequential(*(BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1,
                                          dropout) for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.avgpool(self.relu(self.bn1(x)))
        return self.fc(torch.flatten(x, 1))
