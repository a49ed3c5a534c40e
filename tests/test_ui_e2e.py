"""The web UI end to end: the app served on a free port, driven with gradio_client (build, validate, run,
stop, resume, sweep) and in a real browser with Playwright and Debian's chromium.

Set KDGRAPH_SCREENSHOT=PATH to keep the browser test's screenshot there (default: a file in the temp folder).
"""
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio", reason="the UI needs gradio: pip install 'kdgraph[ui]'")
gradio_client = pytest.importorskip("gradio_client", reason="the end-to-end UI tests need gradio_client")

from kdgraph.ui import jobs  # noqa: E402
from kdgraph.ui.app import create, launch  # noqa: E402
from kdgraph.ui.forms import FIELDS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")  # pandas 3 deprecations in gradio

CHROMIUM = "/usr/bin/chromium"
SWEEP_SPEC = """name: e2e-sweep
data: {dataset: digits, batch_size: 64, workers: 0}
student: {model: wrn-10-1}
train: {epochs: 1, max_steps_per_epoch: 3}
log: {tensorboard: false}
sweep:
  train.seed: [0, 1]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The UI on a free port with two CPU slots, over empty runs and specs folders."""
    root = tmp_path_factory.mktemp("ui")
    runs_dir, specs_dir = root / "runs", root / "specs"
    demo, manager = create(runs_dir, specs_dir, cpu_slots=2)
    port = free_port()
    try:
        launch(demo, runs_dir, port=port, prevent_thread_lock=True)
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", runs=runs_dir, specs=specs_dir, manager=manager)
    finally:
        demo.close()
        for job in manager.snapshot().values():
            if job["state"] in ("running", "stopping") and jobs._alive(job["pid"], job["pid_start"]):
                jobs.kill_tree(job["pid"])
        manager.close()


def poll(what, until, timeout=150.0, every=0.25):
    """Call ``what()`` until ``until(result)``; the last result."""
    end = time.time() + timeout
    while True:
        result = what()
        if until(result) or time.time() > end:
            assert until(result), f"timed out waiting; last: {json.dumps(result, default=str)[-3000:]}"
            return result
        time.sleep(every)


def test_client_builds_validates_runs_stops_and_resumes(app):
    client = gradio_client.Client(app.url, verbose=False)
    values = client.predict(api_name="/new_spec")
    form = list(values[:len(FIELDS)])

    def put(key, value):
        form[FIELDS.index(key)] = value

    put("name", "e2e-digits")
    put("train.epochs", 2)
    put("train.max_steps_per_epoch", "5")
    put("log.tensorboard", False)
    text, problems = client.predict("e2e-digits.yaml", *form, api_name="/preview")
    assert problems == "valid" and "max_steps_per_epoch: 5" in text
    bad = list(form)
    bad[FIELDS.index("student.model")] = "wrn-15-2"
    problems = client.predict("e2e-digits.yaml", *bad, api_name="/preview")[1]
    assert problems.startswith(f"{app.specs / 'e2e-digits.yaml'}:3:") and "student.model: Wide ResNet depth" in problems

    message = client.predict("e2e-digits.yaml", [], False, *form, api_name="/start_run")[0]
    assert message.startswith("e2e-digits: ")
    status = poll(lambda: client.predict("e2e-digits", api_name="/run_status"),
                  lambda s: s.get("status") in ("finished", "failed"))
    assert status["status"] == "finished", status["log"]
    assert status["summary"]["epochs_done"] == 2 and status["summary"]["best_top1"] is not None
    assert [m["epoch"] for m in status["metrics"]] == [1, 2] and status["exit"] == 0

    # another run, long enough to be caught mid-epoch: stopped, it saves a checkpoint; resumed, it finishes
    put("name", "e2e-stop")
    put("data.dataset", "fake")
    put("data.options", "{train_size: 8192, test_size: 64, image_size: [3, 16, 16]}")
    put("data.batch_size", 16)
    put("train.epochs", 1)
    put("train.max_steps_per_epoch", "")
    put("log.every", 5)
    assert client.predict("e2e-stop.yaml", *form, api_name="/preview")[1] == "valid"
    client.predict("e2e-stop.yaml", [], False, *form, api_name="/start_run")
    poll(lambda: client.predict("e2e-stop", api_name="/run_status"), lambda s: "step 5/512" in s.get("log", ""))
    assert client.predict("e2e-stop", api_name="/stop_run").startswith("e2e-stop: asked to stop")
    status = poll(lambda: client.predict("e2e-stop", api_name="/run_status"),
                  lambda s: s.get("status") not in ("running", "stopping"))
    assert status["status"] == "stopped" and status["exit"] == 130, status["log"]
    assert (app.runs / "e2e-stop" / "checkpoints" / "last.pt").exists() and status["can_resume"]
    assert "stopped; resume with" in status["log"]
    assert client.predict("e2e-stop", api_name="/resume_run").startswith("e2e-stop: resuming")
    status = poll(lambda: client.predict("e2e-stop", api_name="/run_status"),
                  lambda s: s.get("status") in ("finished", "failed"))
    assert status["status"] == "finished", status["log"]
    assert "resuming" in (app.runs / "e2e-stop" / jobs.OUTPUT_LOG).read_text()

    table = client.predict(api_name="/runs")
    assert {row[0]: row[1] for row in table["data"]} == {"e2e-stop": "finished", "e2e-digits": "finished"}


def test_client_runs_a_sweep_and_gets_its_heatmap(app):
    (app.specs / "e2e-sweep.yaml").write_text(SWEEP_SPEC)
    client = gradio_client.Client(app.url, verbose=False)
    message = client.predict("e2e-sweep.yaml", api_name="/start_sweep")[0]
    assert message.startswith("sweep e2e-sweep: ")
    view = poll(lambda: client.predict("e2e-sweep", api_name="/sweep_status"), lambda v: v["heatmap"] is not None)
    assert view["header"] == ["seed", "best top-1"] and [r[0] for r in view["rows"]] == ["0", "1"]
    assert all(r[1] for r in view["rows"]) and "2 cells: 2 finished" in view["markdown"]
    assert Path(view["heatmap"]).exists()


def test_browser_picks_models_sees_layers_starts_a_run_and_its_curve(app, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (pip)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"the browser test needs Debian's chromium at {CHROMIUM} (apt-get install chromium); "
                    f"`playwright install` cannot download browsers here")
    import torch

    from kdgraph.models import build_model

    teacher = tmp_path / "teacher.pt"
    torch.save(build_model("wrn-16-2", num_classes=10).state_dict(), teacher)
    expect = sync_api.expect
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(app.url)
            expect(page.locator("#problems textarea")).to_have_value("valid", timeout=30000)

            def pick(elem_id, value):
                box = page.locator(f"#{elem_id} input")
                box.click()
                box.fill(value)
                box.press("Enter")

            def fill(elem_id, value):
                box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
                box.fill(value)
                box.press("Tab")

            pick("teacher-model", "wrn-16-2")
            pick("student-model", "wrn-16-1")
            fill("layer-filter", "block3.0.relu1")
            for table in ("#teacher-layers", "#student-layers"):
                expect(page.locator(table)).to_contain_text("block3.0.relu1:pre", timeout=30000)
            pick("teacher-checkpoint", str(teacher))
            fill("name", "browser-run")
            fill("train-epochs", "2")
            fill("train-max_steps_per_epoch", "3")
            expect(page.locator("#yaml-preview")).to_contain_text("max_steps_per_epoch: 3", timeout=30000)
            expect(page.locator("#load-choice input")).to_have_value("")  # no spec picked for you
            page.wait_for_timeout(1500)  # the form reaches the browser's storage
            page.reload()  # unsaved work survives a reload
            expect(page.locator("#name input, #name textarea").first).to_have_value("browser-run", timeout=30000)
            expect(page.locator("#build-message")).to_contain_text("restored", timeout=30000)
            expect(page.locator("#yaml-preview")).to_contain_text("max_steps_per_epoch: 3", timeout=30000)
            expect(page.locator("#yaml-preview")).to_contain_text("teacher.pt", timeout=30000)
            page.locator("#add-term").click()
            expect(page.locator("#loss-1-info")).to_contain_text("works on the logits", timeout=30000)
            expect(page.locator("#yaml-preview")).to_contain_text("method: kd", timeout=30000)
            expect(page.locator("#problems textarea")).to_have_value("valid", timeout=30000)
            page.locator("#start-button").click()
            expect(page.locator("#run-status")).to_contain_text("browser-run", timeout=30000)
            expect(page.locator("#run-status")).to_contain_text("finished", timeout=120000)
            expect(page.locator("#stop-button")).to_be_disabled(timeout=10000)  # a finished run: nothing to
            expect(page.locator("#resume-button")).to_be_disabled(timeout=10000)  # stop or resume
            expect(page.locator("#accuracy-plot")).to_contain_text("test_top1", timeout=30000)
            expect(page.locator("#accuracy-plot svg .mark-line path")).to_have_count(2, timeout=30000)
            expect(page.locator("#runs-table")).to_contain_text("browser-run", timeout=30000)
            shot = tmp_path / "kdgraph-ui.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    keep = Path(os.environ.get("KDGRAPH_SCREENSHOT") or Path(tempfile.gettempdir()) / "kdgraph-ui-screenshot.png")
    keep.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, keep)
    print(f"screenshot: {keep} (and {shot})")
