"""The three regimes: which weights a model starts from and which of its parameters train.

- scratch: random initialisation, everything trains.
- pretrained: pretrained weights, new first conv (1 channel) and fc (10 classes), everything trains.
- frozen: as pretrained, but only conv1 and fc train; every other parameter has
  requires_grad=False and every frozen BatchNorm stays in eval mode (see ResNet.train), so
  neither weights nor running statistics of the backbone move.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmdist import distributed
from fmdist.errors import FmdistError
from fmdist.models import init_conv, resnet
from fmdist.weights import fetch_weights_file, load_into, load_state_dict_file

FROZEN_TRAINABLE_MODULES = ("conv1", "fc")


@dataclass
class ParameterCounts:
    trainable: int
    total: int


def count_parameters(model: nn.Module) -> ParameterCounts:
    return ParameterCounts(
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total=sum(p.numel() for p in model.parameters()),
    )


def adapt_stem_and_head(model: nn.Module, in_channels: int, num_classes: int, stem_init: str) -> None:
    """Replace conv1 for `in_channels` inputs and fc for `num_classes` outputs, as the tutorial does.

    stem_init=rgb_sum builds the new filters from the pretrained ones summed over their input
    channels: a grey image x fed to them gives what the old filters gave for the image (x, x, x).
    """
    old = model.conv1
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    if stem_init == "rgb_sum":
        with torch.no_grad():
            grey = old.weight.sum(dim=1, keepdim=True)
            new.weight.copy_(grey.expand(-1, in_channels, -1, -1) / in_channels)
    else:
        init_conv(new)
    model.conv1 = new
    model.fc = nn.Linear(model.fc.in_features, num_classes)


def pretrained_model(cfg) -> nn.Module:
    """The pretrained network cfg.model.weights names, in its own shape (e.g. 3 channels, 1000 classes)."""
    arch = cfg.model.arch
    path = distributed.local_main_first(lambda: fetch_weights_file(cfg.model.weights, arch))
    state = load_state_dict_file(path)
    conv1, fc = state.get("conv1.weight"), state.get("fc.weight")
    source_channels = conv1.shape[1] if conv1 is not None and conv1.dim() == 4 else 3
    source_classes = fc.shape[0] if fc is not None and fc.dim() == 2 else 1000
    model = resnet(arch, in_channels=source_channels, num_classes=source_classes, width=cfg.model.width)
    load_into(model, state, path, f"{arch} (width {cfg.model.width})")
    return model


def build_model(cfg, initial_weights: bool = True) -> tuple[nn.Module, ParameterCounts]:
    """The model for cfg.regime, with requires_grad set per regime.

    initial_weights=False builds only the shape (for a run whose weights come from a checkpoint),
    so resuming a pretrained run needs neither the network nor the original weights file.
    """
    m = cfg.model
    if cfg.regime == "scratch" or not initial_weights:
        model = resnet(m.arch, in_channels=m.in_channels, num_classes=m.num_classes, width=m.width)
    else:
        model = pretrained_model(cfg)
        adapt_stem_and_head(model, m.in_channels, m.num_classes, m.stem_init)
    if m.init_from is not None and initial_weights:
        path = Path(m.init_from)
        if not path.is_file():
            raise FmdistError(f"model.init_from: {path}: file not found")
        load_into(model, load_state_dict_file(path), path, f"the {cfg.regime} {m.arch} of this config")
    if cfg.regime == "frozen":
        freeze_all_but(model, FROZEN_TRAINABLE_MODULES)
    return model, count_parameters(model)


def freeze_all_but(model: nn.Module, trainable_modules: tuple[str, ...]) -> None:
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.split(".", 1)[0] in trainable_modules)
