"""The regimes: which weights a model starts from and which of its parameters train.

- scratch: random initialisation, everything trains.
- pretrained: pretrained weights, new first conv (1 channel) and fc (10 classes), everything trains.
- frozen: as pretrained, but only conv1 and fc train; every other parameter has
  requires_grad=False and every frozen BatchNorm stays in eval mode (see ResNet.train), so
  neither weights nor running statistics of the backbone move.
- partial: as frozen, plus what model.unfreeze names (e.g. layer4, or `bn` for the affine
  parameters of every BatchNorm): partial fine-tuning.

Normalisation: 3-channel weights are taken to expect ImageNet's per-channel normalisation
(torchvision's all do), 1-channel weights FashionMNIST's (fmdist's scratch runs). The new grey
stem absorbs the difference to the run's own `data.mean`/`data.std` (see grey_stem_filters).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fmdist import distributed
from fmdist.errors import FmdistError
from fmdist.models import init_conv, resnet, stem_conv, stem_pool
from fmdist.weights import fetch_weights_file, is_local_path, load_into, load_state_dict_file

FROZEN_TRAINABLE_MODULES = ("conv1", "fc")
ALL_BATCHNORMS = "bn"  # in model.unfreeze: the affine parameters of every BatchNorm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
# What a grey image normalised for ImageNet weights uses: the channels' averages. The stem's
# filters are folded to match these (or any other choice) exactly, so they need not be exact.
IMAGENET_GREY_MEAN, IMAGENET_GREY_STD = 0.449, 0.226


@dataclass
class ParameterCounts:
    trainable: int
    total: int


def count_parameters(model: nn.Module) -> ParameterCounts:
    return ParameterCounts(
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total=sum(p.numel() for p in model.parameters()),
    )


def adapt_stem_and_head(
    model: nn.Module,
    in_channels: int,
    num_classes: int,
    stem_init: str,
    stem: str = "imagenet",
    normalization: tuple[float, float] = (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
) -> None:
    """Replace conv1 for `in_channels` inputs with the `stem` shape and fc for `num_classes` outputs.

    stem_init=rgb_sum builds the new filters from the pretrained ones (grey_stem_filters) so that
    a grey image normalised with `normalization` gives the stem the response the old filters gave
    to the same image in colour (x, x, x) with the weights' own normalisation. The cifar stem's
    3x3 filters are the 7x7 ones resized by area, their sums (the response to flat regions) kept.
    """
    old = model.conv1
    new = stem_conv(stem, in_channels, old.out_channels)
    if stem_init == "rgb_sum":
        filters, offset = grey_stem_filters(old.weight.detach(), *normalization)
        if filters.shape[-1] != new.kernel_size[-1]:
            spread = area_spread(filters.shape[-1], new.kernel_size[-1])
            filters = spread @ filters @ spread.T
        with torch.no_grad():
            new.weight.copy_(filters.expand(-1, in_channels, -1, -1) / in_channels)
            # In eval mode BatchNorm(y + offset) with running mean m is BatchNorm(y) with m - offset;
            # in training mode the batch mean absorbs the offset anyway.
            model.bn1.running_mean.sub_(offset)
    else:
        init_conv(new)
    model.conv1 = new
    model.maxpool = stem_pool(stem)  # the source may have the other stem
    model.fc = nn.Linear(model.fc.in_features, num_classes)


def grey_stem_filters(weight: torch.Tensor, mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One-channel filters W' and per-filter offset b with W' * ((x - mean) / std) + b equal to
    W * ((x - m_c) / s_c) over the colour channels c, for a grey image x seen as (x, x, x).

    Expanding both sides: W' = sum_c W_c std / s_c and b = sum_c sum_xy W_c (mean - m_c) / s_c,
    where (m_c, s_c) is what the weights were trained with (see the module's docstring).
    """
    channels = weight.shape[1]
    source_mean = torch.tensor(IMAGENET_MEAN if channels == 3 else (FASHION_MNIST_MEAN,) * channels)
    source_std = torch.tensor(IMAGENET_STD if channels == 3 else (FASHION_MNIST_STD,) * channels)
    per_channel = weight / source_std.view(1, -1, 1, 1)
    filters = (per_channel * std).sum(dim=1, keepdim=True)
    offset = (per_channel.sum(dim=(2, 3)) * (mean - source_mean)).sum(dim=1)
    return filters, offset


def area_spread(source: int, target: int) -> torch.Tensor:
    """[target, source] matrix giving each target cell the overlapping share of each source cell
    when both span the same length; every column sums to 1, so resized filters keep their sums."""
    edges = torch.arange(source + 1, dtype=torch.float64) * target / source
    cells = torch.arange(target, dtype=torch.float64)
    overlap = torch.minimum(edges[1:], cells[:, None] + 1) - torch.maximum(edges[:-1], cells[:, None])
    return (overlap.clamp(min=0) * source / target).float()


def input_normalization(regime: str, weights: str) -> tuple[float, float]:
    """data.mean/data.std when left null: what the starting weights expect for a grey image."""
    if regime != "scratch" and not is_local_path(weights):
        return IMAGENET_GREY_MEAN, IMAGENET_GREY_STD
    return FASHION_MNIST_MEAN, FASHION_MNIST_STD


def pretrained_model(cfg) -> nn.Module:
    """The pretrained network cfg.model.weights names, in its own shape (e.g. 3 channels, 1000 classes)."""
    arch = cfg.model.arch
    path = distributed.local_main_first(lambda: fetch_weights_file(cfg.model.weights, arch))
    state = load_state_dict_file(path)
    conv1, fc = state.get("conv1.weight"), state.get("fc.weight")
    source_channels = conv1.shape[1] if conv1 is not None and conv1.dim() == 4 else 3
    source_classes = fc.shape[0] if fc is not None and fc.dim() == 2 else 1000
    source_stem = "cifar" if conv1 is not None and conv1.shape[-1] == 3 else "imagenet"
    model = resnet(arch, source_channels, source_classes, cfg.model.width, stem=source_stem)
    load_into(model, state, path, f"{arch} (width {cfg.model.width})")
    distributed.main_print(f"fmdist: starting weights {cfg.model.weights}: {path}")
    return model


def build_model(cfg, initial_weights: bool = True) -> tuple[nn.Module, ParameterCounts]:
    """The model for cfg.regime, with requires_grad set per regime.

    initial_weights=False builds only the shape (for a run whose weights come from a checkpoint),
    so resuming a pretrained run needs neither the network nor the original weights file.
    """
    m = cfg.model
    if cfg.regime == "scratch" or not initial_weights:
        model = resnet(m.arch, in_channels=m.in_channels, num_classes=m.num_classes, width=m.width, stem=m.stem)
    else:
        model = pretrained_model(cfg)
        normalization = (cfg.data.mean, cfg.data.std)
        adapt_stem_and_head(model, m.in_channels, m.num_classes, m.stem_init, m.stem, normalization)
    if m.init_from is not None and initial_weights:
        path = Path(m.init_from)
        if not path.is_file():
            raise FmdistError(f"model.init_from: {path}: file not found")
        load_into(model, load_state_dict_file(path), path, f"the {cfg.regime} {m.arch} of this config")
    if cfg.regime == "frozen":
        freeze_all_but(model, FROZEN_TRAINABLE_MODULES)
    elif cfg.regime == "partial":
        freeze_all_but(model, FROZEN_TRAINABLE_MODULES + tuple(m.unfreeze))
    return model, count_parameters(model)


def freeze_all_but(model: nn.Module, trainable: tuple[str, ...]) -> None:
    """requires_grad only for the parameters of the named modules (dotted paths such as layer4 or
    layer4.1), or of every BatchNorm when `bn` is named."""
    modules = dict(model.named_modules())
    for name in trainable:
        if name != ALL_BATCHNORMS and name not in modules:
            raise FmdistError(
                f"model.unfreeze: {type(model).__name__} has no module '{name}'; expected bn, a stage "
                "(conv1, bn1, layer1..layer4, fc) or a block such as layer4.1"
            )
    for module_name, module in modules.items():
        if module_name == "" or not list(module.parameters(recurse=False)):
            continue
        in_named = any(module_name == name or module_name.startswith(name + ".") for name in trainable)
        wanted = in_named or (ALL_BATCHNORMS in trainable and isinstance(module, nn.BatchNorm2d))
        for parameter in module.parameters(recurse=False):
            parameter.requires_grad_(wanted)
