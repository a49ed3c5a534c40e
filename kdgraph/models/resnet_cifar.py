"""ResNets for 32x32 inputs, as used throughout the knowledge-distillation literature.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385), section 4.2:
a 3x3 stem and three stages of ``n`` basic blocks (depth ``6n + 2``). Shortcuts that change the shape are
1x1 convolution + BN projections (the paper's option B). ``resnet8x4`` and ``resnet32x4`` are the
four-times-wider variants (stem 32, stages 64/128/256) introduced as teacher/student pairs by Tian et al.,
"Contrastive Representation Distillation", ICLR 2020 (arXiv:1910.10699).

:class:`BottleneckResNet` is the ImageNet ResNet-50 layout (four stages of bottleneck blocks, 64-512 x4
channels) with a CIFAR stem -- a stride-1 3x3 conv and no max-pool -- as RepDistiller's ``ResNet50``.
Its checkpoints name the projection ``shortcut`` and the classifier ``linear``; :func:`repdistiller_resnet50_key`
renames them to this module's ``downsample`` and ``fc``. RepDistiller's ``resnet8`` ... ``resnet110``,
``resnet8x4`` and ``resnet32x4`` have the keys of :class:`ResNet` as they are.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .wrn import init_conv_bn

#: Bottleneck blocks per stage of the CIFAR ResNet-50.
RESNET50_BLOCKS = (3, 4, 6, 3)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU; ``relu`` is used twice."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """CIFAR ResNet of the given ``depth`` (6n + 2); ``widths`` are the stem width and the three stage widths."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int] = (16, 16, 32, 64), num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise UserError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[1], n, 1)
        self.layer2 = self._stage(widths[1], widths[2], n, 2)
        self.layer3 = self._stage(widths[2], widths[3], n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        # timm-style stages; pre-ReLU: the sum before each stage's last ReLU (RepDistiller's preact features)
        self.feature_info = [{"module": f"layer{i}", "pre": f"layer{i}.{n - 1}.relu_1:pre", "num_chs": widths[i],
                              "reduction": 2 ** (i - 1)} for i in (1, 2, 3)]

        init_conv_bn(self)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*(BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1)
                               for i in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN, plus the (projected) input, then ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def repdistiller_resnet50_key(key: str) -> str:
    """A key of RepDistiller's ``ResNet50`` state_dict as :class:`BottleneckResNet` names it."""
    return "fc." + key[len("linear."):] if key.startswith("linear.") else key.replace(".shortcut.", ".downsample.")


class BottleneckResNet(nn.Module):
    """Four stages of ``blocks`` bottlenecks (64, 128, 256, 512 planes) after a stride-1 3x3 stem."""

    #: Foreign state_dict layouts :func:`kdgraph.checkpoint.load_weights` maps to this one's keys.
    checkpoint_layouts = {"RepDistiller/mdistiller ResNet50 (shortcut, linear)": repdistiller_resnet50_key}

    def __init__(self, blocks: tuple[int, ...] = RESNET50_BLOCKS, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        in_planes, self.feature_info = 64, []
        for i, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
            stride = 1 if i == 1 else 2
            self.add_module(f"layer{i}", nn.Sequential(*(Bottleneck(in_planes if j == 0 else planes * 4, planes,
                                                                    stride if j == 0 else 1) for j in range(n))))
            in_planes = planes * Bottleneck.expansion
            self.feature_info.append({"module": f"layer{i}", "pre": f"layer{i}.{n - 1}.relu_2:pre",
                                      "num_chs": in_planes, "reduction": 2 ** (i - 1)})
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_stages = len(blocks)

        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))
