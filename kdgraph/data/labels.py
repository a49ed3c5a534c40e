"""Partially labelled training sets: ``data.labels`` keeps the labels of a stratified, seeded subset.

::

    data:
      dataset: digits
      labels: {fraction: 0.05}     # or {count: 72}; optional `seed` (default: train.seed)

Every training sample is still used (the teacher-based terms learn from all of them); the samples outside
the subset get the target :data:`~kdgraph.losses.functional.UNLABELLED` (-100, torch's ``ignore_index``
default), which label-based terms (``ce``, ``dkd``) skip. The subset is a pure function of the seed and the
training set's labels: each class keeps its share of the labels (largest remainders round the shares to
whole samples) and, within a class, the samples come in a seeded random order. It is the same with any
number of workers, with ``loader: tensor``, on every rank, after a resume, and for the student alone and
the distilled student of the same seed. The test set always keeps its labels.

The labels are read from the data set's ``targets`` attribute (torchvision's data sets, ImageFolder and
digits have one; a ``ConcatDataset`` or ``Subset`` of such data sets works too); a data set without one is
read once, sample by sample.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset

from ..errors import UserError
from ..losses.functional import UNLABELLED

__all__ = ["UNLABELLED", "PartialLabels", "dataset_targets", "hide_labels", "labelled_subset", "labels_kept"]

_SALT = 0x1ABE1  # keeps the subset's random order apart from the sampler's order of the same seed


def labels_kept(labels: Mapping[str, Any] | None) -> bool:
    """False when the ``data.labels`` block keeps no label at all (``count: 0`` or ``fraction: 0``)."""
    return not labels or not (labels.get("fraction") == 0 or labels.get("count") == 0)


def check_labels(labels: Mapping[str, Any] | None) -> str | None:
    """What is wrong with a ``data.labels`` block, or None: it names exactly one of fraction and count."""
    if labels is None:
        return None
    given = [k for k in ("fraction", "count") if labels.get(k) is not None]
    if len(given) != 1:
        return ("give exactly one of `fraction` (0..1 of the training samples) and `count` (a number of "
                f"samples), not {' and '.join(given) or 'neither'}")
    return None


def labelled_subset(targets: Tensor, *, fraction: float | None = None, count: int | None = None,
                    seed: int = 0) -> Tensor:
    """A (N,) bool mask of the samples that keep their label: ``count`` of them, or ``fraction`` of N.

    Stratified: class c with n_c of the N samples keeps round(count * n_c / N) labels (the largest
    remainders take the leftover ones, ties broken at random), and which samples of a class keep them is
    a seeded random draw. Samples already marked :data:`UNLABELLED` are never chosen. Raises a
    :class:`~kdgraph.errors.UserError` when ``count`` exceeds the labelled samples or a positive
    ``fraction`` keeps none.

    Example::

        >>> mask = labelled_subset(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), fraction=0.5, seed=0)
        >>> int(mask.sum()), int(mask[:4].sum())
        (4, 2)
    """
    from .tensor import _seed

    targets = torch.as_tensor(targets).long().reshape(-1).cpu()
    candidates = torch.nonzero(targets != UNLABELLED).flatten()
    n = len(candidates)
    if (fraction is None) == (count is None):
        raise UserError("data.labels: " + check_labels({"fraction": fraction, "count": count}))
    keep = math.floor(fraction * n + 0.5) if count is None else int(count)
    if keep > n or keep < 0:
        raise UserError(f"data.labels.count {count} is not between 0 and the {n} labelled training samples")
    if fraction is not None and fraction > 0 and keep == 0:
        raise UserError(f"data.labels.fraction {fraction} keeps no label of the {n} training samples")
    g = torch.Generator().manual_seed(_seed(seed, _SALT))
    classes, sizes = torch.unique(targets[candidates], return_counts=True)
    share = keep * sizes.double() / max(n, 1)
    quota = share.floor().long()
    leftover = keep - int(quota.sum())
    if leftover:  # largest remainders first; a random order decides between equal remainders
        shuffled = torch.randperm(len(classes), generator=g)
        by_remainder = shuffled[torch.argsort((share - quota)[shuffled], descending=True, stable=True)]
        quota[by_remainder[:leftover]] += 1
    order = candidates[torch.randperm(n, generator=g)]         # a seeded random order of the samples
    order = order[torch.argsort(targets[order], stable=True)]  # grouped by class, random within a class
    cls = torch.searchsorted(classes, targets[order])
    first = torch.cumsum(sizes, 0) - sizes                      # where each class starts in `order`
    rank = torch.arange(n) - first[cls]
    mask = torch.zeros(len(targets), dtype=torch.bool)
    mask[order[rank < quota[cls]]] = True
    return mask


def hide_labels(targets: Tensor, labelled: Tensor) -> Tensor:
    """``targets`` with :data:`UNLABELLED` where ``labelled`` is False (a new tensor)."""
    targets = torch.as_tensor(targets).long()
    return torch.where(labelled.to(targets.device), targets, UNLABELLED)


def dataset_targets(dataset: Dataset) -> Tensor:
    """The (N,) integer labels of a data set: its ``targets`` attribute, else every sample's label, read once."""
    if isinstance(dataset, ConcatDataset):
        return torch.cat([dataset_targets(d) for d in dataset.datasets])
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [dataset[i][1] for i in range(len(dataset))]
    try:
        targets = torch.as_tensor(targets if not isinstance(targets, list) or not targets
                                  or not torch.is_tensor(targets[0]) else torch.stack(targets))
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"data.labels needs integer class labels, and the training set's could not be read "
                        f"as one ({e})") from None
    if targets.dim() != 1 or targets.dtype.is_floating_point or len(targets) != len(dataset):
        raise UserError(f"data.labels needs one integer class label per training sample; the training set "
                        f"({type(dataset).__name__}) has targets of shape {tuple(targets.shape)} {targets.dtype}")
    return targets.long()


class PartialLabels(Dataset):
    """A training set whose samples outside ``labelled`` carry the target :data:`UNLABELLED`.

    Wraps the loader's data set (items may be indices or the ``(index, seed)`` pairs of a
    :class:`~kdgraph.data.SeededDataset`) and passes batched ``__getitems__`` calls through, so what the
    data set draws is unchanged; only the labels of unlabelled samples are replaced. ``targets`` holds
    the labels as the loader yields them.
    """

    def __init__(self, dataset: Dataset, targets: Tensor, labelled: Tensor):
        self.dataset = dataset
        self.labelled = labelled.bool().tolist()
        self.targets = hide_labels(targets, labelled).tolist()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # classes, transform... of the wrapped data set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, item):
        return self._hide(item, self.dataset[item])

    def __getitems__(self, items):
        many = getattr(self.dataset, "__getitems__", None)
        samples = many(items) if many is not None else [self.dataset[i] for i in items]
        return [self._hide(i, s) for i, s in zip(items, samples)]

    def _hide(self, item, sample):
        index = item[0] if isinstance(item, tuple) else item
        if self.labelled[index]:
            return sample
        y = sample[1]
        return (sample[0], torch.full_like(y, UNLABELLED) if torch.is_tensor(y) else UNLABELLED, *sample[2:])
