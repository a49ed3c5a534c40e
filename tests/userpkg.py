"""User code outside kdgraph, named by import path in the tests (``tests.userpkg:Net``, ``tests.userpkg:MyTerm``)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdgraph.losses import Term
from kdgraph.losses.terms import CRD, FeatureTerm


class Net(nn.Module):
    """A small CNN using the functional in-place ReLU that fx taps must survive."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class MyTerm(FeatureTerm):
    """A user feature term: mean squared distance of the last stage outputs (channels projected)."""

    auto = "last"
    default_weight = 1.0
    calls = 0

    def __init__(self, weight=None, warmup_epochs=0.0, scale: float = 1.0):
        super().__init__(weight, warmup_epochs)
        self.scale = scale

    def forward(self, out):
        type(self).calls += 1
        return self.scale * sum(F.mse_loss(s, t) for s, t in self.pairs_of(out))


class NaNLater(Term):
    """A logit term that becomes NaN from epoch 2 on (to test the engine's NaN guard deterministically)."""

    needs_teacher = False

    def forward(self, out):
        value = F.cross_entropy(out.logits.float(), out.target)
        return value * float("nan") if out.epoch >= 1 else value


class NaNOnRank1(Term):
    """A logit term that becomes NaN on rank 1 alone from fractional epoch 0.5 on (other ranks stay finite)."""

    needs_teacher = False

    def forward(self, out):
        import torch.distributed as dist

        value = F.cross_entropy(out.logits.float(), out.target)
        rank = dist.get_rank() if dist.is_initialized() else 0
        return value * float("nan") if rank == 1 and out.epoch >= 0.5 else value


class SelfStop(Term):
    """A logit term (zero loss) that sends SIGTERM to its own process at fractional epoch ``at``, once per
    process (``SelfStop.fired``; reset it to arm again), so that a resumed run in the same process goes on.

    Stops an in-process run exactly where a user's Ctrl-C/SIGTERM would, without a subprocess.
    """

    needs_teacher = False
    fired = False

    def __init__(self, weight=None, warmup_epochs=0.0, at: float = 0.5):
        super().__init__(weight, warmup_epochs)
        self.at = at

    def forward(self, out):
        if not SelfStop.fired and out.epoch >= self.at:
            import os
            import signal

            SelfStop.fired = True
            os.kill(os.getpid(), signal.SIGTERM)
        return out.logits.sum() * 0.0


class PlainNet(nn.Module):
    """A small CNN without BatchNorm: its training does not depend on how a batch is split across processes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x), inplace=True)
        x = F.relu(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InitHint(FeatureTerm):
    """A user term with a pre-training stage: its connector (and, with ``train_student``, the student's first
    conv) first learns to match the teacher's last stage, then the same loss distils."""

    auto = "last"
    always_connect = True
    init_epochs = 1

    def __init__(self, weight=None, warmup_epochs=0.0, train_student: bool = False):
        super().__init__(weight, warmup_epochs)
        self.train_student = train_student

    def init_loss(self, out):
        return sum(F.mse_loss(s, t) for s, t in self.pairs_of(out))

    def init_parameters(self, student):
        own = super().init_parameters(student)
        return own + list(student.conv1.parameters()) if self.train_student else own

    def forward(self, out):
        return self.init_loss(out)


class IndexSpy(Term):
    """A logit term (zero loss) that records ``out.index`` of each call in ``IndexSpy.seen``."""

    needs_teacher = False
    seen: list = []

    def forward(self, out):
        IndexSpy.seen.append(out.index)
        return out.logits.sum() * 0.0


class CheckedCRD(CRD):
    """CRD that checks after every step that its memory banks are identical on every rank (else it raises)."""

    def forward(self, out):
        loss = super().forward(out)
        from kdgraph.distributed import gather_tensors

        for bank in (self.student_bank, self.teacher_bank):
            sums = gather_tensors(bank.double().sum(1).view(1, -1))[0]
            if not (sums == sums[0]).all():
                raise RuntimeError("CRD memory banks differ between ranks")
        return loss


class PoisonWeights(Term):
    """A logit term (zero loss) whose own weight turns NaN in the second epoch, while the loss stays finite
    (to test that non-finite weights are never saved)."""

    needs_teacher = False

    def __init__(self, weight=None, warmup_epochs=0.0):
        super().__init__(weight, warmup_epochs)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, out):
        if out.epoch >= 1:
            with torch.no_grad():
                self.scale.fill_(float("nan"))
        return out.logits.sum() * 0.0
