"""The pyautoattack runners: Square (with its query budget) and AutoAttack standard."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from esq_lightning.attacks.spec import Params

__all__ = ["run_autoattack", "run_square", "square_queries"]


def _aa_norm(norm: str) -> str:
    return {"linf": "Linf", "l2": "L2"}[norm]


def run_square(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    from pyautoattack.square import SquareAttack

    attack = SquareAttack(
        model,
        norm=_aa_norm(p["norm"]),
        n_queries=p["n_queries"],
        eps=eps,
        p_init=p["p_init"],
        n_restarts=p["restarts"],
        seed=p["seed"],
        verbose=False,
        loss=p["loss"],
        resc_schedule=p["rescale_schedule"],
        device=x.device,
    )
    with torch.no_grad():
        return attack.perturb(x, y), {}


def run_autoattack(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    from pyautoattack import AutoAttack

    adversary = AutoAttack(
        model,
        eps=eps,
        norm=_aa_norm(p["norm"]),
        version="standard",
        seed=p["seed"],
        device=x.device,
    )
    # AutoAttack's own checks (its flags_doc.md) warn with warnings.warn: keep them as its flags.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=p["batch_size"])
    aa_flags = sorted(
        {
            str(w.message)
            for w in caught
            if w.category is Warning or issubclass(w.category, Warning) and "autoattack" in str(w.filename).lower()
        }
    )
    return x_adv, {
        "flags": aa_flags,
        "version": "standard",
        "attacks_run": list(adversary.attacks_to_run),
        "apgd_steps": adversary.apgd.n_iter,
        "apgd_targets": adversary.apgd_targeted.n_target_classes,
        "fab_targets": adversary.fab.n_target_classes,
        "square_queries": adversary.square.n_queries,
    }


def square_queries(record: Mapping[str, Any]) -> dict[str, Any]:
    q = int(record["n_queries"])
    return {"max_queries": q, "text": f"<= {q} queries per budget"}
