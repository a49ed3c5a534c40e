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
when a term needs it; a term may ask for its BatchNorm to use batch statistics (Heo et al.), which
:meth:`Distiller.train` sets up without updating the loaded running statistics.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .errors import UserError
from .graph import layers, tap, trace
from .losses import Outputs, Setup, build_terms


class TermProblems(UserError):
    """Problems in a ``loss`` list, as ``(key path, message)`` pairs (the engine maps them to spec lines)."""

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
        self.terms = nn.ModuleList(terms)
        self.names = term_names(loss)
        self.teacher = teacher
        if teacher is not None:
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.needs_teacher = teacher is not None and any(t.needs_teacher for t in terms)
        self.teacher_bn_train = any(t.teacher_bn_train for t in terms)
        s_names = sorted({s for t in terms for _, s in t.pairs})
        t_names = sorted({t_ for t in terms for t_, _ in t.pairs})
        # Not submodules: they share the models' parameters, which must appear once in state_dict().
        self.__dict__["s_forward"] = tap(student, s_names, self.leaf_modules) if s_names else _Plain(student)
        self.__dict__["t_forward"] = (None if teacher is None else
                                      tap(teacher, t_names, self.leaf_modules) if t_names else _Plain(teacher))
        self.train()

    # ----------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> "Distiller":
        self.training = mode
        self.student.train(mode)
        self.terms.train(mode)
        if self.teacher is not None:
            self.teacher.eval()
            if self.teacher_bn_train:  # batch statistics, and the loaded running statistics never move
                for m in self.teacher.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.train(mode)
                        m.track_running_stats = False  # no buffer writes (eval still uses the running stats)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's and the connectors' parameters (what the optimizer updates)."""
        return [p for p in list(self.student.parameters()) + list(self.terms.parameters()) if p.requires_grad]

    def compile_forwards(self, **kwargs) -> None:
        """``torch.compile`` the tapped student and teacher forwards (graph breaks stay in the losses)."""
        self.__dict__["s_forward"] = torch.compile(self.s_forward, **kwargs)
        if self.t_forward is not None:
            self.__dict__["t_forward"] = torch.compile(self.t_forward, **kwargs)

    # ----------------------------------------------------------------------------------------- setup
    @torch.no_grad()
    def setup(self, example: Tensor, batches: Iterable | None = None, probe_batches: int = 4) -> None:
        """Build connectors from the shapes of ``example``'s taps and let terms read the teacher.

        ``batches`` (an iterable of ``(x, y)``, e.g. the training loader) feeds terms that estimate
        statistics from teacher features, such as margins where no BatchNorm precedes a tap.
        """
        device = example.device
        was = self.training
        self.student.eval()
        s_shapes = {k: tuple(v.shape[1:]) for k, v in self.s_forward(example[:2])[1].items()}
        t_shapes = {}
        if self.t_forward is not None:
            self.teacher.eval()
            t_shapes = {k: tuple(v.shape[1:]) for k, v in self.t_forward(example[:2])[1].items()}
        self.train(was)
        traced = trace(self.teacher, self.leaf_modules) if self.teacher is not None else None

        def teacher_features(names: list[str]) -> dict[str, Tensor]:
            if batches is None:
                raise UserError("this loss needs teacher features from training batches: pass `batches` to setup()")
            probe = tap(self.teacher, names, self.leaf_modules)
            got: dict[str, list] = {n: [] for n in names}
            for i, (x, _) in enumerate(batches):
                if i == probe_batches:
                    break
                for n, v in probe(x.to(device))[1].items():
                    got[n].append(v.float())
            return {n: torch.cat(v) for n, v in got.items()}

        ctx = Setup(student=self.student, teacher=self.teacher, student_shapes=s_shapes, teacher_shapes=t_shapes,
                    teacher_node=traced.resolve if traced is not None else None, teacher_features=teacher_features,
                    log=self.log)
        for term in self.terms:
            term.setup(ctx)
        self.terms.to(device)

    # --------------------------------------------------------------------------------------- a step
    def forward(self, x: Tensor, y: Tensor, epoch: float = 0.0) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        t_logits, t_feats = None, {}
        if self.needs_teacher:
            with torch.no_grad():
                t_logits, t_feats = self.t_forward(x)
        logits, feats = self.s_forward(x)
        out = Outputs(logits=logits, target=y, feats=feats, teacher_logits=t_logits, teacher_feats=t_feats,
                      epoch=epoch)
        parts = {n: term(out) for n, term in zip(self.names, self.terms)}
        loss = sum(term.factor(epoch) * v for term, v in zip(self.terms, parts.values()))
        return loss, parts, logits

    def describe(self) -> list[str]:
        """Log lines: the loss and each term's positions."""
        lines = ["loss " + " + ".join(f"{t.weight:g}*{n}" for n, t in zip(self.names, self.terms))]
        for term, n in zip(self.terms, self.names):
            if term.pairs:
                lines.append(f"  {n} positions (teacher -> student): "
                             + ", ".join(f"{a} -> {b}" for a, b in term.pairs))
        return lines
