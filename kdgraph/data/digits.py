"""scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes) as small in-memory tensors.

A real data set that needs neither network nor disk: the images are scaled to [0, 1], replicated to 3
channels and resized once (bilinear) to ``size`` x ``size`` so CIFAR-style models apply. The 80/20
stratified split uses a fixed seed, independent of the training seed.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Annotated

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import UserError
from ..params import Range
from .base import DATASETS

SPLIT_SEED = 0
TEST_FRACTION = 0.2


@lru_cache(maxsize=4)
def digits_split(size: int = 16):
    """``(x_train, y_train, x_test, y_test, mean, std)``; images (N, 3, size, size) in [0, 1] (not normalised).

    ``mean`` and ``std`` are per-channel statistics of the training split.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise UserError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from None
    if int(size) < 1:
        raise UserError(f"digits: options.size must be a positive integer, not {size!r}")
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0  # (N, 8, 8), pixel values 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(labels)).numpy(), test_size=TEST_FRACTION,
                                           stratify=labels.numpy(), random_state=SPLIT_SEED)
    images = images.unsqueeze(1).expand(-1, 3, -1, -1)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).contiguous()
    x_train, x_test = images[idx_train], images[idx_test]
    mean = tuple(x_train.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x_train.std(dim=(0, 2, 3)).tolist())
    return x_train, labels[idx_train], x_test, labels[idx_test], mean, std


class TensorImageDataset(Dataset):
    """Normalised images held in memory, with optional random translation by up to ``shift`` pixels.

    Implements ``__getitems__`` so a DataLoader fetches (and augments) a whole batch with a few tensor
    operations instead of one Python call per image. Randomness comes from torch's global generator,
    which DataLoader workers seed from the loader's generator.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, shift: int = 0):
        mean_t = torch.tensor(mean).view(1, -1, 1, 1)
        std_t = torch.tensor(std).view(1, -1, 1, 1)
        self.raw, self.mean, self.std = images, tuple(mean), tuple(std)
        self.images = (images - mean_t) / std_t
        self.labels = labels
        self.targets = labels.tolist()
        self.classes = list(range(int(labels.max()) + 1))
        self.shift = shift
        if shift:  # pad with the normalised value of a black (0) pixel, the digits' background
            h, w = images.shape[-2:]
            padded = (-mean_t / std_t).expand(len(images), -1, h + 2 * shift, w + 2 * shift).clone()
            padded[:, :, shift:shift + h, shift:shift + w] = self.images
            self.padded = padded

    def __len__(self) -> int:
        return len(self.labels)

    def tensor_source(self):
        """For ``loader: tensor``: the [0, 1] float images (not quantised), shifts as crops of a black border."""
        from .tensor import TensorSource

        return TensorSource(self.raw, self.labels, self.mean, self.std, crop_padding=self.shift,
                            padding_mode="constant", fill=0.0)

    def __getitem__(self, index: int):
        image, label = self.__getitems__([index])[0]
        return image, label

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, dtype=torch.long)
        if self.shift:  # gather each image's window from its padded copy, at a random offset
            n, (c, h, w), wide = len(index), self.images.shape[1:], self.images.shape[-1] + 2 * self.shift
            dy, dx = torch.randint(0, 2 * self.shift + 1, (2, n, 1))
            window = (torch.arange(h)[:, None] * wide + torch.arange(w)).flatten()
            flat = (window + dy * wide + dx)[:, None, :].expand(-1, c, -1)
            images = self.padded[index].flatten(2).gather(2, flat).view(n, c, h, w)
        else:
            images = self.images[index]
        return list(zip(images.unbind(0), self.labels[index].tolist()))


def _stats(which: int):
    return lambda size=16, **_: digits_split(int(size))[which]


@DATASETS.register("digits", num_classes=10, mean=_stats(4), std=_stats(5),
                   input_shape=lambda size=16, **_: (3, size, size))
def digits(root: str, train: bool, augment: bool, download: bool, size: Annotated[int, Range(ge=1, le=256)] = 16):
    """The scikit-learn digits (``root`` and ``download`` are unused); translation by <= 1 px if ``augment``."""
    x_train, y_train, x_test, y_test, mean, std = digits_split(int(size))
    if train:
        return TensorImageDataset(x_train, y_train, mean, std, shift=1 if augment else 0)
    return TensorImageDataset(x_test, y_test, mean, std)
