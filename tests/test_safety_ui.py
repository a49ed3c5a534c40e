"""The UI's threat model (issue: safe specs and nothing lost): no import of a module a spec names unless the
operator allowed its package, no request with a foreign ``Host`` (DNS rebinding), and no path argument of
any endpoint reaching outside the specs and runs folders (symbolic links followed). One class per group.
"""
from __future__ import annotations

import json
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the UI needs gradio (pip install 'kdgraph[ui]')")

from kdgraph.app.cli import main  # noqa: E402
from kdgraph.errors import UserError  # noqa: E402
from kdgraph.registry import import_policy, import_policy_scope  # noqa: E402
from kdgraph.ui import app as ui_app, forms, jobs, runs  # noqa: E402
from kdgraph.ui.handlers import TERM_VIEW_KEYS, TRACE_KEYS, Handlers  # noqa: E402

EVIL = """\
import os
from pathlib import Path
Path(os.environ["FZ_MARK"]).write_text("imported")


def net(num_classes=10, command=""):
    os.system(command)
    import torch.nn as nn
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))
"""


@pytest.fixture
def ui(tmp_path, monkeypatch):
    """Handlers over ``tmp_path/specs`` and ``tmp_path/runs`` (a manager that launches nothing), a module
    ``fz_ui_evil`` that leaves a marker when imported, and a secret file outside both folders."""
    (tmp_path / "specs").mkdir()
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "fz_ui_evil.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.setenv("FZ_MARK", str(tmp_path / "imported"))
    (tmp_path / "secret.yaml").write_text("S3CRET_KEY: 1\n")
    manager = jobs.JobManager(tmp_path / "runs", cpu_slots=1, gpu_count=0, background=False,
                              engine=[sys.executable, "-c", "pass"])
    yield Handlers(tmp_path / "specs", tmp_path / "runs", manager)
    manager.close()
    sys.modules.pop("fz_ui_evil", None)


def form_with(**values) -> list:
    form = forms.spec_to_form(forms.NEW_SPEC)
    form.update(values)
    return [form[k] for k in forms.FIELDS]


class TestImports:
    def test_preview_and_trace_never_import_what_the_operator_did_not_allow(self, ui, tmp_path):
        values = form_with(**{"student.model": "fz_ui_evil:net",
                              "student.kwargs": f"{{command: 'touch {tmp_path / 'pwned'}'}}"})
        with import_policy_scope((), "kdgraph ui: without --allow-imports"):
            _, problems, _ = ui.preview("spec.yaml", *values)
            form = dict(zip(forms.FIELDS, values))
            ui.trace("", False, *[form[k] for k in TRACE_KEYS])
            ui.term_views(*[form[k] for k in TERM_VIEW_KEYS])
        assert "without --allow-imports" in problems
        assert not (tmp_path / "imported").exists() and not (tmp_path / "pwned").exists()

    def test_os_system_is_refused_even_when_allowed(self, ui, tmp_path):
        values = form_with(**{"student.model": "os:system", "student.kwargs": f"{{command: 'touch {tmp_path / 'x'}'}}"})
        with import_policy_scope(["os", "fz_ui_evil"], "kdgraph ui --allow-imports os,fz_ui_evil"):
            _, problems, _ = ui.preview("spec.yaml", *values)
        assert "never the standard library" in problems and not (tmp_path / "x").exists()

    def test_an_allowed_package_is_imported(self, ui, tmp_path):
        values = form_with(**{"student.model": "fz_ui_evil:net"})
        with import_policy_scope(["fz_ui_evil"], "kdgraph ui --allow-imports fz_ui_evil"):
            ui.preview("spec.yaml", *values)
        assert (tmp_path / "imported").exists()

    def test_kdgraph_ui_sets_the_policy_and_passes_it_to_its_runs(self, monkeypatch):
        seen, serve = {}, ui_app.serve
        monkeypatch.setattr(ui_app, "create", lambda *a, **k: (_ for _ in ()).throw(SystemExit(0)))
        monkeypatch.setattr(ui_app, "serve", lambda **kw: seen.update(kw))
        with import_policy_scope(None):
            assert main(["ui", "--allow-imports", "mypkg,other", "--allowed-hosts", "box.lan"]) == 0
        assert seen["allow_imports"] == ["mypkg", "other"] and seen["allowed_hosts"] == ["box.lan"]
        with import_policy_scope(None):
            with pytest.raises(SystemExit):
                serve(allow_imports=())
            assert import_policy()[0] == ()  # without --allow-imports: nothing
            from kdgraph.app.launch import policy_options
            assert policy_options() == ["--no-imports"]
            with pytest.raises(SystemExit):
                serve(allow_imports=["mypkg"])
            assert policy_options() == ["--allow-imports", "mypkg"]

    def test_runs_started_from_the_ui_get_its_policy(self, ui):
        with import_policy_scope(["mypkg"], "kdgraph ui --allow-imports mypkg"):
            run = ui.manager._command(jobs.Job(name="r", spec="s.yaml"), [])
            sweep = ui.manager._command(jobs.Job(name="s", kind="sweep", spec="s.yaml"), [])
        assert run[-2:] == sweep[-2:] == ["--allow-imports", "mypkg"]
        with import_policy_scope((), "kdgraph ui"):
            assert ui.manager._command(jobs.Job(name="r", spec="s.yaml"), [])[-1] == "--no-imports"


class TestPaths:
    @pytest.mark.parametrize("choice", ["../secret.yaml", "/etc/passwd", "{root}/secret.yaml", "link.yaml"])
    def test_load_spec_stays_in_the_specs_folder(self, ui, tmp_path, choice):
        (tmp_path / "specs" / "link.yaml").symlink_to(tmp_path / "secret.yaml")
        out = ui.load(choice.format(root=tmp_path))
        assert "outside" in str(out[-1]) or "no spec file" in str(out[-1]), out[-1]
        assert "S3CRET" not in json.dumps(out, default=str)

    @pytest.mark.parametrize("name", ["../secret.yaml", "/etc/x.yaml", "link.yaml"])
    def test_start_sweep_stays_in_the_specs_folder(self, ui, tmp_path, name):
        (tmp_path / "specs" / "link.yaml").symlink_to(tmp_path / "secret.yaml")
        message, _ = ui.start_sweep(name)
        assert message.startswith("⚠") and "S3CRET" not in message and not ui.manager.snapshot()

    def test_save_never_writes_through_a_link(self, ui, tmp_path):
        (tmp_path / "specs" / "evil.yaml").symlink_to(tmp_path / "secret.yaml")
        message, _ = ui.save("evil.yaml", True, *form_with())
        assert message.startswith("⚠") and (tmp_path / "secret.yaml").read_text() == "S3CRET_KEY: 1\n"

    def test_runs_named_by_a_link_are_refused(self, ui, tmp_path):
        (tmp_path / "runs").mkdir(exist_ok=True)
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "summary.json").write_text('{"status": "finished", "name": "x"}')
        (tmp_path / "runs" / "linked").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(UserError, match="outside"):
            runs.run_view(tmp_path / "runs", "linked", None)
        with pytest.raises(UserError, match="outside"):
            ui.manager.submit_run("linked", "{}", overwrite=True)
        assert (tmp_path / "elsewhere" / "summary.json").exists()

    @pytest.mark.parametrize("key, value", [("teacher.from_spec", "{root}/secret.yaml"),
                                            ("teacher.from_spec", "../secret.yaml#x"),
                                            ("teacher.checkpoint", "/etc/passwd")])
    def test_files_a_form_names_stay_in_the_folders(self, ui, tmp_path, key, value):
        values = form_with(**{"teacher.model": "wrn-10-1", key: value.format(root=tmp_path)})
        _, problems, _ = ui.preview("spec.yaml", *values)
        assert "outside the specs folder" in problems and "S3CRET" not in problems
        message = ui.start("spec.yaml", [], False, *values)[0]
        assert message.startswith("⚠") and not ui.manager.snapshot()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestHosts:
    def test_requests_for_another_host_are_refused(self, tmp_path):
        demo, manager = ui_app.create(tmp_path / "runs", tmp_path / "specs")
        port = _free_port()
        try:
            ui_app.launch(demo, tmp_path / "runs", port=port, prevent_thread_lock=True, allowed_hosts=["box.lan"])

            def status(host: str) -> int:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/config", headers={"Host": host})
                try:
                    return urllib.request.urlopen(request, timeout=30).status
                except urllib.error.HTTPError as e:
                    return e.code
            assert status(f"127.0.0.1:{port}") == 200 and status(f"localhost:{port}") == 200
            assert status(f"box.lan:{port}") == 200
            assert status(f"evil.example:{port}") == 400 and status("attacker.rebind.network") == 400
        finally:
            demo.close()
            manager.close()

    def test_host_names(self):
        assert set(ui_app.host_names("127.0.0.1")) == {"127.0.0.1", "localhost"}
        assert "box.lan" in ui_app.host_names("127.0.0.1", ["box.lan"])
        assert socket.gethostname() in ui_app.host_names("0.0.0.0")
