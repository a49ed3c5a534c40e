"""``python -m kdgraph``: the ``kdgraph`` command line."""
import sys

from .app.cli import main

sys.exit(main())
