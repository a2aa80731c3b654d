"""Adversarial attacks: in-house PGD/FGSM for training, and a registry of evaluation attacks."""

from esq_lightning.attacks.adaptive import ADAPTIVE_ATTACKS, pairing_attack_params
from esq_lightning.attacks.curves import accuracy_at_budgets, accuracy_curve
from esq_lightning.attacks.nattack import nattack
from esq_lightning.attacks.params import check_attack_names, check_attack_params
from esq_lightning.attacks.pgd import fgsm, pgd
from esq_lightning.attacks.registry import (
    ATTACKS,
    attack_spec,
    attack_title,
    library_available,
    register_attack,
    run_attack,
    unregister_attack,
)
from esq_lightning.attacks.spec import Attack, AttackOutput, AttackSpec, ParamRange
from esq_lightning.attacks.utils import (
    GradientCheckError,
    check_gradients,
    frozen_eval,
    perturbation_norms,
)

# The attacks of attacks/adaptive.py join the evaluation registry (one dict: run_attack sees them too).
for _spec in ADAPTIVE_ATTACKS.values():
    if _spec.name not in ATTACKS:
        register_attack(_spec)
del _spec

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackOutput",
    "AttackSpec",
    "GradientCheckError",
    "ParamRange",
    "accuracy_at_budgets",
    "accuracy_curve",
    "attack_spec",
    "attack_title",
    "check_attack_names",
    "check_attack_params",
    "check_gradients",
    "fgsm",
    "frozen_eval",
    "library_available",
    "nattack",
    "pairing_attack_params",
    "perturbation_norms",
    "pgd",
    "register_attack",
    "run_attack",
    "unregister_attack",
]
