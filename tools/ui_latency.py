"""How long the Build form takes to answer, measured in a real browser (Playwright + Debian's chromium).

    PYTHONPATH=$PWD python tools/ui_latency.py [--dataset cifar100] [--models wrn-16-2 resnet56 ...]

Serves the UI on a free port over empty temporary folders, sets the dataset, then for each model:
picks it as the student and times until the page shows it everywhere it appears (the trace note under the
layer tables, the YAML preview, the wiring picture) -- first with nothing cached ("new"), then once more after
another model ("cached") -- and times a filter typed into the layer tables until the tables are filtered.
Prints one line per measurement and `uptime`'s load; a timing depends on the machine's load, so say it.
Not a test: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time

CHROMIUM = "/usr/bin/chromium"
ZOO = ["wrn-16-2", "wrn-40-2", "resnet56", "resnet32x4", "resnet8x4", "shufflenetv2-1.0", "shufflenetv2-2.0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pick(page, elem_id: str, value: str) -> float:
    """Type ``value`` into a dropdown and press Enter; the time of the Enter."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    t0 = time.perf_counter()
    box.press("Enter")
    return t0


def _shown(page, model: str, timeout_ms: float) -> None:
    """Wait until the trace note, the YAML preview and the wiring picture all show student ``model`` (the YAML may quote it)."""
    try:
        _wait_shown(page, model, timeout_ms)
    except Exception:
        for elem_id in ("trace-note", "yaml-preview", "wiring"):
            print(f"#{elem_id}:", page.locator(f"#{elem_id}").inner_text()[:600])
        raise


def _wait_shown(page, model: str, timeout_ms: float) -> None:
    page.wait_for_function(
        """m => document.querySelector('#trace-note')?.innerText.includes('student ' + m)
             && document.querySelector('#yaml-preview')?.innerText.includes(m)
             && document.querySelector('#wiring')?.innerText.includes(m)""",
        arg=model, timeout=timeout_ms, polling="raf")


def model_change(page, model: str, timeout_ms: float = 120000) -> float:
    """Seconds from picking ``model`` as the student until the page shows it (see :func:`_shown`)."""
    t0 = _pick(page, "student-model", model)
    _shown(page, model, timeout_ms)
    return time.perf_counter() - t0


def filtering(page, text: str, timeout_ms: float = 60000) -> float:
    """Seconds from typing ``text`` into the layer filter until the trace note counts the filtered rows."""
    before = page.locator("#trace-note").inner_text()
    box = page.locator("#layer-filter textarea, #layer-filter input").first
    box.fill(text)
    t0 = time.perf_counter()
    box.press("Tab")
    page.wait_for_function("b => document.querySelector('#trace-note')?.innerText !== b", arg=before,
                           timeout=timeout_ms, polling="raf")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar100")
    parser.add_argument("--models", nargs="+", default=ZOO + ["torchvision:resnet50"])
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from kdgraph.ui.app import create, launch

    root = tempfile.mkdtemp(prefix="kdgraph-latency-")
    demo, manager = create(os.path.join(root, "runs"), os.path.join(root, "specs"))
    port = _free_port()
    launch(demo, os.path.join(root, "runs"), port=port, prevent_thread_lock=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("() => document.querySelector('#problems textarea')?.value === 'valid'",
                                   timeout=120000)
            _pick(page, "data-dataset", args.dataset)
            page.wait_for_function("d => document.querySelector('#yaml-preview')?.innerText.includes('dataset: ' + d)",
                                   arg=args.dataset, timeout=120000)
            _measure(page, args.models)
            browser.close()
    finally:
        demo.close()
        manager.close()
    print("load:", os.popen("uptime").read().strip())


def _measure(page, models: list[str]) -> None:
    print(f"{'model':24} {'new s':>7} {'cached s':>9} {'filter s':>9}")
    for i, model in enumerate(models):
        new = model_change(page, model)
        other = models[i - 1] if i else models[1]
        model_change(page, other)
        cached = model_change(page, model)
        filtered = filtering(page, "relu")
        filtering(page, "")
        print(f"{model:24} {new:7.2f} {cached:9.2f} {filtered:9.2f}", flush=True)


if __name__ == "__main__":
    main()
