"""In-house PGD and FGSM (L_inf, L2): fast enough for the training loop, safe under Lightning."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from esq_lightning.attacks.losses import get_loss
from esq_lightning.attacks.utils import (
    GradientCheckError,
    as_autograd_input,
    canonical_norm,
    check_gradients,
    frozen_eval,
    grad_enabled,
)
from esq_lightning.quant.modules import frozen_quant_weights

__all__ = ["pgd", "fgsm", "check_gradients", "GradientCheckError"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _ce_sum(logits: Tensor, y: Tensor) -> Tensor:
    # Summed, not averaged: per-sample gradients do not shrink with the batch size, which keeps
    # small gradients away from float32 underflow; sign / per-sample normalisation ignore scale.
    return F.cross_entropy(logits, y, reduction="sum")


def _view_per_sample(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _random_start(x: Tensor, eps: float, norm: str, generator: torch.Generator | None) -> Tensor:
    """Uniform in the L_inf ball (per coordinate) or uniform in the volume of the L2 ball."""
    gen_device = generator.device if generator is not None else x.device
    shape, n, d = x.shape, x.shape[0], x[0].numel()
    if norm == "linf":
        u = torch.rand(shape, generator=generator, device=gen_device, dtype=x.dtype)
        delta = (2 * u - 1) * eps
    else:
        # Gaussian direction, radius eps * U^(1/d): uniform over the ball's volume.
        direction = torch.randn((n, d), generator=generator, device=gen_device, dtype=x.dtype)
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        radius = torch.rand((n, 1), generator=generator, device=gen_device, dtype=x.dtype)
        delta = (direction * eps * radius.pow(1.0 / d)).view(shape)
    # Drawn on the generator's device (a CPU generator keeps training reproducible from (seed,
    # step) whatever the accelerator), then moved; from pinned memory the copy needs no host sync.
    if x.device.type == "cuda" and delta.device.type == "cpu":
        return delta.pin_memory().to(x.device, non_blocking=True)
    return delta.to(x.device)


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    norms = delta.flatten(1).norm(dim=1)
    factor = (eps / norms.clamp_min(1e-12)).clamp(max=1.0)
    return delta * _view_per_sample(factor, delta)


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    loss_fn: LossFn | str | None = None,
    generator: torch.Generator | None = None,
    keep_best: bool = False,
) -> Tensor:
    """Untargeted PGD maximising loss_fn(model(x_adv), y) within the eps-ball and the [0, 1] box.

    L_inf steps by step_size * sign(grad); L2 steps by step_size * grad / ||grad||_2 per sample and
    projects onto the L2 ball. The random start is uniform in the L_inf ball, or uniform in the
    volume of the L2 ball, drawn with `generator` when given. loss_fn defaults to the summed
    cross-entropy; pass a closure that ignores y for TRADES (KL to the clean prediction), or a name
    of esq_lightning.attacks.losses (`ce`, `margin`, `dlr`) for the evaluation attacks.

    keep_best (evaluation): return, per sample, the first iterate the model misclassifies (as y), or
    the last iterate where none is; the check reuses the logits of each step, so costs nothing. The
    default (False) returns the last iterate, as training always has.

    The model is attacked in eval mode with frozen parameters (BatchNorm uses and keeps its running
    statistics; parameter .grad is untouched) and every module's mode is restored afterwards. Works
    under torch.no_grad() and torch.inference_mode(). Returns a detached tensor.
    """
    norm = canonical_norm(norm)
    if eps < 0 or steps < 0:
        raise ValueError(f"eps and steps must be non-negative, got eps={eps}, steps={steps}")
    if isinstance(loss_fn, str):
        loss_fn = get_loss(loss_fn)
    loss_fn = _ce_sum if loss_fn is None else loss_fn
    with grad_enabled():
        x0 = as_autograd_input(x)
        y0 = as_autograd_input(y)
        if random_start and eps > 0:
            x_adv = (x0 + _random_start(x0, eps, norm, generator)).clamp(0.0, 1.0)
        else:
            x_adv = x0.clone()
        if steps == 0:
            return x_adv.detach()
        best = found = None
        # Weights cannot change during the attack: quantized layers quantize once, not on every step.
        with frozen_eval(model), frozen_quant_weights(model):
            for _ in range(steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                if keep_best:
                    best, found = _keep_first_fooled(best, found, x_adv, logits, y0)
                loss = loss_fn(logits, y0)
                # Gradient w.r.t. the input only: nothing accumulates in parameter .grad.
                (grad,) = torch.autograd.grad(loss, x_adv)
                with torch.no_grad():
                    if norm == "linf":
                        step = grad.sign()
                    else:
                        g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
                        step = grad / _view_per_sample(g_norm, grad)
                    delta = _project(x_adv + step_size * step - x0, eps, norm)
                    x_adv = (x0 + delta).clamp(0.0, 1.0)
            if keep_best:
                with torch.no_grad():
                    best, found = _keep_first_fooled(best, found, x_adv, model(x_adv), y0)
                x_adv = torch.where(_view_per_sample(found, x_adv), best, x_adv)
    return x_adv.detach()


def _keep_first_fooled(
    best: Tensor | None, found: Tensor | None, x_adv: Tensor, logits: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    """Remember, per sample, the first iterate whose prediction is not y."""
    with torch.no_grad():
        fooled = logits.detach().argmax(dim=1) != y
        if best is None or found is None:
            return x_adv.detach().clone(), fooled
        new = fooled & ~found
        best = torch.where(_view_per_sample(new, best), x_adv.detach(), best)
        return best, found | fooled


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """Fast gradient (sign) method: one step of size eps, no random start (L2: normalised step)."""
    return pgd(model, x, y, eps=eps, step_size=eps, steps=1, norm=norm, random_start=False)
