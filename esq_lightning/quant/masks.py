"""The pruning state of one layer: a keep mask (buffer `prune_mask`) and, while HYDRA trains them, scores (`prune_scores`).

Every Conv2d / Linear of a pruned model carries a bool buffer `prune_mask` (True = kept), saved with the
weights. The weight a layer uses is `pruned_weight(layer)`: the dense weight with the pruned entries set to
0, or, while importance scores are trained (HYDRA), the weight times the top-k mask of |scores| with a
straight-through gradient to the scores. Quantized layers (quant/modules.py) quantize that weight over its
kept entries only; plain layers are swapped to PrunedConv2d / PrunedLinear, whose state_dict is the plain
layer's plus the mask.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MASK",
    "SCORES",
    "PrunedConv2d",
    "PrunedLinear",
    "TopKMask",
    "has_mask",
    "keep_mask",
    "pruned_weight",
    "scores_training",
    "topk_mask",
]

MASK = "prune_mask"
SCORES = "prune_scores"


def topk_mask(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest entries of |scores| (ties broken by position: the sort is stable)."""
    flat = scores.detach().abs().reshape(-1)
    k = max(0, min(int(k), flat.numel()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k:
        mask[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return mask.reshape(scores.shape)


class TopKMask(torch.autograd.Function):
    """Forward: the float top-k mask of |scores|; backward: the gradient passes unchanged to the scores (HYDRA)."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, k: int) -> Tensor:
        return topk_mask(scores, k).to(scores.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def has_mask(layer: nn.Module) -> bool:
    return layer._buffers.get(MASK) is not None


def scores_training(layer: nn.Module) -> bool:
    """True while the layer's importance scores are trained (HYDRA's score phase)."""
    scores = layer._parameters.get(SCORES)
    return scores is not None and scores.requires_grad


def keep_mask(layer: nn.Module) -> Tensor | None:
    """The layer's current keep mask (the top-k of its scores during the score phase); None when unpruned."""
    mask = layer._buffers.get(MASK)
    if mask is None:
        return None
    if scores_training(layer):
        return topk_mask(layer._parameters[SCORES], int(mask.sum()))
    return mask


def pruned_weight(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(the weight the layer computes with, its keep mask or None).

    Fixed mask: the dense weight with pruned entries 0 (their gradient is 0 too). Score phase: weight *
    top-k(|scores|), the gradient reaching the scores as grad * weight (straight-through top-k).
    """
    w = layer.weight
    mask = layer._buffers.get(MASK)
    if mask is None:
        return w, None
    if scores_training(layer):
        m = TopKMask.apply(layer._parameters[SCORES], int(mask.sum()))
        return w * m, m.detach().to(torch.bool)
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device)), mask


class PrunedConv2d(nn.Conv2d):
    """nn.Conv2d computing with pruned_weight (state_dict: nn.Conv2d's plus `prune_mask`)."""

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, pruned_weight(self)[0], self.bias)


class PrunedLinear(nn.Linear):
    """nn.Linear computing with pruned_weight (state_dict: nn.Linear's plus `prune_mask`)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, pruned_weight(self)[0], self.bias)
