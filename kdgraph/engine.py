"""The training engine behind ``kdgraph run``: plain training when the spec has no teacher, else distillation.

The student and the loss terms' connectors are optimised; the teacher is frozen, in eval mode, under
``no_grad`` (a term may ask for its BatchNorm to use batch statistics, as Heo et al. do). Every epoch
appends to ``metrics.jsonl``, rewrites ``summary.json`` and writes ``checkpoints/last.pt`` atomically; a
SIGINT/SIGTERM writes a mid-epoch checkpoint first, so ``--resume`` continues exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from . import checkpoint as ckpt
from . import spec as specs
from .data import build_loaders
from .errors import UserError
from .distiller import Distiller, TermProblems  # class Distiller: the step, in kdgraph/distiller.py
from .errors import SpecError
from .models import build_model


class Stopped(Exception):
    """A run stopped by a signal after writing its checkpoint."""


class NonFinite(Exception):
    """A NaN or infinite loss."""


# ------------------------------------------------------------------------------------------- utilities
def pick_device(name: str) -> torch.device:
    """The training device; under torchrun each process takes the GPU of its ``LOCAL_RANK``."""
    if _world() > 1 and (name == "auto" or name.startswith("cuda")) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())  # cuda:N means "a GPU" under torchrun
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"train.device is {name!r} but torch sees no CUDA device")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
    _all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return {"test_loss": loss / max(n, 1), "test_top1": 100 * top1 / max(n, 1), "test_top5": 100 * top5 / max(n, 1)}


def _to(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _all_reduce(t: torch.Tensor) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def distributed():
    """Join the process group that ``torchrun`` describes in the environment (NCCL on CUDA, gloo on CPU).

    A no-op for a single process or when a group already exists; the group is destroyed on the way out.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # gloo for CPU tensors (train.device: cpu, or no GPU), NCCL for CUDA ones
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class RunDir:
    path: Path

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def last(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "checkpoints" / "best.pt"

    def summary(self) -> dict:
        try:
            return json.loads(self.summary_file.read_text())
        except (OSError, ValueError):
            return {}

    def write_summary(self, summary: dict) -> None:
        tmp = self.summary_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.summary_file)


class Logger:
    """Lines to the terminal and ``log.txt``; scalars to TensorBoard."""

    def __init__(self, run: Path, tensorboard: bool, echo: Callable[[str], None], main: bool):
        self.main, self.echo = main, echo
        self.file = open(run / "log.txt", "a") if main else None
        self.tb = None
        if tensorboard and main:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run / "tb"))
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


# --------------------------------------------------------------------------------------------- teacher
def _teacher_spec(spec: specs.Spec, runs_dir: Path) -> tuple[specs.Spec, Path]:
    """The teacher's spec (``from_spec``) with the command line's data/train overrides, and its run dir."""
    ref = spec.data["teacher"]["from_spec"]
    file, _, doc = ref.partition("#")
    path = Path(spec.file).parent / file if file else Path(spec.file)
    inherited = [o for o in spec.overrides if o.split("=", 1)[0].split(".")[0] in ("data", "train")]
    docs = specs.load_all(path, inherited)
    chosen = [d for d in docs if not doc or d.data["name"] == doc]
    if not chosen:
        raise UserError(f"teacher.from_spec {ref!r}: no spec named {doc!r} in {path}")
    teacher = chosen[0]
    # A teacher learns this spec's data: where the data set differs (e.g. a CIFAR recipe's teacher named by
    # a spec switched to digits), the teacher's spec follows this one.
    follow = [f"data.{k}={specs.flow_text(spec.data['data'].get(k))}" for k in _TEACHER_DATA
              if spec.data["data"].get(k) != teacher.data["data"].get(k)]
    if follow:
        inherited += follow
        teacher = [d for d in specs.load_all(path, inherited) if d.data["name"] == teacher.data["name"]][0]
    name = teacher.data["name"]
    if inherited:  # a smoke run's teacher never overwrites the real teacher's run
        name += "-" + hashlib.sha1("\n".join(inherited).encode()).hexdigest()[:8]
    return teacher, runs_dir / name


_TEACHER_DATA = ("dataset", "root", "download", "options")  # what a from_spec teacher takes from the student's spec


def prepare_teacher(spec: specs.Spec, runs_dir: Path, num_classes: int, log: Logger, echo) -> nn.Module | None:
    cfg = spec.data.get("teacher")
    if not cfg:
        return None
    model = build_model(cfg["model"], num_classes=num_classes, weights=cfg.get("weights"), **cfg["kwargs"])
    source = cfg.get("checkpoint")
    if cfg.get("from_spec") and not (source and Path(source).exists()):
        tspec, tdir = _teacher_spec(spec, runs_dir)
        if tspec.data["student"]["model"] != cfg["model"]:
            raise UserError(f"teacher.from_spec trains {tspec.data['student']['model']!r} but teacher.model is "
                            f"{cfg['model']!r}")
        rd = RunDir(tdir)
        with _exclusive(tdir):  # another run needing the same teacher waits for it instead of training it too
            _barrier()  # every rank sees the same status, and trains the teacher together if needed
            if rd.summary().get("status") != "finished":
                log.line(f"teacher: training {tspec.data['name']} first (from_spec) into {tdir}")
                run(tspec, tdir, resume=True, echo=echo, runs_dir=runs_dir)  # continues a stopped teacher
            _barrier()  # rank 0 has written best.pt
        source = rd.best
    if source:
        ckpt.load_weights(model, source)
        log.line(f"teacher: {cfg['model']} weights from {source}")
    elif not cfg.get("weights"):
        raise UserError("teacher: give `checkpoint`, `weights` or `from_spec`")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _portable(spec: specs.Spec) -> dict:
    """The spec's data with the files it names made absolute, so ``runs/NAME/spec.yaml`` runs from anywhere."""
    data = copy.deepcopy(spec.data)
    for who in ("teacher", "student"):
        cfg = data.get(who) or {}
        if cfg.get("checkpoint") and Path(cfg["checkpoint"]).exists():
            cfg["checkpoint"] = str(Path(cfg["checkpoint"]).resolve())
    teacher = data.get("teacher") or {}
    if teacher.get("from_spec") and spec.file:
        file, _, doc = teacher["from_spec"].partition("#")
        path = (Path(spec.file).parent / file if file else Path(spec.file)).resolve()
        teacher["from_spec"] = f"{path}#{doc}" if doc else str(path)
    return data


@contextlib.contextmanager
def _exclusive(directory: Path):
    """Hold an advisory lock on ``directory`` (rank 0; a no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is None or _rank() != 0:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------- train
def run(spec: specs.Spec, out: str | Path | None = None, *, resume: bool = False, force: bool = False,
        runs_dir: str | Path = "runs", echo: Callable[[str], None] = print) -> dict:
    """Train ``spec`` into ``out`` (default ``runs_dir/NAME``) and return its summary."""
    data = spec.data
    if data.get("sweep"):
        raise UserError(f"{spec.file} holds a sweep: run it with `kdgraph sweep {spec.file}` "
                        f"(or `--set sweep=null` to run its base configuration)")
    runs_dir = Path(runs_dir)
    rd = RunDir(Path(out) if out else runs_dir / data["name"])
    main = _rank() == 0
    previous = rd.summary()
    if previous and not resume and not force:
        what = "a finished run" if previous.get("status") == "finished" else "an unfinished run"
        raise UserError(f"{rd.path} already holds {what}; --resume continues it, --force starts over, "
                        f"--out DIR writes elsewhere")
    if resume and not rd.last.exists():
        if previous.get("status") == "finished":
            return previous
        resume = False  # nothing to resume yet: start
    if force and not resume and main and rd.path.exists():
        shutil.rmtree(rd.path)
    if main:
        (rd.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        (rd.path / "spec.yaml").write_text(yaml.safe_dump(_portable(spec), sort_keys=False))
    _barrier()
    log = Logger(rd.path, data["log"]["tensorboard"], echo, main)
    summary = {"name": data["name"], "status": "running", "dataset": data["data"]["dataset"],
               "student": data["student"]["model"], "teacher": (data.get("teacher") or {}).get("model"),
               "methods": [t["method"] for t in data["loss"]], "epochs": data["train"]["epochs"],
               "epochs_done": 0, "best_top1": None, "best_epoch": None, "final_top1": None,
               "teacher_top1": previous.get("teacher_top1") if resume else None}
    if resume:
        summary.update({k: previous[k] for k in ("epochs_done", "best_top1", "best_epoch", "final_top1")
                        if previous.get(k) is not None})
    summary["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if main:  # a run is visible (and protected from a second start) from its first second
        rd.write_summary(summary)
    start = time.time()
    try:
        with _Signals() as signals:
            _train(spec, rd, summary, log, signals, resume, runs_dir, echo, previous if resume else {})
        summary["status"] = "finished"
        return summary
    except Stopped:
        summary["status"] = "stopped"
        sets = "".join(f" --set {shlex.quote(o)}" for o in spec.overrides)
        log.line(f"stopped; resume with: kdgraph run {shlex.quote(str(spec.file))}{sets} --resume"
                 + (f" --out {shlex.quote(str(rd.path))}" if out else f" --runs-dir {shlex.quote(str(runs_dir))}"))
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


def _train(spec, rd: RunDir, summary: dict, log: Logger, signals: _Signals, resume: bool, runs_dir: Path, echo,
           previous: dict) -> None:
    data, train = spec.data, spec.data["train"]
    rank, world = _rank(), _world()
    torch.manual_seed(train["seed"])
    device = pick_device(train["device"])
    if train["precision"] == "fp16" and device.type != "cuda":
        raise UserError("train.precision fp16 needs CUDA; use bf16 or fp32 on this machine")
    if train["sync_bn"] and world > 1 and device.type != "cuda":
        raise UserError("train.sync_bn needs CUDA devices (SyncBatchNorm has no CPU kernel); set it to false")
    train_loader, test_loader, info = build_loaders(_per_rank(data["data"], world), seed=train["seed"],
                                                    distributed=world > 1, device=device)
    leaf = (data.get("trace") or {}).get("leaf_modules", [])
    summary["device"] = str(device) + (f" x{world}" if world > 1 else "")

    teacher = prepare_teacher(spec, runs_dir, info.num_classes, log, echo)
    torch.manual_seed(train["seed"])  # a teacher trained first (from_spec) must not change the student's RNG
    student = build_model(data["student"]["model"], num_classes=info.num_classes,
                          weights=data["student"].get("weights"), **data["student"]["kwargs"])
    if data["student"].get("checkpoint"):
        ckpt.load_weights(student, data["student"]["checkpoint"])
    summary["student_params"] = param_count(student)
    summary["teacher_params"] = param_count(teacher) if teacher is not None else None
    if train["sync_bn"] and world > 1:
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    if rank:  # ranks draw their own random numbers (DDP has already made the models equal)
        torch.manual_seed(train["seed"] + 1000003 * rank)

    memory_format = torch.channels_last if train["channels_last"] else torch.contiguous_format
    student = student.to(device, memory_format=memory_format)
    if teacher is not None:
        teacher = teacher.to(device, memory_format=memory_format)
    try:
        distiller = Distiller(student, teacher, data["loss"], input_shape=info.input_shape, leaf_modules=leaf,
                              log=log.line)
    except TermProblems as e:
        raise SpecError([spec.problem(p, m) for p, m in e.problems]) from None
    if teacher is not None:
        if summary["teacher_top1"] is None:
            summary["teacher_top1"] = evaluate(teacher, test_loader, device, train["precision"],
                                               train["channels_last"])["test_top1"]
        log.line(f"teacher {data['teacher']['model']}: test top-1 {summary['teacher_top1']:.2f}%")
    distiller.setup(_to(next(iter(test_loader))[0][:2], device, train["channels_last"]), batches=train_loader)
    params = distiller.trainable_parameters()
    optimizer = make_optimizer(params, train["optimizer"])
    scaler = torch.amp.GradScaler(device.type, enabled=train["precision"] == "fp16")
    if train["compile"]:
        distiller.compile_forwards()
    step_fn = distiller
    if world > 1:
        step_fn = nn.parallel.DistributedDataParallel(
            distiller, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)

    names = distiller.names
    state = {"epoch": 0, "step": 0, "best": -1.0, "best_epoch": None, "sums": None}
    if resume:
        saved = ckpt.load(rd.last, map_location="cpu")  # load_state_dict copies to the parameters' device
        student.load_state_dict(saved["model"])
        distiller.terms.load_state_dict(saved["terms"])
        optimizer.load_state_dict(saved["optimizer"])
        if saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state = saved["state"]
        ranks = saved.get("ranks") or [{"rng": saved["rng"], "sums": state["sums"]}]
        if len(ranks) == world:  # each rank continues its own random streams and partial epoch sums
            ckpt.set_rng_state(ranks[rank]["rng"])
            state["sums"] = ranks[rank]["sums"]
        else:  # another process count: rank 0 carries the epoch's sums so far
            if rank < len(ranks):
                ckpt.set_rng_state(ranks[rank]["rng"])
            else:
                torch.manual_seed(train["seed"] + 1000003 * rank + 7919 * state["epoch"] + state["step"])
            if state["sums"] is not None:
                state["sums"] = {k: sum(r["sums"][k] for r in ranks) if rank == 0 else 0 * v
                                 for k, v in state["sums"].items()}
            log.line(f"resuming with {world} process(es) from a checkpoint of {len(ranks)}: the data order is "
                     f"exact, the augmentation random streams are not")
        summary.update({k: previous.get(k) for k in ("best_top1", "best_epoch", "final_top1") if k in previous})
        if state["best"] >= 0 and summary.get("best_top1") is None:
            summary.update(best_top1=state["best"], best_epoch=state["best_epoch"])
        summary["epochs_done"] = state["epoch"]
        log.line(f"resuming {rd.path} at epoch {state['epoch'] + 1}, step {state['step']}")
    log.line(f"{data['name']}: student {data['student']['model']} ({summary['student_params'] / 1e6:.2f}M params)"
             + (f", teacher {data['teacher']['model']}" if teacher is not None else "")
             + f", {device}" + (f" x{world} processes" if world > 1 else "") + f", {train['precision']}")
    for line in distiller.describe():
        log.line(line)

    epochs, max_steps = train["epochs"], train["max_steps_per_epoch"]
    metrics_file = rd.path / "metrics.jsonl"
    if rank == 0 and metrics_file.exists():  # rows past the checkpoint (killed before it was written)
        kept = [r for r in metrics_file.read_text().splitlines() if json.loads(r)["epoch"] <= state["epoch"]]
        metrics_file.write_text("".join(r + "\n" for r in kept))
    for epoch in range(state["epoch"], epochs):
        t0 = time.time()
        train_loader.sampler.set_epoch(epoch)  # the full epoch's length, not a resumed epoch's remainder
        steps_in_epoch = len(train_loader) if max_steps is None else min(max_steps, len(train_loader))
        train_loader.sampler.set_epoch(epoch, state["step"] * train_loader.batch_size)
        train_loader.generator.manual_seed(train["seed"] * 100003 + epoch + 7919 * rank)  # worker seeds
        distiller.train()
        sums = state["sums"] or {"loss": 0.0, "correct": 0, "seen": 0, **{n: 0.0 for n in names}}
        bar = _progress(steps_in_epoch, state["step"], f"epoch {epoch + 1}/{epochs}", rank == 0)
        step = state["step"]
        for x, y in train_loader:
            if step >= steps_in_epoch:
                break
            progress = epoch + step / steps_in_epoch
            lr = lr_at(progress, train)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = _to(x, device, train["channels_last"]), y.to(device, non_blocking=True)
            with autocast(device, train["precision"]):
                loss, parts, logits = step_fn(x, y, progress)
            finite = bool(torch.isfinite(loss))
            stop_now, nonfinite = _agree([signals.stop, not finite], device, world)  # every rank acts alike
            if nonfinite:
                what = (f"became {loss.item()}" if not finite else "became non-finite on another process")
                raise NonFinite(f"the loss {what} at epoch {epoch + 1}, step {step + 1} "
                                f"({', '.join(f'{n}={v.item():.4g}' for n, v in parts.items())}); "
                                + (f"the last good checkpoint is {rd.last}" if rd.last.exists() else
                                   "no checkpoint was written yet") + ". Lower train.optimizer.lr or a term's weight")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if train["grad_clip"]:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(params, train["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            n = len(y)
            sums["loss"] += loss.item() * n
            sums["correct"] += accuracy(logits.detach().float(), y, 1)
            sums["seen"] += n
            for name, v in parts.items():
                sums[name] += v.item() * n
            step += 1
            bar.update(1)
            bar.set_postfix_str(f"loss {sums['loss'] / sums['seen']:.4f} lr {lr:.4g}", refresh=False)
            if not bar.interactive and step % spec.data["log"]["every"] == 0:
                log.line(f"epoch {epoch + 1} step {step}/{steps_in_epoch} loss {sums['loss'] / sums['seen']:.4f}")
            if stop_now:  # after a whole step, before the next batch is drawn (and augmented)
                state.update(epoch=epoch, step=step, sums=sums)
                _save(rd.last, student, distiller.terms, optimizer, scaler, state, spec)
                bar.close()
                raise Stopped()
        bar.close()
        totals = torch.tensor([sums["loss"], sums["correct"], sums["seen"]] + [sums[n] for n in names],
                              dtype=torch.float64, device=device)
        _all_reduce(totals)
        seen = max(totals[2].item(), 1)
        row = {"epoch": epoch + 1, "lr": lr_at(epoch, train), "loss": totals[0].item() / seen,
               **{f"loss/{n}": totals[3 + i].item() / seen for i, n in enumerate(names)},
               "train_top1": 100 * totals[1].item() / seen}
        row.update(evaluate(student, test_loader, device, train["precision"], train["channels_last"]))
        if info.num_classes <= 10:
            row.pop("test_top5")
        row["seconds"] = round(time.time() - t0, 2)
        improved = row["test_top1"] > state["best"]
        if improved:
            state.update(best=row["test_top1"], best_epoch=epoch + 1)
        state.update(epoch=epoch + 1, step=0, sums=None)
        _save(rd.last, student, distiller.terms, optimizer, scaler, state, spec)
        if improved:
            _save(rd.best, student, distiller.terms, None, None, state, spec)
        if rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            log.scalars({k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
            summary.update(epochs_done=epoch + 1, best_top1=state["best"], best_epoch=state["best_epoch"],
                           final_top1=row["test_top1"])
            rd.write_summary(summary)
        log.line(f"epoch {epoch + 1}/{epochs} loss {row['loss']:.4f} train {row['train_top1']:.2f}% "
                 f"test {row['test_top1']:.2f}% (best {state['best']:.2f}%) {row['seconds']:.1f}s")


def _per_rank(cfg: dict, world: int) -> dict:
    """The data block with each rank's share of the (global) batch sizes."""
    if world == 1:
        return cfg
    cfg = dict(cfg)
    for key in ("batch_size", "test_batch_size"):
        if cfg.get(key):
            if cfg[key] % world:
                raise UserError(f"data.{key} {cfg[key]} is the global batch size and must divide evenly over "
                                f"{world} processes")
            cfg[key] //= world
    return cfg


def _agree(flags: list[bool], device, world: int) -> list[bool]:
    """Each flag, true if it is true on any rank (ranks must stop, or fail, at the same step)."""
    if world == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=device)
    _all_reduce(t)
    return [bool(v) for v in t.tolist()]


def _save(path: Path, student, terms, optimizer, scaler, state, spec) -> None:
    """Write a checkpoint from rank 0 (every rank must call it: the RNG states of all ranks are gathered)."""
    mine = {"rng": ckpt.rng_state(), "sums": state["sums"]}  # what differs between ranks
    ranks = [mine]
    if _world() > 1:
        import torch.distributed as dist

        ranks = [None] * _world()
        dist.all_gather_object(ranks, mine)
    if _rank() != 0:
        return
    obj = {"model": student.state_dict(), "terms": terms.state_dict(), "state": state, "rng": ranks[0]["rng"],
           "ranks": ranks, "spec": spec.data, "format": "kdgraph-1"}
    if optimizer is not None:
        obj["optimizer"] = optimizer.state_dict()
        obj["scaler"] = scaler.state_dict() if scaler.is_enabled() else None
    ckpt.save_atomic(obj, path)


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
