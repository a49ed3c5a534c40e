"""The wiring picture: both models by stage, every pair of every term with its connector, from the terms
the library resolves (``kdgraph show``, the UI's Build tab and each run's ``wiring.svg``); and the SVG
line charts of the Runs tab."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from kdgraph.app import charts, wiring
from kdgraph.graph import layers, stage_ends
from kdgraph.losses import build_terms
from kdgraph.spec.check import meta_model
from tests.conftest import tiny_spec, write_yaml

SVG = "{http://www.w3.org/2000/svg}"


def rows(model: str, shape=(3, 32, 32), classes=10) -> list[dict]:
    return layers(meta_model({"model": model}, classes).eval(), shape)


def draw(teacher, student, loss, shape=(3, 32, 32)):
    t, s = rows(teacher, shape), rows(student, shape)
    return wiring.from_rows(loss, t, s, input_shape=shape, num_classes=10, student=student, teacher=teacher), t, s


def pairs_in(svg: str) -> list[tuple[str, str, str]]:
    root = ET.fromstring(svg)  # well-formed XML
    return [(g.get("data-term"), g.get("data-teacher"), g.get("data-student")) for g in root.iter(f"{SVG}g")
            if g.get("class") == "pair"]


@pytest.mark.parametrize("teacher,student,loss,shape,connectors", [
    ("wrn-16-2", "wrn-10-1", [{"method": "ce"}, {"method": "at"}], (3, 16, 16), {"at": ["none"] * 3}),
    ("shufflenetv2-2.0", "shufflenetv2-0.5", [{"method": "margin_relu"}], (3, 32, 32),
     {"margin_relu": ["1x1 conv+BN 24→122", "1x1 conv+BN 48→244", "1x1 conv+BN 96→488"]}),  # its declared stages
    ("resnet56", "resnet20", [{"method": "fitnet"}, {"method": "kd"}], (3, 32, 32),
     {"fitnet": ["1x1 conv+BN 32→32"], "kd": ["none"]}),
    ("torchvision:resnet34", "torchvision:resnet18", [{"method": "sp"}, {"method": "fitnet"}], (3, 64, 64),
     {"sp": ["none"], "fitnet": ["1x1 conv+BN 128→128"]}),
])
def test_the_picture_draws_every_pair_the_terms_resolve_with_its_connector(teacher, student, loss, shape, connectors):
    w, t_rows, s_rows = draw(teacher, student, loss, shape)
    terms, problems = build_terms(loss, teacher_rows=t_rows, student_rows=s_rows, has_teacher=True)
    assert not problems and not w.notes
    expected = [(name, a, b) for name, term in zip([c["method"] for c in loss], terms) for a, b in term.pairs]
    expected += [(c["method"], wiring.LOGITS, wiring.LOGITS) for c in loss if c["method"] == "kd"]
    drawn = [(k.name, k.teacher, k.student) for k in w.links]
    assert sorted(drawn) == sorted(expected)
    assert {name: [k.connector for k in w.links if k.name == name] for name in connectors} == connectors
    svg = wiring.svg(w)
    assert sorted(pairs_in(svg)) == sorted(expected)
    # the stages are the graph's stage ends, each with its shape; the head is the classifier's
    for boxes, table in ((w.teacher_boxes, t_rows), (w.student_boxes, s_rows)):
        assert [b.title for b in boxes if b.kind == "stage"] == stage_ends(table, pre=False)
        assert boxes[0].kind == "input" and boxes[-1].kind == "head" and boxes[-1].shape == (10,)
    for k in w.links:  # each tap sits on one box of its model
        assert sum(k.teacher in b.ports for b in w.teacher_boxes) == 1
        assert sum(k.student in b.ports for b in w.student_boxes) == 1


def test_pooling_connectors_and_pre_activation_ports():
    loss = [{"method": "at", "positions": [["block1", "block2"]]},
            {"method": "margin_relu", "positions": [["block3.0.relu1:pre", "block3.0.relu1:pre"]]}]
    w, _, _ = draw("wrn-16-2", "wrn-10-1", loss)
    assert [k.connector for k in w.links] == ["avg-pool teacher 32x32→16x16", "1x1 conv+BN 32→64"]
    svg = wiring.svg(w)
    assert svg.count('class="port pre"') == 2  # the pre-activation tap, marked on both models
    stage2 = next(b for b in w.teacher_boxes if b.title == "block2")
    assert "block3.0.relu1:pre" in stage2.ports and stage2.pre == "block3.0.relu1:pre"


def test_no_teacher_and_a_term_with_problems():
    s = rows("wrn-10-1")
    w = wiring.from_rows([{"method": "ce"}, {"method": "at"}], None, s, input_shape=(3, 32, 32), num_classes=10,
                         student="wrn-10-1", teacher=None)
    assert w.links == [] and w.teacher_boxes == [] and "at: " in w.notes[0] and "teacher" in w.notes[0]
    assert pairs_in(wiring.svg(w)) == [] and "(no teacher)" in wiring.text(w)
    w, _, _ = draw("wrn-16-2", "wrn-10-1", [{"method": "at", "positions": [["block1", "nope"]]}])
    assert w.links == [] and "no layer 'nope'" in w.notes[0]


def test_a_runs_picture_is_what_kdgraph_show_draws(tmp_path, cli, teacher_ckpt):
    spec = tiny_spec("wired", teacher={"model": "wrn-16-1", "checkpoint": str(teacher_ckpt)},
                     loss=[{"method": "ce"}, {"method": "fitnet"}, {"method": "kd"}],
                     train={"epochs": 1, "max_steps_per_epoch": 1})
    file = write_yaml(tmp_path / "wired.yaml", spec)
    code, out, err = cli(["show", file])
    assert code == 0, err
    assert "fitnet (weight 100): 1 pair(s)" in out and "connector: 1x1 conv+BN 32→32" in out
    code, out, err = cli(["show", file, "-o", tmp_path / "w.svg"])
    assert code == 0 and "1 pair(s)" not in out and "2 pair(s)" in out, err
    assert cli(["run", file, "--runs-dir", tmp_path / "runs"])[0] == 0
    assert (tmp_path / "runs" / "wired" / "wiring.svg").read_text() == (tmp_path / "w.svg").read_text()
    code, _, err = cli(["show", file, "-o", tmp_path / "w.png"])
    assert code == 2 and "SVG" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- charts
def test_epoch_axes_have_whole_ticks_and_short_series_markers():
    svg = charts.line_chart([charts.Series("a", [1], [50.0]), charts.Series("b", [1, 2, 3], [1.0, 2.0, 1.5])],
                            title="t", y_title="y")
    ET.fromstring(svg)
    ticks = re.findall(r'class="xt"[^>]*>([^<]+)<', svg)
    assert ticks == ["0", "1", "2", "3"]  # whole epochs only, never 1.00 1.05
    assert svg.count('class="marker"') == 4  # one epoch is a dot, not nothing
    many = charts.line_chart([charts.Series("s", list(range(100)), [float(i) for i in range(100)])], title="t",
                             y_title="y")
    assert 'class="marker"' not in many and charts.ticks(0, 97, 8, integer=True) == [0, 20, 40, 60, 80]
    assert "no data yet" in charts.line_chart([], title="t", y_title="y")
    assert charts.ticks(10.28, 10.28) and charts.ticks(10.28, 10.28)[0] < 10.28 < charts.ticks(10.28, 10.28)[-1]


def test_smoothing_is_tensorboards_debiased_average():
    assert charts.smooth([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])  # no pull towards 0
    assert charts.smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 2 / 3])  # (0.5*0.5*0 + 0.5*1) / (1 - 0.25)
    assert charts.smooth([1.0, 5.0], 0.0) == [1.0, 5.0]


def test_a_blocks_input_has_its_shape_and_connector():
    """fsp's first position is the first stage's input (``block1:pre``, a module's input): it is drawn with the
    shape the module reads, and the term is set up on it like on any other position."""
    w, t_rows, s_rows = draw("wrn-16-2", "wrn-10-1", [{"method": "fsp"}], (3, 16, 16))
    assert not w.notes
    first = w.links[0]
    conv1 = {r["name"]: r["shape"] for r in s_rows}["conv1"]  # the stem's output is what block1 reads
    assert (first.teacher, first.student) == ("block1:pre", "block1:pre")
    assert first.teacher_shape == first.student_shape == conv1
    assert all(k.connector != "built at setup" for k in w.links)
