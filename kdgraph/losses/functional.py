"""Distillation losses as pure functions, in the spirit of ``torch.nn.functional``.

Conventions shared by every function here:

* ``student`` comes first, ``teacher`` second. Teacher tensors are used as given: nothing is detached
  here (the caller computes the teacher under ``no_grad``), and gradients flow to the student.
* Inputs are never modified in place.
* Computation runs in at least float32 with autocast switched off, so a loss called inside a bf16/fp16
  autocast region returns the same float32 value as outside it. Half-precision inputs are promoted.
* Shape mismatches that would otherwise broadcast silently raise ``ValueError`` naming both shapes.
  Resizing or projecting features (connectors, pooling) is the caller's job.
* A sample without a label has the target :data:`UNLABELLED` (-100, torch's ``ignore_index`` default).
  Functions that take a ``target`` average over the labelled samples only (:func:`labelled_mean`) and
  return 0, still attached to the graph, for a batch with none.

Where a paper and its authors' code differ, the code form is used (it is what the published weights
were tuned for); each docstring says which.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "UNLABELLED", "labelled_mean", "cross_entropy",
    "kd", "at", "sp", "margin_from_bn", "overhaul", "fitnet", "dkd", "pkt",
    "rkd", "rkd_distance", "rkd_angle", "nst",
    # methods-B
    "logit_standardize", "dist", "vid", "cc", "srrl", "ft", "fsp_matrix", "fsp", "ab",
]

UNLABELLED = -100
"""The target of a training sample whose label is not used (``data.labels``): torch's ``ignore_index`` default,
so ``F.cross_entropy(logits, target)`` already skips such samples."""

# Below this probability of the pre-activation being negative, the truncated mean is replaced by -3|gamma|
# (Heo et al.'s official code).
_MARGIN_MIN_NEG_PROB = 1e-3


# ---------------------------------------------------------------------------------------------------------
# helpers

def _promote(x):
    """Half-precision tensors become float32; everything else is returned unchanged."""
    if torch.is_tensor(x) and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _in_float32(fn):
    """Run ``fn`` with autocast disabled and half-precision tensor arguments promoted to float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        args = tuple(_promote(a) for a in args)
        kwargs = {k: _promote(v) for k, v in kwargs.items()}
        if not torch.amp.is_autocast_available(device_type):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _shapes(student: Tensor, teacher: Tensor) -> str:
    return f"student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"


def _require_same_shape(name: str, student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student and teacher shapes must match ({_shapes(student, teacher)})")


def _require_same_batch(name: str, student: Tensor, teacher: Tensor) -> None:
    if student.dim() < 1 or teacher.dim() < 1 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{name}: student and teacher batch sizes must match ({_shapes(student, teacher)})")


def _require_same_spatial(name: str, student: Tensor, teacher: Tensor) -> None:
    """(b, C, *spatial) inputs with equal b and spatial sizes; channel counts may differ."""
    if student.dim() < 3 or teacher.dim() < 3:
        raise ValueError(f"{name}: expected (batch, channels, *spatial) inputs ({_shapes(student, teacher)})")
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"{name}: batch and spatial sizes must match ({_shapes(student, teacher)}); "
            "resize the features before calling"
        )


def _require_logits(name: str, student: Tensor, teacher: Tensor) -> None:
    _require_same_shape(name, student, teacher)
    if student.dim() != 2:
        raise ValueError(f"{name}: expected (batch, classes) logits, got {tuple(student.shape)}")


def _require_positive_temperature(name: str, temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be positive, got {temperature}")


def labelled_mean(values: Tensor, target: Tensor) -> Tensor:
    """The mean of per-sample ``values`` (batch,) over the samples whose ``target`` is not :data:`UNLABELLED`.

    A batch without a labelled sample gives 0 (not the NaN of an empty mean), with a zero gradient, so a
    training step on it still runs. Nothing is synchronised with the host::

        per_sample = F.cross_entropy(logits, target, reduction="none")   # 0 where target == UNLABELLED
        loss = labelled_mean(per_sample, target)
    """
    if values.shape != target.shape:
        raise ValueError(f"labelled_mean: one value per sample expected, got values {tuple(values.shape)} "
                         f"and target {tuple(target.shape)}")
    labelled = target != UNLABELLED
    return torch.where(labelled, values, 0.0).sum() / labelled.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------------------------
# logit losses

@_in_float32
def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """-log softmax(s)_y, averaged over the labelled samples -- the supervised term of every recipe.

    Takes (batch, classes) logits and integer labels of shape (batch,); samples whose label is
    :data:`UNLABELLED` are left out, and a batch without labels gives 0 (see :func:`labelled_mean`).
    With every sample labelled this is ``F.cross_entropy(logits, target, label_smoothing=...)``.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: expected (batch, classes) logits and (batch,) labels, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    per_sample = F.cross_entropy(logits, target, ignore_index=UNLABELLED, reduction="none",
                                 label_smoothing=label_smoothing)
    return labelled_mean(per_sample, target)


@_in_float32
def kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float, standardize: bool = False) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), batch mean -- Hinton et al. 2015, "Distilling the Knowledge".

    Takes (batch, classes) logits of equal shape; the KL is summed over classes and averaged over the
    batch (``reduction='batchmean'``), then scaled by T^2 so gradients keep their size across T. With
    ``standardize`` both logits first go through :func:`logit_standardize` (Sun et al. 2024; T is then
    their "base temperature", 2 in the authors' recipe).
    """
    _require_logits("kd", student_logits, teacher_logits)
    _require_positive_temperature("kd", temperature)
    if standardize:
        student_logits, teacher_logits = _standardize_pair("kd", student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def _binary_log_probs(logits: Tensor, target_mask: Tensor) -> Tensor:
    """log [p_target, 1 - p_target] per row, (b, 2), computed with logsumexp (no log of a tiny sum)."""
    log_total = torch.logsumexp(logits, dim=1)
    log_target = logits.masked_select(target_mask) - log_total
    log_rest = torch.logsumexp(_non_target(logits, target_mask), dim=1) - log_total
    return torch.stack([log_target, log_rest], dim=1)


def _non_target(logits: Tensor, target_mask: Tensor) -> Tensor:
    """The (b, C-1) logits with each row's target entry removed (row order kept)."""
    b, c = logits.shape
    return logits.masked_select(~target_mask).view(b, c - 1)


@_in_float32
def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float,
    beta: float,
    temperature: float,
    standardize: bool = False,
) -> Tensor:
    """T^2 * (alpha * TCKD + beta * NCKD), batch mean -- Zhao et al. 2022, "Decoupled Knowledge Distillation".

    Takes (batch, classes) logits of equal shape (classes >= 2) and integer class labels ``target`` of
    shape (batch,). TCKD is the KL between the binary (target, rest) distributions of teacher and
    student; NCKD is the KL between their softmaxes over the non-target classes only. Plain KD equals
    TCKD + (1 - p_teacher[target]) * NCKD per sample (the paper's Eq. 7).

    The official code drops the target class from the NCKD softmax by subtracting ``1000 * gt_mask``
    from the logits; here the target logit is removed outright, which is the exact limit of that form
    and cannot overflow in half precision. With ``standardize`` both logits first go through
    :func:`logit_standardize` (Sun et al. 2024). Both parts need the label: samples whose target is
    :data:`UNLABELLED` are left out (the mean is over the labelled samples; 0 for a batch without any).
    """
    _require_logits("dkd", student_logits, teacher_logits)
    _require_positive_temperature("dkd", temperature)
    b, num_classes = student_logits.shape
    if num_classes < 2:
        raise ValueError(f"dkd: needs at least 2 classes, got logits of shape {tuple(student_logits.shape)}")
    if target.shape != (b,) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(
            f"dkd: target must hold one integer label per sample, shape ({b},); got "
            f"{tuple(target.shape)} {target.dtype}"
        )
    target = target.long()
    target_mask = F.one_hot(torch.where(target == UNLABELLED, 0, target), num_classes).bool()
    if standardize:
        student_logits, teacher_logits = _standardize_pair("dkd", student_logits, teacher_logits)

    z_s = student_logits / temperature
    z_t = teacher_logits / temperature
    tckd = F.kl_div(
        _binary_log_probs(z_s, target_mask), _binary_log_probs(z_t, target_mask),
        reduction="none", log_target=True,
    ).sum(1)
    nckd = F.kl_div(
        F.log_softmax(_non_target(z_s, target_mask), dim=1),
        F.log_softmax(_non_target(z_t, target_mask), dim=1),
        reduction="none", log_target=True,
    ).sum(1)
    return labelled_mean(alpha * tckd + beta * nckd, target) * temperature**2


# ---------------------------------------------------------------------------------------------------------
# feature losses

@_in_float32
def fitnet(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """mean((s - t)^2) -- Romero et al. 2015, "FitNets: Hints for Thin Deep Nets".

    Takes student and teacher features of equal shape (any shape). The paper's regressor is the
    caller's connector: pass its output as ``student_feat``.
    """
    _require_same_shape("fitnet", student_feat, teacher_feat)
    return F.mse_loss(student_feat, teacher_feat)


def _attention_map(feat: Tensor, p: float) -> Tensor:
    """normalize(mean_c |f|^p), flattened per sample: (b, C, *spatial) -> (b, prod(spatial))."""
    return F.normalize(feat.abs().pow(p).mean(dim=1).flatten(1), dim=1)


@_in_float32
def at(student_feat: Tensor, teacher_feat: Tensor, p: float = 2) -> Tensor:
    """mean((a_s - a_t)^2), a = normalize(mean_c |f|^p) -- Zagoruyko & Komodakis 2017, "Attention Transfer".

    Takes (batch, channels, *spatial) features; channel counts may differ, batch and spatial sizes
    must match. This is the authors' code form (element mean of squared differences of the
    L2-normalised maps); the paper's equation uses a p-norm of the difference scaled by beta/2.
    """
    _require_same_spatial("at", student_feat, teacher_feat)
    return (_attention_map(student_feat, p) - _attention_map(teacher_feat, p)).pow(2).mean()


@_in_float32
def at_distillation_project(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """mean_{a,b,x}(q_s[b,x] / |q_s[a]| - q_t[b,x] / |q_t[a]|)^2, q = sum_c f -- AT as the original Distillation
    project's code computed it (not Zagoruyko & Komodakis' map): the *signed* channel sum (no square, no
    absolute value), and a normalisation whose per-sample norms broadcast across the batch, so every map is
    divided by every sample's norm ((b, b, *spatial) before the element mean). Its weight was beta/2 = 30.
    """
    _require_same_spatial("at_distillation_project", student_feat, teacher_feat)
    q_s, q_t = student_feat.sum(dim=1), teacher_feat.sum(dim=1)
    norms = (-1,) + (1,) * q_s.dim()
    return F.mse_loss(q_s.unsqueeze(0) / q_s.flatten(1).norm(dim=1).view(norms),
                      q_t.unsqueeze(0) / q_t.flatten(1).norm(dim=1).view(norms))


def _similarity(feat: Tensor) -> Tensor:
    """Row-normalised batch Gram matrix of the flattened features, (b, b)."""
    flat = feat.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


@_in_float32
def sp(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """||G_s - G_t||_F^2 / b^2, G = row-normalised F F^T -- Tung & Mori 2019, "Similarity-Preserving KD".

    Takes features of any shapes with the same batch size b; each sample is flattened to a row of F,
    and each row of the b x b Gram matrix is L2-normalised.
    """
    _require_same_batch("sp", student_feat, teacher_feat)
    b = student_feat.shape[0]
    return (_similarity(student_feat) - _similarity(teacher_feat)).pow(2).sum() / b**2


def margin_from_bn(weight: Tensor, bias: Tensor) -> Tensor:
    """E[x | x < 0], x ~ N(beta, gamma^2), per channel -- Heo et al. 2019, "Overhaul of Feature Distillation".

    Takes a BatchNorm's ``weight`` (gamma) and ``bias`` (beta), both of shape (C,), and returns the
    margins, shape (C,), in ``weight``'s dtype. With s = |gamma|:
    m = beta - s * pdf(beta/s) / cdf(-beta/s) when cdf(-beta/s) > 0.001, else -3 s (as the official
    code). Computed in float64 with the exact normal pdf/cdf. For s == 0 the pre-activation is the
    constant beta and m = min(beta, 0), the limit of the formula.
    """
    if weight.shape != bias.shape or weight.dim() != 1:
        raise ValueError(
            f"margin_from_bn: weight and bias must be 1-D of equal length "
            f"(weight {tuple(weight.shape)}, bias {tuple(bias.shape)})"
        )
    mean = bias.double()
    std = weight.double().abs()
    degenerate = std == 0
    z = mean / torch.where(degenerate, torch.ones_like(std), std)
    neg_prob = torch.special.ndtr(-z)
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    truncated_mean = mean - std * pdf / neg_prob.clamp_min(_MARGIN_MIN_NEG_PROB)
    margin = torch.where(neg_prob > _MARGIN_MIN_NEG_PROB, truncated_mean, -3 * std)
    margin = torch.where(degenerate, mean.clamp(max=0), margin)
    return margin.to(weight.dtype)


@_in_float32
def overhaul(student_feat: Tensor, teacher_feat: Tensor, margin: Tensor) -> Tensor:
    """sum((s - t')^2 * [(s > t') or (t' > 0)]) / b, t' = max(t, m) -- Heo et al. 2019, "Overhaul of FD".

    Takes pre-ReLU features of equal shape (batch, C, *spatial) (the student already through its
    connector) and per-channel margins of shape (C,), e.g. from :func:`margin_from_bn`. The partial
    L2 skips positions where the student is at or below a non-positive target, which the teacher's
    ReLU would map to the same output anyway.
    """
    _require_same_shape("overhaul", student_feat, teacher_feat)
    if student_feat.dim() < 2 or margin.shape != student_feat.shape[1:2]:
        raise ValueError(
            f"overhaul: margin must have shape (channels,) for features {tuple(teacher_feat.shape)}; "
            f"got {tuple(margin.shape)}"
        )
    channel_shape = (1, -1) + (1,) * (student_feat.dim() - 2)
    target = torch.maximum(teacher_feat, margin.to(teacher_feat.dtype).view(channel_shape))
    active = (student_feat > target) | (target > 0)
    squared_error = (student_feat - target).pow(2)
    return torch.where(active, squared_error, torch.zeros_like(squared_error)).sum() / student_feat.shape[0]


def _pkt_probabilities(feat: Tensor, eps: float) -> Tensor:
    """Rows of (cos + 1) / 2 between samples, normalised to sum to 1: (b, ...) -> (b, b)."""
    flat = feat.flatten(1)
    unit = flat / (flat.norm(dim=1, keepdim=True) + eps)
    kernel = (unit @ unit.t() + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


@_in_float32
def pkt(student_feat: Tensor, teacher_feat: Tensor, eps: float = 1e-7) -> Tensor:
    """mean_ij p_t,ij * log((p_t,ij + eps) / (p_s,ij + eps)) -- Passalis & Tefas 2018, "Probabilistic KT".

    Takes features of any shapes with the same batch size b (flattened per sample). p_ij is the
    cosine-similarity kernel (cos + 1) / 2 of the L2-normalised features, row-normalised into
    conditional probabilities p(j | i). Reduction as the authors' code: ``torch.mean`` over all b*b
    entries, i.e. the per-row KL sums averaged over rows and divided once more by b (the scale the
    usual weight of 30000 was tuned for).
    """
    _require_same_batch("pkt", student_feat, teacher_feat)
    p_s = _pkt_probabilities(student_feat, eps)
    p_t = _pkt_probabilities(teacher_feat, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _pairwise_distances(flat: Tensor, eps: float = 1e-12) -> Tensor:
    """Euclidean distances between rows, (b, b), zero diagonal; clamped before sqrt for finite gradients."""
    sq_norms = flat.pow(2).sum(dim=1)
    squared = (sq_norms.unsqueeze(1) + sq_norms.unsqueeze(0) - 2 * flat @ flat.t()).clamp_min(eps)
    off_diagonal = 1 - torch.eye(flat.shape[0], dtype=flat.dtype, device=flat.device)
    return squared.sqrt() * off_diagonal


def _normalised_distances(feat: Tensor) -> Tensor:
    distances = _pairwise_distances(feat.flatten(1))
    return distances / distances[distances > 0].mean()


def _triplet_cosines(feat: Tensor) -> Tensor:
    """cos of the angle at i between j and k, (b, b, b): <e_ij, e_ik> with e_ij = normalize(x_j - x_i)."""
    flat = feat.flatten(1)
    directions = F.normalize(flat.unsqueeze(0) - flat.unsqueeze(1), dim=2)
    return directions @ directions.transpose(1, 2)


def _require_relational(name: str, student: Tensor, teacher: Tensor) -> None:
    _require_same_batch(name, student, teacher)
    if student.shape[0] < 2:
        raise ValueError(f"{name}: needs at least 2 samples in the batch ({_shapes(student, teacher)})")


@_in_float32
def rkd_distance(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """smooth_l1(d_s / mean d_s, d_t / mean d_t), d = pairwise distances -- Park et al. 2019, "Relational KD".

    Takes features of any shapes with the same batch size (>= 2), flattened per sample. Each distance
    matrix is divided by the mean of its non-zero entries; smooth L1 (beta 1) is averaged over all
    b*b entries, as the authors' code.
    """
    _require_relational("rkd_distance", student_feat, teacher_feat)
    return F.smooth_l1_loss(_normalised_distances(student_feat), _normalised_distances(teacher_feat))


@_in_float32
def rkd_angle(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """smooth_l1(cos angle_s(i,j,k), cos angle_t(i,j,k)), all triplets -- Park et al. 2019, "Relational KD".

    Takes features of any shapes with the same batch size (>= 2), flattened per sample. The cosine of
    the angle at x_i between x_j and x_k is <e_ij, e_ik> with e_ij the unit vector from x_i to x_j;
    smooth L1 (beta 1) is averaged over all b^3 triplets, as the authors' code.
    """
    _require_relational("rkd_angle", student_feat, teacher_feat)
    return F.smooth_l1_loss(_triplet_cosines(student_feat), _triplet_cosines(teacher_feat))


@_in_float32
def rkd(
    student_feat: Tensor,
    teacher_feat: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> Tensor:
    """distance_weight * rkd_distance + angle_weight * rkd_angle -- Park et al. 2019, "Relational KD".

    Takes features of any shapes with the same batch size (>= 2); see :func:`rkd_distance` and
    :func:`rkd_angle`. The default weights are the paper's (25, 50).
    """
    return (distance_weight * rkd_distance(student_feat, teacher_feat)
            + angle_weight * rkd_angle(student_feat, teacher_feat))


def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """Mean over batch and channel pairs of (a_i . b_j)^2 for (b, Ca, n) and (b, Cb, n) inputs."""
    return (a @ b.transpose(1, 2)).pow(2).mean()


@_in_float32
def nst(student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """mean K(t,t) + mean K(s,s) - 2 mean K(s,t), K(x,y) = (x.y)^2 -- Huang & Wang 2017, "Like What You Like".

    Takes (batch, channels, *spatial) features; channel counts may differ, batch and spatial sizes
    must match. Each channel's activation map is flattened and L2-normalised over positions; the
    channel maps are the samples of the MMD (polynomial kernel, d = 2, c = 0), computed per sample
    and averaged over the batch (RepDistiller's NSTLoss form).
    """
    _require_same_spatial("nst", student_feat, teacher_feat)
    s = F.normalize(student_feat.flatten(2), dim=2)
    t = F.normalize(teacher_feat.flatten(2), dim=2)
    return _poly_kernel_mean(t, t) + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)


# ---------------------------------------------------------------------------------------------------------
# contrastive and review losses (CRD, ReviewKD)

__all__ += ["crd", "crd_scores", "crd_normaliser", "crd_nce", "crd_bank_update", "hcl"]


def _require_bank_rows(name: str, anchor: Tensor, rows: Tensor) -> None:
    if anchor.dim() != 2 or rows.dim() != 3 or rows.shape[0] != anchor.shape[0] or rows.shape[2] != anchor.shape[1]:
        raise ValueError(f"{name}: expected anchors (batch, dim) and bank rows (batch, 1 + negatives, dim); got "
                         f"{tuple(anchor.shape)} and {tuple(rows.shape)}")


@_in_float32
def crd_scores(anchor: Tensor, bank_rows: Tensor, temperature: float) -> Tensor:
    """exp(<m_j, v> / T), (batch, 1 + K) -- Tian et al. 2020, "Contrastive Representation Distillation".

    ``anchor``: (batch, dim) embeddings v; ``bank_rows``: (batch, 1 + K, dim) memory rows m, the positive
    (the sample's own row) first, then its K negatives. Unnormalised: divide by :func:`crd_normaliser`'s Z.
    """
    _require_bank_rows("crd_scores", anchor, bank_rows)
    _require_positive_temperature("crd_scores", temperature)
    return torch.exp(torch.bmm(bank_rows, anchor.unsqueeze(2)).squeeze(2) / temperature)


@torch.no_grad()
@_in_float32
def crd_normaliser(scores: Tensor, num_samples: int) -> Tensor:
    """Z = mean(scores) * N, a constant: the authors' code sets it once, from the first batch's scores.

    The paper's Z is the partition function sum_i exp(<m_i, v>/T) over the N samples; the code estimates
    it by Monte Carlo from the first batch (mean over the batch and its 1 + K rows, times N) and keeps it.
    """
    return scores.mean() * num_samples


@_in_float32
def crd_nce(probs: Tensor, num_samples: int, eps: float = 1e-7) -> Tensor:
    """-(sum_i log h_i,0 + sum_i,k log(1 - h_i,k)) / b, h = P / (P + K/N + eps) -- Tian et al. 2020, Eq. 18.

    ``probs``: (batch, 1 + K) normalised scores P = exp(<m, v>/T) / Z, the positive first. With noise
    distribution P_n = 1/N and K noise samples, h = P / (P + K P_n) is the posterior of the pair being
    the positive; this is the NCE loss of the authors' ``ContrastLoss`` (their eps 1e-7 in both
    denominators, the negatives' 1 - h written as K P_n / (P + K P_n + eps)), summed over the batch and
    divided by its size.
    """
    if probs.dim() != 2 or probs.shape[1] < 2:
        raise ValueError(f"crd_nce: expected (batch, 1 + negatives) probabilities, got {tuple(probs.shape)}")
    noise = (probs.shape[1] - 1) / float(num_samples)
    positive, negatives = probs[:, 0], probs[:, 1:]
    log_h = torch.log(positive / (positive + (noise + eps)))
    log_not_h = torch.log(torch.full_like(negatives, noise) / (negatives + (noise + eps)))
    return -(log_h.sum() + log_not_h.sum()) / probs.shape[0]


@_in_float32
def crd(
    student_embed: Tensor,
    teacher_embed: Tensor,
    student_rows: Tensor,
    teacher_rows: Tensor,
    num_samples: int,
    temperature: float = 0.07,
    z_student: float | Tensor | None = None,
    z_teacher: float | Tensor | None = None,
) -> Tensor:
    """NCE(v_s vs teacher bank) + NCE(v_t vs student bank) -- Tian et al. 2020, "Contrastive Representation Distillation".

    ``student_embed`` / ``teacher_embed``: (batch, dim) L2-normalised embeddings v_s, v_t (the outputs of
    the embedding heads). ``teacher_rows``: (batch, 1 + K, dim) rows of the memory bank of teacher
    embeddings at each sample's index then its K negatives' indices; ``student_rows`` likewise from the
    student bank. Each direction is :func:`crd_nce` of P = :func:`crd_scores` / Z: the student anchor
    against teacher rows (normalised by ``z_student``), the teacher anchor against student rows (by
    ``z_teacher``); a Z left ``None`` is :func:`crd_normaliser` of this batch's scores, the authors'
    first-batch rule. The paper writes the critic h with the teacher as anchor only; the authors' code
    (followed here) adds the symmetric student-anchored term. Gradients reach both embeddings; the bank
    rows are constants (the caller passes them detached).
    """
    _require_same_shape("crd", student_embed, teacher_embed)
    _require_same_shape("crd", student_rows, teacher_rows)
    s_scores = crd_scores(student_embed, teacher_rows, temperature)
    t_scores = crd_scores(teacher_embed, student_rows, temperature)
    z_s = crd_normaliser(s_scores, num_samples) if z_student is None else z_student
    z_t = crd_normaliser(t_scores, num_samples) if z_teacher is None else z_teacher
    return crd_nce(s_scores / z_s, num_samples) + crd_nce(t_scores / z_t, num_samples)


@torch.no_grad()
def crd_bank_update(rows: Tensor, embed: Tensor, momentum: float) -> Tensor:
    """normalize(momentum * m + (1 - momentum) * v): the new memory rows (Tian et al. 2020, authors' code).

    ``rows``: the bank's current (n, dim) rows at the batch's indices; ``embed``: the batch's (n, dim)
    embeddings. Normalised as the code does, by the row's L2 norm without an epsilon. Returns new rows;
    nothing is modified in place.
    """
    _require_same_shape("crd_bank_update", rows, embed)
    mixed = rows.float() * momentum + embed.float() * (1 - momentum)
    return mixed / mixed.pow(2).sum(1, keepdim=True).pow(0.5)


_HCL_LEVELS = (4, 2, 1)  # the pooled sizes of Chen et al.'s code, each weighted half the one before


@_in_float32
def hcl(student_feats, teacher_feats) -> Tensor:
    """sum_i [mse(s_i, t_i) + sum_l 2^-k mse(pool_l s_i, pool_l t_i)] / (1 + sum_l 2^-k) -- Chen et al. 2021, "Review KD".

    The hierarchical context loss of "Distilling Knowledge via Knowledge Review": ``student_feats`` and
    ``teacher_feats`` are sequences of (batch, C, H, W) maps of equal shapes per level (the student's
    already fused and projected). At each level the mean squared error of the maps is added to those of
    their adaptive average pools to 4x4, 2x2 and 1x1 -- only the sizes l < H, as the authors' code, which
    tests the height alone -- weighted 1/2, 1/4, 1/8 in the order used, and divided by the sum of the
    weights used (1 included). The levels are summed, not averaged.
    """
    if len(student_feats) != len(teacher_feats) or not len(student_feats):
        raise ValueError(f"hcl: needs as many student as teacher maps, at least one "
                         f"({len(student_feats)} and {len(teacher_feats)})")
    total = None
    for s, t in zip(student_feats, teacher_feats):
        _require_same_shape("hcl", s, t)
        if s.dim() != 4:
            raise ValueError(f"hcl: expected (batch, C, H, W) maps, got {tuple(s.shape)}")
        level, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for size in _HCL_LEVELS:
            if size >= s.shape[2]:
                continue
            weight /= 2.0
            level = level + F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)) * weight
            weights += weight
        level = level / weights
        total = level if total is None else total + level
    return total


# ---------------------------------------------------------------------------------------------------------
# methods-B: logit standardization, DIST, VID, CC, SRRL

def logit_standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """(z - mean(z)) / (std(z) + eps) per row -- Sun et al. 2024, "Logit Standardization in KD".

    Takes (batch, classes) logits, classes >= 2. ``std`` is the unbiased (n - 1) standard deviation and
    ``eps`` is added to it, as in the authors' code (the paper writes the Z-score with sigma alone).
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logit_standardize: expected (batch, classes >= 2) logits, got {tuple(logits.shape)}")
    centred = logits - logits.mean(dim=1, keepdim=True)
    return centred / (logits.std(dim=1, keepdim=True) + eps)


def _standardize_pair(name: str, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    if student_logits.shape[1] < 2:
        raise ValueError(f"{name}: standardize needs at least 2 classes, got {tuple(student_logits.shape)}")
    return logit_standardize(student_logits), logit_standardize(teacher_logits)


def _pearson_rows(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: cos of the centred rows, (n,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


@_in_float32
def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """T^2 (beta (1 - mean_i rho(p_s[i], p_t[i])) + gamma (1 - mean_c rho(p_s[:, c], p_t[:, c]))) -- Huang et al. 2022.

    "Knowledge Distillation from A Stronger Teacher" (DIST).

    Takes (batch, classes) logits of equal shape; p = softmax(z / T) and rho is the Pearson correlation.
    The inter-class term correlates each sample's class distribution, the intra-class term each class's
    probabilities across the batch. As the authors' code, ``eps`` is added to the product of the norms
    and both terms are scaled by T^2 (the paper's equations omit the T^2; its CIFAR-100 runs use T = 4,
    ImageNet T = 1).
    """
    _require_logits("dist", student_logits, teacher_logits)
    _require_positive_temperature("dist", temperature)
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    inter = 1 - _pearson_rows(p_s, p_t, eps).mean()
    intra = 1 - _pearson_rows(p_s.t(), p_t.t(), eps).mean()
    return temperature**2 * (beta * inter + gamma * intra)


@_in_float32
def vid(student_mean: Tensor, teacher_feat: Tensor, variance: Tensor) -> Tensor:
    """mean(0.5 * ((mu - t)^2 / var + log var)) -- Ahn et al. 2019, "Variational Information Distillation".

    The Gaussian negative log-likelihood (without the constant) of the teacher feature ``t`` under
    N(mu, var), where ``student_mean`` is mu = r(s), the student through its regressor, both of shape
    (batch, C, *spatial), and ``variance`` (C,) holds one positive variance per channel. Averaged over
    every element, as the authors' code (via RepDistiller); the paper sums over channels and positions.
    """
    _require_same_shape("vid", student_mean, teacher_feat)
    if student_mean.dim() < 2 or variance.shape != student_mean.shape[1:2]:
        raise ValueError(f"vid: variance must have shape (channels,) for features {tuple(teacher_feat.shape)}; "
                         f"got {tuple(variance.shape)}")
    var = variance.to(student_mean.dtype).view((1, -1) + (1,) * (student_mean.dim() - 2))
    return (0.5 * ((student_mean - teacher_feat).pow(2) / var + var.log())).mean()


def _rbf_correlation(embed: Tensor, gamma: float, order: int) -> Tensor:
    """exp(-2 gamma) * sum_{p <= order} (2 gamma)^p / p! * (e_i . e_j)^p of the L2-normalised rows, (b, b)."""
    unit = F.normalize(embed.flatten(1), dim=1)
    dots = unit @ unit.t()
    series = sum((2 * gamma) ** p / math.factorial(p) * dots.pow(p) for p in range(order + 1))
    return math.exp(-2 * gamma) * series


@_in_float32
def cc(student_embed: Tensor, teacher_embed: Tensor, form: str = "code", gamma: float = 0.4,
       order: int = 2) -> Tensor:
    """mean_i sum_d |s_i - t_i|_d |s_i+1 - t_i+1|_d -- Peng et al. 2019, "Correlation Congruence for KD".

    ``form="code"`` (default) is the form RepDistiller runs, restructured from code the authors shared:
    with D = |s - t| (batch, d) for embeddings of equal shape, the mean over consecutive sample pairs
    of sum_d D[i, d] D[i + 1, d] (needs batch >= 2). This is what RepDistiller's CIFAR-100 CC numbers and
    its weight 0.02 were measured with. ``form="paper"`` is the paper's correlation congruence
    ||C_s - C_t||_F^2 / b^2, C the b x b Gaussian-RBF correlation exp(-gamma ||x_i - x_j||^2) expanded as a
    Taylor series of ``order`` in x_i . x_j (exact for unit vectors, so the rows are L2-normalised;
    gamma 0.4, order 2 as the paper); the embeddings may differ in width there.
    """
    _require_relational("cc", student_embed, teacher_embed)
    if form == "code":
        _require_same_shape("cc", student_embed, teacher_embed)
        delta = (student_embed - teacher_embed).abs().flatten(1)
        return (delta[:-1] * delta[1:]).sum(dim=1).mean()
    if form == "paper":
        b = student_embed.shape[0]
        diff = _rbf_correlation(student_embed, gamma, order) - _rbf_correlation(teacher_embed, gamma, order)
        return diff.pow(2).sum() / b**2
    raise ValueError(f"cc: form must be 'code' or 'paper', got {form!r}")


def _spatial_mean(feat: Tensor) -> Tensor:
    """(b, C, *spatial) -> (b, C) global average; (b, C) is returned as it is."""
    return feat.flatten(2).mean(dim=2) if feat.dim() > 2 else feat


@_in_float32
def srrl(
    student_feat: Tensor,
    teacher_feat: Tensor,
    regressed_logits: Tensor,
    teacher_logits: Tensor,
    feature_weight: float = 1.0,
    regression_weight: float = 1.0,
) -> Tensor:
    """fw * mean((pool(s) - pool(t))^2) + rw * mean((head_t(s) - z_t)^2) -- Yang et al. 2021, SRRL.

    "Knowledge Distillation via Softmax Regression Representation Learning".
    ``student_feat`` is the student's last feature map through its connector (1x1 conv + BN + ReLU) and
    ``teacher_feat`` the teacher's, both (batch, C, *spatial) with equal batch and channels (or already
    pooled, (batch, C)); pool is the global spatial mean. ``regressed_logits`` are the teacher's
    classifier applied to ``student_feat`` and ``teacher_logits`` the teacher's own, both (batch, classes).
    Both parts are mean squared errors (features, then logits before any softmax), weights 1 and 1, as
    the authors' code (``statm_loss`` + ``mse_loss``).
    """
    s_pooled, t_pooled = _spatial_mean(student_feat), _spatial_mean(teacher_feat)
    _require_same_shape("srrl (pooled features)", s_pooled, t_pooled)
    _require_logits("srrl", regressed_logits, teacher_logits)
    if regressed_logits.shape[0] != s_pooled.shape[0]:
        raise ValueError(f"srrl: logits and features have different batch sizes "
                         f"({tuple(regressed_logits.shape)}, {tuple(student_feat.shape)})")
    feature_part = (s_pooled - t_pooled).pow(2).mean()
    return feature_weight * feature_part + regression_weight * F.mse_loss(regressed_logits, teacher_logits)


# ---------------------------------------------------------------------------------------------------------
# methods-B: the methods with a pre-training stage (FT, FSP, AB)

@_in_float32
def ft(student_factor: Tensor, teacher_factor: Tensor) -> Tensor:
    """mean |normalize(F_s) - normalize(F_t)| -- Kim et al. 2018, "Paraphrasing Complex Network" (factor transfer).

    Takes the student's factor (its translator's output) and the teacher's (its paraphraser's encoder
    output), each sample flattened and L2-normalised; same batch and element count per sample. The
    authors' code averages the absolute differences (``nn.L1Loss``; the paper writes the p = 1 norm of
    the difference, a sum) and weights it by 500. RepDistiller instead normalises the channel mean of the
    squared factors (an attention map) and weights it 200; kdgraph follows the authors.
    """
    _require_same_batch("ft", student_factor, teacher_factor)
    s, t = student_factor.flatten(1), teacher_factor.flatten(1)
    if s.shape != t.shape:
        raise ValueError(f"ft: the factors must hold as many values per sample "
                         f"({_shapes(student_factor, teacher_factor)})")
    return (F.normalize(s, dim=1) - F.normalize(t, dim=1)).abs().mean()


def _pool_to_smaller(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two (batch, C, H, W) maps to the other's spatial size."""
    if a.shape[2] * a.shape[3] > b.shape[2] * b.shape[3]:
        return F.adaptive_avg_pool2d(a, b.shape[2:]), b
    if a.shape[2] * a.shape[3] < b.shape[2] * b.shape[3]:
        return a, F.adaptive_avg_pool2d(b, a.shape[2:])
    return a, b


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """G[b, i, j] = mean over positions of first[b, i] * second[b, j] -- Yim et al. 2017's FSP matrix.

    Takes two (batch, C, H, W) maps of one model; the larger map is adaptive-average-pooled to the
    smaller one's size first (RepDistiller). Returns (batch, C_first, C_second).
    """
    if first.dim() != 4 or second.dim() != 4 or first.shape[0] != second.shape[0]:
        raise ValueError(f"fsp_matrix: expected two (batch, C, H, W) maps of one batch, got "
                         f"{tuple(first.shape)} and {tuple(second.shape)}")
    first, second = _pool_to_smaller(first, second)
    return first.flatten(2) @ second.flatten(2).transpose(1, 2) / (first.shape[2] * first.shape[3])


@_in_float32
def fsp(student_first: Tensor, student_second: Tensor, teacher_first: Tensor, teacher_second: Tensor) -> Tensor:
    """mean((G_s - G_t)^2), G = FSP matrix of two positions -- Yim et al. 2017, "A Gift from Knowledge Distillation".

    Takes the student's and the teacher's maps at the same two positions, (batch, C, H, W) each; the
    channel counts of student and teacher must agree at each position. The paper sums the squared
    differences (L2 norm squared) and averages over samples; kdgraph takes the element mean, as
    RepDistiller (the authors published no PyTorch code).
    """
    g_s, g_t = fsp_matrix(student_first, student_second), fsp_matrix(teacher_first, teacher_second)
    if g_s.shape != g_t.shape:
        raise ValueError(f"fsp: student and teacher FSP matrices differ ({tuple(g_s.shape)}, {tuple(g_t.shape)}): "
                         f"their channel counts must agree at both positions")
    return (g_s - g_t).pow(2).mean()


@_in_float32
def ab(student_pre: Tensor, teacher_pre: Tensor, margin: float = 1.0) -> Tensor:
    """sum((s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0]) / b -- Heo et al. 2019, "Activation Boundaries".

    Takes pre-activation features of equal shape (batch, ...), the student's through its connector: the
    student is pushed below -m where the teacher's neuron is off and above m where it is on (the
    paper's hinge-like "alternative loss", margin m = 1 in the authors' code), summed over neurons and
    averaged over the batch.
    """
    _require_same_shape("ab", student_pre, teacher_pre)
    on = teacher_pre > 0
    off_part = (student_pre + margin).pow(2) * ((student_pre > -margin) & ~on)
    on_part = (student_pre - margin).pow(2) * ((student_pre <= margin) & on)
    return (off_part + on_part).sum() / student_pre.shape[0]
