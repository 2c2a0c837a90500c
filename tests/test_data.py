"""Dataset sources, sharding and batch transforms."""

import numpy as np
import pytest
import torch

import fmdist.train
from fmdist.config import load_config
from fmdist.data import (
    FASHION_MNIST_CLASSES,
    DeviceBatches,
    ResumableDistributedSampler,
    ShardSampler,
    eval_loader,
    load_splits,
    synthetic_images,
    train_loader,
)
from fmdist.errors import FmdistError
from fmdist.transforms import BatchTransform

from helpers import CONFIGS, write_fashion_mnist_idx, write_kaggle_csv

CPU = torch.device("cpu")


def data_cfg(*overrides):
    return load_config(None, list(overrides)).data


def test_synthetic_is_deterministic_any_size_and_balanced():
    a_images, a_labels = synthetic_images(1234, 10, task_seed=3, split="train")
    b_images, b_labels = synthetic_images(1234, 10, task_seed=3, split="train")
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert a_images.dtype == torch.uint8 and a_images.shape == (1234, 28, 28)
    assert torch.bincount(a_labels).tolist() == [124] * 4 + [123] * 6
    other_task, _ = synthetic_images(1234, 10, task_seed=4, split="train")
    test_images, _ = synthetic_images(1234, 10, task_seed=3, split="test")
    assert not torch.equal(a_images, other_task) and not torch.equal(a_images, test_images)


def test_synthetic_defaults_to_fashion_mnist_sizes():
    train, test = load_splits(data_cfg("data.source=synthetic", "data.test_size=7"), num_classes=10)
    assert (len(train), len(test)) == (60000, 7)


@pytest.fixture
def idx_root(tmp_path, real_sample):
    """FashionMNIST's four IDX files, as torchvision keeps them, made of real images."""
    images, labels = real_sample
    return write_fashion_mnist_idx(tmp_path, images, labels, train_count=600)


def test_torchvision_source_reads_idx_files_without_downloading(idx_root, real_sample):
    images, labels = real_sample
    train, test = load_splits(data_cfg("data.source=torchvision", f"data.root={idx_root}"), num_classes=10)
    assert torch.equal(train.images, torch.from_numpy(images[:600]))
    assert torch.equal(test.labels, torch.from_numpy(labels[600:]))
    assert train.classes == FASHION_MNIST_CLASSES


def test_torchvision_source_missing_files_names_the_folder(tmp_path):
    with pytest.raises(FmdistError, match=f"not found in {tmp_path}/FashionMNIST/raw \\(data.download is false\\)"):
        load_splits(data_cfg("data.source=torchvision", f"data.root={tmp_path}", "data.download=false"), 10)


def test_sizes_limit_the_split_and_too_large_a_size_is_refused(idx_root):
    train, test = load_splits(data_cfg(f"data.root={idx_root}", "data.train_size=100", "data.test_size=33"), 10)
    assert (len(train), len(test)) == (100, 33)
    with pytest.raises(FmdistError, match="data.train_size=601 but .* holds only 600 images"):
        load_splits(data_cfg(f"data.root={idx_root}", "data.train_size=601"), 10)


def test_labels_beyond_num_classes_are_refused(idx_root):
    with pytest.raises(FmdistError, match="FashionMNIST: labels run up to 9, but model.num_classes is 5"):
        load_splits(data_cfg(f"data.root={idx_root}"), 5)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_sampler_covers_every_test_image_exactly_once(world):
    shards = [list(ShardSampler(101, rank, world)) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(101))


def test_training_order_is_deterministic_given_seed_and_epoch(monkeypatch):
    cfg = data_cfg("data.source=synthetic", "data.train_size=300", "data.test_size=10")
    split, _ = load_splits(cfg, 10)

    def epoch_labels(seed, epoch, rank=0, world=1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        loader = train_loader(split, batch_size=32, seed=seed, data_cfg=cfg, device=CPU)
        loader.sampler.set_epoch(epoch)
        return torch.cat([labels for _, labels in loader])

    assert torch.equal(epoch_labels(0, 1), epoch_labels(0, 1))
    assert not torch.equal(epoch_labels(0, 1), epoch_labels(0, 2))
    assert not torch.equal(epoch_labels(0, 1), epoch_labels(1, 1))
    halves = [epoch_labels(0, 1, rank, 2) for rank in range(2)]
    assert len(halves[0]) == len(halves[1]) == 150


def test_the_trainer_draws_a_new_training_order_each_epoch_and_the_same_orders_on_a_rerun(
    tmp_path, monkeypatch, fresh_accelerate
):
    """The order of an epoch comes from the sampler's epoch, which only the trainer's loop sets."""
    orders = []
    unrecorded_iter = ResumableDistributedSampler.__iter__

    def recording_iter(self):
        order = list(unrecorded_iter(self))
        orders.append(order)
        return iter(order)

    monkeypatch.setattr(ResumableDistributedSampler, "__iter__", recording_iter)
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def epoch_orders(run_name):
        orders.clear()
        overrides = ["epochs=3", "data.train_size=64", "data.test_size=16", "batch_size=32", "wandb.mode=disabled"]
        args = ["--config", str(CONFIGS / "smoke.yaml"), *overrides, f"output_dir={tmp_path / run_name}"]
        assert fmdist.train.main(args) == 0
        return list(orders)

    first = epoch_orders("first")
    assert len(first) == 3  # one order per epoch
    assert all(sorted(order) == list(range(64)) for order in first)
    assert len({tuple(order) for order in first}) == 3, "two epochs trained in the same order"
    assert epoch_orders("again") == first


def test_batches_larger_than_a_shard_and_more_processes_than_images_are_refused(monkeypatch):
    cfg = data_cfg("data.source=synthetic", "data.train_size=5", "data.test_size=10")
    split, _ = load_splits(cfg, 10)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FmdistError, match=r"batch_size=4 is larger than each process's share .* use batch_size <= 3"):
        train_loader(split, batch_size=4, seed=0, data_cfg=cfg, device=CPU)
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(FmdistError, match="5 training images cannot be shared by 6 processes"):
        train_loader(split, batch_size=1, seed=0, data_cfg=cfg, device=CPU)


def test_no_training_batch_holds_a_single_image(monkeypatch):
    """BatchNorm cannot train on one image: such batches are refused up front or never cut."""
    cfg = data_cfg("data.source=synthetic", "data.train_size=5", "data.test_size=10")
    split, _ = load_splits(cfg, 10)
    monkeypatch.setenv("WORLD_SIZE", "5")
    with pytest.raises(FmdistError, match="5 training images cannot be shared by 5 processes: each process needs"):
        train_loader(split, batch_size=2, seed=0, data_cfg=cfg, device=CPU)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(FmdistError, match="key 'batch_size': expected at least 2 for training .* got 1"):
        train_loader(split, batch_size=1, seed=0, data_cfg=cfg, device=CPU)
    # 5 images leave each rank 5, 3 or 2: a last batch of one image is dropped, one of two kept
    for world, batch_size, sizes in [(1, 2, [2, 2]), (1, 3, [3, 2]), (2, 2, [2]), (3, 2, [2])]:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        for rank in range(world):
            monkeypatch.setenv("RANK", str(rank))
            assert [len(labels) for _, labels in train_loader(split, batch_size, 0, cfg, CPU)] == sizes


def transform(**overrides):
    settings = dict(image_size=28, mean=0.0, std=1.0, in_channels=1, augment=False, channels_last=False, seed=0, rank=0)
    return BatchTransform(**{**settings, **overrides}, device=CPU)


def test_batch_transform_scales_normalises_and_resizes():
    images = torch.full((4, 28, 28), 255, dtype=torch.uint8)
    out = transform(image_size=28, mean=0.5, std=0.25)(images, train=True)
    assert out.shape == (4, 1, 28, 28) and torch.allclose(out, torch.full_like(out, 2.0))
    big = transform(image_size=64, in_channels=3)(images, train=False)
    assert big.shape == (4, 3, 64, 64) and torch.allclose(big, torch.ones_like(big))


def test_augmentation_crops_and_flips_reproducibly_and_only_in_training():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 28, 28), dtype=np.uint8))

    def make(rank):
        return transform(augment=True, rank=rank)

    first, again, other_rank = make(0)(images, True), make(0)(images, True), make(1)(images, True)
    assert first.shape == (16, 1, 28, 28)
    assert torch.equal(first, again) and not torch.equal(first, other_rank)
    assert not torch.equal(first, images.unsqueeze(1).float() / 255)
    assert torch.equal(make(0)(images, False), images.unsqueeze(1).float() / 255)
    # every augmented image is a shifted, possibly mirrored window of its zero-padded original
    padded = torch.nn.functional.pad(images.float() / 255, (2, 2, 2, 2))
    for original, out in zip(padded, first[:, 0], strict=True):
        windows = [original[y : y + 28, x : x + 28] for y in range(5) for x in range(5)]
        assert any(torch.equal(out, w) or torch.equal(out, w.flip(-1)) for w in windows)


@pytest.mark.parametrize("world", [1, 3])
def test_device_batches_and_the_dataloader_path_give_identical_batches(monkeypatch, world):
    """The default fast path (split held on the device, batches by indexing) against the classic
    DataLoader with worker processes: same images, same labels, same order, every rank, every
    epoch, also part-way into a resumed epoch and through the transform."""
    fast = data_cfg("data.source=synthetic", "data.train_size=403", "data.test_size=101")
    classic = data_cfg("data.source=synthetic", "data.train_size=403", "data.test_size=101", "data.loader=dataloader",
                       "data.num_workers=2")  # fmt: skip
    train_split, test_split = load_splits(fast, 10)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    to_model = transform(mean=0.2860, std=0.3530, channels_last=True)
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        device_train = train_loader(train_split, 32, 7, fast, CPU)
        loader_train = train_loader(train_split, 32, 7, classic, CPU)
        assert isinstance(device_train, DeviceBatches) and isinstance(loader_train, torch.utils.data.DataLoader)
        for epoch, skip in ((1, 0), (2, 0), (2, 3)):
            device_train.sampler.set_epoch(epoch, skip_batches=skip)
            loader_train.sampler.set_epoch(epoch, skip_batches=skip)
            assert len(device_train) == len(loader_train)
            fast_batches, classic_batches = list(device_train), list(loader_train)
            assert len(fast_batches) == len(classic_batches) == len(device_train)
            for (a_images, a_labels), (b_images, b_labels) in zip(fast_batches, classic_batches, strict=True):
                assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
                assert torch.equal(to_model(a_images, train=True), to_model(b_images, train=True))
        device_eval = list(eval_loader(test_split, 16, fast, CPU))
        loader_eval = list(eval_loader(test_split, 16, classic, CPU))
        assert len(device_eval) == len(loader_eval)
        for (a_images, a_labels), (b_images, b_labels) in zip(device_eval, loader_eval, strict=True):
            assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)


def test_channels_last_batches_hold_the_same_values_in_the_other_layout():
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (8, 28, 28), dtype=np.uint8))
    plain = transform(in_channels=3, image_size=32)(images, train=False)
    fast = transform(in_channels=3, image_size=32, channels_last=True)(images, train=False)
    assert fast.is_contiguous(memory_format=torch.channels_last) and plain.is_contiguous()
    assert torch.equal(plain, fast)


def test_holdout_splits_one_csv_into_its_first_rows_for_training_and_its_last_for_testing(real_csv_split, real_sample):
    train_csv, test_csv = real_csv_split  # the first 800 rows and the rest, as two files
    images, labels = real_sample
    whole = write_kaggle_csv(train_csv.parent / "whole.csv", images, labels)
    held_out = load_config(None, ["data.source=csv", f"data.train_csv={whole}", f"data.holdout={len(labels) - 800}"])
    two_files = load_config(None, ["data.source=csv", f"data.train_csv={train_csv}", f"data.test_csv={test_csv}"])
    for a, b in zip(load_splits(held_out.data, 10), load_splits(two_files.data, 10), strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert "(the last 200 rows)" in load_splits(held_out.data, 10)[1].origin

    too_many = load_config(None, ["data.source=csv", f"data.train_csv={whole}", f"data.holdout={len(labels)}"])
    with pytest.raises(
        FmdistError, match=f"data.holdout={len(labels)} but .*whole.csv holds only {len(labels)} images"
    ):
        load_splits(too_many.data, 10)
