"""Activation pairing: capture module outputs with forward hooks, and the pairing loss sum_l lambda_l D_l."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from esq_lightning.pairing.distances import LOGITS, pairing_distance


def valid_pairing_names(model: nn.Module) -> list[str]:
    """Names that can be paired: `logits`, the model's residual modules, then every other named module."""
    residual = list(model.residual_module_names()) if hasattr(model, "residual_module_names") else []
    others = [n for n, _ in model.named_modules() if n and n not in residual]
    return [LOGITS, *residual, *others]


def check_pairing_names(model: nn.Module, names: Sequence[str], key: str = "pairing.layers") -> None:
    """Fail before training when a pairing name is not a module of the model."""
    modules = dict(model.named_modules())
    for name in names:
        if name != LOGITS and name not in modules:
            residual = list(model.residual_module_names()) if hasattr(model, "residual_module_names") else []
            shown = ", ".join([LOGITS, *residual])
            raise ValueError(
                f"{key}: unknown module '{name}' for {type(model).__name__}; valid names are {shown}"
                " (or any name in model.named_modules())"
            )


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps the model; hooks must go on the original modules.
    return getattr(model, "_orig_mod", model)


@contextmanager
def capture_activations(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of the named modules during the forward passes inside the block.

    The hooks are removed on exit, and only the requested outputs are kept alive.
    `logits` is not hooked: callers add the model output themselves.
    """
    store: dict[str, Tensor] = {}
    modules = dict(_unwrap(model).named_modules())
    handles = []
    for name in names:
        if name == LOGITS:
            continue

        def hook(_module: nn.Module, _inputs: tuple, output: Tensor, _name: str = name) -> None:
            store[_name] = output

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def forward_with_activations(model: nn.Module, x: Tensor, names: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward pass returning the logits and the outputs of the named modules (`logits` included)."""
    with capture_activations(model, names) as acts:
        logits = model(x)
    out = dict(acts)
    if LOGITS in names:
        out[LOGITS] = logits
    return logits, out


def pairing_loss(
    clean: dict[str, Tensor],
    adv: dict[str, Tensor],
    names: Sequence[str],
    lambdas: Sequence[float],
    p: int = 2,
    distance: str | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_l lambda_l * D_l over the paired layers (D_l: `distance`, default relative_l{p}); also returns each D_l."""
    terms = {name: pairing_distance(clean[name], adv[name], p, distance) for name in names}
    total = torch.zeros((), device=next(iter(terms.values())).device) if terms else torch.zeros(())
    for name, lam in zip(names, lambdas):
        total = total + lam * terms[name]
    return total, terms
