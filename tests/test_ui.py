"""The web UI without a browser: form <-> spec, validation, layer tables, run views, handlers and the job
queue (with a stand-in engine that trains nothing)."""
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the UI needs gradio: pip install 'kdgraph[ui]'")

import gradio as gr  # noqa: E402

from kdgraph import spec as specs  # noqa: E402
from kdgraph.app.cli import main as cli_main  # noqa: E402
from kdgraph.errors import UserError  # noqa: E402
from kdgraph.ui import fielderrors, forms, jobs, runs  # noqa: E402
from kdgraph.errors import format_problem  # noqa: E402
from kdgraph.ui.handlers import TAP_KEYS, TERM_VIEW_KEYS, TRACE_KEYS, Handlers  # noqa: E402

SPECS = Path(__file__).resolve().parent.parent / "specs"

# Stands in for `python -m kdgraph`: its "spec" is JSON saying how to behave. It writes what a run writes
# (summary.json, metrics.jsonl, a checkpoint on SIGTERM) and records its command line and environment.
FAKE_ENGINE = r'''
import json, os, signal, sys, time
from pathlib import Path

args = sys.argv[1:]
cfg = json.loads(Path(args[1]).read_text() or "{}")
out = Path(args[args.index("--out") + 1])
out.mkdir(parents=True, exist_ok=True)
if "--force" in args:  # as kdgraph run --force: what the run wrote goes, the launcher's log and spec stay
    import shutil
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for name in ("summary.json", "metrics.jsonl"):
        (out / name).unlink(missing_ok=True)
(out / "fake.json").write_text(json.dumps({"argv": args, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                                           "omp": os.environ.get("OMP_NUM_THREADS")}))
stop = []
signal.signal(signal.SIGTERM, signal.SIG_IGN if cfg.get("ignore_term") else (lambda *a: stop.append(1)))
last = out / "checkpoints" / "last.pt"
first = int(last.read_text()) if "--resume" in args and last.exists() else 0
epochs = cfg.get("epochs", 2)
summary = {"name": out.name, "status": "running", "epochs": epochs, "epochs_done": first, "best_top1": None}

def write(**kw):
    summary.update(kw)
    (out / "summary.json").write_text(json.dumps(summary))

write()
print(f"fake: epochs {first + 1}..{epochs}", flush=True)
for epoch in range(first, epochs):
    end = time.time() + cfg.get("epoch_seconds", 0.1)
    while time.time() < end:
        if stop:
            last.parent.mkdir(exist_ok=True)
            last.write_text(str(epoch))
            write(status="stopped")
            sys.exit(130)
        time.sleep(0.01)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": epoch + 1, "loss": 1 / (epoch + 1), "loss/ce": 0.5, "train_top1": 50.0,
                            "test_top1": 10.0 * (epoch + 1), "test_loss": 2.0, "seconds": 0.1}) + "\n")
    write(epochs_done=epoch + 1, best_top1=10.0 * (epoch + 1), final_top1=10.0 * (epoch + 1))
if cfg.get("exit"):
    print("kdgraph: error: the fake engine fails as asked", file=sys.stderr)
    write(status="failed", error="asked to fail")
    sys.exit(cfg["exit"])
write(status="finished", wall_seconds=1.0)
'''


@pytest.fixture
def make_manager(tmp_path):
    """JobManagers on ``tmp_path/runs`` running the fake engine; their jobs are killed afterwards."""
    engine = tmp_path / "fake_engine.py"
    engine.write_text(FAKE_ENGINE)
    made = []

    def make(**kw):
        kw = {"cpu_slots": 1, "gpu_count": 0, "stop_timeout": 10.0, "background": False,
              "engine": [sys.executable, str(engine)], **kw}
        manager = jobs.JobManager(tmp_path / "runs", **kw)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        for job in manager.snapshot().values():
            if job["state"] in ("running", "stopping") and jobs._alive(job["pid"], job["pid_start"]):
                jobs.kill_tree(job["pid"])
        if not manager._lock_file.closed:
            manager.close()


def wait_for(manager, predicate, timeout=20.0):
    """Tick ``manager`` until ``predicate()`` holds."""
    end = time.time() + timeout
    while time.time() < end:
        manager.tick()
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out; jobs: {manager.snapshot()}")


def state(manager, name):
    return manager.snapshot()[name]["state"]


def canonical(data: dict) -> dict:
    """A loaded spec with ``weight: null`` dropped (null and absent both mean the canonical weight)."""
    data = json.loads(json.dumps(data))
    for term in data.get("loss", []):
        if term.get("weight", 0) is None:
            del term["weight"]
    return data


# ---------------------------------------------------------------------------------------------- forms
@pytest.mark.parametrize("choice", forms.spec_choices(SPECS))
def test_load_then_save_gives_an_equivalent_spec(choice, tmp_path):
    data = forms.load_spec(SPECS, choice)
    saved, problems = forms.form_to_spec(forms.spec_to_form(data))
    assert problems == []
    reloaded = specs.load_all(SPECS / "saved.yaml", (), text=forms.spec_yaml(saved))[0].data
    assert canonical(reloaded) == canonical(data)


def test_building_at_wrn_in_the_form_gives_its_spec():
    """What a person clicks to rebuild specs/at_wrn.yaml from a new spec."""
    h = Handlers(SPECS, "runs-unused", manager=None)
    form = forms.spec_to_form(forms.NEW_SPEC)
    form.update({"name": "at_wrn", "description": "at WRN-28-4 -> WRN-16-2 on CIFAR-100 as the paper defines "
                                                  "it; = at_wrn-28-4_wrn-16-2.",
                 "data.dataset": "cifar100", "data.root": "data/cifar100", "data.batch_size": 128,
                 "data.workers": 4, "teacher.model": "wrn-28-4",
                 "teacher.from_spec": "original-paper/teacher_wrn-28-4_cifar100.yaml", "student.model": "wrn-16-2",
                 "train.epochs": 200, "train.optimizer.lr": 0.1, "train.schedule.name": "multistep",
                 "train.schedule.milestones": "60, 120, 160", "train.schedule.gamma": 0.2})
    form["loss.0.weight"] = "1.0"
    keys = [f"loss.{i}.{k}" for i in range(forms.MAX_TERMS) for k in forms.TERM_KEYS]
    count, *terms = h.add_term(form["loss.count"], form["teacher.model"])
    form["loss.count"] = count
    form.update({k: v for k, v in zip(keys, terms) if v != gr.skip()})
    form["loss.1.method"] = "at"
    form["loss.1.weight"], form["loss.1.params"], form["loss.1.positions"] = h.method_changed(
        "at", form["loss.1.params"])
    text, problems, marks = h.preview("at_wrn.yaml", *h.values(form))
    assert problems == "valid" and 'data-count="0"' in marks
    built = specs.load_all(SPECS / "at_wrn.yaml", (), text=text)[0].data
    assert built == specs.load_all(SPECS / "at_wrn.yaml")[0].data
    assert "positions: auto" in text and "weight: 1000," in text and "1000.0" not in text


def test_validation_matches_kdgraph_validate(tmp_path, capsys):
    form = forms.spec_to_form(forms.NEW_SPEC)
    form.update({"student.model": "wrn-15-2", "loss.count": 2, **forms.new_term(1, "kd")})
    form["loss.1.params"] = [["temprature", "4", ""]]
    text, problems, form_problems = forms.preview(form, tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text(text)
    assert cli_main(["validate", str(tmp_path / "bad.yaml")]) == 2 and form_problems == []
    assert [format_problem(*p) for p in problems] == capsys.readouterr().err.strip().splitlines()
    problems = forms.validate(text, tmp_path / "bad.yaml")
    assert any("student.model" in p for p in problems)
    assert any("did you mean 'temperature'" in p for p in problems)


def test_form_problems_are_named_and_the_rest_still_builds():
    form = forms.spec_to_form(forms.NEW_SPEC)
    form.update({"teacher.model": "wrn-16-2", "teacher.kwargs": "{a: [", "train.optimizer.betas": "0.9, x",
                 "train.grad_clip": "lots", "data.test_batch_size": "256"})
    data, problems = forms.form_to_spec(form)
    assert [k for k, _ in problems] == ["teacher.kwargs", "train.optimizer.betas", "train.grad_clip"]
    assert data["data"]["test_batch_size"] == 256
    # nothing typed is dropped: the text that cannot be read stays in the spec, for the validator to place
    assert data["teacher"] == {"model": "wrn-16-2", "kwargs": "{a: ["}
    assert data["train"]["optimizer"]["betas"] == "0.9, x" and data["train"]["grad_clip"] == "lots"
    form["loss.0.positions"], form["loss.0.pairs"] = "pairs", [["block1", ""]]
    assert ("loss.0.pairs", "loss.0.positions: every pair needs a teacher tap and a student tap") in \
        forms.form_to_spec(form)[1]


def test_no_teacher_drops_the_teacher_fields_and_defaults_are_not_written():
    form = forms.spec_to_form(forms.NEW_SPEC)
    form.update({"teacher.model": forms.NO_TEACHER, "teacher.checkpoint": "t.pt"})
    data, _ = forms.form_to_spec(form)
    assert "teacher" not in data and "log" not in data and "trace" not in data
    assert data["train"] == {"epochs": 15, "optimizer": {"lr": 0.05}, "schedule": {"name": "cosine"}}


def test_spec_files_load_save_and_launch_text(tmp_path):
    choices = forms.spec_choices(SPECS)
    assert "quickstart.yaml#quickstart-kd" in choices and "at_wrn.yaml" in choices
    assert "kd_grid.yaml" in forms.sweep_files(SPECS) and "at_wrn.yaml" not in forms.sweep_files(SPECS)
    data = forms.load_spec(SPECS, "quickstart.yaml#quickstart-kd")
    assert data["teacher"]["from_spec"] == "quickstart.yaml#quickstart-teacher"
    launched = yaml_load(forms.launch_text(data, SPECS))
    assert launched["teacher"]["from_spec"] == f"{(SPECS / 'quickstart.yaml').resolve()}#quickstart-teacher"
    with pytest.raises(UserError, match="name the file too"):
        forms.launch_text({**data, "teacher": {"model": "wrn-16-2", "from_spec": "#x"}}, SPECS)
    with pytest.raises(UserError, match="no spec named"):
        forms.load_spec(SPECS, "quickstart.yaml#nope")
    path = forms.save_spec(tmp_path, "a.yaml", "name: a\n")
    assert path.read_text() == "name: a\n" and forms.save_spec(tmp_path, "a.yaml", "name: a\n") == path
    with pytest.raises(UserError, match="overwrite"):
        forms.save_spec(tmp_path, "a.yaml", "name: b\n")
    forms.save_spec(tmp_path, "a.yaml", "name: b\n", overwrite=True)
    with pytest.raises(UserError, match="file name"):
        forms.save_spec(tmp_path, "../a.yaml", "x")


def yaml_load(text):
    import yaml

    return yaml.safe_load(text)


def test_layer_tables_filters_and_auto_positions():
    form = forms.spec_to_form(forms.load_spec(SPECS, "at_wrn.yaml"))
    teacher, student, notes = forms.form_layers(form)
    assert notes == [] and teacher[0]["name"] == "conv1"
    pre = forms.layer_table(student, "block3.0.relu1")
    assert [r[0] for r in pre] == ["block3.0.relu1:pre", "block3.0.relu1"] and pre[0][2:] == ["pre", "64x16x16"]
    assert [r[0] for r in forms.layer_table(student, "block3.0.relu1", pre=False)] == ["block3.0.relu1"]
    info = forms.term_info(form, 1, teacher, student)
    assert "**auto chose**" in info and "`block3` → `block3`" in info
    assert "works on the logits" in forms.term_info(form, 0, teacher, student)
    form["student.model"] = "nonet"
    assert forms.form_layers(form)[1] is None and "unknown model" in forms.form_layers(form)[2][0]
    assert "size` (default 16)" in forms.dataset_options("digits")


# ------------------------------------------------------------------------------------------- handlers
def test_handlers_build_events(tmp_path):
    h = Handlers(tmp_path, tmp_path / "runs", manager=None)
    values = h.new_spec()
    form = h.form(values[:len(forms.FIELDS)])
    assert values[-2:] == ("my-run.yaml", "new spec")
    assert h.preview("my-run.yaml", *h.values(form))[1] == "valid"
    weight, rows, positions = h.method_changed("kd", [["warmup_epochs", "2", "0.0"], ["label_smoothing", "", "0.0"]])
    assert (weight, positions) == ("0.9", "auto")
    assert rows == [["warmup_epochs", "2", "0.0"], ["temperature", "", "4.0"], ["standardize", "", "false"],
                    ["init_epochs", "", "0"], ["lr_scale", "", "1.0"]]
    pairs, mode = h.add_pair("block1", "block2", [["a", "b"], ["", ""]])
    assert pairs == [["a", "b"], ["block1", "block2"]] and mode == "pairs"
    form.update({"loss.count": 3, **forms.new_term(1, "kd"), **forms.new_term(2, "at")})
    slots = [form[f"loss.{i}.{k}"] for i in range(forms.MAX_TERMS) for k in forms.TERM_KEYS]
    count, *terms = h.remove_term(0, 3, *slots)
    assert count == 2 and terms[0] == "kd" and terms[5] == "at" and terms[10] == ""
    t_table, s_table, note = h.trace("conv1", True, *[form[k] for k in TRACE_KEYS])
    assert "no teacher" in t_table and "no teacher" in note
    assert s_table.index(">conv1<") < s_table.index(">block1.0.conv1<") and 'data-rows="4"' in s_table
    taps = h.tap_choices(*[form[k] for k in TAP_KEYS])
    assert taps == [gr.skip()] * (2 * forms.MAX_TERMS)  # no pair editor open: no choices sent
    taps = h.tap_choices(*[{**form, "loss.1.positions": "pairs"}[k] for k in TAP_KEYS])
    assert taps[0] == gr.skip() and taps[3]["choices"][0] == "conv1"
    views = h.term_views(*[{**form, "loss.count": 2, **forms.new_term(1, "at")}[k] for k in TERM_VIEW_KEYS])
    assert [v["visible"] for v in views[:8:4]] == [True, True] and views[5]["visible"] is True
    assert "positions show once both models trace" in views[7] and 'data-pairs="0"' in views[-1]
    message, choices = h.save("my-run.yaml", False, *h.values(form))
    assert message.startswith("saved") and "my-run.yaml" in choices["choices"]
    assert h.save("my-run.yaml", False, *h.values({**form, "name": "other"}))[0].startswith("⚠")
    assert h.load("missing.yaml")[-1].startswith("⚠")
    loaded = h.load("my-run.yaml")
    assert h.form(loaded[:len(forms.FIELDS)])["loss.count"] == 3


def test_handlers_start_and_follow_a_run(tmp_path, make_manager):
    manager = make_manager()
    h = Handlers(tmp_path / "specs", tmp_path / "runs", manager)
    form = forms.spec_to_form(forms.NEW_SPEC)
    message, tab, _, timer = h.start("my-run.yaml", [], False, *h.values({**form, "student.model": "nonet"}))
    assert message.startswith("⚠ the spec has 1 problem(s)") and tab == gr.skip() and timer == gr.skip()
    # the fake engine reads its launch spec as JSON: a valid kdgraph spec is not, so give it its own text
    manager.submit_run("my-run", json.dumps({"epochs": 3, "epoch_seconds": 0.3}))
    wait_for(manager, lambda: state(manager, "my-run") == "running")
    panel = h.run_panel("my-run")
    assert "my-run: running" in panel[0] and "no data yet" in panel[1]
    wait_for(manager, lambda: (tmp_path / "runs" / "my-run" / "metrics.jsonl").exists())
    panel = h.run_panel("my-run", [], "test_top1", 0.0, "")
    labels = lambda svg: set(re.findall(r'class="series" data-label="([^"]+)"', svg))  # noqa: E731
    assert labels(panel[1]) == {"loss", "loss/ce", "test_loss"} and labels(panel[2]) == {"train_top1", "test_top1"}
    assert "top-1 (%)" in panel[2] and "top-5" not in panel[2]  # no top-5 series: the axis does not promise one
    assert "fake: epochs" in panel[6] and panel[-1].endswith("fake: epochs 1..3") and "<b>=== " in panel[6]
    assert h.run_panel("my-run", [], "test_top1", 0.0, panel[-1])[6] == gr.skip()  # the same log: left alone
    assert h.stop("my-run").startswith("my-run: asked to stop")
    wait_for(manager, lambda: state(manager, "my-run") == "ended")
    status = h.run_status("my-run")
    assert status["status"] == "stopped" and status["exit"] == 130 and status["can_resume"]
    assert h.resume("my-run").startswith("my-run: resuming")
    wait_for(manager, lambda: state(manager, "my-run") == "ended")
    assert h.run_status("my-run")["status"] == "finished"
    assert h.runs_table()[0][:3] == ["my-run", "finished", "3/3"]
    assert h.run_status("nope") == {"error": f"no run 'nope' in {tmp_path / 'runs'}"}


def test_handlers_start_refuses_what_it_cannot_run(tmp_path, make_manager):
    manager = make_manager()
    h = Handlers(tmp_path / "specs", tmp_path / "runs", manager)
    form = forms.spec_to_form(forms.NEW_SPEC)
    sweep = h.start("my-run.yaml", [], False, *h.values({**form, "sweep": "train.seed: [0, 1]\n"}))
    assert "Sweeps tab" in sweep[0]
    (tmp_path / "runs" / "my-run").mkdir(parents=True)
    (tmp_path / "runs" / "my-run" / "summary.json").write_text('{"status": "finished"}')
    assert "already holds a run" in h.start("my-run.yaml", [], False, *h.values(form))[0]
    assert h._gpus([1, 0], {"train": {"device": "auto"}}) == [1, 0]
    assert h._gpus([], {"train": {"device": "auto"}}) is None and h._gpus([0], {"train": {"device": "cpu"}}) == []


# ------------------------------------------------------------------------------------------- run views
def test_progress_eta_curves_and_statuses():
    metrics = [{"epoch": 1, "loss": 2.0, "loss/kd": 0.5, "test_top1": 10.0, "train_top1": 9.0, "seconds": 10.0},
               {"epoch": 2, "loss": 1.5, "loss/kd": 0.4, "test_top1": 20.0, "train_top1": 19.0, "seconds": 20.0}]
    job = {"state": "running", "started": 100.0, "base_seconds": 50.0}
    p = runs.progress({"epochs": 5, "epochs_done": 2}, metrics, job, now=160.0)
    assert p == {"epoch": 2, "epochs": 5, "elapsed": 110.0, "remaining": 45.0}
    assert runs.progress_text(p, "running") == "epoch 2/5 · elapsed 0:01:50 · about 0:00:45 left"
    done = runs.progress({"epochs": 5, "epochs_done": 5, "wall_seconds": 61}, metrics, None)
    assert runs.progress_text(done, "finished") == "epoch 5/5 · elapsed 0:01:01"
    loss, acc = runs.curves(metrics)
    assert {r["series"] for r in loss} == {"loss", "loss/kd"}
    assert {r["series"] for r in acc} == {"test_top1", "train_top1"}
    ended = {"state": "ended", "exit": None}
    assert runs.run_status({"status": "running"}, {**ended, "exit": -9}) == "killed"
    assert runs.run_status({}, {**ended, "exit": 2}) == "failed"
    assert runs.run_status({"status": "running"}, {**ended, "exit": 130}) == "stopped"
    assert runs.run_status({"status": "stopped"}, {"state": "queued"}) == "queued"
    assert runs.run_status({"status": "finished"}, None) == "finished"
    assert runs.run_status({}, {"state": "cancelled"}) == "cancelled"
    assert runs.run_status({"status": "running"}, ended) == "interrupted"


def test_tail_reads_the_end(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("".join(f"line {i}\n" for i in range(20000)))
    assert runs.tail(log, 2) == "line 19998\nline 19999" and runs.tail(tmp_path / "none") == ""


# ---------------------------------------------------------------------------------------------- jobs
def test_queue_one_cpu_slot_stop_and_next_starts(tmp_path, make_manager):
    manager = make_manager(cpu_slots=1)
    manager.submit_run("a", json.dumps({"epochs": 50, "epoch_seconds": 0.2}))
    manager.submit_run("b", json.dumps({"epochs": 1}))
    assert state(manager, "a") == "running" and state(manager, "b") == "queued"
    wait_for(manager, lambda: (tmp_path / "runs" / "a" / "summary.json").exists())
    fake = json.loads((tmp_path / "runs" / "a" / "fake.json").read_text())
    assert fake["argv"][:2] == ["run", str(tmp_path / "runs" / "a" / jobs.LAUNCH_SPEC)]
    assert fake["argv"][2:] == ["--out", str(tmp_path / "runs" / "a"), "--runs-dir", str(tmp_path / "runs")]
    assert fake["cuda"] == "" and int(fake["omp"]) >= 1
    pid = manager.snapshot()["a"]["pid"]
    import os

    assert os.getpgid(pid) == pid  # its own process group
    manager.stop("a")
    wait_for(manager, lambda: state(manager, "b") == "running")
    a = manager.snapshot()["a"]
    assert a["exit"] == 130 and (tmp_path / "runs" / "a" / "checkpoints" / "last.pt").exists()
    wait_for(manager, lambda: state(manager, "b") == "ended")
    assert manager.snapshot()["b"]["exit"] == 0
    assert "fake: epochs 1..50" in (tmp_path / "runs" / "a" / jobs.OUTPUT_LOG).read_text()
    with pytest.raises(UserError, match="already holds a run"):
        manager.submit_run("a", "{}")
    manager.submit_run("a", json.dumps({"epochs": 1}), overwrite=True)
    wait_for(manager, lambda: state(manager, "a") == "ended")
    assert not (tmp_path / "runs" / "a" / "checkpoints").exists()


def test_cancel_a_queued_job_and_stop_twice_kills(tmp_path, make_manager):
    manager = make_manager(cpu_slots=1, stop_timeout=30.0)
    manager.submit_run("stubborn", json.dumps({"epochs": 500, "ignore_term": True}))
    manager.submit_run("waiting", "{}")
    assert manager.stop("waiting") == "waiting: taken out of the queue" and state(manager, "waiting") == "cancelled"
    wait_for(manager, lambda: (tmp_path / "runs" / "stubborn" / "summary.json").exists())
    manager.stop("stubborn")
    time.sleep(0.3)
    manager.tick()
    assert state(manager, "stubborn") == "stopping"
    assert manager.stop("stubborn") == "stubborn: killed"
    wait_for(manager, lambda: state(manager, "stubborn") == "ended")
    job = manager.snapshot()["stubborn"]
    assert job["exit"] == -signal.SIGKILL
    assert runs.run_view(tmp_path / "runs", "stubborn", job)["status"] == "killed"
    with pytest.raises(UserError, match="not running or queued"):
        manager.stop("stubborn")


def test_stop_timeout_kills(tmp_path, make_manager):
    manager = make_manager(stop_timeout=0.3)
    manager.submit_run("stubborn", json.dumps({"epochs": 500, "ignore_term": True}))
    wait_for(manager, lambda: (tmp_path / "runs" / "stubborn" / "summary.json").exists())
    manager.stop("stubborn")
    wait_for(manager, lambda: state(manager, "stubborn") == "ended")
    assert manager.snapshot()["stubborn"]["killed"] is True


def test_failure_shows_exit_status_and_log(tmp_path, make_manager):
    manager = make_manager()
    manager.submit_run("bad", json.dumps({"epochs": 1, "exit": 3}))
    wait_for(manager, lambda: state(manager, "bad") == "ended")
    view = runs.run_view(tmp_path / "runs", "bad", manager.snapshot()["bad"])
    assert view["status"] == "failed" and view["exit"] == 3
    assert "(exit status 3)" in view["markdown"] and "asked to fail" in view["markdown"]
    assert "kdgraph: error: the fake engine fails as asked" in view["log"]
    assert runs.runs_table(tmp_path / "runs", manager.snapshot())[0][-1] == "3"


def test_gpu_queue_one_run_per_gpu(tmp_path, make_manager, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    manager = make_manager(gpu_count=2)
    for name in ("g1", "g2", "g3"):
        manager.submit_run(name, json.dumps({"epochs": 100}))
    manager.submit_run("on1", json.dumps({"epochs": 1}), gpus=[1])
    assert [state(manager, n) for n in ("g1", "g2", "g3", "on1")] == ["running", "running", "queued", "queued"]
    wait_for(manager, lambda: all((tmp_path / "runs" / n / "fake.json").exists() for n in ("g1", "g2")))
    seen = {json.loads((tmp_path / "runs" / n / "fake.json").read_text())["cuda"] for n in ("g1", "g2")}
    assert seen == {"4", "6"}  # the physical ids behind torch's 0 and 1
    on_gpu1 = next(n for n in ("g1", "g2") if manager.snapshot()[n]["assigned"] == [1])
    manager.stop(on_gpu1)  # first come, first served: g3 (any GPU) takes GPU 1, on1 waits for it
    wait_for(manager, lambda: state(manager, "g3") == "running")
    assert manager.snapshot()["g3"]["assigned"] == [1] and state(manager, "on1") == "queued"
    manager.stop("g3")
    wait_for(manager, lambda: state(manager, "on1") == "running")
    with pytest.raises(UserError, match="no GPU 2"):
        manager.submit_run("x", "{}", gpus=[2])
    cpu = manager.submit_run("cpu", json.dumps({"epochs": 1}), gpus=[])
    assert cpu.state == "running" and cpu.assigned == []


def test_a_new_manager_reattaches_and_a_second_is_refused(tmp_path, make_manager):
    first = make_manager()
    first.submit_run("long", json.dumps({"epochs": 500}))
    first.submit_run("next", json.dumps({"epochs": 1}))
    wait_for(first, lambda: (tmp_path / "runs" / "long" / "summary.json").exists())
    with pytest.raises(UserError, match="another kdgraph ui manages"):
        make_manager()
    first.close()
    second = make_manager()
    assert state(second, "long") == "running" and state(second, "next") == "queued"
    second.stop("long")
    wait_for(second, lambda: state(second, "long") == "ended")
    assert second.snapshot()["long"]["exit"] == 130  # not its child: from summary.json
    wait_for(second, lambda: state(second, "next") == "ended")


def test_resume_needs_a_stopped_run_and_names_stay_in_the_runs_folder(tmp_path, make_manager):
    manager = make_manager()
    for bad in ("..", ".ui-jobs.json", "a/b", ""):
        with pytest.raises(UserError, match="cannot name a directory"):
            manager.submit_run(bad, "{}", overwrite=True)
    with pytest.raises(UserError, match="holds no spec"):
        manager.resume("nothing")
    manager.submit_run("r", json.dumps({"epochs": 1}))
    wait_for(manager, lambda: state(manager, "r") == "ended")
    with pytest.raises(UserError, match="has finished"):
        manager.resume("r")


def test_the_form_has_a_field_for_every_schema_key():
    """A key the form lacks would be dropped by load-then-save: every schema leaf must be a field."""
    from kdgraph.spec import schema

    root = schema()

    def leaves(node, prefix):
        while "$ref" in node:
            node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        props = node.get("properties") if node.get("type") == "object" or "properties" in node else None
        if not props or prefix in ("data.options", "data.labels", "teacher.kwargs", "student.kwargs", "expect"):
            yield prefix
            return
        for key, sub in props.items():
            yield from leaves(sub, f"{prefix}.{key}" if prefix else key)

    skip = {"extends", "loss"}  # extends is resolved on load; loss terms have their own fields
    missing = [k for k in leaves(root, "") if k.split(".")[0] not in skip and k not in forms.FIELDS]
    assert not missing, missing


# ------------------------------------------------------------------------------------ review findings
BAD_NAMES = ["../outside", "../../outside", "..", "a/b", ".ui-jobs.json", ""]


def test_names_outside_the_runs_folder_are_refused_everywhere(tmp_path, make_manager):
    """A free-text run selector or the API must not read (or act on) directories outside the runs folder."""
    manager = make_manager()
    h = Handlers(tmp_path / "specs", tmp_path / "runs", manager)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "summary.json").write_text('{"status": "stopped", "secret": "S3CRET"}')
    (outside / "metrics.jsonl").write_text('{"epoch": 1, "loss": 1.0}\n')
    (outside / "log.txt").write_text("S3CRET log\n")
    (outside / jobs.LAUNCH_SPEC).write_text("S3CRET: spec\n")
    (outside / "sweep.json").write_text("{}")
    for bad in BAD_NAMES + [str(outside)]:
        with pytest.raises(UserError, match="cannot name a directory"):
            runs.run_view(tmp_path / "runs", bad, None)
        with pytest.raises(UserError, match="cannot name a directory"):
            runs.sweep_view(tmp_path / "runs", bad, None)
        if not bad:
            continue  # the handlers answer "select a run first" to an empty name
        answers = [h.run_status(bad), h.sweep_status(bad)]
        assert all(set(a) == {"error"} and "cannot name a directory" in a["error"] for a in answers), answers
        panel, sweep = h.run_panel(bad), h.sweep_panel(bad)
        assert panel[0].startswith("⚠") and panel[9]["interactive"] is False and panel[10]["interactive"] is False
        assert sweep[0].startswith("⚠") and sweep[-1]["interactive"] is False
        assert h.stop(bad).startswith("⚠") and h.resume(bad).startswith("⚠")
        assert "S3CRET" not in json.dumps([answers, *panel, *sweep], default=str)
    with pytest.raises(UserError, match="cannot name a directory"):
        manager.stop("../outside")
    assert not (tmp_path / "runs" / ".." / "outside" / jobs.OUTPUT_LOG).exists()  # nothing was launched there
    assert h.sweep_status("nope") == {"error": f"no sweep 'nope' in {tmp_path / 'runs'}"}
    # what the selectors list is what the views accept
    (tmp_path / "runs" / "has space").mkdir(parents=True)
    (tmp_path / "runs" / "has space" / "summary.json").write_text('{"status": "finished"}')
    (tmp_path / "runs" / "ok").mkdir()
    (tmp_path / "runs" / "ok" / "summary.json").write_text('{"status": "finished"}')
    assert runs.run_names(tmp_path / "runs", {}) == ["ok"]


def test_cuda_n_runs_on_gpu_n_and_cpu_on_a_cpu_slot(tmp_path, make_manager, monkeypatch):
    """train.device: cuda:N is queued on GPU N (the run sees it as its only GPU, so its spec says cuda);
    train.device: cpu takes a CPU slot even with GPUs free."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    manager = make_manager(gpu_count=2)
    h = Handlers(tmp_path / "specs", tmp_path / "runs", manager)
    form = forms.spec_to_form(forms.NEW_SPEC)

    def start(name, device, ticked=()):
        return h.start(f"{name}.yaml", list(ticked), False, *h.values({**form, "name": name, "train.device": device}))

    assert start("on1", "cuda:1")[0].startswith("on1: ")
    job = manager.snapshot()["on1"]
    assert job["gpus"] == [1] and job["assigned"] == [1]
    launched = yaml_load((tmp_path / "runs" / "on1" / jobs.LAUNCH_SPEC).read_text())
    assert launched["train"]["device"] == "cuda"
    assert "CUDA_VISIBLE_DEVICES=6 " in (tmp_path / "runs" / "on1" / jobs.OUTPUT_LOG).read_text()
    message = start("on2", "cuda:2")[0]
    assert message.startswith("⚠ train.device is cuda:2") and "GPUs 0 to 1" in message
    assert "on2" not in manager.snapshot()
    assert "GPU(s) 0 are ticked" in start("on1b", "cuda:1", [0])[0]
    assert start("on1c", "cuda:1", [1])[0].startswith("on1c: ")  # ticked the same GPU: fine
    assert h._gpus([], {"train": {"device": "cuda"}}) is None and h._gpus([0], {"train": {"device": "cpu"}}) == []
    # cpu: a CPU slot although both GPUs are free (on1 has ended by now or not: GPU 0 is free either way)
    manager.submit_run("cpu", json.dumps({"epochs": 1}), h._gpus([], {"train": {"device": "cpu"}}))
    assert manager.snapshot()["cpu"]["assigned"] == []
    wait_for(manager, lambda: (tmp_path / "runs" / "cpu" / "fake.json").exists())
    assert json.loads((tmp_path / "runs" / "cpu" / "fake.json").read_text())["cuda"] == ""
    # resuming a shell run of a cuda:N spec: on GPU N, from a launch spec that says cuda
    shell = tmp_path / "runs" / "shell"
    shell.mkdir()
    (shell / "spec.yaml").write_text("name: shell\ntrain: {device: 'cuda:1', epochs: 2}\n")
    (shell / "summary.json").write_text('{"status": "stopped"}')
    job = manager.resume("shell")
    assert job.gpus == [1] and job.spec == str(shell / jobs.LAUNCH_SPEC)
    assert yaml_load((shell / jobs.LAUNCH_SPEC).read_text())["train"] == {"device": "cuda", "epochs": 2}


def test_overwrite_and_resume_refuse_a_run_written_outside_the_ui(tmp_path, make_manager):
    import os

    manager = make_manager()
    run_dir = tmp_path / "runs" / "cli"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"status": "running"}')
    (run_dir / "spec.yaml").write_text("{}")
    (run_dir / "log.txt").write_text("epoch 1\n")
    (run_dir / "checkpoints" / "last.pt").write_text("0")
    with pytest.raises(UserError, match="appears to be running outside the UI"):
        manager.submit_run("cli", "{}", overwrite=True)
    with pytest.raises(UserError, match="appears to be running outside the UI"):
        manager.resume("cli")
    assert (run_dir / "checkpoints" / "last.pt").exists() and "cli" not in manager.snapshot()
    # the UI's own job there ended after the last write: it knows the process is dead
    manager._jobs["cli"] = jobs.Job(name="cli", state="ended", ended=time.time() + 0.01, exit=-9, killed=True)
    assert jobs.outside_activity(run_dir, manager._jobs["cli"]) is None
    # ... but not when the directory was written after its job ended (a shell run took it over)
    manager._jobs["cli"].ended = time.time() - 5
    with pytest.raises(UserError, match="appears to be running outside the UI"):
        manager.submit_run("cli", "{}", overwrite=True)
    # written long ago: a dead run (its summary never said otherwise)
    old = time.time() - jobs.RECENT_SECONDS - 10
    for path in ("summary.json", "log.txt", "checkpoints/last.pt"):
        os.utime(run_dir / path, (old, old))
    manager.submit_run("cli", json.dumps({"epochs": 1}), overwrite=True)
    wait_for(manager, lambda: state(manager, "cli") == "ended")
    assert not (run_dir / "checkpoints").exists() and "--force" in manager.snapshot()["cli"]["cmd"]


def test_queue_is_first_come_first_served_per_resource(tmp_path, make_manager):
    """A waiting multi-GPU run or sweep holds back the GPUs it waits for: later runs do not starve it."""
    manager = make_manager(gpu_count=2)
    manager.submit_run("g0", json.dumps({"epochs": 500}), gpus=[0])
    manager.submit_run("both", json.dumps({"epochs": 1}), gpus=[0, 1])
    manager.submit_run("later", json.dumps({"epochs": 1}))  # any GPU: GPU 1 is free, but "both" waits for it
    manager.submit_run("cpu", json.dumps({"epochs": 1}), gpus=[])  # needs nothing "both" waits for
    assert [state(manager, n) for n in ("g0", "both", "later", "cpu")] == ["running", "queued", "queued", "running"]
    manager.stop("g0")
    wait_for(manager, lambda: state(manager, "both") != "queued")
    assert manager.snapshot()["both"]["assigned"] == [0, 1]
    wait_for(manager, lambda: state(manager, "later") == "ended")
    assert manager.snapshot()["later"]["started"] >= manager.snapshot()["both"]["ended"]
    # a sweep waits for every GPU, and holds them back
    manager.submit_run("g1", json.dumps({"epochs": 500}), gpus=[1])
    manager.submit_sweep("sw", tmp_path / "none.yaml")
    manager.submit_run("after", json.dumps({"epochs": 1}), gpus=[0])
    assert [state(manager, n) for n in ("g1", "sw", "after")] == ["running", "queued", "queued"]
    manager.stop("g1")
    wait_for(manager, lambda: state(manager, "after") == "ended")
    assert manager.snapshot()["sw"]["assigned"] == [0, 1]
    assert manager.snapshot()["after"]["started"] >= manager.snapshot()["sw"]["started"]


def test_cpu_sweep_holds_back_the_cpu_slots(tmp_path, make_manager):
    manager = make_manager(cpu_slots=2)
    manager.submit_run("a", json.dumps({"epochs": 500}))
    manager.submit_sweep("sw", tmp_path / "none.yaml")
    manager.submit_run("b", json.dumps({"epochs": 1}))  # a slot is free, but the sweep waits for both
    assert [state(manager, n) for n in ("a", "sw", "b")] == ["running", "queued", "queued"]
    manager.stop("a")
    wait_for(manager, lambda: state(manager, "b") == "ended")
    assert manager.snapshot()["b"]["started"] >= manager.snapshot()["sw"]["started"]


def test_stop_never_signals_a_reused_pid(tmp_path, make_manager):
    """A job whose PID now names another process is marked ended, and that process is left alone."""
    import subprocess

    manager = make_manager()
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        start = jobs._stat(other.pid)[2]
        for state_ in ("running", "stopping"):
            manager._jobs["gone"] = jobs.Job(name="gone", state=state_, pid=other.pid, pid_start=start + 1,
                                             assigned=[], started=time.time() - 10, stop_sent=time.time())
            assert manager.stop("gone").startswith("gone: had already ended")
            time.sleep(0.1)
            assert other.poll() is None, "stop signalled a process that is not its job"
            assert state(manager, "gone") == "ended"
    finally:
        other.kill()
        other.wait()


def test_stop_and_resume_buttons_follow_the_run_status(tmp_path, make_manager):
    manager = make_manager()
    h = Handlers(tmp_path / "specs", tmp_path / "runs", manager)
    manager.submit_run("r", json.dumps({"epochs": 500}))
    wait_for(manager, lambda: (tmp_path / "runs" / "r" / "summary.json").exists())
    stop, resume = h.run_panel("r")[9:11]
    assert stop == {"interactive": True, "variant": "stop", "__type__": "update"} and resume["interactive"] is False
    manager.stop("r")
    wait_for(manager, lambda: state(manager, "r") == "ended")
    stop, resume = h.run_panel("r")[9:11]
    assert stop["interactive"] is False and stop["variant"] == "secondary" and resume["interactive"] is True
    manager.submit_run("done", json.dumps({"epochs": 1}))
    wait_for(manager, lambda: state(manager, "done") == "ended")
    stop, resume = h.run_panel("done")[9:11]
    assert (stop["interactive"], stop["variant"], resume["interactive"]) == (False, "secondary", False)


# ------------------------------------------------------------------------------------ usability fixes
def test_loss_terms_are_drawn_weighted_so_they_add_up():
    spec = {"name": "s", "loss": [{"method": "ce"}, {"method": "at", "weight": 1000},
                                  {"method": "kd", "warmup_epochs": 2}, {"method": "kd", "weight": 0.5}]}
    weights = runs.term_weights(spec)
    assert weights == {"ce": (1.0, 0.0), "at": (1000.0, 0.0), "kd": (0.9, 2.0), "kd_1": (0.5, 0.0)}
    metrics = [{"epoch": e, "loss/ce": 2.0, "loss/at": 0.01, "loss/kd": 1.0, "loss/kd_1": 4.0, "test_loss": 3.0,
                "loss": 2.0 + 10.0 + 0.9 * min(1.0, (e - 0.5) / 2) + 2.0} for e in (1, 2, 3)]
    loss, _ = runs.curves(metrics, weights)
    series = {r["series"] for r in loss}
    assert series == {"loss", "test_loss", "1·ce", "1000·at", "≈0.9·kd", "0.5·kd_1"}
    for e in (1, 2, 3):
        parts = sum(r["value"] for r in loss if r["epoch"] == e and r["series"] not in ("loss", "test_loss"))
        total = next(r["value"] for r in loss if r["epoch"] == e and r["series"] == "loss")
        assert parts == pytest.approx(total)
    assert runs.term_weights(None) == {} and runs.curves(metrics)[0][0]["series"].startswith("loss")
    assert runs.accuracy_title([{"series": "test_top1"}]) == "top-1 (%)"
    assert runs.accuracy_title([{"series": "test_top1"}, {"series": "test_top5"}]) == "top-1 / top-5 (%)"


def test_an_exact_tap_name_comes_before_the_names_containing_it():
    names = ["conv1", "block2.0.bn1", "block2.0", "block2:pre", "block2", "block20", "fc"]
    ordered = forms.tap_choices(names)
    assert sorted(ordered) == sorted(names)
    typed = "block2"  # the dropdown picks the first choice containing the typed text on Enter
    assert next(n for n in ordered if typed in n) == "block2"
    assert next(n for n in ordered if "block2.0" in n) == "block2.0"
    assert forms.tap_choices(["a", "b", "c"]) == ["a", "b", "c"]  # otherwise the graph order


def test_the_form_is_remembered_and_restored(tmp_path, make_manager):
    h = Handlers(tmp_path / "specs", tmp_path / "runs", make_manager())
    form = {**forms.spec_to_form(forms.NEW_SPEC), "name": "unsaved-work"}
    saved = json.loads(json.dumps(h.remember("unsaved-work.yaml", *h.values(form))))  # as the browser keeps it
    restored = h.restore(saved)
    assert list(restored[:len(forms.FIELDS)]) == json.loads(json.dumps(h.values(form)))
    assert restored[len(forms.FIELDS)] == "unsaved-work.yaml" and "restored" in restored[-1]
    for nothing in (None, {}, {"form": {"name": "x"}}):  # nothing kept, or another layout: no change
        assert all(v == gr.skip() for v in h.restore(nothing))


def test_weights_are_written_as_integers_when_integral():
    form = forms.spec_to_form({**forms.NEW_SPEC, "loss": [{"method": "at", "weight": 1000.0}]})
    assert form["loss.0.weight"] == "1000"
    data, problems = forms.form_to_spec(form)
    assert not problems and data["loss"][0]["weight"] == 1000 and "weight: 1000," in forms.spec_yaml(data)
    assert forms.form_to_spec({**form, "loss.0.weight": "0.5"})[0]["loss"][0]["weight"] == 0.5
    assert Handlers.method_changed("at", [])[0] == "1000"


def test_elapsed_time_never_goes_back_when_a_run_stops():
    job = {"state": "stopping", "started": 100.0, "base_seconds": 0.0}
    summary = {"epochs": 5, "epochs_done": 2, "wall_seconds": 22.0}
    stopping = runs.progress(summary, [], job, now=127.0)["elapsed"]
    stopped = runs.progress(summary, [], {**job, "state": "ended", "ended": 128.0, "exit": 130}, now=200.0)["elapsed"]
    assert stopping == 27.0 and stopped == 28.0
    assert runs.progress(summary, [], None)["elapsed"] == 22.0  # a run the UI did not start: its summary


def _run(tmp_path, name, summary, log=""):
    d = tmp_path / "runs" / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "log.txt").write_text(log)
    return d


def test_run_view_says_latest_top1_teacher_first_and_chance_level(tmp_path):
    runs_dir = tmp_path / "runs"
    teacher = _run(tmp_path, "t", {"status": "running", "epochs": 30, "epochs_done": 7})
    log = f"kdgraph run\nteacher: training t first (from_spec) into {teacher}\n"
    _run(tmp_path, "s", {"status": "running", "epochs": 3, "epochs_done": 0}, log)
    job = {"state": "running", "started": time.time()}
    md = runs.run_view(runs_dir, "s", job)["markdown"]
    assert "training its teacher first: **t**, epoch 7/30" in md and "select run `t`" in md
    _run(tmp_path, "going", {"status": "running", "epochs": 3, "epochs_done": 1, "final_top1": 12.0,
                             "teacher_top1": 10.5, "dataset": "cifar10"})
    md = runs.run_view(runs_dir, "going", job)["markdown"]
    assert "latest top-1 12.00%" in md and "final top-1" not in md
    assert "the teacher is at chance level" in md  # 10.5 <= 100/10 + 2
    _run(tmp_path, "done", {"status": "finished", "epochs": 3, "epochs_done": 3, "final_top1": 60.0,
                            "teacher_top1": 75.0, "dataset": "cifar10"})
    md = runs.run_view(runs_dir, "done", None)["markdown"]
    assert "final top-1 60.00%" in md and "chance level" not in md
    assert runs.chance_note({"teacher_top1": 1.0, "dataset": "package.module:callable"}) is None
    assert runs.chance_note({"teacher_top1": 2.5, "dataset": "cifar100"}) is not None


# ------------------------------------------------------------------------ validation where the mistake is
def test_an_unreadable_value_stays_in_the_spec_and_is_marked_at_its_field(tmp_path):
    form = forms.spec_to_form({**forms.NEW_SPEC, "teacher": {"model": "wrn-16-2", "checkpoint": "t.pt"},
                               "loss": [{"method": "ce"}, {"method": "kd"}, {"method": "at"}]})
    form["loss.1.weight"] = "abc"
    form["loss.2.params"] = [["p", "[2", "2.0"]]
    form["data.batch_size"] = 64
    text, problems, form_problems = forms.preview(form, tmp_path / "f.yaml")
    data = yaml_load(text)
    assert [t["method"] for t in data["loss"]] == ["ce", "kd", "at"]  # no term dropped: indices stay right
    assert data["loss"][1]["weight"] == "abc" and data["loss"][2]["p"] == "[2"
    assert [k for k, _ in form_problems] == ["loss.1.weight", "loss.2.params"]
    assert any(p[3] == "loss.1.weight" for p in problems)  # the validator names the same term
    errors = fielderrors.field_errors(problems, form_problems, form)
    assert set(errors) >= {"loss.1.weight", "loss.2.params"}
    assert errors["loss.1.weight"] == ["'abc' is not a number (leave it empty for the default)"]
    line = forms.preview_line(next(p for p in problems if p[3] == "loss.1.weight"), tmp_path / "f.yaml")
    assert line.startswith("line ") and "f.yaml" not in line  # the preview's lines, not an unsaved file
    css = fielderrors.error_css({"name": ["</style><script>x</script> \"quoted\"\nnext"]})
    assert "<script>" not in css and css.count("</style>") == 1 and "#name::after" in css


@pytest.mark.parametrize("path,field", [
    ("loss.1.weight", "loss.1.weight"), ("loss.0.temperature", "loss.0.params"), ("loss.2", "loss.2.method"),
    ("loss.0.positions.1.0", "loss.0.pairs"), ("loss.1.positions", "loss.1.positions"),
    ("data.options.size", "data.options"), ("train.optimizer.lr", "train.optimizer.lr"), ("teacher", None),
    ("", None), ("loss.9.weight", "loss.count")])
def test_each_key_path_has_its_field(path, field):
    form = {"loss.0.positions": "pairs", "loss.1.positions": "auto"}
    assert fielderrors.field_of(path, form) == field


def test_the_at_weight_hint_accounts_for_map_sizes():
    digits = forms.spec_to_form({**forms.NEW_SPEC, "teacher": {"model": "wrn-16-2", "checkpoint": "t.pt"},
                                 "loss": [{"method": "ce"}, {"method": "at"}]})
    teacher, student, _ = forms.form_layers(digits)
    info = forms.term_info(digits, 1, teacher, student)
    # 16x16 digits: maps 16x16, 8x8, 4x4 -- 4 times the loss of CIFAR's 32x32, 16x16, 8x8 (README: at on digits)
    assert "acts like 4000" in info and "**250** here matches the canonical weight" in info
    cifar = {**digits, "data.dataset": "cifar10"}
    teacher, student, _ = forms.form_layers(cifar)
    assert "weight for these maps" not in forms.term_info(cifar, 1, teacher, student)
    assert "weight for these maps" not in forms.term_info({**digits, "loss.1.method": "fitnet"}, 1, *forms.form_layers(
        digits)[:2])  # fitnet's loss is a mean: no hint


# ------------------------------------------------------------------------------- the Runs tab, consistent
def test_running_runs_come_first_and_device_and_elapsed_read_alike(tmp_path, make_manager):
    runs_dir = tmp_path / "runs"
    _run(tmp_path, "old-running", {"status": "running", "epochs": 3})  # a CLI run that died long ago
    os.utime(runs_dir / "old-running" / "summary.json", (time.time() - 1000,) * 2)
    os.utime(runs_dir / "old-running" / "log.txt", (time.time() - 1000,) * 2)
    os.utime(runs_dir / "old-running", (time.time() - 1000,) * 2)
    _run(tmp_path, "live", {"status": "running", "epochs": 3})
    _run(tmp_path, "just-finished", {"status": "finished", "epochs": 3, "device": "cpu", "wall_seconds": 5})
    os.utime(runs_dir / "live" / "summary.json", (time.time() - 30,) * 2)
    os.utime(runs_dir / "live" / "log.txt", (time.time() - 30,) * 2)
    assert runs.run_names(runs_dir, {})[0] == "live"  # the running one, not the one that just finished
    job = {"kind": "run", "state": "ended", "assigned": [], "started": 100.0, "ended": 112.0, "exit": 0,
           "base_seconds": 0.0}
    row = runs.runs_table(runs_dir, {"just-finished": job})
    finished = next(r for r in row if r[0] == "just-finished")
    view = runs.run_view(runs_dir, "just-finished", job)
    assert finished[9] == "cpu" and "device: cpu" in view["markdown"]  # one spelling
    assert finished[10] == "0:00:12" and "elapsed 0:00:12" in view["markdown"]  # one clock


def test_a_resumed_runs_clock_goes_on(tmp_path, make_manager):
    manager = make_manager()
    previous = jobs.Job(name="r", started=100.0, ended=190.0, base_seconds=10.0)
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "summary.json").write_text(json.dumps({"wall_seconds": 80.0}))
    assert manager._elapsed(previous, tmp_path / "runs" / "r") == 100.0  # 10 + 90 s of process, not 80
    assert manager._elapsed(None, tmp_path / "runs" / "r") == 80.0


def test_compare_overlays_runs_per_epoch_and_per_step(tmp_path):
    runs_dir = tmp_path / "runs"
    for name, top1 in (("a", 50.0), ("b", 70.0)):
        d = _run(tmp_path, name, {"status": "finished", "epochs": 2})
        (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": 1.0 / e, "loss/at": 0.1,
                                                             "test_top1": top1 + e}) + "\n" for e in (1, 2)))
        (d / "steps.jsonl").write_text("".join(json.dumps({"step": s, "epoch": s / 4, "loss": 2.0 / s}) + "\n"
                                               for s in range(1, 9)))
    choices = [v for _, v in runs.compare_metrics(runs_dir, ["a", "b"])]
    assert choices[:3] == ["test_top1", "loss", "step:loss"] and "loss/at" in choices
    svg = runs.compare_chart(runs_dir, ["a", "b", "a", "../x"], "test_top1")
    assert re.findall(r'class="series" data-label="([^"]+)"', svg) == ["a", "b"]
    steps = runs.compare_chart(runs_dir, ["a", "b"], "step:loss", smoothing=0.5)
    assert steps.count('class="series faint"') == 2 and steps.count('class="series"') == 2
    assert runs.tensorboard_command(runs_dir, ["a"]) is None
    (runs_dir / "a" / "tb").mkdir()
    (runs_dir / "b" / "tb").mkdir()
    assert runs.tensorboard_command(runs_dir, ["a"]) == f"tensorboard --logdir {(runs_dir / 'a' / 'tb').resolve()}"
    assert "--logdir_spec" in runs.tensorboard_command(runs_dir, ["a", "b"])


def test_the_log_view_keeps_its_end_in_sight():
    html_ = runs.log_html("=== attempt 1\nTraceback (most recent call last):\n" + "x\n" * 500 + "=== attempt 2\nok <b>")
    assert "column-reverse" in html_ and "<b>=== attempt 2</b>" in html_ and "ok &lt;b&gt;" in html_
