"""The model zoo and :func:`build_model`.

A model name is one of

* a name in :data:`MODELS` (``wrn-40-2``, ``resnet32x4``, ``vgg13``, ``shufflev2-1.0``...) or ``wrn-D-K``
  for any valid depth ``D`` and widen factor ``K``;
* ``torchvision:NAME`` for any classification model of ``torchvision.models`` (``torchvision:resnet18``);
* ``timm:NAME`` for any model of timm (``timm:efficientnet_b0``), ``hf:PATH`` for a Hugging Face image or
  text classifier (a local directory with ``config.json``, or a Hub id); see :mod:`kdgraph.models.external`;
* an import path ``package.module:callable`` whose call returns an ``nn.Module``.
"""
from __future__ import annotations

import inspect
import re
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UserError, did_you_mean
from ..params import check_arguments
from ..registry import Registry
from .external import HF_PREFIX, TIMM_PREFIX, build_hf, build_timm, hf_exists, timm_exists
from .mobilenetv2 import MobileNetV2
from .resnet_cifar import BottleneckResNet, ResNet
from .shufflenetv1 import ShuffleNetV1
from .shufflenetv2 import REPDISTILLER_WIDTHS, ShuffleNetV2
from .shufflenetv2_original import OriginalShuffleNetV2
from .vgg import VGG
from .wrn import WideResNet, blocks_per_stage

__all__ = ["MODELS", "build_model", "model_exists", "list_models"]

MODELS = Registry("model")

TORCHVISION_PREFIX = "torchvision:"
LIST_NUM_CLASSES = 100  # the class count list_models() counts parameters for (CIFAR-100, as the KD papers do)

_WRN_PAPER = "Zagoruyko & Komodakis, Wide Residual Networks, BMVC 2016 (arXiv:1605.07146)"
_SHUFFLENETV2_PAPER = "Ma et al., ShuffleNet V2, ECCV 2018 (arXiv:1807.11164)"
_SHUFFLENETV1_PAPER = "Zhang et al., ShuffleNet, CVPR 2018 (arXiv:1707.01083)"
_RESNET_PAPER = "He et al., Deep Residual Learning for Image Recognition, CVPR 2016 (arXiv:1512.03385)"
_RESNET_X4_PAPER = _RESNET_PAPER + "; x4 widths: Tian et al., Contrastive Representation Distillation, ICLR 2020"
_VGG_PAPER = "Simonyan & Zisserman, Very Deep Convolutional Networks, ICLR 2015 (arXiv:1409.1556)"
_MOBILENETV2_PAPER = "Sandler et al., MobileNetV2, CVPR 2018 (arXiv:1801.04381)"
_RD = "RepDistiller"  # Tian et al.'s benchmark code (github.com/HobbitLong/RepDistiller), also mdistiller's

for _depth, _k in [(16, 1), (16, 2), (16, 4), (16, 8), (28, 2), (28, 4), (28, 10), (40, 1), (40, 2), (40, 4)]:
    MODELS.register(f"wrn-{_depth}-{_k}", family="wrn", paper=_WRN_PAPER,
                    source=f"{_RD} wrn_{_depth}_{_k}" if (_depth, _k) in {(16, 1), (16, 2), (40, 1), (40, 2)}
                    else "the WRN authors' code")(partial(WideResNet, _depth, _k))

for _size in ["0.5", "1.0", "1.5", "2.0"]:
    MODELS.register(f"shufflenetv2-{_size}", family="shufflenetv2", paper=_SHUFFLENETV2_PAPER,
                    source="the paper's units and widths, 3x3 stem")(partial(ShuffleNetV2, float(_size)))
    MODELS.register(f"shufflev2-{_size}", family="shufflenetv2", paper=_SHUFFLENETV2_PAPER,
                    source=f"{_RD} ShuffleV2" + ("" if _size == "1.0" else f" (net_size {_size})")
                    + ": 1x1 stem" + (", 224 first-stage channels" if _size == "2.0" else ""))(
        partial(ShuffleNetV2, float(_size), stem_kernel=1, widths=REPDISTILLER_WIDTHS[float(_size)]))
    MODELS.register(f"shufflenetv2-orig-{_size}", family="shufflenetv2", paper=_SHUFFLENETV2_PAPER,
                    source=f"the original Distillation project's shufflenetV2-{_size}: pre-activation "
                           f"units, conv biases")(partial(OriginalShuffleNetV2, float(_size)))
MODELS.register("shufflev1", family="shufflenetv1", paper=_SHUFFLENETV1_PAPER,
                source=f"{_RD} ShuffleV1: g=3, 1x1 stem")(ShuffleNetV1)

for _depth in [8, 14, 20, 32, 44, 56, 110]:
    MODELS.register(f"resnet{_depth}", family="resnet-cifar", paper=_RESNET_PAPER,
                    source=f"{_RD} resnet{_depth}")(partial(ResNet, _depth))
for _depth in [8, 32]:
    MODELS.register(f"resnet{_depth}x4", family="resnet-cifar", paper=_RESNET_X4_PAPER,
                    source=f"{_RD} resnet{_depth}x4")(partial(ResNet, _depth, (32, 64, 128, 256)))
MODELS.register("resnet50-cifar", family="resnet-cifar", paper=_RESNET_PAPER,
                source=f"{_RD} ResNet50: bottlenecks, 3x3 stride-1 stem, no max-pool")(BottleneckResNet)

for _depth in [8, 11, 13, 16, 19]:
    MODELS.register(f"vgg{_depth}", family="vgg-cifar", paper=_VGG_PAPER,
                    source=f"{_RD} vgg{_depth} (vgg{_depth}_bn): BatchNorm, no hidden FC")(partial(VGG, _depth))
MODELS.register("mobilenetv2-0.5", family="mobilenetv2-cifar", paper=_MOBILENETV2_PAPER,
                source=f"{_RD} MobileNetV2 (mobile_half): expansion 6, width 0.5")(
    partial(MobileNetV2, 6, 0.5))


def _wrn_from_name(match: re.Match) -> Callable[..., WideResNet]:
    depth, widen_factor = int(match[1]), int(match[2])
    blocks_per_stage(depth, widen_factor)  # an impossible WRN is a UserError, so model_exists() says False
    return partial(WideResNet, depth, widen_factor)


MODELS.register_pattern(r"wrn-(\d+)-(\d+)", _wrn_from_name, "wrn-D-K")


def build_model(name: str, num_classes: int = 10, weights: str | None = None, in_channels: int = 3,
                **kwargs: Any) -> nn.Module:
    """Build the model called ``name`` (see the module docstring) with ``num_classes`` outputs.

    ``weights`` names pretrained torchvision weights (``"DEFAULT"``, ``"IMAGENET1K_V1"``...) and is the only
    thing that downloads; such a model keeps the weights' class count, which must equal ``num_classes``.
    For ``timm:`` and ``hf:`` models ``weights="DEFAULT"`` loads the library's pretrained weights (see
    :mod:`kdgraph.models.external`) and ``kwargs`` go to ``timm.create_model`` or the Hugging Face config.
    Registry and import-path builders get ``num_classes`` if their signature takes it (or ``**kwargs``), and
    ``in_channels`` if it names it (or takes ``**kwargs`` and ``in_channels`` is not 3); other ``kwargs`` go
    to the builder as they are.
    """
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name[len(TORCHVISION_PREFIX):], num_classes, weights, in_channels, kwargs)
    if name.startswith(TIMM_PREFIX):
        return build_timm(name[len(TIMM_PREFIX):], num_classes, weights, in_channels, kwargs, _instantiate)
    if name.startswith(HF_PREFIX):
        return build_hf(name[len(HF_PREFIX):], num_classes, weights, in_channels, kwargs)
    if weights is not None:
        raise UserError(f"weights={weights!r} only applies to 'torchvision:', 'timm:' and 'hf:' models, "
                        f"not to {name!r}")
    builder = MODELS.get(name)
    if not callable(builder):
        raise UserError(f"model {name!r} names a {type(builder).__name__}, not something that builds a model")
    params = _parameters(builder)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "num_classes" in params or takes_any:
        kwargs["num_classes"] = num_classes
    if "in_channels" in params or (takes_any and in_channels != 3):
        kwargs["in_channels"] = in_channels
    elif in_channels != 3:
        raise UserError(f"model {name!r} takes no in_channels argument, so it cannot take {in_channels} channels")
    return _instantiate(name, builder, kwargs)


def _parameters(builder: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(builder).parameters)
    except (TypeError, ValueError):  # some builtins have no signature
        return {}


def _build_torchvision(arch: str, num_classes: int, weights: str | None, in_channels: int,
                       kwargs: dict[str, Any]) -> nn.Module:
    from torchvision import models  # imported here: torchvision is slow to import and often unneeded

    name = TORCHVISION_PREFIX + arch
    known = models.list_models(module=models)
    if arch not in known:
        raise UserError(f"unknown torchvision model {arch!r}{did_you_mean(arch, known)}")
    if in_channels != 3:
        raise UserError(f"{name} takes 3 input channels, not in_channels={in_channels}")
    if weights is None:
        kwargs["num_classes"] = num_classes
    else:
        enum = models.get_model_weights(arch)
        try:
            classes = len(enum.verify(weights).meta["categories"])
        except KeyError:
            raise UserError(f"unknown weights {weights!r} for {name}; available: "
                            f"{', '.join(['DEFAULT'] + [w.name for w in enum])}") from None
        if classes != num_classes:
            raise UserError(f"weights {weights!r} of {name} have {classes} classes but num_classes is "
                            f"{num_classes}; set num_classes to {classes}")
    return _instantiate(name, partial(models.get_model, arch, weights=weights), kwargs)


def _instantiate(name: str, builder: Callable[..., Any], kwargs: dict[str, Any]) -> nn.Module:
    wrong = check_arguments(builder, kwargs)
    if wrong:
        raise UserError(f"model {name!r}: " + "; ".join(f"{k}: {msg}" for k, msg in wrong))
    try:
        model = builder(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build model {name!r} with arguments {sorted(kwargs)}: {e}") from e
    if not isinstance(model, nn.Module):
        raise UserError(f"model {name!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def model_exists(name: str) -> bool:
    """Whether ``name`` names a model, without building it (an import path is imported)."""
    if name.startswith(TORCHVISION_PREFIX):
        from torchvision import models

        return name[len(TORCHVISION_PREFIX):] in models.list_models(module=models)
    if name.startswith(TIMM_PREFIX):
        return timm_exists(name[len(TIMM_PREFIX):])
    if name.startswith(HF_PREFIX):
        return hf_exists(name[len(HF_PREFIX):])
    return MODELS.exists(name)


def list_models() -> list[dict[str, Any]]:
    """One dict per registered model: name, family, paper, source (where the definition comes from),
    num_classes, its parameter count for them and the foreign checkpoint layouts it loads.

    The models are built on the meta device, so this allocates no memory and runs no initialisation.
    """
    rows = []
    for name in MODELS.names():
        with torch.device("meta"):
            model = build_model(name, num_classes=LIST_NUM_CLASSES)
        meta = MODELS.meta(name)
        rows.append({"name": name, "family": meta.get("family"), "paper": meta.get("paper"),
                     "source": meta.get("source"), "num_classes": LIST_NUM_CLASSES,
                     "params": sum(p.numel() for p in model.parameters()),
                     "checkpoint_layouts": list(getattr(model, "checkpoint_layouts", {}))})
    return rows
