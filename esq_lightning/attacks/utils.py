"""Shared attack plumbing: eval-mode/frozen-parameter context, per-sample norms, gradient check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

NORMS = ("linf", "l2")


class GradientCheckError(RuntimeError):
    """The model gives zero or non-finite input gradients: a gradient attack would fail silently."""


def canonical_norm(norm: str) -> str:
    """Map 'Linf', 'inf', 'L2', '2' and friends to 'linf' or 'l2'."""
    key = str(norm).lower().replace("_", "").replace(" ", "")
    if key in ("linf", "inf", "l_inf", "infinity"):
        return "linf"
    if key in ("l2", "2"):
        return "l2"
    raise ValueError(f"unsupported norm {norm!r}: use one of {NORMS}")


def perturbation_norms(x_adv: Tensor, x: Tensor, norm: str) -> Tensor:
    """Per-sample L_inf or L2 norm of x_adv - x, shape (batch,)."""
    delta = (x_adv - x).flatten(1)
    if canonical_norm(norm) == "linf":
        return delta.abs().amax(dim=1)
    return delta.norm(p=2, dim=1)


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and requires_grad=False on every parameter for the duration; restored afterwards.

    Each module's own flag is restored (not model.train(previous)), so a caller that keeps some
    submodules in eval mode on purpose gets exactly its own state back.
    """
    modes = [(m, m.training) for m in model.modules()]
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        model.eval()
        for p in frozen:
            p.requires_grad_(False)
        yield model
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Autograd on even under torch.no_grad() or torch.inference_mode() (Lightning validation)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def as_autograd_input(t: Tensor) -> Tensor:
    """A plain detached copy usable by autograd (inference tensors cannot be saved for backward)."""
    return t.clone() if t.is_inference() else t.detach()


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample logit margin z_y - max_{j != y} z_j (negative means misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    return true - other


def check_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    max_samples: int = 128,
    max_bad_fraction: float = 0.5,
) -> None:
    """Raise GradientCheckError when the input gradient is zero or non-finite for most of the batch.

    The gradient of the logit margin is used rather than that of cross-entropy because a very
    confident but healthy model saturates the softmax (exactly zero CE gradient in float32), while
    the margin has a non-zero gradient wherever a differentiable path from input to logits exists:
    a rounding op without a straight-through estimator is what this is meant to catch. Call it with
    the model already in the state it will be attacked in (eval mode).
    """
    n = min(len(x), max_samples)
    with grad_enabled():
        xs = as_autograd_input(x[:n]).requires_grad_(True)
        ys = as_autograd_input(y[:n])
        logits = model(xs)
        if not logits.requires_grad:
            raise GradientCheckError(
                "the model output does not depend on its input through autograd (no grad_fn): "
                "gradient attacks would fail silently; attack through a straight-through path"
            )
        (grad,) = torch.autograd.grad(margin(logits, ys).sum(), xs, allow_unused=True)
    if grad is None:
        raise GradientCheckError("the logits have no gradient path to the input: gradient attacks would fail silently")
    g = grad.detach().flatten(1)
    nonfinite = ~torch.isfinite(g).all(dim=1)
    zero = g.abs().amax(dim=1) == 0
    bad = (nonfinite | zero).float().mean().item()
    if bad > max_bad_fraction:
        raise GradientCheckError(
            f"input gradient is zero for {zero.float().mean().item():.0%} and non-finite for "
            f"{nonfinite.float().mean().item():.0%} of {n} samples: a gradient attack would fail "
            "silently (rounding without a straight-through estimator? saturated activations?)"
        )


def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(dim=1)


def _per_sample(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    # CPU by default: the same draws whatever the accelerator. N Attack draws population x input
    # size normals per iteration and would spend its time copying them, so it draws on x's device.
    return torch.Generator(device=device).manual_seed(int(seed))
