"""``data.loader: tensor``: the GPU-resident batched loader against the per-sample ``workers`` path (CPU, no network)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset

from kdgraph import spec as specs
from kdgraph.data import EpochSampler, build_loaders
from kdgraph.data.tensor import TensorLoader, TensorSource, augmentation_from_transform
from kdgraph.data.vision import CIFAR_MEAN, CIFAR_STD, cifar_transform
from kdgraph.errors import SpecError, UserError
from tests.test_data import data_cfg, write_cifar, write_image_folder


def epoch(loader, epoch_=1, start=0):
    loader.sampler.set_epoch(epoch_, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def assert_same_batches(a, b, atol=1e-6):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xa, xb, atol=atol, rtol=0)


@pytest.fixture
def cifar(tmp_path, monkeypatch):
    """A tiny CIFAR-10 (5 x 8 training images, 8 test images) in torchvision's layout."""
    write_cifar(tmp_path, torchvision.datasets.CIFAR10, monkeypatch, 10, per_file=8)
    return str(tmp_path)


def cifar_cfg(root, **kw):
    return data_cfg("cifar10", root=root, batch_size=6, **kw)


def fake_cfg(**kw):
    return data_cfg("fake", batch_size=6, options={"train_size": 20, "test_size": 9}, **kw)


# ------------------------------------------------------------------------------ same batches as workers
@pytest.mark.parametrize("which", ["cifar10", "digits", "fake", "cinic10"])
def test_without_augmentation_the_tensor_loader_gives_the_workers_batches(which, cifar, tmp_path):
    if which == "cifar10":
        cfg = cifar_cfg(cifar, augment=False)
    elif which == "digits":
        cfg = data_cfg("digits", batch_size=100, augment=False)
    elif which == "cinic10":
        write_image_folder(tmp_path / "cinic", ["train", "valid", "test"], size=32)
        cfg = data_cfg("cinic10", root=str(tmp_path / "cinic"), augment=False)
    else:
        cfg = fake_cfg()
    for seed in (0, 3):
        w_train, w_test, w_info = build_loaders(cfg, seed=seed)
        t_train, t_test, t_info = build_loaders({**cfg, "loader": "tensor"}, seed=seed)
        assert t_info == w_info and isinstance(t_train, TensorLoader) and isinstance(t_test, TensorLoader)
        assert len(t_train) == len(w_train) and len(t_test) == len(w_test)
        for ep in (0, 2):
            assert_same_batches(epoch(t_train, ep), epoch(w_train, ep))
        assert_same_batches(epoch(t_test), epoch(w_test))


def test_cinic10_train_and_valid_are_decoded_together(tmp_path):
    write_image_folder(tmp_path, ["train", "valid", "test"], size=32)
    cfg = data_cfg("cinic10", root=str(tmp_path), loader="tensor", options={"train_split": "train+valid"})
    train, test, _ = build_loaders(cfg)
    assert train.images.shape == (12, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.source.crop_padding == 4 and train.source.flip == 0.5 and not test.source.augments
    assert sorted(train.targets.tolist()) == [0] * 6 + [1] * 6


def test_the_engine_interface(cifar):
    train, test, _ = build_loaders({**cifar_cfg(cifar), "loader": "tensor"}, seed=1, device="cpu")
    assert isinstance(train.sampler, EpochSampler) and isinstance(train.generator, torch.Generator)
    assert train.batch_size == 6 and test.batch_size == 12
    train.sampler.set_epoch(0)
    assert len(train) == 7  # 40 images in batches of 6, the last one short
    train.generator.manual_seed(5)
    batches = list(train)
    assert len(batches) == 7 and [len(y) for _, y in batches] == [6] * 6 + [4]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (6, 3, 32, 32) and y.dtype == torch.int64
    assert x.device.type == "cpu" and y.device.type == "cpu"
    train.sampler.set_epoch(0, 4 * 6)
    assert len(train) == 3 and len(list(train)) == 3
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(train.source.targets.tolist())


# ------------------------------------------------------------------------------------------ augmentation
def padded_crops(image, pad, mode="reflect", fill=0.0):
    """Every (dy, dx, flip) crop of ``image`` padded by ``pad``: (2p+1)^2 * 2 candidates."""
    c, h, w = image.shape
    if mode == "constant":
        padded = F.pad(image, (pad,) * 4, value=fill)
    else:
        padded = F.pad(image[None], (pad,) * 4, mode={"reflect": "reflect", "edge": "replicate"}[mode])[0]
    out = {}
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out[(dy, dx, False)], out[(dy, dx, True)] = crop, crop.flip(-1)
    return out


def test_augmented_batches_are_crops_and_flips_of_the_reflect_padded_images(cifar):
    train, _, _ = build_loaders({**cifar_cfg(cifar), "loader": "tensor"}, seed=0)
    raw = train.source.images.float() / 255
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    seen = set()
    for ep in range(3):
        train.sampler.set_epoch(ep)
        order = list(train.sampler)
        got = torch.cat([x for x, _ in train])
        for i, x in zip(order, got):
            crops = padded_crops(raw[i], 4)
            match = [k for k, c in crops.items() if torch.allclose((c - mean) / std, x, atol=1e-5, rtol=0)]
            assert match, f"sample {i} is not a padded crop of its image"
            seen.add(match[0])
    assert len({k[:2] for k in seen}) > 20 and {k[2] for k in seen} == {False, True}


@pytest.mark.parametrize("mode, fill", [("reflect", 0), ("constant", 0), ("constant", 77), ("edge", 0),
                                        ("symmetric", 0)])
def test_augment_matches_torchvision_pad_crop_flip(mode, fill):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, 9, 7), generator=g, dtype=torch.uint8)
    source = TensorSource(images, torch.arange(10), mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=3,
                          padding_mode=mode, fill=fill, flip=0.5)
    loader = TensorLoader(source, 4, EpochSampler(10, seed=2))
    loader.sampler.set_epoch(1)
    order = list(loader.sampler)
    dy, dx, flip = loader.draws(10)
    out = torch.cat([x for x, _ in loader])
    for k, i in enumerate(order):
        expected = TF.crop(TF.pad(images[i], [3], fill=fill, padding_mode=mode), int(dy[k]), int(dx[k]), 9, 7)
        if flip[k]:
            expected = TF.hflip(expected)
        expected = TF.normalize(expected.float() / 255, [0.5] * 3, [0.25] * 3)
        assert torch.equal(out[k], expected), (mode, k)


def test_digits_augmentation_is_the_workers_translation_without_flips():
    train, _, _ = build_loaders({**data_cfg("digits", batch_size=256), "loader": "tensor"}, seed=0)
    dataset = train.dataset  # the TensorImageDataset: normalised images and their black-padded copies
    size = dataset.images.shape[-1]
    train.sampler.set_epoch(0)
    order = list(train.sampler)
    got = torch.cat([x for x, _ in train])
    shifts = set()
    for i, x in zip(order[:300], got[:300]):
        match = [(dy, dx) for dy in range(3) for dx in range(3)
                 if torch.allclose(dataset.padded[i, :, dy:dy + size, dx:dx + size], x, atol=1e-6, rtol=0)]
        assert match
        shifts.add(match[0])
    assert len(shifts) == 9


# ----------------------------------------------------------------------------- determinism and resume
def test_batches_are_a_function_of_seed_epoch_and_position(cifar):
    cfg = {**cifar_cfg(cifar), "loader": "tensor"}
    a, _, _ = build_loaders(cfg, seed=4)
    b, _, _ = build_loaders(cfg, seed=4)
    c, _, _ = build_loaders(cfg, seed=5)
    torch.manual_seed(0)
    expected_rng = torch.rand(3)
    torch.manual_seed(0)
    first = epoch(a, 2)
    torch.manual_seed(123)  # the global generator plays no part ...
    assert_same_batches(epoch(b, 2), first, atol=0)
    torch.manual_seed(0)
    epoch(a, 2)
    assert torch.equal(torch.rand(3), expected_rng)  # ... and is not consumed
    assert not torch.equal(torch.cat([x for x, _ in epoch(a, 3)]), torch.cat([x for x, _ in first]))
    assert not torch.equal(torch.cat([x for x, _ in epoch(c, 2)]), torch.cat([x for x, _ in first]))


def test_a_resumed_epoch_sees_the_batches_of_an_uninterrupted_one(cifar):
    cfg = {**cifar_cfg(cifar), "loader": "tensor"}
    full = epoch(build_loaders(cfg, seed=7)[0], 3)
    for done in (1, 4, 6):
        resumed = build_loaders(cfg, seed=7)[0]  # a fresh process: a new loader
        resumed.sampler.set_epoch(3)
        steps = len(resumed)
        resumed.sampler.set_epoch(3, done * resumed.batch_size)  # what the engine does on --resume
        resumed.generator.manual_seed(7 * 100003 + 3)
        assert steps == len(full) and len(resumed) == len(full) - done
        assert_same_batches(list(resumed), full[done:], atol=0)


def test_ranks_take_disjoint_shards_with_their_own_draws():
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    source = TensorSource(images, torch.arange(10), (0.0,) * 3, (1.0,) * 3, crop_padding=2, flip=0.5)
    ranks = [TensorLoader(source, 4, EpochSampler(10, seed=1, rank=r, world=2)) for r in (0, 1)]
    ys = [torch.cat([y for _, y in epoch(loader, 0)]) for loader in ranks]
    assert sorted(torch.cat(ys).tolist()) == list(range(10)) and len(ys[0]) == len(ys[1]) == 5
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0].draws(5), ranks[1].draws(5)))


# ----------------------------------------------------------------------------------------- data sets
class OwnData(Dataset):
    """A user data set supporting ``loader: tensor`` through the ``tensor_source()`` hook."""

    def __init__(self, n, train):
        g = torch.Generator().manual_seed(n)
        self.images = torch.randint(0, 256, (n, 3, 12, 12), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.train = train

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return (self.images[i].float() / 255 - 0.5) / 0.25, int(self.labels[i])

    def tensor_source(self):
        return TensorSource(self.images, self.labels, mean=(0.5,) * 3, std=(0.25,) * 3,
                            crop_padding=2 if self.train else 0, flip=0.5 if self.train else 0.0)


def own_data(root, augment, download):
    return OwnData(14, True), OwnData(6, False), {"num_classes": 4, "input_shape": (3, 12, 12)}


def test_a_user_data_set_with_the_hook():
    cfg = data_cfg("tests.test_tensor_loader:own_data", batch_size=5, loader="tensor")
    train, test, info = build_loaders(cfg)
    x, y = next(iter(train))
    assert x.shape == (5, 3, 12, 12) and info.num_classes == 4
    assert_same_batches(epoch(test), epoch(build_loaders({**cfg, "loader": "workers"})[1]))


def test_source_from_a_cifar_transform():
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    source = TensorSource.from_transform(images, [0, 1], cifar_transform(True, CIFAR_MEAN, CIFAR_STD))
    assert (source.crop_padding, source.padding_mode, source.flip, source.mean) == (4, "reflect", 0.5, CIFAR_MEAN)
    assert not TensorSource.from_transform(images, [0, 1], cifar_transform(False, CIFAR_MEAN, CIFAR_STD)).augments
    with pytest.raises(UserError, match="ColorJitter.*loader: workers"):
        augmentation_from_transform(torchvision.transforms.Compose([
            torchvision.transforms.ColorJitter(0.1), torchvision.transforms.ToTensor()]), (3, 32, 32))


def test_unsupported_data_sets_and_loaders_are_user_errors(tmp_path):
    write_image_folder(tmp_path, ["train", "val"], size=40)
    with pytest.raises(UserError, match="RandomResizedCrop.*loader: workers"):
        build_loaders(data_cfg("imagenet", root=str(tmp_path), loader="tensor"))
    with pytest.raises(UserError, match="TensorDataset.*loader: workers.*tensor_source"):
        build_loaders(data_cfg("tests.test_data:tiny_dataset", loader="tensor"))
    with pytest.raises(UserError, match="did you mean 'tensor'"):
        build_loaders(data_cfg("digits", loader="tensr"))


def test_the_schema_takes_the_loader_key(tmp_path):
    text = "name: t\ndata: {dataset: digits, loader: %s}\nstudent: {model: wrn-10-1}\n"
    assert specs.load(tmp_path / "t.yaml", text=text % "tensor").data["data"]["loader"] == "tensor"
    assert specs.load(tmp_path / "t.yaml", text=text.replace(", loader: %s", "")).data["data"]["loader"] == "workers"
    with pytest.raises(SpecError, match="did you mean 'tensor'"):
        specs.load(tmp_path / "t.yaml", text=text % "tensors")
