"""Dataset sources (torchvision, Kaggle CSV, synthetic) and the loaders that shard them over ranks.

Every source yields the whole split as one uint8 tensor [N, 28, 28] plus int64 labels (47 MB
for FashionMNIST's training split); batches are cut by indexing it, and conversion to float,
resizing, normalisation and augmentation happen per batch (see transforms.py).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from fmdist import distributed
from fmdist.csvdata import read_kaggle_csv
from fmdist.errors import FmdistError

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
IMAGE_SIDE = 28
# BatchNorm in training mode normalises each channel over the batch: one image at 28x28 leaves it one
# value per channel in the last stage's 1x1 maps, and it fails ("Expected more than 1 value per channel").
MIN_TRAIN_BATCH = 2


@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]
    classes: tuple[str, ...]
    origin: str  # where the images came from, for messages

    def __len__(self) -> int:
        return len(self.labels)


def load_splits(data_cfg, num_classes: int) -> tuple[ImageSplit, ImageSplit]:
    """The (train, test) splits that data_cfg describes, validated against num_classes."""
    if data_cfg.source == "csv" and data_cfg.holdout is not None:
        splits = _held_out_csv_splits(data_cfg.train_csv, data_cfg.holdout, num_classes)
    else:
        splits = tuple(_load_split(data_cfg, split, num_classes) for split in ("train", "test"))
    return tuple(
        _limit(split, size, f"data.{name}_size", num_classes)
        for split, name, size in zip(splits, ("train", "test"), (data_cfg.train_size, data_cfg.test_size), strict=True)
    )


def _held_out_csv_splits(path: str, holdout: int, num_classes: int) -> tuple[ImageSplit, ImageSplit]:
    images, labels = read_kaggle_csv(path, num_classes)
    kept = len(labels) - holdout
    if kept < 1:
        raise FmdistError(f"data.holdout={holdout} but {path} holds only {len(labels)} images; expected fewer")
    classes = _class_names(num_classes)
    return (
        ImageSplit(images[:kept], labels[:kept], classes, f"{path} (the first {kept} rows)"),
        ImageSplit(images[kept:], labels[kept:], classes, f"{path} (the last {holdout} rows)"),
    )


def _load_split(data_cfg, split: str, num_classes: int) -> ImageSplit:
    if data_cfg.source == "csv":
        path = data_cfg.train_csv if split == "train" else data_cfg.test_csv
        images, labels = read_kaggle_csv(path, num_classes)
        return ImageSplit(images, labels, _class_names(num_classes), str(path))
    if data_cfg.source == "synthetic":
        size = (data_cfg.train_size if split == "train" else data_cfg.test_size) or FASHION_MNIST_SIZES[split]
        images, labels = synthetic_images(size, num_classes, data_cfg.synthetic_seed, split)
        classes = tuple(f"pattern {i}" for i in range(num_classes))
        return ImageSplit(images, labels, classes, f"synthetic task (seed {data_cfg.synthetic_seed}, {split})")
    images, labels = distributed.local_main_first(lambda: _torchvision_fashion_mnist(data_cfg, split))
    return ImageSplit(images, labels, FASHION_MNIST_CLASSES, str(Path(data_cfg.root) / "FashionMNIST"))


def _class_names(num_classes: int) -> tuple[str, ...]:
    if num_classes == len(FASHION_MNIST_CLASSES):
        return FASHION_MNIST_CLASSES
    return tuple(f"class {i}" for i in range(num_classes))


def _limit(split: ImageSplit, size: int | None, key: str, num_classes: int) -> ImageSplit:
    if size is not None and size < len(split):
        split = ImageSplit(split.images[:size], split.labels[:size], split.classes, split.origin)
    elif size is not None and size > len(split):
        raise FmdistError(f"{key}={size} but {split.origin} holds only {len(split)} images")
    top = int(split.labels.max())
    if top >= num_classes or int(split.labels.min()) < 0:
        raise FmdistError(f"{split.origin}: labels run up to {top}, but model.num_classes is {num_classes}")
    return split


def _torchvision_fashion_mnist(data_cfg, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    raw = Path(data_cfg.root) / "FashionMNIST" / "raw"
    try:
        dataset = datasets.FashionMNIST(data_cfg.root, train=split == "train", download=data_cfg.download)
    except (RuntimeError, OSError) as e:
        cause = "data.download is false" if not data_cfg.download else f"download failed: {str(e).splitlines()[0]}"
        raise FmdistError(
            f"FashionMNIST {split} split not found in {raw} ({cause}); put the IDX files "
            "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte) there "
            "or use data.source=csv"
        ) from None
    return dataset.data, dataset.targets


def synthetic_images(size: int, num_classes: int, task_seed: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable stand-in for FashionMNIST: each class is a fixed pattern of soft blobs, seen shifted
    by up to 3 pixels, at varying contrast and under pixel noise. Train and test share the patterns
    (they depend on task_seed only) but not the samples."""
    patterns = _class_patterns(num_classes, torch.Generator().manual_seed(task_seed))
    generator = torch.Generator().manual_seed(task_seed * 1000 + (1 if split == "train" else 2))
    labels = (torch.arange(size) % num_classes)[torch.randperm(size, generator=generator)]
    images = patterns[labels]
    shifts = torch.randint(-3, 4, (size, 2), generator=generator)
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            chosen = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            images[chosen] = torch.roll(images[chosen], shifts=(dy, dx), dims=(1, 2))
    contrast = 0.5 + 1.0 * torch.rand(size, 1, 1, generator=generator)
    noise = 0.2 * torch.randn(size, IMAGE_SIDE, IMAGE_SIDE, generator=generator)
    images = (images * contrast + noise).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return images, labels


def _class_patterns(num_classes: int, generator: torch.Generator) -> torch.Tensor:
    axis = torch.arange(IMAGE_SIDE, dtype=torch.float32)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    patterns = torch.zeros(num_classes, IMAGE_SIDE, IMAGE_SIDE)
    for c in range(num_classes):
        for _ in range(3):
            cy, cx = (6 + 16 * torch.rand(2, generator=generator)).tolist()
            sigma = float(1.5 + 3 * torch.rand(1, generator=generator))
            patterns[c] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
    return patterns / patterns.amax(dim=(1, 2), keepdim=True)


class SplitDataset(Dataset):
    """Index access to an ImageSplit; `__getitems__` lets a DataLoader fetch a whole batch in one go."""

    def __init__(self, split: ImageSplit):
        self.images, self.labels = split.images, split.labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.labels[index]


def _already_batched(batch):
    return batch


class ShardSampler(Sampler[int]):
    """Rank r takes indices r, r+W, r+2W, ... of the dataset: every sample on exactly one rank,
    nothing repeated (DistributedSampler pads with repeats, which would bias evaluation)."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch can start part-way, after the batches a checkpoint covered.

    The order of an epoch depends only on (seed, epoch), so skipping the first batches of the
    same order continues a stopped epoch exactly.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, batch_size: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.skipped = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        super().set_epoch(epoch)
        self.skipped = min(skip_batches * self.batch_size, self.num_samples)

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skipped, None)

    def __len__(self) -> int:
        return self.num_samples - self.skipped


class DeviceBatches:
    """Batches cut by indexing a split held whole on the training device (47 MB as uint8 for
    FashionMNIST): no worker processes, no per-sample work, no host-to-device copy per batch.

    Yields the same (images, labels) batches, in the same order, as a DataLoader over the same
    sampler; the sampler decides which indices this rank takes each epoch.
    """

    def __init__(self, split: ImageSplit, sampler: Sampler, batch_size: int, drop_last: bool, device: torch.device):
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last

    def __iter__(self):
        order = torch.as_tensor(list(self.sampler), dtype=torch.long).to(self.images.device)
        for start in range(len(self)):
            index = order[start * self.batch_size : (start + 1) * self.batch_size]
            yield self.images[index], self.labels[index]

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.sampler) // self.batch_size
        return math.ceil(len(self.sampler) / self.batch_size)


def train_loader(split: ImageSplit, batch_size: int, seed: int, data_cfg, device: torch.device):
    world, rank = distributed.world_size(), distributed.rank()
    shard = math.ceil(len(split) / world)
    if shard < MIN_TRAIN_BATCH:
        raise FmdistError(
            f"{split.origin}: {len(split)} training images cannot be shared by {world} processes: each process "
            f"needs at least {MIN_TRAIN_BATCH}, as BatchNorm cannot train on one image"
        )
    if batch_size < MIN_TRAIN_BATCH:
        raise FmdistError(
            f"key 'batch_size': expected at least {MIN_TRAIN_BATCH} for training (BatchNorm cannot train on a "
            f"batch of one image), got {batch_size}"
        )
    if batch_size > shard:
        raise FmdistError(
            f"batch_size={batch_size} is larger than each process's share of {split.origin} "
            f"({shard} of {len(split)} images over {world} processes); use batch_size <= {shard}"
        )
    dataset = SplitDataset(split)
    sampler = ResumableDistributedSampler(dataset, num_replicas=world, rank=rank, seed=seed, batch_size=batch_size)
    # A final batch of one image cannot be batch-normalised in training mode.
    return _batches(split, sampler, batch_size, data_cfg, device, drop_last=shard % batch_size == 1)


def eval_loader(split: ImageSplit, batch_size: int, data_cfg, device: torch.device):
    sampler = ShardSampler(len(split), distributed.rank(), distributed.world_size())
    return _batches(split, sampler, batch_size, data_cfg, device, drop_last=False)


def _batches(split: ImageSplit, sampler: Sampler, batch_size: int, data_cfg, device: torch.device, drop_last: bool):
    if data_cfg.loader == "device":
        return DeviceBatches(split, sampler, batch_size, drop_last, device)
    return DataLoader(
        SplitDataset(split),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=_already_batched,
        num_workers=data_cfg.num_workers,
        pin_memory=data_cfg.pin_memory and device.type == "cuda",
        persistent_workers=data_cfg.num_workers > 0,
        drop_last=drop_last,
    )
