"""Options that replay the original Distillation project's code (specs/original-code/): its AT form, its
constant margins and eval-mode teacher for margin_ReLU. The references are written here from the formulas
read off its code (framework/losses/at_loss.py, framework/modeling/kd/margin_ReLU.py, train.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdgraph import Distiller
from kdgraph.graph import tap
from kdgraph.losses import functional as KF
from kdgraph.losses.terms import AT, MarginReLU
from kdgraph.models import build_model


def test_at_distillation_project_is_its_broadcast_mse_of_signed_channel_sums():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 4, 4, dtype=torch.float64), torch.randn(3, 7, 4, 4, dtype=torch.float64)
    q_s, q_t = s.sum(1), t.sum(1)  # its map: the channel sum, signed
    total = 0.0
    for a in range(3):  # its normalize(): every map divided by sample a's norm, for every a
        for b in range(3):
            total += ((q_s[b] / q_s[a].norm() - q_t[b] / q_t[a].norm()) ** 2).sum()
    expected = total / (3 * 3 * 4 * 4)  # F.mse_loss: the element mean over (a, b, h, w)
    got = KF.at_distillation_project(s.float(), t.float())
    assert got.dtype == torch.float32 and math.isclose(got.item(), expected.item(), rel_tol=1e-5)
    # it is not the AT authors' map (squared, normalised per sample) even on equal shapes
    assert not math.isclose(KF.at(s, t[:, :5]).item(), KF.at_distillation_project(s, t[:, :5]).item(), rel_tol=1e-2)


def test_at_form_option():
    assert AT(form="distillation-project").form == "distillation-project"
    with pytest.raises(ValueError, match="form must be one of authors, distillation-project"):
        AT(form="original")


def _pair():
    torch.manual_seed(0)
    teacher, student = build_model("wrn-16-1", num_classes=10), build_model("wrn-10-1", num_classes=10)
    with torch.no_grad():  # running statistics far from a batch's, so eval and train mode differ
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.bias.uniform_(-0.5, 0.5)
    return student, teacher.eval()


def test_margin_relu_with_constant_margins_and_the_teacher_in_eval_mode():
    """Its WRN run: 4 pre-ReLU positions, every margin -0.7979, the teacher's BN on running statistics."""
    student, teacher = _pair()
    positions = [[n, n] for n in ("block1.0.relu1:pre", "block2.0.relu1:pre", "block3.0.relu1:pre", "relu:pre")]
    x = torch.randn(8, 3, 16, 16)
    d = Distiller(student, teacher, [{"method": "margin_relu", "margin": -0.7978845608, "teacher_bn": "eval",
                                      "positions": positions}], input_shape=(3, 16, 16), log=lambda s: None)
    d.setup(x)
    term = d.terms[0]
    channels = [16, 16, 32, 64]
    for i, c in enumerate(channels):
        margin = getattr(term, f"margin{i}")
        assert margin.shape == (c,) and torch.all(margin == torch.tensor(-0.7978845608))
    loss, parts, _ = d(x, torch.zeros(8, dtype=torch.long))

    names = [p[0] for p in positions]
    with torch.no_grad():
        t_feats = tap(teacher.eval(), names)(x)[1]  # running statistics: the eval-mode teacher
    s_feats = tap(student, names)(x)[1]
    expected = sum(KF.overhaul(align(s_feats[n], t_feats[n])[0], t_feats[n], getattr(term, f"margin{i}"))
                   / 2 ** (3 - i) for i, (n, align) in enumerate(zip(names, term.align)))
    torch.testing.assert_close(parts["margin_relu"], expected)

    # the default (Heo et al.'s code) sees batch statistics instead: a different loss on the same weights
    heo = Distiller(student, teacher, [{"method": "margin_relu", "margin": -0.7978845608, "positions": positions}],
                    input_shape=(3, 16, 16), log=lambda s: None)
    heo.setup(x)
    heo.terms[0].load_state_dict(term.state_dict())
    assert not torch.allclose(heo(x, torch.zeros(8, dtype=torch.long))[1]["margin_relu"], expected)


@pytest.mark.parametrize("kwargs, message", [({"teacher_bn": "frozen"}, "teacher_bn must be 'train'"),
                                             ({"margin": 0.5}, "margin must be a number <= 0")])
def test_margin_relu_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MarginReLU(**kwargs)
