"""Adversarial attacks: in-house PGD/FGSM for training, and a registry of evaluation attacks."""

from esq_lightning.attacks.nattack import nattack
from esq_lightning.attacks.pgd import fgsm, pgd
from esq_lightning.attacks.registry import (
    ATTACKS,
    Attack,
    AttackOutput,
    AttackSpec,
    accuracy_at_budgets,
    accuracy_curve,
    run_attack,
)
from esq_lightning.attacks.adaptive import ADAPTIVE_ATTACKS, pairing_attack_params
from esq_lightning.attacks.utils import (
    GradientCheckError,
    check_gradients,
    frozen_eval,
    perturbation_norms,
)

# The attacks of attacks/adaptive.py join the evaluation registry (one dict: run_attack sees them too).
ATTACKS.update(ADAPTIVE_ATTACKS)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackOutput",
    "AttackSpec",
    "GradientCheckError",
    "accuracy_at_budgets",
    "accuracy_curve",
    "check_gradients",
    "fgsm",
    "frozen_eval",
    "nattack",
    "pairing_attack_params",
    "perturbation_norms",
    "pgd",
    "run_attack",
]
