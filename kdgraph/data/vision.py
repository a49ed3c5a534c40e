"""Image datasets read through torchvision: CIFAR-10/100, CINIC-10, ImageNet and FakeData."""
from __future__ import annotations

import os
import typing
from typing import Literal

import torch
from torchvision import datasets, transforms as T

from ..errors import UserError
from ..params import PositiveInt
from .base import DATASETS, imagefolder_layout, require_dirs

CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
CINIC_MEAN = (0.47889522, 0.47227842, 0.43047404)
CINIC_STD = (0.24205776, 0.23828046, 0.25874835)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FAKE_MEAN, FAKE_STD = 0.5, 0.29  # FakeData pixels are close to uniform over 0..255


#: ``crop`` options of the CIFAR-sized data sets: "padded" is a random 32x32 crop of the image padded by 4,
#: "resized" torchvision's RandomResizedCrop(32) (area 8-100 %, aspect 3/4-4/3; the original Distillation
#: project's CINIC-10 augmentation).
Crop = Literal["padded", "resized"]
PaddingMode = Literal["reflect", "constant"]
CROPS, PADDING_MODES = typing.get_args(Crop), typing.get_args(PaddingMode)


def cifar_transform(augment: bool, mean, std, crop: str = "padded", padding_mode: str = "reflect") -> T.Compose:
    """When ``augment``: a ``crop`` (:data:`CROPS`; "padded" pads with ``padding_mode``: "reflect", or
    "constant" zeros as RepDistiller's CIFAR-100) and a horizontal flip; then tensor + normalise."""
    if crop not in CROPS:
        raise UserError(f"data.options.crop must be one of {', '.join(CROPS)}, not {crop!r}")
    if padding_mode not in PADDING_MODES:
        raise UserError(f"data.options.padding_mode must be one of {', '.join(PADDING_MODES)}, not {padding_mode!r}")
    for key, value in (("mean", mean), ("std", std)):
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and
                all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise UserError(f"data.options.{key} must be 3 numbers (one per channel, 0..1 scale), not {value!r}")
    if any(v <= 0 for v in std):
        raise UserError(f"data.options.std must be positive, not {std!r}")
    head = T.RandomCrop(32, padding=4, padding_mode=padding_mode) if crop == "padded" else T.RandomResizedCrop(32)
    aug = [head, T.RandomHorizontalFlip()] if augment else []
    return T.Compose([*aug, T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])




def imagenet_transform(augment: bool, train: bool, image_size: int = 224) -> T.Compose:
    """RandomResizedCrop + flip for training; resize (256/224 of the crop) + centre crop otherwise."""
    if train and augment:
        head = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    elif train:
        head = [T.Resize(image_size), T.CenterCrop(image_size)]
    else:
        head = [T.Resize(round(image_size * 256 / 224)), T.CenterCrop(image_size)]
    return T.Compose([*head, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ---------------------------------------------------------------- CIFAR
def _cifar(cls, name: str, root: str, train: bool, augment: bool, download: bool, preprocess: dict):
    folder = cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    layout = f"  {root}/\n    {folder}/\n      " + "\n      ".join(files)
    hint = f"Set `download: true` in the data block to fetch {name} into {root!r}."
    transform = cifar_transform(train and augment, **preprocess)
    if not download:
        require_dirs(root, [folder], name, layout + "\n" + hint)
    try:
        return cls(root, train=train, transform=transform, download=download)
    except (RuntimeError, OSError) as e:  # missing/corrupted files, or a failed download
        action = "could not be downloaded" if download else "is missing or corrupted"
        raise UserError(f"dataset {name!r} {action} under {root!r}: {e}\nExpected layout:\n{layout}\n"
                        + ("" if download else hint)) from None


@DATASETS.register("cifar10", num_classes=10, input_shape=(3, 32, 32), mean=lambda mean=CIFAR_MEAN, **_: tuple(mean),
                   std=lambda std=CIFAR_STD, **_: tuple(std))
def cifar10(root: str, train: bool, augment: bool, download: bool, mean=CIFAR_MEAN, std=CIFAR_STD,
            crop: Crop = "padded", padding_mode: PaddingMode = "reflect"):
    """CIFAR-10 in torchvision's python-pickle layout (``root/cifar-10-batches-py``); options as cifar100."""
    return _cifar(datasets.CIFAR10, "cifar10", root, train, augment, download,
                  dict(mean=mean, std=std, crop=crop, padding_mode=padding_mode))


@DATASETS.register("cifar100", num_classes=100, input_shape=(3, 32, 32),
                   mean=lambda mean=CIFAR_MEAN, **_: tuple(mean), std=lambda std=CIFAR_STD, **_: tuple(std))
def cifar100(root: str, train: bool, augment: bool, download: bool, mean=CIFAR_MEAN, std=CIFAR_STD,
             crop: Crop = "padded", padding_mode: PaddingMode = "reflect"):
    """CIFAR-100 (fine labels) in torchvision's python-pickle layout (``root/cifar-100-python``).

    Options: ``mean``, ``std`` (default the original Distillation project's (125.3, 123.0, 113.9)/255 and
    (63.0, 62.1, 66.7)/255; RepDistiller and mdistiller normalise with (0.5071, 0.4867, 0.4408) and
    (0.2675, 0.2565, 0.2761)), ``crop`` (:data:`CROPS`) and ``padding_mode`` (:data:`PADDING_MODES`).
    """
    return _cifar(datasets.CIFAR100, "cifar100", root, train, augment, download,
                  dict(mean=mean, std=std, crop=crop, padding_mode=padding_mode))


# ---------------------------------------------------------------- ImageFolder datasets
def _image_folder(root: str, split: str, name: str, transform, layout: str) -> datasets.ImageFolder:
    try:
        return datasets.ImageFolder(os.path.join(root, split), transform=transform)
    except FileNotFoundError as e:  # no class folders, or no images in them
        raise UserError(f"dataset {name!r}: {e}\nExpected layout:\n{layout}") from None


@DATASETS.register("cinic10", num_classes=10, input_shape=(3, 32, 32), mean=lambda mean=CINIC_MEAN, **_: tuple(mean),
                   std=lambda std=CINIC_STD, **_: tuple(std))
def cinic10(root: str, train: bool, augment: bool, download: bool,
            train_split: Literal["train", "train+valid"] = "train",
            mean=CINIC_MEAN, std=CINIC_STD, crop: Crop = "padded", padding_mode: PaddingMode = "reflect"):
    """CINIC-10 as ImageFolders ``root/{train,valid,test}``; ``train_split`` is "train" or "train+valid".

    ``crop: resized`` is the original Distillation project's CINIC-10 augmentation (RandomResizedCrop(32));
    other options as cifar100.
    """
    if train_split not in ("train", "train+valid"):
        raise UserError(f"cinic10: options.train_split must be 'train' or 'train+valid', not {train_split!r}")
    transform = cifar_transform(train and augment, mean, std, crop, padding_mode)
    splits = train_split.split("+") if train else ["test"]
    layout = imagefolder_layout(root, ["train", "valid", "test"])
    require_dirs(root, splits, "cinic10", layout)
    parts = [_image_folder(root, s, "cinic10", transform, layout) for s in splits]
    if len(parts) == 1:
        return parts[0]
    if any(p.classes != parts[0].classes for p in parts):
        raise UserError(f"cinic10: the class folders of {' and '.join(splits)} under {root!r} differ")
    merged = torch.utils.data.ConcatDataset(parts)
    merged.classes = parts[0].classes
    return merged


@DATASETS.register("imagenet", num_classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                   input_shape=lambda image_size=224, **_: (3, image_size, image_size))
def imagenet(root: str, train: bool, augment: bool, download: bool, image_size: PositiveInt = 224):
    """ImageNet (or any subset) as ImageFolders ``root/train`` and ``root/val``."""
    split = "train" if train else "val"
    layout = imagefolder_layout(root, ["train", "val"])
    require_dirs(root, [split], "imagenet", layout)
    return _image_folder(root, split, "imagenet", imagenet_transform(augment, train, image_size), layout)


# ---------------------------------------------------------------- FakeData
@DATASETS.register("fake", mean=lambda image_size=(3, 32, 32), **_: (FAKE_MEAN,) * image_size[0],
                   std=lambda image_size=(3, 32, 32), **_: (FAKE_STD,) * image_size[0],
                   num_classes=lambda num_classes=10, **_: num_classes,
                   input_shape=lambda image_size=(3, 32, 32), **_: tuple(image_size))
def fake(root: str, train: bool, augment: bool, download: bool, train_size: PositiveInt = 256,
         test_size: PositiveInt = 128, image_size: tuple[PositiveInt, PositiveInt, PositiveInt] = (3, 32, 32),
         num_classes: PositiveInt = 10):
    """Deterministic random images (torchvision ``FakeData``); train and test sets never share an image."""
    channels = image_size[0]
    return datasets.FakeData(size=train_size if train else test_size, image_size=tuple(image_size),
                             num_classes=num_classes, random_offset=0 if train else train_size,
                             transform=T.Compose([T.ToTensor(), T.Normalize((FAKE_MEAN,) * channels,
                                                                             (FAKE_STD,) * channels)]))
