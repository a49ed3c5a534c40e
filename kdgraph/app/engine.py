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
        self.file.write(time.strftime("%Y-%m-%d %H:%M:%S ") + text + "\n")
        self.file.flush()

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
    model = build_model(cfg["model"], num_classes=num_classes, weights=cfg.get("weights"), **cfg["kwargs"])
    source = cfg.get("checkpoint")
    if cfg.get("from_spec") and not (source and Path(source).exists()):
        source = _teacher_from_spec(spec, runs_dir, log, echo)
    if source:
        ckpt.load_weights(model, source)
        log.line(f"teacher: {cfg['model']} weights from {source}")
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
    # another run needing the same teacher waits for it instead of training it too
    with rd.lock() if rank() == 0 else contextlib.nullcontext():
        barrier()  # every rank sees the same status, and trains the teacher together if needed
        if rd.status() != "finished":
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

    Raises :class:`Stopped` after a SIGINT/SIGTERM (its checkpoint written) and a :class:`UserError` for a
    non-finite loss; the summary says ``finished``, ``stopped`` or ``failed`` either way.
    """
    runs_dir = Path(runs_dir)
    rd = RunDir(Path(out) if out else runs_dir / spec.data["name"])
    previous = rd.summary()
    resume = _claim(spec, rd, previous, resume, force)
    if resume is None:  # --resume of a finished run: nothing to do
        return previous
    main = rank() == 0
    if main:
        rd.create(_portable(spec))
    barrier()
    log = Logger(rd, spec.data["log"]["tensorboard"], echo, main)
    summary = _first_summary(spec, previous if resume else None)
    if main:  # a run is visible (and protected from a second start) from its first second
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
            rd.write_summary(summary)
        log.close()


def _claim(spec: specs.Spec, rd: RunDir, previous: dict, resume: bool, force: bool) -> bool | None:
    """Whether the run resumes (None: ``--resume`` of a finished run); refuses to overwrite a run without
    ``--resume`` or ``--force``; ``--force`` starts over, deleting the directory."""
    if spec.data.get("sweep"):
        raise UserError(f"{spec.file} holds a sweep: run it with `kdgraph sweep {spec.file}` "
                        f"(or `--set sweep=null` to run its base configuration)")
    if spec.data.get("seeds"):
        raise UserError(f"{spec.data['name']} in {spec.file} has `seeds:`, one run per seed: run it with "
                        f"`kdgraph run` (or `--set seeds=null` to run train.seed alone)")
    if previous and not resume and not force:
        what = "a finished run" if previous.get("status") == "finished" else "an unfinished run"
        raise UserError(f"{rd.path} already holds {what}; --resume continues it, --force starts over, "
                        f"--out DIR writes elsewhere")
    if resume and not rd.last.exists():
        if previous.get("status") == "finished":
            return None
        resume = False  # nothing to resume yet: start
    if force and not resume and rank() == 0 and rd.path.exists():
        rd.remove()
    return resume


def _first_summary(spec: specs.Spec, previous: dict | None) -> dict:
    """The summary a run starts with (``running``); a resumed run keeps its progress from ``previous``."""
    data = spec.data
    summary = {"name": data["name"], "status": "running", "dataset": data["data"]["dataset"],
               "student": data["student"]["model"], "teacher": (data.get("teacher") or {}).get("model"),
               "methods": [t["method"] for t in data["loss"]], "epochs": data["train"]["epochs"],
               "epochs_done": 0, "best_top1": None, "best_epoch": None, "final_top1": None,
               "teacher_top1": previous.get("teacher_top1") if previous is not None else None,
               "seed": data["train"]["seed"], **({"group": spec.group} if spec.group else {})}
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
    if t.rank == 0:  # rows past the checkpoint (killed before it was written)
        rd.keep_metrics(t.state["epoch"])
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
    state = {"epoch": -distiller.init_epochs, "step": 0, "best": -1.0, "best_epoch": None, "sums": None}
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
        ckpt.load_weights(student, data["student"]["checkpoint"])
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
    """Continue from the last checkpoint: weights, term state, optimiser, progress and this rank's RNG;
    the summary keeps its best and final accuracies from ``previous``."""
    saved = t.rd.load_checkpoint("last")  # load_state_dict copies to the parameters' device
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
    if t.state["best"] >= 0 and t.summary.get("best_top1") is None:
        t.summary.update(best_top1=t.state["best"], best_epoch=t.state["best_epoch"])
    t.summary["epochs_done"] = max(0, t.state["epoch"])
    t.log.line(f"resuming {t.rd.path} at {_epoch_name(t, t.state['epoch'])}, step {t.state['step']}")


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
            t.state.update(epoch=epoch, step=i, sums=sums, window=window)
            save_checkpoint(t, "last")
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
    last = t.rd.last
    return NonFinite(f"the loss {what} at {_epoch_name(t, epoch)}, step {i + 1} "
                     f"({', '.join(f'{n}={v.item():.4g}' for n, v in s.parts.items())}); "
                     + (f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet")
                     + ". Lower train.optimizer.lr or a term's weight")


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
    """Close pre-training ``epoch``: the last checkpoint (the next distillation epoch, from 0, starts with a
    fresh optimiser), its row into the metrics, TensorBoard (``init/...``) and the summary, a log line."""
    t.state.update(epoch=epoch + 1, step=0, sums=None, window=None)
    save_checkpoint(t, "last")
    if t.rank == 0:
        t.rd.append_metrics(row)
        t.log.scalars({f"init/{k}": v for k, v in row.items() if k not in ("stage", "epoch", "init_epoch")},
                      row["init_epoch"])
        t.summary["init_epochs_done"] = row["init_epoch"]
        t.rd.write_summary(t.summary)
    terms = " ".join(f"{k[5:]} {v:.4f}" for k, v in row.items() if k.startswith("loss/"))
    t.log.line(f"{_epoch_name(t, epoch, of=True)} (pre-training) loss {row['loss']:.4f} ({terms}) "
               f"{row['seconds']:.1f}s")


def evaluate_student(t: Training) -> dict:
    """The student's test loss, top-1 and (above 10 classes) top-5."""
    row = evaluate(t.student, t.test_loader, t.device, t.train["precision"], t.train["channels_last"])
    if t.info.num_classes <= 10:
        row.pop("test_top5")
    return row


def end_epoch(t: Training, epoch: int, row: dict) -> None:
    """Close ``epoch``: its progress and best into the checkpoints, its row into the metrics, TensorBoard
    and the summary, and a log line."""
    improved = row["test_top1"] > t.state["best"]
    if improved:
        t.state.update(best=row["test_top1"], best_epoch=epoch + 1)
    t.state.update(epoch=epoch + 1, step=0, sums=None, window=None)
    save_checkpoint(t, "last")
    if improved:
        save_checkpoint(t, "best")
    if t.rank == 0:
        t.rd.append_metrics(row)
        t.log.scalars({k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
        t.summary.update(epochs_done=epoch + 1, best_top1=t.state["best"], best_epoch=t.state["best_epoch"],
                         final_top1=row["test_top1"])
        t.rd.write_summary(t.summary)
    train = f"{row['train_top1']:.2f}%" if "train_top1" in row else "-"
    t.log.line(f"epoch {epoch + 1}/{t.train['epochs']} loss {row['loss']:.4f} train {train} "
               f"test {row['test_top1']:.2f}% (best {t.state['best']:.2f}%) {row['seconds']:.1f}s")


def save_checkpoint(t: Training, which: str) -> None:
    """Write checkpoint ``which`` (``last``, with the optimiser; ``best``, without) from rank 0. Every rank
    must call it: the ranks' RNG states and partial sums are gathered into it."""
    ranks = gather_objects({"rng": ckpt.rng_state(), "sums": t.state["sums"]})  # what differs between ranks
    if t.rank != 0:
        return
    obj = {"model": t.student.state_dict(), "terms": t.distiller.terms.state_dict(), "state": t.state,
           "rng": ranks[0]["rng"], "ranks": ranks, "spec": t.spec.data, "format": "kdgraph-1"}
    if which == "last":  # the optimiser of the stage the run continues in
        obj["optimizer"] = (t.init if t.state["epoch"] < 0 else t.main).optimizer.state_dict()
        obj["scaler"] = t.scaler.state_dict() if t.scaler.is_enabled() else None
    t.rd.save_checkpoint(which, obj)
