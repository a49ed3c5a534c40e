"""Connectors: the small trainable modules that bring a student feature to its teacher's shape."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


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

    def forward(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        if self.size is not None:
            if self.pool_teacher:
                teacher = F.adaptive_avg_pool2d(teacher, self.size)
            else:
                student = F.adaptive_avg_pool2d(student, self.size)
        if self.project is not None:
            student = self.project(student)
        return student, teacher
