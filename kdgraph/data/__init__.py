"""Datasets and data loaders for the ``data`` block of a spec.

Built in: ``cifar10``, ``cifar100`` (downloaded into ``root`` when ``download: true``), ``cinic10``
(ImageFolders ``root/{train,valid,test}``), ``imagenet`` (ImageFolders ``root/{train,val}``), ``digits``
(scikit-learn's bundled 8x8 digits, offline) and ``fake`` (torchvision ``FakeData``).

Adding a dataset
----------------
1. Register a builder under a name, with the dataset's meta information::

       from kdgraph.data import DATASETS

       @DATASETS.register("mydata", num_classes=10, input_shape=(3, 32, 32),
                          mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
       def mydata(root, train: bool, augment: bool, download: bool, **options) -> Dataset: ...

   The builder is called once with ``train=True`` and once with ``train=False``; ``options`` are the
   spec's ``data.options``. A meta value may instead be a callable taking the options as keyword
   arguments (e.g. ``input_shape=lambda size=32, **_: (3, size, size)``). When the training set has a
   ``classes`` attribute, its length is taken as ``num_classes``.

2. Or name an import path in the spec (``dataset: mypkg.data:make``). The callable is called once as
   ``make(root=..., augment=..., download=..., **options)`` and must return
   ``(train_set, test_set, info)`` where ``info`` is a :class:`DatasetInfo` or a dict with keys
   ``num_classes`` and ``input_shape`` (C, H, W), and optionally ``mean``, ``std`` (default 0 and 1 per
   channel) and ``name`` (default the import path).

Loaders: :func:`build_loaders` shuffles the training set in an order fixed by the seed and the epoch, so it
(and the seeds of worker processes) repeat for a given ``seed``; with ``distributed=True`` it uses
shards of the same order across ranks. Both use :class:`EpochSampler`: call
``train_loader.sampler.set_epoch(epoch)`` before each epoch (the order is a function of seed and epoch).
With ``indices=True`` the training loader yields ``(x, y, index)``: ``index`` (int64) holds each
sample's position in the training set, for terms that keep per-sample state (CRD's memory bank).

The spec's ``data.loader`` picks the loader: ``workers`` (default) is a torch ``DataLoader`` running the
per-sample torchvision transforms in ``workers`` processes; ``tensor`` is a
:class:`~kdgraph.data.tensor.TensorLoader` holding the whole data set on the training device and augmenting
it there in batches (CIFAR-sized data sets; see :mod:`kdgraph.data.tensor` for which data sets it takes and
the ``tensor_source()`` hook for your own).

``data.labels`` (``{fraction: 0.05}`` or ``{count: N}``) keeps the labels of a stratified, seeded subset
of the training samples and marks the others :data:`UNLABELLED` (see :mod:`kdgraph.data.labels`).
"""
from __future__ import annotations

import dataclasses
import inspect
import random
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..distributed import rank as _rank, world as _world
from ..errors import UserError, did_you_mean
from ..params import check_arguments
from .base import DATASETS, DatasetInfo
from .labels import UNLABELLED, PartialLabels, dataset_targets, hide_labels, labelled_subset
from . import digits as _digits, vision as _vision  # noqa: F401  (register the built-in datasets)

__all__ = ["DATASETS", "DatasetInfo", "EpochSampler", "LOADERS", "UNLABELLED", "build_datasets", "build_loaders",
           "option_problems", "seed_worker", "train_targets"]

_BUILDER_ARGS = ("root", "train", "augment", "download")


def build_datasets(cfg: Mapping[str, Any]) -> tuple[Dataset, Dataset, DatasetInfo]:
    """``(train_set, test_set, info)`` for the ``data`` block ``cfg`` of a spec."""
    name = cfg["dataset"]
    common = dict(root=str(cfg.get("root") or "data"), augment=bool(cfg.get("augment", True)),
                  download=bool(cfg.get("download", True)))
    options = dict(cfg.get("options") or {})
    builder = DATASETS.get(name)  # UserError, with suggestions, for an unknown name or a bad import path
    _check_options(name, options)
    if name in DATASETS:
        train_set = builder(train=True, **common, **options)
        test_set = builder(train=False, **common, **options)
        return train_set, test_set, _registered_info(name, options, train_set)

    result = builder(**common, **options)
    if not (isinstance(result, tuple) and len(result) == 3):
        raise UserError(f"dataset {name!r} must return (train_set, test_set, info), got {type(result).__name__}")
    train_set, test_set, info = result
    if isinstance(info, DatasetInfo):
        info = info if info.name else dataclasses.replace(info, name=name)
    elif isinstance(info, Mapping):
        info = DatasetInfo.from_dict(info, name=name)
    else:
        raise UserError(f"dataset {name!r}: info must be a DatasetInfo or a dict, got {type(info).__name__}")
    return train_set, test_set, info


LOADERS = ("workers", "tensor")


def build_loaders(cfg: Mapping[str, Any], *, seed: int = 0, distributed: bool = False,
                  device: torch.device | str | None = None,
                  indices: bool = False) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """``(train_loader, test_loader, info)``: a shuffled training loader and an ordered test loader.

    With ``loader: tensor`` both are :class:`~kdgraph.data.tensor.TensorLoader` s whose data and batches live
    on ``device`` (default: the CPU); the ``workers`` loaders ignore ``device`` (batches come on the CPU).
    With ``indices`` the training loader yields ``(x, y, index)`` (each sample's index in the training set).
    With ``labels``, the training loader's ``labelled`` attribute is the (N,) mask of the samples that keep
    their label (the others come with the target :data:`UNLABELLED`); it is None otherwise.
    """
    kind = cfg.get("loader") or "workers"
    if kind not in LOADERS:
        raise UserError(f"data.loader must be one of {', '.join(LOADERS)}, not {kind!r}{did_you_mean(kind, LOADERS)}")
    train_set, test_set, info = build_datasets(cfg)
    batch_size = int(cfg.get("batch_size") or 128)
    test_batch_size = int(cfg.get("test_batch_size") or 2 * batch_size)
    workers = int(cfg["workers"] if cfg.get("workers") is not None else 4)
    rank, world = (_rank(), _world()) if distributed else (0, 1)
    if kind == "tensor":
        return (*_tensor_loaders(cfg, train_set, test_set, info, batch_size, test_batch_size, workers, seed,
                                 rank, world, device, indices), info)
    pin_memory = cfg.get("pin_memory")
    persistent = cfg.get("persistent_workers")
    common = dict(num_workers=workers, worker_init_fn=seed_worker,
                  pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
                  persistent_workers=workers > 0 and (persistent is None or bool(persistent)))

    train_data, labelled = SeededDataset(train_set, indices=indices), None
    if cfg.get("labels"):
        targets = dataset_targets(train_set)
        labelled = _labelled(cfg, targets, seed)
        train_data = PartialLabels(train_data, targets, labelled)
    train_loader = DataLoader(train_data, batch_size=batch_size, sampler=EpochSampler(
        len(train_set), seed=seed, shuffle=True, rank=rank, world=world, seeds=True), drop_last=False,
        generator=torch.Generator().manual_seed(seed + rank), **common)
    train_loader.labelled = labelled
    test_loader = DataLoader(test_set, batch_size=test_batch_size, sampler=EpochSampler(
        len(test_set), shuffle=False, rank=rank, world=world),
        generator=torch.Generator().manual_seed(seed), **common)
    return train_loader, test_loader, info


def _tensor_loaders(cfg, train_set, test_set, info: DatasetInfo, batch_size: int, test_batch_size: int,
                    workers: int, seed: int, rank: int, world: int, device, indices: bool):
    from .tensor import TensorLoader, tensor_source

    loaders = []
    for split, dataset, size, shuffle in (("training", train_set, batch_size, True),
                                          ("test", test_set, test_batch_size, False)):
        name = f"the {split} set of {cfg['dataset']!r}"
        source = tensor_source(dataset, name=name, workers=workers)
        if tuple(source.images.shape[1:]) != tuple(info.input_shape):
            raise UserError(f"loader: tensor: {name} holds images of shape {tuple(source.images.shape[1:])}, "
                            f"not the dataset's input_shape {tuple(info.input_shape)}; use `loader: workers`")
        labelled = _labelled(cfg, source.targets, seed) if shuffle and cfg.get("labels") else None
        if labelled is not None:
            source = dataclasses.replace(source, targets=hide_labels(source.targets, labelled))
        sampler = EpochSampler(len(source.images), seed=seed, shuffle=shuffle, rank=rank, world=world)
        loaders.append(TensorLoader(source, size, sampler, device=device, dataset=dataset, indices=indices and shuffle,
                                    generator=torch.Generator().manual_seed(seed + rank if shuffle else seed)))
        loaders[-1].labelled = labelled
    return loaders


def train_targets(loader) -> torch.Tensor | None:
    """The class label of every sample of ``loader``'s data set, by index (CPU int64), or ``None`` if unknown.

    Read from a :class:`~kdgraph.data.tensor.TensorLoader`'s source or from the data set's ``targets``
    attribute (torchvision's data sets, ``digits``); nothing is loaded to find them.
    """
    source = getattr(loader, "source", None)
    targets = source.targets if source is not None else getattr(loader.dataset, "targets", None)
    if targets is None:
        return None
    try:
        targets = torch.as_tensor(targets).long().reshape(-1).cpu()
    except (TypeError, ValueError, RuntimeError):
        return None
    return targets if len(targets) == len(loader.dataset) else None


def _labelled(cfg: Mapping[str, Any], targets: torch.Tensor, seed: int) -> torch.Tensor:
    """The mask of the training samples that keep their label under ``cfg["labels"]``."""
    labels = cfg["labels"]
    chosen = labels.get("seed")
    return labelled_subset(targets, fraction=labels.get("fraction"), count=labels.get("count"),
                           seed=seed if chosen is None else chosen)


class EpochSampler(torch.utils.data.Sampler):
    """Indices for one epoch, a pure function of ``(seed, epoch)``; shards across ranks; can start mid-epoch.

    ``set_epoch(epoch, start=k)`` makes the next iteration yield the epoch's order from its k-th index on,
    so a run stopped mid-epoch resumes on exactly the samples it had not seen (no data is loaded to skip).
    Without shuffling, shards are contiguous and nothing is repeated (evaluation counts every sample once).
    """

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1,
                 seeds: bool = False):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.seeds = seeds  # yield (index, sample seed) pairs for a SeededDataset
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if not self.shuffle:
            per = -(-self.n // self.world)
            return list(range(self.rank * per, min(self.n, (self.rank + 1) * per)))
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        per = -(-self.n // self.world)  # pad by wrapping so every rank takes the same number of steps
        order = torch.cat([order, order[: per * self.world - self.n]])
        return order[self.rank::self.world].tolist()

    def __iter__(self):
        indices = self._indices()[self.start:]
        if not self.seeds:
            return iter(indices)
        # the seed of the sample at global position q of the epoch's order (the same for any rank count)
        base = (self.seed * 1_000_003 + self.epoch) * 10_000_019
        return ((i, (base + self.rank + (self.start + j) * self.world) % 2**63) for j, i in enumerate(indices))

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)


class SeededDataset(Dataset):
    """A training set whose random augmentation is a function of the sample's place in the epoch.

    The sampler (``EpochSampler(seeds=True)``) hands out ``(index, seed)`` pairs and each sample is drawn
    right after seeding torch's, Python's and NumPy's generators with its seed, in whichever process loads
    it. So the augmentation of every sample is fixed by (seed, epoch, position): the same with 0 or 8
    worker processes, with 1 or 4 training processes, and after a resume in the middle of an epoch. A
    data set with a batched ``__getitems__`` gets the seed of its batch's first sample. Plain indices are
    passed through unseeded. With ``indices`` each sample ``(x, y)`` comes as ``(x, y, index)``.
    """

    def __init__(self, dataset: Dataset, indices: bool = False):
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # classes, targets, transform... of the wrapped data set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        if isinstance(item, tuple):
            _seed_all(item[1])
        return self._indexed(self.dataset[index], index)

    def __getitems__(self, items):
        many = getattr(self.dataset, "__getitems__", None)
        if many is None or not items or not isinstance(items[0], tuple):
            return [self[i] for i in items]
        _seed_all(items[0][1])
        indices = [i for i, _ in items]
        return [self._indexed(s, i) for s, i in zip(many(indices), indices)]

    def _indexed(self, sample, index: int):
        return (*sample, index) if self.indices else sample


def _seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's generators in a worker from the torch seed DataLoader gave it."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def option_problems(name: str, options: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems of a spec's ``data.options`` for dataset ``name``, as ``[(option, message)]``: options its
    builder does not take (unless it takes ``**options``) and values outside their annotated types and
    ranges (see :mod:`kdgraph.params`). Nothing is loaded; an import path is imported (under the policy)."""
    builder = DATASETS.get(name)
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return []
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [p for p in params if p not in _BUILDER_ARGS and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    problems = []
    for key in options:
        if key in _BUILDER_ARGS:
            problems.append((key, f"{key!r} is not an option: set it in the data block (data.{key})"
                             if key != "train" else "'train' is not an option: kdgraph builds both splits"))
        elif key not in accepted and not takes_any:
            problems.append((key, f"dataset {name!r} has no option {key!r}{did_you_mean(key, accepted)}; "
                                  f"its options: {', '.join(accepted) or 'none'}"))
    return problems + check_arguments(builder, dict(options), skip=_BUILDER_ARGS)


def _check_options(name: str, options: Mapping[str, Any]) -> None:
    problems = option_problems(name, options)
    if problems:
        raise UserError("; ".join(f"data.options.{k}: {m}" for k, m in problems))


def _registered_info(name: str, options: Mapping[str, Any], train_set: Dataset) -> DatasetInfo:
    meta = {k: v(**options) if callable(v) else v for k, v in DATASETS.meta(name).items()}
    classes = getattr(train_set, "classes", None)
    if classes is not None:  # e.g. an ImageFolder holding a subset of ImageNet's classes
        meta["num_classes"] = len(classes)
    return DatasetInfo.from_dict(meta, name=name)
