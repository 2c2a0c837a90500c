"""ResNet-18/34/50/101/152 with torchvision's parameter names, so ImageNet state dicts load strictly.

Two stems: `imagenet` (7x7 stride-2 conv and a stride-2 max-pool, torchvision's and the
tutorial's), which turns a 28x28 image into 7x7 before the first block and 1x1 by the last, and
`cifar` (3x3 stride-1 conv, no max-pool), which keeps 28x28 for the first block and 4x4 for the
last at about 14x the compute.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ARCHS = {
    # arch: (block, blocks per stage)
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class BottleNeck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "v1.5"), 1x1 expand (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    def __init__(
        self,
        block: type[BasicBlock] | type[BottleNeck],
        blocks_per_stage: tuple[int, int, int, int],
        in_channels: int = 3,
        num_classes: int = 1000,
        width: int = 64,
        stem: str = "imagenet",
    ):
        super().__init__()
        self.conv1 = stem_conv(stem, in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = stem_pool(stem)
        self._in_planes = width
        self.layer1 = self._make_stage(block, width, blocks_per_stage[0], stride=1)
        self.layer2 = self._make_stage(block, width * 2, blocks_per_stage[1], stride=2)
        self.layer3 = self._make_stage(block, width * 4, blocks_per_stage[2], stride=2)
        self.layer4 = self._make_stage(block, width * 8, blocks_per_stage[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                init_conv(module)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_stage(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._in_planes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self._in_planes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self._in_planes, planes, stride, downsample)]
        self._in_planes = planes * block.expansion
        layers += [block(self._in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def train(self, mode: bool = True) -> ResNet:
        # A BatchNorm whose affine parameters are frozen is part of a frozen backbone: it keeps
        # normalising with the running statistics it came with instead of re-estimating them.
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d) and not any(p.requires_grad for p in module.parameters()):
                    module.eval()
        return self


def stem_conv(stem: str, in_channels: int, width: int) -> nn.Conv2d:
    if stem == "imagenet":
        return nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    if stem == "cifar":
        return _conv3x3(in_channels, width)
    raise ValueError(f"unknown stem {stem!r}; expected imagenet or cifar")


def stem_pool(stem: str) -> nn.Module:
    return nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()


def init_conv(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


def resnet(arch: str, in_channels: int = 3, num_classes: int = 1000, width: int = 64, stem: str = "imagenet") -> ResNet:
    kind, blocks_per_stage = ARCHS[arch]
    block = BasicBlock if kind == "basic" else BottleNeck
    return ResNet(block, blocks_per_stage, in_channels=in_channels, num_classes=num_classes, width=width, stem=stem)


def forward_gflops(model: nn.Module, in_channels: int, image_size: int) -> float:
    """Multiply-adds x 2 of one image's forward pass, counted on shapes alone: the model runs on
    stand-ins of its tensors on the meta device, so nothing is computed, copied or updated."""
    stand_ins = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
    }
    images = torch.empty(2, in_channels, image_size, image_size, device="meta")  # BatchNorm in training mode needs 2
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        torch.func.functional_call(model, stand_ins, (images,))
    return counter.get_total_flops() / 2 / 1e9


def resnet18(**kwargs) -> ResNet:
    return resnet("resnet18", **kwargs)


def resnet34(**kwargs) -> ResNet:
    return resnet("resnet34", **kwargs)


def resnet50(**kwargs) -> ResNet:
    return resnet("resnet50", **kwargs)


def resnet101(**kwargs) -> ResNet:
    return resnet("resnet101", **kwargs)


def resnet152(**kwargs) -> ResNet:
    return resnet("resnet152", **kwargs)
