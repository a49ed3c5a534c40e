"""Every bad spec ends in a located message before any work (issue: safe specs and nothing lost).

One class per group of probes: spec files (size, encoding, nesting, aliases), ``extends``, a teacher's
sources (two of them, checkpoint files, ``from_spec`` cycles and references), parameter ranges (terms,
data options, model arguments), positions a method cannot pair, the import policy (``--no-imports``,
allow-lists), and a generated corpus of mutated specs (``tests/fuzz_specs.py``) in which every case must
exit 2 with ``FILE:LINE:COL`` problems or pass, never raise, never hang.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

from kdgraph import spec as specs
from kdgraph.app.cli import main
from kdgraph.errors import SpecError, UserError
from kdgraph.models import build_model
from kdgraph.registry import import_object, import_policy_scope
from kdgraph.spec.check import validate

from . import fuzz_specs

# FILE:LINE:COL: key.path: message; a key that is not plain text is JSON-quoted in the path
PROBLEM = re.compile(r'^(?P<file>[^\n]+?):(?P<line>\d+):(?P<col>\d+): (?P<path>(?:[^:\s"]|"(?:[^"\\]|\\.)*")+): '
                     r'(?P<msg>.+)$')
HANG_GUARD_S = 60  # a case that has not ended by then hangs (each ends in well under a second)


@contextlib.contextmanager
def hang_guard(seconds: float = HANG_GUARD_S):
    """Fail a case that never returns (a billion-laughs file, /dev/zero), instead of hanging the suite."""
    def alarm(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_cli(args, capsys) -> tuple[int, str, str]:
    with hang_guard():
        code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def located(err: str) -> list[dict]:
    """Every line of ``err`` is a ``FILE:LINE:COL: key.path: message`` problem (and there is one at least)."""
    lines = [line for line in err.splitlines() if line.strip()]
    found = [PROBLEM.match(line) for line in lines]
    assert lines and all(found), f"not FILE:LINE:COL: key.path: message lines:\n{err}"
    return [{**m.groupdict(), "line": int(m["line"]), "col": int(m["col"])} for m in found]


def problems_of(file: Path, *overrides: str) -> list[tuple]:
    with hang_guard():
        found, _ = validate(file, overrides)
    return found


def messages(found: list[tuple]) -> str:
    return "\n".join(f"{p[3]}: {p[4]}" for p in found)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A folder holding ``teacher.pt`` (wrn-10-1, 10 classes) and ``other.pt`` (wrn-16-1), as the current
    directory (spec checkpoints are relative to it, as in ``kdgraph run``)."""
    monkeypatch.chdir(tmp_path)
    _checkpoints(tmp_path)
    return tmp_path


def _checkpoints(folder: Path) -> None:
    torch.manual_seed(0)
    torch.save(build_model("wrn-10-1", num_classes=10).state_dict(), folder / "teacher.pt")
    torch.save(build_model("wrn-16-1", num_classes=10).state_dict(), folder / "other.pt")


def write(folder: Path, text: str, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


BASE = fuzz_specs.BASE


# ----------------------------------------------------------------------------------------- spec files
class TestSpecFiles:
    def test_dev_zero_and_big_files_end_at_once(self, workdir, capsys):
        code, out, err = run_cli(["validate", "/dev/zero"], capsys)
        assert code == 2 and "larger than" in err and "Traceback" not in out + err
        big = workdir / "big.yaml"
        big.write_bytes(BASE.encode() + b"description: " + b"x" * (2 << 20) + b"\n")
        assert "larger than" in messages(problems_of(big))

    def test_not_a_file(self, workdir, capsys):
        empty = workdir / "empty"
        empty.mkdir()
        code, _, err = run_cli(["validate", empty], capsys)
        assert code == 2 and "folder without spec files" in err and "Traceback" not in err
        code, _, err = run_cli(["validate", workdir / "nope.yaml"], capsys)
        assert code == 2 and "No such file" in err

    def test_binary_and_latin1_files_name_the_byte(self, workdir):
        (workdir / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
        ((_, line, col, _, msg),) = problems_of(workdir / "latin1.yaml")
        assert (line, col) == (1, 10) and "0xe9" in msg and "UTF-8" in msg
        (workdir / "bin.yaml").write_bytes(b"name: x\ndata: \x00\x01")
        ((_, line, col, _, msg),) = problems_of(workdir / "bin.yaml")
        assert (line, col) == (2, 7) and "binary" in msg

    def test_deep_nesting(self, workdir):
        write(workdir, "name: " + "[" * 10000 + "]" * 10000 + "\n")
        ((_, line, _, _, msg),) = problems_of(workdir / "spec.yaml")
        assert line == 1 and "nested more than" in msg

    def test_billion_laughs(self, workdir):
        lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
        write(workdir, "\n".join(lines) + "\n")
        (p,) = problems_of(workdir / "spec.yaml")
        assert "expands to more than" in p[4]

    @pytest.mark.parametrize("text", ["&a [*a]\n", "name: x\ndata: &d {dataset: digits, options: *d}\n"])
    def test_recursive_alias(self, workdir, text):
        write(workdir, text)
        (p,) = problems_of(workdir / "spec.yaml")
        assert "recursive alias" in p[4]

    def test_aliases_that_are_a_tree_still_work(self, workdir):
        write(workdir, BASE.replace("data: {", "data: &d {") + "description: x\n")
        assert problems_of(workdir / "spec.yaml") == []

    @pytest.mark.parametrize("text, expect", [
        ("name: x\n1: 2\n", "a key must be text"),
        ("name: x\n? [a]\n: 1\n", "a key must be text"),
        ("name: !!python/object/apply:os.system [ls]\n", "unsupported YAML"),
        ("name: !!timestamp nope\n", "not a valid timestamp"),
        ("name: !!binary 'a'\n", "unsupported YAML: failed to decode base64"),
        ("name: !!set {a, b}\n", "unsupported YAML"),
        ("- a\n- b\n", "a spec is a mapping"),
        ("name: [\n", "invalid YAML"),
    ])
    def test_yaml_that_is_not_a_spec(self, workdir, text, expect):
        write(workdir, text)
        found = problems_of(workdir / "spec.yaml")
        assert any(expect in p[4] for p in found), found

    @pytest.mark.parametrize("override, expect", [
        ("train.epochs=" + "[" * 5000, "not valid YAML"),
        ("train.optimizer.lr=.nan", "not a finite number"),
        ("=3", "not a key path"),
        ("a..b=3", "not a key path"),
        ("train.epochs=1\n---\n2", "documents"),
    ])
    def test_set_values_are_read_as_safely_as_files(self, workdir, capsys, override, expect):
        spec = write(workdir, BASE)
        code, out, err = run_cli(["validate", spec, "--set", override], capsys)
        assert code == 2 and expect in err and "Traceback" not in out + err

    def test_non_finite_numbers_anywhere(self, workdir):
        write(workdir, BASE.replace("lr: 0.05", "lr: .nan").replace("temperature: 4", "temperature: .inf"))
        found = problems_of(workdir / "spec.yaml")
        assert {p[3] for p in found} == {"train.optimizer.lr", "loss.1.temperature"}
        assert all("not a finite number" in p[4] for p in found)


# -------------------------------------------------------------------------------------------- extends
class TestExtends:
    @pytest.mark.parametrize("value", ["5", "[a.yaml]", "{a: 1}", "true", "''"])
    def test_extends_is_a_file_name(self, workdir, value):
        write(workdir, f"extends: {value}\n" + BASE)
        ((_, line, col, path, msg),) = problems_of(workdir / "spec.yaml")
        assert (line, col, path) == (1, 10, "extends") and "file name" in msg

    def test_self_and_cycles_are_errors(self, workdir):
        write(workdir, "extends: spec.yaml\n" + BASE)
        (p,) = problems_of(workdir / "spec.yaml")
        assert "circular extends" in p[4]
        write(workdir, "extends: b.yaml\n" + BASE)
        write(workdir, "extends: spec.yaml\n", "b.yaml")
        (p,) = problems_of(workdir / "spec.yaml")
        assert "circular extends" in p[4] and "b.yaml" in p[4]

    @pytest.mark.parametrize("target", ["nope.yaml", ".", "/dev/zero"])
    def test_missing_or_not_a_file(self, workdir, target):
        write(workdir, f"extends: {target}\n" + BASE)
        (p,) = problems_of(workdir / "spec.yaml")
        assert p[3] == "extends" and "does not exist" in p[4]


# ---------------------------------------------------------------------------------- teacher sources
class TestTeacherSources:
    def test_two_sources_name_both(self, workdir, capsys):
        spec = write(workdir, BASE)
        code, _, err = run_cli(["validate", spec, "--set", "teacher.from_spec=spec.yaml"], capsys)
        assert code == 2
        (p,) = [p for p in located(err) if "two sources" in p["msg"]]
        assert "checkpoint: 'teacher.pt'" in p["msg"] and "from_spec: 'spec.yaml'" in p["msg"]

    def test_two_sources_from_set_on_a_from_spec_teacher(self, workdir, capsys):
        write(workdir, fuzz_specs.RECIPE, "recipe.yaml")
        teacher, student = fuzz_specs.MULTI.split("---\n")
        write(workdir, teacher, "t.yaml")
        spec = write(workdir, student.replace("#fz-teacher", "t.yaml"))
        assert run_cli(["validate", spec], capsys)[0] == 0
        code, _, err = run_cli(["validate", spec, "--set", "teacher.checkpoint=/nonexistent.pt"], capsys)
        assert code == 2 and "/nonexistent.pt" in err and "from_spec" in err

    @pytest.mark.parametrize("ckpt, expect", [("nope.pt", "does not exist"), ("empty.pt", "cannot read"),
                                              ("damaged.pt", "cannot read"), ("other.pt", "do not match"),
                                              (".", "not a file")])
    def test_checkpoint_files_are_checked_by_validate(self, workdir, ckpt, expect):
        (workdir / "empty.pt").write_bytes(b"")
        (workdir / "damaged.pt").write_bytes((workdir / "teacher.pt").read_bytes()[:500])
        write(workdir, BASE.replace("checkpoint: teacher.pt", f"checkpoint: {ckpt}"))
        (p,) = problems_of(workdir / "spec.yaml")
        assert p[3] == "teacher.checkpoint" and expect in p[4]

    def test_a_missing_teacher_source(self, workdir):
        write(workdir, BASE.replace(", checkpoint: teacher.pt", ""))
        (p,) = problems_of(workdir / "spec.yaml")
        assert p[3] == "teacher" and "needs `checkpoint`" in p[4]

    def test_from_spec_naming_itself_or_a_cycle(self, workdir):
        write(workdir, BASE.replace("checkpoint: teacher.pt", "from_spec: '#fz'"))
        (p,) = problems_of(workdir / "spec.yaml")
        assert p[3] == "teacher.from_spec" and "cycle" in p[4]
        write(workdir, BASE.replace("checkpoint: teacher.pt", "from_spec: b.yaml"))
        write(workdir, BASE.replace("name: fz", "name: fz-b").replace("checkpoint: teacher.pt", "from_spec: spec.yaml"),
              "b.yaml")
        (p,) = problems_of(workdir / "spec.yaml")
        assert "cycle" in p[4] and "spec.yaml#fz -> b.yaml#fz-b -> spec.yaml#fz" in p[4]

    def test_from_spec_names_a_document_that_exists(self, workdir):
        write(workdir, fuzz_specs.RECIPE, "recipe.yaml")
        write(workdir, fuzz_specs.MULTI.replace("#fz-teacher", "#fz-teachr"))
        (p,) = problems_of(workdir / "spec.yaml")
        assert p[3] == "teacher.from_spec" and "no spec named 'fz-teachr'" in p[4] and "'fz-teacher'" in p[4]

    def test_from_spec_trains_the_teachers_model(self, workdir):
        write(workdir, fuzz_specs.RECIPE, "recipe.yaml")
        write(workdir, fuzz_specs.MULTI.replace("student: {model: resnet20}\n---", "student: {model: resnet32}\n---"))
        (p,) = problems_of(workdir / "spec.yaml")
        assert "trains 'resnet32' but teacher.model is 'resnet20'" in p[4]
        write(workdir, fuzz_specs.MULTI.replace("student: {model: resnet20}\n---",
                                                "student: {model: resnet20, kwargs: {widths: [16, 32, 32, 64]}}\n---"))
        found = problems_of(workdir / "spec.yaml")
        assert any(p[3] == "teacher.from_spec" and "do not match" in p[4] for p in found), found

    def test_the_teacher_spec_is_checked_too(self, workdir):
        write(workdir, fuzz_specs.RECIPE, "recipe.yaml")
        (workdir / "t.yaml").write_text(fuzz_specs.MULTI.split("---")[0] + "loss: [{method: ce, label_smoothing: 2}]\n")
        write(workdir, fuzz_specs.MULTI.split("---")[1].replace("#fz-teacher", "t.yaml"))
        found = problems_of(workdir / "spec.yaml")
        assert any(p[0].endswith("t.yaml") and p[3] == "loss.0.label_smoothing" for p in found), found


# -------------------------------------------------------------------------------- parameter ranges
class TestParameterRanges:
    @pytest.mark.parametrize("value, ok", [("0", False), ("hot", False), ("-4", False), ("true", False),
                                           ("1.0e-3", True), ("16", True)])
    def test_kd_temperature(self, workdir, value, ok):
        write(workdir, BASE.replace("temperature: 4", f"temperature: {value}"))
        found = problems_of(workdir / "spec.yaml")
        assert (found == []) == ok, found
        if not ok:
            (p,) = found
            assert p[3] == "loss.1.temperature" and "expected a number > 0" in p[4] and p[1] == 7

    @pytest.mark.parametrize("cfg, path", [
        ("{method: ce, weight: -0.1}", "loss.0.weight"),
        ("{method: ce, label_smoothing: 1.5}", "loss.0.label_smoothing"),
        ("{method: ce, warmup_epochs: -1}", "loss.0.warmup_epochs"),
        ("{method: at, p: 0}", "loss.0.p"),
        ("{method: dkd, beta: -8}", "loss.0.beta"),
        ("{method: rkd, angle_weight: '50'}", "loss.0.angle_weight"),
    ])
    def test_declared_ranges_of_the_built_in_methods(self, workdir, cfg, path):
        write(workdir, BASE.replace("  - {method: ce, weight: 0.1}", f"  - {cfg}"))
        found = problems_of(workdir / "spec.yaml")
        assert [p[3] for p in found] == [path], found

    def test_a_users_term_gets_its_annotations_checked(self, workdir):
        (workdir / "fz_terms.py").write_text(textwrap.dedent("""\
            from typing import Literal
            from kdgraph.losses import Term
            from kdgraph.params import Positive

            class Mine(Term):
                needs_teacher = False

                def __init__(self, weight=None, warmup_epochs=0.0, scale: Positive = 1.0,
                             mode: Literal["sum", "mean"] = "mean"):
                    super().__init__(weight, warmup_epochs)
        """))
        sys.path.insert(0, str(workdir))
        try:
            write(workdir, BASE.replace("  - {method: ce, weight: 0.1}",
                                        "  - {method: 'fz_terms:Mine', scale: 0, mode: max, weight: -1}"))
            found = problems_of(workdir / "spec.yaml")
        finally:
            sys.path.remove(str(workdir))
            sys.modules.pop("fz_terms", None)
        assert {p[3] for p in found} == {"loss.0.scale", "loss.0.mode", "loss.0.weight"}, found
        assert any("one of 'sum', 'mean'" in p[4] for p in found)

    @pytest.mark.parametrize("options, path, expect", [
        ("{size: big}", "data.options.size", "expected an integer"),
        ("{size: 0}", "data.options.size", ">= 1"),
        ("{size: 100000}", "data.options.size", "<= 256"),
        ("{colour: 1}", "data.options.colour", "has no option 'colour'"),
        ("{root: x}", "data.options.root", "set it in the data block"),
    ])
    def test_dataset_options_against_the_builders_signature(self, workdir, options, path, expect):
        write(workdir, BASE.replace("options: {size: 16}", f"options: {options}"))
        (p,) = problems_of(workdir / "spec.yaml")
        assert p[3] == path and expect in p[4]

    def test_fake_dataset_image_size(self, workdir):
        write(workdir, BASE.replace("dataset: digits", "dataset: fake")
              .replace("options: {size: 16}", "options: {image_size: [3, big, 8]}"))
        (p,) = problems_of(workdir / "spec.yaml")
        assert p[3] == "data.options.image_size" and "a list of 3" in p[4]

    def test_model_arguments(self, workdir):
        write(workdir, BASE.replace("student: {model: wrn-10-1}", "student: {model: wrn-10-1, kwargs: {dropout: x}}"))
        (p,) = problems_of(workdir / "spec.yaml")
        assert p[3] == "student.model" and "dropout: expected a number" in p[4]


# ------------------------------------------------------------------------------------------ positions
class TestPositions:
    def test_a_2d_and_a_4d_tap(self, workdir):
        write(workdir, BASE.replace("[[block2, block2], [block3, block3]]", "[[block2, block2], [fc, block3]]"))
        (p,) = problems_of(workdir / "spec.yaml")
        assert p[3] == "loss.2.positions.1" and "'fc' (10)" in p[4] and "'block3' (64x4x4)" in p[4]

    @pytest.mark.parametrize("method", ["nst", "fitnet", "margin_relu"])
    def test_every_feature_method_is_probed(self, workdir, method):
        write(workdir, BASE.replace("method: at", f"method: {method}")
              .replace("[[block2, block2], [block3, block3]]", "[[block3, fc]]"))
        (p,) = problems_of(workdir / "spec.yaml")
        assert p[3] == "loss.2.positions.0" and "cannot pair" in p[4]

    @pytest.mark.parametrize("method", ["sp", "pkt", "rkd"])
    def test_methods_that_flatten_take_any_ranks(self, workdir, method):
        write(workdir, BASE.replace("method: at", f"method: {method}")
              .replace("[[block2, block2], [block3, block3]]", "[[block3, fc]]"))
        assert problems_of(workdir / "spec.yaml") == []


# --------------------------------------------------------------------------------------- import policy
EVIL = """\
import os
from pathlib import Path
from os import system

Path(os.environ["FZ_MARK"]).write_text("imported")
build = system


def net(num_classes=10):
    import torch.nn as nn
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, num_classes))


def _private():
    return None
"""


@pytest.fixture
def evil(tmp_path, monkeypatch) -> Path:
    """A package ``fz_evil`` whose import writes a marker file (so "nothing imported" is observable)."""
    (tmp_path / "pkg" / "fz_evil").mkdir(parents=True)
    (tmp_path / "pkg" / "fz_evil" / "__init__.py").write_text(EVIL)
    (tmp_path / "pkg" / "fz_evil" / "sub.py").write_text("from . import net as build\nimport os\n")
    mark = tmp_path / "imported"
    monkeypatch.setenv("FZ_MARK", str(mark))
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    yield mark
    for name in [m for m in sys.modules if m == "fz_evil" or m.startswith("fz_evil.")]:
        del sys.modules[name]


class TestImportPolicy:
    @pytest.mark.parametrize("path", ["os:system", "fz_evil:build", "kdgraph.checkpoint:os.system",
                                      "tests.userpkg:Net", "subprocess:run"])
    def test_no_imports_refuses_before_importing(self, evil, path):
        before = set(sys.modules)
        with import_policy_scope((), "--no-imports"), pytest.raises(UserError, match="switched off .--no-imports."):
            import_object(path)
        assert not evil.exists() and set(sys.modules) == before

    def test_a_spec_under_no_imports(self, workdir, evil):
        write(workdir, BASE.replace("student: {model: wrn-10-1}",
                                    "student: {model: 'os:system', kwargs: {command: 'touch pwned'}}"))
        with import_policy_scope((), "--no-imports"):
            (p,) = problems_of(workdir / "spec.yaml")
        assert p[3] == "student.model" and "switched off" in p[4] and not (workdir / "pwned").exists()

    @pytest.mark.parametrize("command", ["validate", "run"])
    def test_the_command_line_switch(self, workdir, evil, capsys, command):
        write(workdir, "name: imp\ndata: {dataset: digits, workers: 0}\nstudent: {model: 'fz_evil:net'}\n"
                       "train: {epochs: 1, max_steps_per_epoch: 1}\nlog: {tensorboard: false}\n")
        extra = ["--runs-dir", "runs"] if command == "run" else []
        code, out, err = run_cli([command, "spec.yaml", "--no-imports", *extra], capsys)
        assert code == 2 and "switched off (--no-imports)" in err and "Traceback" not in out + err
        assert not evil.exists() and not (workdir / "runs").exists()
        code, _, err = run_cli(["validate", "spec.yaml", "--allow-imports", "fz_evil"], capsys)
        assert code == 0, err
        assert evil.exists()

    def test_allow_list_takes_module_prefixes(self, evil):
        with import_policy_scope(["fz_evil"]):
            assert callable(import_object("fz_evil:net"))
            assert evil.exists()
            with pytest.raises(UserError, match="names an object of 'posix'"):
                import_object("fz_evil:build")  # os.system re-exported under an allowed name
            with pytest.raises(UserError, match="reaches"):
                import_object("fz_evil:os.system")
            with pytest.raises(UserError, match="reaches"):
                import_object("fz_evil:_private")
            with pytest.raises(UserError, match="only modules under fz_evil"):
                import_object("fz_evilish:net")

    def test_the_standard_library_never(self, evil):
        with import_policy_scope(["os", "subprocess", "builtins", "fz_evil"]):
            for path in ["os:system", "subprocess:run", "builtins:eval", "os.path:join"]:
                with pytest.raises(UserError, match="never the standard library"):
                    import_object(path)

    def test_the_default_allows_a_users_own_import_paths_but_never_the_standard_library(self, workdir, evil):
        assert import_object("tests.userpkg:Net").__name__ == "Net"
        for path in ["os:system", "subprocess:run", "kdgraph.files:os.system", "fz_evil:build"]:
            with pytest.raises(UserError, match="standard library|names an object of 'posix'"):
                import_object(path)
        write(workdir, BASE.replace("student: {model: wrn-10-1}",
                                    "student: {model: 'os:system', kwargs: {command: 'touch pwned'}}"))
        (p,) = problems_of(workdir / "spec.yaml")
        assert p[3] == "student.model" and "never reach the standard library" in p[4]
        assert not (workdir / "pwned").exists()


# ------------------------------------------------------------------------------------- fuzz corpus
CORPUS_PER_CLASS = int(os.environ.get("KDGRAPH_FUZZ_CASES", "12"))
RUN_ACCEPTED = os.environ.get("KDGRAPH_FUZZ_RUN", "1") != "0"


def run_case(folder: Path, cls: str, files: dict[str, bytes], template: Path) -> str:
    """Validate one case in ``folder`` (a fresh directory): ``"refused"``, ``"accepted"`` or
    ``"accepted, ran"``; anything else raises (an exception, a hang, an unlocated message)."""
    import io

    for name in ("teacher.pt", "other.pt"):
        shutil.copy(template / name, folder / name)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "recipe.yaml").write_text(fuzz_specs.RECIPE)
    err = io.StringIO()
    with contextlib.chdir(folder), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            hang_guard():
        code = main(["validate", "spec.yaml", *(["--no-imports"] if cls == "imports" else [])])
    if code == 2:
        located(err.getvalue())
        if cls == "imports":
            assert "switched off" in err.getvalue() and not (folder / "pwned").exists()
        return "refused"
    assert code == 0, (code, err.getvalue())
    assert cls not in ("encoding", "expansion", "imports") or files["spec.yaml"].startswith(b"\xef\xbb\xbf"), \
        f"a {cls} case was accepted"
    if not RUN_ACCEPTED:
        return "accepted"
    return "accepted, " + _run_accepted(folder)


def _run_accepted(folder: Path) -> str:
    """A spec validate accepted must start training: ``kdgraph run`` (one step per epoch, one epoch)."""
    import io

    err = io.StringIO()
    with contextlib.chdir(folder), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            hang_guard(300):
        for file in ["spec.yaml"]:
            names = [s.data["name"] for s in specs.load_all(file)]
            sets = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1", "--set", "sweep=null",
                    "--set", "log.tensorboard=false"]
            code = main(["run", file, *sets, "--runs-dir", "runs"])
    text = err.getvalue()
    assert code == 0 or (code == 2 and ("non-finite" in text or "became" in text)), \
        f"validate accepted a spec that run refused (exit {code}):\n{text}\nspecs: {names}"
    return "ran" if code == 0 else "stopped on a non-finite loss"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-template")
    _checkpoints(folder)
    return folder


class TestFuzzCorpus:
    """Each class of mutated specs: every case ends in located problems (exit 2) or passes; never a
    traceback, never a hang; specs that pass validate also start training."""

    @pytest.mark.parametrize("cls", list(fuzz_specs.CLASSES))
    def test_class(self, cls, template, tmp_path, evil):
        outcomes = Counter()
        for _, name, files in [c for c in fuzz_specs.corpus(CORPUS_PER_CLASS) if c[0] == cls]:
            folder = tmp_path / name
            folder.mkdir()
            try:
                outcomes[run_case(folder, cls, files, template)] += 1
            except BaseException as e:
                raise AssertionError(f"case {name} ({cls}): {type(e).__name__}: {e}\nfiles: "
                                     f"{ {k: v[:300] for k, v in files.items()} }") from e
        assert sum(outcomes.values()) == CORPUS_PER_CLASS
        print(f"{cls}: {dict(outcomes)}")


def count_corpus(per_class: int) -> None:
    """Tried / handled per class, for ``python -m tests.fuzz_specs N`` (a closing note's counts)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _checkpoints(tmp)
        (tmp / "pkg" / "fz_evil").mkdir(parents=True)
        (tmp / "pkg" / "fz_evil" / "__init__.py").write_text(EVIL)
        os.environ["FZ_MARK"] = str(tmp / "imported")
        sys.path.insert(0, str(tmp / "pkg"))
        torch.set_num_threads(1)
        for cls in fuzz_specs.CLASSES:
            tried, handled, outcomes, failures = 0, 0, Counter(), []
            for _, name, files in [c for c in fuzz_specs.corpus(per_class) if c[0] == cls]:
                folder = tmp / name
                folder.mkdir()
                tried += 1
                try:
                    outcomes[run_case(folder, cls, files, tmp)] += 1
                    handled += 1
                except BaseException as e:  # noqa: BLE001 - counted and shown
                    failures.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            print(f"{cls:12s} tried {tried:4d}  handled {handled:4d}  {dict(outcomes)}")
            for f in failures:
                print("   ", f)
