"""Shared fixtures: a command-line runner (``cli``), a tiny spec writer (``write_spec``, over
:func:`tiny_spec`) and one teacher trained for the whole session (``teacher_ckpt``)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from kdgraph.app.cli import main

# Tests that train: one torch thread each (two threads on a busy 2-core box slow small steps ~100x).
_ONE_THREAD = {"test_engine", "test_cli", "test_methods", "test_crd_reviewkd", "test_term_api", "test_labels",
               "test_export", "test_wiring", "test_safety_specs", "test_safety_rundir"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(request):
    if request.module.__name__.rsplit(".", 1)[-1] not in _ONE_THREAD:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------- the command line
@pytest.fixture
def cli(capsys):
    """``cli(args)``: ``kdgraph ARGS`` in this process; returns ``(exit code, stdout, stderr)``."""
    def run(args) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


# ------------------------------------------------------------------------------------------------ specs
def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def tiny_spec(name: str, **over) -> dict:
    """A small digits spec (wrn-10-1 student, 2 epochs of 4 steps on the CPU) with ``over`` deep-merged into it."""
    base = {"name": name,
            "data": {"dataset": "digits", "workers": 0, "batch_size": 32},
            "student": {"model": "wrn-10-1"},
            "train": {"epochs": 2, "max_steps_per_epoch": 4, "device": "cpu",
                      "optimizer": {"lr": 0.05}, "schedule": {"name": "cosine"}},
            "log": {"tensorboard": False}}
    return _merge(base, over)


def write_yaml(path: Path, *docs: dict) -> Path:
    """``docs`` as the YAML documents of ``path``; returns ``path``."""
    path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
    return path


@pytest.fixture
def write_spec(tmp_path):
    """``write_spec(name, **over)``: :func:`tiny_spec` written to ``tmp_path/NAME.yaml``; returns the path."""
    def write(name: str, **over) -> Path:
        return write_yaml(tmp_path / f"{name}.yaml", tiny_spec(name, **over))

    return write


# ---------------------------------------------------------------------------------------------- teacher
@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    """The best checkpoint of a wrn-16-1 trained for one epoch on digits (45 steps of 32, about 60% test
    top-1), trained once for the whole session on one torch thread."""
    root = tmp_path_factory.mktemp("teacher")
    file = write_yaml(root / "teacher.yaml", tiny_spec("teacher", student={"model": "wrn-16-1"}, train={
        "epochs": 1, "max_steps_per_epoch": None, "schedule": {"name": "constant"}}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", str(file), "--runs-dir", str(root)]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "teacher" / "checkpoints" / "best.pt"
