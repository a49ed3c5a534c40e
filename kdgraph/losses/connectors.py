"""Connectors: the small trainable modules that bring a student feature to its teacher's shape."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def describe(module: nn.Module) -> str:
    """A module in a few words: ``1x1 conv 16→32, ReLU``, ``linear 64→128``; a module with a ``describe()``
    method says it itself. For the wiring picture (:meth:`kdgraph.losses.Term.connectors`)."""
    if hasattr(module, "describe") and callable(module.describe):
        return module.describe()
    if isinstance(module, nn.Conv2d):
        return f"{module.kernel_size[0]}x{module.kernel_size[1]} conv {module.in_channels}→{module.out_channels}"
    if isinstance(module, nn.Linear):
        return f"linear {module.in_features}→{module.out_features}"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "BN"
    if isinstance(module, nn.Sequential):
        return ", ".join(describe(m) for m in module).replace(", BN", "+BN")
    return type(module).__name__


class Align(nn.Module):
    """Align a student feature with a teacher feature, both given by their traced shapes (no batch).

    * channels: a 1x1 conv + BatchNorm projects the student to the teacher's channels when they differ
      (or always, with ``always``) -- the regressor of FitNets and the connector of Heo et al.;
    * spatial: when the maps' sizes differ, the larger is adaptive-average-pooled to the smaller.
    Embeddings (1-d shapes) get a linear projection when their widths differ and ``channels`` is set.
    """

    def __init__(self, student_shape: tuple, teacher_shape: tuple, channels: bool = True, always: bool = False,
                 spatial: bool = True):
        super().__init__()
        self.shapes = (tuple(student_shape), tuple(teacher_shape))  # (student, teacher): for describe()
        s_c, t_c = student_shape[0], teacher_shape[0]
        self.project: nn.Module | None = None
        if channels and (always or s_c != t_c):
            if len(student_shape) == 3:
                conv = nn.Conv2d(s_c, t_c, 1, bias=False)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                self.project = nn.Sequential(conv, nn.BatchNorm2d(t_c))
            else:
                self.project = nn.Linear(s_c, t_c)
        self.size: tuple | None = None
        self.pool_teacher = False
        if spatial and len(student_shape) == 3 and len(teacher_shape) == 3 and \
                student_shape[1:] != teacher_shape[1:]:
            s_area = student_shape[1] * student_shape[2]
            t_area = teacher_shape[1] * teacher_shape[2]
            self.pool_teacher = t_area > s_area
            self.size = tuple(student_shape[1:]) if self.pool_teacher else tuple(teacher_shape[1:])

    def describe(self) -> str:
        """What this connector does, in a few words: ``1x1 conv+BN 32->64, avg-pool teacher 32x32->16x16``,
        ``none`` when it passes both values through."""
        (s_shape, t_shape), parts = self.shapes, []
        if isinstance(self.project, nn.Sequential):
            parts.append(f"1x1 conv+BN {s_shape[0]}→{t_shape[0]}")
        elif self.project is not None:
            parts.append(f"linear {s_shape[0]}→{t_shape[0]}")
        if self.size is not None:
            who, shape = ("teacher", t_shape) if self.pool_teacher else ("student", s_shape)
            parts.append(f"avg-pool {who} {shape[1]}x{shape[2]}→{self.size[0]}x{self.size[1]}")
        return ", ".join(parts) or "none"

    def forward(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        if self.size is not None:
            if self.pool_teacher:
                teacher = F.adaptive_avg_pool2d(teacher, self.size)
            else:
                student = F.adaptive_avg_pool2d(student, self.size)
        if self.project is not None:
            student = self.project(student)
        return student, teacher


class ABF(nn.Module):
    """Attention-based fusion (Chen et al. 2021, "Distilling Knowledge via Knowledge Review"): one pyramid level.

    ``x`` (a student feature) goes through a 1x1 conv + BN to ``mid_channels``; with ``fuse``, the fused
    map of the deeper level (``residual``) is resized to x's size (nearest) and the two are mixed by two
    per-position attention maps, sigmoid(1x1 conv([x, residual])). The mix is resized to ``out_size``
    (nearest) when it differs, then a 3x3 conv + BN projects it to the teacher's channels. Returns
    ``(output, mix)``: the mix is the next (shallower) level's residual. Convolutions are initialised as
    the authors' (``kaiming_uniform_(a=1)``).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def describe(self) -> str:
        """``ABF fusion: 1x1 conv+BN 64->32, attention mix, 3x3 conv+BN ->128`` (this level's path to the teacher)."""
        conv1, conv2 = self.conv1[0], self.conv2[0]
        mix = ", attention mix with the deeper level" if self.att_conv is not None else ""
        return (f"ABF: 1x1 conv+BN {conv1.in_channels}→{conv1.out_channels}{mix}, "
                f"3x3 conv+BN →{conv2.out_channels}")

    def forward(self, x: Tensor, residual: Tensor | None = None,
                out_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("ABF: a fusing level needs the deeper level's residual")
            residual = F.interpolate(residual, tuple(x.shape[-2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, 0:1] + residual * z[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, tuple(out_size), mode="nearest")
        return self.conv2(x), x


# ------------------------------------------------------------------- methods-B: factor transfer (Kim et al. 2018)
def _conv_stack(channels: list[int], transpose: bool = False) -> nn.Sequential:
    """3x3 (transposed) convolutions with biases, each followed by LeakyReLU(0.1), through ``channels``."""
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [conv(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The teacher-side autoencoder of factor transfer: C -> C -> kC -> kC (the factor) -> kC -> C -> C.

    Three 3x3 convolutions encode, three 3x3 transposed convolutions decode, each followed by
    LeakyReLU(0.1), no BatchNorm, PyTorch's default init (the authors' code). ``forward`` returns the
    reconstruction, :meth:`encode` the factor.
    """

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        self.encoder = _conv_stack([channels, channels, factor_channels, factor_channels])
        self.decoder = _conv_stack([factor_channels, factor_channels, channels, channels], transpose=True)

    def describe(self) -> str:
        """``autoencoder 3x3 convs C→kC→C`` (for the wiring picture)."""
        c, k = self.encoder[0].in_channels, self.encoder[-2].out_channels
        return f"autoencoder 3x3 convs {c}→{k}→{c}"

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class Translator(nn.Module):
    """The student-side encoder of factor transfer: C_s -> C_s -> kC_t -> kC_t, 3x3 convs + LeakyReLU(0.1)."""

    def __init__(self, channels: int, factor_channels: int):
        super().__init__()
        self.encoder = _conv_stack([channels, channels, factor_channels, factor_channels])

    def describe(self) -> str:
        """``3x3 convs C_s→kC_t`` (for the wiring picture)."""
        return f"3x3 convs {self.encoder[0].in_channels}→{self.encoder[-2].out_channels}"

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)
