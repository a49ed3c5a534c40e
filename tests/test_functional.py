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
# methods-B: logit standardization, dist, vid, cc, srrl -- float64 values and gradients against numpy
# references (scipy's normal log-density, numpy's Pearson correlation, plain loops) and central differences.

def np_num_grad(f, x, h=1e-6):
    """Central differences of the numpy function f at x (float64)."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += h
        down[idx] -= h
        grad[idx] = (f(up) - f(down)) / (2 * h)
    return grad


def rel_diff(a, b) -> float:
    """max |a - b| / max |b|: the relative difference of a to the reference b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def fidelity(torch_fn, np_fn, inputs, wrt=(0,), dtype=torch.float64):
    """(loss, gradient) relative differences of torch_fn against np_fn at ``inputs`` (numpy arrays).

    Gradients of torch_fn (autograd, in ``dtype``) are compared with central differences of np_fn in float64
    for each argument index in ``wrt``; the worst is returned.
    """
    tensors = [torch.tensor(x, dtype=dtype, requires_grad=i in wrt) for i, x in enumerate(inputs)]
    value = torch_fn(*tensors)
    grads = torch.autograd.grad(value, [tensors[i] for i in wrt])
    loss_rel = rel_diff(value.item(), np_fn(*inputs))
    grad_rel = 0.0
    for i, g in zip(wrt, grads):
        def at(x, i=i):
            return np_fn(*[x if j == i else y for j, y in enumerate(inputs)])
        grad_rel = max(grad_rel, rel_diff(g.double().numpy(), np_num_grad(at, inputs[i])))
    return loss_rel, grad_rel


def np_softmax_rows(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_standardize(z, eps=1e-7):
    """Z-score per row with the n - 1 standard deviation, eps added to it (Sun et al.'s code)."""
    z = np.asarray(z, dtype=np.float64)
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + eps)


def np_kd_rows(s, t, temperature):
    p_s, p_t = np_softmax_rows(s / temperature), np_softmax_rows(t / temperature)
    return temperature**2 * np.mean([np_kl(a, b) for a, b in zip(p_t, p_s)])


def np_dkd_rows(s, t, target, alpha, beta, temperature):
    p_s, p_t = np_softmax_rows(s / temperature), np_softmax_rows(t / temperature)
    total = 0.0
    for i, y in enumerate(target):
        keep = np.arange(s.shape[1]) != y
        tckd = np_kl([p_t[i, y], 1 - p_t[i, y]], [p_s[i, y], 1 - p_s[i, y]])
        nckd = np_kl(np_softmax(t[i, keep] / temperature), np_softmax(s[i, keep] / temperature))
        total += alpha * tckd + beta * nckd
    return temperature**2 * total / len(target)


def np_dist(s, t, beta, gamma, temperature, eps=1e-8):
    """1 - Pearson (numpy's corrcoef), rescaled for the eps the authors add to the norm product."""
    p_s, p_t = np_softmax_rows(s / temperature), np_softmax_rows(t / temperature)

    def rho(a, b):
        ca, cb = a - a.mean(), b - b.mean()
        norms = np.linalg.norm(ca) * np.linalg.norm(cb)
        return np.corrcoef(a, b)[0, 1] * norms / (norms + eps)

    inter = 1 - np.mean([rho(a, b) for a, b in zip(p_s, p_t)])
    intra = 1 - np.mean([rho(a, b) for a, b in zip(p_s.T, p_t.T)])
    return temperature**2 * (beta * inter + gamma * intra)


def np_vid(mean, target, variance):
    """Mean Gaussian negative log-likelihood (scipy) without its 0.5 log(2 pi) constant."""
    scale = np.sqrt(np.asarray(variance, dtype=np.float64)).reshape(1, -1, 1, 1)
    return float(np.mean(-norm.logpdf(target, loc=mean, scale=scale)) - 0.5 * math.log(2 * math.pi))


def np_cc_code(s, t):
    b, d = s.shape
    return sum(abs(s[i, k] - t[i, k]) * abs(s[i + 1, k] - t[i + 1, k]) for i in range(b - 1) for k in range(d)) / (b - 1)


def np_rbf_taylor(x, gamma, order):
    unit = [row / np.linalg.norm(row) for row in np.asarray(x, dtype=np.float64)]
    return np.array([[math.exp(-2 * gamma) * sum((2 * gamma) ** p / math.factorial(p) * float(u @ v) ** p
                                                  for p in range(order + 1)) for v in unit] for u in unit])


def np_cc_paper(s, t, gamma=0.4, order=2):
    return float(np.sum((np_rbf_taylor(s, gamma, order) - np_rbf_taylor(t, gamma, order)) ** 2)) / len(s) ** 2


def np_srrl(s, t, regressed, teacher_logits):
    s_pooled, t_pooled = s.reshape(*s.shape[:2], -1).mean(axis=2), t.reshape(*t.shape[:2], -1).mean(axis=2)
    return float(np.mean((s_pooled - t_pooled) ** 2) + np.mean((regressed - teacher_logits) ** 2))


def np_ft(s, t):
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    return float(np.mean(np.abs(s - t)))


def np_fsp_matrix(a, c):
    b, ca, h, w = a.shape
    return np.array([[[sum(a[n, i, y, x] * c[n, j, y, x] for y in range(h) for x in range(w)) / (h * w)
                       for j in range(c.shape[1])] for i in range(ca)] for n in range(b)])


def np_avg_pool2(x):
    """2x2 average pooling (what adaptive pooling does from 2H x 2W to H x W)."""
    return (x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]) / 4


def np_fsp(s1, s2, t1, t2):
    g_s = np_fsp_matrix(np_avg_pool2(s1), s2)  # the first maps are twice as large: pooled
    g_t = np_fsp_matrix(np_avg_pool2(t1), t2)
    return float(np.mean((g_s - g_t) ** 2))


def np_ab(s, t, margin=1.0):
    total = 0.0
    for sv, tv in zip(np.ravel(s), np.ravel(t)):
        if tv <= 0 and sv > -margin:
            total += (sv + margin) ** 2
        elif tv > 0 and sv <= margin:
            total += (sv - margin) ** 2
    return total / len(s)


_RNG = np.random.default_rng(14)
_S, _T = _RNG.normal(size=(5, 7)) * 3, _RNG.normal(size=(5, 7)) * 3
_Y = np.array([0, 3, 6, 3, 1])
_MU, _FT, _VAR = _RNG.normal(size=(2, 3, 2, 2)), _RNG.normal(size=(2, 3, 2, 2)), _RNG.uniform(0.5, 5, size=3)
_ES, _ET = _RNG.normal(size=(4, 6)), _RNG.normal(size=(4, 6))
_FS, _FTM = _RNG.normal(size=(3, 4, 2, 2)), _RNG.normal(size=(3, 4, 2, 2))
_ZR, _ZT = _RNG.normal(size=(3, 5)), _RNG.normal(size=(3, 5))

_F1, _F2 = _RNG.normal(size=(3, 4, 2, 2)), _RNG.normal(size=(3, 4, 2, 2))
_S1, _S2, _T1, _T2 = (_RNG.normal(size=(2, 3, 4, 4)), _RNG.normal(size=(2, 2, 2, 2)), _RNG.normal(size=(2, 3, 4, 4)),
                      _RNG.normal(size=(2, 2, 2, 2)))
_AS, _AT = _RNG.normal(size=(2, 3, 2, 2)) * 2, _RNG.normal(size=(2, 3, 2, 2))
assert np.min(np.abs(np.abs(_AS) - 1.0)) > 1e-3  # no student value on a margin: the loss is smooth there

# (name, kdgraph function, numpy reference, inputs, indices of the inputs to differentiate)
FIDELITY = [
    ("kd-standardize", lambda s, t: KF.kd(s, t, 2.0, standardize=True),
     lambda s, t: np_kd_rows(np_standardize(s), np_standardize(t), 2.0), (_S, _T), (0,)),
    ("dkd-standardize", lambda s, t: KF.dkd(s, t, torch.tensor(_Y), 1.0, 8.0, 2.0, standardize=True),
     lambda s, t: np_dkd_rows(np_standardize(s), np_standardize(t), _Y, 1.0, 8.0, 2.0), (_S, _T), (0,)),
    ("dist", lambda s, t: KF.dist(s, t, 1.0, 1.0, 4.0), lambda s, t: np_dist(s, t, 1.0, 1.0, 4.0), (_S, _T), (0,)),
    ("dist-beta-gamma", lambda s, t: KF.dist(s, t, 0.5, 2.0, 1.0), lambda s, t: np_dist(s, t, 0.5, 2.0, 1.0),
     (_S, _T), (0,)),
    ("vid", KF.vid, np_vid, (_MU, _FT, _VAR), (0, 2)),
    ("cc-code", KF.cc, np_cc_code, (_ES, _ET), (0,)),
    ("cc-paper", lambda s, t: KF.cc(s, t, form="paper"), np_cc_paper, (_ES, _ET[:, :4]), (0,)),
    ("srrl", KF.srrl, np_srrl, (_FS, _FTM, _ZR, _ZT), (0, 2)),
    ("ft", KF.ft, np_ft, (_F1, _F2), (0,)),
    ("fsp", KF.fsp, np_fsp, (_S1, _S2, _T1, _T2), (0, 1)),
    ("ab", KF.ab, np_ab, (_AS, _AT), (0,)),
]


@pytest.mark.parametrize("fn, ref, inputs, wrt", [pytest.param(*f[1:], id=f[0]) for f in FIDELITY])
def test_fidelity_loss_and_gradient_in_float64(fn, ref, inputs, wrt):
    loss_rel, grad_rel = fidelity(fn, ref, inputs, wrt)
    assert loss_rel < 1e-12 and grad_rel < 1e-7, (loss_rel, grad_rel)


@pytest.mark.parametrize("fn, ref, inputs, wrt", [pytest.param(*f[1:], id=f[0]) for f in FIDELITY])
def test_fidelity_loss_and_gradient_in_float32(fn, ref, inputs, wrt):
    loss_rel, grad_rel = fidelity(fn, ref, inputs, wrt, dtype=torch.float32)
    assert loss_rel < 2e-6 and grad_rel < 2e-5, (loss_rel, grad_rel)


def test_logit_standardize_is_a_z_score():
    z = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 13.0]], dtype=torch.float64)
    # row 1: mean 2, n-1 std 1; row 2: mean 11, n-1 std sqrt(3)
    expected = [[-1.0, 0.0, 1.0], [-1 / math.sqrt(3), -1 / math.sqrt(3), 2 / math.sqrt(3)]]
    assert np.allclose(KF.logit_standardize(z, eps=0.0).numpy(), expected, rtol=1e-12)
    # invariant to the logits' shift and (positive) scale: only their relations remain
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    assert KF.kd(3 * s + 7, t, 2.0, standardize=True).item() == approx(KF.kd(s, t, 2.0, standardize=True).item())
    assert KF.kd(s, 0.1 * t - 2, 2.0, standardize=True).item() == approx(KF.kd(s, t, 2.0, standardize=True).item())


def test_dist_perfect_correlation_is_zero_and_anticorrelation_is_two():
    # Pearson is invariant to affine maps of the probabilities; identical inputs give 0 for both terms
    z = tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    assert KF.dist(z, z, temperature=1.0).item() == approx(0.0, abs=1e-6)
    # two classes: p and 1 - p are perfectly anti-correlated across classes (inter = 1 - (-1) = 2)
    s, t = tensor([[1.0, 0.0], [0.0, 2.0]]), tensor([[0.0, 1.0], [3.0, 0.0]])
    assert KF.dist(s, t, beta=1.0, gamma=0.0, temperature=1.0).item() == approx(2.0)


def test_vid_at_the_mean_is_half_log_variance():
    t = torch.randn(2, 3, 4, 4)
    var = tensor([0.5, 1.0, 4.0])
    assert KF.vid(t, t, var).item() == approx(0.5 * float(np.mean(np.log([0.5, 1.0, 4.0]))))


def test_cc_paper_taylor_series_converges_to_the_gaussian_rbf():
    x = np.random.default_rng(0).normal(size=(4, 5))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    rbf = np.exp(-0.4 * ((unit[:, None] - unit[None]) ** 2).sum(-1))
    assert np.allclose(np_rbf_taylor(x, 0.4, 20), rbf, rtol=1e-12, atol=1e-14)
    # the kdgraph matrix with a long series, through the loss against an exactly orthogonal teacher
    from kdgraph.losses.functional import _rbf_correlation
    assert np.allclose(_rbf_correlation(torch.tensor(x), 0.4, 20).numpy(), rbf, rtol=1e-12, atol=1e-14)


def test_cc_code_form_by_hand():
    # D = |s - t| = [[1, 2], [3, 0], [1, 1]]: pairs (0,1) -> 1*3 + 2*0 = 3, (1,2) -> 3*1 + 0*1 = 3; mean 3
    s = tensor([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    t = tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    assert KF.cc(s, t).item() == approx(3.0)


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
    # methods-B
    ("kd-standardize", lambda s, t: KF.kd(s, t, 2.0, standardize=True), (4, 5), (4, 5)),
    ("dkd-standardize", lambda s, t: KF.dkd(s, t, TARGET, 1.0, 8.0, 2.0, standardize=True), (4, 5), (4, 5)),
    ("dist", lambda s, t: KF.dist(s, t, temperature=1.0), (4, 5), (4, 5)),
    ("vid", lambda s, t: KF.vid(s, t, torch.ones(3)), (4, 3, 4, 4), (4, 3, 4, 4)),
    ("cc", KF.cc, (4, 8), (4, 8)),
    ("cc-paper", lambda s, t: KF.cc(s, t, form="paper"), (4, 8), (4, 16)),
    ("srrl", lambda s, t: KF.srrl(s, t, _pool_head(s), _pool_head(t)), (4, 3, 4, 4), (4, 3, 4, 4)),
    ("ft", KF.ft, (4, 3, 4, 4), (4, 3, 4, 4)),
    ("fsp", lambda s, t: KF.fsp(s, s.flip(1), t, t.flip(1)), (4, 3, 4, 4), (4, 3, 4, 4)),
    # ab is zero where the student is beyond the margin on the teacher's side: s + 2 sign(s) is, where t = s
    ("ab", lambda s, t: KF.ab(s + 2 * s.sign(), t), (4, 3, 4, 4), (4, 3, 4, 4)),
]


def _pool_head(feat):
    """A fixed linear classifier on globally pooled features, standing in for a teacher's head."""
    weight = torch.linspace(-1, 1, 15, dtype=feat.dtype, device=feat.device).view(5, 3)
    with torch.autocast(feat.device.type, enabled=False):  # the head is not under test: keep it exact
        return feat.mean(dim=(2, 3)) @ weight.t()


LOSS_PARAMS = [pytest.param(loss, s_shape, t_shape, id=name) for name, loss, s_shape, t_shape in LOSSES]
# ab reads the teacher only through the sign of its pre-activations: no gradient path to check there
TEACHER_GRAD_PARAMS = [p for p in LOSS_PARAMS if p.id != "ab"]


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


@pytest.mark.parametrize("loss, s_shape, t_shape", TEACHER_GRAD_PARAMS)
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
    # methods-B
    ("kd-standardize-one-class", lambda: KF.kd(R(2, 1), R(2, 1), 2.0, standardize=True), "2 classes"),
    ("dist", lambda: KF.dist(R(2, 3), R(2, 4)), "shapes must match"),
    ("dist-temperature", lambda: KF.dist(R(2, 3), R(2, 3), temperature=-1.0), "temperature"),
    ("vid", lambda: KF.vid(R(2, 3, 4, 4), R(2, 3, 2, 2), torch.ones(3)), "shapes must match"),
    ("vid-variance", lambda: KF.vid(R(2, 3, 4, 4), R(2, 3, 4, 4), torch.ones(4)), "variance"),
    ("cc", lambda: KF.cc(R(3, 4), R(3, 5)), "shapes must match"),
    ("cc-one", lambda: KF.cc(R(1, 4), R(1, 4)), "at least 2"),
    ("cc-form", lambda: KF.cc(R(3, 4), R(3, 4), form="taylor"), "form"),
    ("srrl", lambda: KF.srrl(R(2, 3, 4, 4), R(2, 5, 4, 4), R(2, 6), R(2, 6)), "shapes must match"),
    ("srrl-logits", lambda: KF.srrl(R(2, 3, 4, 4), R(2, 3, 4, 4), R(2, 6), R(2, 7)), "shapes must match"),
    ("ft", lambda: KF.ft(R(2, 3, 4, 4), R(2, 3, 2, 2)), "as many values"),
    ("fsp", lambda: KF.fsp(R(2, 3, 4, 4), R(2, 2, 2, 2), R(2, 4, 4, 4), R(2, 2, 2, 2)), "channel counts"),
    ("fsp-3d", lambda: KF.fsp(R(2, 3, 4), R(2, 2, 2), R(2, 3, 4), R(2, 2, 2)), "fsp_matrix"),
    ("ab", lambda: KF.ab(R(2, 3, 4, 4), R(2, 3, 2, 2)), "shapes must match"),
]


@pytest.mark.parametrize("call, message", [pytest.param(c, m, id=n) for n, c, m in SHAPE_ERRORS])
def test_shape_mismatch_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()
