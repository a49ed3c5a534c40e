"""The kdgraph web UI: build specs, start and follow runs, compare them, run sweeps. ``kdgraph ui`` calls
:func:`serve`.

Three tabs: **Build** (a form for every spec key, both models' layer tables, the wiring picture of the
distillation, a live YAML preview checked like ``kdgraph validate`` with each problem marked at its
field; load, save and start), **Runs** (every run of the runs folder: curves per epoch and per step,
runs overlaid, the log's end, stop, resume and export) and **Sweeps** (start a sweep spec, watch its
grid). The logic lives in :mod:`~kdgraph.ui.forms`, :mod:`~kdgraph.ui.views`, :mod:`~kdgraph.ui.runs` and
:mod:`~kdgraph.ui.jobs`; this module lays out the widgets and wires their events to
:class:`~kdgraph.ui.handlers.Handlers`. Endpoints a script may call with ``gradio_client`` have names:
``/new_spec``, ``/load_spec``, ``/preview`` (file name and the form in :data:`~kdgraph.ui.forms.FIELDS`
order; returns the YAML, the problems and the field marks), ``/trace`` (filter, pre-activations, then the
fields of :data:`~kdgraph.ui.handlers.TRACE_KEYS`), ``/save_spec``, ``/start_run`` (inputs: file name,
GPUs, overwrite, then the form), ``/runs``, ``/run_status``, ``/stop_run``, ``/resume_run``,
``/export_run`` (run name, format), ``/start_sweep``, ``/sweep_status`` and ``/stop_sweep``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import gradio as gr

from kdgraph.app.rundir import RunDir
from kdgraph.registry import set_import_policy
from kdgraph.spec import schema

from . import forms
from .forms import FIELDS, MAX_TERMS, NEW_SPEC, TERM_KEYS
from .handlers import EXPORT_FORMATS, TAP_KEYS, TERM_VIEW_KEYS, TRACE_KEYS, Handlers
from .jobs import JobManager, gpu_list
from .runs import RUN_HEADERS

POLL_SECONDS = 2.0
FORM_STORAGE_KEY = "kdgraph-ui-build-form"
PRIVATE = dict(api_visibility="private")
QUIET = dict(show_progress="hidden")  # no spinner over widgets refreshed in the background


def model_choices() -> list[str]:
    """Registry models, then every torchvision classifier as ``torchvision:NAME``."""
    from torchvision import models

    from kdgraph.models import MODELS

    return MODELS.names() + [f"torchvision:{n}" for n in models.list_models(module=models)]


def _enum(*path: str) -> list[str]:
    node = schema()
    for key in path:
        node = node["properties"][key]
    return list(node["enum"])


class _Fields:
    """Makes the form's widgets, each under its :data:`FIELDS` key in ``self.c``, filled from ``form``."""

    def __init__(self, form: dict):
        self.form, self.c = form, {}

    def _add(self, key: str, widget):
        self.c[key] = widget
        return widget

    def text(self, key: str, label: str, **kw):
        return self._add(key, gr.Textbox(value=self.form[key], label=label, elem_id=key.replace(".", "-"), **kw))

    def number(self, key: str, label: str, integer: bool = False, **kw):
        return self._add(key, gr.Number(value=self.form[key], label=label, precision=0 if integer else None,
                                        elem_id=key.replace(".", "-"), **kw))

    def check(self, key: str, label: str, **kw):
        return self._add(key, gr.Checkbox(value=self.form[key], label=label, elem_id=key.replace(".", "-"), **kw))

    def choice(self, key: str, label: str, choices: list, custom: bool = False, **kw):
        return self._add(key, gr.Dropdown(choices=choices, value=self.form[key], label=label,
                                          allow_custom_value=custom, elem_id=key.replace(".", "-"), **kw))


# ----------------------------------------------------------------------------------------- the Build tab
def _data_section(f: _Fields) -> SimpleNamespace:
    from kdgraph.data import DATASETS

    with gr.Accordion("Data", open=True):
        with gr.Row():
            f.choice("data.dataset", "dataset", DATASETS.names(), custom=True, info="or package.module:callable")
            f.text("data.root", "root")
            f.number("data.batch_size", "batch size", integer=True)
            f.text("data.test_batch_size", "test batch size", placeholder="2 x batch size")
            f.choice("data.loader", "loader", _enum("data", "loader"),
                     info="tensor: the data set on the device, batched augmentation")
            f.number("data.workers", "loader workers", integer=True)
        with gr.Row():
            f.check("data.download", "download")
            f.check("data.augment", "augment")
            f.choice("data.pin_memory", "pin memory", list(forms.TRISTATE))
            f.choice("data.persistent_workers", "persistent workers", list(forms.TRISTATE))
        with gr.Row():
            f.text("data.options", "options (YAML mapping)", placeholder="{size: 16}")
            f.text("data.labels", "labels kept (the rest unlabelled)",
                   placeholder="all; or {count: 40} or {fraction: 0.05}")
        hint = gr.Markdown(forms.dataset_options(f.form["data.dataset"]), elem_id="options-hint")
    return SimpleNamespace(options_hint=hint)


def _models_section(f: _Fields, h: Handlers, models: list[str]) -> None:
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Teacher")
            f.choice("teacher.model", "teacher model", [forms.NO_TEACHER] + models, custom=True,
                     info="registry name, torchvision:NAME or package.module:callable")
            f.choice("teacher.checkpoint", "checkpoint", h.checkpoint_choices(), custom=True,
                     info="a kdgraph checkpoint or a state_dict file")
            f.choice("teacher.from_spec", "or train it first from spec (from_spec)", forms.spec_choices(h.specs_dir),
                     custom=True)
            f.text("teacher.weights", "or torchvision weights", placeholder="DEFAULT")
            f.text("teacher.kwargs", "model kwargs (YAML mapping)")
        with gr.Column():
            gr.Markdown("### Student")
            f.choice("student.model", "student model", models, custom=True,
                     info="registry name, torchvision:NAME or package.module:callable")
            f.text("student.checkpoint", "initial checkpoint")
            f.text("student.weights", "torchvision weights")
            f.text("student.kwargs", "model kwargs (YAML mapping)")


def _trace_section(f: _Fields) -> SimpleNamespace:
    with gr.Accordion("Trace: the layers of both models", open=True):
        with gr.Row():
            layer_filter = gr.Textbox(label="filter (name or op)", elem_id="layer-filter")
            show_pre = gr.Checkbox(value=True, label="pre-activation entries (NAME:pre)", elem_id="show-pre")
            f.text("trace.leaf_modules", "leaf modules (kept opaque; comma-separated)")
        note = gr.Markdown(elem_id="trace-note")
        with gr.Row():
            with gr.Column():
                gr.Markdown("teacher layers")
                teacher = gr.HTML(elem_id="teacher-layers")
            with gr.Column():
                gr.Markdown("student layers")
                student = gr.HTML(elem_id="student-layers")
    return SimpleNamespace(layer_filter=layer_filter, show_pre=show_pre, note=note, teacher=teacher, student=student)


def _term_slot(f: _Fields, i: int, methods: list[str]) -> dict:
    slot = {}
    with gr.Group(visible=i < f.form["loss.count"]) as slot["box"]:
        with gr.Row(equal_height=True):
            f.choice(f"loss.{i}.method", f"term {i + 1}: method", methods, custom=True, scale=2)
            f.text(f"loss.{i}.weight", "weight", placeholder="canonical", scale=1)
            slot["remove"] = gr.Button("Remove", size="sm", scale=0, min_width=90, elem_id=f"loss-{i}-remove")
        slot["info"] = gr.Markdown(elem_id=f"loss-{i}-info")
        f.c[f"loss.{i}.params"] = gr.Dataframe(
            value=f.form[f"loss.{i}.params"], headers=forms.PARAMS_HEADERS, type="array", static_columns=[0, 2],
            label="parameters (an empty value is the default)", elem_id=f"loss-{i}-params")
        with gr.Column(visible=False) as slot["positions"]:
            f.choice(f"loss.{i}.positions", "positions", list(forms.POSITION_MODES))
            with gr.Column(visible=False) as slot["pairs"]:
                with gr.Row(equal_height=True):
                    slot["t_tap"] = gr.Dropdown(label="teacher tap", allow_custom_value=True,
                                                elem_id=f"loss-{i}-teacher-tap")
                    slot["s_tap"] = gr.Dropdown(label="student tap", allow_custom_value=True,
                                                elem_id=f"loss-{i}-student-tap")
                    slot["add"] = gr.Button("Add pair", size="sm", elem_id=f"loss-{i}-add-pair")
                    slot["clear"] = gr.Button("Clear", size="sm")
                f.c[f"loss.{i}.pairs"] = gr.Dataframe(value=f.form[f"loss.{i}.pairs"], headers=forms.PAIRS_HEADERS,
                                                      type="array", label="pairs", elem_id=f"loss-{i}-pairs")
    return slot


def _recipe_section(f: _Fields) -> None:
    with gr.Accordion("Training recipe", open=True):
        with gr.Row():
            f.number("train.epochs", "epochs", integer=True)
            f.text("train.max_steps_per_epoch", "max steps per epoch", placeholder="all")
            f.choice("train.device", "device", ["auto", "cpu", "cuda", "mps"], custom=True)
            f.choice("train.precision", "precision", _enum("train", "precision"))
            f.number("train.seed", "seed", integer=True)
            f.text("seeds", "seeds (one run each)", placeholder="[0, 1, 2] instead of seed")
        with gr.Row():
            f.choice("train.optimizer.name", "optimizer", _enum("train", "optimizer", "name"))
            f.number("train.optimizer.lr", "learning rate")
            f.number("train.optimizer.momentum", "momentum")
            f.number("train.optimizer.weight_decay", "weight decay")
            f.check("train.optimizer.nesterov", "Nesterov")
            f.text("train.optimizer.betas", "betas (AdamW)")
        with gr.Row():
            f.choice("train.schedule.name", "schedule", _enum("train", "schedule", "name"))
            f.text("train.schedule.milestones", "milestones (multistep)")
            f.number("train.schedule.gamma", "gamma")
            f.number("train.schedule.step_size", "step size (step)", integer=True)
            f.number("train.schedule.min_lr", "min lr (cosine)")
            f.number("train.schedule.warmup_epochs", "warm-up epochs")
        with gr.Row():
            f.text("train.grad_clip", "gradient clipping", placeholder="none")
            f.check("train.compile", "torch.compile")
            f.check("train.channels_last", "channels last")
            f.check("train.sync_bn", "SyncBatchNorm (several GPUs)")
            f.check("log.tensorboard", "TensorBoard")
            f.number("log.every", "log every N steps", integer=True, info="log lines and per-step loss rows")
    with gr.Accordion("Sweep (optional): key paths mapped to the values to try", open=False):
        f.c["sweep"] = gr.Code(value=f.form["sweep"], language="yaml", label="sweep", elem_id="sweep")
    with gr.Accordion("Published result (optional): `kdgraph report` compares with it", open=False):
        f.c["expect"] = gr.Code(value=f.form["expect"], language="yaml", label="expect: top1, source",
                                elem_id="expect")


def _side_column(gpus: list[str]) -> SimpleNamespace:
    """The right column: the YAML, its problems, save and start."""
    s = SimpleNamespace()
    s.yaml = gr.Code(language="yaml", interactive=False, label="spec (YAML)", wrap_lines=True, elem_id="yaml-preview")
    s.problems = gr.Textbox(label="kdgraph validate (line numbers of the YAML above)", lines=3, max_lines=12,
                            interactive=False, elem_id="problems")
    with gr.Group():
        with gr.Row(equal_height=True):
            s.file_name = gr.Textbox(value=f"{NEW_SPEC['name']}.yaml", elem_id="file-name",
                                     label="file in the specs folder", scale=3)
            s.overwrite_spec = gr.Checkbox(label="overwrite", elem_id="overwrite-spec", scale=1)
        s.save = gr.Button("Save spec", elem_id="save-button")
        s.save_msg = gr.Markdown(elem_id="save-message")
    with gr.Group():
        s.devices = gr.CheckboxGroup(choices=[(f"GPU {i}: {n}", i) for i, n in enumerate(gpus)],
                                     label="GPUs (none ticked: the first free one)", visible=bool(gpus),
                                     elem_id="devices")
        if not gpus:
            gr.Markdown("Runs on the CPU: torch sees no GPU.")
        s.overwrite_run = gr.Checkbox(label="overwrite an existing run of this name", elem_id="overwrite-run")
        s.start = gr.Button("Start run", variant="primary", elem_id="start-button")
        s.start_msg = gr.Markdown(elem_id="start-message")
    return s


def _build_tab(h: Handlers, gpus: list[str]) -> SimpleNamespace:
    from kdgraph.losses import LOSSES

    f = _Fields(forms.spec_to_form(NEW_SPEC))
    b = SimpleNamespace(fields=f)
    with gr.Row(equal_height=True):
        b.load_choice = gr.Dropdown(choices=forms.spec_choices(h.specs_dir), value=None,
                                    label="spec in the specs folder",
                                    allow_custom_value=True, elem_id="load-choice", scale=4)
        b.load = gr.Button("Load into the form", elem_id="load-button", scale=1)
        b.new = gr.Button("New spec", elem_id="new-button", scale=1)
    b.msg = gr.Markdown(elem_id="build-message")
    b.errors = gr.HTML(elem_id="field-errors")  # a stylesheet marking the fields with problems
    with gr.Row():
        with gr.Column(scale=5):
            with gr.Row():
                f.text("name", "name (the run directory)")
                f.text("description", "description", scale=2)
            b.data = _data_section(f)
            _models_section(f, h, model_choices())
            b.trace = _trace_section(f)
            with gr.Accordion("Loss terms", open=True):
                f.number("loss.count", "terms", integer=True, visible=False)
                b.slots = [_term_slot(f, i, LOSSES.names()) for i in range(MAX_TERMS)]
                b.add_term = gr.Button("Add a loss term", elem_id="add-term")
            with gr.Accordion("Wiring: every distillation pair between teacher and student, with its connector",
                              open=True):
                b.wiring = gr.HTML(elem_id="wiring")
            _recipe_section(f)
        with gr.Column(scale=2, min_width=360):
            b.side = _side_column(gpus)
    return b


def _build_events(h: Handlers, b: SimpleNamespace, saved_form, tabs, run_select, run_timer) -> list:
    """Wire the Build tab; returns the term views (for the page-load event)."""
    c, s, t = b.fields.c, b.side, b.trace
    fields = [c[k] for k in FIELDS]
    term_widgets = [c[f"loss.{i}.{k}"] for i in range(MAX_TERMS) for k in TERM_KEYS]
    views = [v for sl in b.slots for v in (sl["box"], sl["positions"], sl["pairs"], sl["info"])] + [b.wiring]
    taps = [tap for sl in b.slots for tap in (sl["t_tap"], sl["s_tap"])]
    trace_in = [c[k] for k in TRACE_KEYS]
    changes = [w.change for w in fields] + [s.file_name.change]
    # in the order they run after a change: the layer tables first, the YAML check (the slowest) last
    gr.on([w.change for w in trace_in] + [t.layer_filter.change, t.show_pre.change], h.trace,
          [t.layer_filter, t.show_pre, *trace_in], [t.teacher, t.student, t.note], api_name="trace",
          trigger_mode="always_last", show_progress="minimal")
    gr.on([c[k].change for k in TERM_VIEW_KEYS], h.term_views, [c[k] for k in TERM_VIEW_KEYS], views,
          trigger_mode="always_last", **PRIVATE, **QUIET)
    gr.on([c[k].change for k in TAP_KEYS], h.tap_choices, [c[k] for k in TAP_KEYS], taps, trigger_mode="always_last",
          **PRIVATE, **QUIET)
    gr.on(changes, h.preview, [s.file_name, *fields], [s.yaml, s.problems, b.errors], api_name="preview",
          trigger_mode="always_last", show_progress="minimal")
    c["data.dataset"].change(forms.dataset_options, c["data.dataset"], b.data.options_hint, **PRIVATE)
    c["name"].input(lambda n: f"{n.strip()}.yaml" if n.strip() else gr.skip(), c["name"], s.file_name,
                    trigger_mode="always_last", **PRIVATE)
    gr.on(changes, h.remember, [s.file_name, *fields], saved_form, trigger_mode="always_last", **PRIVATE, **QUIET)
    b.load.click(h.load, b.load_choice, [*fields, s.file_name, b.msg], api_name="load_spec").then(
        lambda: "", None, s.save_msg, **PRIVATE, **QUIET)
    b.new.click(h.new_spec, None, [*fields, s.file_name, b.msg], api_name="new_spec").then(
        lambda: "", None, s.save_msg, **PRIVATE, **QUIET)
    b.add_term.click(h.add_term, [c["loss.count"], c["teacher.model"]], [c["loss.count"], *term_widgets], **PRIVATE)
    for i, slot in enumerate(b.slots):
        method, params = c[f"loss.{i}.method"], c[f"loss.{i}.params"]
        positions, pairs = c[f"loss.{i}.positions"], c[f"loss.{i}.pairs"]
        method.input(h.method_changed, [method, params], [c[f"loss.{i}.weight"], params, positions], **PRIVATE)
        slot["remove"].click(lambda n, *v, i=i: h.remove_term(i, n, *v), [c["loss.count"], *term_widgets],
                             [c["loss.count"], *term_widgets], **PRIVATE)
        slot["add"].click(h.add_pair, [slot["t_tap"], slot["s_tap"], pairs], [pairs, positions], **PRIVATE)
        slot["clear"].click(lambda: ([], "auto"), None, [pairs, positions], **PRIVATE)
    s.save.click(h.save, [s.file_name, s.overwrite_spec, *fields], [s.save_msg, b.load_choice], api_name="save_spec")
    s.start.click(h.start, [s.file_name, s.devices, s.overwrite_run, *fields],
                  [s.start_msg, tabs, run_select, run_timer], api_name="start_run")
    return views


# ------------------------------------------------------------------------------------------ the Runs tab
def _runs_tab() -> SimpleNamespace:
    r = SimpleNamespace()
    r.table = gr.Dataframe(headers=RUN_HEADERS, type="array", interactive=False, label="runs", max_height=320,
                           elem_id="runs-table")
    with gr.Row(equal_height=True):
        r.select = gr.Dropdown(label="run", allow_custom_value=True, elem_id="run-select", scale=3)
        r.stop = gr.Button("Stop", variant="secondary", interactive=False, elem_id="stop-button", scale=1)
        r.resume = gr.Button("Resume", interactive=False, elem_id="resume-button", scale=1)
        r.refresh = gr.Button("Refresh", scale=1)
    r.msg = gr.Markdown(elem_id="run-message")
    r.status = gr.Markdown(elem_id="run-status")
    with gr.Row():
        r.loss = gr.HTML(elem_id="loss-plot")
        r.accuracy = gr.HTML(elem_id="accuracy-plot")
    with gr.Row():
        with gr.Column(scale=3):
            r.steps = gr.HTML(elem_id="step-plot")
        with gr.Column(scale=1):
            r.smoothing = gr.Slider(0, 0.99, value=0.6, step=0.01, label="smoothing of per-step curves",
                                    info="TensorBoard's moving average; 0: none", elem_id="smoothing")
    with gr.Accordion("Compare: overlay other runs", open=True):
        with gr.Row(equal_height=True):
            r.compare = gr.Dropdown(multiselect=True, label="runs to overlay on the selected one",
                                    allow_custom_value=False, elem_id="compare-runs", scale=3)
            r.metric = gr.Dropdown(choices=[("test top-1 (%)", "test_top1")], value="test_top1", label="metric",
                                   elem_id="compare-metric", scale=2)
        r.compare_chart = gr.HTML(elem_id="compare-plot")
    gr.Markdown("log (the end of the run's output; it follows new lines)")
    r.log = gr.HTML(elem_id="run-log")
    with gr.Accordion("Export the student (no teacher, no connectors)", open=True):
        with gr.Row(equal_height=True):
            r.export_format = gr.Dropdown(choices=EXPORT_FORMATS, value="onnx", label="format",
                                          elem_id="export-format", scale=2)
            r.export = gr.Button("Export", elem_id="export-button", scale=1)
        r.export_msg = gr.Markdown(elem_id="export-message")
        r.export_file = gr.File(label="exported file", interactive=False, visible=False, elem_id="export-file")
    with gr.Accordion(RunDir.SUMMARY, open=False):
        r.summary = gr.JSON(elem_id="run-summary")
    with gr.Accordion("spec", open=False):
        r.spec = gr.Code(language="yaml", interactive=False, elem_id="run-spec")
    r.names = gr.State([])
    r.shown_log = gr.State("")
    return r


def _runs_events(h: Handlers, r: SimpleNamespace, demo, run_timer) -> None:
    panel_in = [r.select, r.compare, r.metric, r.smoothing, r.shown_log]
    panel = [r.status, r.loss, r.accuracy, r.steps, r.compare_chart, r.metric, r.log, r.summary, r.spec, r.stop,
             r.resume, r.shown_log]
    one_at_a_time = dict(concurrency_id="run_panel", concurrency_limit=1)
    gr.on([run_timer.tick, r.refresh.click, demo.load], h.runs_table, None, r.table, api_name="runs", **QUIET)
    gr.on([run_timer.tick, demo.load], h.run_choices, [r.select, r.names], [r.select, r.names, r.compare],
          **PRIVATE, **QUIET)
    gr.on([run_timer.tick, r.select.change, r.compare.change, r.metric.input, r.smoothing.release], h.run_panel,
          panel_in, panel, trigger_mode="always_last", **PRIVATE, **QUIET, **one_at_a_time)
    gr.api(h.run_status, api_name="run_status")
    r.table.select(h.select_run, r.table, r.select, **PRIVATE)
    r.stop.click(h.stop, r.select, r.msg, api_name="stop_run")
    r.resume.click(h.resume, r.select, r.msg, api_name="resume_run")
    r.export.click(h.export_run, [r.select, r.export_format], [r.export_msg, r.export_file], api_name="export_run")


# ---------------------------------------------------------------------------------------- the Sweeps tab
def _sweeps_tab(h: Handlers) -> SimpleNamespace:
    w = SimpleNamespace()
    with gr.Row(equal_height=True):
        w.spec = gr.Dropdown(choices=forms.sweep_files(h.specs_dir), label="spec with a sweep: block",
                             allow_custom_value=True, elem_id="sweep-spec", scale=3)
        w.start = gr.Button("Start sweep", variant="primary", elem_id="sweep-start", scale=1)
    w.msg = gr.Markdown(elem_id="sweep-message")
    with gr.Row(equal_height=True):
        w.select = gr.Dropdown(label="sweep", allow_custom_value=True, elem_id="sweep-select", scale=3)
        w.stop = gr.Button("Stop sweep", variant="secondary", interactive=False, elem_id="sweep-stop", scale=1)
    w.status = gr.Markdown(elem_id="sweep-status")
    gr.Markdown("best test top-1 (%)")
    w.grid = gr.HTML(elem_id="sweep-grid")
    w.heatmap = gr.Image(label="heatmap", type="filepath", interactive=False, elem_id="heatmap")
    gr.Markdown("log (the end of the sweep's output)")
    w.log = gr.HTML(elem_id="sweep-log")
    w.names = gr.State([])
    return w


def _sweeps_events(h: Handlers, w: SimpleNamespace, b: SimpleNamespace, demo, sweep_timer) -> None:
    panel = [w.status, w.grid, w.heatmap, w.log, w.stop]
    w.start.click(h.start_sweep, w.spec, [w.msg, w.select], api_name="start_sweep")
    gr.on([sweep_timer.tick, demo.load], h.sweep_selector, [w.select, w.names], [w.select, w.names], **PRIVATE,
          **QUIET)
    gr.on([sweep_timer.tick, w.select.change], h.sweep_panel, w.select, panel, trigger_mode="always_last",
          **PRIVATE, **QUIET)
    gr.api(h.sweep_status, api_name="sweep_status")
    w.stop.click(h.stop, w.select, w.msg, api_name="stop_sweep")
    b.side.save.click(h.sweep_choices, None, w.spec, **PRIVATE)


# ---------------------------------------------------------------------------------------------- the page
def build(handlers: Handlers, gpus: list[str]) -> gr.Blocks:
    """The page (a :class:`gr.Blocks`) for ``handlers``; ``gpus`` are the names of the GPUs to offer."""
    h = handlers
    with gr.Blocks(title="kdgraph", analytics_enabled=False) as demo:
        gr.Markdown("## kdgraph — knowledge distillation specs, runs and sweeps")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Build", id="build") as build_tab:
                b = _build_tab(h, gpus)
            with gr.Tab("Runs", id="runs") as runs_tab:
                r = _runs_tab()
            with gr.Tab("Sweeps", id="sweeps") as sweeps_tab:
                w = _sweeps_tab(h)
        # polling only while its tab is shown: the Build tab's events get the process to themselves
        run_timer, sweep_timer = gr.Timer(POLL_SECONDS, active=False), gr.Timer(POLL_SECONDS, active=False)
        for tab, active in ((build_tab, (False, False)), (runs_tab, (True, False)), (sweeps_tab, (False, True))):
            tab.select(lambda a=active: (gr.Timer(active=a[0]), gr.Timer(active=a[1])), None, [run_timer, sweep_timer],
                       **PRIVATE, **QUIET)
        # the Build form, kept in this browser's localStorage so that a reload does not lose it
        saved_form = gr.BrowserState(None, storage_key=FORM_STORAGE_KEY, secret=FORM_STORAGE_KEY)
        term_views = _build_events(h, b, saved_form, tabs, r.select, run_timer)
        _runs_events(h, r, demo, run_timer)
        _sweeps_events(h, w, b, demo, sweep_timer)
        _load_events(h, b, demo, saved_form, term_views)
    return demo


def _load_events(h: Handlers, b: SimpleNamespace, demo, saved_form, term_views: list) -> None:
    c, s, t = b.fields.c, b.side, b.trace
    fields = [c[k] for k in FIELDS]
    trace_in = [c[k] for k in TRACE_KEYS]
    demo.load(h.restore, saved_form, [*fields, s.file_name, b.msg], **PRIVATE, **QUIET)
    demo.load(h.preview, [s.file_name, *fields], [s.yaml, s.problems, b.errors], **PRIVATE)
    demo.load(h.term_views, [c[k] for k in TERM_VIEW_KEYS], term_views, **PRIVATE)
    demo.load(h.trace, [t.layer_filter, t.show_pre, *trace_in], [t.teacher, t.student, t.note], **PRIVATE)
    demo.load(h.tap_choices, [c[k] for k in TAP_KEYS], [tap for sl in b.slots for tap in (sl["t_tap"], sl["s_tap"])],
              **PRIVATE)
    demo.load(lambda: (h.spec_choices(), h.spec_choices(), gr.update(choices=h.checkpoint_choices())), None,
              [b.load_choice, c["teacher.from_spec"], c["teacher.checkpoint"]], **PRIVATE, **QUIET)


def create(runs_dir: str | Path = "runs", specs_dir: str | Path = "specs", *, cpu_slots: int | None = None,
           stop_timeout: float = 60.0) -> tuple[gr.Blocks, JobManager]:
    """The page and the job manager of a runs folder (``cpu_slots`` default: ``$KDGRAPH_UI_CPU_SLOTS`` or 1)."""
    slots = cpu_slots if cpu_slots is not None else int(os.environ.get("KDGRAPH_UI_CPU_SLOTS", "1"))
    manager = JobManager(runs_dir, cpu_slots=slots, stop_timeout=stop_timeout)
    try:
        Path(specs_dir).mkdir(parents=True, exist_ok=True)
        demo = build(Handlers(specs_dir, runs_dir, manager), gpu_list() if manager.gpu_count else [])
    except BaseException:
        manager.close()
        raise
    threading.Thread(target=_warm_up, daemon=True, name="kdgraph-ui-warm-up").start()
    return demo, manager


def _warm_up() -> None:
    """Trace the new spec's model once in the background: the first trace of a process pays for torch.fx's
    and the fake tensors' set-up (seconds), which the user's first model change would otherwise wait for."""
    try:
        forms.form_layers(forms.spec_to_form(NEW_SPEC))
    except Exception:  # noqa: BLE001 -- a warm-up only
        pass


def launch(demo: gr.Blocks, runs_dir: str | Path, *, host: str = "127.0.0.1", port: int = 7860,
           auth: tuple[str, str] | None = None, prevent_thread_lock: bool = False,
           allowed_hosts: Sequence[str] = ()):
    """Serve the page (the runs folder's files, e.g. heatmaps and exported students, may be
    downloaded). Requests whose ``Host``
    header names neither the address served nor one of ``allowed_hosts`` are refused (HTTP 400): a page
    of another site that a DNS name rebound to this machine cannot drive the UI."""
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    hosts = host_names(host, allowed_hosts)
    return demo.queue().launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=prevent_thread_lock,
                               allowed_paths=[str(Path(runs_dir).resolve())], show_error=True,
                               app_kwargs={"middleware": [Middleware(TrustedHostMiddleware, allowed_hosts=hosts)]})


def host_names(host: str, allowed_hosts: Sequence[str] = ()) -> list[str]:
    """The names a request's ``Host`` may give: the address served (and, for a loopback one, ``localhost``
    and ``127.0.0.1``; for all interfaces, this machine's names and addresses) and ``allowed_hosts``
    (``*`` allows any)."""
    import socket

    names = {host, "localhost", "127.0.0.1"} | {h.strip() for h in allowed_hosts if h.strip()}
    if host in ("0.0.0.0", "::", ""):
        with contextlib.suppress(OSError):
            name, aliases, addresses = socket.gethostbyname_ex(socket.gethostname())
            names |= {socket.gethostname(), socket.getfqdn(), name, *aliases, *addresses}
    return sorted(n for n in names if n)


def serve(host: str = "127.0.0.1", port: int = 7860, runs_dir: str | Path = "runs", specs_dir: str | Path = "specs",
          auth: tuple[str, str] | None = None, allow_imports: Sequence[str] = (),
          allowed_hosts: Sequence[str] = ()) -> None:
    """Serve the UI until interrupted (runs started from it keep running; a new UI re-attaches to them).

    The UI imports no module a spec names (``package.module:Name``) unless it is under one of
    ``allow_imports`` (never the standard library); the runs it starts get the same policy.
    """
    set_import_policy(allow_imports, "kdgraph ui" + (f" --allow-imports {','.join(allow_imports)}"
                                                      if allow_imports else ": without --allow-imports"))
    demo, manager = create(runs_dir, specs_dir)
    print(f"kdgraph ui: specs in {Path(specs_dir).resolve()}, runs in {Path(runs_dir).resolve()}")
    try:
        launch(demo, runs_dir, host=host, port=port, auth=auth, allowed_hosts=allowed_hosts)
    finally:
        manager.close()
