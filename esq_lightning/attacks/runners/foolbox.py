"""The foolbox runners: DDN, Carlini-Wagner L2, the Boundary attack (with its query budget)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from esq_lightning.attacks.spec import Params
from esq_lightning.attacks.utils import _per_sample, _predict

__all__ = ["boundary_queries", "run_boundary", "run_cw", "run_ddn"]


def _foolbox() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import foolbox

    return foolbox


def run_ddn(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    fb = _foolbox()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
    attack = fb.attacks.DDNAttack(init_epsilon=p["init_epsilon"], steps=p["steps"], gamma=p["gamma"])
    return attack.run(fmodel, x, fb.criteria.Misclassification(y)), {}


def run_cw(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    fb = _foolbox()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
    attack = fb.attacks.L2CarliniWagnerAttack(
        binary_search_steps=p["binary_search_steps"],
        steps=p["steps"],
        stepsize=p["stepsize"],
        confidence=p["confidence"],
        initial_const=p["initial_const"],
        abort_early=p["abort_early"],
    )
    x_adv = attack.run(fmodel, x, fb.criteria.Misclassification(y))
    # foolbox returns an all-zero image where C&W found nothing; a black image is usually
    # misclassified and would pass as an "adversarial" at norm ||x||: mark it as a failure.
    failed = (x_adv.flatten(1) == 0).all(dim=1) & (x.flatten(1) != 0).any(dim=1)
    return torch.where(_per_sample(failed, x), x, x_adv), {}


def run_boundary(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    fb = _foolbox()
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=x.device)
    init = fb.attacks.LinearSearchBlendedUniformNoiseAttack(directions=p["init_directions"], steps=p["init_steps"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # we handle the failures below
        starts = init.run(fmodel, x, fb.criteria.Misclassification(y))
    with torch.no_grad():
        ok = _predict(model, starts) != y
        if not ok.all():
            # Where uniform noise never changes the class, start from the nearest input of the
            # batch that the model gives another class (the usual decision-based initialisation).
            pred = _predict(model, x)
            dist = torch.cdist(x.flatten(1), x.flatten(1))
            dist = dist.masked_fill(pred[None, :] == y[:, None], math.inf)
            nearest = dist.argmin(dim=1)
            fallback = ~ok & torch.isfinite(dist.gather(1, nearest[:, None]).squeeze(1))
            starts[fallback] = x[nearest[fallback]]
            ok = ok | fallback
    x_adv = x.clone()
    idx = ok.nonzero().squeeze(1)
    if idx.numel():
        attack = fb.attacks.BoundaryAttack(
            steps=p["steps"],
            spherical_step=p["spherical_step"],
            source_step=p["source_step"],
            source_step_convergance=p["source_step_convergence"],
            step_adaptation=p["step_adaptation"],
            update_stats_every_k=p["update_stats_every_k"],
        )
        x_adv[idx] = attack.run(fmodel, x[idx], fb.criteria.Misclassification(y[idx]), starting_points=starts[idx])
    return x_adv, {"init_failed": int((~ok).sum().item())}


def boundary_queries(record: Mapping[str, Any]) -> dict[str, Any]:
    steps, k = int(record["steps"]), max(int(record.get("update_stats_every_k", 10)), 1)
    # One query per step, one more every k steps for the spherical statistics, plus the initialisation
    # (up to init_directions noise draws and init_steps of line search).
    bound = steps + math.ceil(steps / k) + int(record["init_directions"]) + int(record["init_steps"])
    return {"steps": steps, "max_queries": bound, "text": f"{steps} steps, <= {bound} queries"}
