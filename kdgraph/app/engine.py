"""The training engine behind ``kdgraph run``: plain training when the spec has no teacher, else distillation.

The student and the loss terms' connectors are optimised; the teacher is frozen, in eval mode, under
``no_grad`` (a term may ask for its BatchNorm to use batch statistics, as Heo et al. do). Every epoch
appends its metrics row, rewrites the summary and writes the last checkpoint atomically (the files are
:class:`~kdgraph.app.rundir.RunDir`'s); a SIGINT/SIGTERM writes a mid-epoch checkpoint first, so
``--resume`` continues exactly where it stopped.

:func:`run` reads as its phases: :func:`build` (device, data, teacher, student, distiller, optimiser),
:func:`restore` (from the last checkpoint, with any number of processes: :func:`rank_share`), then per
epoch :func:`train_epoch` (its batches, each a :func:`step`), :func:`train_metrics` and
:func:`evaluate_student`, and :func:`end_epoch` (checkpoints, metrics row, summary).

Terms with ``init_epochs`` add a pre-training stage before distillation: epochs numbered from
``-init_epochs`` to -1, each a :func:`train_epoch` of its own :class:`Stage` (optimiser and forward),
closed by :func:`end_init_epoch` (checkpoint, a metrics row marked ``"stage": "init"``, TensorBoard
``init/...``). The checkpoint's ``state["epoch"]`` is then negative, so a resumed run continues inside the
stage.
"""
from __future__ import annotations

import contextlib
import copy
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint as ckpt
from .. import spec as specs
from ..data import UNLABELLED, DatasetInfo, build_loaders, train_targets
from ..distiller import Distiller, TermProblems
from ..distributed import all_reduce, any_rank, barrier, gather_objects, rank, world
from ..errors import SpecError, UserError
from ..models import build_model
from ..spec.check import SOURCES
from .rundir import RunDir, teacher_dir
from .runtime import pick_device


class Stopped(Exception):
    """A run stopped by a signal after writing its checkpoint."""


class NonFinite(Exception):
    """A NaN or infinite loss."""


# ------------------------------------------------------------------------------------------- utilities
def lr_at(epoch: float, train: dict) -> float:
    """Learning rate at fractional ``epoch`` (0-based): warm-up, then the schedule."""
    opt, sch = train["optimizer"], train["schedule"]
    base = opt["lr"]
    warm = sch.get("warmup_epochs", 0)
    if warm and epoch < warm:
        return base * (epoch + 1e-8) / warm
    name, whole = sch["name"], math.floor(epoch)
    if name == "multistep":
        return base * sch["gamma"] ** sum(whole >= m for m in sch["milestones"])
    if name == "step":
        return base * sch["gamma"] ** (whole // sch["step_size"])
    if name == "cosine":
        span = max(1e-8, train["epochs"] - warm)
        return sch["min_lr"] + (base - sch["min_lr"]) * 0.5 * (1 + math.cos(math.pi * (epoch - warm) / span))
    return base


def make_optimizer(params, opt: dict) -> torch.optim.Optimizer:
    if opt["name"] == "sgd":
        return torch.optim.SGD(params, lr=opt["lr"], momentum=opt["momentum"], nesterov=opt["nesterov"]
                               and opt["momentum"] > 0, weight_decay=opt["weight_decay"])
    return torch.optim.AdamW(params, lr=opt["lr"], betas=tuple(opt["betas"]), weight_decay=opt["weight_decay"])


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def accuracy(logits: torch.Tensor, target: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, 1).indices == target[:, None]).any(1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, precision: str, channels_last: bool) -> dict:
    """Test loss (CE), top-1 and top-5 (%) of ``model`` (put in eval mode), summed across ranks when distributed."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    for x, y in loader:
        x, y = _to(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x)
        logits = logits.float()
        totals += torch.tensor([F.cross_entropy(logits, y, reduction="sum").item(), accuracy(logits, y, 1),
                                accuracy(logits, y, 5), len(y)], dtype=torch.float64, device=device)
    all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return {"test_loss": loss / max(n, 1), "test_top1": 100 * top1 / max(n, 1), "test_top5": 100 * top5 / max(n, 1)}


def _to(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Logger:
    """Lines to the terminal and the run's log file; scalars to TensorBoard."""

    def __init__(self, rd: RunDir, tensorboard: bool, echo: Callable[[str], None], main: bool):
        self.main, self.echo = main, echo
        self.file = open(rd.log_file, "a") if main else None
        self.tb = None
        if tensorboard and main:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(rd.tensorboard_dir))
            except ImportError:
                self.line("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")

    def line(self, text: str) -> None:
        if not self.main:
            return
        self.echo(text)
        if self.file is None:
            return
        try:
            self.file.write(time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: the terminal still gets every line
            file, self.file = self.file, None
            with contextlib.suppress(OSError):
                file.close()
            self.echo(f"(the log file can no longer be written: {e.strerror or e})")

    def scalars(self, values: dict, step: int) -> None:
        if self.tb:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


class _Signals:
    """Turn SIGINT/SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.stop = False
        self._first = 0.0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        # A second signal stops at once; one within a second of the first is the same request delivered
        # twice (e.g. to the process group and again by torchrun, which forwards what it receives).
        if self.stop and time.monotonic() - self._first > 1.0:
            raise KeyboardInterrupt
        if not self.stop:
            self.stop, self._first = True, time.monotonic()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _progress:
    """A tqdm bar on a terminal; a silent counter otherwise (plain log lines are printed instead)."""

    def __init__(self, total: int, initial: int, desc: str, main: bool = True):
        self.interactive = main and sys.stderr.isatty()
        self.bar = None
        if self.interactive:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int) -> None:
        if self.bar:
            self.bar.update(n)

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        if self.bar:
            self.bar.set_postfix_str(s, refresh=refresh)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


# --------------------------------------------------------------------------------------------- teacher
def prepare_teacher(spec: specs.Spec, runs_dir: Path, num_classes: int, log: Logger, echo) -> nn.Module | None:
    """The spec's teacher, frozen and in eval mode (None without one): weights from its checkpoint, its
    ``weights``, or the best checkpoint of its ``from_spec`` run (trained first when not finished)."""
    cfg = spec.data.get("teacher")
    if not cfg:
        return None
    given = [k for k in SOURCES if cfg.get(k)]
    if len(given) > 1:  # `kdgraph validate` says so at the spec's line; this is for the Python API
        raise UserError(f"the teacher has two sources of weights, {' and '.join(given)}; keep one")
    model = build_model(cfg["model"], num_classes=num_classes, weights=cfg.get("weights"), **cfg["kwargs"])
    source = _teacher_from_spec(spec, runs_dir, log, echo) if cfg.get("from_spec") else cfg.get("checkpoint")
    if source:
        layout = ckpt.load_weights(model, source)
        log.line(f"teacher: {cfg['model']} weights from {source}"
                 + (f" (keys mapped from the {layout} layout)" if layout != ckpt.OWN_LAYOUT else ""))
    elif not cfg.get("weights"):
        raise UserError("teacher: give `checkpoint`, `weights` or `from_spec`")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _teacher_from_spec(spec: specs.Spec, runs_dir: Path, log: Logger, echo) -> Path:
    """The best checkpoint of the teacher ``from_spec`` names, trained (or resumed) first unless finished."""
    tspec = specs.teacher_spec(spec)
    model = spec.data["teacher"]["model"]
    if tspec.data["student"]["model"] != model:
        raise UserError(f"teacher.from_spec trains {tspec.data['student']['model']!r} but teacher.model is "
                        f"{model!r}")
    rd = teacher_dir(tspec, runs_dir)
    if rd.written_here():
        raise UserError(f"teacher.from_spec names {tspec.data['name']}, a run this process is writing "
                        f"({rd.path}): a cycle of teachers (`kdgraph validate` shows it)")
    # another run needing the same teacher waits for its writer instead of training it too
    with rd.writing(wait=True, adopt=True) if rank() == 0 else contextlib.nullcontext():
        barrier()  # every rank sees the same status, and trains the teacher together if needed
        if rd.status() != "finished" or not rd.best.exists():
            log.line(f"teacher: training {tspec.data['name']} first (from_spec) into {rd.path}")
            run(tspec, rd.path, resume=True, echo=echo, runs_dir=runs_dir)  # continues a stopped teacher
        barrier()  # rank 0 has written the best checkpoint
    return rd.best


def _portable(spec: specs.Spec) -> dict:
    """The spec's data with the files it names made absolute, so the run's spec copy runs from anywhere."""
    data = copy.deepcopy(spec.data)
    for who in ("teacher", "student"):
        cfg = data.get(who) or {}
        if cfg.get("checkpoint") and Path(cfg["checkpoint"]).exists():
            cfg["checkpoint"] = str(Path(cfg["checkpoint"]).resolve())
    teacher = data.get("teacher") or {}
    if teacher.get("from_spec") and spec.file:
        teacher["from_spec"] = specs.absolute_ref(teacher["from_spec"], spec.file)
    return data


# ----------------------------------------------------------------------------------------------- a run
def run(spec: specs.Spec, out: str | Path | None = None, *, resume: bool = False, force: bool = False,
        runs_dir: str | Path = "runs", echo: Callable[[str], None] = print) -> dict:
    """Train ``spec`` into ``out`` (default ``runs_dir/NAME``) and return its summary.

    The process holds the run directory's writer lock throughout (a second writer is refused with its
    PID); kdgraph writes only into a new, empty or marked directory, and ``force`` clears only a marked one.
    Raises :class:`Stopped` after a SIGINT/SIGTERM (its checkpoint written) and a :class:`UserError` for a
    non-finite loss or weights; the summary says ``finished``, ``stopped`` or ``failed`` either way.
    """
    if spec.data.get("sweep"):
        raise UserError(f"{spec.file} holds a sweep: run it with `kdgraph sweep {spec.file}` "
                        f"(or `--set sweep=null` to run its base configuration)")
    if spec.data.get("seeds"):
        raise UserError(f"{spec.data['name']} in {spec.file} has `seeds:`, one run per seed: run it with "
                        f"`kdgraph run` (or `--set seeds=null` to run train.seed alone)")
    runs_dir = Path(runs_dir)
    rd = RunDir(Path(out) if out else runs_dir / spec.data["name"])
    with _claimed(rd, resume, force) as resume:
        if resume is None:  # --resume of a finished run: nothing to do
            return rd.summary()
        return _run(spec, rd, out, resume, runs_dir, echo)


def _run(spec: specs.Spec, rd: RunDir, out, resume: bool, runs_dir: Path, echo) -> dict:
    main = rank() == 0
    previous = rd.summary() if resume else {}
    if main:
        with _disk(rd, "the run's spec"):
            rd.create(_portable(spec))
    barrier()
    log = Logger(rd, spec.data["log"]["tensorboard"], echo, main)
    summary = _first_summary(spec, previous if resume else None)
    if main:  # a run is visible from its first second
        rd.write_summary(summary)
    start = time.time()
    try:
        with _Signals() as signals:
            train(spec, rd, summary, log, signals, runs_dir, echo, previous if resume else None)
        summary["status"] = "finished"
        return summary
    except Stopped:
        summary["status"] = "stopped"
        log.line(_resume_hint(spec, rd, out, runs_dir))
        raise
    except NonFinite as e:
        summary.update(status="failed", error=str(e))
        log.line(f"error: {e}")
        raise UserError(str(e)) from None
    except BaseException as e:
        summary.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        summary["wall_seconds"] = round(previous.get("wall_seconds", 0) * resume + time.time() - start, 1)
        if main:
            with contextlib.suppress(OSError):  # a full disk: the error above says so
                rd.write_summary(summary)
        log.close()


@contextlib.contextmanager
def _claimed(rd: RunDir, resume: bool, force: bool):
    """Rank 0 takes the run directory's writer lock for the block and decides (:func:`_claim`); every rank
    gets the decision, or rank 0's refusal."""
    with contextlib.ExitStack() as stack:
        outcome, error = None, None
        if rank() == 0:
            try:
                stack.enter_context(rd.writing(adopt=resume))
                outcome = ("ok", _claim(rd, resume, force))
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
                outcome, error = ("error", str(e)), e
        outcome = gather_objects(outcome)[0]
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise UserError(outcome[1])
        yield outcome[1]


def _claim(rd: RunDir, resume: bool, force: bool) -> bool | None:
    """Whether the run resumes (None: ``--resume`` of a finished run). A directory holding a run needs
    ``--resume`` or ``--force`` (whether or not its summary can be read); ``--force`` clears it first."""
    if rd.is_sweep():
        raise UserError(f"{rd.path} is a sweep's directory (its cells are in it): give the run another name or "
                        f"--out")
    if force and not resume:
        rd.clear()
        return False
    if not rd.has_run_files():
        return False
    if not resume:
        status = rd.status()
        what = {"finished": "a finished run", None: f"a run (its {RunDir.SUMMARY} is missing or unreadable)"}.get(
            status, "an unfinished run")
        raise UserError(f"{rd.path} already holds {what}; --resume continues it, --force starts over "
                        f"(deleting its files), --out DIR writes elsewhere")
    if not rd.last.exists():
        return None if rd.status() == "finished" else False  # nothing to resume yet: start
    return True


def _first_summary(spec: specs.Spec, previous: dict | None) -> dict:
    """The summary a run starts with (``running``); a resumed run keeps its progress from ``previous``."""
    data = spec.data
    summary = {"name": data["name"], "status": "running", "dataset": data["data"]["dataset"],
               "student": data["student"]["model"], "teacher": (data.get("teacher") or {}).get("model"),
               "methods": [t["method"] for t in data["loss"]], "epochs": data["train"]["epochs"],
               "epochs_done": 0, "best_top1": None, "best_epoch": None, "final_top1": None,
               "teacher_top1": previous.get("teacher_top1") if previous is not None else None,
               "seed": data["train"]["seed"], **({"group": spec.group} if spec.group else {}),
               **({"expect": data["expect"]} if data.get("expect") else {})}
    if previous is not None:
        summary.update({k: previous[k] for k in ("epochs_done", "best_top1", "best_epoch", "final_top1")
                        if previous.get(k) is not None})
    summary["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return summary


def _resume_hint(spec: specs.Spec, rd: RunDir, out, runs_dir: Path) -> str:
    sets = "".join(f" --set {shlex.quote(o)}" for o in spec.overrides)
    return (f"stopped; resume with: kdgraph run {shlex.quote(str(spec.file))}{sets} --resume"
            + (f" --out {shlex.quote(str(rd.path))}" if out else f" --runs-dir {shlex.quote(str(runs_dir))}"))


def train(spec: specs.Spec, rd: RunDir, summary: dict, log: Logger, signals: _Signals, runs_dir: Path, echo,
          previous: dict | None) -> None:
    """Build the run, restore it when ``previous`` (its last summary) is given, and train its epochs."""
    t = build(spec, rd, summary, log, runs_dir, echo)
    if previous is not None:
        restore(t, previous)
    _announce(t)
    if t.rank == 0:  # step rows past the checkpoint (killed before it was written); metrics: restore settled them
        epoch, step = (t.state["epoch"], t.state["step"]) if t.state["epoch"] >= 0 else (0, 0)  # 0: pre-training
        rd.keep_steps(epoch * steps_per_epoch(t) + step)
    for epoch in range(t.state["epoch"], t.train["epochs"]):
        stage = begin_stage(t, epoch)
        started = time.time()
        sums = train_epoch(t, stage, epoch, signals)
        if stage.init:
            end_init_epoch(t, epoch, {**init_metrics(t, epoch, sums), "seconds": round(time.time() - started, 2)})
            continue
        row = {**train_metrics(t, epoch, sums), **evaluate_student(t)}
        row["seconds"] = round(time.time() - started, 2)
        end_epoch(t, epoch, row)


# --------------------------------------------------------------------------------------------- build
@dataclass
class Stage:
    """What a stage's steps update: distillation, or the terms' pre-training (``init``).

    ``optimizer`` over ``params`` (grouped by the terms' ``lr_scale``); ``step_fn`` is the distiller, or
    its DistributedDataParallel wrapper, made when the stage begins (:func:`begin_stage`).
    """

    optimizer: torch.optim.Optimizer
    params: list
    init: bool = False
    step_fn: nn.Module | None = None


@dataclass
class Training:
    """What the phases of one run share: built by :func:`build`, advanced by the epochs.

    ``state`` is what the last checkpoint records: ``epoch`` and ``step`` (where to continue; ``epoch`` < 0
    inside the pre-training stage), ``best`` and ``best_epoch``, ``sums`` (a partial epoch's loss,
    correct, seen and per-term sums on this rank) and ``window`` (the same sums since the last per-step
    row, rank 0's: ``steps.jsonl``). ``main`` is the distillation stage, ``init`` the pre-training stage
    (None when no term has ``init_epochs``).
    """

    spec: specs.Spec
    rd: RunDir
    log: Logger
    summary: dict
    device: torch.device
    rank: int
    world: int
    info: DatasetInfo
    train_loader: object
    test_loader: object
    student: nn.Module
    teacher: nn.Module | None
    distiller: Distiller
    main: Stage
    init: Stage | None
    scaler: torch.amp.GradScaler
    state: dict

    @property
    def train(self) -> dict:
        return self.spec.data["train"]


def build(spec: specs.Spec, rd: RunDir, summary: dict, log: Logger, runs_dir: Path, echo) -> Training:
    """The device, data loaders, teacher (trained first for ``from_spec``), student, distiller and optimiser."""
    data, train = spec.data, spec.data["train"]
    torch.manual_seed(train["seed"])
    device = _device(train)
    train_loader, test_loader, info = build_loaders(_per_rank(data["data"], world()), seed=train["seed"],
                                                    distributed=world() > 1, device=device, indices=True)
    summary["device"] = str(device) + (f" x{world()}" if world() > 1 else "")
    if getattr(train_loader, "labelled", None) is not None:  # data.labels: how many samples keep theirs
        summary.update(labelled=int(train_loader.labelled.sum()), train_samples=len(train_loader.labelled))
    teacher, student = _models(spec, info, device, summary, log, runs_dir, echo)
    try:
        distiller = Distiller(student, teacher, data["loss"], input_shape=info.input_shape,
                              leaf_modules=(data.get("trace") or {}).get("leaf_modules", []), log=log.line)
    except TermProblems as e:
        raise SpecError([spec.problem(p, m) for p, m in e.problems]) from None
    if teacher is not None:
        if summary["teacher_top1"] is None:
            summary["teacher_top1"] = evaluate(teacher, test_loader, device, train["precision"],
                                               train["channels_last"])["test_top1"]
        log.line(f"teacher {data['teacher']['model']}: test top-1 {summary['teacher_top1']:.2f}%")
    distiller.setup(_to(next(iter(test_loader))[0][:2], device, train["channels_last"]), batches=train_loader,
                    num_samples=len(train_loader.dataset), targets=train_targets(train_loader), seed=train["seed"])
    if rank() == 0:
        _draw_wiring(spec, rd, distiller, info, log)
    scaler = torch.amp.GradScaler(device.type, enabled=train["precision"] == "fp16")
    if train["compile"]:
        distiller.compile_forwards()
    main = _stage(distiller.param_groups(), train["optimizer"])
    init = _stage(distiller.init_param_groups(), train["optimizer"], init=True) if distiller.init_epochs else None
    if init is not None:
        summary["init_epochs"] = distiller.init_epochs
    state = {"epoch": -distiller.init_epochs, "step": 0, "best": -1.0, "best_epoch": None, "sums": None,
             "rows": []}
    return Training(spec, rd, log, summary, device, rank(), world(), info, train_loader, test_loader, student,
                    teacher, distiller, main, init, scaler, state)


def _stage(groups: list[dict], opt: dict, init: bool = False) -> Stage:
    return Stage(make_optimizer(groups, opt), [p for g in groups for p in g["params"]], init)


def begin_stage(t: Training, epoch: int) -> Stage:
    """The stage ``epoch`` belongs to (pre-training below 0), with its forward: over several processes a
    DistributedDataParallel wrapper, made when the stage begins (the other stage's is dropped). DDP leaves
    alone the buffers terms keep equal across processes themselves (``synced_buffers``); the pre-training
    stage finds unused parameters, since its terms join at different epochs."""
    stage = t.init if epoch < 0 else t.main
    if stage is None:
        raise UserError("the checkpoint stopped in a pre-training stage (init_epochs) that the spec no longer has")
    if stage.step_fn is None:
        for other in (t.init, t.main):
            if other is not None:
                other.step_fn = None
        stage.step_fn = t.distiller
        if t.world > 1:
            DDP = nn.parallel.DistributedDataParallel
            DDP._set_params_and_buffers_to_ignore_for_model(t.distiller, t.distiller.synced_buffer_names())
            stage.step_fn = DDP(t.distiller, device_ids=[t.device.index] if t.device.type == "cuda" else None,
                                static_graph=not stage.init, find_unused_parameters=stage.init)
    return stage


def _draw_wiring(spec: specs.Spec, rd: RunDir, distiller: Distiller, info: DatasetInfo, log: Logger) -> None:
    """The picture of what this run distils, where (``wiring.svg``); a picture that fails is only logged."""
    from . import wiring

    data = spec.data
    try:
        drawn = wiring.from_distiller(distiller, info.input_shape, data["student"]["model"],
                                      (data.get("teacher") or {}).get("model"))
        rd.write_wiring(wiring.svg(drawn))
    except Exception as e:  # noqa: BLE001 -- a drawing never stops a run
        log.line(f"wiring picture not drawn: {type(e).__name__}: {e}")


def _device(train: dict) -> torch.device:
    device = pick_device(train["device"])
    if train["precision"] == "fp16" and device.type != "cuda":
        raise UserError("train.precision fp16 needs CUDA; use bf16 or fp32 on this machine")
    if train["sync_bn"] and world() > 1 and device.type != "cuda":
        raise UserError("train.sync_bn needs CUDA devices (SyncBatchNorm has no CPU kernel); set it to false")
    return device


def _per_rank(cfg: dict, processes: int) -> dict:
    """The data block with each rank's share of the (global) batch sizes."""
    if processes == 1:
        return cfg
    cfg = dict(cfg)
    for key in ("batch_size", "test_batch_size"):
        if cfg.get(key):
            if cfg[key] % processes:
                raise UserError(f"data.{key} {cfg[key]} is the global batch size and must divide evenly over "
                                f"{processes} processes")
            cfg[key] //= processes
    return cfg


def _models(spec: specs.Spec, info: DatasetInfo, device: torch.device, summary: dict, log: Logger,
            runs_dir: Path, echo) -> tuple[nn.Module | None, nn.Module]:
    """``(teacher, student)`` on ``device``; the student's initial weights do not depend on the teacher."""
    data, train = spec.data, spec.data["train"]
    teacher = prepare_teacher(spec, runs_dir, info.num_classes, log, echo)
    torch.manual_seed(train["seed"])  # a teacher trained first (from_spec) must not change the student's RNG
    student = build_model(data["student"]["model"], num_classes=info.num_classes,
                          weights=data["student"].get("weights"), **data["student"]["kwargs"])
    if data["student"].get("checkpoint"):
        layout = ckpt.load_weights(student, data["student"]["checkpoint"])
        if layout != ckpt.OWN_LAYOUT:
            log.line(f"student: {data['student']['checkpoint']} keys mapped from the {layout} layout")
    summary["student_params"] = param_count(student)
    summary["teacher_params"] = param_count(teacher) if teacher is not None else None
    if train["sync_bn"] and world() > 1:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    if rank():  # ranks draw their own random numbers (DDP has already made the models equal)
        torch.manual_seed(train["seed"] + 1000003 * rank())
    memory_format = torch.channels_last if train["channels_last"] else torch.contiguous_format
    student = student.to(device, memory_format=memory_format)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=memory_format)
    return teacher, student


def _announce(t: Training) -> None:
    data = t.spec.data
    t.log.line(f"{data['name']}: student {data['student']['model']} ({t.summary['student_params'] / 1e6:.2f}M "
               f"params)" + (f", teacher {data['teacher']['model']}" if t.teacher is not None else "")
               + f", {t.device}" + (f" x{t.world} processes" if t.world > 1 else "") + f", {t.train['precision']}")
    for line in t.distiller.describe():
        t.log.line(line)


# ------------------------------------------------------------------------------------------- restore
def restore(t: Training, previous: dict) -> None:
    """Continue from the last checkpoint: weights, term state, optimiser, progress and this rank's RNG; then
    the best checkpoint, the metrics and the summary are brought in line with it (:meth:`RunDir.settle`: a
    run killed between two writes loses nothing). A damaged or non-finite checkpoint is refused."""
    saved = _resumable(t.rd)  # load_state_dict copies to the parameters' device
    t.student.load_state_dict(saved["model"])
    t.distiller.terms.load_state_dict(saved["terms"])  # connectors and term state (memory banks...)
    t.state = saved["state"]
    stage = t.init if t.state["epoch"] < 0 else t.main  # the pre-training stage's optimiser inside it
    if stage is None:
        raise UserError(f"{t.rd.last} stopped in a pre-training stage (init_epochs) that the spec no longer has")
    stage.optimizer.load_state_dict(saved["optimizer"])
    if saved.get("scaler"):
        t.scaler.load_state_dict(saved["scaler"])
    ranks = saved.get("ranks") or [{"rng": saved["rng"], "sums": t.state["sums"]}]
    rng, t.state["sums"] = rank_share(ranks, t.state, t.rank, t.world, t.train["seed"])
    if isinstance(rng, dict):
        ckpt.set_rng_state(rng)
    else:
        torch.manual_seed(rng)
    if len(ranks) != t.world:
        t.log.line(f"resuming with {t.world} process(es) from a checkpoint of {len(ranks)}: the data order is "
                   f"exact, the augmentation random streams are not")
    t.summary.update({k: previous.get(k) for k in ("best_top1", "best_epoch", "final_top1") if k in previous})
    if "rows" not in t.state:  # a checkpoint of an older kdgraph: the rows are in the metrics file alone
        t.state["rows"] = [r for r in t.rd.rows() if r["epoch"] <= t.state["epoch"]] if t.rank == 0 else []
    if t.rank == 0:
        with _disk(t.rd, "the run's files", lambda: _last_good(t)):
            for row in t.rd.settle(saved, t.summary):  # rows a kill had kept out of the metrics file
                _scalars(t, row)
    t.log.line(f"resuming {t.rd.path} at {_epoch_name(t, t.state['epoch'])}, step {t.state['step']}")


def _resumable(rd: RunDir) -> dict:
    """The last checkpoint, checked: readable, a kdgraph checkpoint, finite weights."""
    what = (f"The run cannot continue from it: start it over with --force (deletes the run's files) or put a "
            f"good copy of {rd.last.name} back")
    try:
        saved = rd.load_checkpoint("last")
    except UserError as e:
        raise UserError(f"{e}. {what}") from None
    missing = [k for k in ("model", "terms", "optimizer", "state") if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise UserError(f"{rd.last} is not a kdgraph training checkpoint (no {', '.join(missing)}). {what}")
    bad = _count_non_finite(saved["model"], saved["terms"], saved["optimizer"])
    if bad:
        raise UserError(f"{rd.last} holds {bad} non-finite values (NaN or infinity; an older kdgraph saved "
                        f"such weights). {what}")
    return saved


def rank_share(ranks: list[dict], state: dict, rank: int, world: int, seed: int) -> tuple[dict | int, dict | None]:
    """Rank ``rank`` of ``world``'s part of a checkpoint that ``len(ranks)`` processes wrote: ``(RNG state --
    or, for a rank the checkpoint did not have, a seed --, partial epoch sums)``.

    ``ranks`` holds each writer's ``{"rng", "sums"}``, ``state`` the checkpoint's progress (``epoch``,
    ``step``, ``sums``). With as many processes as wrote it, each rank continues its own random streams and
    sums. With another count, the ranks that existed keep their streams, a new rank gets the seed
    ``seed + 1000003 rank + 7919 epoch + step``, and rank 0 carries the sums of all writers (the others
    start from zero), so the epoch's totals are unchanged.
    """
    if len(ranks) == world:
        return ranks[rank]["rng"], ranks[rank]["sums"]
    rng = ranks[rank]["rng"] if rank < len(ranks) else seed + 1000003 * rank + 7919 * state["epoch"] + state["step"]
    sums = state["sums"]
    if sums is not None:
        sums = {k: sum(r["sums"][k] for r in ranks) if rank == 0 else 0 * v for k, v in sums.items()}
    return rng, sums


# --------------------------------------------------------------------------------------------- epochs
@dataclass
class Step:
    """One batch's step: the loss, its terms and the logits; the learning rate used; ``stop`` when a stop
    was requested on any rank; ``failed`` when the loss was not finite on some rank (nothing was updated)."""

    loss: torch.Tensor
    parts: dict
    logits: torch.Tensor
    lr: float
    stop: bool
    failed: bool


def step(t: Training, stage: Stage, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, progress: float,
         signals: _Signals | None = None) -> Step:
    """One optimisation step of ``stage`` on a batch already on the device (``index``: the samples' places in
    the training set), at fractional epoch ``progress``: the learning rate (scheduled; the spec's, held
    constant, in the pre-training stage; times each group's ``lr_scale``), the forward (under autocast),
    the ranks' agreement on a stop (requested by ``signals`` up to the end of the forward) and on a finite
    loss, then backward, gradient clipping and the optimiser step."""
    lr = t.train["optimizer"]["lr"] if stage.init else lr_at(progress, t.train)
    for g in stage.optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    with autocast(t.device, t.train["precision"]):
        loss, parts, logits = stage.step_fn(x, y, progress, index, init=stage.init)
    requested = signals is not None and signals.stop
    stop, failed = any_rank([requested, not bool(torch.isfinite(loss))], t.device)  # every rank acts alike
    if failed:
        return Step(loss, parts, logits, lr, stop, failed)
    stage.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    if t.train["grad_clip"]:
        t.scaler.unscale_(stage.optimizer)
        nn.utils.clip_grad_norm_(stage.params, t.train["grad_clip"])
    t.scaler.step(stage.optimizer)
    t.scaler.update()
    return Step(loss, parts, logits, lr, stop, failed)


def train_epoch(t: Training, stage: Stage, epoch: int, signals: _Signals) -> dict:
    """The steps of ``epoch`` from ``t.state["step"]`` on; this rank's sums (loss, correct, seen, each term).

    A stop request ends the epoch after a whole step, before the next batch is drawn (and augmented):
    the last checkpoint is written and :class:`Stopped` raised.
    """
    loader, train = t.train_loader, t.train
    steps = steps_per_epoch(t, epoch)
    loader.sampler.set_epoch(epoch, t.state["step"] * loader.batch_size)
    loader.generator.manual_seed(train["seed"] * 100003 + epoch + 7919 * t.rank)  # worker seeds
    if stage.init:
        t.distiller.init_mode(epoch)
    else:
        t.distiller.train()
    sums = t.state["sums"] or _zero_sums(_names(t, epoch))
    sums.setdefault("labelled", sums["seen"])  # a checkpoint written before labels were counted
    bar = _progress(steps, t.state["step"], _epoch_name(t, epoch, of=True), t.rank == 0)
    i, every = t.state["step"], t.spec.data["log"]["every"]
    window = t.state.get("window") or _zero_sums(_names(t, epoch))  # the steps since the last per-step row
    for x, y, index in loader:
        if i >= steps:
            break
        x, y = _to(x, t.device, train["channels_last"]), y.to(t.device, non_blocking=True)
        s = step(t, stage, x, y, index.to(t.device, non_blocking=True), epoch + i / steps, signals)
        if s.failed:
            raise _non_finite(t, s, epoch, i)
        _add(sums, s, y)
        _add(window, s, y)
        i += 1
        bar.update(1)
        bar.set_postfix_str(f"loss {sums['loss'] / sums['seen']:.4f} lr {s.lr:.4g}", refresh=False)
        if i % every == 0:
            if not bar.interactive:
                t.log.line(f"{_epoch_name(t, epoch)} step {i}/{steps} loss {sums['loss'] / sums['seen']:.4f}")
            if not stage.init:
                log_steps(t, window, epoch * steps + i, epoch + i / steps, s.lr)
            window = _zero_sums(_names(t, epoch))
        if s.stop:
            save_checkpoint(t, {**t.state, "epoch": epoch, "step": i, "sums": sums, "window": window})
            bar.close()
            raise Stopped()
    bar.close()
    return sums


def steps_per_epoch(t: Training, epoch: int = 0) -> int:
    """The optimiser steps of an epoch: the loader's batches, at most ``train.max_steps_per_epoch``."""
    loader = t.train_loader
    loader.sampler.set_epoch(epoch)  # the full epoch's length, not a resumed epoch's remainder
    limit = t.train["max_steps_per_epoch"]
    return len(loader) if limit is None else min(limit, len(loader))


def _zero_sums(names: list[str]) -> dict:
    return {"loss": 0.0, "correct": 0, "seen": 0, "labelled": 0, **{n: 0.0 for n in names}}


def log_steps(t: Training, window: dict, global_step: int, epochs: float, lr: float) -> None:
    """One row of the per-step training loss of distillation (rank 0's batches since the last row):
    ``steps.jsonl`` and TensorBoard ``step/...``."""
    if t.rank != 0 or not window["seen"]:
        return
    seen = window["seen"]
    row = {"step": global_step, "epoch": round(epochs, 6), "lr": lr, "loss": window["loss"] / seen,
           **{f"loss/{n}": window[n] / seen for n in t.distiller.names}}
    t.rd.append_steps(row)
    t.log.scalars({f"step/{k}": v for k, v in row.items() if k not in ("step", "epoch")}, global_step)


def _names(t: Training, epoch: int) -> list[str]:
    """The terms whose values an epoch logs: all of them, or in the pre-training stage the active ones."""
    names = t.distiller.names
    return [names[i] for i in t.distiller.init_active(epoch)] if epoch < 0 else names


def _epoch_name(t: Training, epoch: int, of: bool = False) -> str:
    """``epoch 3`` (1-based), or ``init epoch 2`` inside the pre-training stage; ``of``: ``epoch 3/200``."""
    if epoch < 0:
        n = t.distiller.init_epochs
        return f"init epoch {epoch + n + 1}" + (f"/{n}" if of else "")
    return f"epoch {epoch + 1}" + (f"/{t.train['epochs']}" if of else "")


def _add(sums: dict, s: Step, y: torch.Tensor) -> None:
    n = len(y)
    sums["loss"] += s.loss.item() * n
    sums["correct"] += accuracy(s.logits.detach().float(), y, 1)  # an UNLABELLED target is never matched
    sums["seen"] += n
    sums["labelled"] += int((y != UNLABELLED).sum())
    for name, v in s.parts.items():
        sums[name] += v.item() * n


def _non_finite(t: Training, s: Step, epoch: int, i: int) -> NonFinite:
    what = f"became {s.loss.item()}" if not torch.isfinite(s.loss) else "became non-finite on another process"
    return NonFinite(f"the loss {what} at {_epoch_name(t, epoch)}, step {i + 1} "
                     f"({', '.join(f'{n}={v.item():.4g}' for n, v in s.parts.items())}); {_last_good(t)}. "
                     f"Lower train.optimizer.lr or a term's weight")


def _last_good(t: Training) -> str:
    """Which checkpoint is the last good one, as its file says (every checkpoint kdgraph writes is finite:
    :func:`checkpoint_object`)."""
    if not t.rd.last.exists():
        return "no checkpoint was written yet"
    try:
        state = ckpt.load(t.rd.last, mmap=True)["state"]
        where = f"epoch {state['epoch']}" + (f", step {state['step']}" if state["step"] else "")
    except (UserError, KeyError, TypeError):
        where = "unreadable"
    return f"the last good checkpoint is {t.rd.last} ({where}; its weights are finite)"


def _count_non_finite(*states) -> int:
    """How many values of these (nested) state dicts are NaN or infinite."""
    count = 0
    for state in states:
        if isinstance(state, torch.Tensor):
            if state.is_floating_point() or state.is_complex():
                count += int((~torch.isfinite(state)).sum())
        elif isinstance(state, dict):
            count += _count_non_finite(*state.values())
        elif isinstance(state, (list, tuple)):
            count += _count_non_finite(*state)
        elif isinstance(state, float) and not math.isfinite(state):
            count += 1
    return count


@contextlib.contextmanager
def _disk(rd: RunDir, what: str, kept: Callable[[], str] = lambda: "no checkpoint was written yet"):
    """A failed write (a full disk, a file-size limit, a read-only folder) as a message naming it and what
    is kept (every write is atomic: the file before it is intact)."""
    try:
        yield
    except OSError as e:
        raise UserError(f"could not write {what} in {rd.path}: {e.strerror or e}; nothing was lost: {kept()}. "
                        f"Free some space, then --resume") from None


def train_metrics(t: Training, epoch: int, sums: dict) -> dict:
    """The epoch's training row (summed over the ranks): learning rate, loss, each term, train top-1 (over
    the labelled samples; none without any) and, under ``data.labels``, ``labelled``: how many there were."""
    names = t.distiller.names
    totals = torch.tensor([sums["loss"], sums["correct"], sums["seen"], sums["labelled"]] + [sums[n] for n in names],
                          dtype=torch.float64, device=t.device)
    all_reduce(totals)
    seen, labelled = max(totals[2].item(), 1), int(totals[3].item())
    row = {"epoch": epoch + 1, "lr": lr_at(epoch, t.train), "loss": totals[0].item() / seen,
           **{f"loss/{n}": totals[4 + i].item() / seen for i, n in enumerate(names)}}
    if labelled:
        row["train_top1"] = 100 * totals[1].item() / labelled
    if t.spec.data["data"].get("labels"):
        row["labelled"] = labelled
    return row


def init_metrics(t: Training, epoch: int, sums: dict) -> dict:
    """A pre-training epoch's row (summed over the ranks): ``"stage": "init"``, ``epoch`` (<= 0: the row
    sorts before distillation's), ``init_epoch`` (1-based), the learning rate, the loss and each active term."""
    names = _names(t, epoch)
    totals = torch.tensor([sums["loss"], sums["seen"]] + [sums[n] for n in names], dtype=torch.float64,
                          device=t.device)
    all_reduce(totals)
    seen = max(totals[1].item(), 1)
    return {"stage": "init", "epoch": epoch + 1, "init_epoch": epoch + t.distiller.init_epochs + 1,
            "lr": t.train["optimizer"]["lr"], "loss": totals[0].item() / seen,
            **{f"loss/{n}": totals[2 + i].item() / seen for i, n in enumerate(names)}}


def end_init_epoch(t: Training, epoch: int, row: dict) -> None:
    """Close pre-training ``epoch`` as :func:`end_epoch` closes one of distillation (its row into the last
    checkpoint, then the metrics, summary and TensorBoard ``init/...``); the next distillation epoch, from
    0, starts with a fresh optimiser."""
    _commit(t, {**t.state, "epoch": epoch + 1, "step": 0, "sums": None, "window": None,
                "rows": [*t.state.get("rows", []), row]}, row, improved=False)
    terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in row.items() if k.startswith("loss/"))
    t.log.line(f"{_epoch_name(t, epoch, of=True)} (pre-training) loss {row['loss']:.4f} ({terms}) "
               f"{row['seconds']:.1f}s")


def _scalars(t: Training, row: dict) -> None:
    """A metrics row to TensorBoard: ``init/...`` at its pre-training epoch, else at its epoch."""
    if row.get("stage") == "init":
        t.log.scalars({f"init/{k}": v for k, v in row.items() if k not in ("stage", "epoch", "init_epoch")},
                      row["init_epoch"])
    else:
        t.log.scalars({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])


def evaluate_student(t: Training) -> dict:
    """The student's test loss, top-1 and (above 10 classes) top-5."""
    row = evaluate(t.student, t.test_loader, t.device, t.train["precision"], t.train["channels_last"])
    if t.info.num_classes <= 10:
        row.pop("test_top5")
    return row


def end_epoch(t: Training, epoch: int, row: dict) -> None:
    """Close ``epoch``: its row and progress into the last checkpoint (the commit point), then the best
    checkpoint, the metrics, the summary (:func:`_commit`), TensorBoard and a log line."""
    improved = row["test_top1"] > t.state["best"]
    state = {**t.state, "epoch": epoch + 1, "step": 0, "sums": None, "window": None,
             "rows": [*t.state.get("rows", []), row]}
    if improved:
        state.update(best=row["test_top1"], best_epoch=epoch + 1)
    _commit(t, state, row, improved)
    train = f"{row['train_top1']:.2f}%" if "train_top1" in row else "-"
    t.log.line(f"epoch {epoch + 1}/{t.train['epochs']} loss {row['loss']:.4f} train {train} "
               f"test {row['test_top1']:.2f}% (best {state['best']:.2f}%) {row['seconds']:.1f}s")


def _commit(t: Training, state: dict, row: dict, improved: bool) -> None:
    """An epoch's end, on every rank: refuse a row or weights that are not finite, then (rank 0) write
    the checkpoint of ``state`` first and what follows from it (:meth:`RunDir.commit`); ``t.state`` becomes
    ``state``."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise NonFinite(f"{_epoch_name(t, state['epoch'] - 1)} ended with non-finite {', '.join(bad)} "
                        f"({row[bad[0]]}); not saved: {_last_good(t)}. Lower train.optimizer.lr or a term's weight")
    obj = checkpoint_object(t, state)  # every rank: the RNG states are gathered
    if t.rank == 0:
        if row.get("stage") == "init":
            t.summary["init_epochs_done"] = row["init_epoch"]
        with _disk(t.rd, "the epoch's checkpoint, metrics and summary", lambda: _last_good(t)):
            for fresh in t.rd.commit(obj, t.summary, improved):
                _scalars(t, fresh)
    t.state = state


def checkpoint_object(t: Training, state: dict) -> dict | None:
    """The last checkpoint for ``state`` (rank 0; None on the others), with the optimiser. Every rank must
    call it: the ranks' RNG states and partial sums are gathered into it. Weights or optimiser state that
    are not finite are never saved: :class:`NonFinite` names the last checkpoint, which is."""
    ranks = gather_objects({"rng": ckpt.rng_state(), "sums": state["sums"]})  # what differs between ranks
    stage = t.init if state["epoch"] < 0 else t.main  # the optimiser of the stage the run continues in
    model, terms, optimizer = t.student.state_dict(), t.distiller.terms.state_dict(), stage.optimizer.state_dict()
    bad = _count_non_finite(model, terms, optimizer)
    if any_rank([bad > 0], t.device)[0]:
        raise NonFinite(f"the weights became non-finite ({bad} values) by epoch {state['epoch']}, step "
                        f"{state['step']}; not saved: {_last_good(t)}. Lower train.optimizer.lr or a term's "
                        f"weight, or set train.grad_clip")
    if t.rank != 0:
        return None
    return {"model": model, "terms": terms, "state": state, "rng": ranks[0]["rng"], "ranks": ranks,
            "spec": t.spec.data, "format": "kdgraph-1", "optimizer": optimizer,
            "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else None}


def save_checkpoint(t: Training, state: dict) -> None:
    """Write the last checkpoint of ``state`` (a stop in the middle of an epoch) and make it ``t.state``;
    every rank calls it."""
    obj = checkpoint_object(t, state)
    if t.rank == 0:
        with _disk(t.rd, "the checkpoint", lambda: _last_good(t)):
            t.rd.save_checkpoint("last", obj)
    t.state = state
