"""Gradient-masking report: flag the clear signs of Athalye et al. (2018) among the attacks of one evaluation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from esq_lightning.attacks.registry import attack_spec
from esq_lightning.attacks.spec import GRADIENT_FREE, ITERATIVE, SINGLE_STEP

# Attacks by what they use of the model, from each attack's spec (AttackSpec.family): FGSM is a single-step
# gradient attack; PGD and AutoAttack iterate; DDN and C&W iterate on the gradient too (minimum-norm); the
# gradient-free ones never look at a gradient; PGD on a loss of its own (adaptive) is compared with none.

# The Python API's tolerance; runs take eval.masking.tolerance (conf/eval/default.yaml), passed in by every caller.
DEFAULT_TOLERANCE = 0.01

CHECKS = (
    "single_step_beats_iterative",
    "more_iterations_raise_accuracy",
    "blackbox_beats_whitebox",
    "clean_only_failure",
)


def _threat(record: Mapping[str, Any]) -> tuple[str, float] | None:
    """(norm, eps) the accuracy of an attack was measured at; None when it is no budget (minimum-norm, eps None)."""
    eps = record.get("eps")
    if eps is None or not isinstance(eps, (int, float)) or math.isnan(eps):
        return None
    return str(record.get("norm", "linf")), float(eps)


def _same_threat(a: tuple[str, float] | None, b: tuple[str, float] | None) -> bool:
    return a is not None and b is not None and a[0] == b[0] and math.isclose(a[1], b[1], rel_tol=1e-6, abs_tol=1e-12)


def _family(name: str) -> str | None:
    spec = attack_spec(name)
    return spec.family if spec is not None else None


def _strength(name: str, record: Mapping[str, Any]) -> tuple[int, int] | None:
    """An order among the L_p gradient attacks that are known to nest (AttackSpec.nesting): FGSM (0) < PGD (1, by
    steps x restarts) < AutoAttack (2).

    DDN and C&W have no such order with the others (different algorithms), so they get None; so does PGD on
    another loss (margin, DLR, targeted, pairing), which does not nest with cross-entropy PGD.
    """
    spec = attack_spec(name)
    rank = spec.nesting if spec is not None else None
    if rank is None:
        return None
    if rank == 1:
        return (1, int(record.get("steps", 1)) * int(record.get("restarts", 1)))
    return (rank, 1 if rank == 0 else 0)


def _fmt(acc: float) -> str:
    return f"{100 * acc:.2f}%"


def gradient_masking_report(
    clean_acc: float,
    robust_acc: Mapping[str, float],
    attacks: Mapping[str, Mapping[str, Any]],
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Compare the attacks of one evaluation pairwise and flag the clear signs of gradient masking.

    Only attacks measured at the same norm and eps are compared. A pair is flagged when the attack that
    should be weaker has an accuracy lower than the stronger one by more than `tolerance` (a fraction; the
    default of one point keeps a sample or two of random-start luck on a small test set from raising flags):
    - single_step_beats_iterative: FGSM below PGD or AutoAttack;
    - more_iterations_raise_accuracy: PGD with more steps x restarts (or AutoAttack) above PGD with fewer;
    - blackbox_beats_whitebox: Square, Boundary or N Attack below the best (lowest) iterative gradient attack;
    - clean_only_failure: a gradient attack with eps > 0 left accuracy at clean accuracy (it found nothing).
    Returns {"flags": [human-readable strings], "checks": {check: [comparisons, flagged or not]}}.
    """
    threats = {name: _threat(attacks.get(name, {})) for name in robust_acc}
    checks: dict[str, list[dict[str, Any]]] = {name: [] for name in CHECKS}
    flags: list[str] = []
    names = list(robust_acc)

    def compare(check: str, weaker: str, stronger: str, why: str) -> None:
        t = threats[weaker]
        assert t is not None
        # 1e-9: 0.09 - 0.01 is 0.0799999... in floating point, and 0.08 must not be flagged at tolerance 0.01.
        flagged = robust_acc[weaker] < robust_acc[stronger] - tolerance - 1e-9
        checks[check].append(
            {
                "weaker": weaker,
                "stronger": stronger,
                "norm": t[0],
                "eps": t[1],
                "weaker_acc": robust_acc[weaker],
                "stronger_acc": robust_acc[stronger],
                "flagged": flagged,
            }
        )
        if flagged:
            flags.append(
                f"{check}: {weaker} {_fmt(robust_acc[weaker])} < {stronger} {_fmt(robust_acc[stronger])} "
                f"at {t[0]} eps={t[1]:.4g} ({why})"
            )

    for weak in names:
        for strong in names:
            if weak == strong or not _same_threat(threats[weak], threats[strong]):
                continue
            s_weak, s_strong = _strength(weak, attacks[weak]), _strength(strong, attacks[strong])
            if _family(weak) == SINGLE_STEP and _family(strong) == ITERATIVE and s_strong is not None:
                compare(
                    "single_step_beats_iterative",
                    weak,
                    strong,
                    "a single gradient step should not beat an iterative attack",
                )
            elif s_weak is not None and s_strong is not None and s_weak[0] >= 1 and s_weak < s_strong:
                compare(
                    "more_iterations_raise_accuracy",
                    weak,
                    strong,
                    "more steps, restarts or AutoAttack's ensemble should not raise robust accuracy",
                )

    # Black-box against the strongest white-box result of the same threat model: a weak configuration of one
    # gradient attack (C&W with 20 steps) is no sign of masking when another gradient attack does better.
    for weak in names:
        if _family(weak) != GRADIENT_FREE:
            continue
        rivals = [s for s in names if _family(s) == ITERATIVE and _same_threat(threats[weak], threats[s])]
        if rivals:
            strong = min(rivals, key=lambda s: robust_acc[s])
            compare(
                "blackbox_beats_whitebox",
                weak,
                strong,
                "a gradient-free attack should not beat the best white-box gradient attack",
            )

    for name in names:
        t = threats[name]
        if _family(name) not in (SINGLE_STEP, ITERATIVE) or t is None or t[1] <= 0:
            continue
        flagged = clean_acc > 0 and robust_acc[name] >= clean_acc
        checks["clean_only_failure"].append(
            {
                "attack": name,
                "norm": t[0],
                "eps": t[1],
                "acc": robust_acc[name],
                "clean_acc": clean_acc,
                "flagged": flagged,
            }
        )
        if flagged:
            flags.append(
                f"clean_only_failure: {name} {_fmt(robust_acc[name])} equals clean accuracy at {t[0]} "
                f"eps={t[1]:.4g} (a gradient attack that changes no prediction suggests useless gradients)"
            )
    return {"flags": flags, "checks": checks, "tolerance": tolerance}


def format_flags(report: Mapping[str, Any]) -> str:
    """The report as printed after the results table."""
    n = sum(len(v) for v in report.get("checks", {}).values())
    if not report.get("flags"):
        return f"gradient masking: no sign found ({n} comparisons at equal norm and eps)"
    return "\n".join(
        [
            "gradient masking: POSSIBLE, check these signs (Athalye et al. 2018):",
            *(f"  - {flag}" for flag in report["flags"]),
        ]
    )
