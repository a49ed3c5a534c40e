"""The dataset registry, :class:`DatasetInfo` and helpers shared by the dataset builders."""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ..errors import UserError
from ..registry import Registry

DATASETS = Registry("dataset")
"""Dataset builders: ``builder(root, train, augment, download, **options) -> Dataset``.

Registered with meta ``num_classes``, ``input_shape``, ``mean``, ``std``; a meta value may also be a
callable taking the dataset options as keyword arguments (for values that depend on them).
"""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a trainer need to know about a dataset."""

    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str = "") -> "DatasetInfo":
        """Build from a mapping; ``mean``/``std`` default to no normalisation (0 and 1 per channel)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        missing = sorted({"num_classes", "input_shape"} - set(d))
        if unknown or missing:
            raise UserError(f"dataset info for {name!r}: "
                            + "; ".join(filter(None, [missing and f"missing keys {missing}",
                                                      unknown and f"unknown keys {unknown}"])))
        shape = tuple(int(s) for s in d["input_shape"])
        channels = shape[0]
        return cls(num_classes=int(d["num_classes"]), input_shape=shape,
                   mean=tuple(float(m) for m in d.get("mean", (0.0,) * channels)),
                   std=tuple(float(s) for s in d.get("std", (1.0,) * channels)),
                   name=str(d.get("name") or name))


def require_dirs(root: str, subdirs: list[str], dataset: str, layout: str) -> None:
    """Raise a :class:`UserError` describing ``layout`` unless every ``root/subdir`` is a directory."""
    missing = [os.path.join(root, s) for s in subdirs if not os.path.isdir(os.path.join(root, s))]
    if missing:
        raise UserError(f"dataset {dataset!r}: {', '.join(missing)} not found (root {root!r}).\n"
                        f"Expected layout:\n{layout}")


def imagefolder_layout(root: str, splits: list[str]) -> str:
    """A short picture of the ImageFolder layout ``root/<split>/<class>/<image>``."""
    lines = [f"  {root}/"]
    for s in splits:
        lines += [f"    {s}/", "      <class_a>/<image>.png ...", "      <class_b>/<image>.png ..."]
    return "\n".join(lines)
