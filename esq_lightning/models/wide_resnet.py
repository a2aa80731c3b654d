"""Wide ResNet (Zagoruyko & Komodakis 2016), WRN-28-10 for CIFAR-10 as in the paper."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esq_lightning.models.common import CIFAR10_MEAN, CIFAR10_STD, ResidualNet, init_weights, make_normalize
from esq_lightning.models.preact_resnet import PreActBlock


class WideBlock(PreActBlock):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + shortcut.

    Output is taken after the add (the next block, or the final BN-ReLU, activates it). As in the reference
    WRN code, the projection shortcut takes the activated input; this is PreActBlock with dropout.
    """


class WideResNet(ResidualNet):
    """WRN-depth-k: conv3x3(16) stem, three groups of (depth-4)/6 wide blocks (16k, 32k, 64k)."""

    residual_block_types = (WideBlock,)

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: float | Sequence[float] = CIFAR10_MEAN,
        std: float | Sequence[float] = CIFAR10_STD,
        width: int = 16,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40), got {depth}")
        n = (depth - 4) // 6
        # width: channels of the stem (16 in the paper); the groups have width * widen_factor * (1, 2, 4).
        widths = [width, width * widen_factor, 2 * width * widen_factor, 4 * width * widen_factor]
        self.normalize = make_normalize(mean, std, in_channels)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.in_planes = widths[0]
        self.layer1 = self._make_group(widths[1], n, 1, dropout)
        self.layer2 = self._make_group(widths[2], n, 2, dropout)
        self.layer3 = self._make_group(widths[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def _make_group(self, planes: int, n: int, stride: int, dropout: float) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(WideBlock(self.in_planes, planes, s, dropout))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def wrn28_10(**kwargs) -> WideResNet:
    """WRN-28-10 (3 x 4 wide blocks, 36.5 M parameters), dropout 0 unless given."""
    kwargs.setdefault("depth", 28)
    kwargs.setdefault("widen_factor", 10)
    return WideResNet(**kwargs)
