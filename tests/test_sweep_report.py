"""Grid search and reports: cell naming, linked keys, key checks, the grid table and heatmap, the report's
tables and curves on fabricated run directories, the sweep runner against a fake engine, and one real
end-to-end sweep."""
from __future__ import annotations

import csv
import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest

from kdgraph.app import sweep
from kdgraph.app.grid import SWEEP_FILE, grid_table, write_grid
from kdgraph.app.format import markdown_table
from kdgraph.app.report import pivot_tables, report
from kdgraph.errors import UserError
from kdgraph.spec import load

SPECS = Path(__file__).resolve().parent.parent / "specs"
PNG = b"\x89PNG\r\n\x1a\n"

TINY = """\
name: tiny_grid
data: {dataset: digits, workers: 0, batch_size: 64}
student: {model: wrn-10-1}
loss: [{method: ce}]
train:
  epochs: 1
  max_steps_per_epoch: 3
  device: cpu
  optimizer: {lr: 0.1}
  schedule: {name: constant}
log: {tensorboard: false}
"""


def write_sweep_spec(tmp_path: Path, sweep_block: str, text: str = TINY, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text + "sweep:\n" + textwrap.indent(textwrap.dedent(sweep_block), "  "))
    return path


def fake_run(run_dir: Path, *, best=None, status="finished", teacher=None, student="wrn-16-2", methods=("ce",),
             teacher_top1=None, dataset="cifar100", epochs=3, name="x", **extra):
    """A run directory as ``kdgraph run`` leaves it: metrics.jsonl and summary.json (``extra`` keys added)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    done = epochs if status == "finished" else 1
    with open(run_dir / "metrics.jsonl", "w") as f:
        for e in range(1, done + 1):
            f.write(json.dumps({"epoch": e, "lr": 0.1, "loss": 3.0 / e, "test_top1": (best or 0) * e / done}) + "\n")
        f.write('{"epoch": 9, "lo')  # a line still being written
    summary = {"name": name, "status": status, "epochs": epochs, "epochs_done": done, "best_top1": best,
               "best_epoch": done, "final_top1": best, "teacher_top1": teacher_top1, "teacher": teacher,
               "student": student, "methods": list(methods), "wall_seconds": 3725.0, "dataset": dataset, **extra}
    (run_dir / "summary.json").write_text(json.dumps(summary))


# ------------------------------------------------------------------------------------ naming and keys
def test_cell_names_labels_and_values():
    axes = sweep.parse_sweep({"loss.1.weight": [0.2, 1e-05], "loss.0.weight": [1], "data.root": ["a/b c"],
                              "train.nesterov": [True]})
    assert [a.label for a in axes] == ["loss.1.weight", "loss.0.weight", "root", "nesterov"]
    names = [c.name for c in sweep.grid_cells(axes)]
    assert names == ["loss.1.weight=0.2,loss.0.weight=1,root=a_b_c,nesterov=true",
                     "loss.1.weight=1e-05,loss.0.weight=1,root=a_b_c,nesterov=true"]
    cell = sweep.grid_cells(axes)[1]
    assert cell.overrides == ["loss.1.weight=1.0e-05", "loss.0.weight=1", "data.root=a/b c", "train.nesterov=true"]
    assert sweep.axis_labels([("train", "schedule", "milestones", 0), ("train", "seed")]) == ["milestones.0", "seed"]
    long = sweep.safe_name("x" * 300)
    assert len(long) == 120 and long != sweep.safe_name("x" * 301)
    with pytest.raises(UserError, match="values must differ"):
        sweep.parse_sweep({"train.seed": [1, 1]})


def test_safe_names_that_collide_are_refused():
    with pytest.raises(UserError, match="share the directory name"):
        sweep.grid_cells(sweep.parse_sweep({"data.root": ["a/b", "a b"]}))


def test_linked_keys_move_together():
    axes = sweep.parse_sweep({"loss.1.weight,loss.0.weight": [[0.2, 0.8], [0.4, 0.6]], "loss.1.temperature": [2, 4]})
    assert axes[0].linked and axes[0].label == "weight"
    cells = sweep.grid_cells(axes)
    assert [c.name for c in cells] == ["weight=0.2,temperature=2", "weight=0.2,temperature=4",
                                       "weight=0.4,temperature=2", "weight=0.4,temperature=4"]
    assert cells[3].values == {"loss.1.weight": 0.4, "loss.0.weight": 0.6, "loss.1.temperature": 4}
    with pytest.raises(UserError, match="lists of 2 values"):
        sweep.parse_sweep({"loss.1.weight,loss.0.weight": [[0.2, 0.8], [0.4]]})
    with pytest.raises(UserError, match="first values of linked keys must differ"):
        sweep.parse_sweep({"loss.1.weight,loss.0.weight": [[0.2, 0.8], [0.2, 0.7]]})
    with pytest.raises(UserError, match="appears in both"):
        sweep.parse_sweep({"loss.1.weight,loss.0.weight": [[0.2, 0.8]], "loss.0.weight": [1]})


def test_kd_grid_spec_reproduces_the_original_grid():
    spec = load(SPECS / "kd_grid.yaml")
    axes = sweep.parse_sweep(spec["sweep"])
    sweep.check_paths(spec, axes)
    cells = sweep.grid_cells(axes)
    assert len(cells) == 16 and cells[0].name == "weight=0.2,temperature=2"
    for cell in cells:  # the CE weight is 1 - the KD weight in every cell
        assert cell.values["loss.0.weight"] + cell.values["loss.1.weight"] == pytest.approx(1.0)
    train = spec["train"]
    assert (train["epochs"], train["optimizer"]["lr"], train["schedule"]["milestones"]) == (200, 0.1, [60, 120, 160])
    assert "alpha weighted CE" in (SPECS / "kd_grid.yaml").read_text()


def test_bad_sweep_key_names_the_path_and_suggests(tmp_path):
    spec_file = write_sweep_spec(tmp_path, """\
        train.optimizer.lr: [0.1]
        loss.0.wieght: [1]
        """)
    with pytest.raises(UserError) as err:
        sweep.run_sweep(spec_file, runs_dir=tmp_path / "runs", echo=lambda s: None)
    message = str(err.value)
    assert "grid.yaml:14:3: sweep.loss.0.wieght: no key path 'loss.0.wieght'" in message
    assert "did you mean 'loss.0.weight'" in message and "train.optimizer.lr" not in message
    assert not (tmp_path / "runs").exists()
    spec = load(spec_file, ["sweep={data.options.size: [8], train.schedule.gamma: [0.1]}"])
    sweep.check_paths(spec, sweep.parse_sweep(spec["sweep"]))  # free-form mappings and schema defaults


# ---------------------------------------------------------------------------------------------- grid
def test_grid_from_fabricated_cells(tmp_path):
    axes = sweep.parse_sweep({"train.optimizer.lr": [0.1, 0.2, 0.4], "train.seed": [0, 1]})
    cells = sweep.grid_cells(axes)
    sweep_dir = tmp_path / "grid"
    record = sweep.sweep_record("grid", tmp_path / "g.yaml", [], axes, cells)
    record["cells"]["lr=0.2,seed=1"].update(exit=2, ended=1.0)  # failed before writing anything
    sweep_dir.mkdir()
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(record))
    fake_run(sweep_dir / "lr=0.1,seed=0", best=71.234)
    fake_run(sweep_dir / "lr=0.1,seed=1", best=72.5)
    fake_run(sweep_dir / "lr=0.2,seed=0", status="failed")
    fake_run(sweep_dir / "lr=0.4,seed=0", best=60.0, status="stopped")
    # lr=0.4,seed=1 never ran

    # the seeds are not a dimension: each lr shows mean ± std (sample std) over its seeds, n the finished ones
    table = write_grid(sweep_dir, echo=None)
    expected = [["0.1", "71.87 ± 0.90 (n=2)"], ["0.2", "failed"], ["0.4", "60.00 (n=1)*"]]
    assert table == markdown_table(["lr", "best top-1"], expected)
    md = (sweep_dir / "grid.md").read_text()
    assert table in md and "unfinished" in md and "mean ± std over 2 seeds" in md
    rows = list(csv.reader(open(sweep_dir / "grid.csv")))
    assert rows == [["lr", "best top-1"], *expected]
    assert grid_table(sweep_dir)["values"] == [[pytest.approx(71.867)], [None], [60.0]]
    assert (sweep_dir / "heatmap.png").read_bytes()[:8] == PNG
    # a cell fixed by hand after its failure counts again
    fake_run(sweep_dir / "lr=0.2,seed=1", best=70.0)
    assert "70.00 (n=1) (1 failed)" in write_grid(sweep_dir, echo=None)


def test_grid_folds_extra_keys_into_rows(tmp_path):
    axes = sweep.parse_sweep({"loss.0.weight": [1, 2], "data.batch_size": [32], "train.epochs": [5, 6]})
    sweep_dir = tmp_path / "g"
    sweep_dir.mkdir()
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(sweep.sweep_record("g", "g.yaml", [], axes,
                                                                            sweep.grid_cells(axes))))
    fake_run(sweep_dir / "weight=2,batch_size=32,epochs=6", best=50.0)
    grid = grid_table(sweep_dir)
    assert grid["header"] == ["weight, epochs \\ batch_size", "32"]
    assert grid["rows"] == [["1, epochs=5", ""], ["1, epochs=6", ""], ["2, epochs=5", ""], ["2, epochs=6", "50.00"]]


def test_a_seed_axis_alone_and_with_two_others(tmp_path):
    axes = sweep.parse_sweep({"train.seed": [0, 1, 2]})
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(sweep.sweep_record("s", "s.yaml", [], axes, sweep.grid_cells(axes))))
    for seed, best in enumerate((70.0, 72.0, 74.0)):
        fake_run(sweep_dir / f"seed={seed}", best=best)
    grid = grid_table(sweep_dir)
    assert (grid["header"], grid["rows"]) == (["seeds", "best top-1"], [["3 seeds", "72.00 ± 2.00 (n=3)"]])
    axes = sweep.parse_sweep({"loss.1.weight": [1, 2], "train.seed": [0, 1], "loss.1.temperature": [4, 8]})
    assert [len(a.values) for a in axes] == [2, 2, 2] and len(sweep.grid_cells(axes)) == 8
    sweep_dir = tmp_path / "w"
    sweep_dir.mkdir()
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(sweep.sweep_record("w", "w.yaml", [], axes, sweep.grid_cells(axes))))
    fake_run(sweep_dir / "weight=2,seed=0,temperature=8", best=60.0)
    fake_run(sweep_dir / "weight=2,seed=1,temperature=8", best=62.0)
    grid = grid_table(sweep_dir)  # the seed axis was the columns' axis: the next one takes its place
    assert grid["header"] == ["weight \\ temperature", "4", "8"]
    assert grid["rows"][1] == ["2", "", "61.00 ± 1.41 (n=2)"]


def test_seeds_option():
    assert sweep.parse_seeds("3") == [0, 1, 2] and sweep.parse_seeds("0,3,7") == [0, 3, 7]
    assert sweep.parse_seeds("5,") == [5]
    for bad in ("x", "0", "1,1", ""):
        with pytest.raises(UserError, match="--seeds"):
            sweep.parse_seeds(bad)


# -------------------------------------------------------------------------------------------- report
def test_report_tables_pivot_and_curves(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "alone", best=73.42)
    fake_run(runs / "kd_a", best=73.9, teacher="wrn-28-4", methods=("ce", "kd"), teacher_top1=79.17)
    fake_run(runs / "kd_b", best=74.02, teacher="wrn-28-4", methods=("ce", "kd"), teacher_top1=79.17)
    fake_run(runs / "at", best=73.1, teacher="wrn-28-4", methods=("ce", "at"), teacher_top1=79.17, status="stopped")
    fake_run(runs / "margin", best=75.41, teacher="wrn-28-4", methods=("ce", "margin_relu"), teacher_top1=79.17)
    fake_run(runs / "other_data", best=50.0, teacher="wrn-28-4", methods=("ce", "kd"), dataset="cifar10")
    (runs / "empty").mkdir()
    lines = []
    out = report([str(runs / "*")], echo=lines.append)

    assert out["out_dir"] == runs and len(out["runs"]) == 6
    assert any("empty: skipped, no summary.json" in n for n in out["notes"])
    pivot = out["pivots"][0]
    assert pivot["dataset"] == "cifar100"
    assert pivot["header"] == ["Teacher", "Student", "Teacher acc", "Student acc", "kd", "at", "margin_relu"]
    assert pivot["rows"] == [["wrn-28-4", "wrn-16-2", "79.17", "73.42", "74.02 (best of 2)", "73.10*", "75.41"]]
    assert out["pivots"][1]["dataset"] == "cifar10" and out["pivots"][1]["rows"][0][3] == ""

    md = (runs / "report.md").read_text()
    assert markdown_table(pivot["header"], pivot["rows"]) in md and "| kd_b " in md and "1:02:05" in md
    assert markdown_table(pivot["header"], pivot["rows"]) in "\n".join(lines)
    rows = list(csv.DictReader(open(runs / "report.csv")))
    kd_b = next(r for r in rows if r["name"] == "kd_b")
    assert (kd_b["methods"], kd_b["best_top1"], kd_b["epochs_done"]) == ("ce+kd", "74.02", "3")
    assert "unfinished run" in md
    assert (runs / "curves.png").read_bytes()[:8] == PNG

    with pytest.raises(UserError, match="no runs to report"):
        report([str(runs / "empty"), str(tmp_path / "missing*")], echo=lambda s: None)


def test_report_on_a_sweep_dir_refreshes_its_grid(tmp_path):
    axes = sweep.parse_sweep({"train.seed": [0, 1]})
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(sweep.sweep_record("s", "s.yaml", [], axes,
                                                                            sweep.grid_cells(axes))))
    fake_run(sweep_dir / "seed=1", best=40.0)
    out = report([str(sweep_dir)], out_dir=tmp_path / "rep", echo=lambda s: None)
    assert [r["name"] for r in out["runs"]] == ["seed=1"]
    assert out["pivots"] == [] and out["grids"] == [sweep_dir]
    assert "40.00" in (sweep_dir / "grid.md").read_text() and (tmp_path / "rep" / "report.md").exists()


def test_report_aggregates_seeds_and_shows_the_published_number(tmp_path):
    runs = tmp_path / "runs"
    expect = {"top1": 74.92, "source": "RepDistiller README", "metric": "best_top1"}
    for seed, best in enumerate((74.0, 75.0, 76.0)):  # a spec's `seeds:` runs: one group
        fake_run(runs / f"kd-seed{seed}", best=best, teacher="wrn-40-2", methods=("ce", "kd"), teacher_top1=75.61,
                 seed=seed, group="kd", expect=expect)
    fake_run(runs / "kd-t8", best=73.0, teacher="wrn-40-2", methods=("ce", "kd"), teacher_top1=75.61, seed=0)
    for seed, best in enumerate((73.0, 73.5)):
        fake_run(runs / f"alone-seed{seed}", best=best, seed=seed, group="alone")
    lines = []
    out = report([str(runs / "*")], echo=lines.append)
    printed = "\n".join(lines)

    (pivot,) = out["pivots"]
    assert pivot["rows"] == [["wrn-40-2", "wrn-16-2", "75.61", "73.25 ± 0.35 (n=2)", "75.00 ± 1.00 (n=3) (best of 2)"]]
    md = (runs / "report.md").read_text()
    assert "## Repeated runs" in md and "Repeated runs (mean ± std over seeds)" in printed
    repeated = [l for l in md.split("## Repeated runs")[1].splitlines() if l.startswith("| kd ")]
    assert len(repeated) == 1 and "| 0,1,2 " in repeated[0] and "| 3 " in repeated[0]
    assert "75.00 ± 1.00" in repeated[0] and "74.92" in repeated[0] and "+0.08" in repeated[0]
    row = next(l for l in md.splitlines() if l.startswith("| kd-seed0 "))
    assert "74.92" in row and "-0.92" in row  # the run beside the published number, and the difference
    rows = {r["name"]: r for r in csv.DictReader(open(runs / "report.csv"))}
    assert (rows["kd-seed2"]["seed"], rows["kd-seed2"]["group"], rows["kd-seed2"]["expected_top1"]) == \
        ("2", "kd", "74.92")


def test_a_three_seed_digits_sweep_and_its_report(tmp_path, monkeypatch, cli):
    """`kdgraph sweep SPEC` of a spec with `seeds: [0, 1, 2]` (what `--seeds 3` gives too), then `kdgraph
    report` of it: mean ± std over the three seeds."""
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "seeds.yaml"
    spec.write_text(TINY.replace("tiny_grid", "seeds") + 'expect: {top1: 50.0, source: "a test"}\nseeds: [0, 1, 2]\n')
    assert sweep.parse_seeds("3") == [0, 1, 2]
    code, out, err = cli(["sweep", spec, "--jobs", "2"])
    assert code == 0, err
    info = json.loads(Path("runs/seeds/sweep.json").read_text())
    assert info["keys"] == ["train.seed"] and sorted(info["cells"]) == ["seed=0", "seed=1", "seed=2"]
    code, out, err = cli(["report", "runs/seeds"])
    assert code == 0, err
    bests = [json.loads(Path(f"runs/seeds/seed={k}/summary.json").read_text())["best_top1"] for k in range(3)]
    mean = sum(bests) / 3
    std = (sum((b - mean) ** 2 for b in bests) / 2) ** 0.5
    assert f"{mean:.2f} ± {std:.2f} (n=3)" in out  # the grid
    repeated = next(l for l in out.split("Repeated runs")[1].splitlines() if l.startswith("| seeds "))
    assert "| 0,1,2 " in repeated and f"{mean:.2f} ± {std:.2f}" in repeated and f"{mean - 50:+.2f}" in repeated
    assert "published" in out.splitlines()[0]


def test_pivot_needs_distillation_runs():
    assert pivot_tables([{"teacher": None, "student": "s", "methods": ["ce"], "best_top1": 1.0,
                          "dataset": "d", "status": "finished", "teacher_top1": None}]) == []


# ------------------------------------------------------------------------------ runner (fake engine)
FAKE_ENGINE = r'''
import json, os, sys
from pathlib import Path
args, sets, out, resume, force = sys.argv[2:], [], None, False, False
spec = args.pop(0)
while args:
    a = args.pop(0)
    if a == "--set": sets.append(args.pop(0))
    elif a == "--out": out = Path(args.pop(0))
    elif a == "--runs-dir": args.pop(0)
    elif a == "--resume": resume = True
    elif a == "--force": force = True
with open(os.environ["FAKE_ENGINE_LOG"], "a") as f:
    f.write(json.dumps({"cell": out.name, "resume": resume, "force": force, "sets": sets,
                        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n")
print("fake engine", out.name)
if out.name == os.environ.get("FAKE_FAIL"):
    print("RuntimeError: boom", file=sys.stderr); sys.exit(1)
v = dict(s.split("=", 1) for s in sets)
best = 50 + 100 * float(v["train.optimizer.lr"]) + int(v["train.seed"])
(out / "checkpoints").mkdir(parents=True, exist_ok=True)
(out / "checkpoints" / "last.pt").write_text("x")
(out / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "loss": 1.0, "test_top1": best}) + "\n")
(out / "summary.json").write_text(json.dumps({"status": "finished", "best_top1": best, "epochs": 1,
    "epochs_done": 1, "student": "wrn-10-1", "teacher": None, "methods": ["ce"], "dataset": "digits"}))
'''


def test_runner_skips_resumes_forces_and_records_failures(tmp_path, monkeypatch):
    engine = tmp_path / "fake_engine.py"
    engine.write_text(FAKE_ENGINE)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setattr(sweep, "engine_command", lambda: [sys.executable, str(engine)])
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(calls))
    monkeypatch.setenv("FAKE_FAIL", "lr=0.2,seed=1")
    spec_file = write_sweep_spec(tmp_path, """\
        train.optimizer.lr: [0.1, 0.2]
        train.seed: [0, 1]
        """)
    runs = tmp_path / "runs"

    def ran():
        lines = calls.read_text().splitlines() if calls.exists() else []
        calls.unlink(missing_ok=True)
        return {c["cell"]: c for c in map(json.loads, lines)}

    printed = []
    sweep_dir = sweep.run_sweep(spec_file, ["data.batch_size=32"], jobs=2, runs_dir=runs, echo=printed.append)
    assert sweep_dir == runs / "tiny_grid"
    first = ran()
    assert sorted(first) == ["lr=0.1,seed=0", "lr=0.1,seed=1", "lr=0.2,seed=0", "lr=0.2,seed=1"]
    assert first["lr=0.2,seed=0"]["sets"] == ["data.batch_size=32", "train.optimizer.lr=0.2", "train.seed=0",
                                              "sweep=null", "seeds=null"]
    assert "FAILED (exit 1): RuntimeError: boom" in "\n".join(printed)
    assert re.search(r"\| 0\.2 +\| 70\.00 \(n=1\) \(1 failed\) +\|", printed[-1])  # seeds aggregated
    assert "fake engine lr=0.2,seed=1" in (sweep_dir / "lr=0.2,seed=1" / "sweep.log").read_text()
    info = json.loads((sweep_dir / "sweep.json").read_text())
    assert info["cells"]["lr=0.2,seed=1"]["exit"] == 1 and info["keys"] == ["train.optimizer.lr", "train.seed"]

    # only unfinished cells run again; one with a checkpoint resumes
    monkeypatch.delenv("FAKE_FAIL")
    (sweep_dir / "lr=0.1,seed=1" / "summary.json").unlink()
    sweep.run_sweep(spec_file, ["data.batch_size=32"], runs_dir=runs, echo=printed.append)
    second = ran()
    assert sorted(second) == ["lr=0.1,seed=1", "lr=0.2,seed=1"]
    assert second["lr=0.1,seed=1"]["resume"] and not second["lr=0.2,seed=1"]["resume"]
    assert "failed" not in (sweep_dir / "grid.md").read_text()

    sweep.run_sweep(spec_file, ["data.batch_size=32"], runs_dir=runs, echo=printed.append)
    assert ran() == {}
    sweep.run_sweep(spec_file, ["data.batch_size=32"], runs_dir=runs, force=True, echo=printed.append)
    forced = ran()
    assert len(forced) == 4 and not any(c["resume"] for c in forced.values())
    assert all(c["force"] for c in forced.values())  # the run clears its (marked) directory itself
    assert (sweep_dir / "lr=0.1,seed=0" / "sweep.log").read_text().count("===") == 2  # the launcher's log is kept


def test_cells_get_one_gpu_each(tmp_path, monkeypatch):
    import torch

    engine = tmp_path / "fake_engine.py"
    engine.write_text(FAKE_ENGINE)
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setattr(sweep, "engine_command", lambda: [sys.executable, str(engine)])
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,7")
    assert sweep._slots("auto", None, None) == [{"CUDA_VISIBLE_DEVICES": d} for d in ("4", "5", "7")]
    assert sweep._slots("cpu", 2, None) == [{"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // 2))}] * 2
    assert sweep._slots("auto", 2, "cpu") == sweep._slots("cpu", 2, None)
    with pytest.raises(UserError, match="no CUDA device '3'"):
        sweep._slots("auto", None, "0,3")

    spec_file = write_sweep_spec(tmp_path, """\
        train.optimizer.lr: [0.1, 0.2]
        train.seed: [0, 1]
        """)
    sweep.run_sweep(spec_file, devices="0,2", runs_dir=tmp_path / "runs", echo=lambda s: None)
    gpus = [json.loads(line)["gpu"] for line in calls.read_text().splitlines()]
    assert len(gpus) == 4 and set(gpus) == {"4", "7"}


def test_a_teacher_to_train_is_trained_by_the_first_cell_alone(tmp_path, monkeypatch):
    engine = tmp_path / "fake_engine.py"
    engine.write_text(FAKE_ENGINE.replace('float(v["train.optimizer.lr"])', '0.1').replace('int(v["train.seed"])', '0'))
    monkeypatch.setattr(sweep, "engine_command", lambda: [sys.executable, str(engine)])
    monkeypatch.setenv("FAKE_ENGINE_LOG", str(tmp_path / "calls.jsonl"))
    (tmp_path / "teacher.yaml").write_text(TINY.replace("tiny_grid", "tiny_teacher"))
    student = TINY.replace("loss: [{method: ce}]", "teacher: {model: wrn-10-1, from_spec: teacher.yaml}\n"
                                                   "loss: [{method: ce}, {method: kd}]")
    spec_file = write_sweep_spec(tmp_path, "loss.1.temperature: [2, 4, 8]\n", text=student)
    printed = []
    sweep.run_sweep(spec_file, jobs=2, runs_dir=tmp_path / "runs", echo=printed.append)
    assert "the first cell runs alone" in "\n".join(printed)
    assert [line.split(":")[0] for line in printed if line.startswith("start")][0] == "start temperature=2"

    fake_run(tmp_path / "runs" / "tiny_teacher", best=90.0)  # the teacher's run has finished
    assert not sweep._teacher_pending(load(spec_file), tmp_path / "runs")


# -------------------------------------------------------------------------------------- end to end
def test_end_to_end_sweep_with_resume_and_a_failing_value(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the digits data set needs scikit-learn")
    monkeypatch.chdir(tmp_path)
    spec_file = write_sweep_spec(tmp_path, """\
        train.optimizer.lr: [0.05, 1.0e+30]
        train.seed: [0, 1]
        """)  # a learning rate that diverges: cells that fail while running (validate cannot know)
    printed = []
    sweep_dir = sweep.run_sweep(spec_file.name, jobs=2, echo=printed.append)
    assert sweep_dir == Path("runs/tiny_grid")
    assert re.search(r"\| 1e\+30 +\| failed +\|", printed[-1])
    for seed in (0, 1):
        summary = json.loads((sweep_dir / f"lr=0.05,seed={seed}" / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["epochs_done"] == 1
    assert "the loss became" in (sweep_dir / "lr=1e+30,seed=0" / "sweep.log").read_text()

    # an unfinished cell (no summary) is resumed; the finished one is left alone
    kept = sweep_dir / "lr=0.05,seed=0" / "summary.json"
    kept_mtime = kept.stat().st_mtime_ns
    (sweep_dir / "lr=0.05,seed=1" / "summary.json").unlink()
    sweep.run_sweep(spec_file.name, jobs=2, echo=printed.append)
    assert kept.stat().st_mtime_ns == kept_mtime
    assert json.loads((sweep_dir / "lr=0.05,seed=1" / "summary.json").read_text())["status"] == "finished"
    log = (sweep_dir / "lr=0.05,seed=1" / "sweep.log").read_text()
    assert log.count("===") == 2 and log.splitlines()[0].count("--resume") == 0 and "--resume" in log
    table = printed[-1]
    print(table)
    assert re.match(r"\| lr +\| best top-1", table.splitlines()[0]) and re.search(r"\| 1e\+30 +\| failed +\|", table)
    row = next(line for line in table.splitlines() if line.startswith("| 0.05"))
    assert re.search(r"\d+\.\d\d ± \d+\.\d\d \(n=2\)", row)  # both seeds have a number: mean ± std
    assert (sweep_dir / "heatmap.png").read_bytes()[:8] == PNG
    assert "failed" in (sweep_dir / "grid.csv").read_text()
