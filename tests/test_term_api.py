"""What the framework offers a term: spec keys every term takes (init_epochs, lr_scale), optimizer groups by
lr_scale, the pre-training stage's loss, parameters and modes, sample indices, the gather helper."""
from __future__ import annotations

import pytest
import torch

from kdgraph import Distiller
from kdgraph.data.digits import digits_split
from kdgraph.distiller import TermProblems
from kdgraph.losses import LOSSES, gather, term_params
from kdgraph.models import build_model


@pytest.fixture(scope="module")
def batch():
    x, y, *_ = digits_split(16)
    return x[:32], y[:32], torch.arange(32)


def _distiller(loss, student="tests.userpkg:Net"):
    torch.manual_seed(0)
    s = build_model(student, num_classes=10)
    t = build_model("wrn-10-1", num_classes=10)
    return Distiller(s, t, loss, input_shape=(3, 16, 16), log=lambda _: None)


def test_every_method_takes_init_epochs_and_lr_scale():
    for name in LOSSES:
        params = term_params(LOSSES.get(name))
        assert params["init_epochs"] == 0 and params["lr_scale"] == 1.0, name
    from tests.userpkg import InitHint
    assert term_params(InitHint)["init_epochs"] == 1  # a class default


def test_init_epochs_and_lr_scale_are_checked_and_set(batch):
    d = _distiller([{"method": "ce"}, {"method": "fitnet", "lr_scale": 10, "init_epochs": 2}])
    assert d.terms[1].lr_scale == 10.0 and d.terms[1].init_epochs == 2 and d.init_epochs == 2
    with pytest.raises(TermProblems) as e:
        _distiller([{"method": "kd", "init_epochs": 1.5}, {"method": "at", "lr_scale": 0}])
    paths = [p for p, _ in e.value.problems]
    assert ("loss", 0, "init_epochs") in paths and ("loss", 1, "lr_scale") in paths


def test_param_groups_scale_each_terms_own_parameters(batch):
    d = _distiller([{"method": "ce"}, {"method": "fitnet", "lr_scale": 10}])
    d.setup(batch[0])
    groups = d.param_groups()
    assert [g["lr_scale"] for g in groups] == [1.0, 10.0]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in d.student.parameters()}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in d.terms[1].parameters()}
    plain = _distiller([{"method": "ce"}, {"method": "fitnet"}])
    plain.setup(batch[0])
    (group,) = plain.param_groups()  # one group: an optimizer state of an older checkpoint still loads
    assert len(group["params"]) == len(plain.trainable_parameters())


def test_the_init_stage_trains_init_parameters_on_init_loss(batch):
    x, y, index = batch
    d = _distiller([{"method": "ce"}, {"method": "tests.userpkg:InitHint", "init_epochs": 2},
                    {"method": "tests.userpkg:InitHint", "train_student": True}])
    d.setup(x)
    assert d.init_epochs == 2
    assert d.init_active(-2.0) == [1] and d.init_active(-1.0) == [1, 2] and d.init_active(-0.5) == [1, 2]
    d.init_mode(-2.0)
    assert not d.student.training and d.terms.training and not d.teacher.training
    d.init_mode(-1.0)  # the second term trains the student's first conv: the student is in train mode
    assert d.student.training
    loss, parts, logits = d(x, y, -1.0, index, init=True)
    assert set(parts) == {"inithint", "inithint_1"} and not logits.requires_grad
    torch.testing.assert_close(loss, parts["inithint"] + parts["inithint_1"])
    groups = d.init_param_groups()
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in list(d.terms[1].parameters()) + list(d.terms[2].parameters())
                       + list(d.student.conv1.parameters())}
    loss.backward()
    assert d.student.fc.weight.grad is None  # the classifier is not part of the stage
    # outside the stage: the weighted distillation loss of every term
    d.train()
    loss, parts, _ = d(x, y, 0.0, index)
    assert set(parts) == {"ce", "inithint", "inithint_1"}


def test_terms_see_sample_indices(batch):
    from tests.userpkg import IndexSpy

    x, y, index = batch
    IndexSpy.seen = []
    d = _distiller([{"method": "tests.userpkg:IndexSpy"}])
    d.setup(x)
    d(x, y, 0.0, index)
    d(x, y, 0.0)
    assert torch.equal(IndexSpy.seen[0], index) and IndexSpy.seen[1] is None


def test_gather_in_one_process_is_the_detached_tensors():
    a = torch.randn(3, 2, requires_grad=True)
    (g,) = gather(a)
    assert torch.equal(g, a) and not g.requires_grad
