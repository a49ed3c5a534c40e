"""Datasets and loaders of kdgraph.data, on tiny data sets written to tmp dirs (no network)."""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import TensorDataset

from kdgraph.data import DATASETS, DatasetInfo, build_datasets, build_loaders
from kdgraph.data.vision import CIFAR_MEAN, CIFAR_STD
from kdgraph.errors import UserError


def data_cfg(dataset, **kw):
    """A data block with the defaults the schema would fill in, but no worker processes."""
    return {"dataset": dataset, "root": "data", "download": False, "batch_size": 4, "workers": 0,
            "augment": True, "options": {}, **kw}


def normalise(images_hwc_uint8, mean, std):
    x = torch.as_tensor(images_hwc_uint8).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ---------------------------------------------------------------- CIFAR in torchvision's pickle layout
def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, cls, monkeypatch, num_classes: int, per_file: int = 2, seed: int = 0):
    """Write a tiny CIFAR-10/100 under ``root`` and make ``cls`` expect the MD5s of these files.

    torchvision verifies the real files' MD5s; the test points its checksum table (class attributes)
    at the files it wrote, so the production path, integrity check included, runs unchanged.
    Returns ``{split: (images NHWC uint8, labels)}``.
    """
    rng = np.random.default_rng(seed)
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if num_classes == 10 else "fine_labels"
    written = {}

    def write(name):
        images = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, num_classes, per_file).tolist()
        entry = {"data": images.reshape(per_file, -1), label_key: labels}
        if num_classes == 100:
            entry["coarse_labels"] = [l // 5 for l in labels]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        return images.transpose(0, 2, 3, 1), labels

    for split, files in (("train", cls.train_list), ("test", cls.test_list)):
        parts = [write(name) for name, _ in files]
        written[split] = (np.concatenate([p[0] for p in parts]), sum((p[1] for p in parts), []))
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(num_classes)]}, f)

    for attr in ("train_list", "test_list"):
        monkeypatch.setattr(cls, attr, [[name, _md5(folder / name)] for name, _ in getattr(cls, attr)])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / cls.meta["filename"])})

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to download")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", no_network)
    return written


@pytest.mark.parametrize("name, cls, num_classes", [
    ("cifar10", torchvision.datasets.CIFAR10, 10),
    ("cifar100", torchvision.datasets.CIFAR100, 100),
])
def test_cifar_loaders(tmp_path, monkeypatch, name, cls, num_classes):
    written = write_cifar(tmp_path, cls, monkeypatch, num_classes)
    n_train = 2 * len(cls.train_list)
    # download: true finds the verified files and does not touch the network
    train_loader, test_loader, info = build_loaders(data_cfg(name, root=str(tmp_path), download=True))
    assert info == DatasetInfo(num_classes, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, name)
    assert len(train_loader.dataset) == n_train and len(test_loader.dataset) == 2

    x, y = next(iter(test_loader))  # not shuffled, not augmented: exactly the normalised files
    assert x.shape == (2, 3, 32, 32) and y.tolist() == written["test"][1]
    torch.testing.assert_close(x, normalise(written["test"][0], CIFAR_MEAN, CIFAR_STD))

    xs, ys = zip(*train_loader)
    assert sorted(torch.cat(ys).tolist()) == sorted(written["train"][1])

    train_set = train_loader.dataset
    plain = normalise(written["train"][0][:1], CIFAR_MEAN, CIFAR_STD)[0]
    torch.manual_seed(0)
    draws = [train_set[0][0] for _ in range(4)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(d, plain) for d in draws), "augmentation should change training images"
    plain_set, _, _ = build_datasets(data_cfg(name, root=str(tmp_path), augment=False))
    torch.testing.assert_close(plain_set[0][0], plain)


def test_cifar_missing_root_explains_layout_and_download(tmp_path):
    with pytest.raises(UserError, match=r"(?s)cifar-10-batches-py.*data_batch_1.*download: true"):
        build_datasets(data_cfg("cifar10", root=str(tmp_path / "nowhere")))


def test_cifar_corrupted_files_are_a_user_error(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"junk")
    with pytest.raises(UserError, match="missing or corrupted"):
        build_datasets(data_cfg("cifar100", root=str(tmp_path)))


# ---------------------------------------------------------------- ImageFolder datasets
def write_image_folder(root: Path, splits, size: int, per_class: int = 3):
    rng = np.random.default_rng(0)
    for split in splits:
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_cinic10(tmp_path):
    write_image_folder(tmp_path, ["train", "valid", "test"], size=32)
    train_loader, test_loader, info = build_loaders(data_cfg("cinic10", root=str(tmp_path)))
    assert info.num_classes == 2 and info.input_shape == (3, 32, 32)
    assert len(train_loader.dataset) == 6 and len(test_loader.dataset) == 6
    x, y = next(iter(train_loader))
    assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 1}

    merged, _, info = build_datasets(data_cfg("cinic10", root=str(tmp_path),
                                              options={"train_split": "train+valid"}))
    assert len(merged) == 12 and info.num_classes == 2
    with pytest.raises(UserError, match="train_split"):
        build_datasets(data_cfg("cinic10", root=str(tmp_path), options={"train_split": "all"}))


def test_imagenet(tmp_path):
    write_image_folder(tmp_path, ["train", "val"], size=40)
    train_loader, test_loader, info = build_loaders(data_cfg("imagenet", root=str(tmp_path)))
    assert info.num_classes == 2 and info.input_shape == (3, 224, 224)
    assert next(iter(train_loader))[0].shape == (4, 3, 224, 224)
    x, y = next(iter(test_loader))
    assert x.shape == (6, 3, 224, 224) and y.tolist() == [0, 0, 0, 1, 1, 1]

    train_set, _, info = build_datasets(data_cfg("imagenet", root=str(tmp_path), options={"image_size": 64}))
    assert info.input_shape == (3, 64, 64) and train_set[0][0].shape == (3, 64, 64)


@pytest.mark.parametrize("name, expected", [("cinic10", "valid/"), ("imagenet", "val/")])
def test_image_folder_missing_root_explains_layout(tmp_path, name, expected):
    with pytest.raises(UserError, match=f"(?s)Expected layout.*{expected}.*<class_a>"):
        build_datasets(data_cfg(name, root=str(tmp_path / "nowhere")))


def test_image_folder_without_images_is_a_user_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="imagenet"):
        build_datasets(data_cfg("imagenet", root=str(tmp_path)))


# ---------------------------------------------------------------- digits
def test_digits_split_sizes_and_normalisation():
    train_set, test_set, info = build_datasets(data_cfg("digits", augment=False))
    assert (len(train_set), len(test_set)) == (1437, 360)
    assert info.num_classes == 10 and info.input_shape == (3, 16, 16)
    assert train_set[0][0].shape == (3, 16, 16)
    for subset in (train_set, test_set):  # stratified: every class, in proportion
        counts = torch.bincount(subset.labels, minlength=10)
        assert counts.min() >= 0.9 * counts.max()
    x = train_set.images
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-5, rtol=0)
    assert len(set(info.mean)) == 1 and 0 < info.mean[0] < 1  # grey replicated to 3 channels

    small, _, small_info = build_datasets(data_cfg("digits", options={"size": 8}))
    assert small[0][0].shape == (3, 8, 8) and small_info.input_shape == (3, 8, 8)


def test_digits_split_is_deterministic_and_independent_of_the_seed():
    torch.manual_seed(1)
    _, test_a, _ = build_datasets(data_cfg("digits"))
    torch.manual_seed(2)
    _, test_b, _ = build_datasets(data_cfg("digits"))
    assert torch.equal(test_a.images, test_b.images) and torch.equal(test_a.labels, test_b.labels)


def test_digits_augmentation_translates_by_at_most_one_pixel_and_never_flips():
    train_set, test_set, _ = build_datasets(data_cfg("digits"))
    torch.manual_seed(0)
    draws = [train_set[5][0] for _ in range(40)]
    size = train_set.images.shape[-1]
    shifts = {(dy, dx) for d in draws for dy in range(3) for dx in range(3)
              if torch.equal(d, train_set.padded[5, :, dy:dy + size, dx:dx + size])}
    assert len(shifts) > 1 and all(any(torch.equal(d, train_set.padded[5, :, dy:dy + size, dx:dx + size])
                                       for dy, dx in shifts) for d in draws)
    assert torch.equal(test_set[5][0], test_set[5][0])


def _epoch(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_digits_loader_is_repeatable_for_a_seed():
    cfg = data_cfg("digits", batch_size=128)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(123)  # the trainer seeds torch; augmentation in the main process draws from it
        train_loader, test_loader, _ = build_loaders(cfg, seed=seed)
        runs.append(_epoch(train_loader))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])
    assert len(runs[0][1]) == 1437  # drop_last=False
    assert test_loader.batch_size == 256 and len(test_loader) == 2


def test_digits_worker_processes_are_seeded_from_the_loader_seed():
    cfg = data_cfg("digits", batch_size=256, workers=1)
    first = _epoch(build_loaders(cfg, seed=3)[0])
    torch.manual_seed(999)  # the global seed does not matter with workers
    second = _epoch(build_loaders(cfg, seed=3)[0])
    assert torch.equal(first[0], second[0])


def test_loader_defaults():
    cfg = {"dataset": "fake", "batch_size": 8, "workers": 0, "options": {"train_size": 20, "test_size": 10}}
    train_loader, test_loader, _ = build_loaders(cfg)
    assert test_loader.batch_size == 16 and not train_loader.drop_last
    assert train_loader.pin_memory == torch.cuda.is_available()
    assert not train_loader.persistent_workers


def test_distributed_samplers(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        train_loader, test_loader, _ = build_loaders(data_cfg("digits"), seed=0, distributed=True)
    finally:
        dist.destroy_process_group()
    assert train_loader.sampler.shuffle and not test_loader.sampler.shuffle
    train_loader.sampler.set_epoch(1)
    assert len(list(train_loader.sampler)) == 1437


# ---------------------------------------------------------------- fake, errors, import paths
def test_fake():
    cfg = data_cfg("fake", options={"train_size": 12, "test_size": 6, "image_size": [3, 20, 24],
                                    "num_classes": 5})
    train_loader, test_loader, info = build_loaders(cfg)
    assert info.num_classes == 5 and info.input_shape == (3, 20, 24)
    x, y = next(iter(test_loader))
    assert x.shape == (6, 3, 20, 24) and y.max() < 5
    again, _, _ = build_datasets(cfg)
    assert torch.equal(again[0][0], train_loader.dataset[0][0])  # deterministic
    assert not torch.equal(train_loader.dataset[0][0], test_loader.dataset[0][0])
    assert build_datasets(data_cfg("fake"))[0][0][0].shape == (3, 32, 32)


def test_unknown_dataset_suggests_a_name():
    with pytest.raises(UserError, match="did you mean 'cifar10'"):
        build_datasets(data_cfg("cifar1O"))


def test_unknown_option_suggests_a_name():
    with pytest.raises(UserError, match="did you mean 'size'"):
        build_datasets(data_cfg("digits", options={"sise": 8}))


def tiny_dataset(root, augment, download, n=10, num_classes=3):
    """An import-path dataset: ``(train_set, test_set, info)``."""
    g = torch.Generator().manual_seed(0)
    make = lambda k: TensorDataset(torch.randn(k, 1, 4, 4, generator=g),
                                   torch.randint(0, num_classes, (k,), generator=g))
    return make(n), make(n // 2), {"num_classes": num_classes, "input_shape": (1, 4, 4)}


def bad_dataset(root, augment, download):
    return TensorDataset(torch.zeros(2, 1))


def test_import_path_dataset():
    train_loader, test_loader, info = build_loaders(data_cfg("tests.test_data:tiny_dataset",
                                                             options={"n": 8}))
    assert info == DatasetInfo(3, (1, 4, 4), (0.0,), (1.0,), "tests.test_data:tiny_dataset")
    assert len(train_loader.dataset) == 8 and next(iter(test_loader))[0].shape == (4, 1, 4, 4)
    with pytest.raises(UserError, match="must return"):
        build_datasets(data_cfg("tests.test_data:bad_dataset"))
    with pytest.raises(UserError, match="cannot import"):
        build_datasets(data_cfg("tests.nowhere:tiny_dataset"))


def test_registry_lists_builtin_datasets():
    assert {"cifar10", "cifar100", "cinic10", "imagenet", "digits", "fake"} <= set(DATASETS.names())
    assert DATASETS.meta("cifar100")["num_classes"] == 100


def _batches(loader, epoch, start=0):
    loader.sampler.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentation_is_fixed_by_seed_epoch_and_position(tmp_path, monkeypatch, workers):
    """Per-sample crops and flips are the same with or without workers, and from a mid-epoch start."""
    write_cifar(tmp_path, torchvision.datasets.CIFAR10, monkeypatch, 10, per_file=4)
    cfg = data_cfg("cifar10", root=str(tmp_path), download=False, batch_size=4)
    reference = _batches(build_loaders(cfg, seed=5)[0], epoch=1)
    torch.manual_seed(1234)  # the process's own generator state plays no part
    loader = build_loaders({**cfg, "workers": workers, "persistent_workers": False}, seed=5)[0]
    again = _batches(loader, epoch=1)
    tail = _batches(loader, epoch=1, start=2 * 4)  # resumed after two batches
    other_epoch = _batches(loader, epoch=2)
    for (xa, ya), (xb, yb) in zip(reference, again):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    for (xa, ya), (xb, yb) in zip(reference[2:], tail):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert len(tail) == len(reference) - 2
    same_sample = [(x, y) for x, y in other_epoch]
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(reference, same_sample))


def test_two_ranks_draw_what_one_process_draws(tmp_path, monkeypatch):
    """Sample seeds depend on the global position, so 2 ranks' shards reproduce 1 process's augmentation."""
    from kdgraph.data import EpochSampler, SeededDataset

    write_cifar(tmp_path, torchvision.datasets.CIFAR10, monkeypatch, 10, per_file=4)
    train_set, _, _ = build_datasets(data_cfg("cifar10", root=str(tmp_path), download=False))
    seeded = SeededDataset(train_set)

    def draw(rank, world):
        sampler = EpochSampler(len(train_set), seed=3, rank=rank, world=world, seeds=True)
        sampler.set_epoch(4)
        return {index: seeded[(index, seed)][0] for index, seed in sampler}

    one, even, odd = draw(0, 1), draw(0, 2), draw(1, 2)
    assert set(even) | set(odd) == set(one)
    for index, image in {**even, **odd}.items():
        assert torch.equal(image, one[index])


# ---------------------------------------------------------------- sample indices
@pytest.mark.parametrize("loader", ["workers", "tensor"])
@pytest.mark.parametrize("workers", [0, 2])
def test_training_batches_carry_each_samples_index(loader, workers):
    """``indices=True``: (x, y, index) where index is the sample's row of the training set, in both loaders,
    with worker processes, on two ranks' shards (whose union is one process's batch), and mid-epoch."""
    from kdgraph.data import EpochSampler, train_targets

    if loader == "tensor" and workers:
        pytest.skip("the tensor loader has no worker processes")
    cfg = data_cfg("digits", batch_size=64, augment=False, workers=workers, persistent_workers=False,
                   loader=loader)
    train, test, _ = build_loaders(cfg, seed=2, indices=True)
    targets = train_targets(train)
    dataset = train.dataset
    assert targets is not None and len(targets) == len(dataset) == 1437
    train.sampler.set_epoch(3)
    batches = list(train)
    seen = torch.cat([b[2] for b in batches])
    assert seen.dtype == torch.int64 and sorted(seen.tolist()) == list(range(1437))
    for x, y, index in batches[:3]:
        assert torch.equal(y, targets[index])
        raw = dataset[int(index[0])] if loader == "workers" else None
        if raw is not None:  # the plain data set's own sample at that index
            assert torch.equal(x[0], raw[0]) and int(y[0]) == int(raw[1])
    assert all(len(b) == 2 for b in test)  # the test loader is unchanged
    train.sampler.set_epoch(3, 64)
    assert torch.equal(next(iter(train))[2], batches[1][2])  # a resumed epoch continues the same indices

    shards = []
    for rank in (0, 1):  # two ranks, each half the batch: their first batches make one process's first
        sampler = EpochSampler(1437, seed=2, rank=rank, world=2, seeds=loader == "workers")
        sampler.set_epoch(3)
        shards.append([i if isinstance(i, int) else i[0] for i in sampler][:32])
    assert sorted(shards[0] + shards[1]) == sorted(batches[0][2].tolist())


# ---------------------------------------------------------------- other projects' CIFAR preprocessing
REPDISTILLER_MEAN, REPDISTILLER_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def test_cifar100_with_repdistillers_normalisation_and_zero_padding(tmp_path, monkeypatch):
    written = write_cifar(tmp_path, torchvision.datasets.CIFAR100, monkeypatch, 100)
    options = {"mean": list(REPDISTILLER_MEAN), "std": list(REPDISTILLER_STD), "padding_mode": "constant"}
    train_set, test_set, info = build_datasets(data_cfg("cifar100", root=str(tmp_path), options=options))
    assert (info.mean, info.std) == (REPDISTILLER_MEAN, REPDISTILLER_STD)
    torch.testing.assert_close(test_set[0][0], normalise(written["test"][0][:1], REPDISTILLER_MEAN,
                                                         REPDISTILLER_STD)[0])
    crop = train_set.transform.transforms[0]
    assert isinstance(crop, torchvision.transforms.RandomCrop) and crop.padding_mode == "constant"
    # the tensor loader reads the same augmentation off the transform: zero padding
    loader, _, _ = build_loaders(data_cfg("cifar100", root=str(tmp_path), options=options, loader="tensor"))
    assert loader.source.padding_mode == "constant" and loader.source.fill == 0


def test_cinic10_random_resized_crop_of_the_original_project(tmp_path):
    write_image_folder(tmp_path, ["train", "test"], size=32)
    train_set, _, _ = build_datasets(data_cfg("cinic10", root=str(tmp_path), options={"crop": "resized"}))
    crop = train_set.transform.transforms[0]
    assert isinstance(crop, torchvision.transforms.RandomResizedCrop) and crop.size == (32, 32)
    assert crop.scale == (0.08, 1.0)
    assert train_set[0][0].shape == (3, 32, 32)
    with pytest.raises(UserError, match="RandomResizedCrop"):  # not a batched crop of a fixed-size tensor
        build_loaders(data_cfg("cinic10", root=str(tmp_path), options={"crop": "resized"}, loader="tensor"))


@pytest.mark.parametrize("options, message", [
    ({"crop": "random"}, "crop: expected one of 'padded', 'resized', got 'random'"),
    ({"padding_mode": "zeros"}, "padding_mode: expected one of 'reflect', 'constant', got 'zeros'"),
    ({"mean": [0.5, 0.5]}, "mean must be 3 numbers"),
    ({"std": [0.2, 0.0, 0.2]}, "std must be positive"),
])
def test_cifar_preprocessing_options_are_checked(tmp_path, options, message):
    with pytest.raises(UserError, match=message):  # before the (missing) data is looked for
        build_datasets(data_cfg("cifar10", root=str(tmp_path / "nowhere"), options=options))
