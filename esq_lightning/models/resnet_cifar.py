"""CIFAR ResNets of He et al. (2016): basic blocks, 16/32/64 channels, depth 6n+2 (ResNet-20/56)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esq_lightning.models.common import CIFAR10_MEAN, CIFAR10_STD, ResidualNet, init_weights, make_normalize


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU. Output is taken after the add and the ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            # Option B (projection) shortcut: a quantizable 1x1 conv instead of zero padding.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(ResidualNet):
    """ResNet-(6n+2) for CIFAR: conv3x3(w) stem, three stages of n basic blocks (w, 2w, 4w)."""

    residual_block_types = (BasicBlock,)

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: float | Sequence[float] = CIFAR10_MEAN,
        std: float | Sequence[float] = CIFAR10_STD,
        width: int = 16,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CifarResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.normalize = make_normalize(mean, std, in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.in_planes = width
        self.layer1 = self._make_stage(width, n, 1)
        self.layer2 = self._make_stage(2 * width, n, 2)
        self.layer3 = self._make_stage(4 * width, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        init_weights(self)

    def _make_stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def resnet20(**kwargs) -> CifarResNet:
    """ResNet-20 (3 x 3 basic blocks, 0.27 M parameters)."""
    return CifarResNet(depth=20, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    """ResNet-56 (3 x 9 basic blocks, 0.86 M parameters)."""
    return CifarResNet(depth=56, **kwargs)
