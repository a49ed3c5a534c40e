"""Loss terms: the ``nn.Module`` behind each ``loss:`` entry of a spec.

A term holds its state (connectors, margins, memory banks) and calls the pure math of
:mod:`kdgraph.losses.functional`. The protocol a user's term follows (``method: package.module:Name``):

* subclass :class:`Term` (or follow its attributes): ``needs_teacher``, ``needs_labels``, ``features``
  (``None`` for logit methods; ``"out"`` or ``"pre"`` for feature methods: what ``positions: auto``
  picks), ``auto`` (``"all"``, ``"last"``, ``"middle"`` or ``"embedding"``) and ``default_weight``;
* take its parameters as keyword arguments of ``__init__`` (they are the spec keys of the term), annotated
  with what they take (``temperature: Positive = 4.0``; see :mod:`kdgraph.params`): a spec value outside
  the declared type or range is a located problem of ``kdgraph validate``, never a NaN in training;
* optionally override ``setup(ctx)`` (called once, after the teacher is loaded, with the traced shapes);
* implement ``forward(out: Outputs) -> Tensor``, the *unweighted* loss. :class:`kdgraph.Distiller`
  multiplies it by ``weight`` (ramped up over ``warmup_epochs``: :meth:`Term.factor`) and reports each
  term separately.

What the framework offers a term beyond that (see :class:`Term`): the dataset index of every sample
(``out.index``), which samples carry a label (``out.labelled``, ``needs_labels``), state saved in
checkpoints (buffers), state kept equal across processes (:func:`kdgraph.distributed.gather_tensors` and
``synced_buffers``), a pre-training stage of its own (``init_epochs``, :meth:`Term.init_loss`,
:meth:`Term.init_parameters`) and a learning-rate multiplier for its own parameters (``lr_scale``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..distributed import gather_tensors
from ..errors import UserError
from ..params import NonNegative, Positive, PositiveInt, Probability, Range
from . import functional as KF
from .connectors import ABF, Align, Paraphraser, Translator, describe


@dataclass
class Outputs:
    """What a term sees at each step."""

    logits: Tensor
    target: Tensor                                                    # UNLABELLED (-100) where unlabelled
    feats: dict[str, Tensor] = field(default_factory=dict)           # student taps
    teacher_logits: Tensor | None = None
    teacher_feats: dict[str, Tensor] = field(default_factory=dict)   # teacher taps
    epoch: float = 0.0                                                # fractional epoch (< 0: init stage)
    index: Tensor | None = None   # (batch,) int64: each sample's index in the training set (None: not given)

    @property
    def labelled(self) -> Tensor:
        """(batch,) bool: the samples that carry a label (``target != UNLABELLED``)."""
        return self.target != KF.UNLABELLED


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
    num_samples: int | None = None   # size of the training set: the range of ``Outputs.index``
    targets: Tensor | None = None    # (num_samples,) class label of every training sample, by index
    seed: int = 0                    # the run's seed; a term's random draws should derive from it


class Term(nn.Module):
    """One entry of a spec's ``loss:`` list: an ``nn.Module`` returning its *unweighted* loss for a step.

    Subclasses set the class attributes and implement :meth:`forward`; their ``__init__`` keyword
    arguments are the spec keys of the term (``weight`` and ``warmup_epochs`` come from this class).

    Class attributes:
        needs_teacher: whether the term reads the teacher's outputs (the teacher forward is skipped when
            no term does).
        features: ``None`` for a term on the logits; ``"out"`` (module outputs) or ``"pre"``
            (pre-activations) for a term on tapped features -- what ``positions: auto`` picks.
        auto: which positions ``auto`` picks: ``"all"`` stage ends, ``"last"``, ``"middle"`` or
            ``"embedding"`` (the input of the last Linear).
        default_weight: the weight when the spec gives none (the method's canonical weight).
        teacher_bn_train: the term's teacher features come with BatchNorm on batch statistics (from a
            view of the teacher; its running statistics never move).
        init_epochs, lr_scale, synced_buffers: the pre-training stage, the learning-rate multiplier of
            the term's parameters, the buffers it keeps equal across processes (sections below).
        weight_map_reference: for a loss whose value per position scales as 1/(H*W) of its map (AT), the
            map sizes ``default_weight`` was tuned on; the UI then hints at the equivalent weight for the
            maps of the spec's models.

    Args:
        weight: the term's weight in the total loss (default :attr:`default_weight`).
        warmup_epochs: ramp the weight linearly from 0 over this many epochs.

    After construction :func:`~kdgraph.losses.build_terms` sets ``self.pairs``, the resolved
    ``(teacher tap, student tap)`` positions; :meth:`setup` runs once with the traced shapes before the
    first step.

    Example::

        from kdgraph.losses import Term

        class SoftL1(Term):  # mean |softmax(s) - softmax(t)|
            def forward(self, out):
                return (out.logits.softmax(1) - out.teacher_logits.softmax(1)).abs().mean()

        # in a spec:  loss: [{method: ce}, {method: mypkg.losses:SoftL1, weight: 2.0}]

    **Sample indices.** ``out.index`` holds the training-set index of each sample of the batch (every
    loader of ``kdgraph run``, and shards under DDP); ``ctx.num_samples`` and ``ctx.targets`` in
    :meth:`setup` give the set's size and labels, e.g. to size a memory bank. In your own loop, pass
    ``index=`` to :class:`~kdgraph.Distiller`.

    **State.** Buffers (``register_buffer``) are saved in every checkpoint with the connectors and loaded
    before a resumed run's next step, so a memory bank continues bit-exactly. Draw random numbers from
    torch's global generator (saved and restored per process by the engine) or from a generator you seed
    from ``ctx.seed`` and a counter kept in a buffer; a ``torch.Generator`` attribute is *not* saved.

    **Several processes.** Each process sees its shard of the batch. Keep state equal across processes
    by updating it from :func:`kdgraph.distributed.gather_tensors` (the whole batch, every process, in the same order), and list such
    buffers in ``synced_buffers`` so DDP does not broadcast them from rank 0 at each step. Initialise them
    identically on every process (from ``ctx.seed``, not the global generator, which is seeded per rank).

    **Pre-training stage** (Heo et al.'s AB, Yim et al.'s FSP, Kim et al.'s FT): a term with
    ``init_epochs > 0`` (spec key, or a class default) runs that many epochs before distillation, in which
    the loss is the sum of the active terms' :meth:`init_loss` (unweighted, as RepDistiller) and a fresh
    optimizer of the spec's kind, at the spec's learning rate held constant, updates
    :meth:`init_parameters` only; the student is in train mode only while some active term trains
    student parameters, the teacher stays in eval mode. The stage lasts the most epochs any term asks
    for, and every term's part ends with it: a term with fewer init epochs joins later. During the stage
    ``out.epoch`` is negative (from ``-init_epochs`` up to 0); distillation epochs count from 0, as without
    the stage. The engine logs the stage (metrics rows with ``"stage": "init"``, TensorBoard
    ``init/...``) and resumes it exactly.

    **Labels.** Under ``data.labels`` the samples whose label is not kept come with the target
    ``UNLABELLED`` (-100, torch's ``ignore_index`` default; ``out.labelled`` is the mask of the others).
    A term that reads ``out.target`` sets ``needs_labels = True`` (``kdgraph validate`` then refuses it
    where no label is kept) and uses the labelled samples only, averaging over them with
    :func:`~kdgraph.losses.functional.labelled_mean` (0 for a batch without any, where a plain mean
    would be NaN). A term that learns from the teacher alone uses every sample.

    **Learning rate.** ``lr_scale`` (spec key, default 1) multiplies the learning rate of the term's own
    parameters (in both stages); the student's parameters always take the spec's rate.

    Example, a term with its own pre-trained connector::

        class Hint(FeatureTerm):
            init_epochs = 5                      # default; the spec may say otherwise
            def init_loss(self, out):            # what the init stage minimises
                return sum(F.mse_loss(s, t) for s, t in self.pairs_of(out))
            def forward(self, out):
                return self.init_loss(out)
    """

    needs_teacher = True
    needs_labels = False  # reads out.target: averages over labelled samples, refused when none are kept
    features: str | None = None
    auto = "all"
    default_weight = 1.0
    teacher_bn_train = False  # ask for teacher features with BatchNorm on batch statistics (its own forward)
    init_epochs = 0           # epochs of the pre-training stage (spec key ``init_epochs``)
    lr_scale = 1.0            # learning-rate multiplier of the term's own parameters (spec key ``lr_scale``)
    synced_buffers: tuple[str, ...] = ()  # buffers the term keeps equal across processes itself
    # For a term whose loss per position scales as 1/(H*W) of its map: the map sizes its default_weight
    # was tuned on (None: the weight does not depend on map sizes). Read by the UI's weight hint.
    weight_map_reference: tuple[tuple[int, int], ...] | None = None

    def __init__(self, weight: NonNegative | None = None, warmup_epochs: NonNegative = 0.0):
        super().__init__()
        self.weight = self.default_weight if weight is None else float(weight)
        self.warmup_epochs = float(warmup_epochs)
        self.pairs: list[tuple[str, str]] = []  # (teacher tap, student tap), set by build_terms

    def factor(self, epoch: float) -> float:
        """The weight at fractional ``epoch``: linear warm-up over ``warmup_epochs``."""
        if self.warmup_epochs <= 0:
            return self.weight
        return self.weight * min(1.0, max(0.0, epoch) / self.warmup_epochs)

    def setup(self, ctx: Setup) -> None:
        """Build state once before training, from ``ctx`` (:class:`Setup`: the models, the taps' traced
        shapes, the teacher's graph, teacher features on a few training batches). Does nothing here."""

    def forward(self, out: Outputs) -> Tensor:
        """The *unweighted* loss of one step, a scalar tensor, from ``out`` (:class:`Outputs`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(out)")

    def init_loss(self, out: Outputs) -> Tensor:
        """The loss the pre-training stage minimises (default: :meth:`forward`)."""
        return self(out)

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """What the pre-training stage updates (default: the term's own parameters).

        Return student parameters too where the method trains them (AB and FSP train the student's
        feature layers; their classifier is left alone).
        """
        return [p for p in self.parameters() if p.requires_grad]

    def connectors(self) -> list[str]:
        """What sits between each pair's values and the loss (after :meth:`setup`), one line per pair of
        :attr:`pairs`: e.g. ``1x1 conv+BN 32→64``, ``none``. Here: the term's own modules, if any (the
        wiring picture of ``kdgraph show`` and the UI draws these)."""
        own = sorted({type(m).__name__ for m in self.children()})
        return [", ".join(own) if own else "none"] * len(self.pairs)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, pairs={self.pairs}"


class FeatureTerm(Term):
    """A term on (teacher, student) feature pairs, aligned by connectors built from the traced shapes.

    :meth:`setup` builds one :class:`~kdgraph.losses.connectors.Align` per pair in ``self.align``;
    :meth:`pairs_of` yields the aligned ``(student, teacher)`` tensors of a step. The class attributes
    choose the connectors:

    Class attributes:
        connect_channels: project the student's channels to the teacher's with a 1x1 conv + BN where
            they differ.
        always_connect: project even where the channel counts agree (Heo et al.).
        match_spatial: average-pool the larger map where the spatial sizes differ.

    Example (the ``Cosine`` term of the README)::

        import torch.nn.functional as F
        from kdgraph.losses import FeatureTerm

        class Cosine(FeatureTerm):  # 1 - cos(r(s), t) averaged over positions and samples
            auto = "last"

            def forward(self, out):
                return sum((1 - F.cosine_similarity(s.flatten(1), t.flatten(1))).mean()
                           for s, t in self.pairs_of(out))
    """

    features = "out"
    connect_channels = True   # project student channels to the teacher's with 1x1 conv + BN
    always_connect = False    # project even when channel counts agree (Heo et al.)
    match_spatial = True      # pool the larger map when spatial sizes differ

    def setup(self, ctx: Setup) -> None:
        self.align = nn.ModuleList(
            Align(ctx.student_shapes[s], ctx.teacher_shapes[t], channels=self.connect_channels,
                  always=self.always_connect, spatial=self.match_spatial)
            for t, s in self.pairs)

    def connectors(self) -> list[str]:
        """Each pair's :class:`~kdgraph.losses.connectors.Align` described, with the term's own per-pair
        modules (a ``ModuleList`` with one module per pair, e.g. VID's regressors) after it (see
        :meth:`Term.connectors`)."""
        align = getattr(self, "align", None)
        if align is None:
            return ["built at setup"] * len(self.pairs)
        own = [(name, ml) for name, ml in self.named_children()
               if name != "align" and isinstance(ml, nn.ModuleList) and len(ml) == len(self.pairs)]
        out = []
        for i, a in enumerate(align):
            parts = [a.describe()] if a.describe() != "none" or not own else []
            out.append("; ".join(parts + [f"{name}: {describe(ml[i])}" for name, ml in own]))
        return out

    def pairs_of(self, out: Outputs):
        """The aligned ``(student, teacher)`` feature tensors of each pair, in ``self.pairs`` order."""
        for (t, s), align in zip(self.pairs, self.align):
            yield align(out.feats[s], out.teacher_feats[t])


# --------------------------------------------------------------------------------------------- logits
class CE(Term):
    """Cross-entropy with the labels: -log softmax(s)_y, averaged over the labelled samples."""

    needs_teacher = False
    needs_labels = True

    def __init__(self, weight=None, warmup_epochs=0.0, label_smoothing: Probability = 0.0):
        super().__init__(weight, warmup_epochs)
        self.label_smoothing = label_smoothing

    def forward(self, out: Outputs) -> Tensor:
        return KF.cross_entropy(out.logits, out.target, self.label_smoothing)


class KD(Term):
    """Hinton et al. 2015: T^2 KL(softmax(t/T) || softmax(s/T)); pair with a ``ce`` term (0.1 + 0.9).

    ``standardize: true`` Z-scores both logits first (Sun et al. 2024, logit standardization); T then
    acts as their "base temperature". The authors' recipe with it: ``temperature: 2``, ``weight: 9``
    (with ``ce`` 0.1).
    """

    default_weight = 0.9

    def __init__(self, weight=None, warmup_epochs=0.0, temperature: Positive = 4.0, standardize: bool = False):
        super().__init__(weight, warmup_epochs)
        self.temperature, self.standardize = temperature, _flag("standardize", standardize)

    def forward(self, out: Outputs) -> Tensor:
        return KF.kd(out.logits, out.teacher_logits, self.temperature, standardize=self.standardize)


class DKD(Term):
    """Zhao et al. 2022: alpha TCKD + beta NCKD, T^2-scaled, with a 20-epoch linear warm-up; labelled samples.

    ``standardize: true`` Z-scores both logits first (Sun et al. 2024). The authors' recipe with it:
    ``temperature: 2``, ``weight: 9`` (their alpha and beta times 9).
    """

    needs_labels = True  # both parts are defined by the target class

    def __init__(self, weight=None, warmup_epochs=20.0, alpha: NonNegative = 1.0, beta: NonNegative = 8.0,
                 temperature: Positive = 4.0, standardize: bool = False):
        super().__init__(weight, warmup_epochs)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.standardize = _flag("standardize", standardize)

    def forward(self, out: Outputs) -> Tensor:
        return KF.dkd(out.logits, out.teacher_logits, out.target, self.alpha, self.beta, self.temperature,
                      standardize=self.standardize)


def _flag(key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


# ------------------------------------------------------------------------------------------- features
class AT(FeatureTerm):
    """Zagoruyko & Komodakis 2017: sum over positions of mean((a_s - a_t)^2), a = normalize(mean_c |f|^p).

    ``form: distillation-project`` replays the original Distillation project's code instead
    (:func:`~kdgraph.losses.functional.at_distillation_project`: signed channel sums, normalised by a
    broadcast across the batch; ``p`` unused), for reproducing its tables (with its weight 30 = beta/2).
    """

    default_weight = 1000.0
    connect_channels = False  # attention maps average the channels away
    # Each position's loss is a mean over its H*W normalised attention values, so it scales as 1/(H*W): the
    # canonical weight holds for the group outputs of a WRN on 32x32 CIFAR images (the UI's weight hint).
    weight_map_reference = ((32, 32), (16, 16), (8, 8))
    FORMS = ("authors", "distillation-project")

    def __init__(self, weight=None, warmup_epochs=0.0, p: Positive = 2.0,
                 form: Literal["authors", "distillation-project"] = "authors"):
        super().__init__(weight, warmup_epochs)
        if form not in self.FORMS:
            raise ValueError(f"form must be one of {', '.join(self.FORMS)}, not {form!r}")
        self.p, self.form = p, form

    def forward(self, out: Outputs) -> Tensor:
        if self.form == "distillation-project":
            return sum(KF.at_distillation_project(s, t) for s, t in self.pairs_of(out))
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

    def __init__(self, weight=None, warmup_epochs=0.0, distance_weight: NonNegative = 25.0,
                 angle_weight: NonNegative = 50.0):
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

    To replay other code: ``margin`` sets one constant margin for every channel (the original Distillation
    project's were -0.7979 on WRN -- read from BatchNorms before its teacher was loaded -- and -1 on
    ShuffleNet); ``teacher_bn: eval`` gives the teacher's features with its running statistics (as that
    project's code), ``train`` (default) with batch statistics (as Heo et al.'s).
    """

    default_weight = 1e-3
    features = "pre"
    always_connect = True
    teacher_bn_train = True

    def __init__(self, weight=None, warmup_epochs=0.0, margin: float | None = None,
                 teacher_bn: Literal["train", "eval"] = "train"):
        super().__init__(weight, warmup_epochs)
        if teacher_bn not in ("train", "eval"):
            raise ValueError(f"teacher_bn must be 'train' (batch statistics, Heo et al.) or 'eval' (running "
                             f"statistics), not {teacher_bn!r}")
        if margin is not None and not margin <= 0:
            raise ValueError(f"margin must be a number <= 0 (the mean of a negative response), not {margin!r}")
        self.margin, self.teacher_bn = margin, teacher_bn
        self.teacher_bn_train = teacher_bn == "train"

    def setup(self, ctx: Setup) -> None:
        super().setup(ctx)
        if self.margin is not None:  # one constant for every channel of every position
            for i, (t, _) in enumerate(self.pairs):
                self.register_buffer(f"margin{i}", torch.full((ctx.teacher_shapes[t][0],), float(self.margin)))
            return
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


# ------------------------------------------------------------------------------ contrastive and review
def _seed_of(*values: int) -> int:
    """A well-mixed 63-bit seed from a few integers."""
    state = np.random.SeedSequence([int(v) % 2**64 for v in values]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _unit_rows(x: Tensor) -> Tensor:
    """Rows divided by their L2 norm, no epsilon (the authors' ``Normalize`` of CRD's embedding heads)."""
    return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class CRD(Term):
    """Tian et al. 2020: NCE(v_s; teacher bank) + NCE(v_t; student bank), K negatives, memory momentum 0.5.

    Contrastive Representation Distillation on the embeddings (the classifier's input) of both models.
    Each goes through a linear embedding head to ``embed_dim`` and L2 normalisation; a memory bank per
    model holds one row per training sample (``out.index``), updated after each step as
    normalize(momentum * row + (1 - momentum) * v). Each sample is contrasted with its own row of the other
    model's bank (the positive) and ``negatives`` other rows, by :func:`kdgraph.losses.functional.crd`
    (temperature 0.07, the normalisers Z set from the first batch and then fixed, as the authors' code).

    Follows the authors' code (RepDistiller) rather than the paper where they differ: both anchors
    (the paper writes the teacher-anchored term), Z from the first batch, banks initialised uniform in
    +-1/sqrt(embed_dim/3), negatives drawn from the samples of *other classes* (their ``exact`` mode;
    ``negatives_from: all`` draws from every sample, the paper's uniform noise). The authors draw each
    sample's negatives without replacement when there are enough; kdgraph draws them with replacement,
    which leaves the expected loss unchanged and keeps the draw one vectorised call on the device.

    Negatives are a function of the run's seed, a step counter and the sample's index, not of the process
    count: a run on several processes gathers the whole batch's indices and embeddings, draws the same
    negatives and applies the same bank update on every process, so the banks stay identical (DDP does
    not broadcast them). The banks, the normalisers and the counter are saved in checkpoints.
    """

    default_weight = 0.8
    features = "out"
    auto = "embedding"
    synced_buffers = ("student_bank", "teacher_bank", "targets", "by_class", "class_start", "class_count")

    def __init__(self, weight=None, warmup_epochs=0.0, embed_dim: PositiveInt = 128, negatives: PositiveInt = 16384,
                 temperature: Positive = 0.07, momentum: Annotated[float, Range(ge=0, lt=1)] = 0.5,
                 negatives_from: Literal["other_classes", "all"] = "other_classes"):
        super().__init__(weight, warmup_epochs)
        if negatives_from not in ("other_classes", "all"):
            raise ValueError(f"negatives_from must be 'other_classes' or 'all', not {negatives_from!r}")
        if int(negatives) < 1 or int(embed_dim) < 1 or not 0 <= momentum < 1 or not temperature > 0:
            raise ValueError("needs negatives >= 1, embed_dim >= 1, 0 <= momentum < 1 and temperature > 0")
        self.embed_dim, self.negatives = int(embed_dim), int(negatives)
        self.temperature, self.momentum, self.negatives_from = float(temperature), float(momentum), negatives_from
        self.needs_labels = negatives_from == "other_classes"  # every sample's class, for the negatives
        self.z: list[float] = [-1.0, -1.0]  # (student anchor, teacher anchor); < 0: not set yet
        self.draws = 0                      # steps drawn so far: keys the negatives' generator
        self.seed = 0

    def setup(self, ctx: Setup) -> None:
        if len(self.pairs) != 1:
            raise UserError(f"crd distils one position (the embeddings); got {len(self.pairs)}: {self.pairs}")
        if ctx.num_samples is None:
            raise UserError("crd keeps a memory bank per training sample: it needs the training set's size "
                            "(Distiller.setup(..., num_samples=len(train_set)))")
        t, s = self.pairs[0]
        n, self.seed = int(ctx.num_samples), int(ctx.seed)
        self.embed_student = nn.Linear(math.prod(ctx.student_shapes[s]), self.embed_dim)
        self.embed_teacher = nn.Linear(math.prod(ctx.teacher_shapes[t]), self.embed_dim)
        g = torch.Generator().manual_seed(_seed_of(self.seed, 0x43524431))  # the same on every process
        bound = 1.0 / math.sqrt(self.embed_dim / 3)
        for name in ("student_bank", "teacher_bank"):
            self.register_buffer(name, torch.rand(n, self.embed_dim, generator=g) * (2 * bound) - bound)
        if self.negatives_from == "other_classes":
            if ctx.targets is None or len(ctx.targets) != n:
                raise UserError("crd draws negatives from other classes, which needs the label of every training "
                                "sample (a data set with `targets`, or Distiller.setup(..., targets=...)); "
                                "`negatives_from: all` draws from every sample instead")
            targets = torch.as_tensor(ctx.targets).long().cpu()
            if (targets == KF.UNLABELLED).any():
                raise UserError("crd draws negatives from other classes, which needs the label of every training "
                                "sample, and data.labels hides some: use `negatives_from: all`")
            counts = torch.bincount(targets)
            self.register_buffer("targets", targets, persistent=False)
            self.register_buffer("by_class", torch.argsort(targets, stable=True), persistent=False)
            self.register_buffer("class_start", torch.cumsum(counts, 0) - counts, persistent=False)
            self.register_buffer("class_count", counts, persistent=False)

    def connectors(self) -> list[str]:
        """The embedding heads and memory banks (see :meth:`Term.connectors`)."""
        return [f"linear heads →{self.embed_dim}-d, memory banks"] * len(self.pairs)

    def get_extra_state(self) -> dict:
        return {"z": list(self.z), "draws": self.draws}

    def set_extra_state(self, state: dict) -> None:
        self.z, self.draws = [float(v) for v in state["z"]], int(state["draws"])

    def contrast_indices(self, index: Tensor, batch_index: Tensor) -> Tensor:
        """(b, 1 + K): each sample's own index, then K negatives; ``batch_index``: the whole (gathered) batch.

        Drawn for the batch's distinct indices in sorted order from a generator keyed by (seed, step), so
        a sample's negatives do not depend on how the batch is split over processes.
        """
        n = self.student_bank.shape[0]
        ordered = torch.sort(batch_index).values
        g = torch.Generator(device=index.device).manual_seed(_seed_of(self.seed, self.draws, 0x4E4547))
        u = torch.rand(len(ordered), self.negatives, generator=g, device=index.device, dtype=torch.float64)
        u = u[torch.searchsorted(ordered, index)]
        if self.negatives_from == "all":
            negatives = (u * n).long().clamp_max(n - 1)
        else:
            cls = self.targets[index]
            start, count = self.class_start[cls][:, None], self.class_count[cls][:, None]
            k = (u * (n - count)).long().clamp_max(n - count - 1)        # among the other classes' samples
            negatives = self.by_class[k + count * (k >= start)]            # skip this class's block
        return torch.cat([index[:, None], negatives], dim=1)

    def forward(self, out: Outputs) -> Tensor:
        if out.index is None:
            raise UserError("crd needs each sample's training-set index: call the Distiller with index=")
        t, s = self.pairs[0]
        v_s = _unit_rows(self.embed_student(out.feats[s].flatten(1)).float())
        v_t = _unit_rows(self.embed_teacher(out.teacher_feats[t].flatten(1)).float())
        index = out.index.long()
        all_index, all_s, all_t = gather_tensors(index, v_s, v_t)
        idx = self.contrast_indices(index, all_index)
        s_rows, t_rows = self.student_bank[idx], self.teacher_bank[idx]
        if self.z[0] < 0:  # the authors' constants: the first batch's mean score (over every process) times N
            self.z = self._first_normalisers(v_s, v_t, s_rows, t_rows)
        loss = KF.crd(v_s, v_t, s_rows, t_rows, self.student_bank.shape[0], self.temperature, *self.z)
        if self.training:
            self._update_banks(all_index, all_s, all_t)
            self.draws += 1
        return loss

    @torch.no_grad()
    def _first_normalisers(self, v_s, v_t, s_rows, t_rows) -> list[float]:
        scores = [KF.crd_scores(v_s, t_rows, self.temperature), KF.crd_scores(v_t, s_rows, self.temperature)]
        sums, counts = gather_tensors(torch.stack([x.sum() for x in scores])[None],
                              torch.tensor([[scores[0].numel()]], device=v_s.device))
        if sums.shape[0] == 1:  # one process: exactly the authors' mean()
            return [float(KF.crd_normaliser(x, self.student_bank.shape[0])) for x in scores]
        mean = sums.double().sum(0) / counts.double().sum()
        return [float(torch.tensor(float(m), dtype=torch.float32) * self.student_bank.shape[0]) for m in mean]

    @torch.no_grad()
    def _update_banks(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """Momentum update of the banks' rows at ``index``; where an index repeats (padding of the last
        shards), every copy takes the value of its last occurrence, so the result does not depend on the
        order in which index_copy_ writes them."""
        ordered, order = torch.sort(index, stable=True)
        b = len(ordered)
        is_last = torch.ones_like(ordered, dtype=torch.bool)
        is_last[:-1] = ordered[1:] != ordered[:-1]
        ends = torch.where(is_last, torch.arange(b, device=index.device), torch.full_like(ordered, b))
        last = order[ends.flip(0).cummin(0).values.flip(0)]
        for bank, v in ((self.student_bank, v_s), (self.teacher_bank, v_t)):
            bank.index_copy_(0, ordered, KF.crd_bank_update(bank[ordered], v[last], self.momentum).to(bank.dtype))

    def extra_repr(self) -> str:
        return (f"weight={self.weight}, pairs={self.pairs}, embed_dim={self.embed_dim}, negatives={self.negatives}, "
                f"temperature={self.temperature}, momentum={self.momentum}, negatives_from={self.negatives_from!r}")


class ReviewKD(Term):
    """Chen et al. 2021: hcl(ABF-fused student pyramid, teacher pyramid), deepest level first, 20-epoch warm-up.

    "Distilling Knowledge via Knowledge Review": every teacher level is matched by a student map fused
    from the student's same and *deeper* levels. From the deepest level up, an attention-based fusion
    (:class:`~kdgraph.losses.connectors.ABF`) mixes the level's student feature with the fused map of the
    level below it and projects the mix to the teacher's channels and size; the outputs and the teacher
    maps go to the hierarchical context loss :func:`kdgraph.losses.functional.hcl`.

    Positions (``auto``): the stage ends and the embedding of both models -- the teacher's pre-ReLU
    values (``positions: auto`` of ``margin_relu``) and the student's block outputs, as the authors' code
    (``preact=True`` for the teacher only); a (batch, C) embedding is a 1x1 map. Explicit pairs are
    listed shallow to deep. Middle channels are min(512, the deepest student level's channels).

    Weight 5 and the 20-epoch linear warm-up of the authors' CIFAR-100 scripts (with ``ce`` at 1); their
    scripts use 0.6 for resnet56 -> resnet20, 1 for resnet110 -> resnet32 and on ImageNet, 8 for ShuffleNetV2.
    """

    default_weight = 5.0
    features = "pre"            # the teacher's positions
    student_features = "out"    # the student's
    auto = "all+embedding"

    def __init__(self, weight=None, warmup_epochs=20.0, max_mid_channels: PositiveInt = 512):
        super().__init__(weight, warmup_epochs)
        self.max_mid_channels = int(max_mid_channels)

    def setup(self, ctx: Setup) -> None:
        if not self.pairs:
            raise UserError("reviewkd needs at least one position")
        s_shapes = [_as_map_shape(ctx.student_shapes[s]) for _, s in self.pairs]
        self.t_sizes = [tuple(_as_map_shape(ctx.teacher_shapes[t])[1:]) for t, _ in self.pairs]
        t_channels = [_as_map_shape(ctx.teacher_shapes[t])[0] for t, _ in self.pairs]
        mid = min(self.max_mid_channels, s_shapes[-1][0])
        deepest = len(self.pairs) - 1  # fusions run deep to shallow; the deepest level has nothing to fuse
        self.abfs = nn.ModuleList(ABF(s_shapes[i][0], mid, t_channels[i], fuse=i < deepest)
                                  for i in reversed(range(len(self.pairs))))

    def connectors(self) -> list[str]:
        """Each level's ABF path (:meth:`~kdgraph.losses.connectors.ABF.describe`), shallow to deep."""
        abfs = getattr(self, "abfs", None)
        return [abf.describe() for abf in reversed(abfs)] if abfs is not None else ["built at setup"] * len(self.pairs)

    def forward(self, out: Outputs) -> Tensor:
        students = [_as_map(out.feats[s]) for _, s in self.pairs][::-1]
        sizes = self.t_sizes[::-1]
        results, residual = [], None
        for x, abf, size in zip(students, self.abfs, sizes):
            y, residual = abf(x, residual, size)
            results.insert(0, y)
        return KF.hcl(results, [_as_map(out.teacher_feats[t]) for t, _ in self.pairs])


def _as_map_shape(shape: tuple) -> tuple:
    return tuple(shape) if len(shape) == 3 else (math.prod(shape), 1, 1)


def _as_map(x: Tensor) -> Tensor:
    """(batch, C, H, W) as it is; anything else (an embedding) as a (batch, C, 1, 1) map."""
    return x if x.dim() == 4 else x.reshape(x.shape[0], -1, 1, 1)


# ------------------------------------------------------------------------------ methods-B: dist, vid, cc, srrl
class DIST(Term):
    """Huang et al. 2022: T^2 (beta inter + gamma intra), Pearson-correlation losses of softmax(z/T).

    Defaults are the authors' CIFAR-100 recipe (``dist_t4``: T = 4, weight 2 next to ``ce`` 1); their
    ImageNet runs use T = 1.
    """

    default_weight = 2.0

    def __init__(self, weight=None, warmup_epochs=0.0, beta: float = 1.0, gamma: float = 1.0,
                 temperature: float = 4.0):
        super().__init__(weight, warmup_epochs)
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    def forward(self, out: Outputs) -> Tensor:
        return KF.dist(out.logits, out.teacher_logits, self.beta, self.gamma, self.temperature)


def _pointwise(c_in: int, c_out: int, dims: int) -> nn.Module:
    """A bias-free 1x1 convolution (a linear map for 1-d features)."""
    return nn.Conv2d(c_in, c_out, 1, bias=False) if dims == 3 else nn.Linear(c_in, c_out, bias=False)


class VID(FeatureTerm):
    """Ahn et al. 2019: sum over positions of mean(0.5 ((r(s) - t)^2 / var + log var)).

    Per position: a regressor r = 1x1 conv (student -> teacher channels), ReLU, 1x1 conv, ReLU, 1x1 conv
    (no biases, PyTorch's default init) and one learned variance per teacher channel, var = softplus(a) +
    eps with a initialised so that var = ``init_variance`` (5), as RepDistiller. Both train with the student.
    """

    default_weight = 1.0
    connect_channels = False  # the regressor is the method's own

    def __init__(self, weight=None, warmup_epochs=0.0, init_variance: float = 5.0, eps: float = 1e-5):
        super().__init__(weight, warmup_epochs)
        if not init_variance > eps:
            raise ValueError(f"init_variance must exceed eps ({eps}), got {init_variance}")
        self.init_variance, self.eps = float(init_variance), float(eps)

    def setup(self, ctx: Setup) -> None:
        super().setup(ctx)  # pooling of the larger map
        self.regressors, self.log_scales = nn.ModuleList(), nn.ParameterList()
        start = math.log(math.expm1(self.init_variance - self.eps))  # softplus^-1
        for t, s in self.pairs:
            s_shape, t_shape = ctx.student_shapes[s], ctx.teacher_shapes[t]
            c_s, c_t, dims = s_shape[0], t_shape[0], len(t_shape)
            self.regressors.append(nn.Sequential(_pointwise(c_s, c_t, dims), nn.ReLU(), _pointwise(c_t, c_t, dims),
                                                 nn.ReLU(), _pointwise(c_t, c_t, dims)))
            self.log_scales.append(nn.Parameter(torch.full((c_t,), start)))

    def forward(self, out: Outputs) -> Tensor:
        total = 0.0
        for (s, t), regressor, log_scale in zip(self.pairs_of(out), self.regressors, self.log_scales):
            total = total + KF.vid(regressor(s), t, F.softplus(log_scale) + self.eps)
        return total


class CC(FeatureTerm):
    """Peng et al. 2019: correlation congruence of linear embeddings (``embed_dim`` 128) of both models.

    ``form: code`` (default) is RepDistiller's form (from code the authors shared; weight 0.02 is its),
    ``form: paper`` the paper's Gaussian-RBF Taylor-kernel correlation matrices (see
    :func:`kdgraph.losses.functional.cc`). As RepDistiller, both embeddings are trainable linear layers
    on the penultimate features (the teacher's embedding trains too; the teacher does not).
    """

    default_weight = 0.02
    auto = "embedding"
    connect_channels = False
    match_spatial = False

    def __init__(self, weight=None, warmup_epochs=0.0, form: str = "code", embed_dim: int = 128,
                 gamma: float = 0.4, order: int = 2):
        super().__init__(weight, warmup_epochs)
        if form not in ("code", "paper"):
            raise ValueError(f"form must be 'code' or 'paper', got {form!r}")
        if not (isinstance(embed_dim, int) and embed_dim > 0) or not (isinstance(order, int) and order >= 0):
            raise ValueError(f"embed_dim must be a positive and order a non-negative integer "
                             f"(got {embed_dim!r}, {order!r})")
        self.form, self.embed_dim, self.gamma, self.order = form, embed_dim, gamma, order

    def setup(self, ctx: Setup) -> None:
        super().setup(ctx)
        self.embed_s = nn.ModuleList(nn.Linear(math.prod(ctx.student_shapes[s]), self.embed_dim)
                                     for _, s in self.pairs)
        self.embed_t = nn.ModuleList(nn.Linear(math.prod(ctx.teacher_shapes[t]), self.embed_dim)
                                     for t, _ in self.pairs)

    def forward(self, out: Outputs) -> Tensor:
        total = 0.0
        for (s, t), embed_s, embed_t in zip(self.pairs_of(out), self.embed_s, self.embed_t):
            total = total + KF.cc(embed_s(s.flatten(1)), embed_t(t.flatten(1)), self.form, self.gamma, self.order)
        return total


class SRRL(FeatureTerm):
    """Yang et al. 2021: feature matching + the teacher's classifier applied to the student's feature.

    The student's last feature map (``positions: auto``: the map the global pooling reads) goes through
    a connector (1x1 conv + BN + ReLU to the teacher's channels, He init, as the authors' code); the
    loss is mean((pool(r(s)) - pool(t))^2) + mean((head_t(r(s)) - z_t)^2), where head_t is the part of
    the teacher's graph from the teacher position to its logits (pooling and classifier), taken from
    its fx graph, so it is the teacher's own head whatever the architecture.
    """

    default_weight = 1.0
    auto = "final"
    always_connect = True

    def __init__(self, weight=None, warmup_epochs=0.0, feature_weight: float = 1.0,
                 regression_weight: float = 1.0):
        super().__init__(weight, warmup_epochs)
        self.feature_weight, self.regression_weight = feature_weight, regression_weight

    def setup(self, ctx: Setup) -> None:
        super().setup(ctx)
        if ctx.teacher is None or ctx.teacher_node is None:
            raise UserError("srrl needs the teacher's graph (its classifier) to be traced")
        # Not submodules: the heads are the teacher's own layers, which are neither trained nor saved here.
        self.__dict__["heads"] = [_head(ctx.teacher, ctx.teacher_node(t), t) for t, _ in self.pairs]

    def forward(self, out: Outputs) -> Tensor:
        total = 0.0
        for (s, t), head in zip(self.pairs_of(out), self.heads):
            s = F.relu(s)
            regressed = head(s.clone())  # a copy: an in-place op in the head cannot touch s
            total = total + KF.srrl(s, t, regressed, out.teacher_logits, self.feature_weight,
                                    self.regression_weight)
        return total


def _head(root: nn.Module, start: fx.Node, tap: str) -> fx.GraphModule:
    """The part of ``root``'s fx graph that maps the value at ``start`` to the model's output, as a module.

    It shares ``root``'s layers. The output must be one tensor computed from ``start`` and parameters only.
    """
    graph = fx.Graph()
    env = {start: graph.placeholder("feature")}
    nodes = list(start.graph.nodes)
    for node in nodes[nodes.index(start) + 1:]:
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node) or result not in env:
                raise UserError(f"srrl: the teacher's output is not one tensor computed from {tap!r}; "
                                f"choose the position whose value the teacher's pooling and classifier read")
            graph.output(env[result])
            return fx.GraphModule(root, graph, class_name="TeacherHead")
        inputs = node.all_input_nodes
        if not any(n in env for n in inputs):
            continue
        for n in inputs:
            if n not in env and n.op == "get_attr":
                env[n] = graph.node_copy(n)
            elif n not in env:
                raise UserError(f"srrl: the teacher's output after {tap!r} also depends on {n.name!r}; choose "
                                f"the position whose value the teacher's pooling and classifier read")
        env[node] = graph.node_copy(node, env.__getitem__)
    raise UserError(f"srrl: no output after {tap!r} in the teacher's graph")


# -------------------------------------------------------------- methods-B: ft, fsp, ab (a pre-training stage)
class FT(FeatureTerm):
    """Kim et al. 2018 (factor transfer): mean |normalize(T(s)) - normalize(P(t))| between factors.

    At the final feature map (``positions: auto``), a paraphraser P (an autoencoder, factor channels =
    ``rate`` x the teacher's) is pre-trained for ``init_epochs`` to reconstruct the teacher's feature
    (L1, the authors' code); during distillation it is frozen and its encoder gives the teacher's
    factor, while the student's translator T trains with the student. Weight 500 and the L1 losses are
    the authors' (RepDistiller: MSE reconstruction, an attention-map factor and weight 200). The stage's
    length is RepDistiller's 30 epochs (the authors' script trains the paraphraser for 6).
    """

    default_weight = 500.0
    auto = "final"
    init_epochs = 30
    connect_channels = False
    match_spatial = False

    def __init__(self, weight=None, warmup_epochs=0.0, rate: float = 0.5):
        super().__init__(weight, warmup_epochs)
        if not 0 < rate:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = float(rate)

    def setup(self, ctx: Setup) -> None:
        self.paraphrasers, self.translators, self.align = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for t, s in self.pairs:
            s_shape, t_shape = ctx.student_shapes[s], ctx.teacher_shapes[t]
            if len(s_shape) != 3 or len(t_shape) != 3:
                raise UserError(f"ft works on feature maps; got shapes {s_shape} and {t_shape} at {t!r}, {s!r}")
            k = max(1, int(round(t_shape[0] * self.rate)))
            self.paraphrasers.append(Paraphraser(t_shape[0], k))
            self.translators.append(Translator(s_shape[0], k))
            self.align.append(Align((k,) + tuple(s_shape[1:]), (k,) + tuple(t_shape[1:]), channels=False))

    def init_loss(self, out: Outputs) -> Tensor:
        return sum(F.l1_loss(p(out.teacher_feats[t]), out.teacher_feats[t])
                   for (t, _), p in zip(self.pairs, self.paraphrasers))

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(self.paraphrasers.parameters())

    def forward(self, out: Outputs) -> Tensor:
        total = 0.0
        for (t, s), paraphraser, translator, align in zip(self.pairs, self.paraphrasers, self.translators, self.align):
            with torch.no_grad():
                factor_t = paraphraser.encode(out.teacher_feats[t])
            total = total + KF.ft(*align(translator(out.feats[s]), factor_t))
        return total


class FSP(FeatureTerm):
    """Yim et al. 2017: sum over consecutive positions of mean((G_s - G_t)^2), G the FSP matrix.

    ``positions: auto`` are the first stage's input and every stage end: one FSP matrix per stage. As
    the paper and RepDistiller, the term acts in a pre-training stage (``init_epochs``, 30 as RepDistiller)
    that trains the student's layers; afterwards its weight is 0 (logged, not trained on; set a weight
    to keep it). Where student and teacher channel counts differ, a 1x1 conv + BN projects the student's
    map (kdgraph's addition: the paper and RepDistiller require equal counts).
    """

    default_weight = 0.0
    auto = "input+all"
    init_epochs = 30
    match_spatial = False  # FSP matrices are channels x channels whatever the maps' sizes

    def setup(self, ctx: Setup) -> None:
        if len(self.pairs) < 2:
            raise UserError(f"fsp relates consecutive positions: it needs at least 2, got {self.pairs}")
        super().setup(ctx)

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(self.parameters()) + list(student.parameters())

    def forward(self, out: Outputs) -> Tensor:
        maps = list(self.pairs_of(out))
        return sum(KF.fsp(s1, s2, t1, t2) for (s1, t1), (s2, t2) in zip(maps, maps[1:]))


class AB(FeatureTerm):
    """Heo et al. 2019 (AAAI): activation-boundary transfer, sum_i 2^-(N-1-i) * ab(r(s_i), t_i) * 3/1000.

    On the pre-ReLU stage ends, through 1x1 conv + BN connectors where channels differ, in a
    pre-training stage (``init_epochs``, 30 as RepDistiller) that trains the student's layers and the
    connectors; afterwards its weight is 0, as the authors (who then train with the task loss). The
    factor 3/1000, the per-position weights and the margin 1 are the authors' CIFAR code, as is the
    teacher's BatchNorm on batch statistics during the transfer (RepDistiller keeps it in eval mode).
    """

    default_weight = 0.0
    features = "pre"
    init_epochs = 30
    teacher_bn_train = True

    def __init__(self, weight=None, warmup_epochs=0.0, margin: float = 1.0):
        super().__init__(weight, warmup_epochs)
        self.margin = float(margin)

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return list(self.parameters()) + list(student.parameters())

    def forward(self, out: Outputs) -> Tensor:
        n = len(self.pairs)
        total = sum(KF.ab(s, t, self.margin) / 2 ** (n - 1 - i) for i, (s, t) in enumerate(self.pairs_of(out)))
        return total * 3e-3
