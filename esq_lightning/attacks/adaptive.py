"""Evaluation attacks that do not trust the loss scale, all on the one in-house PGD (attacks/pgd.py).

- pgd_margin, pgd_dlr: PGD on the C&W margin / the DLR loss (no softmax to saturate);
- pgd_mt: multi-targeted PGD, a targeted margin run against each of the top-k other classes;
- pgd_pp: PGD++ (Gupta & Ajanthan 2022), cross-entropy on temperature-scaled logits;
- pgd_pairing: maximises the model's own ESQ terms, CE + sum_l lambda_l * D_l at its paired layers;
- pgd_schedule: several step sizes (fractions of eps) x losses x restarts, hundreds of steps (thorough budget).

Every one is budgeted (L_inf or L2 at eps), takes step sizes as fractions of eps unless given an absolute
step_size, and counts a sample robust only if it survives every restart, target and configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from esq_lightning.attacks.losses import (
    LOSSES,
    LossFn,
    auto_temperature,
    get_loss,
    targeted_margin_loss,
    temperature_scaled,
)
from esq_lightning.attacks.pgd import pgd
from esq_lightning.attacks.runners.inhouse import PGD_RANGES
from esq_lightning.attacks.spec import ADAPTIVE, BUDGETED, SCALE_FREE, AttackSpec, Params, count
from esq_lightning.attacks.utils import _generator, _predict
from esq_lightning.pairing import check_pairing_names, forward_with_activations, get_distance, resolve_distance

# (indices of the samples still robust) -> the loss for that subset
LossFactory = Callable[[Tensor], LossFn]


def step_size_of(p: Mapping[str, Any], eps: float) -> float:
    """An absolute step_size when given, else step_fraction * eps (2/255 at 8/255 is eps / 4)."""
    if p.get("step_size") is not None:
        return float(p["step_size"])
    return float(p.get("step_fraction", 0.25)) * float(eps)


def pgd_restarts(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    p: Mapping[str, Any],
    loss: LossFactory,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    remaining: Tensor | None = None,
    x_adv: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """p["restarts"] runs of PGD on the samples not yet fooled; returns (x_adv, indices still robust)."""
    generator = _generator(p.get("seed", 0)) if generator is None else generator
    x_adv = x.clone() if x_adv is None else x_adv
    remaining = torch.arange(len(x), device=x.device) if remaining is None else remaining
    step = step_size_of(p, eps) if step_size is None else step_size
    for _ in range(int(p.get("restarts", 1))):
        if remaining.numel() == 0:
            break
        found = pgd(
            model,
            x[remaining],
            y[remaining],
            eps=eps,
            step_size=step,
            steps=int(p["steps"]),
            norm=p["norm"],
            random_start=bool(p.get("random_start", True)),
            loss_fn=loss(remaining),
            generator=generator,
            keep_best=True,
        )
        x_adv[remaining] = found
        with torch.no_grad():
            still = _predict(model, found) == y[remaining]
        remaining = remaining[still]
    return x_adv, remaining


def _fixed(loss_fn: LossFn) -> LossFactory:
    return lambda _idx: loss_fn


def _run_loss_pgd(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    assert eps is not None
    x_adv, _ = pgd_restarts(model, x, y, eps, p, _fixed(get_loss(p["loss"])))
    return x_adv, {"step_size": step_size_of(p, eps)}


def _run_pgd_pp(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    assert eps is not None
    with torch.no_grad():
        logits = model(x)
    if p["temperature"] == "auto":
        temps = auto_temperature(logits)
    else:
        temps = torch.full((len(x),), float(p["temperature"]), device=x.device)
    base = get_loss(p["loss"])
    x_adv, _ = pgd_restarts(model, x, y, eps, p, lambda idx: temperature_scaled(base, temps[idx]))
    return x_adv, {
        "step_size": step_size_of(p, eps),
        "temperature_mean": round(float(temps.mean().item()), 6) if len(temps) else None,
    }


def _run_multitargeted(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    assert eps is not None
    with torch.no_grad():
        logits = model(x)
    k = min(int(p["targets"]), logits.shape[1] - 1)
    # Other classes by the clean logits, most likely first.
    ranked = logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)[:, :k]
    generator = _generator(p["seed"])
    x_adv, remaining = x.clone(), torch.arange(len(x), device=x.device)
    for i in range(k):
        target = ranked[:, i]
        x_adv, remaining = pgd_restarts(
            model,
            x,
            y,
            eps,
            p,
            lambda idx, t=target: targeted_margin_loss(t[idx]),
            generator=generator,
            remaining=remaining,
            x_adv=x_adv,
        )
    return x_adv, {"step_size": step_size_of(p, eps), "targets": k}


class _Probe(nn.Module):
    """The model, recording the outputs of the paired layers on every forward pass."""

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.layers = list(layers)
        self.last: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        logits, acts = forward_with_activations(self.model, x, self.layers)
        self.last = acts
        return logits


def _run_pairing(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    assert eps is not None
    layers, lambdas = list(p["layers"]), [float(v) for v in p["lambdas"]]
    if len(layers) != len(lambdas):
        raise ValueError(f"pgd_pairing: {len(layers)} layers but {len(lambdas)} lambdas")
    check_pairing_names(model, layers, key="eval.params.pgd_pairing.layers")
    # The distance the checkpoint was trained with (pairing.distance; the older pairing.p spelling too).
    distance = get_distance(resolve_distance(p.get("distance"), p.get("p"), key="eval.params.pgd_pairing")).fn
    with torch.no_grad():
        _, clean = forward_with_activations(model, x, layers)
        clean = {k: v.detach() for k, v in clean.items()}
    probe = _Probe(model, layers)
    ce = get_loss(p.get("loss", "ce"))

    def factory(idx: Tensor) -> LossFn:
        def loss(logits: Tensor, yb: Tensor) -> Tensor:
            total = ce(logits, yb)
            n = len(yb)
            for name, lam in zip(layers, lambdas):
                # D_l is a batch mean: times n, a sum, so per-sample gradients do not shrink with the batch.
                total = total + lam * n * distance(clean[name][idx], probe.last[name])
            return total

        return loss

    x_adv, _ = pgd_restarts(probe, x, y, eps, p, factory)
    return x_adv, {"step_size": step_size_of(p, eps)}


def _run_schedule(model: nn.Module, x: Tensor, y: Tensor, eps: float | None, p: Params) -> tuple[Tensor, Params]:
    assert eps is not None
    generator = _generator(p["seed"])
    x_adv, remaining = x.clone(), torch.arange(len(x), device=x.device)
    for loss_name in p["losses"]:
        for fraction in p["step_fractions"]:
            x_adv, remaining = pgd_restarts(
                model,
                x,
                y,
                eps,
                p,
                _fixed(get_loss(loss_name)),
                step_size=float(fraction) * eps,
                generator=generator,
                remaining=remaining,
                x_adv=x_adv,
            )
    return x_adv, {"runs": len(p["losses"]) * len(p["step_fractions"]) * int(p["restarts"])}


def _pgd_defaults(**kw: Any) -> dict[str, Any]:
    return {
        "norm": "linf",
        "steps": 100,
        "step_size": None,
        "step_fraction": 0.25,
        "random_start": True,
        "restarts": 1,
        "seed": 0,
        **kw,
    }


def _spec(name: str, runner: Any, defaults: dict[str, Any], description: str, title: str, **kw: Any) -> AttackSpec:
    return AttackSpec(
        name=name,
        kind=BUDGETED,
        norm="linf",
        library="esq_lightning",
        gradient_based=True,
        default_eps=8 / 255,
        defaults=defaults,
        runner=runner,
        description=description,
        family=ADAPTIVE,
        title=title,
        **{"ranges": PGD_RANGES, **kw},
    )


ADAPTIVE_ATTACKS: dict[str, AttackSpec] = {
    s.name: s
    for s in [
        _spec(
            "pgd_margin",
            _run_loss_pgd,
            _pgd_defaults(loss="margin"),
            "PGD on the C&W margin loss (no softmax: does not saturate with the logit scale).",
            "PGD-margin",
            loss=SCALE_FREE,
        ),
        _spec(
            "pgd_dlr",
            _run_loss_pgd,
            _pgd_defaults(loss="dlr"),
            "PGD on the DLR loss (Croce & Hein 2020): invariant to shift and scale of the logits.",
            "PGD-DLR",
            loss=SCALE_FREE,
        ),
        _spec(
            "pgd_mt",
            _run_multitargeted,
            _pgd_defaults(targets=3),
            "Multi-targeted PGD: a targeted margin run against each of the top-k other classes.",
            "PGD-MT",
            ranges={**PGD_RANGES, "targets": count()},
        ),
        _spec(
            "pgd_pp",
            _run_pgd_pp,
            _pgd_defaults(loss="ce", temperature="auto"),
            "PGD++ (Gupta & Ajanthan 2022): CE on logits / T; T 'auto' gives clean logits std 10.",
            "PGD++",
        ),
        _spec(
            "pgd_pairing",
            _run_pairing,
            _pgd_defaults(loss="ce", layers=["logits"], lambdas=[1.0], p=None, distance="relative_l2"),
            "Pairing-adaptive PGD: CE + sum_l lambda_l * D_l at the model's own paired layers.",
            "PGD-pairing",
        ),
        _spec(
            "pgd_schedule",
            _run_schedule,
            _pgd_defaults(steps=200, restarts=5, losses=["ce", "margin", "dlr"], step_fractions=[0.5, 0.25, 0.1]),
            "Step-size x loss x restarts schedule of PGD (thorough budget).",
            "PGD-schedule",
        ),
    ]
}


def pairing_attack_params(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """pgd_pairing's layers, lambdas, p and distance from a run's config (an ESQ model's own pairing).

    Models not trained with pairing (method != esq) are attacked at the logits with lambda 1.
    """
    config = config or {}
    method = (config.get("method") or {}).get("name")
    pairing = config.get("pairing") or {}
    if method != "esq" or not list(pairing.get("layers") or []):
        return {}
    out: dict[str, Any] = {
        "layers": [str(v) for v in pairing["layers"]],
        "lambdas": [float(v) for v in pairing.get("lambdas") or []],
        "p": None,
        "distance": resolve_distance(pairing.get("distance"), pairing.get("p")),
    }
    return out


def check_losses(names: Sequence[str]) -> None:
    for name in names:
        if name not in LOSSES:
            raise ValueError(f"unknown attack loss {name!r}; allowed: {', '.join(LOSSES)}")
