"""The table of evaluation attacks by name (one AttackSpec each), register / look up, run one by name.

The runners live per library in attacks/runners/, Attack (running one in eval mode with frozen parameters, every
parameter recorded) beside AttackSpec in attacks/spec.py, the config check of names and parameters in
attacks/params.py, accuracy at several budgets in attacks/curves.py.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from torch import Tensor, nn

from esq_lightning.attacks.runners.autoattack import run_autoattack, run_square, square_queries
from esq_lightning.attacks.runners.foolbox import boundary_queries, run_boundary, run_cw, run_ddn
from esq_lightning.attacks.runners.inhouse import PGD_RANGES, nattack_queries, run_fgsm, run_nattack, run_pgd
from esq_lightning.attacks.spec import (
    _PACKAGES,
    BUDGETED,
    CE,
    GRADIENT_FREE,
    ITERATIVE,
    MINIMUM_NORM,
    SINGLE_STEP,
    AttackOutput,
    AttackSpec,
    count,
    positive,
)

__all__ = [
    "ATTACKS",
    "attack_spec",
    "attack_title",
    "library_available",
    "register_attack",
    "run_attack",
    "unregister_attack",
]

# --- the registry: one AttackSpec per attack (attacks/adaptive.py registers its own) ----------------------------

ATTACKS: dict[str, AttackSpec] = {
    s.name: s
    for s in [
        AttackSpec(
            name="fgsm",
            kind=BUDGETED,
            norm="linf",
            library="esq_lightning",
            gradient_based=True,
            default_eps=16 / 255,
            defaults={"norm": "linf"},
            runner=run_fgsm,
            description="FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps.",
            family=SINGLE_STEP,
            loss=CE,
            nesting=0,
            title="FGSM",
        ),
        AttackSpec(
            name="pgd20",
            kind=BUDGETED,
            norm="linf",
            library="esq_lightning",
            gradient_based=True,
            default_eps=8 / 255,
            defaults={
                "norm": "linf",
                "steps": 20,
                "step_size": None,
                "step_fraction": 0.25,
                "random_start": True,
                "restarts": 1,
                "seed": 0,
            },
            runner=run_pgd,
            description="PGD (Madry et al. 2018), 20 steps of eps/4 (2/255 at 8/255), uniform random start.",
            family=ITERATIVE,
            loss=CE,
            nesting=1,
            title="PGD-20",
            ranges=PGD_RANGES,
        ),
        AttackSpec(
            name="pgd100",
            kind=BUDGETED,
            norm="linf",
            library="esq_lightning",
            gradient_based=True,
            default_eps=8 / 255,
            defaults={
                "norm": "linf",
                "steps": 100,
                "step_size": None,
                "step_fraction": 0.25,
                "random_start": True,
                "restarts": 5,
                "seed": 0,
            },
            runner=run_pgd,
            description="PGD, 100 steps, robust only if every random restart fails.",
            family=ITERATIVE,
            loss=CE,
            nesting=1,
            title="PGD-100",
            ranges=PGD_RANGES,
        ),
        AttackSpec(
            name="ddn",
            kind=MINIMUM_NORM,
            norm="l2",
            library="foolbox",
            gradient_based=True,
            default_eps=1.0,
            defaults={"steps": 100, "init_epsilon": 1.0, "gamma": 0.05, "seed": 0},
            runner=run_ddn,
            description="DDN (Rony et al. 2019), minimum L2 norm, foolbox.",
            family=ITERATIVE,
            title="DDN",
            ranges={"steps": count()},
        ),
        AttackSpec(
            name="cw",
            kind=MINIMUM_NORM,
            norm="l2",
            library="foolbox",
            gradient_based=True,
            default_eps=1.0,
            defaults={
                "steps": 20,
                "binary_search_steps": 9,
                "stepsize": 0.1,
                "confidence": 0.0,
                "initial_const": 1e-3,
                "abort_early": False,
                "seed": 0,
            },
            runner=run_cw,
            description="Carlini-Wagner L2 with binary search over c, minimum L2 norm, foolbox.",
            family=ITERATIVE,
            title="C&W",
            ranges={"steps": count(), "binary_search_steps": count(), "stepsize": positive()},
        ),
        AttackSpec(
            name="boundary",
            kind=MINIMUM_NORM,
            norm="l2",
            library="foolbox",
            gradient_based=False,
            default_eps=None,
            defaults={
                "steps": 25000,
                "spherical_step": 1e-2,
                "source_step": 1e-2,
                "source_step_convergence": 1e-7,
                "step_adaptation": 1.5,
                "update_stats_every_k": 10,
                "init_directions": 1000,
                "init_steps": 1000,
                "seed": 0,
            },
            runner=run_boundary,
            description="Boundary attack (Brendel et al. 2018), decision-based, min L2, foolbox.",
            family=GRADIENT_FREE,
            title="Boundary",
            query_budget=boundary_queries,
            plot_style="-",
            ranges={"steps": count()},
        ),
        AttackSpec(
            name="nattack",
            kind=BUDGETED,
            norm="l2",
            library="esq_lightning",
            gradient_based=False,
            default_eps=None,
            defaults={"norm": "l2", "max_iter": 500, "population": 300, "sigma": 0.1, "lr": 0.02, "seed": 0},
            runner=run_nattack,
            description="N Attack (Li et al. 2019), score-based NES, budgeted, in-house.",
            family=GRADIENT_FREE,
            title="N Attack",
            query_budget=nattack_queries,
            plot_style="--",
            ranges={"max_iter": count(), "population": count()},
        ),
        AttackSpec(
            name="square",
            kind=BUDGETED,
            norm="linf",
            library="pyautoattack",
            gradient_based=False,
            default_eps=8 / 255,
            defaults={
                "norm": "linf",
                "n_queries": 5000,
                "p_init": 0.8,
                "restarts": 1,
                "loss": "margin",
                "rescale_schedule": True,
                "seed": 0,
            },
            runner=run_square,
            description="Square attack (Andriushchenko et al. 2020), score-based, pyautoattack.",
            family=GRADIENT_FREE,
            title="Square",
            query_budget=square_queries,
            ranges={"n_queries": count(), "restarts": count()},
        ),
        AttackSpec(
            name="autoattack",
            kind=BUDGETED,
            norm="linf",
            library="pyautoattack",
            gradient_based=True,
            default_eps=8 / 255,
            defaults={"norm": "linf", "batch_size": 500, "seed": 0},
            runner=run_autoattack,
            description="AutoAttack standard (Croce & Hein 2020): APGD-CE, APGD-T, FAB-T, Square.",
            family=ITERATIVE,
            nesting=2,
            title="AutoAttack",
        ),
    ]
}


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Add an attack to the registry: esq-eval, the masking report, the checks, esq-report and the config check
    see it at once. A name already taken is refused (unregister_attack it first)."""
    if not isinstance(spec, AttackSpec):
        raise TypeError(f"register_attack takes an AttackSpec, got {type(spec).__name__}")
    if spec.name in ATTACKS:
        raise ValueError(
            f"attack {spec.name!r} is already registered ({ATTACKS[spec.name].description}); "
            f"unregister_attack({spec.name!r}) first, or give the new attack another name"
        )
    ATTACKS[spec.name] = spec
    return spec


def unregister_attack(name: str) -> AttackSpec:
    """Remove an attack from the registry and return its spec (a test's teardown, a plugin replacing one)."""
    if name not in ATTACKS:
        raise KeyError(f"attack {name!r} is not registered; registered: {', '.join(ATTACKS)}")
    return ATTACKS.pop(name)


def attack_spec(name: str) -> AttackSpec | None:
    """The spec of a registered attack, None for any other name (an attack of an older run, a probe)."""
    return ATTACKS.get(str(name))


def attack_title(name: str) -> str:
    """An attack's title (its column header in esq-report); the name itself when it is not registered."""
    spec = ATTACKS.get(str(name))
    return spec.title if spec is not None else str(name)


def library_available(spec: AttackSpec) -> bool:
    """The attack's library can be imported (the in-house ones always)."""
    return (
        spec.library == "esq_lightning"
        or importlib.util.find_spec(_PACKAGES.get(spec.library, spec.library)) is not None
    )


def run_attack(
    name: str, model: nn.Module, x: Tensor, y: Tensor, eps: float | None = None, **params: Any
) -> AttackOutput:
    """Run the named evaluation attack on (x, y); eps None takes the attack's default budget."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid names: {', '.join(ATTACKS)}")
    return ATTACKS[name](eps, **params)(model, x, y)
