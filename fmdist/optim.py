"""Optimizers over the parameters that train (a frozen backbone has none in the optimizer), and
the learning-rate schedule, stepped every iteration."""

from __future__ import annotations

import math

import torch
from torch import nn


def scaled_lr(optimizer_cfg, global_batch: int) -> float:
    """The learning rate in use: lr, or with scale_lr the linear scaling rule lr x global batch / reference."""
    if optimizer_cfg.scale_lr:
        return optimizer_cfg.lr * global_batch / optimizer_cfg.reference_batch
    return optimizer_cfg.lr


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; weight decay on weight matrices and kernels only, not on BatchNorm
    scales and shifts or biases (all 1-dimensional), where it only fights normalisation."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": trainable, "weight_decay": 0.0}]
    return [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]


def build_optimizer(optimizer_cfg, model: nn.Module, global_batch: int | None = None) -> torch.optim.Optimizer:
    groups = parameter_groups(model, optimizer_cfg.weight_decay)
    lr = scaled_lr(optimizer_cfg, global_batch) if global_batch else optimizer_cfg.lr
    # One kernel for the whole update instead of several passes over every tensor: a ResNet-18
    # step at 28x28 on a 2-core CPU spends 10 ms in it instead of 27 (CUDA has the same kernels).
    if optimizer_cfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr, fused=True)
    if optimizer_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    momentum = optimizer_cfg.momentum
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, fused=True)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """The multiplier of the learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(optimizer_cfg, optimizer, steps_per_epoch: int, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = round(optimizer_cfg.warmup_epochs * steps_per_epoch)
    total = steps_per_epoch * epochs
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total, warmup, optimizer_cfg.schedule, optimizer_cfg.min_lr_ratio),
    )


def build_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm statistics: after each step,
    ema = decay * ema + (1 - decay) * weights (the first update copies the weights)."""
    if decay == 0:
        return None
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True
    )
