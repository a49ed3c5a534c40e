"""ShuffleNet V2 for 32x32 inputs.

Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", ECCV 2018
(arXiv:1807.11164), with the paper's units (Figure 3 c, d) and widths (Table 5), in a CIFAR form: a
stride-1 stem of 24 channels and no max-pool, so three stride-2 stages take 32x32 inputs to 4x4.

Two stems are in use. ``shufflenetv2-W`` has a 3x3 stem. RepDistiller (Tian et al., ICLR 2020, its
``ShuffleV2``; also mdistiller's) has a 1x1 stem and 224 first-stage channels at width 2.0 (the paper
has 244): ``shufflev2-W`` here, ``ShuffleNetV2(W, stem_kernel=1, widths=REPDISTILLER_WIDTHS[W])``. Its
checkpoints load through :func:`repdistiller_key`. The original Distillation project's ShuffleNetV2 is
another network (:mod:`kdgraph.models.shufflenetv2_original`).
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
#: RepDistiller's ``ShuffleNetV2`` configs (its ``ShuffleV2`` is 1.0): 224, not 244, at width 2.0.
REPDISTILLER_WIDTHS = {**WIDTHS, 2.0: (224, 488, 976, 2048)}
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


#: RepDistiller's down-sampling unit numbers its layers 1-5 (conv/bn): the depthwise branch first.
_DOWN_UNIT = {"1": ("proj", "1"), "2": ("proj", "2"), "3": ("main", "1"), "4": ("main", "2"), "5": ("main", "3")}


def repdistiller_key(key: str) -> str:
    """A key of RepDistiller's ``ShuffleV2`` state_dict as :class:`ShuffleNetV2` names it.

    Its down-sampling unit (``layerN.0``) names the 3x3 depthwise branch ``conv1/bn1, conv2/bn2`` and the
    other branch ``conv3/bn3 ... conv5/bn5``; its other units name their one branch ``conv1/bn1 ... conv3/bn3``.
    """
    if key.startswith("linear."):
        return "fc." + key[len("linear."):]
    if not key.startswith("layer") or key.count(".") < 3:
        return key
    stage, unit, layer, param = key[len("layer"):].split(".", 3)
    kind, index = layer.rstrip("0123456789"), layer[len(layer.rstrip("0123456789")):]
    part, new_index = _DOWN_UNIT.get(index, ("?", index)) if unit == "0" else ("main", index)
    return f"stage{stage}.{unit}.{part}.{kind}{new_index}.{param}"


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 of width multiplier ``net_size`` (0.5, 1.0, 1.5 or 2.0), with PyTorch's default init.

    ``stem_kernel`` is the stem conv's size (3, or RepDistiller's 1); ``widths`` overrides the stage and
    head widths of :data:`WIDTHS`.
    """

    checkpoint_layouts = {"RepDistiller/mdistiller ShuffleV2 (layerN, DownBlock conv1-5, linear)": repdistiller_key}

    def __init__(self, net_size: float = 1.0, num_classes: int = 10, in_channels: int = 3, stem_kernel: int = 3,
                 widths: tuple[int, int, int, int] | None = None):
        super().__init__()
        if net_size not in WIDTHS:
            raise UserError(f"ShuffleNetV2 net_size must be one of {sorted(WIDTHS)}, got {net_size}")
        *stage_widths, head_width = widths or WIDTHS[net_size]
        self.conv1 = nn.Conv2d(in_channels, 24, stem_kernel, padding=stem_kernel // 2, bias=False)
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
        # timm-style stages; pre-ReLU: the last unit's branch before its final ReLU (half the channels; the
        # other half passes unchanged)
        self.feature_info = [{"module": f"stage{i + 1}", "pre": f"stage{i + 1}.{units - 1}.main.relu3:pre",
                              "num_chs": width, "reduction": 2 ** (i + 1)}
                             for i, (width, units) in enumerate(zip(stage_widths, UNITS_PER_STAGE))]

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
