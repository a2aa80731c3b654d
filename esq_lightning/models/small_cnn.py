"""SmallCNN: a fast three-block CNN for the 8x8 sklearn digits (the CPU smoke-test model)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from esq_lightning.models.common import DIGITS_MEAN, DIGITS_STD, ResidualNet, init_weights, make_normalize


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    # bias=False: the following BatchNorm has its own shift.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(ResidualNet):
    """conv(w)-BN-ReLU | conv(2w)-BN-ReLU-maxpool | conv(4w)-BN-ReLU-maxpool | fc.

    Sized for 1x8x8 digits; an adaptive 2x2 average pool before `fc` (the identity at 8x8) lets it
    take any input size >= 4x4. It has no residual connections: `residual_module_names()` returns
    its three blocks so layer-wise error measurement works on it too.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        mean: float | Sequence[float] = DIGITS_MEAN,
        std: float | Sequence[float] = DIGITS_STD,
        width: int = 32,
    ) -> None:
        super().__init__()
        self.normalize = make_normalize(mean, std, in_channels)
        self.block1 = nn.Sequential(*_conv_bn_relu(in_channels, width))
        self.block2 = nn.Sequential(*_conv_bn_relu(width, 2 * width), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*_conv_bn_relu(2 * width, 4 * width), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * width * 2 * 2, num_classes)
        init_weights(self)

    def residual_module_names(self) -> list[str]:
        return ["block1", "block2", "block3"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.normalize(x))))
        return self.fc(torch.flatten(self.pool(out), 1))
