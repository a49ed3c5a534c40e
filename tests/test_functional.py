"""kdgraph.losses.functional against hand-computed values (math / numpy / scipy, never the same torch
formula twice) and against the properties every distillation loss must keep."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm, truncnorm

from kdgraph.losses import functional as KF


def tensor(values, **kw):
    return torch.tensor(values, dtype=torch.float32, **kw)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def np_softmax(z):
    e = np.exp(np.asarray(z, dtype=np.float64) - np.max(z))
    return e / e.sum()


def np_kl(p, q):
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return float(np.sum(p * np.log(p / q)))


def np_smooth_l1_mean(a, b):
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return float(np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5)))


def approx(value, rel=1e-5, abs=1e-6):
    return pytest.approx(value, rel=rel, abs=abs)


# --------------------------------------------------------------------------------------------------------
# kd

def test_kd_two_classes_by_hand():
    # p_t = (sig(1), sig(-1)), p_s = (sig(-1), sig(1)); log-ratios are +1 and -1, so KL = sig(1) - sig(-1).
    s, t = tensor([[1.0, 2.0]]), tensor([[2.0, 1.0]])
    assert KF.kd(s, t, 1.0).item() == approx(sigmoid(1) - sigmoid(-1))
    # At T = 2 the logit gap halves: KL = 0.5 * (sig(.5) - sig(-.5)), times T^2 = 4.
    assert KF.kd(s, t, 2.0).item() == approx(4 * 0.5 * (sigmoid(0.5) - sigmoid(-0.5)))


def test_kd_three_classes_against_numpy():
    s, t = [0.5, -1.0, 2.0], [1.5, 0.2, -0.3]
    expected = 9 * np_kl(np_softmax(np.array(t) / 3), np_softmax(np.array(s) / 3))
    assert KF.kd(tensor([s]), tensor([t]), 3.0).item() == approx(expected)


def test_kd_is_t_squared_times_plain_kl():
    torch.manual_seed(0)
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    for temperature in (2.0, 4.0, 8.0):
        assert KF.kd(s * temperature, t * temperature, temperature).item() == approx(
            temperature**2 * KF.kd(s, t, 1.0).item()
        )


def test_kd_averages_over_the_batch_not_the_elements():
    s, t = tensor([[0.3, -0.2, 1.0]]), tensor([[1.0, 0.0, -1.0]])
    one = KF.kd(s, t, 4.0).item()
    assert KF.kd(s.repeat(2, 1), t.repeat(2, 1), 4.0).item() == approx(one)
    assert one > 0


# --------------------------------------------------------------------------------------------------------
# dkd

def test_dkd_three_classes_by_hand():
    s, t = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]
    p_s, p_t = np_softmax(s), np_softmax(t)
    tckd = np_kl([p_t[0], 1 - p_t[0]], [p_s[0], 1 - p_s[0]])
    # Non-target classes (1, 2): teacher logits (2, 1), student (2, 3) -> the two-class case of kd.
    nckd = sigmoid(1) - sigmoid(-1)
    target = torch.tensor([0])
    assert KF.dkd(tensor([s]), tensor([t]), target, 1.0, 0.0, 1.0).item() == approx(tckd)
    assert KF.dkd(tensor([s]), tensor([t]), target, 0.0, 1.0, 1.0).item() == approx(nckd)
    assert KF.dkd(tensor([s]), tensor([t]), target, 2.0, 8.0, 2.0).item() == approx(
        4 * (2 * np_kl(*_binary(t, s, 0, 2.0)) + 8 * np_kl(np_softmax([1.0, 0.5]), np_softmax([1.0, 1.5])))
    )


def _binary(t, s, target, temperature):
    p_t, p_s = np_softmax(np.array(t) / temperature), np_softmax(np.array(s) / temperature)
    return [p_t[target], 1 - p_t[target]], [p_s[target], 1 - p_s[target]]


def test_dkd_decomposes_kd():
    # Zhao et al. Eq. 7: KD = TCKD + (1 - p_teacher[target]) * NCKD, per sample.
    torch.manual_seed(1)
    s, t = torch.randn(1, 6), torch.randn(1, 6)
    target = torch.tensor([4])
    p_target = np_softmax(t[0].numpy() / 4.0)[4]
    assert KF.dkd(s, t, target, 1.0, 1.0 - p_target, 4.0).item() == approx(KF.kd(s, t, 4.0).item(), rel=1e-4)


def test_dkd_accepts_any_integer_labels():
    s, t = tensor([[1.0, 2.0, 3.0]]), tensor([[3.0, 2.0, 1.0]])
    expected = KF.dkd(s, t, torch.tensor([2]), 1.0, 8.0, 4.0).item()
    assert KF.dkd(s, t, torch.tensor([2], dtype=torch.int32), 1.0, 8.0, 4.0).item() == approx(expected)


def test_dkd_is_finite_in_half_precision_with_large_logits():
    s = torch.tensor([[30000.0, -30000.0, 0.0], [-60000.0, 60000.0, 100.0]], dtype=torch.float16)
    t = torch.tensor([[-30000.0, 30000.0, 10.0], [60000.0, -60000.0, 0.0]], dtype=torch.float16)
    loss = KF.dkd(s.requires_grad_(), t, torch.tensor([0, 2]), 1.0, 8.0, 4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------------------------------------
# at

def test_at_by_hand():
    s = tensor([[[[1.0, 2.0], [3.0, 4.0]]]])                      # (1, 1, 2, 2)
    t = tensor([[[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, -1.0]]]])  # (1, 2, 2, 2)
    a_s = np.array([1.0, 4.0, 9.0, 16.0]) / math.sqrt(1 + 16 + 81 + 256)
    a_t = np.array([1.0, 0.0, 0.0, 1.0]) / math.sqrt(2)           # channel mean of squares: (1, 0, 0, 1)
    assert KF.at(s, t).item() == approx(float(np.mean((a_s - a_t) ** 2)))


def test_at_p1_uses_absolute_values():
    s = tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    t = tensor([[[[1.0, 0.0], [0.0, -1.0]]]])  # |t| == s
    assert KF.at(s, t, p=1).item() == approx(0.0)
    assert KF.at(s, t, p=2).item() == approx(0.0)


# --------------------------------------------------------------------------------------------------------
# sp

def test_sp_by_hand():
    s = tensor([[1.0, 0.0], [0.0, 1.0]])  # G_s = I, already row-normalised
    t = tensor([[1.0, 0.0], [1.0, 1.0]])  # G_t = [[1, 1], [1, 2]]
    g_t = np.array([[1 / math.sqrt(2), 1 / math.sqrt(2)], [1 / math.sqrt(5), 2 / math.sqrt(5)]])
    expected = float(np.sum((np.eye(2) - g_t) ** 2)) / 4
    assert KF.sp(s, t).item() == approx(expected)


def test_sp_accepts_any_shapes_with_the_same_batch():
    torch.manual_seed(2)
    s, t = torch.randn(3, 2, 4, 4), torch.randn(3, 5)
    assert KF.sp(s, t).item() == approx(KF.sp(s.flatten(1), t).item())
    assert KF.sp(s, t).item() == approx(KF.sp(t, s).item())  # symmetric in its arguments


# --------------------------------------------------------------------------------------------------------
# margin_from_bn / overhaul

def test_margin_from_bn_matches_scipy_truncated_mean():
    gamma = np.array([1.0, -2.0, 0.5, 3.0, 1.0, 0.7])
    beta = np.array([0.0, 1.0, -1.0, -2.0, 4.0, 2.5])
    margins = KF.margin_from_bn(tensor(gamma), tensor(beta)).numpy()
    for g, b, m in zip(np.abs(gamma), beta, margins):
        if norm.cdf(-b / g) > 0.001:
            expected = truncnorm(-np.inf, -b / g, loc=b, scale=g).mean()
        else:
            expected = -3 * g
        assert m == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert margins[0] == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-6)  # N(0, 1): -0.7979
    assert margins[4] == pytest.approx(-3.0)  # beta / |gamma| = 4: fallback branch


def test_margin_from_bn_keeps_dtype_and_guards_zero_gamma():
    margins = KF.margin_from_bn(tensor([0.0, 0.0, 0.0]), tensor([-0.5, 0.0, 0.5]))
    assert margins.dtype == torch.float32
    assert margins.tolist() == [-0.5, 0.0, 0.0]  # constant pre-activation beta: E[x | x < 0] -> min(beta, 0)
    assert KF.margin_from_bn(torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)).dtype \
        == torch.float64


def test_overhaul_by_hand():
    margin = tensor([-1.0, -0.5])
    # One sample, two channels of two positions each; t' = max(t, m) per channel.
    t = tensor([[[[-2.0, -2.0]], [[1.0, 1.0]]]])  # t' = (-1, -1), (1, 1)
    s = tensor([[[[-1.5, 0.5]], [[3.0, 0.0]]]])
    # -1.5 <= t' = -1 <= 0: skipped; 0.5 > -1: 1.5^2; t' = 1 > 0: 2^2 and 1^2.
    assert KF.overhaul(s, t, margin).item() == approx(2.25 + 4.0 + 1.0)
    # Divided by the batch size, not the element count.
    assert KF.overhaul(s.repeat(2, 1, 1, 1), t.repeat(2, 1, 1, 1), margin).item() == approx(7.25)


def test_overhaul_ignores_student_below_non_positive_target():
    margin = tensor([-1.0])
    t = tensor([[[[-3.0, -0.5, 0.0]]]])  # t' = (-1, -0.5, 0)
    s = tensor([[[[-5.0, -0.5, -7.0]]]])  # all at or below their non-positive t'
    assert KF.overhaul(s, t, margin).item() == 0.0
    assert KF.overhaul(s + 10, t, margin).item() > 0  # above t': penalised


# --------------------------------------------------------------------------------------------------------
# fitnet

def test_fitnet_by_hand():
    assert KF.fitnet(tensor([[1.0, 2.0]]), tensor([[0.0, 0.0]])).item() == approx(2.5)


# --------------------------------------------------------------------------------------------------------
# pkt

def test_pkt_by_hand():
    # Student: orthogonal rows -> kernel [[1, .5], [.5, 1]] -> rows (2/3, 1/3). Teacher: parallel rows ->
    # kernel all ones -> rows (1/2, 1/2). Both rows' KL sums are .5 log(.75) + .5 log(1.5) = .5 log(1.125);
    # the authors' code takes the mean over the 4 entries.
    s, t = tensor([[1.0, 0.0], [0.0, 1.0]]), tensor([[1.0, 0.0], [2.0, 0.0]])
    assert KF.pkt(s, t).item() == approx(math.log(1.125) / 4, rel=1e-4)


# --------------------------------------------------------------------------------------------------------
# rkd

def _np_distances(x):
    x = np.asarray(x, dtype=np.float64)
    d = np.array([[np.linalg.norm(a - b) for b in x] for a in x])
    return d / d[d > 0].mean()


def _np_angles(x):
    x = np.asarray(x, dtype=np.float64)
    n = len(x)

    def unit(v):
        length = np.linalg.norm(v)
        return v / length if length > 0 else v

    return np.array([[[unit(x[j] - x[i]) @ unit(x[k] - x[i]) for k in range(n)] for j in range(n)]
                     for i in range(n)])


S_POINTS = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]  # right angle at the origin
T_POINTS = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]


def test_rkd_distance_by_hand():
    expected = np_smooth_l1_mean(_np_distances(S_POINTS), _np_distances(T_POINTS))
    assert KF.rkd_distance(tensor(S_POINTS), tensor(T_POINTS)).item() == approx(expected)


def test_rkd_angle_by_hand():
    t_points = [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]  # collinear
    expected = np_smooth_l1_mean(_np_angles(S_POINTS), _np_angles(t_points))
    assert expected > 0
    assert KF.rkd_angle(tensor(S_POINTS), tensor(t_points)).item() == approx(expected)


def test_rkd_is_the_weighted_sum_and_similarity_invariant():
    s, t = tensor(S_POINTS), tensor(T_POINTS)
    expected = 25 * KF.rkd_distance(s, t) + 50 * KF.rkd_angle(s, t)
    assert KF.rkd(s, t).item() == approx(expected.item())
    assert KF.rkd(s, t, distance_weight=1.0, angle_weight=0.0).item() == approx(KF.rkd_distance(s, t).item())
    rotated = s @ tensor([[0.0, -1.0], [1.0, 0.0]])
    assert KF.rkd(s, 3 * rotated + 5).item() == approx(0.0, abs=1e-5)  # scale, rotation, translation


# --------------------------------------------------------------------------------------------------------
# nst

def test_nst_by_hand():
    # Orthogonal unit maps: K_ss = K_tt = 1, K_st = 0.
    assert KF.nst(tensor([[[[3.0, 0.0]]]]), tensor([[[[0.0, 2.0]]]])).item() == approx(2.0)
    # Student channels e1, e2 (K_ss mean 1/2); teacher (1, 1)/sqrt 2 (K_tt = 1); K_st entries 1/2 each.
    s = tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    t = tensor([[[[1.0, 1.0]]]])               # (1, 1, 1, 2)
    assert KF.nst(s, t).item() == approx(0.5 + 1.0 - 2 * 0.5)


# --------------------------------------------------------------------------------------------------------
# properties shared by every loss

MARGIN = tensor([-0.5, -1.0, -0.2])
TARGET = torch.tensor([0, 1, 2, 3])

# (name, loss(student, teacher), student shape, teacher shape); equal shapes where the loss needs them.
LOSSES = [
    ("kd", lambda s, t: KF.kd(s, t, 4.0), (4, 5), (4, 5)),
    ("dkd", lambda s, t: KF.dkd(s, t, TARGET, 1.0, 8.0, 4.0), (4, 5), (4, 5)),
    ("at", lambda s, t: KF.at(s, t), (4, 3, 4, 4), (4, 6, 4, 4)),
    ("sp", KF.sp, (4, 3, 4, 4), (4, 6, 2, 2)),
    ("overhaul", lambda s, t: KF.overhaul(s, t, MARGIN), (4, 3, 4, 4), (4, 3, 4, 4)),
    ("fitnet", KF.fitnet, (4, 3, 4, 4), (4, 3, 4, 4)),
    ("pkt", lambda s, t: KF.pkt(s, t), (4, 8), (4, 16)),
    ("rkd", lambda s, t: KF.rkd(s, t), (5, 8), (5, 16)),
    ("rkd_distance", KF.rkd_distance, (5, 8), (5, 16)),
    ("rkd_angle", KF.rkd_angle, (5, 8), (5, 16)),
    ("nst", KF.nst, (4, 3, 4, 4), (4, 6, 4, 4)),
]
LOSS_PARAMS = [pytest.param(loss, s_shape, t_shape, id=name) for name, loss, s_shape, t_shape in LOSSES]


def _inputs(s_shape, t_shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(s_shape, generator=generator), torch.randn(t_shape, generator=generator)


@pytest.mark.parametrize("loss, s_shape, t_shape", LOSS_PARAMS)
def test_zero_when_student_equals_teacher(loss, s_shape, t_shape):
    x, _ = _inputs(s_shape, s_shape)
    assert loss(x, x.clone()).item() == approx(0.0, abs=1e-5)


@pytest.mark.parametrize("loss, s_shape, t_shape", LOSS_PARAMS)
def test_returns_positive_float32_scalar(loss, s_shape, t_shape):
    value = loss(*_inputs(s_shape, t_shape))
    assert value.shape == () and value.dtype == torch.float32 and value.item() > 0


@pytest.mark.parametrize("loss, s_shape, t_shape", LOSS_PARAMS)
def test_gradients_reach_student_and_teacher_is_not_detached(loss, s_shape, t_shape):
    s, t = _inputs(s_shape, t_shape)
    s.requires_grad_()
    t.requires_grad_()
    loss(s, t).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("loss, s_shape, t_shape", LOSS_PARAMS)
def test_inputs_are_not_modified(loss, s_shape, t_shape):
    s, t = _inputs(s_shape, t_shape)
    s_copy, t_copy = s.clone(), t.clone()
    loss(s, t)
    assert torch.equal(s, s_copy) and torch.equal(t, t_copy)


@pytest.mark.parametrize("loss, s_shape, t_shape", LOSS_PARAMS)
def test_bf16_autocast_computes_in_float32(loss, s_shape, t_shape):
    s, t = _inputs(s_shape, t_shape)
    reference = loss(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same_inputs = loss(s, t)
        s_bf16 = s.bfloat16().requires_grad_()
        half_inputs = loss(s_bf16, t.bfloat16())
    assert same_inputs.dtype == torch.float32
    assert same_inputs.item() == approx(reference.item())
    assert half_inputs.dtype == torch.float32 and torch.isfinite(half_inputs)
    assert half_inputs.item() == pytest.approx(reference.item(), rel=0.05, abs=1e-4)
    half_inputs.backward()
    assert s_bf16.grad.dtype == torch.bfloat16 and torch.isfinite(s_bf16.grad.float()).all()


# --------------------------------------------------------------------------------------------------------
# shape errors

R = torch.randn
SHAPE_ERRORS = [
    ("kd", lambda: KF.kd(R(2, 3), R(2, 4), 4.0), "shapes must match"),
    ("kd-3d", lambda: KF.kd(R(2, 3, 1), R(2, 3, 1), 4.0), "logits"),
    ("kd-temperature", lambda: KF.kd(R(2, 3), R(2, 3), 0.0), "temperature"),
    ("dkd", lambda: KF.dkd(R(2, 3), R(1, 3), torch.tensor([0, 1]), 1, 8, 4), "shapes"),
    ("dkd-target", lambda: KF.dkd(R(2, 3), R(2, 3), torch.tensor([0]), 1, 8, 4), "target"),
    ("dkd-float-target", lambda: KF.dkd(R(2, 3), R(2, 3), torch.zeros(2), 1, 8, 4), "integer"),
    ("at-spatial", lambda: KF.at(R(2, 3, 4, 4), R(2, 3, 8, 8)), r"\(2, 3, 4, 4\).*\(2, 3, 8, 8\)"),
    ("at-batch", lambda: KF.at(R(2, 3, 4, 4), R(3, 3, 4, 4)), "batch and spatial"),
    ("at-2d", lambda: KF.at(R(2, 3), R(2, 3)), "spatial"),
    ("sp", lambda: KF.sp(R(2, 3), R(3, 3)), "batch sizes"),
    ("overhaul", lambda: KF.overhaul(R(2, 3, 4, 4), R(2, 3, 2, 2), MARGIN), "shapes"),
    ("overhaul-margin", lambda: KF.overhaul(R(2, 4, 1, 1), R(2, 4, 1, 1), MARGIN), "margin"),
    ("margin", lambda: KF.margin_from_bn(torch.ones(3), torch.ones(2)), "weight and bias"),
    ("fitnet", lambda: KF.fitnet(R(2, 3, 4, 4), R(2, 3, 1, 1)), "shapes must match"),
    ("pkt", lambda: KF.pkt(R(2, 3), R(4, 3)), "batch sizes"),
    ("rkd", lambda: KF.rkd(R(2, 3), R(4, 3)), "batch sizes"),
    ("rkd-one", lambda: KF.rkd_distance(R(1, 3), R(1, 3)), "at least 2"),
    ("nst", lambda: KF.nst(R(2, 3, 4, 4), R(2, 3, 4, 2)), "spatial"),
]


@pytest.mark.parametrize("call, message", [pytest.param(c, m, id=n) for n, c, m in SHAPE_ERRORS])
def test_shape_mismatch_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()
