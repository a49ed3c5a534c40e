"""Named registries (models, datasets, loss methods) plus ``package.module:Name`` import paths.

Users extend kdgraph without editing it either by registering under a name::

    from kdgraph.models import MODELS

    @MODELS.register("mynet")
    def mynet(num_classes=10, **kw): ...

or by naming an import path in a spec (``model: mypkg.nets:MyNet``).
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Iterator

from .errors import UserError, did_you_mean

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(name: str) -> bool:
    return bool(_IMPORT_PATH.match(name))


def import_object(path: str) -> Any:
    """Resolve ``package.module:attr.sub`` to the object it names; a UserError says what went wrong."""
    if not is_import_path(path):
        raise UserError(f"{path!r} is not an import path of the form 'package.module:Name'")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import module {module_name!r} for {path!r}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise UserError(f"module {module_name!r} has no attribute {attr!r}{did_you_mean(part, names)}")
        obj = getattr(obj, part)
    return obj


class Registry:
    """A name -> object table with helpful errors; ``get`` also accepts import paths.

    ``patterns`` map a regular expression to a factory taking the match, for families such as
    ``wrn-D-K`` whose members cannot all be listed. kdgraph's registries are
    :data:`kdgraph.models.MODELS`, :data:`kdgraph.data.DATASETS` and :data:`kdgraph.losses.LOSSES`.

    Args:
        kind: what the registry holds, for messages (``"model"``, ``"loss method"``...).

    Example::

        from kdgraph.models import MODELS

        @MODELS.register("mynet", family="mine")    # keyword arguments are kept as meta data
        def mynet(num_classes=10, **kw):
            return MyNet(num_classes, **kw)

        MODELS.get("mynet")          # the function
        MODELS.get("mypkg.nets:Net")  # an import path works without registering
        MODELS.get("mynte")           # UserError: unknown model 'mynte' (did you mean 'mynet'?); known: ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._meta: dict[str, dict] = {}
        self._patterns: list[tuple[re.Pattern, Callable[[re.Match], Any], str]] = []

    def register(self, name: str | None = None, **meta) -> Callable:
        """A decorator registering its object under ``name`` (default: the object's ``__name__``) with
        ``meta`` data (:meth:`meta`); a name registered twice raises ``ValueError`` (never overwritten)."""
        def deco(obj):
            key = name or getattr(obj, "__name__")
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = obj
            self._meta[key] = meta
            return obj

        return deco

    def register_pattern(self, pattern: str, factory: Callable[[re.Match], Any], example: str) -> None:
        """Names matching the regular expression ``pattern`` (whole name) resolve to ``factory(match)``;
        ``example`` (e.g. ``wrn-D-K``) is what :meth:`patterns` lists."""
        self._patterns.append((re.compile(pattern + r"$"), factory, example))

    def get(self, name: str) -> Any:
        """The object registered as ``name``, made by a matching pattern, or named by an import path
        ``package.module:Name``; a :class:`~kdgraph.errors.UserError` with the closest names otherwise."""
        if name in self._items:
            return self._items[name]
        for rx, factory, _ in self._patterns:
            m = rx.match(name)
            if m:
                return factory(m)
        if is_import_path(name):
            return import_object(name)
        raise UserError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}"
                        f"; known: {', '.join(self.names())}, or an import path 'package.module:Name'")

    def exists(self, name: str) -> bool:
        """Whether :meth:`get` finds ``name`` (an import path is imported to find out)."""
        try:
            self.get(name)
            return True
        except UserError:
            return False

    def meta(self, name: str) -> dict:
        """The keyword arguments ``name`` was registered with ({} for patterns and import paths)."""
        return self._meta.get(name, {})

    def names(self) -> list[str]:
        """The registered names, sorted (patterns not included: see :meth:`patterns`)."""
        return sorted(self._items)

    def patterns(self) -> list[str]:
        return [example for _, _, example in self._patterns]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
