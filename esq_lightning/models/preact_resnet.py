"""Pre-activation ResNet-18 for CIFAR (He et al. 2016, identity mappings), as in Madry-style robust training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esq_lightning.models.common import CIFAR10_MEAN, CIFAR10_STD, ResidualNet, init_weights, make_normalize


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 + shortcut. Output is taken after the add (no ReLU follows)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Dropout between the convolutions is the wide-block variant (WideBlock); off in PreAct ResNet-18.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input, as in the reference pre-activation code.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class PreActResNet(ResidualNet):
    """Pre-activation ResNet: conv3x3(w) stem, four stages (w, 2w, 4w, 8w), final BN-ReLU, fc."""

    residual_block_types = (PreActBlock,)

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        mean: float | Sequence[float] = CIFAR10_MEAN,
        std: float | Sequence[float] = CIFAR10_STD,
        width: int = 64,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 4 or min(num_blocks) < 1:
            raise ValueError(f"PreActResNet needs four positive stage sizes, got {list(num_blocks)}")
        self.normalize = make_normalize(mean, std, in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.in_planes = width
        self.layer1 = self._make_stage(width, num_blocks[0], 1)
        self.layer2 = self._make_stage(2 * width, num_blocks[1], 2)
        self.layer3 = self._make_stage(4 * width, num_blocks[2], 2)
        self.layer4 = self._make_stage(8 * width, num_blocks[3], 2)
        # Final BN-ReLU: pre-activation blocks leave the last sum un-normalized.
        self.bn = nn.BatchNorm2d(8 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        init_weights(self)

    def _make_stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def preact_resnet18(**kwargs) -> PreActResNet:
    """Pre-activation ResNet-18 (4 x 2 blocks, 11.2 M parameters)."""
    return PreActResNet(num_blocks=(2, 2, 2, 2), **kwargs)
