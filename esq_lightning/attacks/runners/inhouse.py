"""The in-house runners: FGSM, PGD with restarts, N Attack; the PGD parameter ranges, N Attack's query budget."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from esq_lightning.attacks.nattack import nattack
from esq_lightning.attacks.pgd import pgd
from esq_lightning.attacks.spec import ParamRange, Params, count, positive
from esq_lightning.attacks.utils import _generator, _predict

__all__ = ["PGD_RANGES", "nattack_queries", "run_fgsm", "run_nattack", "run_pgd"]

# The parameters of the in-house PGD (the table in attacks/registry.py and attacks/adaptive.py).
PGD_RANGES: dict[str, ParamRange] = {
    "steps": count(),
    "step_size": positive(),
    "step_fraction": positive(),
    "restarts": count(),
}


def run_fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    assert eps is not None
    x_adv = pgd(model, x, y, eps=eps, step_size=eps, steps=1, norm=p["norm"], random_start=False)
    return x_adv, {"steps": 1, "step_size": eps, "random_start": False}


def run_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    """PGD with restarts: a sample is robust only if it survives every restart."""
    assert eps is not None
    generator = _generator(p["seed"])
    # An absolute step_size when given, else a fraction of eps (the threat model decides the step).
    step_size = p["step_size"] if p.get("step_size") is not None else p["step_fraction"] * eps
    x_adv = x.clone()
    remaining = torch.arange(len(x), device=x.device)
    for _ in range(p["restarts"]):
        if remaining.numel() == 0:
            break
        found = pgd(
            model,
            x[remaining],
            y[remaining],
            eps=eps,
            step_size=step_size,
            steps=p["steps"],
            norm=p["norm"],
            random_start=p["random_start"],
            generator=generator,
        )
        x_adv[remaining] = found
        with torch.no_grad():
            still = _predict(model, found) == y[remaining]
        remaining = remaining[still]
    return x_adv, {"step_size": step_size}


def run_nattack(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    assert eps is not None
    x_adv, queries = nattack(
        model,
        x,
        y,
        eps=eps,
        norm=p["norm"],
        max_iter=p["max_iter"],
        population=p["population"],
        sigma=p["sigma"],
        lr=p["lr"],
        generator=_generator(p["seed"], x.device),
    )
    q = queries.float()
    return x_adv, {
        "max_queries": 1 + p["max_iter"] * (p["population"] + 1),
        "queries_mean": round(q.mean().item(), 1) if len(q) else 0.0,
        "queries_max": int(queries.max().item()) if len(q) else 0,
    }


def nattack_queries(record: Mapping[str, Any]) -> dict[str, Any]:
    q = int(record.get("max_queries", 1 + int(record["max_iter"]) * (int(record["population"]) + 1)))
    return {
        "max_iter": int(record["max_iter"]),
        "population": int(record["population"]),
        "max_queries": q,
        "text": f"<= {q} queries per budget",
    }
