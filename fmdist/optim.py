"""Optimizers, built from the parameters that train (a frozen backbone has none in the optimizer)."""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(optimizer_cfg, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    name, lr, decay = optimizer_cfg.name, optimizer_cfg.lr, optimizer_cfg.weight_decay
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=optimizer_cfg.momentum, nesterov=optimizer_cfg.momentum > 0, weight_decay=decay
    )
