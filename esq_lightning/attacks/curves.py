"""Accuracy at several budgets from an attack: read off a minimum-norm attack's norms, or one budgeted run per
budget on the survivors of the smaller one (the black-box curves of esq-eval)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from esq_lightning.attacks.registry import ATTACKS
from esq_lightning.attacks.spec import MINIMUM_NORM, AttackOutput
from esq_lightning.attacks.utils import _predict, frozen_eval

__all__ = ["accuracy_at_budgets", "accuracy_curve"]


def accuracy_at_budgets(output: AttackOutput, clean_correct: Tensor, budgets: list[float]) -> list[float]:
    """Accuracy at each budget: clean-correct and (attack failed or found norm > budget).

    Exact for minimum-norm attacks at any budget. A budgeted attack only answers for its own eps
    (its x_adv says nothing about smaller budgets and under-uses larger ones): use accuracy_curve.
    """
    n = len(output.norms)
    if n == 0:
        return [math.nan for _ in budgets]
    clean_correct = clean_correct.to(output.norms.device).bool()
    if output.params.get("kind") == MINIMUM_NORM:
        return [(clean_correct & (output.norms > b)).float().mean().item() for b in budgets]
    eps = output.params.get("eps")
    if any(eps is None or not math.isclose(b, eps, rel_tol=1e-6, abs_tol=1e-9) for b in budgets):
        raise ValueError(
            f"budgeted attack {output.params.get('attack')!r} ran at eps={eps}: it gives accuracy "
            "at that budget only; use accuracy_curve for several budgets"
        )
    return [(clean_correct & output.correct).float().mean().item() for _ in budgets]


def accuracy_curve(
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    budgets: list[float],
    **params: Any,
) -> tuple[list[float], dict[str, Any]]:
    """Accuracy at each budget (e.g. L2 0..4 for the black-box curves) and the parameter record.

    Minimum-norm attacks run once. Budgeted attacks run once per budget in increasing order, each
    only on the samples that survived the previous budget: an adversarial within a smaller ball is
    one within a larger ball, so this is sound and saves queries. Budget 0 is clean accuracy.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid names: {', '.join(ATTACKS)}")
    spec = ATTACKS[name]
    if not budgets:
        return [], {}
    if spec.kind == MINIMUM_NORM:
        out = spec(None, **params)(model, x, y)
        record = {**out.params, "eps": None, "budgets": list(budgets)}
        return accuracy_at_budgets(out, out.clean_correct, budgets), record
    order = sorted(range(len(budgets)), key=lambda i: budgets[i])
    with torch.no_grad(), frozen_eval(model):
        robust = _predict(model, x) == y
    accuracies = [0.0] * len(budgets)
    record = spec(max(budgets), **params).record(len(x))
    runtime = 0.0
    for i in order:
        b = budgets[i]
        idx = robust.nonzero().squeeze(1)
        if b > 0 and idx.numel():
            out = spec(b, **params)(model, x[idx], y[idx])
            robust[idx] = out.correct.to(robust.device)
            record.update({k: v for k, v in out.params.items() if k not in ("eps", "n_inputs")})
            runtime += out.params["runtime_s"]
        accuracies[i] = robust.float().mean().item() if len(robust) else math.nan
    record["eps"] = None
    record["runtime_s"] = round(runtime, 3)
    record["budgets"] = list(budgets)
    record["n_inputs"] = len(x)
    return accuracies, record
