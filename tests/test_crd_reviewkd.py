"""CRD and ReviewKD: the pure functions against float64 numpy references written from the papers and the
authors' code (loss and gradient), the terms' wiring (memory banks, negatives, normalisers, fusion order),
and their state through checkpoints."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdgraph.losses import Outputs, Setup, build_terms
from kdgraph.losses import functional as KF
from kdgraph.losses.connectors import ABF
from kdgraph.losses.terms import CRD, ReviewKD
from tests.conftest import tiny_spec, write_yaml

EPS = 1e-7


def rel(a, b) -> float:
    """max |a - b| / max |b| (the relative difference of two arrays)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# --------------------------------------------------------------------------------------------------- crd
def np_nce(p, n_data):
    """RepDistiller's ContrastLoss, Tian et al. Eq. 18: P_n = 1/N, K noise samples, eps 1e-7."""
    k = p.shape[1] - 1
    c = k / n_data
    pos, neg = p[:, 0], p[:, 1:]
    return -(np.log(pos / (pos + c + EPS)).sum() + np.log(c / (neg + c + EPS)).sum()) / p.shape[0]


def np_nce_grad(p, n_data):
    """d loss / d P, elementwise (b, 1 + K)."""
    k = p.shape[1] - 1
    c = k / n_data
    g = 1.0 / (p + c + EPS)
    g[:, 0] = -(1.0 / p[:, 0] - 1.0 / (p[:, 0] + c + EPS))
    return g / p.shape[0]


def np_crd(vs, vt, rows_s, rows_t, n_data, temperature, z=(None, None)):
    """Loss, grad wrt vs and vt, and the Z used: the student anchor against teacher rows, and back."""
    out, grads, zs = 0.0, [], []
    for v, rows, zi in ((vs, rows_t, z[0]), (vt, rows_s, z[1])):
        e = np.exp(np.einsum("bkd,bd->bk", rows, v) / temperature)
        zi = e.mean() * n_data if zi is None else zi
        p = e / zi
        out += np_nce(p, n_data)
        grads.append(np.einsum("bk,bkd->bd", np_nce_grad(p, n_data) * p / temperature, rows))  # dP/dv = P r / T
        zs.append(zi)
    return out, grads[0], grads[1], zs


def crd_inputs(b=6, k=9, d=5, n=40, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    vs, vt = unit(rng.normal(size=(b, d))), unit(rng.normal(size=(b, d)))
    rows_s, rows_t = unit(rng.normal(size=(b, k + 1, d))), unit(rng.normal(size=(b, k + 1, d)))
    return [x.astype(dtype) for x in (vs, vt, rows_s, rows_t)] + [n]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_crd_loss_and_gradient_match_the_numpy_reference(dtype, tol):
    vs, vt, rows_s, rows_t, n = crd_inputs()
    ref, g_s, g_t, (zs, zt) = np_crd(vs, vt, rows_s, rows_t, n, 0.07)
    a, b = (torch.tensor(x, dtype=dtype, requires_grad=True) for x in (vs, vt))
    loss = KF.crd(a, b, torch.tensor(rows_s, dtype=dtype), torch.tensor(rows_t, dtype=dtype), n, 0.07)
    loss.backward()
    assert rel(loss.item(), ref) < tol
    assert rel(a.grad, g_s) < tol and rel(b.grad, g_t) < tol
    # with the normalisers given (the term passes the first batch's), the same loss
    again = KF.crd(a, b, torch.tensor(rows_s, dtype=dtype), torch.tensor(rows_t, dtype=dtype), n, 0.07,
                   float(zs), float(zt))
    assert rel(again.item(), ref) < tol


def test_crd_nce_by_hand():
    # one sample, one negative, N = 2: c = K/N = 0.5; P = (0.5, 0.25)
    p = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
    expected = -(math.log(0.5 / (1.0 + EPS)) + math.log(0.5 / (0.75 + EPS)))
    assert KF.crd_nce(p, 2).item() == pytest.approx(expected, rel=1e-12)


def test_crd_normaliser_is_the_mean_score_times_n():
    scores = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert KF.crd_normaliser(scores, 10).item() == pytest.approx(30.0)


def test_crd_bank_update_matches_numpy():
    rng = np.random.default_rng(3)
    rows, v = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    mixed = 0.5 * rows + 0.5 * v
    expected = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
    got = KF.crd_bank_update(torch.tensor(rows, dtype=torch.float32), torch.tensor(v, dtype=torch.float32), 0.5)
    assert rel(got, expected) < 1e-6 and got.dtype == torch.float32


def test_crd_shapes_are_checked():
    with pytest.raises(ValueError, match="bank rows"):
        KF.crd_scores(torch.randn(3, 4), torch.randn(3, 5, 2), 0.07)


# --------------------------------------------------------------------------------------------------- hcl
def np_pool_matrix(size, out):
    """Adaptive average pooling along one axis as an (out, size) matrix (PyTorch's window rule)."""
    m = np.zeros((out, size))
    for i in range(out):
        lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def np_hcl(students, teachers):
    """Chen et al.'s HCL and its gradient wrt each student map: mse + pooled mses (4, 2, 1 < H) weighted 1/2, 1/4,
    1/8, over the sum of the weights; levels summed."""
    total, grads = 0.0, []
    for s, t in zip(students, teachers):
        h, w = s.shape[2:]
        d = s - t
        level, grad, weights, weight = np.mean(d**2), 2 * d / d.size, 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            weight /= 2
            ph, pw = np_pool_matrix(h, size), np_pool_matrix(w, size)
            pd = np.einsum("ih,bchw,jw->bcij", ph, d, pw)
            level += weight * np.mean(pd**2)
            grad = grad + weight * np.einsum("ih,bcij,jw->bchw", ph, 2 * pd / pd.size, pw)
            weights += weight
        total += level / weights
        grads.append(grad / weights)
    return total, grads


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_hcl_loss_and_gradient_match_the_numpy_reference(dtype, tol):
    rng = np.random.default_rng(1)
    shapes = [(3, 4, 8, 8), (3, 6, 5, 5), (3, 8, 2, 2), (3, 8, 1, 1)]  # 5x5: windows that overlap
    students = [rng.normal(size=s) for s in shapes]
    teachers = [rng.normal(size=s) for s in shapes]
    ref, grads = np_hcl(students, teachers)
    xs = [torch.tensor(s, dtype=dtype, requires_grad=True) for s in students]
    loss = KF.hcl(xs, [torch.tensor(t, dtype=dtype) for t in teachers])
    loss.backward()
    assert rel(loss.item(), ref) < tol
    for x, g in zip(xs, grads):
        assert rel(x.grad, g) < tol


def test_hcl_by_hand():
    # one 2x2 map, student 1 everywhere, teacher 0: mse 1; 1x1 pool: mse 1 weighted 1/2 -> (1 + 0.5) / 1.5
    s, t = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    assert KF.hcl([s], [t]).item() == pytest.approx(1.0)
    t[0, 0, 0, 0] = 4.0  # d = (-3, 1, 1, 1): mse 3; pooled d = 0 -> 3 / 1.5
    assert KF.hcl([s], [t]).item() == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------- terms
def crd_term(n=30, embed=4, negatives=7, classes=3, **kw):
    term = CRD(embed_dim=embed, negatives=negatives, **kw)
    term.pairs = [("t", "s")]
    targets = torch.arange(n) % classes
    term.setup(Setup(student=None, teacher=None, student_shapes={"s": (5,)}, teacher_shapes={"t": (6,)},
                     num_samples=n, targets=targets, seed=11, log=lambda s: None))
    return term, targets


def test_crd_term_negatives_are_other_classes_and_the_positive_comes_first():
    term, targets = crd_term(n=30, negatives=200)
    index = torch.tensor([3, 17, 29, 0])
    idx = term.contrast_indices(index, index)
    assert idx.shape == (4, 201) and torch.equal(idx[:, 0], index)
    for row, i in zip(idx, index):
        assert (targets[row[1:]] != targets[i]).all()
        assert len(torch.unique(row[1:])) == 20  # every one of the 20 other-class samples turns up
    # the same sample's negatives do not depend on the rest of the batch's split over processes
    again = term.contrast_indices(index[2:], torch.cat([index[2:], index[:2]]))
    assert torch.equal(again, idx[2:])
    uniform, _ = crd_term(n=30, negatives=500, negatives_from="all")
    assert len(torch.unique(uniform.contrast_indices(index, index)[:, 1:])) == 30


def test_crd_term_computes_the_authors_pipeline():
    """One step of the term equals the numpy pipeline on the same heads, banks and indices: heads + L2 norm,
    scores against the *other* model's bank, Z from this first batch, bank rows updated after."""
    torch.manual_seed(0)
    term, _ = crd_term()
    term.train()
    fs, ft, index = torch.randn(4, 5), torch.randn(4, 6), torch.tensor([1, 8, 20, 13])
    banks = {k: v.clone() for k, v in term.state_dict().items() if k.endswith("bank")}
    draws = term.draws
    idx = term.contrast_indices(index, index)
    term.draws = draws  # contrast_indices does not advance the counter; forward does
    out = Outputs(logits=torch.zeros(4, 3), target=torch.zeros(4, dtype=torch.long), feats={"s": fs},
                  teacher_feats={"t": ft}, index=index)
    loss = term(out)

    def head(lin, x):
        e = x.double().numpy() @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    vs, vt = head(term.embed_student, fs), head(term.embed_teacher, ft)
    rows_s, rows_t = banks["student_bank"].double().numpy()[idx], banks["teacher_bank"].double().numpy()[idx]
    ref, *_ , z = np_crd(vs, vt, rows_s, rows_t, 30, 0.07)
    assert rel(loss.item(), ref) < 2e-6
    assert term.z == pytest.approx(z, rel=1e-6) and term.draws == draws + 1
    for name, v in (("student_bank", vs), ("teacher_bank", vt)):
        mixed = 0.5 * banks[name].double().numpy()[index] + 0.5 * v
        assert rel(getattr(term, name)[index], mixed / np.linalg.norm(mixed, axis=1, keepdims=True)) < 1e-6
        untouched = torch.ones(30, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(getattr(term, name)[untouched], banks[name][untouched])
    z_first = list(term.z)
    term(out)
    assert term.z == z_first  # fixed after the first batch


def test_crd_term_state_round_trips_through_a_state_dict():
    term, _ = crd_term()
    out = Outputs(logits=torch.zeros(2, 3), target=torch.zeros(2, dtype=torch.long), feats={"s": torch.randn(2, 5)},
                  teacher_feats={"t": torch.randn(2, 6)}, index=torch.tensor([4, 9]))
    term(out)
    state = term.state_dict()
    assert {"student_bank", "teacher_bank", "_extra_state"} <= set(state) and "targets" not in state
    fresh, _ = crd_term()
    fresh.load_state_dict(state)
    assert fresh.z == term.z and fresh.draws == term.draws == 1
    torch.testing.assert_close(fresh(out), term(out), rtol=0, atol=0)


def test_crd_duplicate_indices_update_deterministically():
    term, _ = crd_term()
    index = torch.tensor([5, 2, 5])
    v = F.normalize(torch.randn(3, 4), dim=1)
    before = term.student_bank[5].clone()
    term._update_banks(index, v, v)
    expected = KF.crd_bank_update(before[None], v[2:3], 0.5)[0]  # the last occurrence wins
    torch.testing.assert_close(term.student_bank[5], expected, rtol=0, atol=0)


def test_abf_fuses_as_written_in_the_paper():
    """ABF: 1x1 conv + BN, residual resized (nearest), x * a0 + r * a1 with a = sigmoid(1x1 conv [x, r]),
    resized to the teacher's size, 3x3 conv + BN; computed here with plain functional calls."""
    torch.manual_seed(0)
    abf = ABF(3, 4, 5, fuse=True).eval()
    for m in abf.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    x, residual = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)
    out, mix = abf(x, residual, (8, 8))

    def bn(m, v):
        return (v - m.running_mean[None, :, None, None]) / torch.sqrt(m.running_var + m.eps)[None, :, None, None] \
            * m.weight[None, :, None, None] + m.bias[None, :, None, None]

    a = bn(abf.conv1[1], F.conv2d(x, abf.conv1[0].weight))
    r = residual.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest 2x2 -> 4x4
    att = torch.sigmoid(F.conv2d(torch.cat([a, r], 1), abf.att_conv[0].weight, abf.att_conv[0].bias))
    fused = a * att[:, :1] + r * att[:, 1:]
    fused = fused.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest 4x4 -> 8x8
    torch.testing.assert_close(mix, fused)
    torch.testing.assert_close(out, bn(abf.conv2[1], F.conv2d(fused, abf.conv2[0].weight, padding=1)))


def test_reviewkd_fuses_deep_to_shallow_and_sums_hcl():
    """The term equals hcl of the pyramid built by hand: deepest level alone, each shallower level fused with
    the mix of the level below it; outputs in the teachers' shapes; an embedding is a 1x1 map."""
    torch.manual_seed(0)
    term = ReviewKD()
    term.pairs = [("t1", "s1"), ("t2", "s2"), ("te", "se")]
    s_shapes, t_shapes = {"s1": (4, 8, 8), "s2": (6, 4, 4), "se": (6,)}, {"t1": (5, 8, 8), "t2": (7, 4, 4), "te": (9,)}
    term.setup(Setup(student=None, teacher=None, student_shapes=s_shapes, teacher_shapes=t_shapes))
    assert [a.att_conv is None for a in term.abfs] == [True, False, False]
    assert [a.conv1[0].out_channels for a in term.abfs] == [6, 6, 6]  # min(512, deepest student channels)
    feats = {k: torch.randn(2, *v) for k, v in s_shapes.items()}
    teacher = {k: torch.randn(2, *v) for k, v in t_shapes.items()}
    loss = term(Outputs(logits=torch.zeros(2, 3), target=torch.zeros(2, dtype=torch.long), feats=feats,
                        teacher_feats=teacher))
    deep, res = term.abfs[0](feats["se"][:, :, None, None], None, (1, 1))
    mid, res = term.abfs[1](feats["s2"], res, (4, 4))
    top, _ = term.abfs[2](feats["s1"], res, (8, 8))
    expected = KF.hcl([top, mid, deep], [teacher["t1"], teacher["t2"], teacher["te"][:, :, None, None]])
    torch.testing.assert_close(loss, expected)


def test_reviewkd_auto_positions_teacher_pre_relu_student_block_outputs_and_embeddings():
    from kdgraph.graph import layers
    from kdgraph.models import build_model

    t_rows = layers(build_model("wrn-16-1", num_classes=10), (3, 16, 16))
    s_rows = layers(build_model("wrn-10-1", num_classes=10), (3, 16, 16))
    (term,), problems = build_terms([{"method": "reviewkd"}], teacher_rows=t_rows, student_rows=s_rows,
                                    has_teacher=True)
    assert problems == []
    assert term.pairs == [("block2.0.relu1:pre", "block1"), ("block3.0.relu1:pre", "block2"),
                          ("relu:pre", "block3"), ("flatten", "flatten")]
    assert term.weight == 5.0 and term.factor(10.0) == 2.5  # 20-epoch warm-up


# --------------------------------------------------------------------------------------- through kdgraph run
def _rows(run_dir, stage: str = "distill") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows if r.get("stage", "distill") == stage]


def _crd_spec(name: str, teacher_ckpt, loader: str = "workers", **train) -> dict:
    return tiny_spec(name, data={"batch_size": 64, "loader": loader}, teacher={"model": "wrn-16-1", "checkpoint": str(teacher_ckpt)},
                     loss=[{"method": "ce"}, {"method": "crd", "negatives": 1024}],
                     train={"schedule": {"name": "constant"}, **train})


def test_crd_trains_and_its_term_falls_once_the_banks_are_full(cli, tmp_path, teacher_ckpt):
    """Each bank row is first written when its sample is seen. While the banks fill, the NCE loss rises as
    random rows give way to (still correlated) embeddings: epoch 2 is about 5 % above epoch 1 on digits
    over seeds 0-3, full epochs of 64. From then on it falls: epoch 3 / epoch 2 was 0.85-0.88 over seeds 0-3."""
    file = write_yaml(tmp_path / "crd.yaml", _crd_spec("crd", teacher_ckpt, epochs=3, max_steps_per_epoch=None))
    code, _, err = cli(["run", file, "--runs-dir", tmp_path])
    assert code == 0, err
    crd = [r["loss/crd"] for r in _rows(tmp_path / "crd")]
    assert len(crd) == 3 and all(math.isfinite(v) for v in crd)
    assert crd[2] < 0.93 * crd[1], crd
    saved = torch.load(tmp_path / "crd" / "checkpoints" / "last.pt", weights_only=True)["terms"]
    assert saved["1.student_bank"].shape == (1437, 128) and saved["1._extra_state"]["draws"] == 3 * 23
    assert min(saved["1._extra_state"]["z"]) > 0


def test_crd_resumes_mid_epoch_bit_exactly_with_its_memory_banks(cli, tmp_path, teacher_ckpt, monkeypatch):
    """The engine's stop (SIGTERM to this process from a term) in the middle of epoch 1, then --resume: the
    metrics and the final student, heads, banks, normalisers and draw counter equal an uninterrupted run's.
    On the tensor loader (its batches carry their indices too)."""
    from tests.userpkg import SelfStop

    def spec(name):
        s = _crd_spec(name, teacher_ckpt, loader="tensor", epochs=2, max_steps_per_epoch=6)
        s["loss"].append({"method": "tests.userpkg:SelfStop", "at": 0.5})
        return write_yaml(tmp_path / f"{name}.yaml", s)

    monkeypatch.setattr(SelfStop, "fired", True)  # the reference run is not stopped
    assert cli(["run", spec("whole"), "--runs-dir", tmp_path])[0] == 0
    monkeypatch.setattr(SelfStop, "fired", False)
    file = spec("cut")
    assert cli(["run", file, "--runs-dir", tmp_path])[0] == 130
    cut = tmp_path / "cut"
    assert torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 4
    code, _, err = cli(["run", file, "--runs-dir", tmp_path, "--resume"])
    assert code == 0, err
    assert _rows(cut) == _rows(tmp_path / "whole")
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (tmp_path / "whole", cut))
    for part in ("model", "terms"):
        for k, v in a[part].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(b[part][k], v), k
            else:
                assert b[part][k] == v, k
    assert a["terms"]["1._extra_state"]["draws"] == 12


def test_reviewkd_trains_and_its_term_falls(cli, tmp_path, teacher_ckpt):
    """ReviewKD end to end, 2 epochs of 20 steps (epoch 2 / epoch 1 was 0.50-0.51 over seeds 0-2)."""
    file = write_yaml(tmp_path / "rkd.yaml", tiny_spec(
        "rkd", data={"batch_size": 64},
        teacher={"model": "wrn-16-1", "checkpoint": str(teacher_ckpt)},
        loss=[{"method": "ce"}, {"method": "reviewkd"}],
        train={"epochs": 2, "max_steps_per_epoch": 20, "schedule": {"name": "constant"}}))
    code, _, err = cli(["run", file, "--runs-dir", tmp_path])
    assert code == 0, err
    first, second = (r["loss/reviewkd"] for r in _rows(tmp_path / "rkd"))
    assert second < 0.9 * first, (first, second)
