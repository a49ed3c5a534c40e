"""The web UI (``kdgraph ui``, needs ``kdgraph[ui]``): Gradio pages over :mod:`kdgraph.app`."""
