"""Models from other libraries: ``timm:NAME`` and ``hf:PATH`` (imported only when such a name is used).

* ``timm:NAME`` -- ``timm.create_model(NAME, num_classes=..., in_chans=..., **kwargs)``; any name
  ``timm.list_models()`` knows, pretrained tags included (``timm:resnet50.a1_in1k``). ``weights="DEFAULT"``
  loads timm's pretrained weights (from timm's local cache, else downloaded); ``weights=FILE`` loads a
  local checkpoint file. timm re-initialises the classifier when ``num_classes`` differs from the weights'.
* ``hf:PATH`` -- a Hugging Face image or text classifier: ``PATH`` is a local directory holding
  ``config.json`` (as ``save_pretrained`` writes it) or a Hub id. The model is built from the config with
  random weights; ``weights="DEFAULT"`` loads the checkpoint's (a classifier of another size is
  re-initialised, as ``from_pretrained(..., ignore_mismatched_sizes=True)`` does). ``kwargs`` set config
  fields (``hidden_dropout_prob=0.0``); unknown fields are an error. The model is the Hugging Face model
  itself -- same module paths, same ``state_dict``, ``save_pretrained`` works -- whose call returns the
  logits tensor instead of a ``ModelOutput``.
"""
from __future__ import annotations

import functools
import os
import re
from functools import partial
from typing import Any, Callable

from torch import nn

from ..errors import UserError, did_you_mean

TIMM_PREFIX, HF_PREFIX = "timm:", "hf:"
_PRETRAINED = ("DEFAULT", "pretrained")


def _import(package: str, extra: str):
    try:
        return __import__(package)
    except ImportError:
        raise UserError(f"{package} is not installed; `pip install 'kdgraph[{extra}]'` installs it") from None


# ------------------------------------------------------------------------------------------------ timm
def build_timm(arch: str, num_classes: int, weights: str | None, in_channels: int, kwargs: dict[str, Any],
               instantiate: Callable) -> nn.Module:
    timm = _import("timm", "timm")
    if not timm.is_model(arch):
        raise UserError(f"unknown timm model {arch!r}{did_you_mean(arch, timm.list_models())}")
    if weights is None:
        kwargs["pretrained"] = False
    elif weights in _PRETRAINED:
        kwargs["pretrained"] = True
    elif os.path.isfile(weights):
        kwargs["pretrained"] = True
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": weights}
    else:
        raise UserError(f"weights={weights!r} for timm:{arch}: use 'DEFAULT' (timm's pretrained weights) or "
                        f"the path of a checkpoint file")
    kwargs.update(num_classes=num_classes, in_chans=in_channels)
    return instantiate(TIMM_PREFIX + arch, partial(timm.create_model, arch), kwargs)


def timm_exists(arch: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(arch)


# ------------------------------------------------------------------------------------------ Hugging Face
class _ReturnsLogits:
    """Mixed into a Hugging Face classifier's class: the call returns ``.logits``."""

    def __reduce_ex__(self, protocol):  # the mixed class is made at run time: pickle the original one
        return _rebuild, (type(self).__mro__[2], self.__dict__)


_MIXED: dict[type, type] = {}


def _returning_logits(model: nn.Module) -> nn.Module:
    cls = type(model)
    if cls not in _MIXED:
        @functools.wraps(cls.forward)  # the signature torch.export binds inputs to
        def forward(self, *args, **kwargs):
            return cls.forward(self, *args, **{**kwargs, "return_dict": True}).logits

        _MIXED[cls] = type(cls.__name__, (_ReturnsLogits, cls), {"__module__": cls.__module__, "forward": forward})
    model.__class__ = _MIXED[cls]
    return model


def _rebuild(cls: type, state: dict) -> nn.Module:
    model = cls.__new__(cls)
    model.__dict__.update(state)
    return _returning_logits(model)


def _auto_class(transformers, config, name: str):
    for auto in (transformers.AutoModelForImageClassification, transformers.AutoModelForSequenceClassification):
        if type(config) in auto._model_mapping:
            return auto
    raise UserError(f"{name} is a {type(config).__name__}, which has neither an image nor a sequence "
                    f"classification model in transformers")


def build_hf(path: str, num_classes: int, weights: str | None, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    transformers = _import("transformers", "hf")
    name = HF_PREFIX + path
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the Hugging Face config of {name}: {str(e).splitlines()[0]}") from None
    unknown = [k for k in kwargs if not hasattr(config, k)]
    if unknown:
        raise UserError(f"{name}: {type(config).__name__} has no field {unknown[0]!r}"
                        f"{did_you_mean(unknown[0], config.to_dict())}")
    for key, value in kwargs.items():
        setattr(config, key, value)
    if in_channels != 3:
        if not hasattr(config, "num_channels"):
            raise UserError(f"{name} takes no image channels, so it cannot take in_channels={in_channels}")
        config.num_channels = in_channels
    config.num_labels = num_classes
    auto = _auto_class(transformers, config, name)
    if weights is None:
        model = auto.from_config(config)
    elif weights in _PRETRAINED:
        model = auto.from_pretrained(path, config=config, ignore_mismatched_sizes=True)
    else:
        raise UserError(f"weights={weights!r} for {name}: use 'DEFAULT' (the checkpoint's weights) or none")
    return _returning_logits(model)


def hf_exists(path: str) -> bool:
    """A local directory with ``config.json``, or a name of the Hub's ``owner/name`` form (which cannot be
    checked without the network)."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "config.json"))
    return re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None
