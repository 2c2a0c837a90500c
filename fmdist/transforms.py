"""Per-batch image transforms on the training device: uint8 -> float, augment, resize, normalise."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CROP_PADDING = 2


class BatchTransform:
    """Turns a uint8 batch [B, 28, 28] into the model's float input [B, C, S, S].

    Augmentation (random crop with zero padding, horizontal flip) draws from its own generator,
    seeded per rank, so runs are reproducible and ranks do not augment in lockstep.
    """

    def __init__(
        self,
        image_size: int,
        mean: float,
        std: float,
        in_channels: int,
        augment: bool,
        channels_last: bool,
        seed: int,
        rank: int,
        device: torch.device,
        erasing: float = 0.0,
    ):
        self.image_size = image_size
        self.mean, self.std = mean, std
        self.in_channels = in_channels
        self.augment = augment
        self.erasing = erasing
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed * 1009 + rank)

    @classmethod
    def from_config(cls, cfg, rank: int, device: torch.device) -> BatchTransform:
        return cls(
            image_size=cfg.data.image_size,
            mean=cfg.data.mean,
            std=cfg.data.std,
            in_channels=cfg.model.in_channels,
            augment=cfg.data.augment,
            channels_last=cfg.channels_last,
            erasing=cfg.data.random_erasing,
            seed=cfg.seed,
            rank=rank,
            device=device,
        )

    def __call__(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).unsqueeze(1).float().div_(255)
        if train and self.augment:
            x = self._random_crop_and_flip(x)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        x = (x - self.mean) / self.std
        if train and self.erasing > 0:
            x = self._random_erasing(x)
        if self.in_channels != 1:
            x = x.expand(-1, self.in_channels, -1, -1)
        return x.contiguous(memory_format=self.memory_format)

    def _random_crop_and_flip(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        padded = F.pad(x, (CROP_PADDING,) * 4)
        offsets = torch.randint(0, 2 * CROP_PADDING + 1, (batch, 2), generator=self.generator, device=x.device)
        rows = (offsets[:, 0, None] + torch.arange(height, device=x.device))[:, :, None]
        cols = (offsets[:, 1, None] + torch.arange(width, device=x.device))[:, None, :]
        flip = torch.rand(batch, generator=self.generator, device=x.device) < 0.5
        cols = torch.where(flip[:, None, None], cols.flip(-1), cols)
        batch_index = torch.arange(batch, device=x.device)[:, None, None]
        return padded[batch_index, 0, rows, cols].unsqueeze(1)

    def _random_erasing(self, x: torch.Tensor) -> torch.Tensor:
        """Random erasing (Zhong et al., 2017) on normalised images: with probability `erasing`,
        a rectangle covering 2-33% of the image, aspect ratio 0.3-3.3, is set to 0 (the mean)."""
        batch, _, height, width = x.shape
        draw = torch.rand(batch, 4, generator=self.generator, device=x.device)
        area = (0.02 + 0.31 * draw[:, 0]) * height * width
        aspect = torch.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * draw[:, 1])
        box_h = (area * aspect).sqrt().round().clamp(1, height)
        box_w = (area / aspect).sqrt().round().clamp(1, width)
        top = ((height - box_h + 1) * draw[:, 2]).floor()
        left = ((width - box_w + 1) * draw[:, 3]).floor()
        chosen = torch.rand(batch, generator=self.generator, device=x.device) < self.erasing
        rows = torch.arange(height, device=x.device)[None, :, None]
        cols = torch.arange(width, device=x.device)[None, None, :]
        inside = (
            (rows >= top[:, None, None])
            & (rows < (top + box_h)[:, None, None])
            & (cols >= left[:, None, None])
            & (cols < (left + box_w)[:, None, None])
        )
        return x.masked_fill((inside & chosen[:, None, None]).unsqueeze(1), 0.0)
