"""The kdgraph application: the ``kdgraph`` command line and what it runs.

Built on the library (:mod:`kdgraph.graph`, :mod:`kdgraph.models`, :mod:`kdgraph.data`,
:mod:`kdgraph.losses`, :class:`kdgraph.Distiller`, :mod:`kdgraph.spec`), which never imports it:
:mod:`~kdgraph.app.cli` (commands), :mod:`~kdgraph.app.engine` (``kdgraph run``),
:mod:`~kdgraph.app.rundir` (the files of a run directory), :mod:`~kdgraph.app.sweep` and
:mod:`~kdgraph.app.grid` (grid search), :mod:`~kdgraph.app.report`, :mod:`~kdgraph.app.launch` (runs as
processes), :mod:`~kdgraph.app.format`, :mod:`~kdgraph.app.runtime` and :mod:`~kdgraph.app.bench`.
"""
