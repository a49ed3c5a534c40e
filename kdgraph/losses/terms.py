"""Loss terms: the ``nn.Module`` behind each ``loss:`` entry of a spec.

A term holds its state (connectors, margins) and calls the pure math of :mod:`kdgraph.losses.functional`.
The protocol a user's term follows (``method: package.module:Name``):

* subclass :class:`Term` (or follow its attributes): ``needs_teacher``, ``features`` (``None`` for logit
  methods; ``"out"`` or ``"pre"`` for feature methods: what ``positions: auto`` picks), ``auto``
  (``"all"``, ``"last"``, ``"middle"`` or ``"embedding"``) and ``default_weight``;
* take its parameters as keyword arguments of ``__init__`` (they are the spec keys of the term);
* optionally override ``setup(ctx)`` (called once, after the teacher is loaded, with the traced shapes);
* implement ``forward(out: Outputs) -> Tensor``, the *unweighted* loss. The engine multiplies by
  ``weight`` (ramped up over ``warmup_epochs``) and logs each term separately.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import functional as KF
from .connectors import Align


@dataclass
class Outputs:
    """What a term sees at each step."""

    logits: Tensor
    target: Tensor
    feats: dict[str, Tensor] = field(default_factory=dict)           # student taps
    teacher_logits: Tensor | None = None
    teacher_feats: dict[str, Tensor] = field(default_factory=dict)   # teacher taps
    epoch: float = 0.0                                                # fractional epoch


@dataclass
class Setup:
    """What a term may use once before training."""

    student: nn.Module
    teacher: nn.Module | None
    student_shapes: dict[str, tuple]
    teacher_shapes: dict[str, tuple]
    teacher_node: Callable[[str], fx.Node] | None = None       # tap name -> node of the teacher's graph
    teacher_features: Callable[[list[str]], dict[str, Tensor]] | None = None  # taps on a few train batches
    log: Callable[[str], None] = print


class Term(nn.Module):
    needs_teacher = True
    features: str | None = None
    auto = "all"
    default_weight = 1.0
    teacher_bn_train = False  # ask for the teacher's BatchNorm in train mode (batch statistics)

    def __init__(self, weight: float | None = None, warmup_epochs: float = 0.0):
        super().__init__()
        self.weight = self.default_weight if weight is None else float(weight)
        self.warmup_epochs = float(warmup_epochs)
        self.pairs: list[tuple[str, str]] = []  # (teacher tap, student tap), set by the engine

    def factor(self, epoch: float) -> float:
        """The weight at fractional ``epoch``: linear warm-up over ``warmup_epochs``."""
        if self.warmup_epochs <= 0:
            return self.weight
        return self.weight * min(1.0, epoch / self.warmup_epochs)

    def setup(self, ctx: Setup) -> None:
        pass

    def extra_repr(self) -> str:
        return f"weight={self.weight}, pairs={self.pairs}"


class FeatureTerm(Term):
    """A term on (teacher, student) feature pairs, aligned by connectors built from the traced shapes."""

    features = "out"
    connect_channels = True   # project student channels to the teacher's with 1x1 conv + BN
    always_connect = False    # project even when channel counts agree (Heo et al.)
    match_spatial = True      # pool the larger map when spatial sizes differ

    def setup(self, ctx: Setup) -> None:
        self.align = nn.ModuleList(
            Align(ctx.student_shapes[s], ctx.teacher_shapes[t], channels=self.connect_channels,
                  always=self.always_connect, spatial=self.match_spatial)
            for t, s in self.pairs)

    def pairs_of(self, out: Outputs):
        for (t, s), align in zip(self.pairs, self.align):
            yield align(out.feats[s], out.teacher_feats[t])


# --------------------------------------------------------------------------------------------- logits
class CE(Term):
    """Cross-entropy with the labels: -log softmax(s)_y."""

    needs_teacher = False

    def __init__(self, weight=None, warmup_epochs=0.0, label_smoothing: float = 0.0):
        super().__init__(weight, warmup_epochs)
        self.label_smoothing = label_smoothing

    def forward(self, out: Outputs) -> Tensor:
        return F.cross_entropy(out.logits.float(), out.target, label_smoothing=self.label_smoothing)


class KD(Term):
    """Hinton et al. 2015: T^2 KL(softmax(t/T) || softmax(s/T)); pair with a ``ce`` term (0.1 + 0.9)."""

    default_weight = 0.9

    def __init__(self, weight=None, warmup_epochs=0.0, temperature: float = 4.0):
        super().__init__(weight, warmup_epochs)
        self.temperature = temperature

    def forward(self, out: Outputs) -> Tensor:
        return KF.kd(out.logits, out.teacher_logits, self.temperature)


class DKD(Term):
    """Zhao et al. 2022: alpha TCKD + beta NCKD, T^2-scaled, with a 20-epoch linear warm-up."""

    def __init__(self, weight=None, warmup_epochs=20.0, alpha: float = 1.0, beta: float = 8.0,
                 temperature: float = 4.0):
        super().__init__(weight, warmup_epochs)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, out: Outputs) -> Tensor:
        return KF.dkd(out.logits, out.teacher_logits, out.target, self.alpha, self.beta, self.temperature)


# ------------------------------------------------------------------------------------------- features
class AT(FeatureTerm):
    """Zagoruyko & Komodakis 2017: sum over positions of mean((a_s - a_t)^2), a = normalize(mean_c |f|^p)."""

    default_weight = 1000.0
    connect_channels = False  # attention maps average the channels away

    def __init__(self, weight=None, warmup_epochs=0.0, p: float = 2.0):
        super().__init__(weight, warmup_epochs)
        self.p = p

    def forward(self, out: Outputs) -> Tensor:
        return sum(KF.at(s, t, self.p) for s, t in self.pairs_of(out))


class SP(FeatureTerm):
    """Tung & Mori 2019: ||G_s - G_t||_F^2 / b^2 with row-normalised batch Gram matrices, last group."""

    default_weight = 3000.0
    auto = "last"
    connect_channels = False
    match_spatial = False

    def forward(self, out: Outputs) -> Tensor:
        return sum(KF.sp(s, t) for s, t in self.pairs_of(out))


class FitNet(FeatureTerm):
    """Romero et al. 2015: mean((r(s) - t)^2) with a 1x1 conv + BN regressor r, middle position."""

    default_weight = 100.0
    auto = "middle"
    always_connect = True  # the regressor is part of the method, even when channel counts agree

    def forward(self, out: Outputs) -> Tensor:
        return sum(KF.fitnet(s, t) for s, t in self.pairs_of(out))


class NST(FeatureTerm):
    """Huang & Wang 2017: MMD^2 with a polynomial kernel between normalised channel maps."""

    default_weight = 50.0
    connect_channels = False

    def forward(self, out: Outputs) -> Tensor:
        return sum(KF.nst(s, t) for s, t in self.pairs_of(out))


class PKT(FeatureTerm):
    """Passalis & Tefas 2018: KL between cosine-kernel conditional distributions of the embeddings."""

    default_weight = 30000.0
    auto = "embedding"
    connect_channels = False
    match_spatial = False

    def forward(self, out: Outputs) -> Tensor:
        return sum(KF.pkt(s, t) for s, t in self.pairs_of(out))


class RKD(FeatureTerm):
    """Park et al. 2019: 25 * distance + 50 * angle relational losses on the embeddings."""

    auto = "embedding"
    connect_channels = False
    match_spatial = False

    def __init__(self, weight=None, warmup_epochs=0.0, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__(weight, warmup_epochs)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(self, out: Outputs) -> Tensor:
        return sum(KF.rkd(s, t, self.distance_weight, self.angle_weight) for s, t in self.pairs_of(out))


class MarginReLU(FeatureTerm):
    """Heo et al. 2019: sum_i 2^-(N-1-i) * sum((r(s_i) - max(t_i, m_i))^2 [s > t' or t' > 0]) / b.

    Positions are pre-ReLU values. Margins m come from the BatchNorm feeding each teacher position (found
    through the teacher's fx graph, walking back through residual adds) of the *loaded* teacher, or are
    estimated from teacher features when no BatchNorm precedes the position. The student goes through a
    1x1 conv + BN connector; the teacher's BatchNorm uses batch statistics, as in the official code.
    """

    default_weight = 1e-3
    features = "pre"
    always_connect = True
    teacher_bn_train = True

    def setup(self, ctx: Setup) -> None:
        super().setup(ctx)
        margins, missing = [], []
        for t, _ in self.pairs:
            bn = _feeding_batchnorm(ctx.teacher, ctx.teacher_node(t)) if ctx.teacher_node else None
            if bn is None:
                missing.append(t)
                margins.append(None)
            else:
                margins.append(KF.margin_from_bn(bn.weight.detach(), bn.bias.detach()))
        if missing:
            ctx.log(f"margin_relu: no BatchNorm feeds {', '.join(missing)}; estimating margins from teacher "
                    f"features on the first training batches")
            feats = ctx.teacher_features(missing)
            for i, (t, _) in enumerate(self.pairs):
                if margins[i] is None:
                    f = feats[t].transpose(0, 1).flatten(1).float()
                    margins[i] = KF.margin_from_bn(f.std(1), f.mean(1))
        for i, m in enumerate(margins):
            self.register_buffer(f"margin{i}", m.float().clone())

    def forward(self, out: Outputs) -> Tensor:
        n = len(self.pairs)
        total = 0.0
        for i, (s, t) in enumerate(self.pairs_of(out)):
            total = total + KF.overhaul(s, t, getattr(self, f"margin{i}")) / 2 ** (n - 1 - i)
        return total


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_PASS_THROUGH = {"add", "iadd", "add_", "__add__"}


def _feeding_batchnorm(root: nn.Module, node: fx.Node, depth: int = 8) -> nn.BatchNorm2d | None:
    """The BatchNorm whose output is ``node``, looking back through residual additions (first operand first)."""
    if node is None or depth == 0:
        return None
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        if isinstance(module, _BN):
            return module
        if isinstance(module, (nn.Identity, nn.Dropout)):
            return _feeding_batchnorm(root, node.args[0], depth - 1)
        return None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name in _PASS_THROUGH:
        for arg in node.args:
            if isinstance(arg, fx.Node):
                found = _feeding_batchnorm(root, arg, depth - 1)
                if found is not None:
                    return found
    return None
