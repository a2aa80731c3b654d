"""Attack losses for the one in-house PGD: each maps (logits, y) to a scalar to maximise, summed over the batch.

Summed, not averaged, so per-sample gradients do not shrink with the batch size. Cross-entropy saturates when
the logits are large (softmax = one-hot in float32, input gradient exactly zero); the margin (Carlini & Wagner
2017) and the difference-of-logits ratio (DLR, Croce & Hein 2020) do not: the margin's gradient does not vanish
with the logit scale, and DLR is invariant to it (a shift and a positive scale of the logits leave it unchanged).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]

LOSSES = ("ce", "margin", "dlr")


def ce_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy."""
    return F.cross_entropy(logits, y, reduction="sum")


def _true_and_best_other(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return true, other


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """C&W margin, summed: max_{j != y} z_j - z_y (positive once misclassified)."""
    true, other = _true_and_best_other(logits, y)
    return (other - true).sum()


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Untargeted DLR, summed: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12); needs >= 3 classes."""
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    true, other = _true_and_best_other(logits, y)
    top = logits.sort(dim=1, descending=True).values
    return (-(true - other) / (top[:, 0] - top[:, 2] + 1e-12)).sum()


def targeted_margin_loss(target: Tensor) -> LossFn:
    """z_t - z_y towards a fixed target class t per sample (multi-targeted PGD), summed."""

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        t = target.to(logits.device)
        return (logits.gather(1, t[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)).sum()

    return loss


def temperature_scaled(loss_fn: LossFn, temperature: Tensor) -> LossFn:
    """loss_fn on logits / T (PGD++, Gupta & Ajanthan 2022): a large T un-saturates the softmax of CE.

    `temperature` is a scalar or one value per sample (shape (batch,)).
    """

    def loss(logits: Tensor, y: Tensor) -> Tensor:
        t = temperature.to(logits.device, logits.dtype)
        t = t.view(-1, 1) if t.dim() == 1 else t
        return loss_fn(logits / t, y)

    return loss


def auto_temperature(logits: Tensor, target_std: float = 10.0) -> Tensor:
    """Per-sample temperature giving the clean logits a standard deviation of `target_std` over the classes.

    Invariant to the logit scale: logits scaled by 1000 get 1000 times the temperature, so the scaled
    softmax is the same; a normally trained model (logit std about 5-15) is left near T = 1. A
    simplification of PGD++'s Jacobian-based scaling (unit std was too flat: CE then follows the mean logit).
    """
    return (logits.detach().float().std(dim=1) / target_std).clamp_min(1e-12)


def get_loss(name: str) -> LossFn:
    """The loss named `ce`, `margin` or `dlr`."""
    table = {"ce": ce_loss, "margin": margin_loss, "dlr": dlr_loss}
    if name not in table:
        raise ValueError(f"unknown attack loss {name!r}; allowed: {', '.join(LOSSES)}")
    return table[name]
