"""The student of a run on its own, for deployment: ``kdgraph export RUN --format FORMAT``.

The student is rebuilt from the run's spec and given the weights of its best (or last) checkpoint; the
teacher and the loss terms' connectors (saved in the checkpoint under ``terms``) are left out. Formats:

* ``state_dict`` -- ``student.pt``, the student's ``state_dict`` (``torch.load(..., weights_only=True)``);
* ``torchscript`` -- ``student.torchscript.pt``, traced (``torch.jit.load``; PyTorch deprecates TorchScript);
* ``onnx`` -- ``student.onnx`` (``torch.onnx.export`` with ``dynamo=True``, batch dimension dynamic;
  needs the ``onnx`` and ``onnxscript`` packages: ``pip install 'kdgraph[export]'``);
* ``exported`` -- ``student.pt2``, a ``torch.export`` program (``torch.export.load``), batch dynamic.

Each export is checked: the exported file is loaded back (ONNX: with onnxruntime when installed, else
onnx's checker and reference evaluator) and its outputs on a batch of ``batch`` random inputs of the
dataset's input shape are compared with the checkpoint's model; a difference beyond ``1e-4 * (1 + max
|logit|)`` is an error. The files go to ``RUN/export/`` (kdgraph's own: replaced on the next export)
with ``export.json``, the record of every export there.

Example::

    record = export("runs/quickstart-kd", "onnx")
    record["file"], record["max_abs_diff"]     # 'runs/quickstart-kd/export/student.onnx', 2.4e-07
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import yaml

from ..errors import UserError
from .rundir import RunDir, read_json, write_json

FORMATS = {"state_dict": "student.pt", "torchscript": "student.torchscript.pt", "onnx": "student.onnx",
           "exported": "student.pt2"}
RECORD = "export.json"


def student_of(rd: RunDir, which: str = "best") -> tuple[torch.nn.Module, tuple, dict]:
    """``(student in eval mode with the checkpoint's weights, input shape, checkpoint info)`` of a run."""
    from ..models import build_model
    from ..spec.check import static_dataset_info

    if not rd.spec_file.is_file():
        raise UserError(f"{rd.path} is not a run directory (no {RunDir.SPEC})")
    path = rd.checkpoint(which)
    if not path.is_file():
        raise UserError(f"{rd.path} has no {which} checkpoint ({path}) yet: export it once an epoch has ended")
    data = yaml.safe_load(rd.spec_file.read_text())
    info = static_dataset_info(data["data"])
    if info is None:
        raise UserError(f"dataset {data['data']['dataset']!r} does not declare its input shape and classes: "
                        f"kdgraph cannot rebuild the student for it")
    num_classes, input_shape = info
    cfg = data["student"]
    student = build_model(cfg["model"], num_classes=num_classes, **(cfg.get("kwargs") or {}))
    saved = rd.load_checkpoint(which)
    student.load_state_dict(saved["model"])  # the student alone: the connectors are saved under "terms"
    state = saved.get("state") or {}
    return student.eval(), tuple(input_shape), {"checkpoint": str(path), "epoch": state.get("epoch")}


def export(run_dir: str | Path, fmt: str = "state_dict", which: str = "best", batch: int = 8,
           echo: Callable[[str], None] = print) -> dict:
    """Export the student of ``run_dir`` in format ``fmt`` (:data:`FORMATS`) from checkpoint ``which``
    (``best`` or ``last``), check it (see the module docstring) and return its record: ``format``,
    ``file``, ``checkpoint``, ``epoch``, ``input_shape``, ``batch``, ``max_abs_diff``, ``tolerance``,
    ``same_top1`` (the share of inputs whose arg-max agrees), ``checked_with`` and ``seconds``."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    rd = RunDir(run_dir)
    started = time.time()
    student, input_shape, info = student_of(rd, which)
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = student(x)
    rd.export_dir.mkdir(parents=True, exist_ok=True)
    file = rd.export_dir / FORMATS[fmt]
    got, checked_with = WRITERS[fmt](student, x, file)
    got = torch.as_tensor(got, dtype=expected.dtype).detach()
    diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    tolerance = 1e-4 * (1 + float(expected.abs().max()))
    record = {"format": fmt, "file": str(file), **info, "input_shape": list(input_shape), "batch": batch,
              "max_abs_diff": diff, "tolerance": tolerance,
              "same_top1": float((got.argmax(1) == expected.argmax(1)).float().mean()) if diff < float("inf") else 0.0,
              "checked_with": checked_with, "seconds": round(time.time() - started, 1)}
    records = read_json(rd.export_dir / RECORD) or {}
    records[fmt] = record
    write_json(rd.export_dir / RECORD, records)
    if not diff <= tolerance:
        raise UserError(f"{file}: the exported student's outputs differ from the checkpoint's by {diff:.3g} "
                        f"(tolerance {tolerance:.3g}) on a batch of {batch}; do not deploy this file")
    echo(f"exported {fmt} to {file}: outputs match the checkpoint's ({checked_with}; max |difference| "
         f"{diff:.2g} on {batch} random inputs of {'x'.join(map(str, input_shape))})")
    return record


# ------------------------------------------------------------------------------------------- writers
def _temporary(file: Path) -> Path:
    """Where ``file`` is written before it replaces the old one (same folder, same extension)."""
    return file.with_name(".tmp-" + file.name)


def _write_state_dict(student, x, file: Path):
    from .. import checkpoint as ckpt

    ckpt.save_atomic(student.state_dict(), file)
    fresh = _fresh_copy(student)
    fresh.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
    with torch.no_grad():
        return fresh.eval()(x), "torch.load(weights_only=True) into a new model"


def _fresh_copy(student: torch.nn.Module) -> torch.nn.Module:
    """A model of the same structure with other weights (the file must bring them back)."""
    import copy

    fresh = copy.deepcopy(student)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    return fresh


def _write_torchscript(student, x, file: Path):
    tmp = _temporary(file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PyTorch deprecates TorchScript; it still works
        traced = torch.jit.trace(student, x)
        torch.jit.save(traced, str(tmp))
        tmp.replace(file)
        loaded = torch.jit.load(str(file), map_location="cpu")
    with torch.no_grad():
        return loaded(x), "torch.jit.load"


def _batch_dim():
    from torch.export import Dim

    return ({0: Dim("batch", min=1)},)


def _write_exported(student, x, file: Path):
    program = torch.export.export(student, (x,), dynamic_shapes=_batch_dim())
    tmp = _temporary(file)
    torch.export.save(program, str(tmp))
    tmp.replace(file)
    loaded = torch.export.load(str(file)).module()
    with torch.no_grad():
        return loaded(x), "torch.export.load"


def _write_onnx(student, x, file: Path):
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"ONNX export needs the onnx and onnxscript packages ({e}): "
                        f"pip install 'kdgraph[export]'") from None
    tmp = _temporary(file)
    torch.onnx.export(student, (x,), str(tmp), dynamo=True, dynamic_shapes=_batch_dim(), input_names=["input"],
                      output_names=["logits"], external_data=False, verbose=False)  # one file: the weights inside
    tmp.replace(file)
    return _run_onnx(file, x)


def _run_onnx(file: Path, x: torch.Tensor):
    """The ONNX model's output on ``x``: onnxruntime when installed, else onnx's checker and reference evaluator."""
    import onnx

    try:
        import onnxruntime as ort
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(str(file))
        onnx.checker.check_model(model, full_check=True)
        return ReferenceEvaluator(model).run(None, {"input": x.numpy()})[0], "onnx.checker + onnx.reference"
    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0], f"onnxruntime {ort.__version__}"


WRITERS = {"state_dict": _write_state_dict, "torchscript": _write_torchscript, "onnx": _write_onnx,
           "exported": _write_exported}
