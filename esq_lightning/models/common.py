"""Shared model pieces: in-model input normalization, weight init and residual-module lookup."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Dataset statistics, used as constructor defaults; the Hydra data configs carry the same numbers.
DIGITS_MEAN: tuple[float, ...] = (0.3053,)
DIGITS_STD: tuple[float, ...] = (0.3760,)
CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, ...] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, ...] = (0.2673, 0.2564, 0.2762)


def _as_channel_tensor(values: float | Sequence[float], name: str) -> torch.Tensor:
    # Explicit CPU: the checks below need real values even under a `torch.device("meta")` context.
    t = torch.as_tensor(values, dtype=torch.float32, device="cpu").flatten()
    if t.numel() == 0:
        raise ValueError(f"Normalize: {name} is empty")
    return t.view(1, -1, 1, 1)


class Normalize(nn.Module):
    """(x - mean) / std per channel, as the model's first module.

    Keeping normalization inside the model lets attacks and epsilons work in [0, 1] pixel space.
    A single value broadcasts over all channels.
    """

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        mean_t = _as_channel_tensor(mean, "mean")
        std_t = _as_channel_tensor(std, "std")
        if (std_t <= 0).any():
            raise ValueError(f"Normalize: std must be positive, got {std_t.flatten().tolist()}")
        # Buffers, so they follow .to(device) and are saved with the checkpoint.
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    @property
    def num_channels(self) -> int:
        """Number of channels the statistics describe (1 means broadcast over any number)."""
        return max(self.mean.shape[1], self.std.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def make_normalize(mean: float | Sequence[float], std: float | Sequence[float], in_channels: int) -> Normalize:
    """Build a Normalize and fail early when its statistics do not fit `in_channels`."""
    norm = Normalize(mean, std)
    for name, buf in (("mean", norm.mean), ("std", norm.std)):
        if buf.shape[1] not in (1, in_channels):
            raise ValueError(
                f"{name} has {buf.shape[1]} values but the model has in_channels={in_channels} "
                "(give one value per channel, or a single value)"
            )
    return norm


def init_weights(model: nn.Module) -> None:
    """He init for convolutions (fan_out, as in the ResNet papers), unit/zero BatchNorm."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResidualNet(nn.Module):
    """Base class: lists the qualified names of the residual modules in forward order.

    Subclasses set `residual_block_types`; registration order equals forward order in every
    model here because stages are nn.Sequential containers registered in the order they run.
    """

    residual_block_types: tuple[type[nn.Module], ...] = ()

    def residual_module_names(self) -> list[str]:
        """Qualified names (as in `named_modules()`) of the residual modules, in forward order."""
        return [name for name, m in self.named_modules() if isinstance(m, self.residual_block_types)]


def residual_module_by_index(model: nn.Module, i: int, one_based: bool = True) -> str:
    """Name of the i-th residual module of `model` (1-based by default, as the paper counts).

    The paper's Table 5 pairs "ResNet modules 4, 12 and 48" of ResNet-152: with 1-based indices
    into [3, 8, 36, 3] blocks these are the first blocks of stages 2, 3 and 4.
    """
    if not hasattr(model, "residual_module_names"):
        raise TypeError(f"{type(model).__name__} has no residual_module_names()")
    names: list[str] = model.residual_module_names()
    idx = i - 1 if one_based else i
    if not 0 <= idx < len(names):
        base = "1-based" if one_based else "0-based"
        lo, hi = (1, len(names)) if one_based else (0, len(names) - 1)
        raise IndexError(f"residual module {i} ({base}) out of range [{lo}, {hi}] for {type(model).__name__}")
    return names[idx]
