"""``kdgraph --help`` starts without importing torch: ``import kdgraph`` imports its public names on first use."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python(code: str) -> str:
    """``code``'s output in a fresh interpreter with this checkout first on the path."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_imports_no_torch():
    out = python("import sys\nfrom kdgraph.app.cli import main\n"
                 "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
                 "print(sorted(m for m in ('torch', 'numpy', 'torchvision') if m in sys.modules))")
    assert "usage: kdgraph" in out and out.strip().splitlines()[-1] == "[]"
    assert python("import kdgraph, sys; print('torch' in sys.modules)").strip() == "False"
    assert python("import kdgraph; print(kdgraph.Distiller.__name__, kdgraph.tap.__name__, "
                  "kdgraph.layers.__name__)").split() == ["Distiller", "tap", "layers"]
