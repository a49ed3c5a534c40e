"""A student, a frozen teacher and loss terms, wired by taps: the distillation step of ``kdgraph run``.

Use it in your own training loop, no spec needed::

    from kdgraph import Distiller

    d = Distiller(student, teacher, [{"method": "ce", "weight": 0.1}, {"method": "kd", "weight": 0.9}],
                  input_shape=(3, 32, 32)).to(device)
    d.setup(next(iter(train_loader))[0].to(device), batches=train_loader)
    optimizer = torch.optim.SGD(d.trainable_parameters(), lr=0.1, momentum=0.9)
    for x, y in train_loader:
        loss, parts, logits = d(x.to(device), y.to(device), epoch=epoch)
        optimizer.zero_grad(); loss.backward(); optimizer.step()

The loss entries are those of a spec's ``loss:`` list (``method``, ``weight``, ``positions``, parameters).
The teacher stays in eval mode with frozen parameters and runs under ``no_grad``, computing its taps only
when a term needs it. A term may ask for teacher features computed with BatchNorm on batch statistics
(``teacher_bn_train``, Heo et al.): those come from a second view of the teacher that shares its
parameters, so every other term sees the eval-mode teacher and the teacher module itself is never
switched (its running statistics never move).

Terms that use sample indices (CRD's memory bank) need ``index=`` in the call; terms with a
pre-training stage (``init_epochs``) are driven by :meth:`Distiller.forward` with ``init=True`` (see
:class:`kdgraph.losses.Term`); :meth:`Distiller.param_groups` gives each term's ``lr_scale``.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .errors import UserError
from .graph import layers, tap, trace
from .losses import Outputs, Setup, build_terms


class TermProblems(UserError):
    """Problems in a ``loss`` list, as ``(key path, message)`` pairs (``kdgraph run`` maps them to spec lines)."""

    def __init__(self, problems: list[tuple[tuple, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{'.'.join(map(str, p))}: {m}" for p, m in problems))


class _Plain(nn.Module):
    """A model called like a tapped one: ``(output, {})``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), {}


def term_names(loss: Sequence[dict]) -> list[str]:
    """Names of the terms for logs and metrics: the method, ``_1``, ``_2``... for repeats."""
    names, seen = [], {}
    for t in loss:
        base = t["method"].rsplit(":", 1)[-1].lower()
        names.append(base if base not in seen else f"{base}_{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return names


class Distiller(nn.Module):
    """``loss, parts, logits = distiller(x, y, epoch)``: the weighted sum of the terms, each term, the logits.

    ``student`` and ``teacher`` are plain models (never edited); the taps each term needs come from
    :func:`kdgraph.tap`. Call :meth:`setup` once, on the training device, before the first step: it builds
    the connectors from the traced shapes and lets terms read the teacher (e.g. margins).

    Args:
        student: the model to train.
        teacher: the frozen model to learn from (its parameters get ``requires_grad=False``; it stays in
            eval mode), or None for terms that need none (``ce``).
        loss: the entries of a spec's ``loss:`` list -- ``method`` (a registered name or
            ``package.module:Term``), ``weight``, ``positions`` (``auto`` or ``[[teacher tap, student
            tap], ...]``) and the method's parameters. Default: ``[{"method": "ce"}]``.
        input_shape: the shape of one input without the batch, e.g. ``(3, 32, 32)``, to trace the models.
        leaf_modules: module paths or class names that tracing keeps opaque.
        log: where set-up messages go (e.g. the margins a term computed).

    Raises:
        TermProblems: a :class:`~kdgraph.errors.UserError` listing every problem of ``loss`` (unknown
            methods or parameters, tap names that do not exist, with the closest valid names).

    Calling it -- ``distiller(x, y, epoch, index)``, ``index`` the samples' training-set indices for terms
    that use them -- returns ``(loss, parts, logits)``: the weighted total (a scalar to backpropagate),
    each term's unweighted value by name (:attr:`names`), and the student's logits.

    Example::

        d = Distiller(student, teacher, [{"method": "ce", "weight": 0.1}, {"method": "kd", "weight": 0.9},
                                         {"method": "at", "positions": [["block2", "block2"]]}],
                      input_shape=(3, 32, 32))
        d.setup(x_example, batches=train_loader)
        loss, parts, logits = d(x, y, epoch=1.5)    # parts: {"ce": ..., "kd": ..., "at": ...}
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, loss: Sequence[dict] | None = None,
                 *, input_shape: Sequence[int], leaf_modules: Iterable[str] = (), log: Callable[[str], None] = print):
        super().__init__()
        loss = [{"method": "ce"}] if loss is None else [dict(t) for t in loss]
        self.leaf_modules = list(leaf_modules)
        self.log = log
        t_rows = layers(teacher, tuple(input_shape), self.leaf_modules) if teacher is not None else None
        s_rows = layers(student, tuple(input_shape), self.leaf_modules)
        terms, problems = build_terms(loss, teacher_rows=t_rows, student_rows=s_rows, has_teacher=teacher is not None)
        if problems:
            raise TermProblems(problems)
        self.student = student
        self.layer_rows = {"teacher": t_rows, "student": s_rows}  # the traced tables (kdgraph.layers rows)
        self.terms = nn.ModuleList(terms)
        self.names = term_names(loss)
        self.teacher = teacher
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.needs_teacher = teacher is not None and any(t.needs_teacher for t in terms)
        s_names = sorted({s for t in terms for _, s in t.pairs})
        # Not submodules: they share the models' parameters, which must appear once in state_dict().
        self.__dict__["s_forward"] = tap(student, s_names, self.leaf_modules) if s_names else _Plain(student)
        # One teacher forward per kind of BatchNorm the terms ask for (False: eval mode, True: batch statistics)
        self.__dict__["t_forwards"] = {}
        if teacher is not None:
            for batch_stats in (False, True):
                group = [t for t in terms if t.needs_teacher and t.teacher_bn_train == batch_stats]
                if group or (not batch_stats and not any(t.teacher_bn_train for t in terms)):
                    model = _batch_statistics_view(teacher) if batch_stats else teacher
                    names = sorted({t_ for t in group for t_, _ in t.pairs})
                    self.t_forwards[batch_stats] = tap(model, names, self.leaf_modules) if names else _Plain(model)
        self.train()

    @property
    def t_forward(self):
        """The eval-mode teacher's tapped forward (``None`` without a teacher, or when no term needs it)."""
        return self.t_forwards.get(False)

    # ----------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> "Distiller":
        self.training = mode
        self.student.train(mode)
        self.terms.train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's and the connectors' parameters (what the optimizer updates)."""
        return [p for p in list(self.student.parameters()) + list(self.terms.parameters()) if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """:meth:`trainable_parameters` as optimizer groups by the terms' ``lr_scale``.

        Each group carries ``lr_scale``: set ``group["lr"] = lr * group["lr_scale"]`` when you change the
        learning rate. One group when every scale is 1.
        """
        return self._groups([p for p in self.student.parameters() if p.requires_grad],
                            [(t, [p for p in t.parameters() if p.requires_grad]) for t in self.terms])

    # ----------------------------------------------------------------------------- pre-training stage
    @property
    def init_epochs(self) -> int:
        """Epochs of the pre-training stage: the most any term asks for (0: no stage)."""
        return max((int(t.init_epochs) for t in self.terms), default=0)

    def init_active(self, epoch: float) -> list[int]:
        """Positions of the terms pre-training at (negative) fractional ``epoch``: those with ``init_epochs >= -epoch``."""
        return [i for i, t in enumerate(self.terms) if t.init_epochs > 0 and epoch >= -t.init_epochs]

    def init_param_groups(self) -> list[dict]:
        """Optimizer groups of the pre-training stage: every term's :meth:`~Term.init_parameters`, deduplicated."""
        student = {id(p) for p in self.student.parameters()}
        seen, s_params, t_params = set(), [], []
        for t in self.terms:
            if t.init_epochs <= 0:
                continue
            own = []
            for p in t.init_parameters(self.student):
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    (s_params if id(p) in student else own).append(p)
            t_params.append((t, own))
        return self._groups(s_params, t_params)

    def init_mode(self, epoch: float) -> "Distiller":
        """Modes for a pre-training step at ``epoch``: terms train; the student trains only where an active term
        updates student parameters (RepDistiller puts the student's feature layers in train mode for AB and
        FSP, and the whole student in eval mode for FT); the teacher stays in eval mode."""
        student = {id(p) for p in self.student.parameters()}
        trains = any(id(p) in student for i in self.init_active(epoch)
                     for p in self.terms[i].init_parameters(self.student))
        self.train()
        self.student.train(trains)
        return self

    @staticmethod
    def _groups(student_params: list, term_params: list[tuple]) -> list[dict]:
        by_scale: dict[float, list] = {1.0: list(student_params)}
        for term, params in term_params:
            by_scale.setdefault(float(term.lr_scale), []).extend(params)
        return [{"params": ps, "lr_scale": scale} for scale, ps in by_scale.items() if ps or scale == 1.0]

    def synced_buffer_names(self) -> list[str]:
        """Names (in this module's ``state_dict``) of the buffers terms keep equal across processes themselves."""
        return [f"terms.{i}.{name}" for i, t in enumerate(self.terms) for name, _ in t.named_buffers()
                if name in t.synced_buffers]

    def compile_forwards(self, **kwargs) -> None:
        """``torch.compile`` the tapped student and teacher forwards (graph breaks stay in the losses)."""
        self.__dict__["s_forward"] = torch.compile(self.s_forward, **kwargs)
        for k, f in self.t_forwards.items():
            self.t_forwards[k] = torch.compile(f, **kwargs)

    # ----------------------------------------------------------------------------------------- setup
    @torch.no_grad()
    def setup(self, example: Tensor, batches: Iterable | None = None, probe_batches: int = 4, *,
              num_samples: int | None = None, targets: Tensor | None = None, seed: int = 0) -> None:
        """Build connectors from the shapes of ``example``'s taps and let terms read the teacher.

        ``batches`` (an iterable of ``(x, y, ...)``, e.g. the training loader) feeds terms that estimate
        statistics from teacher features, such as margins where no BatchNorm precedes a tap.
        ``num_samples`` and ``targets`` (the training set's size and labels) and ``seed`` reach the terms
        as :class:`~kdgraph.losses.Setup` fields (CRD sizes its memory bank and draws its negatives with them).
        """
        device = example.device
        was = self.training
        self.student.eval()
        s_shapes = {k: tuple(v.shape[1:]) for k, v in self.s_forward(example[:2])[1].items()}
        t_shapes = {}
        for forward in self.t_forwards.values():
            t_shapes.update({k: tuple(v.shape[1:]) for k, v in forward(example[:2])[1].items()})
        self.train(was)
        traced = trace(self.teacher, self.leaf_modules, example=example[:2]) if self.teacher is not None else None
        for term in self.terms:
            ctx = Setup(student=self.student, teacher=self.teacher, student_shapes=s_shapes,
                        teacher_shapes=t_shapes, teacher_node=traced.resolve if traced is not None else None,
                        teacher_features=self._probe(batches, probe_batches, device, term.teacher_bn_train),
                        log=self.log, num_samples=num_samples, targets=targets, seed=seed)
            term.setup(ctx)
        self.terms.to(device)

    def _probe(self, batches, probe_batches: int, device, batch_stats: bool):
        """``teacher_features(names)``: the teacher's taps on the first training batches, as the term sees them."""

        def teacher_features(names: list[str]) -> dict[str, Tensor]:
            if batches is None:
                raise UserError("this loss needs teacher features from training batches: pass `batches` to setup()")
            model = _batch_statistics_view(self.teacher) if batch_stats else self.teacher
            probe = tap(model, names, self.leaf_modules)
            got: dict[str, list] = {n: [] for n in names}
            for i, batch in enumerate(batches):
                if i == probe_batches:
                    break
                for n, v in probe(batch[0].to(device))[1].items():
                    got[n].append(v.float())
            return {n: torch.cat(v) for n, v in got.items()}

        return teacher_features

    # --------------------------------------------------------------------------------------- a step
    def forward(self, x: Tensor, y: Tensor, epoch: float = 0.0, index: Tensor | None = None, *,
                init: bool = False) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``(loss, parts, logits)`` for a batch; ``index``: the samples' training-set indices.

        With ``init=True`` (the pre-training stage, ``epoch < 0``) the loss is the unweighted sum of the
        active terms' :meth:`~kdgraph.losses.Term.init_loss`, ``parts`` holds those, and ``logits`` is detached.
        """
        teacher = {}
        if self.needs_teacher:
            with torch.no_grad():
                teacher = {k: f(x) for k, f in self.t_forwards.items()}
        logits, feats = self.s_forward(x)
        outs = {k: Outputs(logits=logits, target=y, feats=feats, teacher_logits=v[0], teacher_feats=v[1],
                           epoch=epoch, index=index) for k, v in teacher.items()}
        plain = Outputs(logits=logits, target=y, feats=feats, epoch=epoch, index=index)
        if init:
            active = self.init_active(epoch)
            parts = {self.names[i]: self.terms[i].init_loss(outs.get(self.terms[i].teacher_bn_train, plain))
                     for i in active}
            return sum(parts.values(), logits.new_zeros(())), parts, logits.detach()
        parts = {n: term(outs.get(term.teacher_bn_train, plain)) for n, term in zip(self.names, self.terms)}
        loss = sum(term.factor(epoch) * v for term, v in zip(self.terms, parts.values()))
        return loss, parts, logits

    def describe(self) -> list[str]:
        """Log lines: the loss and each term's positions."""
        lines = ["loss " + " + ".join(f"{t.weight:g}*{n}" for n, t in zip(self.names, self.terms))]
        for term, n in zip(self.terms, self.names):
            if term.pairs:
                lines.append(f"  {n} positions (teacher -> student): "
                             + ", ".join(f"{a} -> {b}" for a, b in term.pairs))
            if term.init_epochs > 0:
                lines.append(f"  {n} pre-trains for {term.init_epochs} epoch(s) before distillation")
            if term.lr_scale != 1.0:
                lines.append(f"  {n} parameters at {term.lr_scale:g} x the learning rate")
        return lines


def _batch_statistics_view(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm on batch statistics, sharing its parameters and buffers (never writing them).

    A structural copy: each module is a shallow copy whose parameter and buffer dicts are the original's
    own (so it follows ``.to()`` of the original), with a fresh dict of children. BatchNorm copies are in
    train mode with ``track_running_stats=False`` (``F.batch_norm`` gets no running statistics to update);
    every other flag is the original's. The original module is left exactly as it was.
    """
    view = copy.copy(model)
    view.__dict__["_modules"] = {k: None if m is None else _batch_statistics_view(m) for k, m in model._modules.items()}
    if isinstance(view, nn.modules.batchnorm._BatchNorm):
        view.training = True
        view.track_running_stats = False
    return view
