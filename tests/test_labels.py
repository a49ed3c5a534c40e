"""``data.labels``: a stratified, seeded labelled subset; label-based terms see only its samples.

The subset must be the same with any loader (0 or 2 workers, ``loader: tensor``), on every rank and
after a rebuild (a resume builds the loaders again); the engine-level checks (resume, 2 gloo ranks) are
in test_engine.py and test_distributed.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdgraph.data import UNLABELLED, SeededDataset, build_loaders
from kdgraph.data.digits import digits_split
from kdgraph.data.labels import PartialLabels, dataset_targets, labelled_subset
from kdgraph.errors import UserError
from kdgraph.losses import functional as KF
from kdgraph.losses.terms import CE, DKD, KD, Outputs
from kdgraph.spec.check import validate

DIGITS = {"dataset": "digits", "batch_size": 64, "test_batch_size": 256, "workers": 0, "augment": True,
          "options": {}}


def digits_targets() -> torch.Tensor:
    return digits_split(16)[1]


# ------------------------------------------------------------------------------------------ the subset
def test_the_subset_is_stratified_and_a_function_of_the_seed():
    y = digits_targets()
    sizes = torch.bincount(y)
    mask = labelled_subset(y, fraction=0.05, seed=0)
    assert int(mask.sum()) == round(0.05 * len(y)) == 72
    kept = torch.bincount(y[mask], minlength=10)
    share = 72 * sizes.double() / len(y)
    assert ((kept - share).abs() < 1).all(), (kept, share)  # each class its share, rounded
    assert torch.equal(mask, labelled_subset(y, fraction=0.05, seed=0))
    others = [labelled_subset(y, fraction=0.05, seed=s) for s in (1, 2)]
    assert all(not torch.equal(mask, o) for o in others)
    assert all(torch.equal(torch.bincount(y[o], minlength=10), kept) for o in others)
    # within a class the chosen samples are a random draw, not the first ones of the class
    first = torch.cat([torch.nonzero(y == c).flatten()[: int(kept[c])] for c in range(10)])
    assert not mask[first].all()


def test_count_fraction_and_their_limits():
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    assert labelled_subset(y, count=0).sum() == 0
    assert labelled_subset(y, count=10).all()
    three = labelled_subset(y, count=3, seed=5)
    assert torch.bincount(y[three], minlength=3).tolist() == [2, 1, 0]  # shares 1.8, 0.9, 0.3
    half = labelled_subset(y, fraction=0.5, seed=5)
    assert torch.bincount(y[half], minlength=3).tolist() == [3, 2, 0]  # shares 3, 1.5, 0.5: tie at random
    with pytest.raises(UserError, match="between 0 and the 10"):
        labelled_subset(y, count=11)
    with pytest.raises(UserError, match="keeps no label"):
        labelled_subset(y, fraction=0.01)
    # samples a data set marks unlabelled itself are never chosen
    marked = y.clone()
    marked[:6] = UNLABELLED
    assert not labelled_subset(marked, count=4, seed=1)[:6].any()


def test_a_tie_between_equal_remainders_is_not_always_won_by_the_same_class():
    y = torch.arange(4).repeat_interleave(5)  # 4 classes of 5: 2 labels, each class a share of 0.5
    winners = {tuple(torch.nonzero(torch.bincount(y[labelled_subset(y, count=2, seed=s)], minlength=4))
                     .flatten().tolist()) for s in range(20)}
    assert len(winners) > 2


# ----------------------------------------------------------------------------------------- the loaders
def epoch_targets(cfg: dict, seed: int = 3, epoch: int = 1):
    """Every training batch's (x, y) of one epoch, and the sample indices in the order they came."""
    train, _, _ = build_loaders(cfg, seed=seed)
    train.sampler.set_epoch(epoch)
    order = [i if isinstance(i, int) else i[0] for i in train.sampler]
    batches = list(train)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]), torch.tensor(order), train


@pytest.mark.parametrize("loader, workers", [("workers", 2), ("tensor", 0)])
def test_every_loader_hides_the_same_labels(loader, workers):
    cfg = {**DIGITS, "labels": {"fraction": 0.1}}
    x0, y0, order, train0 = epoch_targets(cfg)
    x1, y1, order1, train1 = epoch_targets({**cfg, "loader": loader, "workers": workers})
    assert torch.equal(order, order1) and torch.equal(train0.labelled, train1.labelled)
    expected = torch.where(train0.labelled, digits_targets(), UNLABELLED)[order]
    assert torch.equal(y0, expected) and torch.equal(y1, expected)
    assert int((y0 != UNLABELLED).sum()) == int(train0.labelled.sum()) == 144
    if loader == "workers":  # the images (and their augmentation draws) are untouched by the labels
        x_all, y_all, _, _ = epoch_targets({**DIGITS, "workers": workers})
        assert torch.equal(x1, x_all) and torch.equal(x0, x_all)
        assert torch.equal(y_all[y0 != UNLABELLED], y0[y0 != UNLABELLED])


def test_the_subset_follows_labels_seed_else_the_training_seed():
    cfg = {**DIGITS, "labels": {"count": 50}}
    a = build_loaders(cfg, seed=0)[0].labelled
    assert torch.equal(a, build_loaders(cfg, seed=0)[0].labelled)  # a rebuilt loader (a resume) agrees
    assert not torch.equal(a, build_loaders(cfg, seed=1)[0].labelled)
    pinned = {**DIGITS, "labels": {"count": 50, "seed": 0}}
    assert torch.equal(build_loaders(pinned, seed=1)[0].labelled, a)
    assert build_loaders(DIGITS, seed=0)[0].labelled is None


def test_ranks_hide_the_labels_one_process_hides(monkeypatch):
    import kdgraph.data as data

    cfg = {**DIGITS, "labels": {"fraction": 0.1}}
    _, y_one, order_one, one = epoch_targets(cfg)
    seen = {}
    for rank in (0, 1):
        monkeypatch.setattr(data, "_rank", lambda rank=rank: rank)
        monkeypatch.setattr(data, "_world", lambda: 2)
        train = build_loaders({**cfg, "batch_size": 32}, seed=3, distributed=True)[0]
        assert torch.equal(train.labelled, one.labelled)
        train.sampler.set_epoch(1)
        order = [i for i, _ in train.sampler]
        seen.update(zip(order, torch.cat([y for _, y in train]).tolist()))
    assert seen == dict(zip(order_one.tolist(), y_one.tolist()))


def test_partial_labels_keep_tensor_labels_tensors_and_read_targets_without_an_attribute():
    class NoTargets(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((2,), float(i)), torch.tensor(i % 2)

    data = NoTargets()
    targets = dataset_targets(data)
    assert targets.tolist() == [0, 1, 0, 1]
    wrapped = PartialLabels(SeededDataset(data), targets, torch.tensor([True, False, False, True]))
    samples = wrapped.__getitems__([(0, 7), (1, 8), (2, 9), (3, 10)])
    assert [int(y) for _, y in samples] == [0, UNLABELLED, UNLABELLED, 1]
    assert all(torch.is_tensor(y) for _, y in samples)
    assert wrapped.targets == [0, UNLABELLED, UNLABELLED, 1]
    assert int(wrapped[1][1]) == UNLABELLED and int(wrapped[(3, 5)][1]) == 1


# ------------------------------------------------------------------------------------------- the losses
def test_ce_averages_over_the_labelled_samples_only():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    y = torch.tensor([1, UNLABELLED, 3, UNLABELLED, UNLABELLED, 0])
    labelled = y != UNLABELLED
    loss = CE()(Outputs(logits=logits, target=y))
    expected = F.cross_entropy(logits.detach()[labelled], y[labelled])
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert (logits.grad[~labelled] == 0).all() and (logits.grad[labelled] != 0).any()
    # what unlabelled samples' logits hold changes nothing
    other = logits.detach().clone()
    other[~labelled] = 100 * torch.randn(3, 5)
    torch.testing.assert_close(CE()(Outputs(logits=other, target=y)), expected)
    # label smoothing too; all labelled: exactly F.cross_entropy
    torch.testing.assert_close(KF.cross_entropy(logits.detach(), y, 0.1),
                               F.cross_entropy(logits.detach()[labelled], y[labelled], label_smoothing=0.1))
    full = torch.tensor([1, 2, 3, 4, 0, 0])
    torch.testing.assert_close(KF.cross_entropy(logits.detach(), full), F.cross_entropy(logits.detach(), full))


def test_a_batch_without_labels_gives_a_zero_loss_not_nan():
    logits = torch.randn(4, 3, requires_grad=True)
    none = torch.full((4,), UNLABELLED)
    for loss in (KF.cross_entropy(logits, none), KF.dkd(logits, torch.randn(4, 3), none, 1.0, 8.0, 4.0)):
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert (grad == 0).all()


def test_dkd_uses_the_labelled_samples_and_kd_every_sample():
    torch.manual_seed(1)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.tensor([1, UNLABELLED, 3, 2, UNLABELLED, 0])
    keep = y != UNLABELLED
    torch.testing.assert_close(KF.dkd(s, t, y, 1.0, 8.0, 4.0), KF.dkd(s[keep], t[keep], y[keep], 1.0, 8.0, 4.0))
    out = Outputs(logits=s, target=y, teacher_logits=t)
    assert out.labelled.tolist() == keep.tolist()
    torch.testing.assert_close(KD()(out), KF.kd(s, t, 4.0))  # the teacher's term sees all six
    assert CE.needs_labels and DKD.needs_labels and not KD.needs_labels


# ------------------------------------------------------------------------------------------- validation
SPEC = """
name: few-labels
data: {{dataset: digits, labels: {labels}}}
teacher: {{model: wrn-10-1, checkpoint: teacher.pt}}
student: {{model: wrn-10-1}}
loss: {loss}
"""


def problems(tmp_path, labels: str, loss: str) -> list[str]:
    file = tmp_path / "spec.yaml"
    file.write_text(SPEC.format(labels=labels, loss=loss))
    # the spec's teacher.checkpoint is not written: validate's complaint about it is not the point here
    return [f"{p[3]}: {p[4]}" for p in validate(file)[0] if p[3] != "teacher.checkpoint"]


def test_validate_refuses_terms_that_need_labels_when_none_are_kept(tmp_path):
    loss = "[{method: ce, weight: 0.1}, {method: kd}, {method: dkd}]"
    found = problems(tmp_path, "{count: 0}", loss)
    assert len(found) == 2 and found[0].startswith("loss.0.method: ce uses labels")
    assert found[1].startswith("loss.2.method: dkd")
    assert problems(tmp_path, "{fraction: 0.0}", "[{method: kd}]") == []
    assert problems(tmp_path, "{fraction: 0.05}", loss) == []
    assert problems(tmp_path, "null", loss) == []
    both = problems(tmp_path, "{count: 3, fraction: 0.1}", loss)
    assert both == ["data.labels: give exactly one of `fraction` (0..1 of the training samples) and `count` "
                    "(a number of samples), not fraction and count"]
    assert "exactly one" in problems(tmp_path, "{seed: 3}", loss)[0]
    assert "did you mean 'count'" in problems(tmp_path, "{cnt: 3}", loss)[0]


def test_crd_other_class_negatives_need_every_label():
    from kdgraph.losses import Setup
    from kdgraph.losses.terms import CRD

    targets = torch.arange(12) % 3
    targets[[1, 5]] = UNLABELLED

    def setup(term):
        term.pairs = [("t", "s")]
        term.setup(Setup(student=None, teacher=None, student_shapes={"s": (5,)}, teacher_shapes={"t": (6,)},
                         num_samples=12, targets=targets, seed=0, log=lambda s: None))

    with pytest.raises(UserError, match="negatives_from: all"):
        setup(CRD(embed_dim=4, negatives=3))
    setup(CRD(embed_dim=4, negatives=3, negatives_from="all"))  # labels are not needed there
    assert CRD().needs_labels and not CRD(negatives_from="all").needs_labels


# ------------------------------------------------------------------------------------------- the engine
def test_a_run_with_few_labels_counts_them_and_resumes_exactly(tmp_path, cli, monkeypatch):
    import json

    from tests.conftest import tiny_spec, write_yaml
    from tests.userpkg import SelfStop

    over = dict(data={"labels": {"count": 40}, "batch_size": 16}, train={"epochs": 2, "max_steps_per_epoch": 20},
                loss=[{"method": "ce"}, {"method": "tests.userpkg:SelfStop", "at": 1.4}])
    file = write_yaml(tmp_path / "few.yaml", tiny_spec("few", **over))
    monkeypatch.setattr(SelfStop, "fired", True)  # the uninterrupted reference
    assert cli(["run", file, "--out", tmp_path / "ref"])[0] == 0
    monkeypatch.setattr(SelfStop, "fired", False)
    assert cli(["run", file, "--out", tmp_path / "cut"])[0] == 130  # stopped in epoch 2
    assert cli(["run", file, "--out", tmp_path / "cut", "--resume"])[0] == 0

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert rows(tmp_path / "cut") == rows(tmp_path / "ref")
    train, _, _ = build_loaders({**DIGITS, "batch_size": 16, "labels": {"count": 40}}, seed=0)
    for epoch, row in enumerate(rows(tmp_path / "ref")):
        train.sampler.set_epoch(epoch)
        order = [i for i, _ in train.sampler][:20 * 16]
        assert row["labelled"] == int(train.labelled[order].sum()) > 0
        correct = row["train_top1"] * row["labelled"] / 100  # train top-1 is over the labelled samples
        assert abs(correct - round(correct)) < 1e-6
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert (summary["labelled"], summary["train_samples"], summary["seed"]) == (40, 1437, 0)


def test_seeds_run_once_per_seed_and_the_table_shows_mean_and_std(tmp_path, cli):
    from kdgraph.app.cli import summary_table
    from tests.conftest import tiny_spec, write_yaml

    file = write_yaml(tmp_path / "s.yaml", {**tiny_spec("few", data={"labels": {"fraction": 0.1}},
                                                        train={"epochs": 1, "max_steps_per_epoch": 2}),
                                            "seeds": [3, 5]})
    code, out, err = cli(["run", file, "--runs-dir", tmp_path / "runs"])
    assert code == 0, err
    import json

    seeds = [json.loads((tmp_path / "runs" / f"few-seed{k}" / "summary.json").read_text()) for k in (3, 5)]
    assert [s["seed"] for s in seeds] == [3, 5] and all(s["group"] == "few" for s in seeds)
    line = next(row for row in out.splitlines() if row.startswith("| few |"))
    assert "| 144/1437 | 3,5 |" in line and " ± " in line
    table = summary_table([{"name": "a-seed0", "student": "s", "methods": ["ce"], "final_top1": 70.0, "seed": 0},
                           {"name": "a-seed1", "student": "s", "methods": ["ce"], "final_top1": 74.0, "seed": 1},
                           {"name": "t", "student": "t", "methods": ["ce"], "final_top1": 99.0, "seed": 0}],
                          ["a", "a", "t"])
    assert "| a | s | - | ce | all | 0,1 | - | - | 72.00 ± 2.83 |" in table
    assert "| t | t | - | ce | all | 0 | - | - | 99.00 |" in table
    code, _, err = cli(["run", file, "--out", tmp_path / "one"])
    assert code == 2 and "seeds" in err
    file.write_text(file.read_text().replace("train:\n", "train:\n  seed: 1\n"))
    code, _, err = cli(["validate", file])
    assert code == 2 and "not both" in err


def test_indexed_batches_keep_their_indices_and_hide_the_same_labels():
    cfg = {**DIGITS, "labels": {"count": 30}, "augment": False}
    for loader in ("workers", "tensor"):
        train, _, _ = build_loaders({**cfg, "loader": loader}, seed=2, indices=True)
        x, y, index = next(iter(train))
        assert torch.equal(y, torch.where(train.labelled, digits_targets(), UNLABELLED)[index])


def test_no_label_at_all_distils_from_the_teacher_alone(tmp_path, cli, teacher_ckpt):
    import json

    from tests.conftest import tiny_spec, write_yaml

    file = write_yaml(tmp_path / "none.yaml", tiny_spec(
        "none", data={"labels": {"count": 0}}, teacher={"model": "wrn-16-1", "checkpoint": str(teacher_ckpt)},
        loss=[{"method": "kd"}], train={"epochs": 1, "max_steps_per_epoch": 3}))
    code, _, err = cli(["run", file, "--out", tmp_path / "run"])
    assert code == 0, err
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["labelled"] == 0 and "train_top1" not in row and row["loss/kd"] > 0
    assert "train -" in (tmp_path / "run" / "log.txt").read_text()
