"""Bottleneck ResNets with a CIFAR stem (conv3x3 stride 1, no max-pool): ResNet-152 for CIFAR-100."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esq_lightning.models.common import CIFAR100_MEAN, CIFAR100_STD, ResidualNet, init_weights, make_normalize


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 bottleneck (expansion 4), + shortcut, ReLU. Output taken after add and ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class BottleneckResNet(ResidualNet):
    """ResNet with bottleneck blocks and the common CIFAR stem; stages of planes w, 2w, 4w, 8w."""

    residual_block_types = (Bottleneck,)

    def __init__(
        self,
        num_blocks: Sequence[int] = (3, 8, 36, 3),
        num_classes: int = 100,
        in_channels: int = 3,
        mean: float | Sequence[float] = CIFAR100_MEAN,
        std: float | Sequence[float] = CIFAR100_STD,
        width: int = 64,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ValueError(f"BottleneckResNet needs four positive stage sizes, got {list(num_blocks)}")
        self.normalize = make_normalize(mean, std, in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.in_planes = width
        self.layer1 = self._make_stage(width, num_blocks[0], 1)
        self.layer2 = self._make_stage(2 * width, num_blocks[1], 2)
        self.layer3 = self._make_stage(4 * width, num_blocks[2], 2)
        self.layer4 = self._make_stage(8 * width, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width * Bottleneck.expansion, num_classes)
        init_weights(self)

    def _make_stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def resnet152(**kwargs) -> BottleneckResNet:
    """ResNet-152, CIFAR variant ([3, 8, 36, 3] bottleneck blocks, 58.3 M parameters at 100 classes)."""
    return BottleneckResNet(num_blocks=(3, 8, 36, 3), **kwargs)
