"""Smoke tests of ``kdgraph bench``: every figure with tiny settings; the JSON's structure, no timing assertions."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from kdgraph.allocator import tune_allocator
from kdgraph.app import bench
from kdgraph.app.cli import main


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    lines = []
    with bench.threads(1):
        doc = bench.run(reps=2, batch=8, step_batch=4, device="cpu", only="abcd", out=str(out),
                        teacher="wrn-10-2", student="wrn-10-1", data_batches=2, echo=lines.append)
    return doc, json.loads(out.read_text()), lines


def test_the_json_holds_every_figure_and_the_run_settings(results):
    doc, written, lines = results
    assert written["figures"].keys() == {"a", "b", "c", "d"}
    for key in ("device", "torch", "torchvision", "threads", "reps", "batch", "step_batch", "date", "cpu"):
        assert key in written, key
    assert written["reps"] == 2 and written["device"] == "cpu" and written["step_batch"] == 4
    assert written["table"] == doc["table"] and "\n".join(written["table"]) in lines
    assert len(written["table"]) == 2 + 6 + 3 + 1 + 1  # header, rule, a x6, b x3, c, d


def test_figure_a_taps(results):
    rows = results[1]["figures"]["a"]
    assert [(r["role"], r["model"], r["mode"]) for r in rows] == [
        ("teacher", "wrn-10-2", "eval"), ("student", "wrn-10-1", "eval"), ("student", "wrn-10-1", "train"),
        ("other", "torchvision:efficientnet_b0", "eval"), ("other", "torchvision:efficientnet_b0", "train"),
        ("plain API, fresh interpreter", "OutsideResNet", "eval")]
    for r in rows[:3]:
        assert r["taps"] == ["block2.0.relu1:pre", "block3.0.relu1:pre", "relu:pre"]
    for r in rows:
        assert r["eager_ms"] > 0 and r["tapped_ms"] > 0 and r["ratio"] > 0 and r["taps"]
        assert len(r["raw_s"]["eager"]) == len(r["raw_s"]["tapped"]) == 2
    assert all(name.endswith(":pre") for name in rows[3]["taps"]) and set(rows[3]["how"]) == set(rows[3]["taps"])
    plain = rows[5]
    assert plain["batch"] == 4 and plain["eager_before_tap_ms"] > 0
    # the fresh interpreter's tapped model tuned glibc's allocator itself, as it does here (where possible)
    assert plain["allocator_tuned"] is tune_allocator()


def test_figure_b_steps_and_the_loss_check(results):
    rows = results[1]["figures"]["b"]
    assert [r["method"] for r in rows] == ["kd", "at", "margin_relu"]
    for r in rows:
        assert r["kdgraph_ms"] > 0 and r["reference_ms"] > 0 and r["batch"] == 4
        assert r["loss_rel_diff"] < 1e-4, (r["method"], r["loss_kdgraph"], r["loss_reference"])


def test_figure_c_pipelines(results):
    (row,) = results[1]["figures"]["c"]  # no GPU row on a CPU run
    assert row["device"] == "cpu" and row["threads"] == 1 and row["images"] == 16
    assert row["per_sample_img_s"] > 0 and row["tensor_img_s"] > 0


def test_figure_d_memory(results):
    (row,) = results[1]["figures"]["d"]
    for kind in ("student_only", "kd"):
        assert row[kind]["peak_bytes"] == row[kind]["before_bytes"] + row[kind]["step_peak_bytes"]
        assert row[kind]["step_peak_bytes"] > 0
    assert row["kd"]["before_bytes"] > row["student_only"]["before_bytes"]  # the teacher's weights
    assert row["ratio"] > 1


def test_hand_written_forwards_match_the_models():
    torch.manual_seed(0)
    t, s = bench._models("wrn-16-2", "wrn-10-1", torch.device("cpu"))
    x = torch.randn(3, 3, 32, 32)
    for m in (t, s.eval()):
        with torch.no_grad():
            plain = m(x)
            for forward in (bench.wrn_groups, bench.wrn_pre_relu):
                logits, feats = forward(m, x)
                torch.testing.assert_close(logits, plain)
                assert len(feats) == 3


def test_the_command_line(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["bench", "--only", "c", "--reps", "1", "--batch", "4", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["figures"].keys() == {"c"}
    assert "per-sample" in capsys.readouterr().out
    assert main(["bench", "--only", "c", "--reps", "1", "--batch", "4", "--data-batches", "1",
                 "--out", str(tmp_path / "m.json")]) == 0
    assert main(["bench", "--only", "x"]) == 2
    args = argparse.Namespace(reps=1, batch=4, device="cpu", only="c", out=str(tmp_path / "n.json"))
    assert bench.cli(args) == 0
