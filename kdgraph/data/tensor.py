"""``data.loader: tensor``: the whole data set as one tensor on the training device, augmented there in batches.

For CIFAR-sized data sets the per-sample torchvision pipeline (PIL image, random crop, flip, ToTensor,
Normalize, one Python call per image, collated in worker processes) costs more than the training step of
a small student. :class:`TensorLoader` instead holds every image once, as uint8 (N, C, H, W), on the
training device and builds each batch with a few tensor operations there: one gather that does the
padded random crop and the horizontal flip together, a conversion to float and the normalisation. No
worker processes, no pinned-memory copies.

It produces what the ``workers`` loader produces: the same order of samples (both use
:class:`~kdgraph.data.EpochSampler`), the same pixel values when augmentation is off (the same float ops as
``ToTensor`` + ``Normalize``), and with augmentation on the same distribution of crops and flips (not the
same draws: the per-sample transforms use torch's global generator in the worker processes). The
augmentation's randomness is a pure function of ``(seed, epoch, rank, position in the epoch)``, drawn
on the CPU once per epoch, so a run stopped mid-epoch and resumed sees exactly the batches an
uninterrupted run sees, and the global RNG is never touched.

Which data sets it can hold (:func:`tensor_source`):

* ``cifar10`` / ``cifar100`` (any torchvision ``CIFAR10``/``CIFAR100``): their ``.data`` (uint8 NHWC)
  and ``.targets``, read as they are;
* ``digits``: kept as float32 in [0, 1] (its images were resized bilinearly, so they are not multiples
  of 1/255 and quantising to uint8 would change them; at 4 MB it does not matter); translation by up to
  one pixel with black padding, no flip, as the ``workers`` loader;
* ``fake`` and ``cinic10`` (and any other torchvision ``VisionDataset`` whose images are PIL images): every
  image is decoded once, when the loader is built, in the data block's ``workers`` processes, with a
  progress bar on a terminal (CINIC-10's 90 000 training images make 276 MB of uint8; ``train+valid``
  twice that). Nothing is cached on disk: every run decodes again;
* ``imagenet`` is refused: its RandomResizedCrop is not a batched crop of a fixed-size tensor, and it does
  not fit on a GPU anyway -- use ``loader: workers``.

The augmentation is read off the data set's torchvision transform: ``RandomCrop`` to the image size
(with ``padding`` and any ``padding_mode``), ``RandomHorizontalFlip``, ``ToTensor``/``PILToTensor`` and
``Normalize``. Any other step is a :class:`~kdgraph.errors.UserError` naming it.

A data set of your own
----------------------
Give it a method ``tensor_source()`` returning a :class:`TensorSource`: the images as one (N, C, H, W)
tensor (uint8 in 0..255, or floating point in 0..1), the integer targets, the normalisation and the
augmentation to apply::

    from kdgraph.data.tensor import TensorSource

    class MyData(torch.utils.data.Dataset):
        ...
        def tensor_source(self) -> TensorSource:
            return TensorSource(self.images_uint8, self.labels, mean=(0.5,) * 3, std=(0.25,) * 3,
                                crop_padding=4 if self.train else 0, flip=0.5 if self.train else 0.0)

or, when the data set already has a torchvision transform of the supported kind,
``TensorSource.from_transform(images, targets, self.transform)``. The method is called once per loader.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

__all__ = ["TensorLoader", "TensorSource", "tensor_source", "augmentation_from_transform"]

PADDING_MODES = ("constant", "edge", "reflect", "symmetric")


@dataclass
class TensorSource:
    """A data set as tensors, with the normalisation and augmentation :class:`TensorLoader` applies.

    ``images``: (N, C, H, W), uint8 (0..255) or floating point (0..1; pixel values before normalisation).
    ``targets``: (N,) integer class labels. ``mean``/``std``: per channel, in the 0..1 scale, applied after
    the conversion to float. ``crop_padding``: a random H x W crop of the image padded by this many
    pixels on each side (0: no crop), padded as torchvision's ``padding_mode`` (``constant`` uses
    ``fill``, in the images' units: 0..255 for uint8). ``flip``: the probability of a horizontal flip.
    """

    images: Tensor
    targets: Tensor
    mean: Sequence[float]
    std: Sequence[float]
    crop_padding: int = 0
    padding_mode: str = "reflect"
    fill: float = 0.0
    flip: float = 0.0

    def __post_init__(self):
        if not (torch.is_tensor(self.images) and self.images.dim() == 4):
            raise UserError("TensorSource.images must be one (N, C, H, W) tensor, got "
                            f"{type(self.images).__name__} {tuple(getattr(self.images, 'shape', ()))}")
        if self.images.dtype != torch.uint8 and not self.images.dtype.is_floating_point:
            raise UserError(f"TensorSource.images must be uint8 (0..255) or floating point (0..1), "
                            f"not {self.images.dtype}")
        self.targets = torch.as_tensor(self.targets).long().reshape(-1)
        if len(self.targets) != len(self.images):
            raise UserError(f"TensorSource: {len(self.images)} images but {len(self.targets)} targets")
        c, h, w = self.images.shape[1:]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != c or len(self.std) != c:
            raise UserError(f"TensorSource: mean and std need {c} values (one per channel), got "
                            f"{len(self.mean)} and {len(self.std)}")
        if self.padding_mode not in PADDING_MODES:
            raise UserError(f"TensorSource.padding_mode must be one of {', '.join(PADDING_MODES)}, "
                            f"not {self.padding_mode!r}")
        self.crop_padding = int(self.crop_padding)
        if self.crop_padding < 0 or (self.padding_mode == "reflect" and self.crop_padding >= min(h, w)):
            raise UserError(f"TensorSource.crop_padding {self.crop_padding} does not fit {h}x{w} images "
                            f"with padding_mode {self.padding_mode!r}")
        if not 0.0 <= float(self.flip) <= 1.0:
            raise UserError(f"TensorSource.flip is a probability, not {self.flip!r}")

    @classmethod
    def from_transform(cls, images: Tensor, targets, transform) -> "TensorSource":
        """The images and targets with the augmentation and normalisation of a torchvision ``transform``."""
        return cls(images, targets, **augmentation_from_transform(transform, tuple(images.shape[1:])))

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.flip > 0


# ---------------------------------------------------------------------------------------- transforms
def augmentation_from_transform(transform, shape: tuple[int, int, int], name: str = "the dataset") -> dict:
    """``TensorSource`` keyword arguments (mean, std, crop_padding, padding_mode, fill, flip) of ``transform``.

    Accepts a ``Compose`` (or a single transform) of RandomCrop to the image size, RandomHorizontalFlip,
    ToTensor (or PILToTensor + ConvertImageDtype(float)) and Normalize; raises a UserError for anything else.
    """
    from torchvision import transforms as T

    steps = list(transform.transforms) if isinstance(transform, T.Compose) else \
        ([] if transform is None else [transform])
    c, h, w = shape
    out: dict[str, Any] = {"mean": (0.0,) * c, "std": (1.0,) * c}
    to_tensor = 0
    for step in steps:
        if isinstance(step, T.RandomCrop):
            padding = step.padding
            if isinstance(padding, Sequence) and len(set(padding)) == 1:
                padding = padding[0]
            if tuple(step.size) != (h, w) or not isinstance(padding, int) or step.pad_if_needed:
                raise UserError(f"loader: tensor does {h}x{w} random crops of images padded equally on all "
                                f"sides; {name} has {step!r}. Use `loader: workers`")
            if not isinstance(step.fill, (int, float)):
                raise UserError(f"loader: tensor pads with one fill value; {name} has fill={step.fill!r}. "
                                f"Use `loader: workers`")
            out.update(crop_padding=padding, padding_mode=step.padding_mode, fill=float(step.fill))
        elif isinstance(step, T.RandomHorizontalFlip):
            out["flip"] = float(step.p)
        elif isinstance(step, (T.ToTensor, T.PILToTensor)):
            to_tensor += 1
        elif isinstance(step, T.ConvertImageDtype) and step.dtype.is_floating_point:
            pass
        elif isinstance(step, T.Normalize):
            out.update(mean=tuple(step.mean), std=tuple(step.std))
        else:
            raise UserError(f"loader: tensor cannot do {type(step).__name__} (in the transform of {name}) on "
                            f"the device; use `loader: workers`, or give the data set a tensor_source() "
                            f"method (see kdgraph.data.tensor)")
    if to_tensor != 1:
        raise UserError(f"loader: tensor reads the transform of {name} but it has no ToTensor step: {transform!r}. "
                        f"Use `loader: workers`")
    return out


# ------------------------------------------------------------------------------------------ sources
def tensor_source(dataset, *, name: str = "the dataset", workers: int = 0) -> TensorSource:
    """The :class:`TensorSource` of a data set built by :func:`kdgraph.data.build_datasets` (see the module doc)."""
    from torch.utils.data import ConcatDataset
    from torchvision import datasets as D

    hook = getattr(dataset, "tensor_source", None)
    if callable(hook):
        source = hook()
        if not isinstance(source, TensorSource):
            raise UserError(f"{name}: tensor_source() must return a kdgraph.data.tensor.TensorSource, "
                            f"got {type(source).__name__}")
        return source
    if isinstance(dataset, D.CIFAR10) and dataset.target_transform is None:
        images = torch.from_numpy(np.ascontiguousarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
        return TensorSource.from_transform(images, dataset.targets, dataset.transform)
    if isinstance(dataset, ConcatDataset):
        parts = [tensor_source(d, name=name, workers=workers) for d in dataset.datasets]
        aug = [{k: v for k, v in vars(p).items() if k not in ("images", "targets")} for p in parts]
        if any(a != aug[0] for a in aug):
            raise UserError(f"{name}: the parts of the concatenated data set are augmented differently")
        return TensorSource(torch.cat([p.images for p in parts]), torch.cat([p.targets for p in parts]), **aug[0])
    if isinstance(dataset, D.VisionDataset) and getattr(dataset, "transform", None) is not None:
        return _decode(dataset, name, workers)
    raise UserError(f"{name} ({type(dataset).__name__}) cannot be held as one tensor for `loader: tensor`: "
                    f"use `loader: workers`, or give the data set a tensor_source() method returning a "
                    f"kdgraph.data.tensor.TensorSource (see the kdgraph.data.tensor docs)")


def _decode(dataset, name: str, workers: int) -> TensorSource:
    """Every image of a torchvision data set (PIL images) decoded once to uint8, with a progress bar."""
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from tqdm import tqdm

    try:
        probe = dataset[0][0]
    except Exception as e:  # noqa: BLE001 -- any failure reading the data set is the user's to see
        raise UserError(f"{name}: could not read a sample for `loader: tensor`: {e}") from None
    shape = tuple(probe.shape)
    aug = augmentation_from_transform(dataset.transform, shape, name)  # refuse before decoding anything
    raw = copy.copy(dataset)
    raw.transform = T.PILToTensor()
    if hasattr(raw, "transforms"):  # VisionDataset's combined transform, used by some data sets
        from torchvision.datasets.vision import StandardTransform
        raw.transforms = StandardTransform(raw.transform, getattr(raw, "target_transform", None))
    images = torch.empty((len(raw), *shape), dtype=torch.uint8)
    targets = torch.empty(len(raw), dtype=torch.long)
    loader = DataLoader(raw, batch_size=256, num_workers=workers, shuffle=False)
    at = 0
    try:
        with tqdm(total=len(raw), desc=f"loader: tensor: decoding {name}", unit="img", leave=False,
                  disable=None) as bar:
            for x, y in loader:
                images[at:at + len(x)] = x
                targets[at:at + len(x)] = torch.as_tensor(y)
                at += len(x)
                bar.update(len(x))
    except (RuntimeError, TypeError) as e:  # images of different sizes, or not PIL images
        raise UserError(f"{name}: could not decode the images into one {shape} uint8 tensor for "
                        f"`loader: tensor` ({e}); use `loader: workers`") from None
    return TensorSource(images, targets, **aug)


# ------------------------------------------------------------------------------------------- loader
def _seed(*values: int) -> int:
    """A well-mixed 63-bit seed from a few integers (any sign)."""
    state = np.random.SeedSequence([int(v) % 2**64 for v in values]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _index_table(size: int, pad: int, mode: str) -> tuple[Tensor, Tensor]:
    """For each crop offset o in [0, 2*pad]: the source index of output pixel i (clamped), and its validity.

    Both (2*pad + 1, size); validity is all True except for ``constant`` padding.
    """
    r = torch.arange(2 * pad + 1)[:, None] + torch.arange(size)[None, :] - pad  # in unpadded coordinates
    valid = torch.ones_like(r, dtype=torch.bool)
    if mode == "reflect":
        r = torch.where(r < 0, -r, torch.where(r >= size, 2 * (size - 1) - r, r))
    elif mode == "symmetric":
        r = torch.where(r < 0, -r - 1, torch.where(r >= size, 2 * size - 1 - r, r))
    else:  # edge and constant (masked)
        valid = (r >= 0) & (r < size)
        r = r.clamp(0, size - 1)
    return r, valid


class TensorLoader:
    """Batches of a :class:`TensorSource` held on ``device``; the augmentation is done there, in batches.

    The interface the engine uses of a ``DataLoader``: ``len()`` (batches left in the epoch),
    ``batch_size``, ``sampler`` (an :class:`~kdgraph.data.EpochSampler`: ``set_epoch(epoch[, start])``),
    ``generator`` and iteration over ``(x, y)``: x float32 (B, C, H, W) normalised, y int64, both on
    ``device``; with ``indices``, ``(x, y, index)``, index int64 (each sample's row of the source) on
    ``device``. The last batch may be smaller (``drop_last`` is False).

    The crop offsets and flips of sample position p of an epoch (p counts from the epoch's start, on
    this rank) come from a generator seeded with ``(sampler.seed, sampler.epoch, sampler.rank)``, so
    they depend on nothing else: a resumed epoch (``set_epoch(epoch, start)``) continues the same
    draws. ``generator`` is there for DataLoader compatibility and is not used.
    """

    drop_last = False
    labelled = None  # build_loaders: the mask of the training samples that keep their label (data.labels)
    num_workers = 0
    pin_memory = False
    persistent_workers = False

    def __init__(self, source: TensorSource, batch_size: int, sampler, *, device=None, dataset=None,
                 generator: torch.Generator | None = None, indices: bool = False):
        self.device = torch.device(device if device is not None else "cpu")
        self.indices = indices
        self.batch_size = int(batch_size)
        self.sampler = sampler
        self.generator = generator if generator is not None else torch.Generator()
        self.dataset = dataset if dataset is not None else source
        self.source = source
        self.images = source.images.to(self.device).contiguous()
        self.targets = source.targets.to(self.device)
        c, h, w = self.images.shape[1:]
        self._scale = 255.0 if self.images.dtype == torch.uint8 else None
        self._mean = torch.tensor(source.mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self._std = torch.tensor(source.std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        p = source.crop_padding
        rows, row_ok = _index_table(h, p, source.padding_mode)
        cols, col_ok = _index_table(w, p, source.padding_mode)
        self._rows, self._cols = rows.to(self.device), cols.to(self.device)
        self._cols_flipped = cols.flip(1).to(self.device)
        self._constant = source.padding_mode == "constant" and p > 0
        if self._constant:
            self._row_ok, self._col_ok = row_ok.to(self.device), col_ok.to(self.device)
            self._col_ok_flipped = col_ok.flip(1).to(self.device)
            self._fill = torch.tensor(source.fill, device=self.device).to(self.images.dtype)
        self._channels = torch.arange(c, device=self.device)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def draws(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(dy, dx, flip)`` for the ``n`` sample positions of the current epoch (CPU tensors)."""
        s = self.sampler
        g = torch.Generator().manual_seed(_seed(getattr(s, "seed", 0), getattr(s, "epoch", 0),
                                                getattr(s, "rank", 0), 0x6B64))
        k = 2 * self.source.crop_padding + 1
        offsets = torch.randint(0, k * k, (n,), generator=g)
        flip = torch.rand(n, generator=g) < self.source.flip
        return offsets // k, offsets % k, flip

    def __iter__(self):
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        start = int(getattr(self.sampler, "start", 0))
        augment = self.source.augments
        if augment:
            dy, dx, flip = (t[start:start + len(order)].to(self.device) for t in self.draws(start + len(order)))
        order = order.to(self.device)
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            sl = slice(b, b + self.batch_size)
            x = self.augment(idx, dy[sl], dx[sl], flip[sl]) if augment else self.images[idx]
            yield (self.normalise(x), self.targets[idx]) + ((idx,) if self.indices else ())

    def augment(self, idx: Tensor, dy: Tensor, dx: Tensor, flip: Tensor) -> Tensor:
        """Padded random crops (offsets ``dy``, ``dx`` in [0, 2*padding]) and flips of images ``idx``, one gather."""
        rows = self._rows[dy]                                                  # (B, H)
        cols = torch.where(flip[:, None], self._cols_flipped[dx], self._cols[dx])  # (B, W)
        x = self.images[idx[:, None, None, None], self._channels[None, :, None, None],
                        rows[:, None, :, None], cols[:, None, None, :]]
        if self._constant:
            col_ok = torch.where(flip[:, None], self._col_ok_flipped[dx], self._col_ok[dx])
            ok = self._row_ok[dy][:, None, :, None] & col_ok[:, None, None, :]
            x = torch.where(ok, x, self._fill)
        return x

    def normalise(self, x: Tensor) -> Tensor:
        """To float32 (uint8 / 255, as ToTensor) and ``(x - mean) / std`` (as Normalize): the same float ops."""
        x = x.to(torch.float32)
        if self._scale is not None:
            x = x.div_(self._scale)
        return x.sub_(self._mean).div_(self._std)
