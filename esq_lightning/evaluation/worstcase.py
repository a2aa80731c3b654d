"""Per-sample worst case over the attacks of one evaluation (what AutoAttack reports over its ensemble).

An input counts as robust only if it is classified correctly on the clean input and under EVERY attack
measured at the evaluation's threat model (norm and eps). Attacks at another norm or eps (FGSM at 2x eps,
the L2 attacks at their own budget) answer a different question and never enter it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

WORST_CASE = "worst_case"


def same_threat(record: Mapping[str, Any], norm: str, eps: float) -> bool:
    """The attack of `record` ran at this norm and eps (minimum-norm attacks: their reported budget)."""
    r_eps = record.get("eps")
    if not isinstance(r_eps, (int, float)) or math.isnan(r_eps):
        return False
    return str(record.get("norm", "linf")) == norm and math.isclose(
        float(r_eps), float(eps), rel_tol=1e-6, abs_tol=1e-12
    )


def worst_case(
    clean_correct: Tensor,
    correct: Mapping[str, Tensor],
    records: Mapping[str, Mapping[str, Any]],
    norm: str,
    eps: float,
) -> dict[str, Any]:
    """{"acc": fraction correct under every attack at (norm, eps), "attacks": the attacks that entered,
    "excluded": the others, "norm", "eps", "mask": the per-sample bool tensor}.

    With no attack at the threat model, acc is None (nothing was measured there), not clean accuracy.
    """
    entered = [name for name in correct if same_threat(records.get(name, {}), norm, eps)]
    excluded = [name for name in correct if name not in entered]
    mask = clean_correct.clone().bool()
    for name in entered:
        mask &= correct[name].to(mask.device).bool()
    acc = mask.float().mean().item() if entered and len(mask) else None
    return {"acc": acc, "attacks": entered, "excluded": excluded, "norm": norm, "eps": float(eps), "mask": mask}


def worst_case_record(wc: Mapping[str, Any]) -> dict[str, Any]:
    """The json-able part of worst_case()'s result."""
    return {k: v for k, v in wc.items() if k != "mask"}


def add_worst_case(robust_acc: dict[str, float], wc: Mapping[str, Any]) -> dict[str, float]:
    """robust_acc with `worst_case` first (the headline), when it was measured."""
    if wc.get("acc") is None:
        return robust_acc
    return {WORST_CASE: float(wc["acc"]), **{k: v for k, v in robust_acc.items() if k != WORST_CASE}}


def worst_case_of_accuracies(masks: Mapping[str, Tensor]) -> float:
    """Fraction correct under every mask (helper for tests and ad-hoc use)."""
    if not masks:
        return math.nan
    stacked = torch.stack([m.bool() for m in masks.values()])
    return stacked.all(dim=0).float().mean().item()
