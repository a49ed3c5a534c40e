"""The kdgraph web UI: build specs, start and follow runs, run sweeps. ``kdgraph ui`` calls :func:`serve`.

Three tabs: **Build** (a form for every spec key, both models' layer tables, a live YAML preview checked
like ``kdgraph validate``; load, save and start), **Runs** (every run of the runs folder, curves, log, stop
and resume) and **Sweeps** (start a sweep spec, watch its grid). The logic lives in
:mod:`~kdgraph.ui.forms`, :mod:`~kdgraph.ui.runs` and :mod:`~kdgraph.ui.jobs`; this module lays out the
widgets and wires their events to :class:`~kdgraph.ui.handlers.Handlers`. Endpoints a script may call
with ``gradio_client`` have names: ``/new_spec``, ``/load_spec``, ``/preview``, ``/trace``,
``/save_spec``, ``/start_run`` (inputs: file name, GPUs, overwrite, then the form in
:data:`~kdgraph.ui.forms.FIELDS` order), ``/runs``, ``/run_status``, ``/stop_run``, ``/resume_run``,
``/start_sweep``, ``/sweep_status`` and ``/stop_sweep``.
"""
from __future__ import annotations

import os
from pathlib import Path

import gradio as gr

from kdgraph.app.rundir import RunDir
from kdgraph.spec import schema

from . import forms
from .forms import FIELDS, MAX_TERMS, NEW_SPEC, TERM_KEYS
from .handlers import Handlers
from .jobs import JobManager, gpu_list
from .runs import RUN_HEADERS

POLL_SECONDS = 2.0
FORM_STORAGE_KEY = "kdgraph-ui-build-form"
LAYER_WIDTHS = ["38%", "27%", "14%", "21%"]


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


def build(handlers: Handlers, gpus: list[str]) -> gr.Blocks:
    """The page (a :class:`gr.Blocks`) for ``handlers``; ``gpus`` are the names of the GPUs to offer."""
    from kdgraph.data import DATASETS
    from kdgraph.losses import LOSSES

    h = handlers
    form = forms.spec_to_form(NEW_SPEC)
    models = model_choices()
    c: dict[str, gr.components.Component] = {}  # the form's widgets by FIELDS key

    def text(key: str, label: str, **kw):
        c[key] = gr.Textbox(value=form[key], label=label, elem_id=key.replace(".", "-"), **kw)

    def number(key: str, label: str, integer: bool = False, **kw):
        c[key] = gr.Number(value=form[key], label=label, precision=0 if integer else None,
                           elem_id=key.replace(".", "-"), **kw)

    def check(key: str, label: str, **kw):
        c[key] = gr.Checkbox(value=form[key], label=label, elem_id=key.replace(".", "-"), **kw)

    def choice(key: str, label: str, choices: list, custom: bool = False, **kw):
        c[key] = gr.Dropdown(choices=choices, value=form[key], label=label, allow_custom_value=custom,
                             elem_id=key.replace(".", "-"), **kw)

    with gr.Blocks(title="kdgraph", analytics_enabled=False) as demo:
        gr.Markdown("## kdgraph — knowledge distillation specs, runs and sweeps")
        with gr.Tabs(elem_id="tabs") as tabs:
            # ------------------------------------------------------------------------------ Build
            with gr.Tab("Build", id="build"):
                with gr.Row(equal_height=True):
                    load_choice = gr.Dropdown(choices=forms.spec_choices(h.specs_dir), value=None,
                                              label="spec in the specs folder",
                                              allow_custom_value=True, elem_id="load-choice", scale=4)
                    load_btn = gr.Button("Load into the form", elem_id="load-button", scale=1)
                    new_btn = gr.Button("New spec", elem_id="new-button", scale=1)
                build_msg = gr.Markdown(elem_id="build-message")
                with gr.Row():
                    with gr.Column(scale=5):
                        with gr.Row():
                            text("name", "name (the run directory)")
                            text("description", "description", scale=2)
                        with gr.Accordion("Data", open=True):
                            with gr.Row():
                                choice("data.dataset", "dataset", DATASETS.names(), custom=True,
                                       info="or package.module:callable")
                                text("data.root", "root")
                                number("data.batch_size", "batch size", integer=True)
                                text("data.test_batch_size", "test batch size", placeholder="2 x batch size")
                                choice("data.loader", "loader", _enum("data", "loader"),
                                       info="tensor: the data set on the device, batched augmentation")
                                number("data.workers", "loader workers", integer=True)
                            with gr.Row():
                                check("data.download", "download")
                                check("data.augment", "augment")
                                choice("data.pin_memory", "pin memory", list(forms.TRISTATE))
                                choice("data.persistent_workers", "persistent workers", list(forms.TRISTATE))
                            with gr.Row():
                                text("data.options", "options (YAML mapping)", placeholder="{size: 16}")
                                text("data.labels", "labels kept (the rest unlabelled)",
                                     placeholder="all; or {count: 40} or {fraction: 0.05}")
                            options_hint = gr.Markdown(forms.dataset_options(form["data.dataset"]),
                                                       elem_id="options-hint")
                        with gr.Row():
                            with gr.Column():
                                gr.Markdown("### Teacher")
                                choice("teacher.model", "teacher model", [forms.NO_TEACHER] + models, custom=True,
                                       info="registry name, torchvision:NAME or package.module:callable")
                                choice("teacher.checkpoint", "checkpoint", h.checkpoint_choices(), custom=True,
                                       info="a kdgraph checkpoint or a state_dict file")
                                choice("teacher.from_spec", "or train it first from spec (from_spec)",
                                       forms.spec_choices(h.specs_dir), custom=True)
                                text("teacher.weights", "or torchvision weights", placeholder="DEFAULT")
                                text("teacher.kwargs", "model kwargs (YAML mapping)")
                            with gr.Column():
                                gr.Markdown("### Student")
                                choice("student.model", "student model", models, custom=True,
                                       info="registry name, torchvision:NAME or package.module:callable")
                                text("student.checkpoint", "initial checkpoint")
                                text("student.weights", "torchvision weights")
                                text("student.kwargs", "model kwargs (YAML mapping)")
                        with gr.Accordion("Trace: the layers of both models", open=True):
                            with gr.Row():
                                layer_filter = gr.Textbox(label="filter (name or op)", elem_id="layer-filter")
                                show_pre = gr.Checkbox(value=True, label="pre-activation entries (NAME:pre)",
                                                       elem_id="show-pre")
                                text("trace.leaf_modules", "leaf modules (kept opaque; comma-separated)")
                            trace_note = gr.Markdown(elem_id="trace-note")
                            with gr.Row():
                                teacher_table = gr.Dataframe(headers=forms.LAYER_HEADERS, type="array",
                                                             interactive=False, label="teacher layers",
                                                             max_height=420, column_widths=LAYER_WIDTHS,
                                                             wrap=True, elem_id="teacher-layers")
                                student_table = gr.Dataframe(headers=forms.LAYER_HEADERS, type="array",
                                                             interactive=False, label="student layers",
                                                             max_height=420, column_widths=LAYER_WIDTHS,
                                                             wrap=True, elem_id="student-layers")
                        with gr.Accordion("Loss terms", open=True):
                            number("loss.count", "terms", integer=True, visible=False)
                            slots = []
                            for i in range(MAX_TERMS):
                                slot = {}
                                with gr.Group(visible=i < form["loss.count"]) as slot["box"]:
                                    with gr.Row(equal_height=True):
                                        choice(f"loss.{i}.method", f"term {i + 1}: method", LOSSES.names(),
                                               custom=True, scale=2)
                                        text(f"loss.{i}.weight", "weight", placeholder="canonical", scale=1)
                                        slot["remove"] = gr.Button("Remove", size="sm", scale=0, min_width=90,
                                                                   elem_id=f"loss-{i}-remove")
                                    slot["info"] = gr.Markdown(elem_id=f"loss-{i}-info")
                                    c[f"loss.{i}.params"] = gr.Dataframe(
                                        value=form[f"loss.{i}.params"], headers=forms.PARAMS_HEADERS, type="array",
                                        static_columns=[0, 2], label="parameters (an empty value is the default)",
                                        elem_id=f"loss-{i}-params")
                                    with gr.Column(visible=False) as slot["positions"]:
                                        choice(f"loss.{i}.positions", "positions", list(forms.POSITION_MODES))
                                        with gr.Column(visible=False) as slot["pairs"]:
                                            with gr.Row(equal_height=True):
                                                slot["t_tap"] = gr.Dropdown(
                                                    label="teacher tap", allow_custom_value=True,
                                                    elem_id=f"loss-{i}-teacher-tap")
                                                slot["s_tap"] = gr.Dropdown(
                                                    label="student tap", allow_custom_value=True,
                                                    elem_id=f"loss-{i}-student-tap")
                                                slot["add"] = gr.Button("Add pair", size="sm",
                                                                        elem_id=f"loss-{i}-add-pair")
                                                slot["clear"] = gr.Button("Clear", size="sm")
                                            c[f"loss.{i}.pairs"] = gr.Dataframe(
                                                value=form[f"loss.{i}.pairs"], headers=forms.PAIRS_HEADERS,
                                                type="array", label="pairs", elem_id=f"loss-{i}-pairs")
                                slots.append(slot)
                            add_term = gr.Button("Add a loss term", elem_id="add-term")
                        with gr.Accordion("Training recipe", open=True):
                            with gr.Row():
                                number("train.epochs", "epochs", integer=True)
                                text("train.max_steps_per_epoch", "max steps per epoch", placeholder="all")
                                choice("train.device", "device", ["auto", "cpu", "cuda", "mps"], custom=True)
                                choice("train.precision", "precision", _enum("train", "precision"))
                                number("train.seed", "seed", integer=True)
                                text("seeds", "seeds (one run each)", placeholder="[0, 1, 2] instead of seed")
                            with gr.Row():
                                choice("train.optimizer.name", "optimizer", _enum("train", "optimizer", "name"))
                                number("train.optimizer.lr", "learning rate")
                                number("train.optimizer.momentum", "momentum")
                                number("train.optimizer.weight_decay", "weight decay")
                                check("train.optimizer.nesterov", "Nesterov")
                                text("train.optimizer.betas", "betas (AdamW)")
                            with gr.Row():
                                choice("train.schedule.name", "schedule", _enum("train", "schedule", "name"))
                                text("train.schedule.milestones", "milestones (multistep)")
                                number("train.schedule.gamma", "gamma")
                                number("train.schedule.step_size", "step size (step)", integer=True)
                                number("train.schedule.min_lr", "min lr (cosine)")
                                number("train.schedule.warmup_epochs", "warm-up epochs")
                            with gr.Row():
                                text("train.grad_clip", "gradient clipping", placeholder="none")
                                check("train.compile", "torch.compile")
                                check("train.channels_last", "channels last")
                                check("train.sync_bn", "SyncBatchNorm (several GPUs)")
                                check("log.tensorboard", "TensorBoard")
                                number("log.every", "log every N steps", integer=True)
                        with gr.Accordion("Sweep (optional): key paths mapped to the values to try", open=False):
                            c["sweep"] = gr.Code(value=form["sweep"], language="yaml", label="sweep", elem_id="sweep")
                    with gr.Column(scale=2, min_width=360):
                        yaml_view = gr.Code(language="yaml", interactive=False, label="spec (YAML)",
                                            wrap_lines=True, elem_id="yaml-preview")
                        problems = gr.Textbox(label="kdgraph validate", lines=3, max_lines=12, interactive=False,
                                              elem_id="problems")
                        with gr.Group():
                            with gr.Row(equal_height=True):
                                file_name = gr.Textbox(value=f"{NEW_SPEC['name']}.yaml", elem_id="file-name",
                                                       label="file in the specs folder", scale=3)
                                overwrite_spec = gr.Checkbox(label="overwrite", elem_id="overwrite-spec", scale=1)
                            save_btn = gr.Button("Save spec", elem_id="save-button")
                            save_msg = gr.Markdown(elem_id="save-message")
                        with gr.Group():
                            devices = gr.CheckboxGroup(choices=[(f"GPU {i}: {n}", i) for i, n in enumerate(gpus)],
                                                       label="GPUs (none ticked: the first free one)",
                                                       visible=bool(gpus), elem_id="devices")
                            if not gpus:
                                gr.Markdown("Runs on the CPU: torch sees no GPU.")
                            overwrite_run = gr.Checkbox(label="overwrite an existing run of this name",
                                                        elem_id="overwrite-run")
                            start_btn = gr.Button("Start run", variant="primary", elem_id="start-button")
                            start_msg = gr.Markdown(elem_id="start-message")

            # ------------------------------------------------------------------------------ Runs
            with gr.Tab("Runs", id="runs"):
                runs_table = gr.Dataframe(headers=RUN_HEADERS, type="array", interactive=False, label="runs",
                                          max_height=320, elem_id="runs-table")
                with gr.Row(equal_height=True):
                    run_select = gr.Dropdown(label="run", allow_custom_value=True, elem_id="run-select", scale=3)
                    stop_btn = gr.Button("Stop", variant="secondary", interactive=False, elem_id="stop-button", scale=1)
                    resume_btn = gr.Button("Resume", interactive=False, elem_id="resume-button", scale=1)
                    refresh_btn = gr.Button("Refresh", scale=1)
                run_msg = gr.Markdown(elem_id="run-message")
                run_md = gr.Markdown(elem_id="run-status")
                with gr.Row():
                    loss_plot = gr.LinePlot(x="epoch", y="value", color="series",
                                            title="loss: the terms as weighted in it (≈: warm-up)",
                                            x_title="epoch", y_title="loss", elem_id="loss-plot")
                    acc_plot = gr.LinePlot(x="epoch", y="value", color="series", title="accuracy (%)",
                                           x_title="epoch", y_title="top-1 (%)", elem_id="accuracy-plot")
                run_log = gr.Textbox(label="log (tail)", lines=14, max_lines=14, autoscroll=True,
                                     interactive=False, elem_id="run-log")
                with gr.Accordion(RunDir.SUMMARY, open=False):
                    run_summary = gr.JSON(elem_id="run-summary")
                with gr.Accordion("spec", open=False):
                    run_spec = gr.Code(language="yaml", interactive=False, elem_id="run-spec")
                run_names = gr.State([])
                plot_key = gr.State("")

            # ------------------------------------------------------------------------------ Sweeps
            with gr.Tab("Sweeps", id="sweeps"):
                with gr.Row(equal_height=True):
                    sweep_spec = gr.Dropdown(choices=forms.sweep_files(h.specs_dir), label="spec with a sweep: block",
                                             allow_custom_value=True, elem_id="sweep-spec", scale=3)
                    sweep_start = gr.Button("Start sweep", variant="primary", elem_id="sweep-start", scale=1)
                sweep_msg = gr.Markdown(elem_id="sweep-message")
                with gr.Row(equal_height=True):
                    sweep_select = gr.Dropdown(label="sweep", allow_custom_value=True, elem_id="sweep-select", scale=3)
                    sweep_stop = gr.Button("Stop sweep", variant="secondary", interactive=False, elem_id="sweep-stop",
                                           scale=1)
                sweep_md = gr.Markdown(elem_id="sweep-status")
                sweep_grid = gr.Dataframe(interactive=False, label="best test top-1 (%)", elem_id="sweep-grid")
                heatmap = gr.Image(label="heatmap", type="filepath", interactive=False, elem_id="heatmap")
                sweep_log = gr.Textbox(label="log (tail)", lines=10, max_lines=10, autoscroll=True,
                                       interactive=False, elem_id="sweep-log")
                sweep_names = gr.State([])
        timer = gr.Timer(POLL_SECONDS)
        # the Build form, kept in this browser's localStorage so that a reload does not lose it
        saved_form = gr.BrowserState(None, storage_key=FORM_STORAGE_KEY, secret=FORM_STORAGE_KEY)

        # -------------------------------------------------------------------------------------- events
        fields = [c[k] for k in FIELDS]
        term_widgets = [c[f"loss.{i}.{k}"] for i in range(MAX_TERMS) for k in TERM_KEYS]
        changes = [w.change for w in fields] + [file_name.change]
        views = [v for s in slots for v in (s["box"], s["positions"], s["pairs"], s["info"])]
        taps = [t for s in slots for t in (s["t_tap"], s["s_tap"])]
        private = dict(api_visibility="private")
        quiet = dict(show_progress="hidden")  # no spinner over widgets refreshed in the background

        gr.on(changes, h.preview, [file_name, *fields], [yaml_view, problems], api_name="preview",
              trigger_mode="always_last", show_progress="minimal")
        gr.on(changes, h.term_views, fields, views, trigger_mode="always_last", **private, **quiet)
        trace_keys = ["data.dataset", "data.options", "teacher.model", "teacher.kwargs", "student.model",
                      "student.kwargs", "trace.leaf_modules"]
        gr.on([c[k].change for k in trace_keys] + [layer_filter.change, show_pre.change], h.trace,
              [layer_filter, show_pre, *fields], [teacher_table, student_table, trace_note, *taps],
              api_name="trace", trigger_mode="always_last", show_progress="minimal")
        c["data.dataset"].change(forms.dataset_options, c["data.dataset"], options_hint, **private)
        c["name"].input(lambda n: f"{n.strip()}.yaml" if n.strip() else gr.skip(), c["name"], file_name,
                        trigger_mode="always_last", **private)

        gr.on(changes, h.remember, [file_name, *fields], saved_form, trigger_mode="always_last", **private,
              **quiet)
        load_btn.click(h.load, load_choice, [*fields, file_name, build_msg], api_name="load_spec").then(
            lambda: "", None, save_msg, **private, **quiet)
        new_btn.click(h.new_spec, None, [*fields, file_name, build_msg], api_name="new_spec").then(
            lambda: "", None, save_msg, **private, **quiet)
        add_term.click(h.add_term, [c["loss.count"], c["teacher.model"]], [c["loss.count"], *term_widgets], **private)
        for i, s in enumerate(slots):
            method, params = c[f"loss.{i}.method"], c[f"loss.{i}.params"]
            positions, pairs = c[f"loss.{i}.positions"], c[f"loss.{i}.pairs"]
            method.input(h.method_changed, [method, params], [c[f"loss.{i}.weight"], params, positions], **private)
            s["remove"].click(lambda n, *v, i=i: h.remove_term(i, n, *v), [c["loss.count"], *term_widgets],
                              [c["loss.count"], *term_widgets], **private)
            s["add"].click(h.add_pair, [s["t_tap"], s["s_tap"], pairs], [pairs, positions], **private)
            s["clear"].click(lambda: ([], "auto"), None, [pairs, positions], **private)
        save_btn.click(h.save, [file_name, overwrite_spec, *fields], [save_msg, load_choice],
                       api_name="save_spec").then(h.sweep_choices, None, sweep_spec, **private)
        start_btn.click(h.start, [file_name, devices, overwrite_run, *fields], [start_msg, tabs, run_select],
                        api_name="start_run")

        panel = [run_md, loss_plot, acc_plot, run_log, run_summary, run_spec, stop_btn, resume_btn, plot_key]
        gr.on([timer.tick, refresh_btn.click, demo.load], h.runs_table, None, runs_table, api_name="runs", **quiet)
        gr.on([timer.tick, demo.load], h.run_choices, [run_select, run_names], [run_select, run_names], **private,
              **quiet)
        one_at_a_time = dict(concurrency_id="run_panel", concurrency_limit=1)
        run_select.change(h.run_panel, [run_select, plot_key], panel, **private, **quiet, **one_at_a_time).then(
            h.run_panel, [run_select, plot_key], panel, **private, **quiet, **one_at_a_time)
        timer.tick(h.run_panel, [run_select, plot_key], panel, **private, **quiet, **one_at_a_time)
        gr.api(h.run_status, api_name="run_status")
        runs_table.select(h.select_run, runs_table, run_select, **private)
        stop_btn.click(h.stop, run_select, run_msg, api_name="stop_run")
        resume_btn.click(h.resume, run_select, run_msg, api_name="resume_run")

        sweep_panel = [sweep_md, sweep_grid, heatmap, sweep_log, sweep_stop]
        sweep_start.click(h.start_sweep, sweep_spec, [sweep_msg, sweep_select], api_name="start_sweep")
        gr.on([timer.tick, demo.load], h.sweep_selector, [sweep_select, sweep_names], [sweep_select, sweep_names],
              **private, **quiet)
        sweep_select.change(h.sweep_panel, sweep_select, sweep_panel, **private, **quiet)
        gr.api(h.sweep_status, api_name="sweep_status")
        timer.tick(h.sweep_panel, sweep_select, sweep_panel, **private, **quiet)
        sweep_stop.click(h.stop, sweep_select, sweep_msg, api_name="stop_sweep")

        demo.load(h.restore, saved_form, [*fields, file_name, build_msg], **private, **quiet)
        demo.load(h.preview, [file_name, *fields], [yaml_view, problems], **private)
        demo.load(h.term_views, fields, views, **private)
        demo.load(h.trace, [layer_filter, show_pre, *fields], [teacher_table, student_table, trace_note, *taps],
                  **private)
        demo.load(lambda: (h.spec_choices(), h.sweep_choices(), h.spec_choices(),
                           gr.update(choices=h.checkpoint_choices())), None,
                  [load_choice, sweep_spec, c["teacher.from_spec"], c["teacher.checkpoint"]], **private, **quiet)
    return demo


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
    return demo, manager


def launch(demo: gr.Blocks, runs_dir: str | Path, *, host: str = "127.0.0.1", port: int = 7860,
           auth: tuple[str, str] | None = None, prevent_thread_lock: bool = False):
    """Serve the page (the runs folder's files, e.g. heatmaps, may be shown)."""
    return demo.queue().launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=prevent_thread_lock,
                               allowed_paths=[str(Path(runs_dir).resolve())], show_error=True)


def serve(host: str = "127.0.0.1", port: int = 7860, runs_dir: str | Path = "runs", specs_dir: str | Path = "specs",
          auth: tuple[str, str] | None = None) -> None:
    """Serve the UI until interrupted (runs started from it keep running; a new UI re-attaches to them)."""
    demo, manager = create(runs_dir, specs_dir)
    print(f"kdgraph ui: specs in {Path(specs_dir).resolve()}, runs in {Path(runs_dir).resolve()}")
    try:
        launch(demo, runs_dir, host=host, port=port, auth=auth)
    finally:
        manager.close()
