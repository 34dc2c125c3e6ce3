"""Reference networks used by the training CLI, tests and benchmarks (CIFAR-style VGG and ResNet)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def vgg(config: str | Sequence[int | str] = "vgg16", num_classes: int = 10, in_channels: int = 3,
        width: float = 1.0) -> nn.Module:
    """VGG with BatchNorm for small images (CIFAR layout: conv-BN-ReLU blocks, max-pools, one Linear).

    ``config`` is a name from :data:`VGG_CONFIGS` or a list of widths and ``"M"`` (max-pool);
    ``width`` scales every conv width.
    """
    cfg = VGG_CONFIGS[config] if isinstance(config, str) else list(config)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    convs = pools = 0
    for item in cfg:
        if item == "M":
            pools += 1
            layers[f"pool{pools}"] = nn.MaxPool2d(2)
            continue
        convs += 1
        out = max(1, int(round(int(item) * width)))
        layers[f"conv{convs}"] = nn.Conv2d(channels, out, 3, padding=1, bias=False)
        layers[f"bn{convs}"] = nn.BatchNorm2d(out)
        layers[f"relu{convs}"] = nn.ReLU(inplace=True)
        channels = out
    # Named layers (features.conv3, ...): reports, plots and state dicts say which layer, not "0.7".
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(layers), pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        classifier=nn.Linear(channels, num_classes),
    ))


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is a 1x1 conv + BN when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images (He et al. 2016, CIFAR variant): ResNet-32 is n=5, ResNet-56 n=9."""

    def __init__(self, depth: int = 32, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, planes = [], width
        in_planes = width
        for i in range(3):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
            planes *= 2
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet_cifar(depth: int = 32, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> CifarResNet:
    return CifarResNet(depth, num_classes, in_channels, width)
