"""Batched, vectorized augmentation on image tensors (random crop with zero padding, horizontal flip)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(
    x: torch.Tensor, padding: int, generator: torch.Generator | None = None, flip: bool = True
) -> torch.Tensor:
    """Random crop of the zero-padded batch back to its size, then a random horizontal flip.

    Every sample gets its own offset (uniform in [0, 2*padding] on each axis) and, if `flip`, a
    coin flip. One gather for the whole batch: no per-sample Python loop. The random numbers are
    drawn on the generator's device (CPU when None is given, from the global RNG) and moved to
    x's device, so a CPU generator gives the same augmentation on any device.

    Args:
        x: (B, C, H, W) batch.
        padding: zero padding on each side before cropping; 0 disables cropping.
        generator: source of randomness; None uses the global CPU generator.
        flip: whether to flip each sample horizontally with probability 0.5.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    rng_device = generator.device if generator is not None else torch.device("cpu")
    off_i = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=rng_device)
    off_j = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=rng_device)
    flips = torch.rand(b, generator=generator, device=rng_device) < 0.5
    if not flip:
        flips = torch.zeros_like(flips)
    off_i, off_j, flips = off_i.to(x.device), off_j.to(x.device), flips.to(x.device)

    xp = F.pad(x, (padding, padding, padding, padding)) if padding > 0 else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = off_i[:, None] + ar_h[None, :]  # (B, H)
    # Flipping is reading the crop's columns in reverse order, so crop and flip share one gather.
    cols = off_j[:, None] + torch.where(flips[:, None], (w - 1 - ar_w)[None, :], ar_w[None, :])  # (B, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class CropFlip:
    """`random_crop_flip` with fixed settings, callable as `augment_fn(x, generator)` by TensorBatchLoader."""

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        self.padding = padding
        self.flip = flip

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_crop_flip(x, self.padding, generator, self.flip)

    def __repr__(self) -> str:
        return f"CropFlip(padding={self.padding}, flip={self.flip})"
