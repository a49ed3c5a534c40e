"""The ``kdgraph`` command line. User mistakes print a message (no traceback) and exit with status 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import SpecError, UserError
from .rundir import STOPPED

# `kdgraph layers --input-dtype`: the name a user types -> the torch dtype's name
INPUT_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "long": "long", "int": "int32"}


def _specs_arg(p: argparse.ArgumentParser, many: bool = True) -> None:
    p.add_argument("spec", nargs="+" if many else None, help="spec file(s) (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec key (value parsed as YAML); repeatable")
    _imports_args(p)


def _imports_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--no-imports", action="store_true",
                       help="refuse every import path (package.module:Name) a spec names, before importing "
                            "anything: for specs you did not write")
    group.add_argument("--allow-imports", metavar="PKG[,PKG]", default=None,
                       help="import paths only under these packages (never the standard library)")


def _import_policy(args):
    """``--no-imports`` / ``--allow-imports`` as the import policy while the command runs (the children it
    starts get the same); without them, the policy as it is."""
    import contextlib

    from ..registry import import_policy_scope

    if getattr(args, "no_imports", False):
        return import_policy_scope((), "--no-imports")
    if getattr(args, "allow_imports", None) is not None:
        return import_policy_scope(args.allow_imports.split(","), f"--allow-imports {args.allow_imports}")
    return contextlib.nullcontext()


def parser() -> argparse.ArgumentParser:
    """The ``kdgraph`` argument parser: one sub-command each (``kdgraph COMMAND --help``)."""
    from .. import __version__

    ap = argparse.ArgumentParser(prog="kdgraph", description="Knowledge distillation for PyTorch, driven by specs.")
    ap.add_argument("--version", action="version", version=f"kdgraph {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _run_parser(sub)
    _specs_arg(sub.add_parser("validate", help="check specs (files, or folders searched for *.yaml): schema, "
                                               "models, layer names, methods"))
    sub.add_parser("schema", help="print the spec JSON Schema")
    p = sub.add_parser("layers", help="list a model's tappable layers with their shapes")
    p.add_argument("model", help="registry name, torchvision:NAME, timm:NAME, hf:PATH or package.module:callable")
    p.add_argument("--input-size", nargs="+", type=int, default=[3, 32, 32], metavar="DIM",
                   help="one input's shape without the batch: C H W for images (default 3 32 32), the sequence "
                        "length for token models")
    p.add_argument("--input-dtype", choices=sorted(INPUT_DTYPES), default="float32",
                   help="the input's dtype: long for token ids")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--leaf", action="append", default=[], help="module path or class kept opaque (repeatable)")
    p.add_argument("--filter", default="", help="only names containing this text")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("show", help="the wiring of a spec: both models by stage, every distillation pair and "
                                    "its connector (text, or a picture with -o)")
    _specs_arg(p, many=False)
    p.add_argument("-o", "--out", metavar="FILE.svg", help="write the picture (SVG) there instead of printing text")
    p = sub.add_parser("export", help="the student of a run alone (no teacher, no connectors), checked "
                                      "against its checkpoint")
    p.add_argument("run", help="run directory")
    p.add_argument("--format", default="state_dict", choices=["state_dict", "torchscript", "onnx", "exported"],
                   help="state_dict (student.pt), torchscript, onnx (needs kdgraph[export]) or exported "
                        "(torch.export, student.pt2); default state_dict")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which checkpoint (default best)")
    p.add_argument("--batch", type=int, default=8, help="random inputs the check compares outputs on (default 8)")
    p = sub.add_parser("models", help="list the registered models with parameter counts")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("sweep", help="run the grid of a spec's `sweep:` block")
    _specs_arg(p, many=False)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--jobs", type=int, default=None, help="cells at a time on CPU (default 1)")
    p.add_argument("--devices", default=None, help="GPU ids for cells, e.g. 0,1, or cpu (default: all visible GPUs)")
    p.add_argument("--force", action="store_true", help="re-run finished cells")
    p.add_argument("--seeds", default=None, metavar="N|A,B,...", help="run every cell once per seed (5: seeds "
                   "0..4; 0,3,7: those); the grid and report show mean ± std over them")
    p = sub.add_parser("report", help="tables and learning curves of run directories")
    p.add_argument("runs", nargs="+", help="run or sweep directories, or globs")
    p.add_argument("--out", help="where report.md/csv and curves.png go")
    p = sub.add_parser("ui", help="the web UI: build specs, launch and follow runs (needs kdgraph[ui])")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--specs-dir", default="specs")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="required when --host is not a loopback address")
    p.add_argument("--allow-imports", dest="ui_imports", metavar="PKG[,PKG]", default="",
                   help="packages whose import paths specs may name (default: none; never the standard library)")
    p.add_argument("--allowed-hosts", metavar="HOST[,HOST]", default="",
                   help="more names the page may be reached by (the Host header; default: the --host address)")
    _bench_parser(sub)
    return ap


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="train a spec (a teacher, a student alone, or a distillation)")
    _specs_arg(p)
    p.add_argument("--out", help="run directory (default RUNS_DIR/NAME; one spec only)")
    p.add_argument("--runs-dir", default="runs", help="where run directories go (default: runs)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--force", action="store_true", help="start over, deleting an existing run directory")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train with N processes on this machine (one per GPU; gloo on CPU) through torchrun")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed and memory benchmarks, printed as ratios (a table and JSON)")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per figure (median is reported)")
    p.add_argument("--batch", type=int, default=128, help="batch of figures a and c (b and d: see --step-batch)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--only", default="abcd", help="which figures: any of a, b, c, d (default: all)")
    p.add_argument("--out", default="bench.json", help="where the JSON goes (default: bench.json)")
    p.add_argument("--teacher", default="wrn-28-4", help="teacher model for figures a, b, d (default: wrn-28-4)")
    p.add_argument("--student", default="wrn-16-2", help="student model for figures a, b, d (default: wrn-16-2)")
    p.add_argument("--step-batch", type=int, default=None, help="batch of the step figures b, d (default: "
                   "--batch on CUDA, half of it on CPU)")
    p.add_argument("--data-batches", type=int, default=8, help="batches per timed pass of figure c (default: 8)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("run", "sweep", "bench"):
        from ..allocator import tune_allocator

        tune_allocator()  # CPU steps without page faults for every activation buffer (see kdgraph/allocator.py)
    try:
        with _import_policy(args):
            return int(COMMANDS[args.command](args) or 0)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    except UserError as e:
        print(f"kdgraph: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdgraph: interrupted", file=sys.stderr)
        return STOPPED
    except BrokenPipeError:  # e.g. `kdgraph layers MODEL | head`: the reader left, which is no error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141


def cmd_schema(args) -> int:
    from ..spec import schema

    print(json.dumps(schema(), indent=2))
    return 0


def cmd_validate(args) -> int:
    from ..spec.check import validate

    problems, count, files = [], 0, []
    for path in args.spec:  # a folder stands for the spec files under it
        found = sorted(Path(path).rglob("*.y*ml")) if Path(path).is_dir() else [path]
        if not found:
            raise UserError(f"{path} is a folder without spec files (*.yaml, *.yml) in it")
        files += found
    for file in files:
        found, n = validate(file, args.overrides)
        problems += found
        count += n
    if problems:
        raise SpecError(problems)
    print(f"{count} spec(s) valid")
    return 0


def cmd_run(args) -> int:
    from .. import spec as specs
    from ..spec.check import check
    from .engine import Stopped, run
    from .runtime import process_group

    written = [s for file in args.spec for s in specs.load_all(file, args.overrides)]
    problems = [p for s in written for p in check(s)]
    if problems:
        raise SpecError(problems)
    loaded = [one for s in written for one in specs.per_seed(s)]  # a spec with `seeds:` is one run per seed
    if args.out and len(loaded) > 1:
        seeded = [s.group for s in loaded if s.group][:1]
        raise UserError("--out takes one run; use --runs-dir for several"
                        + (f" ({seeded[0]} has `seeds:`, one run each; --set seeds=null runs train.seed)"
                           if seeded else ""))
    if args.nproc is not None:
        return _torchrun(args)
    summaries = []
    with process_group():
        for s in loaded:
            try:
                summaries.append(run(s, args.out, resume=args.resume, force=args.force, runs_dir=args.runs_dir))
            except Stopped:
                return STOPPED
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if len(summaries) > 1 or any(s.get("teacher") for s in summaries):
        print()
        print(summary_table(summaries, [s.group or s.data["name"] for s in loaded]))
    return 0


def _torchrun(args) -> int:
    """Replace this process by ``torchrun --standalone --nproc_per_node N`` running the installed kdgraph's
    ``run`` with the same arguments."""
    import os

    if args.nproc < 1:
        raise UserError(f"--nproc must be at least 1, not {args.nproc}")
    from .launch import engine_command, policy_options

    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
            "--no-python", *engine_command(), "run", *args.spec, *[a for o in args.overrides for a in ("--set", o)],
            "--runs-dir", args.runs_dir, *(["--out", args.out] if args.out else []), *policy_options(),
            *(["--resume"] if args.resume else []), *(["--force"] if args.force else [])]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)
    return 0  # not reached


def summary_table(summaries: list[dict], groups: list[str] | None = None) -> str:
    """The runs ``kdgraph run`` trained, as a Markdown table: one row per group (default: per run).

    The runs of a group (a spec's ``seeds:``) share a row: its accuracies are ``mean ± std`` over them,
    ``seeds`` lists their ``train.seed`` and the time is their total. ``labels`` says how many training
    samples kept their label (``data.labels``).
    """
    from .format import markdown_table, pct_spread

    grouped: dict[str, list[dict]] = {}
    for s, group in zip(summaries, groups or [s["name"] for s in summaries]):
        grouped.setdefault(group, []).append(s)
    header = ["run", "student", "teacher", "methods", "labels", "seeds", "teacher top-1", "best top-1",
              "final top-1", "time (s)"]
    rows = []
    for group, runs in grouped.items():
        first = runs[0]
        labels = f"{first['labelled']}/{first['train_samples']}" if "labelled" in first else "all"
        seconds = [r["wall_seconds"] for r in runs if isinstance(r.get("wall_seconds"), (int, float))]
        rows.append([group, first["student"], first.get("teacher") or "-", "+".join(first["methods"]), labels,
                     ",".join(str(r.get("seed", "-")) for r in runs),
                     pct_spread({r.get("teacher_top1") for r in runs}, "-"),  # one teacher for all seeds: one value
                     *(pct_spread([r.get(k) for r in runs], "-") for k in ("best_top1", "final_top1")),
                     round(sum(seconds), 1) if seconds else "-"])
    return markdown_table(header, rows, pad=False)


def cmd_layers(args) -> int:
    import torch

    from ..graph import layers
    from ..models import build_model

    with torch.device("meta"):
        model = build_model(args.model, num_classes=args.num_classes)
    rows = [r for r in layers(model.eval(), tuple(args.input_size), leaf_modules=args.leaf,
                              input_dtype=getattr(torch, INPUT_DTYPES[args.input_dtype]))
            if args.filter in r["name"]]
    if args.json:
        print(json.dumps([{**r, "shape": list(r["shape"])} for r in rows], indent=1))
        return 0
    width = max(len(r["name"]) for r in rows) if rows else 4
    opw = max(len(r["op"]) for r in rows) if rows else 2
    print(f"{'name':<{width}}  {'op':<{opw}}  {'kind':<8}  shape")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['op']:<{opw}}  {r['kind']:<8}  {'x'.join(map(str, r['shape']))}")
    print(f"\n{len(rows)} taps; NAME:pre is the input of NAME (pre-activation); block = a module's output")
    if not args.filter:
        _print_auto(model, rows)
    return 0


def cmd_show(args) -> int:
    from .. import spec as specs
    from ..spec.check import check
    from . import wiring

    loaded = specs.load_all(args.spec, args.overrides)
    if len(loaded) != 1:
        raise UserError(f"{args.spec} holds {len(loaded)} specs: `kdgraph show` draws one (split the file, or "
                        f"use --set to pick)")
    problems = check(loaded[0])
    if problems:
        raise SpecError(problems)
    drawn = wiring.from_spec(loaded[0])
    if not args.out:
        print(wiring.text(drawn))
        return 0
    if not args.out.endswith(".svg"):
        raise UserError(f"-o {args.out}: the picture is an SVG file; name it FILE.svg")
    from .rundir import write_text

    write_text(args.out, wiring.svg(drawn))
    print(f"wrote {args.out} ({len(drawn.links)} pair(s))")
    return 0


def cmd_export(args) -> int:
    from .export import export

    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, not {args.batch}")
    export(args.run, args.format, args.checkpoint, batch=args.batch)
    return 0


def _print_auto(model, rows: list[dict]) -> None:
    """Which taps ``positions: auto`` picks, per rule of the built-in methods."""
    from ..losses import auto_positions

    declared = any("stage" in r for r in rows)
    rule = f"the stages {type(model).__name__} declares (feature_info)" if declared else \
        "the last value of each spatial size"
    print(f"\npositions: auto picks ({rule}):")
    for group in auto_positions(rows):
        print(f"  {group['rule']:<32} {', '.join(group['positions']) or '-'}    [{', '.join(group['methods'])}]")


def cmd_models(args) -> int:
    from ..models import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':<22} {'family':<18} {'params':>11}  source (parameters at {rows[0]['num_classes']} classes)")
    for r in rows:
        print(f"{r['name']:<22} {r.get('family') or '':<18} {r['params']:>11,}  {r.get('source') or ''}")
    print("\nalso: wrn-D-K for any D = 6n+4, torchvision:NAME (any torchvision classifier), timm:NAME (any timm "
          "model), hf:PATH (a Hugging Face image or text classifier: a directory with config.json, or a Hub id), "
          "package.module:callable;\nRepDistiller/mdistiller checkpoints of these models load as teacher.checkpoint "
          "(keys mapped)")
    return 0


def cmd_sweep(args) -> int:
    from .grid import read_sweep
    from .sweep import parse_seeds, run_sweep

    sweep_dir = run_sweep(args.spec, args.overrides, jobs=args.jobs, devices=args.devices, runs_dir=args.runs_dir,
                          force=args.force, seeds=parse_seeds(args.seeds) if args.seeds is not None else None)
    failed = [name for name, cell in ((read_sweep(sweep_dir) or {}).get("cells") or {}).items()
              if cell.get("exit") not in (None, 0)]
    return 1 if failed else 0  # the cells that failed are listed above


def cmd_report(args) -> int:
    from .report import report

    report(args.runs, out_dir=args.out)
    return 0


def cmd_ui(args) -> int:
    import ipaddress

    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not args.auth:
        raise UserError(f"--host {args.host} exposes the UI beyond this machine: add --auth USER:PASSWORD")
    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not (sep and user and password):
            raise UserError("--auth takes USER:PASSWORD")
        auth = (user, password)
    try:
        from ..ui.app import serve
    except ImportError as e:
        raise UserError(f"the UI needs gradio ({e}): pip install 'kdgraph[ui]'") from None
    serve(host=args.host, port=args.port, runs_dir=args.runs_dir, specs_dir=args.specs_dir, auth=auth,
          allow_imports=[p for p in args.ui_imports.split(",") if p.strip()],
          allowed_hosts=[h for h in args.allowed_hosts.split(",") if h.strip()])
    return 0


def cmd_bench(args) -> int:
    from .bench import cli

    return cli(args)


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "schema": cmd_schema, "layers": cmd_layers,
            "show": cmd_show, "export": cmd_export, "models": cmd_models, "sweep": cmd_sweep, "report": cmd_report, "ui": cmd_ui, "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
