"""Named registries (models, datasets, loss methods) plus ``package.module:Name`` import paths.

Users extend kdgraph without editing it either by registering under a name::

    from kdgraph.models import MODELS

    @MODELS.register("mynet")
    def mynet(num_classes=10, **kw): ...

or by naming an import path in a spec (``model: mypkg.nets:MyNet``).

A spec that names an import path runs code, as a Python script does. :func:`set_import_policy` decides,
for the whole process, which import paths :func:`import_object` may follow: all of them (the default, for
a user's own specs), none (``--no-imports``), or those under a few allowed packages (``kdgraph ui
--allow-imports``). The policy is checked before anything is imported.
"""
from __future__ import annotations

import contextlib
import importlib
import re
import sys
import types
from typing import Any, Callable, Iterable, Iterator

from .errors import UserError, did_you_mean

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(name: str) -> bool:
    return bool(_IMPORT_PATH.match(name))


# --------------------------------------------------------------------------------------- import policy
_policy: tuple[str, ...] | None = None  # None: every import path
_policy_source = ""


def set_import_policy(allowed: Iterable[str] | None, source: str = "") -> None:
    """Which import paths :func:`import_object` follows, process-wide.

    ``None``: all of them. An iterable of package names: only modules under them (``"mypkg"`` allows
    ``mypkg`` and ``mypkg.nets``; the standard library never, whatever is listed); an empty one: none.
    ``source`` names the switch that set it (``--no-imports``), for the error message.
    """
    global _policy, _policy_source
    _policy = None if allowed is None else tuple(sorted({a.strip() for a in allowed if a.strip()}))
    _policy_source = source


def import_policy() -> tuple[tuple[str, ...] | None, str]:
    """``(allowed packages or None for all, the switch that set it)``."""
    return _policy, _policy_source


@contextlib.contextmanager
def import_policy_scope(allowed: Iterable[str] | None, source: str = "") -> Iterator[None]:
    """:func:`set_import_policy` for the duration of a ``with`` block."""
    before = import_policy()
    set_import_policy(allowed, source)
    try:
        yield
    finally:
        set_import_policy(before[0], before[1])


def _stdlib(module_name: str) -> bool:
    top = module_name.split(".")[0]
    return top in sys.stdlib_module_names or top in sys.builtin_module_names


def _allowed(module_name: str) -> bool:
    if _stdlib(module_name):  # no model, data set or method lives there; os:system would run a command
        return False
    return _policy is None or any(module_name == p or module_name.startswith(p + ".") for p in _policy)


def _refuse(path: str, what: str) -> UserError:
    if _policy is None:
        return UserError(f"{path!r} {what}: a spec's import paths never reach the standard library (no model, "
                         f"data set or method lives there)")
    if _policy == ():
        why = f"import paths are switched off{f' ({_policy_source})' if _policy_source else ''}"
    else:
        why = (f"only modules under {', '.join(_policy)} may be imported"
               f"{f' ({_policy_source})' if _policy_source else ''}, never the standard library")
    return UserError(f"{path!r} is an import path (code that a spec names) and {what}: {why}. "
                     f"Use a registered name, or allow the package where you trust the spec")


def import_object(path: str) -> Any:
    """Resolve ``package.module:attr.sub`` to the object it names; a UserError says what went wrong.

    The module is checked against the import policy (see :func:`set_import_policy`) before it is imported;
    the standard library is refused under any policy, as is an object defined there (``os.system``
    re-exported by another module). Under a restricted policy the object must also be a public attribute
    defined under an allowed package (no walking into other modules).
    """
    if not is_import_path(path):
        raise UserError(f"{path!r} is not an import path of the form 'package.module:Name'")
    module_name, _, attr = path.partition(":")
    if not _allowed(module_name):
        raise _refuse(path, f"would import module {module_name!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import module {module_name!r} for {path!r}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if _policy is not None and (part.startswith("_") or isinstance(obj, types.ModuleType) and obj is not module):
            raise _refuse(path, f"reaches {part!r} through {getattr(obj, '__name__', module_name)!r}")
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise UserError(f"module {module_name!r} has no attribute {attr!r}{did_you_mean(part, names)}")
        obj = getattr(obj, part)
    origin = getattr(obj, "__module__", None)
    if isinstance(origin, str) and _stdlib(origin) or _policy is not None and (
            isinstance(obj, types.ModuleType) or not isinstance(origin, str) or not _allowed(origin)):
        raise _refuse(path, f"names an object of {origin or type(obj).__name__!r}")
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
