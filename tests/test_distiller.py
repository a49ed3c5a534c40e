"""``kdgraph.Distiller`` in a hand-written training loop, and the engine's compile/channels_last/bf16 path."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import yaml

from kdgraph import Distiller
from kdgraph.app.cli import main
from kdgraph.data.digits import digits_split
from kdgraph.distiller import TermProblems
from kdgraph.graph import tap
from kdgraph.models import build_model


@pytest.fixture(scope="module")
def batches():
    x, y, *_ = digits_split(16)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)[:256]
    return [(x[i], y[i]) for i in order.split(32)]


def _pair():
    torch.manual_seed(0)
    return build_model("wrn-10-1", num_classes=10), build_model("wrn-16-1", num_classes=10)


def test_a_hand_written_loop_trains_the_student_and_never_touches_the_teacher(batches):
    student, teacher = _pair()
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = Distiller(student, teacher, [{"method": "ce", "weight": 0.5}, {"method": "kd", "weight": 0.5},
                                     {"method": "margin_relu"}], input_shape=(3, 16, 16), log=lambda s: None)
    d.setup(batches[0][0], batches=batches)
    assert d.names == ["ce", "kd", "margin_relu"]
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    bns = [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not m.training and m.track_running_stats for m in bns)  # margin_relu has a view of its own
    assert student.training
    params = d.trainable_parameters()
    connectors = list(d.terms.parameters())
    assert connectors and {id(p) for p in connectors} <= {id(p) for p in params}
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    first = last = None
    for epoch in range(3):
        for x, y in batches:
            loss, parts, logits = d(x, y, epoch=epoch)
            assert set(parts) == {"ce", "kd", "margin_relu"} and logits.shape == (len(y), 10)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            first = loss.item() if first is None else first
            last = loss.item()
    assert last < first
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    keys = d.state_dict().keys()
    assert any(k.startswith("student.") for k in keys) and any(k.startswith("terms.") for k in keys)
    assert not any(".model." in k for k in keys)  # the tapped views are not saved a second time
    d.eval()
    assert not student.training and not teacher.training


def test_a_misspelt_position_names_the_closest_layers():
    student, teacher = _pair()
    with pytest.raises(TermProblems) as e:
        Distiller(student, teacher, [{"method": "at", "positions": [["block3", "blok3"]]}], input_shape=(3, 16, 16))
    assert "blok3" in str(e.value) and "'block3'" in str(e.value) and e.value.problems[0][0][:3] == ("loss", 0,
                                                                                                        "positions")


def test_compile_channels_last_bf16_run(tmp_path):
    """``train.compile`` with taps, channels_last and bf16 autocast, end to end (CPU inductor)."""
    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("wrn-10-1", num_classes=10).state_dict(), teacher)
    spec = {"name": "compiled", "data": {"dataset": "digits", "workers": 0, "batch_size": 32},
            "teacher": {"model": "wrn-10-1", "checkpoint": str(teacher)}, "student": {"model": "wrn-10-1"},
            "loss": [{"method": "ce"}, {"method": "at"}],
            "train": {"epochs": 1, "max_steps_per_epoch": 3, "device": "cpu", "compile": True,
                      "channels_last": True, "precision": "bf16"},
            "log": {"tensorboard": False}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0
    finally:
        torch.set_num_threads(n)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["epoch"] == 1 and row["loss/at"] > 0 and row["loss"] == row["loss"]  # finite


def test_kd_with_margin_relu_sees_the_eval_mode_teacher_and_the_teacher_is_never_switched(batches):
    """margin_relu asks for batch statistics; kd in the same loss list still gets the eval-mode teacher."""
    from kdgraph.losses import Outputs
    from kdgraph.losses.terms import KD, MarginReLU

    student, teacher = _pair()
    with torch.no_grad():  # running statistics far from any batch's, so the two modes differ clearly
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    teacher.eval()  # what the Distiller keeps it in
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [(m.training, getattr(m, "track_running_stats", None)) for m in teacher.modules()]
    seen: dict[str, Outputs] = {}
    originals = {cls: cls.forward for cls in (KD, MarginReLU)}

    def spy(cls, key):
        def forward(self, out):
            seen[key] = out
            return originals[cls](self, out)
        return forward

    x, y = batches[0]
    d = Distiller(student, teacher, [{"method": "kd"}, {"method": "margin_relu"}], input_shape=(3, 16, 16),
                  log=lambda s: None)
    d.setup(x, batches=batches)
    try:
        KD.forward, MarginReLU.forward = spy(KD, "kd"), spy(MarginReLU, "margin_relu")
        d(x, y)
    finally:
        KD.forward, MarginReLU.forward = originals[KD], originals[MarginReLU]

    eval_teacher = copy.deepcopy(teacher).eval()
    batch_teacher = copy.deepcopy(teacher).train()  # batch statistics (its running stats update: a copy)
    with torch.no_grad():
        eval_logits, batch_logits = eval_teacher(x), batch_teacher(x)
    assert not torch.allclose(eval_logits, batch_logits, atol=1e-2)
    torch.testing.assert_close(seen["kd"].teacher_logits, eval_logits, rtol=0, atol=0)
    torch.testing.assert_close(seen["margin_relu"].teacher_logits, batch_logits, rtol=1e-5, atol=1e-5)
    t_tap = d.terms[1].pairs[-1][0]
    with torch.no_grad():
        expected = tap(copy.deepcopy(teacher).train(), [t_tap])(x)[1][t_tap]
    torch.testing.assert_close(seen["margin_relu"].teacher_feats[t_tap], expected, rtol=1e-5, atol=1e-5)
    # the user's teacher: same flags, same buffers, after construction, setup, steps and train()/eval()
    d.train()
    d.eval()
    assert [(m.training, getattr(m, "track_running_stats", None)) for m in teacher.modules()] == flags
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, frozen[k]), k
