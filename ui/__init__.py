"""The Gradio app (``kdgraph ui``); installed as ``kdgraph.ui``."""
