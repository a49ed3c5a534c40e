"""Runs and sweeps started from the UI, each as its own process, with a queue: one run per GPU at a time.

A job is ``kdgraph run SPEC --out RUNS/NAME`` (or ``kdgraph sweep SPEC``) started with
``sys.executable -m kdgraph`` in its own session (so its own process group), its output appended to
``RUNS/NAME/output.log``. With GPUs, a run gets the GPU(s) it asked for, or the first free one, through
``CUDA_VISIBLE_DEVICES`` (several GPUs: ``--nproc N``, where this kdgraph has it); without, it takes one of
``cpu_slots`` CPU slots (``OMP_NUM_THREADS`` = cores / slots). A sweep takes every GPU (or every CPU slot)
and shares them among its cells itself. Jobs that cannot start yet wait in the queue, first come first
served for each resource: a waiting job holds back what it waits for (the GPUs it asked for; every GPU, or
every CPU slot, for a sweep), so a later job starts before it only on GPUs or CPU slots it does not need --
a sweep or a multi-GPU run is not starved by a stream of later single-GPU runs.

Stopping sends SIGTERM to the job's main process -- the trainer saves a checkpoint and exits with status
:data:`~kdgraph.app.rundir.STOPPED`; a sweep stops its cells the same way -- and kills the whole process
tree after ``stop_timeout`` seconds (at once on a second stop). Resuming runs the same command with
``--resume``. Processes start through :func:`kdgraph.app.launch.start`, as a sweep's cells do.

The runs folder is the source of truth; :data:`JOBS_FILE` there keeps the queue and the PIDs, so a
restarted UI re-attaches to what is running. A lock file keeps two UIs from managing one runs folder.
Nothing here depends on a web page: a background thread advances the queue.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

from kdgraph.app.grid import SWEEP_FILE
from kdgraph.app.launch import engine_command, policy_options, start
from kdgraph.app.rundir import RunDir, read_json, write_json, write_text
from kdgraph.errors import UserError

JOBS_FILE = ".ui-jobs.json"
LOCK_FILE = ".ui-jobs.lock"
OUTPUT_LOG = RunDir.UI_LOG    # in a job's directory: the launcher's log of its attempts
LAUNCH_SPEC = RunDir.UI_SPEC  # in a run's directory: the spec the UI started it with
ACTIVE = ("queued", "running", "stopping")
RECENT_SECONDS = 120.0  # a run dir written to this recently, whose summary says running, is in use


@dataclass
class Job:
    """One launch of a run or a sweep; ``name`` is its directory under the runs folder."""

    name: str
    kind: str = "run"                 # run or sweep
    spec: str = ""                    # the spec file given to kdgraph
    resume: bool = False
    force: bool = False               # start over: the run clears its (marked) directory first
    gpus: list[int] | None = None     # GPUs asked for (torch indices); None: any free one; []: CPU
    state: str = "queued"             # queued, running, stopping, ended, cancelled
    submitted: float = 0.0
    assigned: list[int] | None = None  # the GPUs it got ([]: CPU)
    cmd: list[str] = field(default_factory=list)
    pid: int | None = None
    pid_start: int | None = None      # the process's start time (guards against a reused PID)
    started: float | None = None
    ended: float | None = None
    exit: int | None = None           # exit status (negative: killed by that signal); None: unknown
    stop_sent: float | None = None
    killed: bool = False
    base_seconds: float = 0.0         # wall time of the run's earlier attempts (resumed runs)
    note: str = ""                    # why it could not start, when it could not

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def check_name(name: str) -> str:
    """A run or sweep name usable as a directory of the runs folder (no path, no leading dot)."""
    from kdgraph.spec import schema

    if not isinstance(name, str) or not re.fullmatch(schema()["properties"]["name"]["pattern"], name):
        raise UserError(f"{name!r} cannot name a directory of the runs folder: use letters, digits and _.+=- "
                        f"(not starting with a dot)")
    return name


def inside(root: str | Path, path: str | Path, what: str) -> Path:
    """``root/path`` (``path`` may also be absolute), refused unless it resolves -- symbolic links
    followed -- inside ``root``: a page or an API call never reaches files elsewhere."""
    full = Path(root) / path
    real, top = full.resolve(), Path(root).resolve()
    if real != top and top not in real.parents:
        raise UserError(f"{what} {str(path)!r} is outside {root}: the UI reads and writes only inside its specs "
                        f"and runs folders")
    return full


def run_path(runs_dir: str | Path, name: str) -> Path:
    """The directory of run or sweep ``name`` of the runs folder (:func:`check_name`, :func:`inside`)."""
    return inside(runs_dir, check_name(name), "run")


def pinned_gpu(device) -> int | None:
    """N of a ``train.device`` of ``cuda:N`` (None for auto, cpu, cuda, mps)."""
    match = re.fullmatch(r"cuda:(\d+)", str(device or "").strip())
    return int(match.group(1)) if match else None


def outside_activity(run_dir: str | Path, job: "Job | None" = None, now: float | None = None) -> str | None:
    """Why ``run_dir`` looks written to by a process this UI does not manage (a ``kdgraph run`` from a
    shell), or None: its summary says running and its log, metrics, summary or last checkpoint changed in
    the last :data:`RECENT_SECONDS` -- and not before the UI's own job there ended (then it is that job's
    last write: the UI knows it is dead)."""
    rd = RunDir(run_dir)
    holder = rd.holder()
    if holder is not None and (job is None or holder.get("pid") != job.pid):
        return (f"{run_dir} is being written by process {holder['pid']} ({holder.get('command', '?')}): stop "
                f"that run first")
    if rd.status() != "running":
        return None
    latest = rd.last_write()
    now = time.time() if now is None else now
    if now - latest > RECENT_SECONDS:
        return None
    if job is not None and not job.active and job.ended and latest <= job.ended:
        return None
    return (f"{run_dir} appears to be running outside the UI (its summary says running and it was written "
            f"{max(now - latest, 0):.0f} s ago): stop that run first, or wait {RECENT_SECONDS:.0f} s after it "
            f"died")


def gpu_list() -> list[str]:
    """``"NAME"`` of each GPU torch sees, in torch's order."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


# ------------------------------------------------------------------------------------------ processes
def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, parent pid, start time)`` of a process from /proc, or None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    after = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return after[0], int(after[1]), int(after[19])


def _alive(pid: int | None, start: int | None) -> bool:
    """Whether ``pid`` is still the process that was started (not a zombie, not a reused PID)."""
    if not pid:
        return False
    if not Path("/proc").is_dir():  # no procfs: signal 0 only says a process with that PID exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and (start is None or stat[2] == start)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat:
                parents.setdefault(stat[1], []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out.extend(children)
        todo.extend(children)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL the process group of ``pid`` and those of its descendants (a sweep's cells and torchrun's
    workers may run in groups of their own)."""
    groups = {pid}
    for child in _descendants(pid):
        try:
            groups.add(os.getpgid(child))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ------------------------------------------------------------------------------------------ manager
class JobManager:
    """The queue and processes of one runs folder (see the module docstring).

    ``engine`` is the command prefix that runs kdgraph (tests put a stand-in there); ``gpu_count`` defaults
    to what torch sees; ``background`` starts the thread that advances the queue every ``poll_seconds``.
    """

    def __init__(self, runs_dir: str | Path, *, cpu_slots: int = 1, gpu_count: int | None = None,
                 stop_timeout: float = 60.0, poll_seconds: float = 1.0, engine: Sequence[str] | None = None,
                 background: bool = True):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.runs_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise UserError(f"another kdgraph ui manages {self.runs_dir} (it holds {self.runs_dir / LOCK_FILE}); "
                            f"stop it or give this one another --runs-dir") from None
        self.cpu_slots = max(1, int(cpu_slots))
        if gpu_count is None:
            import torch

            gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.gpu_count = gpu_count
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        listed = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
        self._gpu_ids = [listed[i] if i < len(listed) else str(i) for i in range(gpu_count)]
        self.stop_timeout = float(stop_timeout)
        self.engine = list(engine or engine_command())
        self._mutex = threading.RLock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._jobs: dict[str, Job] = self._read()
        self.tick()
        self._halt = threading.Event()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, args=(poll_seconds,), daemon=True,
                                            name="kdgraph-ui-jobs")
            self._thread.start()

    # ------------------------------------------------------------------------------------ state
    def _read(self) -> dict[str, Job]:
        raw = read_json(self.runs_dir / JOBS_FILE)
        known = {f.name for f in fields(Job)}
        jobs = {}
        for item in raw.get("jobs", []) if isinstance(raw, dict) else []:
            if isinstance(item, dict) and "name" in item:
                jobs[item["name"]] = Job(**{k: v for k, v in item.items() if k in known})
        return jobs

    def _save(self) -> None:
        write_json(self.runs_dir / JOBS_FILE, {"jobs": [asdict(j) for j in self._jobs.values()]})

    def snapshot(self) -> dict[str, dict]:
        """Every job this runs folder knows, as plain dicts by name."""
        with self._mutex:
            return {name: asdict(job) for name, job in self._jobs.items()}

    # ------------------------------------------------------------------------------------ submit
    def _check_gpus(self, gpus: list[int] | None) -> list[int] | None:
        if gpus is None or not gpus:
            return gpus
        gpus = sorted({int(g) for g in gpus})
        bad = [g for g in gpus if not 0 <= g < self.gpu_count]
        if bad:
            raise UserError(f"no GPU {bad[0]}: torch sees {self.gpu_count} GPU(s)")
        return gpus

    def _enqueue(self, job: Job) -> Job:
        self._jobs[job.name] = job
        self._save()
        self.tick()
        return self._jobs[job.name]

    def _idle(self, name: str) -> Job | None:
        job = self._jobs.get(check_name(name))
        if job is not None and job.active:
            raise UserError(f"{name} is already {job.state}")
        return job

    def submit_run(self, name: str, spec_text: str, gpus: list[int] | None = None,
                   overwrite: bool = False) -> Job:
        """Queue a new run ``name`` of the spec text (written to ``RUNS/NAME/launch.yaml``).

        A directory that already holds a run needs ``overwrite`` (it is deleted first); resume it instead
        with :meth:`resume`.
        """
        with self._mutex:
            self._idle(name)
            run_dir = run_path(self.runs_dir, name)
            if (run_dir / SWEEP_FILE).exists():
                raise UserError(f"{run_dir} is a sweep's directory: give the run another name")
            held = RunDir(run_dir).started()
            if held and not overwrite:
                raise UserError(f"{run_dir} already holds a run: resume it from the Runs tab, tick "
                                f"'overwrite' to start it over, or give the spec another name")
            if held:
                busy = outside_activity(run_dir, self._jobs.get(name))
                if busy:
                    raise UserError(busy)
            RunDir(run_dir).ensure(adopt=True)  # the run clears it (--force): only a directory kdgraph marked
            write_text(run_dir / LAUNCH_SPEC, spec_text)
            return self._enqueue(Job(name=name, spec=str(run_dir / LAUNCH_SPEC), gpus=self._check_gpus(gpus),
                                     submitted=time.time(), force=held))

    def resume(self, name: str, gpus: list[int] | None = None) -> Job:
        """Queue ``kdgraph run ... --resume`` of a stopped, killed or failed run (on the GPUs it had asked
        for unless ``gpus`` is given; on GPU N for a spec of ``train.device: cuda:N``)."""
        with self._mutex:
            previous = self._idle(name)
            run_dir = run_path(self.runs_dir, name)
            busy = outside_activity(run_dir, previous)
            if busy:
                raise UserError(busy)
            if RunDir(run_dir).status() == "finished":
                raise UserError(f"{name} has finished: there is nothing to resume")
            spec = next((run_dir / f for f in (LAUNCH_SPEC, RunDir.SPEC) if (run_dir / f).exists()), None)
            if spec is None:
                raise UserError(f"{run_dir} holds no spec ({LAUNCH_SPEC} or {RunDir.SPEC}) to resume")
            if gpus is None and previous is not None:
                gpus = previous.gpus
            spec, pinned = self._unpin(spec, run_dir)
            if pinned is not None:
                gpus = [pinned]
            return self._enqueue(Job(name=name, spec=str(spec), resume=True, gpus=self._check_gpus(gpus),
                                     submitted=time.time(), base_seconds=self._elapsed(previous, run_dir)))

    @staticmethod
    def _elapsed(previous: Job | None, run_dir: Path) -> float:
        """The time a run has taken so far, as the page showed it when it ended: its processes' wall time
        (start-up included) where this UI ran them, and at least the summary's training time; a resumed
        run's clock goes on from there."""
        try:
            trained = float(RunDir(run_dir).summary().get("wall_seconds") or 0)
        except (TypeError, ValueError):
            trained = 0.0
        if previous is None or not previous.started or not previous.ended:
            return trained
        return max(trained, previous.base_seconds + max(previous.ended - previous.started, 0.0))

    def _unpin(self, spec: Path, run_dir: Path) -> tuple[Path, int | None]:
        """A spec of ``train.device: cuda:N`` (say a run started from a shell) rewritten to ``RUNS/NAME/
        launch.yaml`` with ``device: cuda`` -- the job sees only its GPU, as cuda:0 -- and N; else the spec
        as it is and None."""
        import yaml

        from kdgraph import spec as specs

        try:
            data = specs.load_yaml(spec)[0][0]  # size, nesting and alias limits
        except UserError:
            return spec, None
        train = data.get("train") if isinstance(data, dict) else None
        pinned = pinned_gpu(train.get("device")) if isinstance(train, dict) else None
        if pinned is None:
            return spec, None
        if not 0 <= pinned < self.gpu_count:
            raise UserError(f"{spec} sets train.device: cuda:{pinned}, but torch sees {self.gpu_count} GPU(s)")
        train["device"] = "cuda"
        write_text(run_dir / LAUNCH_SPEC, yaml.safe_dump(data, sort_keys=False))
        return run_dir / LAUNCH_SPEC, pinned

    def submit_sweep(self, name: str, spec_file: str | Path) -> Job:
        """Queue ``kdgraph sweep SPEC`` (its directory is ``RUNS/NAME``, NAME being the spec's name)."""
        with self._mutex:
            self._idle(name)
            RunDir(run_path(self.runs_dir, name)).ensure(adopt=True)
            return self._enqueue(Job(name=name, kind="sweep", spec=str(spec_file), submitted=time.time()))

    # ------------------------------------------------------------------------------------ stop
    def stop(self, name: str) -> str:
        """Stop a job: take it out of the queue, or ask it to checkpoint and exit (SIGTERM to its main
        process), or -- already asked -- kill its process tree now. Returns what was done."""
        with self._mutex:
            job = self._jobs.get(check_name(name))
            if job is None or not job.active:
                raise UserError(f"{name} is not running or queued")
            if job.state == "queued":
                job.state, job.ended = "cancelled", time.time()
                self._save()
                return f"{name}: taken out of the queue"
            alive, code = self._poll(job)  # never signal a PID that now names another process
            if not alive:
                job.state, job.exit, job.ended = "ended", code, time.time()
                self._save()
                self.tick()
                return f"{name}: had already ended" + ("" if code is None else f" (exit status {code})")
            if job.state == "running":
                try:
                    os.kill(job.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                job.state, job.stop_sent = "stopping", time.time()
                self._save()
                return (f"{name}: asked to stop; it saves a checkpoint and exits (killed if still running in "
                        f"{self.stop_timeout:.0f} s; stop again to kill it now)")
            kill_tree(job.pid)
            job.killed = True
            self._save()
            return f"{name}: killed"

    # ------------------------------------------------------------------------------------ the queue
    def _command(self, job: Job, assigned: list[int]) -> list[str]:
        runs = str(self.runs_dir)
        if job.kind == "sweep":
            where = (["--devices", ",".join(str(i) for i in range(len(assigned)))] if assigned
                     else ["--jobs", str(self.cpu_slots)])
            return [*self.engine, "sweep", job.spec, "--runs-dir", runs, *where, *policy_options()]
        cmd = [*self.engine, "run", job.spec, "--out", str(self.runs_dir / job.name), "--runs-dir", runs,
               *policy_options()]
        if job.resume:
            cmd.append("--resume")
        elif job.force:
            cmd.append("--force")
        if len(assigned) > 1:
            cmd += ["--nproc", str(len(assigned))]
        return cmd

    def _env(self, job: Job, assigned: list[int]) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "CUDA_VISIBLE_DEVICES": ",".join(self._gpu_ids[i] for i in assigned)}
        if not assigned:
            share = 1 if job.kind == "sweep" else self.cpu_slots
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // share))
        return env

    def _allocate(self, job: Job, busy: set[int], cpu_used: int) -> list[int] | None:
        """The GPUs ([] for CPU) ``job`` can start on now, or None when it must wait."""
        free = [g for g in range(self.gpu_count) if g not in busy]
        if job.kind == "sweep":
            if self.gpu_count:
                return list(range(self.gpu_count)) if len(free) == self.gpu_count else None
            return [] if cpu_used == 0 else None
        if job.gpus == [] or not self.gpu_count:
            return [] if cpu_used < self.cpu_slots else None
        if job.gpus is None:
            return free[:1] or None
        return job.gpus if all(g in free for g in job.gpus) else None

    def _start(self, job: Job, assigned: list[int]) -> None:
        run_dir = self.runs_dir / job.name
        cmd = self._command(job, assigned)
        env = self._env(job, assigned)
        base = self._elapsed(None, run_dir) if job.resume and not job.base_seconds else job.base_seconds
        try:
            RunDir(run_dir).ensure(adopt=True)  # marked before the launcher's log goes in
            proc = start(cmd, run_dir / OUTPUT_LOG, env)
        except (OSError, UserError) as e:
            job.state, job.ended, job.note = "ended", time.time(), f"could not start: {e}"
            with contextlib.suppress(OSError), open(run_dir / OUTPUT_LOG, "a") as log:
                log.write(f"kdgraph ui: {job.note}\n")
            return
        self._procs[job.name] = proc
        stat = _stat(proc.pid)
        job.state, job.assigned, job.cmd, job.pid = "running", assigned, cmd, proc.pid
        job.pid_start = stat[2] if stat else None
        job.started, job.base_seconds = time.time(), base

    def _poll(self, job: Job) -> tuple[bool, int | None]:
        """``(alive, exit status)`` of a started job."""
        proc = self._procs.get(job.name)
        if proc is not None and proc.pid == job.pid:
            code = proc.poll()
            if code is None:
                return True, None
            del self._procs[job.name]
            return False, code
        if _alive(job.pid, job.pid_start):
            return True, None
        return False, (-signal.SIGKILL if job.killed else RunDir(self.runs_dir / job.name).exit_status())

    def tick(self) -> None:
        """Reap ended jobs, kill those past their stop timeout, start queued jobs that now fit."""
        with self._mutex:
            now, changed = time.time(), False
            for job in self._jobs.values():
                if job.state not in ("running", "stopping"):
                    continue
                alive, code = self._poll(job)
                if not alive:
                    job.state, job.exit, job.ended, changed = "ended", code, now, True
                elif job.state == "stopping" and not job.killed and now - job.stop_sent > self.stop_timeout:
                    kill_tree(job.pid)
                    job.killed, changed = True, True
            busy: set[int] = set()  # GPUs in use, then also those held back for waiting jobs
            cpu_used = 0            # CPU slots likewise
            for job in self._jobs.values():
                if job.state in ("running", "stopping"):
                    busy.update(job.assigned or [])
                    if not job.assigned:
                        cpu_used += self.cpu_slots if job.kind == "sweep" else 1
            for job in sorted((j for j in self._jobs.values() if j.state == "queued"), key=lambda j: j.submitted):
                assigned = self._allocate(job, busy, cpu_used)
                if assigned is None:  # it waits, holding back what it waits for (first come, first served)
                    if job.kind == "sweep":
                        if self.gpu_count:
                            busy.update(range(self.gpu_count))
                        else:
                            cpu_used = self.cpu_slots
                    elif job.gpus:
                        busy.update(job.gpus)
                    # a run on any GPU or a CPU slot waits because all (not held back) are in use: the
                    # next one freed goes to it, as it comes before the later jobs
                    continue
                self._start(job, assigned)
                changed = True
                if job.state == "running":
                    busy.update(assigned)
                    cpu_used += (self.cpu_slots if job.kind == "sweep" else 1) if not assigned else 0
            if changed:
                self._save()

    def _loop(self, poll_seconds: float) -> None:
        while not self._halt.wait(poll_seconds):
            try:
                self.tick()
            except OSError as e:  # e.g. the runs folder went away for a moment: try again next time
                print(f"kdgraph ui: job queue: {e}", file=sys.stderr)

    def close(self) -> None:
        """Stop managing the folder (the jobs keep running; a new manager re-attaches to them)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            self._save()
            self._lock_file.close()
