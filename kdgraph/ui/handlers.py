"""The functions behind the page's events: they read widget values, call :mod:`~kdgraph.ui.forms`,
:mod:`~kdgraph.ui.runs` and the :class:`~kdgraph.ui.jobs.JobManager`, and return widget values or updates.

Mistakes the user can act on come back as messages shown in the page (no tracebacks).
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from kdgraph.app.rundir import RunDir
from kdgraph.errors import UserError

from . import fielderrors, forms, jobs, runs, views
from .forms import FIELDS, MAX_TERMS, TERM_KEYS
from .jobs import JobManager

VALID = "valid"
# the fields the layer tables depend on, and those the term views (and the wiring picture) depend on:
# their events take only these, not the whole form
TRACE_KEYS = ["data.dataset", "data.options", "teacher.model", "teacher.kwargs", "student.model", "student.kwargs",
              "trace.leaf_modules"]
TERM_VIEW_KEYS = TRACE_KEYS + ["loss.count"] + [f"loss.{i}.{k}" for i in range(MAX_TERMS) for k in TERM_KEYS]
TAP_KEYS = TRACE_KEYS + [f"loss.{i}.positions" for i in range(MAX_TERMS)]
EXPORT_FORMATS = ["onnx", "state_dict", "torchscript", "exported"]


def _error(e: Exception | str) -> str:
    return f"⚠ {e}"


class Handlers:
    """Event handlers of one app: its specs folder, runs folder and job manager."""

    def __init__(self, specs_dir: str | Path, runs_dir: str | Path, manager: JobManager):
        self.specs_dir = Path(specs_dir)
        self.runs_dir = Path(runs_dir)
        self.manager = manager

    # ---------------------------------------------------------------------------------------- forms
    @staticmethod
    def form(values) -> dict:
        """The form dict of the widget values, in :data:`FIELDS` order."""
        return dict(zip(FIELDS, values))

    @staticmethod
    def values(form: dict) -> list:
        return [form[k] for k in FIELDS]

    def spec_file(self, file_name: str) -> Path:
        """Where the form's spec is saved (and what its problems are reported against)."""
        try:
            return jobs.inside(self.specs_dir, forms.check_file_name(file_name), "spec file")
        except UserError:
            return self.specs_dir / "spec.yaml"


    def spec_choices(self):
        return gr.update(choices=forms.spec_choices(self.specs_dir))

    def sweep_choices(self):
        return gr.update(choices=forms.sweep_files(self.specs_dir))

    def checkpoint_choices(self) -> list[str]:
        """Checkpoints of finished runs in the runs folder (candidates for a teacher)."""
        out = []
        for name in runs.run_names(self.runs_dir, {}):
            best = RunDir(self.runs_dir / name).best
            if best.exists():
                out.append(str(best))
        return out

    # ---------------------------------------------------------------------------------------- build
    def new_spec(self):
        """The form of a new spec (offline, small), its file name and a message."""
        form = forms.spec_to_form(forms.NEW_SPEC)
        return (*self.values(form), f"{forms.NEW_SPEC['name']}.yaml", "new spec")

    @staticmethod
    def remember(file_name: str, *values) -> dict:
        """What the browser keeps of the Build form (``gr.BrowserState``): the file name and the fields."""
        return {"file": file_name, "form": dict(zip(FIELDS, values))}

    @staticmethod
    def restore(saved):
        """The form kept in the browser (see :meth:`remember`), on a page load: its fields, its file name and
        a message; nothing changes when the browser keeps none (or one of another form layout)."""
        form = saved.get("form") if isinstance(saved, dict) else None
        if not isinstance(form, dict) or set(form) != set(FIELDS):
            return (*[gr.skip()] * len(FIELDS), gr.skip(), gr.skip())
        file_name = saved.get("file") if isinstance(saved.get("file"), str) else gr.skip()
        return (*[form[k] for k in FIELDS], file_name, "restored the form as you left it (kept in this browser)")

    def load(self, choice: str):
        """Fill the form with spec ``FILE`` or ``FILE#NAME`` of the specs folder."""
        try:
            form = forms.spec_to_form(forms.load_spec(self.specs_dir, choice))
        except UserError as e:
            return (*[gr.skip()] * len(FIELDS), gr.skip(), _error(e))
        return (*self.values(form), f"{form['name']}.yaml", f"loaded {choice}")

    def preview(self, file_name: str, *values):
        """``(YAML, problems, field marks)``: the spec of the form, what ``kdgraph validate`` says about it
        (its lines, citing the preview's line numbers, or ``valid``), and each problem at its field
        (:func:`~kdgraph.ui.fielderrors.error_css`)."""
        form = self.form(values)
        file = self.spec_file(file_name)
        text, problems, form_problems = forms.preview(form, file, self.specs_dir, self.runs_dir)
        lines = [forms.preview_line(p, file) for p in problems]
        errors = fielderrors.field_errors(problems, form_problems, form)
        return text, "\n".join(lines) if lines else VALID, fielderrors.error_css(errors)

    def term_views(self, *values):
        """Per term slot (values: :data:`TERM_VIEW_KEYS`): its box (shown for slots in use), its positions box
        (feature methods), the pair editor (positions: pairs) and its description with what auto picks
        and the weight hint; then the wiring picture."""
        form = dict(zip(TERM_VIEW_KEYS, values))
        teacher_rows, student_rows, _ = forms.form_layers(form)
        count = int(form["loss.count"] or 0)
        out = []
        for i in range(MAX_TERMS):
            cls = forms.method_class(str(form[f"loss.{i}.method"] or ""))
            features = cls is not None and cls.features is not None
            pairs = form[f"loss.{i}.positions"] == "pairs"
            info = forms.term_info(form, i, teacher_rows, student_rows) if i < count else ""
            out += [gr.update(visible=i < count), gr.update(visible=features or pairs), gr.update(visible=pairs), info]
        try:
            picture = views.wiring_html(form, teacher_rows, student_rows)
        except UserError as e:
            picture = f'<div class="wiring empty">{_error(e)}</div>'
        return (*out, picture)

    def trace(self, text: str, pre: bool, *values):
        """The two layer tables (values: :data:`TRACE_KEYS`; filtered by ``text``; ``pre``: with the
        pre-activation entries) and a note."""
        form = dict(zip(TRACE_KEYS, values))
        teacher_rows, student_rows, notes = forms.form_layers(form)
        counts = []
        for role, rows in (("teacher", teacher_rows), ("student", student_rows)):
            model = str(form[f"{role}.model"] or "").strip()
            if rows is not None:
                shown = len(forms.layer_table(rows, text, pre))
                counts.append(f"{role} `{model}`: {shown} of {len(rows)} taps")
            else:
                counts.append(f"no {role}" if model in ("", forms.NO_TEACHER) else f"{role}: not traced")
        note = " · ".join(counts) + "".join(f"  \n⚠ {n}" for n in notes)
        return (views.layer_html(teacher_rows, text, pre, "teacher"),
                views.layer_html(student_rows, text, pre, "student"), note)

    @staticmethod
    def tap_choices(*values):
        """The tap choices of the pair editors (values: :data:`TAP_KEYS`): only those of the slots set to
        explicit pairs (hundreds of names, for eight dropdowns, are not sent for editors nobody sees)."""
        form = dict(zip(TAP_KEYS, values))
        editing = [form[f"loss.{i}.positions"] == "pairs" for i in range(MAX_TERMS)]
        if not any(editing):
            return [gr.skip()] * (2 * MAX_TERMS)
        teacher_rows, student_rows, _ = forms.form_layers(form)
        t_names = forms.tap_choices([r["name"] for r in teacher_rows or []])
        s_names = forms.tap_choices([r["name"] for r in student_rows or []])
        return [gr.update(choices=names) if editing[i] else gr.skip()
                for i in range(MAX_TERMS) for names in (t_names, s_names)]

    @staticmethod
    def method_changed(method: str, params: list):
        """A method picked for a term: its canonical weight, its parameters (values kept where the new
        method has a parameter of that name) and auto positions."""
        kept = {r[0]: r[1] for r in params or [] if len(r) > 1 and r[1] not in (None, "")}
        rows = forms.param_rows(method)
        for r in rows:
            r[1] = kept.get(r[0], "")
        weight = forms.method_defaults(method).get("weight")
        return forms._to_form("number", weight), rows, "auto"

    def add_term(self, count: int, teacher: str):
        """Show one more term slot, set to kd (with a teacher) or ce."""
        count = int(count or 0)
        if count >= MAX_TERMS:
            return (count, *[gr.skip()] * (MAX_TERMS * len(TERM_KEYS)))
        slot = forms.new_term(count, "kd" if teacher and teacher != forms.NO_TEACHER else "ce")
        out = []
        for i in range(MAX_TERMS):
            out += [slot[f"loss.{i}.{k}"] if i == count else gr.skip() for k in TERM_KEYS]
        return (count + 1, *out)

    def remove_term(self, index: int, count: int, *term_values):
        """Remove slot ``index``: the slots after it move up."""
        count = int(count or 0)
        slots = [term_values[i * len(TERM_KEYS):(i + 1) * len(TERM_KEYS)] for i in range(MAX_TERMS)]
        slots = slots[:index] + slots[index + 1:]
        empty = forms.term_to_form(MAX_TERMS - 1, None)
        slots.append([empty[f"loss.{MAX_TERMS - 1}.{k}"] for k in TERM_KEYS])
        return (max(count - 1, 0), *[v for slot in slots for v in slot])

    @staticmethod
    def add_pair(teacher_tap: str, student_tap: str, pairs: list):
        """Append ``[teacher_tap, student_tap]`` to a term's pairs (and switch it to explicit pairs)."""
        if not teacher_tap or not student_tap:
            return gr.skip(), gr.skip()
        rows = [list(r) for r in pairs or [] if any(str(c or "").strip() for c in r)]
        return rows + [[teacher_tap, student_tap]], "pairs"

    def save(self, file_name: str, overwrite: bool, *values):
        """Save the form's spec to the specs folder; ``(message, spec choices)``."""
        data, problems = forms.form_to_spec(self.form(values))
        if problems:
            return _error("fix the form first (the fields marked in red): " + "; ".join(m for _, m in problems)), \
                gr.skip()
        try:
            path = forms.save_spec(self.specs_dir, file_name, forms.spec_yaml(data), overwrite)
        except UserError as e:
            return _error(e), gr.skip()
        return f"saved {path}", self.spec_choices()

    def _gpus(self, devices: list | None, data: dict) -> list[int] | None:
        """The GPUs a run asks for: those ticked; none ticked: any free GPU; CPU for ``train.device: cpu``
        (a CPU slot, even on a machine with GPUs); GPU N for ``train.device: cuda:N``."""
        device = str((data.get("train") or {}).get("device") or "auto").strip()
        if device == "cpu":
            return []
        ticked = [int(d) for d in devices or []]
        pinned = jobs.pinned_gpu(device)
        if pinned is None:
            return ticked or None
        count = self.manager.gpu_count
        if not 0 <= pinned < count:
            raise UserError(f"train.device is {device} but this machine has "
                            + (f"GPUs 0 to {count - 1}" if count > 1 else "GPU 0 only" if count else "no GPU")
                            + ": pick another GPU, or set train.device to auto or cuda and tick the GPUs")
        if ticked and set(ticked) != {pinned}:
            raise UserError(f"train.device is {device} but GPU(s) {', '.join(map(str, ticked))} are ticked: "
                            f"untick them, or set train.device to auto or cuda")
        return [pinned]

    @staticmethod
    def _launch_data(data: dict) -> dict:
        """The spec as launched: ``train.device: cuda:N`` becomes ``cuda`` -- the run sees only the GPU(s)
        it was given (``CUDA_VISIBLE_DEVICES``), so its GPU N is cuda:0 there."""
        train = data.get("train") or {}
        if jobs.pinned_gpu(train.get("device")) is None:
            return data
        return {**data, "train": {**train, "device": "cuda"}}

    def start(self, file_name: str, devices: list, overwrite: bool, *values):
        """Start (or queue) the form's spec as a run: ``(message, selected tab, run choice)``."""
        form = self.form(values)
        data, _ = forms.form_to_spec(form)
        _, problems, form_problems = forms.preview(form, self.spec_file(file_name), self.specs_dir, self.runs_dir)
        problems = form_problems + problems
        skip = (gr.skip(), gr.skip(), gr.skip())
        if problems:
            return (_error(f"the spec has {len(problems)} problem(s), marked at their fields and listed under the "
                           f"preview: fix them first"), *skip)
        if data.get("sweep"):
            return _error("this spec has a sweep: block: save it and start it from the Sweeps tab"), *skip
        try:
            gpus = self._gpus(devices, data)
            job = self.manager.submit_run(data["name"], forms.launch_text(self._launch_data(data), self.specs_dir),
                                          gpus, overwrite)
        except UserError as e:
            return _error(e), *skip
        names = runs.run_names(self.runs_dir, self.manager.snapshot())
        return (f"{job.name}: {job.state} (output in {self.runs_dir / job.name})", gr.Tabs(selected="runs"),
                gr.update(choices=names, value=job.name), gr.Timer(active=True))

    # ---------------------------------------------------------------------------------------- runs
    def runs_table(self):
        return runs.runs_table(self.runs_dir, self.manager.snapshot())

    @staticmethod
    def _selector(names: list[str], current: str | None, known: list | None):
        """A selector's update -- only when its choices changed; with none selected, the first (the most
        recently active, so a reloaded page shows what is running) -- and the choices."""
        if not current and names:
            return gr.update(choices=names, value=names[0]), names
        if names == (known or []):
            return gr.skip(), names
        return gr.update(choices=names), names

    def run_choices(self, current: str | None, known: list | None):
        """The run selector (see :meth:`_selector`), and the compare selector's choices."""
        names = runs.run_names(self.runs_dir, self.manager.snapshot())
        selector, names = self._selector(names, current, known)
        return selector, names, gr.skip() if selector == gr.skip() else gr.update(choices=names)

    @staticmethod
    def select_run(table: list, evt: gr.SelectData):
        """The run of a clicked row of the runs table."""
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return table[row][0] if table and isinstance(row, int) and row < len(table) else gr.skip()

    def run_panel(self, name: str | None, compare: list | None = None, metric: str | None = None,
                  smoothing: float = 0.0, shown_log: str = ""):
        """The run view: text, the loss and accuracy charts (per epoch), the per-step loss chart, the chart
        comparing ``name`` with the runs ``compare`` on ``metric``, the metric choices, the log tail (skipped
        when unchanged since ``shown_log``, so a reader's scrolling is left alone), summary, spec, the stop
        and resume buttons, and the log shown."""
        off = gr.update(interactive=False, variant="secondary")
        blank = ("", "", "", "", gr.skip(), runs.log_html(""), {}, "", off, off, "")
        if not name:
            return ("select a run", *blank)
        try:
            view = runs.run_view(self.runs_dir, name, self.manager.snapshot().get(name))
        except UserError as e:
            return (_error(e), *blank)
        loss, acc = runs.epoch_charts(view)
        others = [n for n in compare or [] if n != name]
        choices = runs.compare_metrics(self.runs_dir, [name, *others])
        metric = metric if metric in [v for _, v in choices] else "test_top1"
        markdown = view["markdown"]
        board = runs.tensorboard_command(self.runs_dir, [name, *others]) if others else None
        if board and "--logdir_spec" in board:  # several runs with events (one: the run's own line says it)
            markdown += f"\n\nTensorBoard, these runs side by side: `{board}`"
        log = view["log"]
        return (markdown, loss, acc, runs.step_chart(view, float(smoothing or 0)),
                runs.compare_chart(self.runs_dir, [name, *others], metric, float(smoothing or 0)),
                gr.update(choices=choices, value=metric), gr.skip() if log == shown_log else runs.log_html(log),
                view["summary"], view["spec"], self._stop_button(view["can_stop"]),
                gr.update(interactive=view["can_resume"]), log)

    def export_run(self, name: str | None, fmt: str):
        """Export the selected run's student (``kdgraph export``): ``(message, file to download)``."""
        from kdgraph.app.export import export

        none = gr.update(value=None, visible=False)
        if not name:
            return _error("select a run first"), none
        if fmt not in EXPORT_FORMATS:
            return _error(f"choose a format: {', '.join(EXPORT_FORMATS)}"), none
        lines: list[str] = []
        try:
            with forms.TRACE_LOCK:  # exporting traces the model, as the form's tables do
                record = export(self.runs_dir / jobs.check_name(name), fmt, echo=lines.append)
        except UserError as e:
            return _error(e), none
        except Exception as e:  # noqa: BLE001 - a model the exporter cannot handle: say so, keep the page
            return _error(f"{fmt} export failed: {type(e).__name__}: {e}"), none
        return lines[-1] if lines else f"exported {record['file']}", gr.update(value=record["file"], visible=True)

    @staticmethod
    def _stop_button(active: bool):
        """The stop button: red and clickable only while the run or sweep is queued, running or stopping
        (a disabled red button still looks clickable, so it turns grey)."""
        return gr.update(interactive=active, variant="stop" if active else "secondary")

    def run_status(self, name: str) -> dict:
        """A run as data (the ``/run_status`` endpoint): name, status, exit, progress, summary, metrics, log,
        spec, can_stop, can_resume; or ``{"error": message}``."""
        try:
            view = runs.run_view(self.runs_dir, name, self.manager.snapshot().get(name))
        except UserError as e:
            return {"error": str(e)}
        return {k: v for k, v in view.items() if k not in ("markdown", "loss", "accuracy")}

    def stop(self, name: str | None) -> str:
        """Stop the selected run (or sweep): a message."""
        if not name:
            return _error("select a run first")
        try:
            return self.manager.stop(jobs.check_name(name))
        except UserError as e:
            return _error(e)

    def resume(self, name: str | None) -> str:
        """Resume the selected run from its checkpoint: a message."""
        if not name:
            return _error("select a run first")
        try:
            job = self.manager.resume(jobs.check_name(name))
        except UserError as e:
            return _error(e)
        return f"{name}: resuming ({job.state})"

    # ---------------------------------------------------------------------------------------- sweeps
    def start_sweep(self, file_name: str | None):
        """Start (or queue) ``kdgraph sweep`` of a spec file: ``(message, sweep choice)``."""
        from kdgraph import spec as specs

        if not file_name:
            return _error("choose a spec with a sweep: block"), gr.skip()
        try:
            path = jobs.inside(self.specs_dir, forms.check_file_name(file_name), "spec file")
            loaded = specs.load(path)
            if not loaded.get("sweep"):
                raise UserError(f"{path} has no sweep: block")
            problems = forms.validate(path.read_text(), path)
            if problems:
                raise UserError("the spec has problems (`kdgraph validate` lists them):\n" + "\n".join(problems))
            job = self.manager.submit_sweep(loaded["name"], path)
        except UserError as e:
            return _error(e), gr.skip()
        names = runs.sweep_names(self.runs_dir, self.manager.snapshot())
        return f"sweep {job.name}: {job.state}", gr.update(choices=names, value=job.name)

    def sweep_selector(self, current: str | None, known: list | None):
        """The sweep selector (see :meth:`_selector`)."""
        return self._selector(runs.sweep_names(self.runs_dir, self.manager.snapshot()), current, known)

    def sweep_panel(self, name: str | None):
        """The sweep view: text, the grid (HTML), the heatmap once done, the log tail and the stop button."""
        if not name:
            return "select a sweep", "", None, runs.log_html(""), self._stop_button(False)
        try:
            view = runs.sweep_view(self.runs_dir, name, self.manager.snapshot().get(name))
        except UserError as e:
            return _error(e), "", None, runs.log_html(""), self._stop_button(False)
        return (view["markdown"], runs.grid_html(view["header"], view["rows"]), view["heatmap"],
                runs.log_html(view["log"]), self._stop_button(view["can_stop"]))

    def sweep_status(self, name: str) -> dict:
        """A sweep as data (the ``/sweep_status`` endpoint): markdown, header, rows, heatmap, log, can_stop;
        or ``{"error": message}``."""
        try:
            return runs.sweep_view(self.runs_dir, name, self.manager.snapshot().get(name))
        except UserError as e:
            return {"error": str(e)}
